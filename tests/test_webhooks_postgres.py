"""Webhooks from PostgreSQL's outbox through real server processes to a real receiver.

Every committed change arrives at least once (compared with what the database holds), none
of rolled-back work, every signature verifies, and a SIGKILL of every sending process with
POSTs in flight loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import psycopg

from tests.server_process import ServerProcess
from tests.support import JSON, SERVICE, give_up_after, pooled_client
from tests.webhook_receiver import Receiver

if TYPE_CHECKING:
    from pathlib import Path

SECRET = "test-secret-0123456789"
STORM_CALLS = 5000
STORM_TOTAL = 4000
CONNECTIONS = 200
REDEEMED = 200
CANCELLED = 50

# A commit of this user's code fails at COMMIT, after the outbox write: the whole group
# transaction, its events included, rolls back.
ROLLBACK_USER = "rollback-me"
ROLLBACK_TRIGGER = f"""
CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'rolled back on purpose'; END $$;
CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON coupons
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.user_id = '{ROLLBACK_USER}')
EXECUTE FUNCTION refuse_at_commit();
"""


def hooks_config(receiver: Receiver, **overrides: Any) -> dict[str, object]:
    webhooks: dict[str, object] = {
        "endpoints": [{"url": receiver.url, "secret": SECRET}],
        "retry_initial_s": 1.0,
        "retry_max_s": 8.0,
        "max_attempts": 1000,  # this test wants every batch delivered, not dead-lettered
        "poll_interval_s": 0.2,
        "stalled_after_s": 2.0,
        "timeout_s": 5.0,
    }
    webhooks.update(overrides)
    return {"webhooks": webhooks}


async def committed_changes(dsn: str) -> Counter[tuple[str, str, str, str, str]]:
    """What the database holds, as (type, campaign, code, user, order) per committed change."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(
            "SELECT 'coupon.issued', campaign_id::text, code, coalesce(user_id, ''), ''"
            " FROM coupons"
        )
        rows = await cursor.fetchall()
        history = await conn.execute("SELECT to_regclass('redemptions') IS NOT NULL")
        row = await history.fetchone()
        if row is not None and row[0]:
            cursor = await conn.execute(
                "SELECT CASE r.action WHEN 'redeem' THEN 'coupon.redeemed'"
                " ELSE 'coupon.redemption_cancelled' END,"
                " c.campaign_id::text, r.code, coalesce(c.user_id, ''), r.order_id"
                " FROM redemptions r JOIN coupons c ON c.code = r.code"
            )
            rows += await cursor.fetchall()
    return Counter((str(a), str(b), str(c), str(d), str(e)) for a, b, c, d, e in rows)


def received_changes(receiver: Receiver) -> Counter[tuple[str, str, str, str, str]]:
    return Counter(
        (e["type"], e["campaignId"], e["code"], e.get("userId", ""), e.get("orderId", ""))
        for e in receiver.events()
    )


async def wait_until_delivered(dsn: str, receiver: Receiver, timeout_s: float = 90.0) -> None:
    expected = sum((await committed_changes(dsn)).values())
    deadline = time.monotonic() + timeout_s
    while receiver.distinct_events() < expected:
        give_up_after(deadline, f"{expected} events (have {receiver.distinct_events()})")
        await asyncio.sleep(0.1)  # polling interval


async def wait_until_drained(dsn: str, timeout_s: float = 90.0) -> None:
    """Every job delivered: a receiver may hold every event while a requeued job still waits."""
    deadline = time.monotonic() + timeout_s
    while set(await outbox_left(dsn)) & {"todo", "doing"}:
        give_up_after(deadline, "an empty outbox")
        await asyncio.sleep(0.1)  # polling interval


