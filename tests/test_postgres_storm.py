"""A real multi-worker server on PostgreSQL under a storm of racing IssueCoupon calls."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import psycopg

from tests.server_process import ServerProcess
from tests.support import SERVICE, pooled_client

if TYPE_CHECKING:
    from pathlib import Path

TOTAL = 100
CALLS = 3000
CONNECTIONS = 200
WORKERS = 4


async def test_storm_on_four_workers_issues_exactly_total(tmp_path: Path, pg_dsn: str):
    with ServerProcess(tmp_path, pg_dsn, workers=WORKERS) as server:
        server.wait_for("/readyz", 200)
        async with pooled_client(server.base_url, CONNECTIONS) as http:
            created = await http.post(
                f"{SERVICE}/CreateCampaign", json={"name": "storm", "total": TOTAL}
            )
            assert created.status_code == 200, created.text
            campaign_id = created.json()["campaignId"]

            responses = await asyncio.gather(
                *(
                    http.post(f"{SERVICE}/IssueCoupon", json={"campaignId": campaign_id})
                    for _ in range(CALLS)
                )
            )

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    codes = {r.json()["code"] for r in ok}
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cursor = await conn.execute(
            "SELECT c.total, c.issued, count(cp.code), count(DISTINCT cp.code)"
            " FROM campaigns c LEFT JOIN coupons cp ON cp.campaign_id = c.id"
            " WHERE c.id = %s GROUP BY c.id",
            (campaign_id,),
        )
        audit = await cursor.fetchone()
    print(
        f"\nstorm: {CALLS} calls, {WORKERS} workers, {CONNECTIONS} connections:"
        f" {len(ok)} x 200 ({len(codes)} distinct codes), {len(refused)} x 429,"
        f" {CALLS - len(ok) - len(refused)} other"
        f"\naudit (total, issued, count(*), count(distinct code)): {audit}"
    )
    assert len(ok) == len(codes) == TOTAL
    assert len(refused) == CALLS - TOTAL
    assert {r.json()["code"] for r in refused} == {"resource_exhausted"}
    assert audit == (TOTAL, TOTAL, TOTAL, TOTAL)
