"""Nothing orphaned: callers that leave (a Connect deadline, a client that disconnects) are
never issued a coupon nobody receives, on real server processes and both stores.

A caller still queued when it leaves is taken out of the queue; a caller whose group's
transaction has begun gets that transaction's true outcome (a late 200, never a 504 for a
stored code). So the codes the server acknowledged are exactly the codes issued. A client that
disconnects after its answer was written loses it in transit, like any reply: the server-side
count of acknowledged calls (its `ok` metric) is what must equal `issued` then.

On PostgreSQL the test holds the campaign's row lock for part of the storm, so that calls pile
up in the queue and their deadlines pass there (the case the old code sold to nobody).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest

from tests.server_process import ServerProcess
from tests.support import JSON, SERVICE, give_up_after

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

CALLS = 600
CLIENTS = 40
WAIT_S = 60.0  # bound on every wait below; never a sleep for a server
LOCK_UNTIL_LEFT = 40  # hold the row lock until this many callers have left


@dataclass
class Storm:
    base_url: str
    campaign_id: str
    headers: dict[str, str] = field(default_factory=dict)
    answers: list[str] = field(
        default_factory=list
    )  # '200', '504 deadline_exceeded', 'ReadTimeout'
    codes: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(11))

    async def run(self, *, deadline_ms: int | None, client_timeout_s: float | None) -> None:
        budget = CALLS
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=30) as http:

            async def client() -> None:
                nonlocal budget
                while budget > 0:
                    budget -= 1
                    headers = dict(JSON)
                    if deadline_ms is not None:
                        headers["Connect-Timeout-Ms"] = str(self.rng.randint(0, deadline_ms))
                    timeout: Any = httpx.USE_CLIENT_DEFAULT
                    if client_timeout_s is not None:
                        # Only the wait for the answer is cut short: the request is sent,
                        # then the client hangs up.
                        timeout = httpx.Timeout(30, read=self.rng.uniform(0.001, client_timeout_s))
                    await self._one(http, headers, timeout)

            await asyncio.gather(*(client() for _ in range(CLIENTS)))

    async def _one(
        self, http: httpx.AsyncClient, headers: dict[str, str], http_timeout: Any
    ) -> None:
        try:
            response = await http.post(
                f"{SERVICE}/IssueCoupon",
                json={"campaignId": self.campaign_id},
                headers=headers,
                timeout=http_timeout,
            )
        except httpx.TransportError as e:  # our own timeout: we hung up
            self.answers.append(type(e).__name__)
            return
        body = response.json()
        if response.status_code == 200:
            self.codes.append(body["code"])
            self.answers.append("200")
        else:
            self.answers.append(f"{response.status_code} {body['code']}")

    def left(self) -> int:
        return sum(1 for a in self.answers if a != "200")

    def classes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for answer in self.answers:
            counts[answer] = counts.get(answer, 0) + 1
        return dict(sorted(counts.items()))


def rpc(base_url: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{base_url}{SERVICE}/{method}", headers=JSON, json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def stored(base_url: str, campaign_id: str) -> tuple[int, list[str]]:
    """The campaign's issued count and every stored code, through GetCampaign's pages."""
    codes: list[str] = []
    token = ""
    while True:
        page = rpc(
            base_url,
            "GetCampaign",
            {"campaignId": campaign_id, "pageSize": 10_000, "pageToken": token},
        )
        codes.extend(page.get("issuedCodes", []))
        token = page.get("nextPageToken", "")
        if not token:
            return int(page.get("issuedCount", 0)), codes


def server_ok_count(base_url: str) -> int:
    """IssueCoupon calls the server answered with a code (its own count, before sending)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    pattern = r'coupon_requests_total\{code="ok",method="IssueCoupon"\} ([0-9.e+]+)'
    match = re.search(pattern, text)
    return int(float(match.group(1))) if match else 0


@contextlib.asynccontextmanager
async def row_lock(dsn: str | None, campaign_id: str) -> AsyncIterator[None]:
    """Hold the campaign's row lock (PostgreSQL) so calls queue behind a blocked group."""
    if dsn is None:
        yield
        return
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("SELECT 1 FROM campaigns WHERE id = %s FOR UPDATE", (campaign_id,))
        yield
        await conn.rollback()