async def outbox_left(dsn: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(
            "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY status"
        )
        return {status: count for status, count in await cursor.fetchall()}


async def test_every_committed_change_arrives_through_failures_and_an_outage(
    tmp_path: Path, pg_dsn: str
):
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(ROLLBACK_TRIGGER)
    with (
        Receiver(SECRET, fail_first=5) as receiver,
        ServerProcess(tmp_path, pg_dsn, workers=2, extra=hooks_config(receiver)) as server,
    ):
        server.wait_for("/readyz", 200)
        async with pooled_client(server.base_url, CONNECTIONS) as http:
            # At most CONNECTIONS calls wait at once: httpx's pool slows down quadratically
            # with thousands of queued requests.
            slots = asyncio.Semaphore(CONNECTIONS)
            transport_retries: list[str] = []

            async def rpc(method: str, body: dict[str, object]) -> httpx.Response:
                # A connection dropped under load is tried again (counted and printed): the
                # checks compare events with the database, whatever the client was told.
                async with slots:
                    for attempt in range(3):
                        try:
                            return await http.post(f"{SERVICE}/{method}", json=body)
                        except httpx.TransportError:
                            transport_retries.append(method)
                            if attempt == 2:
                                raise
                    raise AssertionError("unreachable")

            created = await rpc("CreateCampaign", {"name": "storm", "total": STORM_TOTAL})
            campaign = created.json()["campaignId"]
            doomed = (await rpc("CreateCampaign", {"name": "doomed", "total": 10})).json()
            # The first POSTs are answered 500 ...
            warmup = [await rpc("IssueCoupon", {"campaignId": campaign}) for _ in range(10)]
            deadline = time.monotonic() + 30
            while receiver.tallies.answered_500 < 5:
                give_up_after(deadline, "the receiver's first failures")
                await asyncio.sleep(0.05)  # polling interval
            # ... then the receiver is down for the whole storm.
            receiver.go_down()
            storm = await asyncio.gather(
                *(
                    rpc("IssueCoupon", {"campaignId": campaign, "userId": f"u{n % 4500}"})
                    for n in range(STORM_CALLS - len(warmup))
                )
            )
            rolled_back = [
                await rpc(
                    "IssueCoupon", {"campaignId": doomed["campaignId"], "userId": ROLLBACK_USER}
                )
                for _ in range(3)
            ]
            holders = {
                r.json()["code"]: json.loads(r.request.content)["userId"]
                for r in storm
                if r.status_code == 200
            }
            codes = sorted(holders)
            redeemed = await asyncio.gather(
                *(rpc("RedeemCoupon", {"code": code, "orderId": f"o-{code}",
                                       "userId": holders[code]})
                  for code in codes[:REDEEMED])
            )  # fmt: skip
            cancelled = await asyncio.gather(
                *(rpc("CancelRedemption", {"code": code, "orderId": f"o-{code}"})
                  for code in codes[:CANCELLED])
            )  # fmt: skip
            receiver.come_up()
            await wait_until_delivered(pg_dsn, receiver)
            await wait_until_drained(pg_dsn)
            left = await outbox_left(pg_dsn)
            metrics = (await http.get("/metrics")).text

    committed = await committed_changes(pg_dsn)
    received = received_changes(receiver)
    statuses = Counter(r.status_code for r in storm)
    print(
        f"\nwebhooks storm: {STORM_CALLS} IssueCoupon calls (statuses {dict(statuses)}),"
        f" {sum(r.status_code == 200 for r in redeemed)} redeemed,"
        f" {sum(r.status_code == 200 for r in cancelled)} cancelled,"
        f" {len(rolled_back)} rolled back on purpose (statuses"
        f" {[r.status_code for r in rolled_back]}); calls tried again after a dropped"
        f" connection: {len(transport_retries)}"
        f"\n{receiver.tallies.line()}"
        f"\ncommitted changes in SQL: {sum(committed.values())}; distinct received: "
        f"{sum(received.values())}; equal: {received == committed}; outbox left: {left}"
        f"\n{_webhook_metrics(metrics)}"
    )
    # Under load a few calls may answer `unavailable` (the store's call timeout); what they did
    # not commit must send nothing, which the comparison with SQL below checks.
    assert {r.status_code for r in redeemed + cancelled} <= {200, 400, 503}
    assert all(r.status_code >= 500 for r in rolled_back)
    assert receiver.tallies.bad_signatures == 0
    assert received == committed  # every committed change once by id, nothing else
    # At least every acknowledged change (a 503 may still have committed: then it is there).
    assert sum(received.values()) >= STORM_TOTAL + sum(
        r.status_code == 200 for r in redeemed + cancelled
    )
    assert doomed["campaignId"] not in {e["campaignId"] for e in receiver.events()}
    assert left.get("failed", 0) == 0
    assert left.get("todo", 0) == 0


def _webhook_metrics(text: str) -> str:
    return "; ".join(
        line
        for line in text.splitlines()
        if line.startswith("coupon_webhook") and "_bucket" not in line and "_created" not in line
    )


async def test_sigkill_of_server_and_delivery_process_mid_post_loses_no_event(
    tmp_path: Path, pg_dsn: str
):
    with Receiver(SECRET) as receiver:
        hooks = hooks_config(receiver, deliver_in_server=False)
        server = ServerProcess(tmp_path, pg_dsn, workers=1, extra=hooks, name="server1")
        sender = ServerProcess(
            tmp_path, pg_dsn, workers=1, extra=hooks, name="webhooks1", role="webhooks"
        )
        receiver.release.clear()  # POSTs are held open: deliveries are in flight
        with server, sender:
            server.wait_for("/readyz", 200)
            async with httpx.AsyncClient(
                base_url=server.base_url, timeout=60, headers=JSON
            ) as http:
                created = await http.post(
                    f"{SERVICE}/CreateCampaign", json={"name": "k", "total": 500}
                )
                campaign = created.json()["campaignId"]
                issued = await asyncio.gather(
                    *(
                        http.post(f"{SERVICE}/IssueCoupon", json={"campaignId": campaign})
                        for _ in range(300)
                    )
                )
            assert all(r.status_code == 200 for r in issued)
            assert await asyncio.to_thread(receiver.in_flight.acquire, timeout=30)
            killed = server.kill_all() + sender.kill_all()
            in_flight_left = await outbox_left(pg_dsn)
        receiver.release.set()  # the held POSTs now answer a sender that is gone
        before_restart = receiver.distinct_events()
        server2 = ServerProcess(tmp_path, pg_dsn, workers=1, extra=hooks, name="server2")
        sender2 = ServerProcess(
            tmp_path, pg_dsn, workers=1, extra=hooks, name="webhooks2", role="webhooks"
        )
        with server2, sender2:
            server2.wait_for("/readyz", 200)
            await wait_until_delivered(pg_dsn, receiver)
            await wait_until_drained(pg_dsn)
        left = await outbox_left(pg_dsn)
    committed = await committed_changes(pg_dsn)
    received = received_changes(receiver)
    print(
        f"\nSIGKILL: killed {killed} (server + --role webhooks) with POSTs in flight;"
        f" outbox then {in_flight_left}; {before_restart} distinct events had arrived;"
        f" after restart {receiver.distinct_events()} distinct of {sum(committed.values())}"
        f" committed; outbox left {left}\n{receiver.tallies.line()}"
    )
    assert received == committed
    assert receiver.tallies.bad_signatures == 0
    assert left.get("doing", 0) == 0
    assert left.get("todo", 0) == 0


def coupon_server(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coupon.server", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("COUPON_")},
    )


async def test_a_dead_letter_is_listed_and_delivered_after_retry(tmp_path: Path, pg_dsn: str):
    with Receiver(SECRET) as receiver:
        receiver.go_down()
        hooks = hooks_config(receiver, max_attempts=2, retry_initial_s=0.05, retry_max_s=0.05)
        with ServerProcess(tmp_path, pg_dsn, workers=1, extra=hooks) as server:
            server.wait_for("/readyz", 200)
            async with httpx.AsyncClient(
                base_url=server.base_url, timeout=30, headers=JSON
            ) as http:
                created = await http.post(
                    f"{SERVICE}/CreateCampaign", json={"name": "d", "total": 5}
                )
                campaign = created.json()["campaignId"]
                issued = await http.post(f"{SERVICE}/IssueCoupon", json={"campaignId": campaign})
                assert issued.status_code == 200
                deadline = time.monotonic() + 60
                while (await outbox_left(pg_dsn)).get("failed", 0) < 1:
                    give_up_after(deadline, "a dead-lettered job")
                    await asyncio.sleep(0.05)  # polling interval
                listed = coupon_server(server.config_path, "webhooks", "list-dead")
                dead_metric = _webhook_metrics((await http.get("/metrics")).text)
                receiver.come_up()
                job_id = listed.stdout.splitlines()[1].split("\t")[0]
                retried = coupon_server(server.config_path, "webhooks", "retry", "--all")
                assert retried.returncode == 0, retried.stderr
                await wait_until_delivered(pg_dsn, receiver)
                again = coupon_server(server.config_path, "webhooks", "list-dead")
    print(
        f"\nlist-dead:\n{listed.stdout}{listed.stderr}retry --all:\n{retried.stdout}{dead_metric}"
    )
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2  # header + the one dead batch
    assert lines[1].split("\t")[2] == "1"  # events in the batch
    assert receiver.url in lines[1]
    assert SECRET not in listed.stdout + listed.stderr
    assert "coupon_webhook_events_dead_lettered_total 1.0" in dead_metric
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"{job_id}\tqueued again"
    assert [e["code"] for e in receiver.events()] == [issued.json()["code"]]
    assert again.stdout.splitlines()[1:] == []


async def test_brand_endpoints_get_their_brands_events_and_an_earlier_builds_job_is_sent(
    tmp_path: Path, pg_dsn: str
):
    """A brand's endpoint receives only that brand's events (the brand is looked up once per
    campaign and remembered); a job queued by the build before this one, which carried every
    event's fields, is still delivered as it was written."""
    from coupon.config import DatabaseConfig, WebhookEndpoint, WebhooksConfig
    from coupon.webhooks.pg_outbox import PgOutbox

    with Receiver(SECRET) as acme_only, Receiver(SECRET) as every_brand:
        endpoints = [
            {"url": acme_only.url, "secret": SECRET, "brand": "acme"},
            {"url": every_brand.url, "secret": SECRET},
        ]
        hooks = hooks_config(every_brand, endpoints=endpoints)
        with ServerProcess(tmp_path, pg_dsn, workers=1, extra=hooks) as server:
            server.wait_for("/readyz", 200)
            async with httpx.AsyncClient(
                base_url=server.base_url, timeout=30, headers=JSON
            ) as http:
                campaigns = {}
                for brand in ("acme", "globex"):
                    created = await http.post(
                        f"{SERVICE}/CreateCampaign",
                        json={"name": brand, "total": 50, "brand": brand},
                    )
                    assert created.status_code == 200, created.text
                    campaigns[brand] = created.json()["campaignId"]
                for _ in range(3):  # three groups of one campaign: the brand from memory
                    issued = await asyncio.gather(
                        *(
                            http.post(f"{SERVICE}/IssueCoupon", json={"campaignId": cid})
                            for cid in campaigns.values()
                            for _ in range(5)
                        )
                    )
                    assert {r.status_code for r in issued} == {200}
                earlier = {
                    "id": "0b9c1a52-7d44-4f0e-8a43-5f3f0b7b2e11",
                    "type": "coupon.issued",
                    "time": "2026-11-22T05:36:32.390769+00:00",
                    "campaign_id": campaigns["acme"],
                    "brand": "acme",
                    "code": "from-an-earlier-build",
                    "user_id": "",
                    "order_id": "",
                }
                outbox = PgOutbox(
                    WebhooksConfig(endpoints=(WebhookEndpoint(every_brand.url, SECRET),)),
                    DatabaseConfig(dsn=pg_dsn),
                )
                async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
                    await outbox.requeue(conn, {"endpoint": every_brand.url, "events": [earlier]})
                    await conn.commit()
                await wait_until_drained(pg_dsn)
                deadline = time.monotonic() + 30
                while every_brand.distinct_events() < 31 or acme_only.distinct_events() < 15:
                    give_up_after(deadline, "every brand's events")
                    await asyncio.sleep(0.05)  # polling interval
    by_brand = Counter(e.get("brand", "") for e in every_brand.events())
    print(
        f"\nbrand endpoints: acme-only got {acme_only.distinct_events()} events, every-brand"
        f" got {dict(by_brand)}"
    )
    assert {e["campaignId"] for e in acme_only.events()} == {campaigns["acme"]}
    assert {e["brand"] for e in acme_only.events()} == {"acme"}
    assert acme_only.distinct_events() == 15
    assert by_brand == {"acme": 16, "globex": 15}
    sent = next(e for e in every_brand.events() if e["code"] == "from-an-earlier-build")
    assert sent["id"] == earlier["id"]
    assert sent["time"] == "2026-11-22T05:36:32.390769Z"
    # Both endpoints got the same ids for the same changes.
    acme_ids = {e["id"] for e in acme_only.events()}
    assert acme_ids <= {e["id"] for e in every_brand.events()}
    assert acme_only.tallies.bad_signatures == every_brand.tallies.bad_signatures == 0
