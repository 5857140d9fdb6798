"""Behaviour every store must show, driven over real HTTP with Connect JSON."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from coupon.codes import is_code
from tests.support import call

if TYPE_CHECKING:
    import httpx


async def create(client: httpx.AsyncClient, total: int, **fields: object) -> str:
    status, body = await call(
        client, "CreateCampaign", {"name": "Launch", "total": total, **fields}
    )
    assert status == 200, body
    return str(body["campaignId"])


async def all_codes(client: httpx.AsyncClient, campaign_id: str, page_size: int) -> list[str]:
    codes: list[str] = []
    token = ""
    for _ in range(10_000):
        status, body = await call(
            client,
            "GetCampaign",
            {"campaignId": campaign_id, "pageSize": page_size, "pageToken": token},
        )
        assert status == 200, body
        codes += body.get("issuedCodes", [])
        token = body.get("nextPageToken", "")
        if not token:
            return codes
    raise AssertionError("paging never ended")


async def test_create_then_get_shows_an_empty_campaign(client: httpx.AsyncClient) -> None:
    start = datetime(2030, 5, 1, 9, 30, tzinfo=UTC)
    campaign_id = await create(client, 5, name="  Spring sale  ", startTime=start.isoformat())
    status, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert status == 200
    assert body["campaignId"] == campaign_id
    assert body["name"] == "Spring sale"
    assert body["total"] == 5
    assert body["startTime"] == "2030-05-01T09:30:00Z"
    assert body.get("issuedCodes", []) == []
    assert body.get("issuedCount", 0) == 0
    assert body.get("nextPageToken", "") == ""


async def test_issues_exactly_total_then_sold_out(client: httpx.AsyncClient) -> None:
    campaign_id = await create(client, 3)
    codes = []
    for _ in range(3):
        status, body = await call(client, "IssueCoupon", {"campaignId": campaign_id})
        assert status == 200, body
        assert is_code(body["code"])
        assert body["issuedAt"].endswith("Z")
        codes.append(body["code"])
    status, body = await call(client, "IssueCoupon", {"campaignId": campaign_id})
    assert (status, body["code"]) == (429, "resource_exhausted")
    assert len(set(codes)) == 3
    status, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert body["issuedCodes"] == codes
    assert body["issuedCount"] == 3


async def test_racing_requests_get_exactly_total_distinct_codes(
    client: httpx.AsyncClient,
) -> None:
    total, racers = 25, 1_000
    campaign_id = await create(client, total)
    results = await asyncio.gather(
        *(call(client, "IssueCoupon", {"campaignId": campaign_id}) for _ in range(racers))
    )
    issued = [body["code"] for status, body in results if status == 200]
    refused = [body["code"] for status, body in results if status != 200]
    assert len(issued) == total
    assert len(set(issued)) == total
    assert refused == ["resource_exhausted"] * (racers - total)
    stored = await all_codes(client, campaign_id, page_size=10)
    assert sorted(stored) == sorted(issued)


async def test_codes_are_unique_across_campaigns(client: httpx.AsyncClient) -> None:
    first, second = await create(client, 50), await create(client, 50)
    for campaign_id in (first, second) * 50:
        status, _ = await call(client, "IssueCoupon", {"campaignId": campaign_id})
        assert status == 200
    codes = await all_codes(client, first, 1000) + await all_codes(client, second, 1000)
    assert len(codes) == 100
    assert len(set(codes)) == 100


async def test_a_user_gets_the_same_code_again_without_consuming_another(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 2)
    _, first = await call(client, "IssueCoupon", {"campaignId": campaign_id, "userId": "alice"})
    _, again = await call(client, "IssueCoupon", {"campaignId": campaign_id, "userId": "alice"})
    assert again["code"] == first["code"]
    _, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert body["issuedCount"] == 1
    _, bob = await call(client, "IssueCoupon", {"campaignId": campaign_id, "userId": "bob"})
    assert bob["code"] != first["code"]
    # Sold out now, yet a holder asking again still gets their own code back.
    status, carol = await call(client, "IssueCoupon", {"campaignId": campaign_id, "userId": "c"})
    assert (status, carol["code"]) == (429, "resource_exhausted")
    status, alice = await call(
        client, "IssueCoupon", {"campaignId": campaign_id, "userId": "alice"}
    )
    assert (status, alice["code"]) == (200, first["code"])


async def test_concurrent_calls_of_one_user_consume_one_coupon(client: httpx.AsyncClient) -> None:
    campaign_id = await create(client, 10)
    results = await asyncio.gather(
        *(
            call(client, "IssueCoupon", {"campaignId": campaign_id, "userId": "u1"})
            for _ in range(50)
        )
    )
    assert {status for status, _ in results} == {200}
    assert len({body["code"] for _, body in results}) == 1
    _, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert body["issuedCount"] == 1


async def test_paging_returns_every_code_once_in_issue_order(client: httpx.AsyncClient) -> None:
    campaign_id = await create(client, 23)
    issued = []
    for _ in range(23):
        _, body = await call(client, "IssueCoupon", {"campaignId": campaign_id})
        issued.append(body["code"])
    for page_size in (1, 5, 7, 23, 100):
        assert await all_codes(client, campaign_id, page_size) == issued
    _, first_page = await call(client, "GetCampaign", {"campaignId": campaign_id, "pageSize": 5})
    assert first_page["issuedCount"] == 23
    assert len(first_page["issuedCodes"]) == 5


async def test_paging_continues_correctly_while_issuance_goes_on(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 10)
    for _ in range(4):
        await call(client, "IssueCoupon", {"campaignId": campaign_id})
    _, page = await call(client, "GetCampaign", {"campaignId": campaign_id, "pageSize": 3})
    for _ in range(6):
        await call(client, "IssueCoupon", {"campaignId": campaign_id})
    _, rest = await call(
        client,
        "GetCampaign",
        {"campaignId": campaign_id, "pageSize": 100, "pageToken": page["nextPageToken"]},
    )
    codes = page["issuedCodes"] + rest["issuedCodes"]
    assert codes == await all_codes(client, campaign_id, 100)
    assert len(codes) == 10


async def test_a_campaign_that_starts_later_refuses_and_says_when(
    client: httpx.AsyncClient,
) -> None:
    start = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    campaign_id = await create(client, 5, startTime=start.isoformat())
    status, body = await call(client, "IssueCoupon", {"campaignId": campaign_id})
    assert (status, body["code"]) == (400, "failed_precondition")
    assert start.isoformat() in body["message"]
    _, campaign = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert campaign.get("issuedCount", 0) == 0


async def test_a_campaign_without_start_time_is_open_at_once(client: httpx.AsyncClient) -> None:
    campaign_id = await create(client, 1)
    status, _ = await call(client, "IssueCoupon", {"campaignId": campaign_id})
    assert status == 200


async def test_unknown_campaign_is_not_found(client: httpx.AsyncClient) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    for method in ("IssueCoupon", "GetCampaign"):
        status, body = await call(client, method, {"campaignId": unknown})
        assert (status, body["code"]) == (404, "not_found")
