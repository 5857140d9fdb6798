"""The error table of DESIGN.md §3, row by row, over HTTP with JSON."""

from __future__ import annotations

import gc
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon import errors
from coupon.app import create_app
from coupon.config import Config
from coupon.rpc_errors import CONNECT_CODE_BY_ERROR, to_connect_error
from coupon.store.memory import MemoryStore
from tests.support import JSON, SERVICE, ServerThread, call
from tests.test_lifecycle_contract import reason

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("error", "code", "http_status"),
    [
        (errors.InvalidArgument("x"), "invalid_argument", 400),
        (errors.CampaignNotFound(), "not_found", 404),
        (errors.CampaignNotStarted(datetime(2030, 1, 1, tzinfo=UTC)), "failed_precondition", 400),
        (errors.SoldOut(), "resource_exhausted", 429),
        (errors.CouponNotFound(), "not_found", 404),
        (errors.CampaignEnded(), "failed_precondition", 400),
        (errors.CouponExpired(), "failed_precondition", 400),
        (errors.AlreadyRedeemed(), "failed_precondition", 400),
        (errors.NotHolder(), "failed_precondition", 400),
        (errors.UserMismatch(), "failed_precondition", 400),
        (errors.IdempotencyKeyReused(), "failed_precondition", 400),
        (errors.StoreUnavailable(), "unavailable", 503),
        (errors.Unauthenticated(), "unauthenticated", 401),
        (errors.PermissionDenied(), "permission_denied", 403),
        (RuntimeError("postgresql://admin:hunter2@db/prod"), "internal", 500),
    ],
)
async def test_every_error_reaches_the_client_with_its_code_and_status(
    error: Exception, code: str, http_status: int, caplog: pytest.LogCaptureFixture
) -> None:
    class FailingStore(MemoryStore):
        async def issue_coupon(self, campaign_id: str, request: Any) -> Any:
            raise error

    with ServerThread(create_app(Config(), FailingStore())) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            status, body = await call(client, "IssueCoupon", {"campaignId": UNKNOWN_ID})
            assert (status, body["code"]) == (http_status, code)
            assert "hunter2" not in body["message"]
            if isinstance(error, errors.CouponError) and error.reason is not None:
                assert reason(body) == error.reason
            else:
                assert "details" not in body
            # The same connection keeps working after any error, a bug included.
            status, _ = await call(client, "CreateCampaign", {"name": "n", "total": 1})
            assert status == 200
    if code == "internal":
        assert body["message"] == "internal error"
        assert any(r.exc_info and "hunter2" in str(r.exc_info[1]) for r in caplog.records)


def test_every_domain_error_has_a_connect_code() -> None:
    domain_errors = {cls for cls in vars(errors).values() if isinstance(cls, type)} - {
        errors.CouponError
    }
    domain_errors = {cls for cls in domain_errors if issubclass(cls, errors.CouponError)}
    assert domain_errors == set(CONNECT_CODE_BY_ERROR)
    assert to_connect_error(errors.CouponError()).code == Code.INTERNAL


@pytest.fixture
async def client(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server) as http:
        yield http


BAD_REQUESTS: list[tuple[str, dict[str, Any] | bytes, str]] = [
    ("CreateCampaign", b"{not json", "invalid_argument"),
    ("CreateCampaign", b"[1, 2]", "invalid_argument"),
    ("CreateCampaign", {"name": "x", "total": "many"}, "invalid_argument"),
    ("CreateCampaign", {"name": 5, "total": 1}, "invalid_argument"),
    ("CreateCampaign", {"name": "x", "total": 2**40}, "invalid_argument"),
    (
        "CreateCampaign",
        {"name": "x", "total": 1, "startTIme": "2030-01-01T00:00:00Z"},
        "invalid_argument",
    ),
    ("CreateCampaign", {"name": "x", "total": 1, "startTime": "tomorrow"}, "invalid_argument"),
    ("CreateCampaign", {"name": "", "total": 1}, "invalid_argument"),
    ("CreateCampaign", {"name": "   ", "total": 1}, "invalid_argument"),
    ("CreateCampaign", {"name": "n" * 201, "total": 1}, "invalid_argument"),
    ("CreateCampaign", {"name": "x"}, "invalid_argument"),
    ("CreateCampaign", {"name": "x", "total": -1}, "invalid_argument"),
    ("CreateCampaign", {"name": "x", "total": 1_000_001}, "invalid_argument"),
    ("IssueCoupon", {}, "invalid_argument"),
    ("IssueCoupon", {"campaignId": "not-a-campaign"}, "invalid_argument"),
    ("IssueCoupon", {"campaignId": UNKNOWN_ID, "userId": "u" * 129}, "invalid_argument"),
    ("IssueCoupon", {"campaignId": UNKNOWN_ID, "extra": 1}, "invalid_argument"),
    ("IssueCoupon", {"campaignId": UNKNOWN_ID}, "not_found"),
    ("GetCampaign", {"campaignId": UNKNOWN_ID}, "not_found"),
    ("GetCampaign", {"campaignId": UNKNOWN_ID, "pageSize": -1}, "invalid_argument"),
    ("GetCampaign", {"campaignId": UNKNOWN_ID, "pageSize": 10_001}, "invalid_argument"),
    ("GetCampaign", {"campaignId": UNKNOWN_ID, "pageToken": "garbage!"}, "invalid_argument"),
]

