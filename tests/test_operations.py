"""Operations in-process: admin auth, metrics, request ids, the Connect timeout header."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from coupon.app import YOUNG_COLLECTION_THRESHOLD, create_app
from coupon.config import AuthConfig, Config
from coupon.store.memory import MemoryStore
from tests.support import JSON, SERVICE, ServerThread, call

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def secured_server() -> Iterator[str]:
    config = replace(Config(), auth=AuthConfig(admin_token=TOKEN))
    with ServerThread(create_app(config, MemoryStore())) as server:
        yield server.base_url


@pytest.fixture
async def anonymous(secured_server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=secured_server) as client:
        yield client


async def admin_call(
    client: httpx.AsyncClient, method: str, body: dict[str, Any], authorization: str
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        f"{SERVICE}/{method}", json=body, headers={**JSON, "Authorization": authorization}
    )
    return response.status_code, response.json()


async def test_admin_calls_need_the_token_and_issuing_stays_open(
    anonymous: httpx.AsyncClient,
) -> None:
    status, body = await call(anonymous, "CreateCampaign", {"name": "x", "total": 1})
    assert (status, body["code"]) == (401, "unauthenticated")
    status, body = await admin_call(
        anonymous, "CreateCampaign", {"name": "x", "total": 1}, "Bearer guess"
    )
    assert (status, body["code"]) == (401, "unauthenticated")
    assert TOKEN not in body["message"]
    status, body = await admin_call(
        anonymous, "CreateCampaign", {"name": "x", "total": 1}, f"Bearer {TOKEN}"
    )
    assert status == 200
    campaign = {"campaignId": body["campaignId"]}

    status, _ = await call(anonymous, "IssueCoupon", campaign)
    assert status == 200
    status, body = await call(anonymous, "GetCampaign", campaign)
    assert (status, body["code"]) == (401, "unauthenticated")
    status, body = await admin_call(anonymous, "GetCampaign", campaign, TOKEN)  # no "Bearer"
    assert (status, body["code"]) == (401, "unauthenticated")
    status, body = await admin_call(anonymous, "GetCampaign", campaign, f"Bearer {TOKEN}")
    assert (status, body["issuedCount"]) == (200, 1)


async def test_a_missing_token_is_refused_before_the_body_is_read(
    anonymous: httpx.AsyncClient,
) -> None:
    status, body = await call(anonymous, "CreateCampaign", b"{not json")
    assert (status, body["code"]) == (401, "unauthenticated")


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", re.MULTILINE)
    for match in pattern.finditer(text):
        found = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
        if found == wanted:
            return float(match.group(3))
    return 0.0


async def test_metrics_count_calls_codes_issues_and_refusals(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    _, created = await call(client, "CreateCampaign", {"name": "m", "total": 2})
    campaign = {"campaignId": created["campaignId"]}
    for _ in range(3):
        await call(client, "IssueCoupon", campaign)
    await call(client, "IssueCoupon", {"campaignId": "bad"})
    await call(client, "IssueCoupon", b"{broken")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("coupon_requests_total", method="IssueCoupon", code="ok", key="anonymous") == 2
    assert (
        delta(
            "coupon_requests_total",
            method="IssueCoupon",
            code="resource_exhausted",
            key="anonymous",
        )
        == 1
    )
    assert (
        delta(
            "coupon_requests_total", method="IssueCoupon", code="invalid_argument", key="anonymous"
        )
        == 2
    )
    assert delta("coupon_requests_total", method="CreateCampaign", code="ok", key="open") == 1
    assert delta("coupon_coupons_issued_total") == 2
    assert delta("coupon_issue_refusals_total", reason="sold_out") == 1
    assert delta("coupon_request_duration_seconds_count", method="IssueCoupon") == 5


async def test_every_call_carries_a_request_id_that_reaches_the_log(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.post(
        f"{SERVICE}/CreateCampaign",
        json={"name": "x", "total": 1},
        headers={**JSON, "X-Request-Id": "trace-42"},
    )
    assert response.headers["x-request-id"] == "trace-42"
    generated = await client.post(
        f"{SERVICE}/CreateCampaign", json={"name": "x", "total": 1}, headers=JSON
    )
    assert re.fullmatch(r"[0-9a-f]{16,}", generated.headers["x-request-id"])
    unsafe = await client.post(
        f"{SERVICE}/CreateCampaign",
        json={"name": "x", "total": 1},
        headers={**JSON, "X-Request-Id": "evil\tvalue with spaces"},
    )
    assert re.fullmatch(r"[0-9a-f]{16,}", unsafe.headers["x-request-id"])
    assert unsafe.headers["x-request-id"] != generated.headers["x-request-id"]


def test_log_lines_carry_the_request_id() -> None:
    from coupon.logs import JsonFormatter
    from coupon.request_ids import RequestIdFilter, current_request_id

    token = current_request_id.set("abc123")
    try:
        record = logging.LogRecord("coupon.x", logging.INFO, __file__, 1, "hello %s", ("w",), None)
        RequestIdFilter().filter(record)
    finally:
        current_request_id.reset(token)
    line = JsonFormatter().format(record)
    assert '"request_id": "abc123"' in line
    assert '"message": "hello w"' in line


async def test_the_connect_timeout_header_is_honoured(config: Config) -> None:
    release = asyncio.Event()

    class SlowStore(MemoryStore):
        async def issue_coupon(self, campaign_id: str, request: Any) -> Any:
            await release.wait()  # never set: only the deadline can end this call
            raise AssertionError("unreachable")

    with ServerThread(create_app(config, SlowStore())) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            response = await client.post(
                f"{SERVICE}/IssueCoupon",
                json={"campaignId": "00000000-0000-4000-8000-000000000000"},
                headers={**JSON, "Connect-Timeout-Ms": "50"},
            )
    assert response.status_code == 504
    assert response.json()["code"] == "deadline_exceeded"


def test_a_server_process_freezes_its_start_up_and_collects_young_objects_less_often() -> None:
    # In a process of its own: the setting is for server processes, not this test run.
    probe = (
        "import gc; from coupon.app import app_from_environment; app_from_environment(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    environment = {k: v for k, v in os.environ.items() if k != "COUPON_CONFIG_PATH"}
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=environment, check=True
    )
    assert answer.stdout.split() == [str(YOUNG_COLLECTION_THRESHOLD), "True"]
