"""A frozen PostgreSQL (SIGSTOP of the postmaster and every backend): the kernel still accepts
and acknowledges, so nothing fails on its own. Every call must still answer within the bound
(database.call_timeout_s, plus connecting when a commit's fate must be asked), and service
must resume after SIGCONT, with every acknowledged code stored."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING

import httpx

from tests.server_process import ServerProcess, children_of
from tests.support import JSON, SERVICE
from tests.test_faults import (
    Storm,
    acknowledged,
    audit,
    check_acknowledged_codes_stored,
    classes,
    create_campaign,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.postgres import DedicatedPostgres

CALL_TIMEOUT_S = 2.0
FROZEN_CALLS = 30
WAIT_S = 60.0  # hang guard on every wait below


def postgres_pids(pg: DedicatedPostgres) -> list[int]:
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    return [postmaster, *children_of(postmaster)]


def signal_all(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:  # only the processes of the test's own PostgreSQL, by PID
        os.kill(pid, signum)


async def timed_call(http: httpx.AsyncClient, campaign_id: str) -> tuple[str, float]:
    started = time.monotonic()
    response = await http.post(f"{SERVICE}/IssueCoupon", json={"campaignId": campaign_id})
    answer = (
        "200"
        if response.status_code == 200
        else f"{response.status_code} {response.json()['code']}"
    )
    return answer, time.monotonic() - started


async def test_a_frozen_postgres_gives_unavailable_within_the_bound_then_service_resumes(
    tmp_path: Path, dedicated_pg: DedicatedPostgres
) -> None:
    dedicated_pg.start()
    extra = {
        "database": {"call_timeout_s": CALL_TIMEOUT_S},
        # Keep-alive is not on trial (a CPU-starved client could reuse a just-closed one).
        "server": {"keepalive_timeout_s": 60, "header_timeout_s": 60},
    }
    with ServerProcess(tmp_path, dedicated_pg.dsn, workers=1, extra=extra) as server:
        server.wait_for("/readyz", 200)
        campaign_id = create_campaign(server.base_url, 1_000_000)
        storm = Storm(server.base_url, campaign_id, max_calls=50_000, clients=20)
        storming = asyncio.create_task(storm.run())
        await wait_until(lambda: storm.count(200) >= 200, "service before the freeze")

        pids = postgres_pids(dedicated_pg)
        signal_all(pids, signal.SIGSTOP)
        frozen_at = time.monotonic()
        storm.phase = "frozen"
        try:
            async with httpx.AsyncClient(
                base_url=server.base_url, headers=JSON, timeout=WAIT_S
            ) as http:
                frozen = await asyncio.wait_for(
                    asyncio.gather(*(timed_call(http, campaign_id) for _ in range(FROZEN_CALLS))),
                    WAIT_S,
                )
                readyz = (await http.get("/readyz")).status_code
            await wait_until(lambda: storm.count(503, "frozen") >= 20, "storm calls refused")
        finally:
            signal_all(pids, signal.SIGCONT)
        frozen_s = time.monotonic() - frozen_at
        storm.phase = "after"
        await wait_until(lambda: storm.count(200, "after") >= 200, "service after SIGCONT")
        storm.stop.set()
        outcomes = await asyncio.wait_for(storming, WAIT_S)
        log = server.log()

    final = audit(dedicated_pg.dsn, campaign_id)
    answers: dict[str, int] = {}
    for answer, _ in frozen:
        answers[answer] = answers.get(answer, 0) + 1
    longest = max(seconds for _, seconds in frozen)
    unknown = sum(1 for o in outcomes if o.status == 500 and o.detail == "unknown")
    print(
        f"\nfrozen PostgreSQL: SIGSTOP of {len(pids)} processes for {frozen_s:.1f}s;"
        f" {FROZEN_CALLS} calls sent during the freeze: {answers},"
        f" longest answer {longest:.2f}s (call_timeout_s={CALL_TIMEOUT_S}, connect_timeout_s=1);"
        f" /readyz during the freeze: {readyz}"
        f"\nstorm ({len(outcomes)} calls): {classes(outcomes)};"
        f" audit (total, issued, stored, distinct): {final.as_tuple()};"
        f" acknowledged {len(acknowledged(outcomes))}"
    )
    # Every call sent during the freeze was answered while PostgreSQL was still frozen.
    assert answers == {"503 unavailable": FROZEN_CALLS}
    assert readyz == 503
    assert set(classes(outcomes)) <= {"200", "503 unavailable", "500 unknown"}
    final.check_invariant()
    check_acknowledged_codes_stored(outcomes, final)
    # Only a caller told `unknown` may hold a stored code it never saw.
    assert final.issued - len(acknowledged(outcomes)) <= unknown
    assert "Traceback" not in log
