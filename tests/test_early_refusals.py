"""IssueCoupon refusals answered in front of the Connect runtime (coupon.early_refusals) are the
runtime's answers exactly: every request below is sent twice to the same server and store,
once with early answers allowed and once with the store declining to judge without I/O (so
the runtime answers), and the two answers must match byte for byte, metrics included. The
cases name which of them the early path must answer itself, so a front that never answers
fails too. The campaigns' refusals are primed first: the early path looks only at campaigns
refused a moment ago (coupon.refusing_campaigns), on a clock the tests hold still."""

from __future__ import annotations

import asyncio
import gzip
import re
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from coupon import request_ids
from coupon.app import create_app
from coupon.campaigns import NewCampaign
from coupon.clock import ManualClock, system_clock
from coupon.config import AuthConfig, Config, DatabaseConfig, LimitsConfig
from coupon.gen.coupon_pb import IssueCouponRequest
from coupon.refusing_campaigns import MAX_CAMPAIGNS, TTL_S, RefusingCampaigns
from coupon.store.memory import MemoryStore
from coupon.store.postgres import PostgresStore
from tests.auth_support import bearer, jwt_config, rsa_pair
from tests.support import ServerThread, wait_until_healthy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from coupon.campaigns import IssuedCoupon, IssueRequest
    from coupon.errors import CouponError
    from tests.auth_support import KeyPair

ISSUE = "/coupon.CouponService/IssueCoupon"
JSON = {"Content-Type": "application/json"}
PROTO = {"Content-Type": "application/proto"}
# What differs between two answers by design: the date, and a made-up request id.
_MADE_UP_ID = "<made up>"
# Counters a call changes; latency buckets differ by timing and are left out.
_COUNTED = re.compile(
    r"^(coupon_requests_total|coupon_issue_refusals_total|coupon_coupons_issued_total)"
)


class Judging:
    """Mixed into a store: it can decline to judge without I/O (`early = False`), and counts
    its refusals without I/O and the issue calls it gets."""

    early = True
    early_refusals = 0
    issue_calls = 0
    refusing: RefusingCampaigns  # the app's, given to create_app

    def refusal_without_io(self, campaign_id: str, request: IssueRequest) -> CouponError | None:
        if not self.early:
            return None
        refusal: CouponError | None = super().refusal_without_io(  # type: ignore[misc]
            campaign_id, request
        )
        self.early_refusals += refusal is not None
        return refusal

    async def issue_coupon(self, campaign_id: str, request: IssueRequest) -> IssuedCoupon:
        self.issue_calls += 1
        issued: IssuedCoupon = await super().issue_coupon(  # type: ignore[misc]
            campaign_id, request
        )
        return issued


class JudgedStore(Judging, MemoryStore):
    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.refusing = still_refusing()


def still_refusing() -> RefusingCampaigns:
    """Refusing campaigns on a clock that stands still: noted once, noted for the test."""
    return RefusingCampaigns(monotonic=lambda: 0.0)


