"""PostgreSQL failover under load: a pg_auto_failover primary + synchronous standby pair.

The service runs as 2 real worker processes on the multi-host DSN (`target_session_attrs=
read-write`) of a formation built by tests/ha_cluster.py; a storm of IssueCoupon calls runs
while a fault hits the database:
1. the primary's postmaster is SIGKILLed: the standby is promoted, the service follows it
   without a restart, no acknowledged code is lost, and the campaign still sells out exactly;
2. the standby node dies: per pg_auto_failover's policy the primary turns synchronous
   replication off and keeps serving, then the standby rejoins and it is turned on again.
Each test prints one line with the outage, as seen by the clients, and the audit.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import psycopg
import pytest

from tests.ha_cluster import HACluster, ha_cluster
from tests.server_process import ServerProcess
from tests.support import JSON, SERVICE, give_up_after
from tests.test_faults import audit, classes, create_campaign

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.ha_cluster import Node

pytestmark = pytest.mark.postgres

CLIENTS = 64
WAIT_S = 90.0  # bound on each wait below; never a sleep for a server
STORM_S = 600.0  # bound on a storm (a hang guard: 10,000 calls take ~10 s on a quiet machine)
RETRY_PAUSE_S = 0.05  # a client's pause after a failed call, as a real client would back off
FAILED = {"503 unavailable", "500 unknown"}  # what a call may get while the primary is gone


@pytest.fixture(scope="module")
def cluster() -> Iterator[HACluster]:
    with ha_cluster() as formation:
        yield formation


@dataclass(frozen=True, slots=True)
class Call:
    sent: float  # time.monotonic()
    done: float
    status: int | None  # None: no HTTP answer
    detail: str  # the code (200), the Connect code (error) or the exception's class
    phase: str = ""

    @property
    def failed(self) -> bool:
        return self.status not in (200, 429)


@dataclass
class TimedStorm:
    """`clients` loops of IssueCoupon calls with send and answer times.

    A client stops at its first sold-out answer, at `stop`, or when the shared budget of
    `max_calls` or the WAIT_S bound runs out.
    """

    base_url: str
    campaign_id: str
    max_calls: int
    clients: int = CLIENTS
    phase: str = ""
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> list[Call]:
        deadline = time.monotonic() + STORM_S
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout would close
        # them under a request already on its way (a reset no server change could avoid).
        limits = httpx.Limits(
            max_connections=self.clients,
            max_keepalive_connections=self.clients,
            keepalive_expiry=2.0,
        )
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=JSON, limits=limits, timeout=30
        ) as http:
            await asyncio.gather(*(self._client(http, deadline) for _ in range(self.clients)))
        return self.calls

    async def _client(self, http: httpx.AsyncClient, deadline: float) -> None:
        body = {"campaignId": self.campaign_id}
        while len(self.calls) < self.max_calls and not self.stop.is_set():
            if time.monotonic() > deadline:
                return
            phase, sent = self.phase, time.monotonic()
            try:
                response = await http.post(f"{SERVICE}/IssueCoupon", json=body)
                status, detail = response.status_code, response.json()["code"]
            except httpx.TransportError as e:
                status, detail = None, type(e).__name__
            call = Call(sent, time.monotonic(), status, detail, phase)
            self.calls.append(call)
            if status == 429:
                return
            if call.failed:
                await asyncio.sleep(RETRY_PAUSE_S)

    def count(self, status: int) -> int:
        return sum(1 for call in self.calls if call.status == status)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        give_up_after(deadline, what)
        await asyncio.sleep(0.01)  # polling interval


@dataclass
class Promotion:
    """When a standby left recovery, and when it accepted read-write sessions."""

    out_of_recovery: float | None = None
    writable: float | None = None


async def watch_promotion(node: Node, seen: Promotion) -> None:
    """Poll the standby on one session until it is a writable primary (bounded).

    pg_auto_failover promotes with default_transaction_read_only on (so that
    target_session_attrs=read-write does not pick it yet) and turns it off once the old
    primary is known to be demoted: that second instant is the promotion clients can use.
    """
    deadline = time.monotonic() + WAIT_S
    async with await psycopg.AsyncConnection.connect(node.dsn, autocommit=True) as conn:
        while seen.writable is None:
            give_up_after(deadline, f"the promotion of {node.name}")
            cursor = await conn.execute(
                "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')"
            )
            row = await cursor.fetchone()
            assert row is not None
            now = time.monotonic()
            if not row[0] and seen.out_of_recovery is None:
                seen.out_of_recovery = now
            if not row[0] and row[1] == "off":
                seen.writable = now
            await asyncio.sleep(0.005)  # polling interval


def check_acknowledged_codes_stored(calls: list[Call], stored: frozenset[str]) -> None:
    codes = [call.detail for call in calls if call.status == 200]
    assert len(codes) == len(set(codes)), "a code was handed out twice"
    missing = set(codes) - stored
    assert not missing, f"{len(missing)} acknowledged codes are not stored"


def outage_window(calls: list[Call], since: float) -> tuple[float, float]:
    """First and last failing call (by the time its answer came), relative to `since`."""
    failed = [call.done - since for call in calls if call.failed]
    return min(failed), max(failed)


# -- 1. the primary's postmaster dies mid-storm ---------------------------------------------

CAMPAIGN = 10_000
KILL_AFTER_OK = 2_000


async def test_primary_killed_mid_storm_standby_promoted_nothing_acknowledged_lost(
    tmp_path: Path, cluster: HACluster
):
    primary, standby = await asyncio.to_thread(cluster.wait_healthy)
    with ServerProcess(tmp_path, cluster.dsn, workers=2) as server:
        server.wait_for("/readyz", 200)
        campaign_id = create_campaign(server.base_url, CAMPAIGN)
        storm = TimedStorm(server.base_url, campaign_id, max_calls=CAMPAIGN * 4)
        storming = asyncio.create_task(storm.run())
        await wait_until(lambda: storm.count(200) >= KILL_AFTER_OK, f"{KILL_AFTER_OK} x 200")

        promotion = Promotion()
        watching = asyncio.create_task(watch_promotion(standby, promotion))
        killed_at = time.monotonic()
        killed_pid = cluster.kill_postmaster(primary)
        await watching
        calls = await storming
        log = server.log()

    new_primary, _ = await asyncio.to_thread(cluster.wait_healthy)  # the old one rejoined
    final = audit(cluster.dsn, campaign_id)
    acked = {call.detail for call in calls if call.status == 200}
    assert promotion.out_of_recovery is not None
    assert promotion.writable is not None
    first_fail, last_fail = outage_window(calls, killed_at)
    promoted = promotion.writable - killed_at
    after_writable = [call for call in calls if call.sent >= promotion.writable]
    served_again = min(c.done for c in calls if c.status == 200 and c.done > promotion.writable)
    print(
        f"\nfailover: primary {primary.name} postmaster {killed_pid} SIGKILLed after"
        f" {KILL_AFTER_OK} x 200; {standby.name} out of recovery at"
        f" +{promotion.out_of_recovery - killed_at:.2f}s, writable at"
        f" +{promotion.writable - killed_at:.2f}s; failing calls from +{first_fail:.2f}s to"
        f" +{last_fail:.2f}s after the kill ({first_fail - promoted:+.2f}s to"
        f" {last_fail - promoted:+.2f}s from the promotion); first code after the promotion at"
        f" +{served_again - promotion.writable:.2f}s; {len(calls)} calls: {classes(calls)};"
        f" audit (total, issued, stored, distinct): {final.as_tuple()}; acknowledged"
        f" {len(acked)}, stored but never acknowledged {len(final.codes - acked)}"
    )
    assert new_primary is standby, "the standby took over"
    assert set(classes(calls)) - {"200", "429 resource_exhausted"} <= FAILED, classes(calls)
    assert any(call.failed for call in calls), "the kill was felt by the clients"
    assert any(call.status == 200 for call in after_writable), "issuance resumed"
    check_acknowledged_codes_stored(calls, final.codes)
    # Sold out exactly: every position issued once, nothing oversold, no code twice.
    assert final.as_tuple() == (CAMPAIGN,) * 4
    assert storm.count(429) > 0
    assert "Traceback" not in log


# -- 2. the standby dies mid-storm, then comes back ----------------------------------------

STANDBY_OK_BEFORE = 500
STANDBY_OK_BETWEEN = 500
STANDBY_OK_AFTER = 500


def sync_standby_names(node: Node) -> str:
    with psycopg.connect(node.dsn) as conn:
        row = conn.execute("SHOW synchronous_standby_names").fetchone()
    assert row is not None
    return str(row[0])


async def wait_sync_names(node: Node, on: bool) -> float:
    """Poll the primary until synchronous replication is on / off; return when it was seen."""
    deadline = time.monotonic() + WAIT_S
    while bool(await asyncio.to_thread(sync_standby_names, node)) != on:
        give_up_after(deadline, f"synchronous_standby_names {'set' if on else 'empty'}")
        await asyncio.sleep(0.01)  # polling interval
    return time.monotonic()


def stored_on(node: Node, codes: set[str]) -> int:
    with psycopg.connect(node.dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM coupons WHERE code = ANY(%s)", (list(codes),)
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_standby_dies_primary_drops_sync_replication_and_serves_then_standby_rejoins(
    tmp_path: Path, cluster: HACluster
):
    primary, standby = await asyncio.to_thread(cluster.wait_healthy)
    assert sync_standby_names(primary), "synchronous replication is on to begin with"
    with ServerProcess(tmp_path, cluster.dsn, workers=2) as server:
        server.wait_for("/readyz", 200)
        campaign_id = create_campaign(server.base_url, 1_000_000)
        storm = TimedStorm(server.base_url, campaign_id, max_calls=50_000, phase="before")
        storming = asyncio.create_task(storm.run())
        await wait_until(lambda: storm.count(200) >= STANDBY_OK_BEFORE, "service before")

        storm.phase = "standby down"
        killed_at = time.monotonic()
        killed = await asyncio.to_thread(cluster.kill_node, standby)
        sync_off_at = await wait_sync_names(primary, on=False)
        await asyncio.to_thread(cluster.wait_states, {primary.name: "wait_primary"})
        ok_so_far = storm.count(200)
        storm.phase = "sync off"
        await wait_until(
            lambda: storm.count(200) >= ok_so_far + STANDBY_OK_BETWEEN, "service, sync off"
        )

        storm.phase = "standby back"
        back_at = time.monotonic()
        await asyncio.to_thread(cluster.restart_node, standby)
        await asyncio.to_thread(
            cluster.wait_states, {primary.name: "primary", standby.name: "secondary"}
        )
        sync_on_at = await wait_sync_names(primary, on=True)
        ok_so_far = storm.count(200)
        storm.phase = "sync on"
        await wait_until(lambda: storm.count(200) >= ok_so_far + STANDBY_OK_AFTER, "after")
        storm.stop.set()
        calls = await storming
        log = server.log()

    final = audit(cluster.dsn, campaign_id)
    while_down = {c.detail for c in calls if c.status == 200 and c.phase == "sync off"}
    # The rejoined standby replays what the primary committed alone (bounded poll).
    deadline = time.monotonic() + WAIT_S
    while (on_standby := stored_on(standby, while_down)) < len(while_down):
        give_up_after(deadline, "the standby to catch up")
        await asyncio.sleep(0.05)  # polling interval
    spanning = [c for c in calls if c.sent < sync_off_at and c.done > killed_at]
    longest = max((c.done - c.sent for c in spanning), default=0.0)
    typical = statistics.median(c.done - c.sent for c in calls if c.phase == "before")
    by_phase = {
        phase: classes([c for c in calls if c.phase == phase])
        for phase in ("before", "standby down", "sync off", "standby back", "sync on")
    }
    print(
        f"\nstandby death: {standby.name} killed (PIDs {killed}); {primary.name} stayed primary,"
        f" synchronous replication off at +{sync_off_at - killed_at:.2f}s (commits waited"
        f" until then: longest call {longest:.2f}s, median before the kill {typical:.2f}s);"
        f" {standby.name} restarted at"
        f" +{back_at - killed_at:.2f}s, sync on again at +{sync_on_at - killed_at:.2f}s;"
        f" calls by phase: {by_phase}; audit (total, issued, stored, distinct):"
        f" {final.as_tuple()}; acknowledged while the standby was down: {len(while_down)},"
        f" on the standby after it rejoined: {on_standby}"
    )
    assert cluster.role("primary") is primary, "no failover: the primary kept its role"
    # pg_auto_failover's policy (number_sync_standbys 0): availability, never a refusal.
    assert set(classes(calls)) == {"200"}, by_phase
    assert while_down, "the primary served while its standby was down"
    final.check_invariant()
    check_acknowledged_codes_stored(calls, final.codes)
    assert sync_standby_names(primary), "synchronous replication is on again"
    assert "Traceback" not in log
