"""The start instant, with the memory store's clock injected: no sleeping, no races."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import httpx

from coupon.app import create_app
from coupon.store.memory import MemoryStore
from tests.support import ServerThread, call

if TYPE_CHECKING:
    from coupon.clock import ManualClock
    from coupon.config import Config


async def test_refused_before_the_start_instant_and_issued_from_it(
    clock: ManualClock, config: Config
) -> None:
    start = clock.now + timedelta(minutes=10)
    with ServerThread(create_app(config, MemoryStore(clock))) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            _, created = await call(
                client, "CreateCampaign", {"name": "x", "total": 2, "startTime": start.isoformat()}
            )
            campaign = {"campaignId": created["campaignId"]}

            clock.set(start - timedelta(microseconds=1))
            status, body = await call(client, "IssueCoupon", campaign)
            assert (status, body["code"]) == (400, "failed_precondition")
            assert "2026-11-21T09:10:00+00:00" in body["message"]

            clock.set(start)
            status, body = await call(client, "IssueCoupon", campaign)
            assert status == 200
            assert body["issuedAt"] == "2026-11-21T09:10:00Z"

            clock.set(start + timedelta(days=30))
            status, _ = await call(client, "IssueCoupon", campaign)
            assert status == 200


async def test_a_campaign_without_start_time_starts_at_the_store_clock(
    clock: ManualClock, config: Config
) -> None:
    with ServerThread(create_app(config, MemoryStore(clock))) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            _, created = await call(client, "CreateCampaign", {"name": "x", "total": 1})
            _, body = await call(client, "GetCampaign", {"campaignId": created["campaignId"]})
    assert body["startTime"] == "2026-11-21T09:00:00Z"
