"""PostgreSQL down at start-up and lost mid-run: the server degrades to 503 and recovers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httpx

from tests.server_process import ServerProcess
from tests.support import JSON, SERVICE

if TYPE_CHECKING:
    from pathlib import Path

    from tests.postgres import DedicatedPostgres


def issue(http: httpx.Client, campaign_id: str) -> httpx.Response:
    return http.post(f"{SERVICE}/IssueCoupon", json={"campaignId": campaign_id})


def poll_issue(http: httpx.Client, campaign_id: str, status: int, timeout_s: float = 45) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = issue(http, campaign_id)
        if response.status_code == status:
            return
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"IssueCoupon never answered {status}")


def poll_post(
    http: httpx.Client, method: str, body: dict[str, object], timeout_s: float = 45
) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = http.post(f"{SERVICE}/{method}", json=body)
        if response.status_code == 200:
            return response
        assert (response.status_code, response.json()["code"]) == (503, "unavailable")
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"{method} never answered 200")


def test_server_survives_postgres_down_at_start_and_mid_run(
    tmp_path: Path, dedicated_pg: DedicatedPostgres
):
    with (
        ServerProcess(tmp_path, dedicated_pg.dsn, workers=2) as server,
        httpx.Client(base_url=server.base_url, headers=JSON, timeout=30) as http,
    ):
        # Started while PostgreSQL is down: alive, not ready.
        server.wait_for("/healthz", 200)
        assert http.get("/readyz").status_code == 503

        dedicated_pg.start()
        server.wait_for("/readyz", 200)
        # Readiness is per worker process: the worker that answered /readyz may not be the one
        # that takes the next call, and the other's pool may still be in its reconnect backoff.
        created = poll_post(http, "CreateCampaign", {"name": "outage", "total": 1000})
        campaign_id = created.json()["campaignId"]
        assert issue(http, campaign_id).status_code == 200

        dedicated_pg.stop()
        during = [issue(http, campaign_id) for _ in range(4)]
        assert [(r.status_code, r.json()["code"]) for r in during] == [(503, "unavailable")] * 4
        assert http.get("/readyz").status_code == 503

        dedicated_pg.start()
        poll_issue(http, campaign_id, 200)
        server.wait_for("/readyz", 200)
        page = http.post(f"{SERVICE}/GetCampaign", json={"campaignId": campaign_id}).json()
        log = server.log()

    print(f"\noutage: issued after recovery = {page['issuedCount']}")
    assert page["issuedCount"] == len(page["issuedCodes"]) >= 2
    assert "Traceback" not in log