async def storm_with_lock(
    storm: Storm, dsn: str | None, *, deadline_ms: int | None, client_timeout_s: float | None
) -> None:
    running = asyncio.create_task(
        storm.run(deadline_ms=deadline_ms, client_timeout_s=client_timeout_s)
    )
    async with row_lock(dsn, storm.campaign_id):
        deadline = time.monotonic() + WAIT_S
        while storm.left() < LOCK_UNTIL_LEFT and not running.done():
            give_up_after(deadline, f"{LOCK_UNTIL_LEFT} callers leaving")
            await asyncio.sleep(0.01)  # polling interval
    await asyncio.wait_for(running, WAIT_S)


@pytest.fixture(params=["memory", "postgres"])
def store_dsn(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


async def test_callers_past_their_deadline_are_never_issued_a_code(
    tmp_path: Path, store_dsn: str | None
) -> None:
    kind = "memory" if store_dsn is None else "postgres"
    with ServerProcess(tmp_path, store_dsn, workers=1) as server:
        server.wait_for("/readyz", 200)
        # The reproduction: five calls that are out of time before they begin.
        small = rpc(server.base_url, "CreateCampaign", {"name": "five", "total": 5})["campaignId"]
        zero = Storm(server.base_url, small)
        zero_headers = {**JSON, "Connect-Timeout-Ms": "0"}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            for _ in range(5):
                await zero._one(http, zero_headers, httpx.USE_CLIENT_DEFAULT)
        zero_issued, _ = stored(server.base_url, small)

        big = rpc(server.base_url, "CreateCampaign", {"name": "storm", "total": 1_000_000})
        storm = Storm(server.base_url, big["campaignId"])
        await storm_with_lock(storm, store_dsn, deadline_ms=30, client_timeout_s=None)
        issued, codes = stored(server.base_url, storm.campaign_id)
        log = server.log()

    print(
        f"\ndeadline storm ({kind}): Connect-Timeout-Ms 0 x5 on a campaign of 5:"
        f" {zero.classes()}, issued {zero_issued};"
        f" {CALLS} calls with Connect-Timeout-Ms 0..30 ms: {storm.classes()};"
        f" codes acknowledged {len(storm.codes)}, issued {issued}, stored {len(codes)}"
    )
    assert zero_issued == zero.answers.count("200")
    assert set(storm.answers) <= {"200", "504 deadline_exceeded", "503 unavailable"}
    assert storm.left() >= LOCK_UNTIL_LEFT
    assert issued == len(storm.codes) == len(codes)
    assert set(storm.codes) == set(codes)
    assert "Traceback" not in log


async def test_clients_that_disconnect_are_never_issued_a_code_the_server_did_not_answer(
    tmp_path: Path, store_dsn: str | None
) -> None:
    kind = "memory" if store_dsn is None else "postgres"
    with ServerProcess(tmp_path, store_dsn, workers=1) as server:
        server.wait_for("/readyz", 200)
        ok_before = server_ok_count(server.base_url)
        big = rpc(server.base_url, "CreateCampaign", {"name": "storm", "total": 1_000_000})
        storm = Storm(server.base_url, big["campaignId"])
        await storm_with_lock(storm, store_dsn, deadline_ms=None, client_timeout_s=0.03)
        # The server may still be answering calls whose client already left: wait until its
        # count stops moving against what is stored (bounded).
        deadline = time.monotonic() + WAIT_S
        while True:
            issued, codes = stored(server.base_url, storm.campaign_id)
            answered = server_ok_count(server.base_url) - ok_before
            if answered == issued:
                break
            give_up_after(deadline, f"server answers ({answered}) to match issued ({issued})")
            await asyncio.sleep(0.05)  # polling interval
        log = server.log()

    received = len(storm.codes)
    print(
        f"\ndisconnecting clients ({kind}): {CALLS} calls with client timeouts 1..30 ms:"
        f" {storm.classes()}; server answered with a code {answered}, issued {issued},"
        f" stored {len(codes)}, received by clients {received}"
        f" (answered but not received, the client having hung up after its transaction"
        f" began: {answered - received}; left before it began, nothing issued:"
        f" {CALLS - answered})"
    )
    if store_dsn is not None:
        # (Memory has no queue to hold: its clients hang up while their call runs, if at all,
        # and the server's count must still equal what it issued.)
        assert storm.left() >= LOCK_UNTIL_LEFT
    assert answered == issued == len(codes)
    assert set(storm.codes) <= set(codes)
    assert "Traceback" not in log