# One test walks these on one server per store (a server per case would cost a minute).
V2_BAD_REQUESTS: list[tuple[str, dict[str, Any] | bytes, str]] = [
    *(
        ("CreateCampaign", {"name": "x", "total": 1, **fields}, "invalid_argument")
        for fields in [
            {"endTime": "2020-01-01T00:00:00Z"},  # before now
            {"startTime": "2030-01-02T00:00:00Z", "endTime": "2030-01-01T00:00:00Z"},
            {"startTime": "2030-01-01T00:00:00Z", "endTime": "2030-01-01T00:00:00Z"},
            {"endTime": "soon"},
            {"discount": {"percentOff": 0}},
            {"discount": {"percentOff": 101}},
            {"discount": {"percentOff": -5}},
            {"discount": {"amountOff": {"currency": "KRW", "minorUnits": "0"}}},
            {"discount": {"amountOff": {"currency": "KRW", "minorUnits": "-1"}}},
            {"discount": {"amountOff": {"currency": "krw", "minorUnits": "100"}}},
            {"discount": {"amountOff": {"currency": "WON!", "minorUnits": "100"}}},
            {"discount": {"amountOff": {"minorUnits": "100"}}},
            {"discount": {"percent": 5}},
            {"metadata": {f"k{i}": "v" for i in range(21)}},
            {"metadata": {"": "v"}},
            {"metadata": {"k" * 41: "v"}},
            {"metadata": {"k": "v" * 501}},
            {"metadata": {"k": "line\nbreak"}},
            {"metadata": {"k": 1}},
            {"metadata": ["k", "v"]},
            {"brand": "-acme"},
            {"brand": "a" * 65},
            {"brand": "acme brand"},
            {"brand": "ácme"},
        ]
    ),
    ("IssueCoupon", {"campaignId": UNKNOWN_ID, "idempotencyKey": "k" * 65}, "invalid_argument"),
    ("IssueCoupon", {"campaignId": UNKNOWN_ID, "idempotencyKey": "a b"}, "invalid_argument"),
    ("IssueCoupon", {"campaignId": UNKNOWN_ID, "idempotencyKey": "키"}, "invalid_argument"),
    ("GetCoupon", {}, "invalid_argument"),
    ("GetCoupon", {"code": "ABCDEFGHIJ"}, "invalid_argument"),
    ("GetCoupon", {"code": "가나다라마바사아자1" + "1"}, "invalid_argument"),
    ("GetCoupon", {"code": "가나다라마바사아자1"}, "not_found"),
    ("RedeemCoupon", {"code": "가나다라마바사아자1"}, "invalid_argument"),
    ("RedeemCoupon", {"orderId": "o"}, "invalid_argument"),
    ("RedeemCoupon", {"code": "가나다라마바사아자1", "orderId": "o" * 129}, "invalid_argument"),
    ("RedeemCoupon", {"code": "가나다라마바사아자1", "orderId": "o\u0000"}, "invalid_argument"),
    (
        "RedeemCoupon",
        {"code": "가나다라마바사아자1", "orderId": "o", "userId": "u" * 129},
        "invalid_argument",
    ),
    ("RedeemCoupon", {"code": "가나다라마바사아자1", "orderId": "o"}, "not_found"),
    ("CancelRedemption", {"code": "가나다라마바사아자1"}, "invalid_argument"),
    ("CancelRedemption", {"code": "nope", "orderId": "o"}, "invalid_argument"),
    ("CancelRedemption", {"code": "가나다라마바사아자1", "orderId": "o"}, "not_found"),
    ("ListCampaigns", {"pageSize": -1}, "invalid_argument"),
    ("ListCampaigns", {"pageSize": 1001}, "invalid_argument"),
    ("ListCampaigns", {"pageToken": "garbage!"}, "invalid_argument"),
    ("ListCampaigns", {"pageToken": "MTox"}, "invalid_argument"),
]