def counters(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    found = {}
    for line in text.splitlines():
        if _COUNTED.match(line):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def answer_and_counts(
    http: httpx.Client, request: dict[str, Any]
) -> tuple[int, list[tuple[str, str]], bytes, dict[str, float]]:
    before = counters(http)
    response = http.post(ISSUE, **request)
    after = counters(http)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    headers = [
        (k, _MADE_UP_ID if _is_made_up(k, v) else v)
        for k, v in response.headers.multi_items()
        if k != "date"
    ]
    return response.status_code, headers, response.content, delta


def _is_made_up(header: str, value: str) -> bool:
    return header == request_ids.HEADER and value.startswith(request_ids._PROCESS_PREFIX)


def both_ways(
    store: Judging,
    http: httpx.Client,
    make_request: Callable[[], dict[str, Any]],
) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
    """The answer with early answers allowed, the runtime's answer, and whether the first
    came from the early path (the store refused without I/O and was never asked to issue)."""
    store.early = True
    refusals, issues = store.early_refusals, store.issue_calls
    early = answer_and_counts(http, make_request())
    answered_early = store.early_refusals == refusals + 1 and store.issue_calls == issues
    # The runtime alone: with no campaign refusing, the dispatcher does not even look.
    store.early = False
    noted = dict(store.refusing.entries)
    store.refusing.entries.clear()
    runtime = answer_and_counts(http, make_request())
    store.refusing.entries.update(noted)
    return early, runtime, answered_early


@pytest.fixture
def served() -> Iterator[tuple[JudgedStore, httpx.Client, dict[str, str], ManualClock]]:
    clock = ManualClock(system_clock())
    store = JudgedStore(clock)
    config = replace(Config(), limits=LimitsConfig(max_request_bytes=4096))
    with (
        ServerThread(create_app(config, store, store.refusing)) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        wait_until_healthy(server.base_url, path="/readyz")
        campaigns = {
            "sold": create(http, total=1),
            "future": create(http, total=5, startTime="2030-07-01T00:00:00Z"),
            "ending": create(http, total=5, endTime=(clock() + timedelta(hours=1)).isoformat()),
            "unknown": "5b0c2b63-8a5e-4e1f-9f39-3f0c1d2e4a77",
        }
        held = issue(http, campaigns["sold"], userId="alice", idempotencyKey="alice-1")
        assert held.status_code == 200, held.text
        clock.set(clock() + timedelta(hours=2))  # "ending" has ended, by the store's clock
        for name in ("sold", "future", "ending", "unknown"):
            assert issue(http, campaigns[name]).status_code >= 400  # primed
        yield store, http, campaigns, clock


def create(http: httpx.Client, **fields: Any) -> str:
    response = http.post("/coupon.CouponService/CreateCampaign", json={"name": "early", **fields})
    assert response.status_code == 200, response.text
    return str(response.json()["campaignId"])


def issue(http: httpx.Client, campaign_id: str, **fields: Any) -> httpx.Response:
    return http.post(ISSUE, json={"campaignId": campaign_id, **fields})


def proto_body(campaign_id: str, **fields: Any) -> bytes:
    return IssueCouponRequest(campaign_id=campaign_id, **fields).to_binary()


# (case, campaign, request keyword arguments for httpx; a callable gets the campaign id, and
# whether the early path must answer it itself)
CASES: list[tuple[str, str, Any, bool]] = [
    ("sold out, JSON", "sold", lambda c: {"json": {"campaignId": c}}, True),
    ("sold out, binary", "sold", lambda c: {"content": proto_body(c), "headers": PROTO}, True),
    ("sold out, another user", "sold",
     lambda c: {"json": {"campaignId": c, "userId": "bob"}}, True),
    ("sold out, the holder gets the code back", "sold",
     lambda c: {"json": {"campaignId": c, "userId": "alice"}}, False),
    ("sold out, the holder's key", "sold",
     lambda c: {"json": {"campaignId": c, "userId": "alice", "idempotencyKey": "alice-1"}}, False),
    ("a key used by another user", "sold",
     lambda c: {"json": {"campaignId": c, "userId": "bob", "idempotencyKey": "alice-1"}}, True),
    ("not started", "future", lambda c: {"json": {"campaignId": c}}, True),
    ("ended", "ending", lambda c: {"json": {"campaignId": c}}, True),
    # An unknown id is no campaign to note: a storm of made-up ids cannot fill the set.
    ("unknown campaign", "unknown", lambda c: {"json": {"campaignId": c}}, False),
    ("body in chunks", "sold",
     lambda c: {"content": iter([b'{"campaignId": "', c.encode(), b'"}']), "headers": JSON}, True),
    ("a sane request id is echoed", "sold",
     lambda c: {"json": {"campaignId": c}, "headers": {"X-Request-Id": "order-42.a"}}, True),
    ("a timeout", "sold",
     lambda c: {"json": {"campaignId": c}, "headers": {"Connect-Timeout-Ms": "5000"}}, True),
    ("protocol version 1", "sold",
     lambda c: {"json": {"campaignId": c}, "headers": {"Connect-Protocol-Version": "1"}}, True),
    # What the early path leaves to the runtime:
    ("malformed JSON", "sold", lambda c: {"content": b'{"campaignId": ', "headers": JSON}, False),
    ("an unknown field", "sold", lambda c: {"json": {"campaignId": c, "campaign": c}}, False),
    ("not a campaign id", "sold", lambda c: {"json": {"campaignId": "nope"}}, False),
    ("a control character in the user id", "sold",
     lambda c: {"json": {"campaignId": c, "userId": "bo\x07b"}}, False),
    ("gzip", "sold", lambda c: {
        "content": gzip.compress(b'{"campaignId": "%s"}' % c.encode()),
        "headers": {**JSON, "Content-Encoding": "gzip"}}, False),
    ("protocol version 2", "sold",
     lambda c: {"json": {"campaignId": c}, "headers": {"Connect-Protocol-Version": "2"}}, False),
    ("a malformed timeout", "sold",
     lambda c: {"json": {"campaignId": c}, "headers": {"Connect-Timeout-Ms": "5s"}}, False),
    ("a charset on the content type", "sold", lambda c: {
        "content": b'{"campaignId": "%s"}' % c.encode(),
        "headers": {"Content-Type": "application/json; charset=utf-8"}}, False),
    ("an oversize body", "sold", lambda c: {
        "json": {"campaignId": c, "userId": "x" * 5000}}, False),
    ("an insane request id", "sold",
     lambda c: {"json": {"campaignId": c}, "headers": {"X-Request-Id": "no spaces allowed"}}, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("campaign", "request_for", "early_expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_an_early_answer_is_the_runtimes_answer(
    served: tuple[JudgedStore, httpx.Client, dict[str, str], ManualClock],
    campaign: str,
    request_for: Any,
    early_expected: bool,
) -> None:
    store, http, campaigns, _ = served
    campaign_id = campaigns[campaign]
    early, runtime, answered_early = both_ways(store, http, lambda: request_for(campaign_id))
    assert answered_early is early_expected
    assert early == runtime
    status, headers, _, counted = early
    if early_expected:
        assert status >= 400
        assert counted  # the call and its refusal are counted
    given = request_for(campaign_id).get("headers", {}).get("X-Request-Id")
    if given == "order-42.a":
        assert (request_ids.HEADER, given) in headers


@pytest.fixture
def served_to_customers(
    tmp_path: Path,
) -> Iterator[tuple[JudgedStore, httpx.Client, str, KeyPair]]:
    """A server whose IssueCoupon needs a customer's JWT, with a sold-out campaign that
    alice holds a code of."""
    pair = rsa_pair()
    store = JudgedStore(ManualClock(system_clock()))
    config = replace(
        Config(),
        auth=AuthConfig(customers_jwt=jwt_config(pair.write_public(tmp_path))),
    )
    with (
        ServerThread(create_app(config, store, store.refusing)) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        wait_until_healthy(server.base_url, path="/readyz")
        sold = create(http, total=1)
        held = http.post(ISSUE, json={"campaignId": sold}, headers=bearer(pair.token("alice")))
        assert held.status_code == 200, held.text
        primed = http.post(ISSUE, json={"campaignId": sold}, headers=bearer(pair.token("eve")))
        assert primed.status_code == 429, primed.text
        yield store, http, sold, pair


# (case, headers and body fields for the call, whether the early path answers it)
CUSTOMER_CASES: list[tuple[str, Callable[[KeyPair], dict[str, Any]], bool]] = [
    ("another customer", lambda p: {"headers": bearer(p.token("bob"))}, True),
    ("the body repeats the token's user", lambda p: {
        "headers": bearer(p.token("bob")), "fields": {"userId": "bob"}}, True),
    ("the holder gets the code back", lambda p: {"headers": bearer(p.token("alice"))}, False),
    ("no token", lambda p: {}, False),
    ("an expired token", lambda p: {"headers": bearer(p.token("bob", exp=1))}, False),
    ("the body names another user", lambda p: {
        "headers": bearer(p.token("bob")), "fields": {"userId": "alice"}}, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call_for", "early_expected"),
    [case[1:] for case in CUSTOMER_CASES],
    ids=[case[0] for case in CUSTOMER_CASES],
)
def test_an_early_answer_to_a_customer_is_the_runtimes_answer(
    served_to_customers: tuple[JudgedStore, httpx.Client, str, KeyPair],
    call_for: Callable[[KeyPair], dict[str, Any]],
    early_expected: bool,
) -> None:
    store, http, sold, pair = served_to_customers
    call = call_for(pair)  # one token for both answers: the same caller

    def make_request() -> dict[str, Any]:
        body = {"campaignId": sold, **call.get("fields", {})}
        return {"json": body, "headers": call.get("headers", {})}

    early, runtime, answered_early = both_ways(store, http, make_request)
    assert answered_early is early_expected
    assert early == runtime


class JudgedPostgresStore(Judging, PostgresStore):
    pass


def test_postgres_early_answers_are_the_runtimes_answers(pg_dsn: str) -> None:
    """What the PostgreSQL store knows without a query: a campaign it saw sell out (for
    calls with neither user nor key) and a start far ahead. A call with a user may hold an
    earlier code, which only the database knows: the runtime answers it."""
    store = JudgedPostgresStore(DatabaseConfig(dsn=pg_dsn), retry_initial_s=0.05)
    store.refusing = still_refusing()
    with (
        ServerThread(create_app(Config(), store, store.refusing)) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        wait_until_healthy(server.base_url, path="/readyz")
        sold = create(http, total=1)
        future = create(http, total=1, startTime="2030-07-01T00:00:00Z")
        assert issue(http, sold).status_code == 200
        # The store learns the campaign sold out from a refusal of its own.
        assert issue(http, sold).status_code == 429
        assert issue(http, future).status_code == 400
        cases = [
            ({"json": {"campaignId": sold}}, True),
            ({"content": proto_body(sold), "headers": PROTO}, True),
            ({"json": {"campaignId": future}}, True),
            ({"json": {"campaignId": sold, "userId": "bob"}}, False),
        ]
        for request, early_expected in cases:
            early, runtime, answered_early = both_ways(store, http, lambda r=request: r)
            assert answered_early is early_expected, request
            assert early == runtime
            assert early[0] >= 400


def test_a_call_out_of_time_is_left_to_the_runtime(
    served: tuple[JudgedStore, httpx.Client, dict[str, str], ManualClock],
) -> None:
    """A zero timeout has run out on arrival; the runtime answers it (deadline_exceeded or
    the refusal, whichever its race gives: not compared here)."""
    store, http, campaigns, _ = served
    request = {"json": {"campaignId": campaigns["sold"]}, "headers": {"Connect-Timeout-Ms": "0"}}
    _, _, answered_early = both_ways(store, http, lambda: request)
    assert not answered_early


class StepClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refusing_campaigns_lapse_unless_noted_again() -> None:
    clock = StepClock()
    refusing = RefusingCampaigns(monotonic=clock)
    refusing.note("sold")
    refusing.note("early")
    assert refusing.is_refusing("sold")
    assert not refusing.is_refusing("never noted")
    clock.now += TTL_S / 2
    refusing.note("sold")  # refused again: stays
    clock.now += TTL_S * 0.75
    assert refusing.is_refusing("sold")
    assert not refusing.is_refusing("early")  # lapsed
    clock.now += TTL_S * 2
    assert not refusing.is_refusing("anything")
    assert refusing.entries == {}  # swept by a lookup of another id: the early path idles


def test_refusing_campaigns_are_bounded() -> None:
    refusing = RefusingCampaigns(monotonic=StepClock())
    for n in range(MAX_CAMPAIGNS + 10):
        refusing.note(f"campaign-{n}")
    assert len(refusing.entries) <= MAX_CAMPAIGNS
    assert refusing.is_refusing(f"campaign-{MAX_CAMPAIGNS + 9}")


def test_the_first_refusal_of_a_campaign_teaches_the_early_path() -> None:
    """The runtime answers a campaign's first refusal and the service notes it; its next
    calls are refused early, until the refusals stop for longer than TTL_S."""
    monotonic = StepClock()
    store = JudgedStore(ManualClock(system_clock()))
    with (
        ServerThread(create_app(Config(), store, RefusingCampaigns(monotonic))) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        wait_until_healthy(server.base_url, path="/readyz")
        sold = create(http, total=1)
        assert issue(http, sold).status_code == 200

        def refused_early() -> bool:
            refusals, issues = store.early_refusals, store.issue_calls
            assert issue(http, sold).status_code == 429
            return store.early_refusals == refusals + 1 and store.issue_calls == issues

        assert not refused_early()  # the runtime's: nothing was refusing yet
        assert refused_early()
        monotonic.now += TTL_S * 0.9
        assert refused_early()  # each early refusal notes the campaign again
        monotonic.now += TTL_S * 1.1
        assert not refused_early()
        assert refused_early()


# Calls driven message by message through the app itself, as no HTTP client sends them on
# demand: a body in pieces, a client that leaves, a body that never comes.


class Call:
    """One call to the ASGI app: `pieces` are the body's messages; after them, `then` is
    "disconnect" or "hang" (nothing more ever comes)."""

    def __init__(self, campaign_id: str, pieces: int, then: str, timeout_ms: str = "") -> None:
        body = b'{"campaignId": "%s"}' % campaign_id.encode()
        size = -(-len(body) // pieces)
        self.messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": body[i : i + size], "more_body": True}
            for i in range(0, len(body), size)
        ]
        if then == "complete":
            self.messages[-1]["more_body"] = False
        elif then == "disconnect":
            self.messages.append({"type": "http.disconnect"})
        self.headers = [(b"content-type", b"application/json")]
        if timeout_ms:
            self.headers.append((b"connect-timeout-ms", timeout_ms.encode()))
        self.sent: list[dict[str, Any]] = []

    async def run(self, app: Any) -> tuple[int | None, bytes]:
        pending = list(self.messages)
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop(0)
            await never.wait()  # a client that sends nothing more, and stays
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": ISSUE, "raw_path": ISSUE.encode(),
            "query_string": b"", "root_path": "", "headers": self.headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
        }  # fmt: skip
        async with asyncio.timeout(30):  # a hang guard, not a measurement
            await app(scope, receive, send)
        status = next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return status, body


@pytest.fixture
async def direct() -> tuple[JudgedStore, Any, dict[str, str]]:
    store = JudgedStore(ManualClock(system_clock()))
    app = create_app(Config(), store, store.refusing)
    sold = (await store.create_campaign(new_campaign(total=1))).id
    open_ = (await store.create_campaign(new_campaign(total=100))).id
    assert (await Call(sold, 1, "complete").run(app))[0] == 200
    assert (await Call(sold, 1, "complete").run(app))[0] == 429  # noted: now refusing
    return store, app, {"sold": sold, "open": open_}


def new_campaign(total: int) -> NewCampaign:
    return NewCampaign.validate(name="direct", total=total, start_time=None, max_total=1000)


async def both_ways_direct(
    store: JudgedStore, app: Any, make_call: Callable[[], Call], campaign_id: str
) -> tuple[tuple[int | None, bytes], tuple[int | None, bytes], int]:
    """The answer with early answers allowed, the runtime's alone, and the codes the
    campaign issued meanwhile."""

    async def issued() -> int:
        return (await store.get_campaign(campaign_id, 0, 1, brand=None)).campaign.issued

    before = await issued()
    early = await make_call().run(app)
    noted = dict(store.refusing.entries)
    store.refusing.entries.clear()
    runtime = await make_call().run(app)
    store.refusing.entries.update(noted)
    return early, runtime, await issued() - before


DIRECT_CASES = [
    ("a body in three pieces", "sold", lambda c: Call(c, 3, "complete"), 429),
    ("a body in three pieces, with time", "sold", lambda c: Call(c, 3, "complete", "5000"), 429),
    ("a client gone before its body", "sold", lambda c: Call(c, 1, "disconnect"), 499),
    ("a client gone mid-body", "sold", lambda c: Call(c, 2, "disconnect"), 499),
    ("a body that never ends, on a refusing campaign", "sold",
     lambda c: Call(c, 2, "hang", "50"), 504),
    ("a body that never ends, on a campaign that issues", "open",
     lambda c: Call(c, 2, "hang", "50"), 504),
]  # fmt: skip


@pytest.mark.parametrize(
    ("campaign", "make_call", "status"),
    [case[1:] for case in DIRECT_CASES],
    ids=[case[0] for case in DIRECT_CASES],
)
async def test_a_call_read_in_pieces_is_answered_as_by_the_runtime(
    direct: tuple[JudgedStore, Any, dict[str, str]],
    campaign: str,
    make_call: Callable[[str], Call],
    status: int,
) -> None:
    store, app, campaigns = direct
    campaign_id = campaigns[campaign]
    early, runtime, issued = await both_ways_direct(
        store, app, lambda: make_call(campaign_id), campaign_id
    )
    assert early == runtime
    assert early[0] == status
    assert issued == 0  # refused, out of time or gone: nothing issued either way