@pytest.mark.parametrize(("method", "body", "code"), BAD_REQUESTS)
async def test_bad_input_gets_a_clear_connect_error(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | bytes, code: str
) -> None:
    status, reply = await call(client, method, body)
    expected_status = {"invalid_argument": 400, "not_found": 404}[code]
    assert (status, reply["code"]) == (expected_status, code)
    assert reply["message"]


async def test_a_page_token_of_another_campaign_is_refused(client: httpx.AsyncClient) -> None:
    ids = []
    for _ in range(2):
        _, body = await call(client, "CreateCampaign", {"name": "x", "total": 3})
        ids.append(body["campaignId"])
        for _ in range(3):
            await call(client, "IssueCoupon", {"campaignId": ids[-1]})
    _, page = await call(client, "GetCampaign", {"campaignId": ids[0], "pageSize": 1})
    token = page["nextPageToken"]
    status, body = await call(client, "GetCampaign", {"campaignId": ids[1], "pageToken": token})
    assert (status, body["code"]) == (400, "invalid_argument")


async def test_a_body_over_the_size_limit_is_resource_exhausted(client: httpx.AsyncClient) -> None:
    huge = {"name": "x" * (64 * 1024), "total": 1}
    status, body = await call(client, "CreateCampaign", huge)
    assert (status, body["code"]) == (429, "resource_exhausted")


async def test_unknown_method_and_wrong_content_type_are_http_errors(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(f"{SERVICE}/DeleteEverything", content=b"{}", headers=JSON)
    assert response.status_code == 404
    response = await client.post(
        f"{SERVICE}/IssueCoupon", content=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415


async def test_native_grpc_on_the_uvicorn_engine_is_415_naming_the_engine_that_serves_it(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        f"{SERVICE}/IssueCoupon",
        content=b"\x00\x00\x00\x00\x00",
        headers={"Content-Type": "application/grpc"},
    )
    assert response.status_code == 415
    assert "server.engine: pyvoy" in response.text


async def test_internal_errors_are_logged_with_their_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class BrokenStore(MemoryStore):
        async def create_campaign(self, campaign: Any) -> Any:
            raise KeyError("boom")

    with (
        caplog.at_level(logging.ERROR, logger="coupon.rpc"),
        ServerThread(create_app(Config(), BrokenStore())) as server,
    ):
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            status, body = await call(client, "CreateCampaign", {"name": "x", "total": 1})
    assert (status, body) == (500, {"code": "internal", "message": "internal error"})
    records = [r for r in caplog.records if r.name == "coupon.rpc"]
    assert records
    assert records[0].exc_info is not None
    assert "CreateCampaign" in records[0].getMessage()


async def test_bad_v2_input_gets_a_clear_connect_error(client: httpx.AsyncClient) -> None:
    failures = []
    for method, body, code in V2_BAD_REQUESTS:
        status, reply = await call(client, method, body)
        expected_status = {"invalid_argument": 400, "not_found": 404}[code]
        if (status, reply.get("code")) != (expected_status, code) or not reply.get("message"):
            failures.append((method, body, status, reply))
    assert failures == []


async def test_a_refused_call_leaves_no_reference_cycle_behind() -> None:
    """A refusal is freed once it is answered, not left to the garbage collector: a sold-out
    storm is thousands of them a second, and each cycle held some 40 objects."""
    with ServerThread(create_app(Config(), MemoryStore())) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            _, created = await call(client, "CreateCampaign", {"name": "cycles", "total": 1})
            campaign = {"campaignId": created["campaignId"]}
            assert (await call(client, "IssueCoupon", campaign))[0] == 200
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept
            try:
                gc.garbage.clear()
                answers = [(await call(client, "IssueCoupon", campaign))[0] for _ in range(20)]
                gc.collect()
                in_cycles = [o for o in gc.garbage if isinstance(o, ConnectError)]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    assert answers == [429] * 20
    assert in_cycles == []
