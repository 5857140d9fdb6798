"""The coupon's life after issuance, on every store, over real HTTP with Connect JSON:
campaign fields, idempotent issuance, GetCoupon, RedeemCoupon, CancelRedemption, ListCampaigns,
and the machine-readable reason every refusal carries."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from coupon.gen.google.rpc.error_details_pb import ErrorInfo
from tests.support import call
from tests.test_contract import create

if TYPE_CHECKING:
    import httpx

UNKNOWN_CODE = "가나다라마바사아자1"
LATER = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)


def reason(body: dict[str, Any]) -> str:
    """The ErrorInfo reason of a Connect JSON error body (domain `coupon`), decoded as a
    client would: `details[].value` is a base64 google.rpc.ErrorInfo."""
    (detail,) = body["details"]
    assert detail["type"] == "google.rpc.ErrorInfo"
    raw = detail["value"]
    info = ErrorInfo.from_binary(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    assert info.domain == "coupon"
    return info.reason


async def refused(
    client: httpx.AsyncClient, method: str, body: dict[str, Any]
) -> tuple[int, str, str]:
    """(HTTP status, Connect code, reason) of a call that must fail."""
    status, reply = await call(client, method, body)
    assert status != 200, reply
    return status, reply["code"], reason(reply)


async def issue(client: httpx.AsyncClient, campaign_id: str, **fields: object) -> dict[str, Any]:
    status, body = await call(client, "IssueCoupon", {"campaignId": campaign_id, **fields})
    assert status == 200, body
    return body


async def redeem(client: httpx.AsyncClient, code: str, order: str, **fields: object) -> Any:
    return await call(client, "RedeemCoupon", {"code": code, "orderId": order, **fields})


async def test_a_campaign_keeps_its_end_discount_metadata_and_brand(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(
        client,
        5,
        endTime=LATER.isoformat(),
        discount={"amountOff": {"currency": "KRW", "minorUnits": "5000"}},
        metadata={"channel": "app", "note": "launch week"},
        brand="acme",
    )
    status, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert status == 200
    assert body["endTime"] == LATER.isoformat().replace("+00:00", "Z")
    assert body["discount"] == {"amountOff": {"currency": "KRW", "minorUnits": "5000"}}
    assert body["metadata"] == {"channel": "app", "note": "launch week"}
    assert body["brand"] == "acme"
    assert body.get("redeemedCount", 0) == 0

    coupon = await issue(client, campaign_id)
    assert coupon["expiresAt"] == body["endTime"]
    assert coupon["discount"] == body["discount"]


async def test_a_campaign_without_the_new_fields_shows_none_of_them(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 1)
    _, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert not {"endTime", "discount", "metadata", "brand", "redeemedCount"} & set(body)
    coupon = await issue(client, campaign_id)
    assert not {"expiresAt", "discount"} & set(coupon)


async def test_an_idempotency_key_returns_the_first_code_and_consumes_nothing(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 3, discount={"percentOff": 10})
    first = await issue(client, campaign_id, idempotencyKey="retry-1")
    again = await issue(client, campaign_id, idempotencyKey="retry-1")
    assert again["code"] == first["code"]
    assert again["discount"] == {"percentOff": 10}
    other = await issue(client, campaign_id, idempotencyKey="retry-2")
    assert other["code"] != first["code"]
    _, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert body["issuedCount"] == 2

    # The key belongs to the anonymous caller who used it first.
    assert await refused(
        client,
        "IssueCoupon",
        {"campaignId": campaign_id, "idempotencyKey": "retry-1", "userId": "u"},
    ) == (400, "failed_precondition", "IDEMPOTENCY_KEY_REUSED")
    # Sold out, yet a retry of a key that got a code still gets it back.
    await issue(client, campaign_id)
    assert await refused(client, "IssueCoupon", {"campaignId": campaign_id}) == (
        429,
        "resource_exhausted",
        "SOLD_OUT",
    )
    assert (await issue(client, campaign_id, idempotencyKey="retry-1"))["code"] == first["code"]


async def test_concurrent_retries_of_one_key_consume_one_coupon(client: httpx.AsyncClient) -> None:
    campaign_id = await create(client, 10)
    results = await asyncio.gather(
        *(
            call(client, "IssueCoupon", {"campaignId": campaign_id, "idempotencyKey": "k"})
            for _ in range(50)
        )
    )
    assert {status for status, _ in results} == {200}
    assert len({body["code"] for _, body in results}) == 1
    _, body = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert body["issuedCount"] == 1


async def test_get_coupon_shows_the_coupon_without_changing_it(client: httpx.AsyncClient) -> None:
    campaign_id = await create(client, 2, endTime=LATER.isoformat(), discount={"percentOff": 15})
    coupon = await issue(client, campaign_id, userId="alice")
    for _ in range(2):
        status, body = await call(client, "GetCoupon", {"code": coupon["code"]})
        assert status == 200
        assert body == {
            "code": coupon["code"],
            "campaignId": campaign_id,
            "userId": "alice",
            "issuedAt": coupon["issuedAt"],
            "state": "COUPON_STATE_ISSUED",
            "expiresAt": coupon["expiresAt"],
            "discount": {"percentOff": 15},
        }
    assert await refused(client, "GetCoupon", {"code": UNKNOWN_CODE}) == (
        404,
        "not_found",
        "COUPON_NOT_FOUND",
    )


async def test_a_code_is_redeemed_once_and_the_same_order_gets_the_same_answer(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 2, discount={"percentOff": 20})
    code = (await issue(client, campaign_id))["code"]
    status, first = await redeem(client, code, "order-1")
    assert status == 200, first
    assert first["code"] == code
    assert first["campaignId"] == campaign_id
    assert first["orderId"] == "order-1"
    assert first["discount"] == {"percentOff": 20}
    status, again = await redeem(client, code, "order-1")
    assert (status, again) == (200, first)
    assert await refused(client, "RedeemCoupon", {"code": code, "orderId": "order-2"}) == (
        400,
        "failed_precondition",
        "ALREADY_REDEEMED",
    )
    _, coupon = await call(client, "GetCoupon", {"code": code})
    assert coupon["state"] == "COUPON_STATE_REDEEMED"
    assert (coupon["orderId"], coupon["redeemedAt"]) == ("order-1", first["redeemedAt"])
    _, campaign = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert campaign["redeemedCount"] == 1
    assert await refused(client, "RedeemCoupon", {"code": UNKNOWN_CODE, "orderId": "o"}) == (
        404,
        "not_found",
        "COUPON_NOT_FOUND",
    )


async def test_a_code_issued_to_a_user_is_redeemed_only_for_that_user(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 2)
    code = (await issue(client, campaign_id, userId="alice"))["code"]
    for other in ({}, {"userId": "bob"}):
        assert await refused(client, "RedeemCoupon", {"code": code, "orderId": "o1", **other}) == (
            400,
            "failed_precondition",
            "USER_MISMATCH",
        )
    status, body = await redeem(client, code, "o1", userId="alice")
    assert status == 200, body
    # The user check comes first: another user learns nothing about the code's order.
    assert await refused(client, "RedeemCoupon", {"code": code, "orderId": "o1"}) == (
        400,
        "failed_precondition",
        "USER_MISMATCH",
    )
    # An anonymous code is redeemed with or without a user id.
    anonymous = (await issue(client, campaign_id))["code"]
    status, _ = await redeem(client, anonymous, "o2", userId="carol")
    assert status == 200


async def test_cancel_gives_the_code_back_once_and_only_to_its_order(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 1)
    code = (await issue(client, campaign_id))["code"]
    assert await refused(client, "CancelRedemption", {"code": code, "orderId": "o1"}) == (
        400,
        "failed_precondition",
        "NOT_HOLDER",
    )
    await redeem(client, code, "o1")
    assert await refused(client, "CancelRedemption", {"code": code, "orderId": "o2"}) == (
        400,
        "failed_precondition",
        "NOT_HOLDER",
    )
    for _ in range(2):  # the repeat is a no-op that succeeds
        status, body = await call(client, "CancelRedemption", {"code": code, "orderId": "o1"})
        assert (status, body) == (200, {"code": code, "state": "COUPON_STATE_ISSUED"})
    _, campaign = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert campaign.get("redeemedCount", 0) == 0
    _, coupon = await call(client, "GetCoupon", {"code": code})
    assert coupon["state"] == "COUPON_STATE_ISSUED"
    assert not {"orderId", "redeemedAt"} & set(coupon)

    # Redeemable again, by another order; now the first order's cancel is refused.
    status, _ = await redeem(client, code, "o2")
    assert status == 200
    assert await refused(client, "CancelRedemption", {"code": code, "orderId": "o1"}) == (
        400,
        "failed_precondition",
        "NOT_HOLDER",
    )
    _, campaign = await call(client, "GetCampaign", {"campaignId": campaign_id})
    assert campaign["redeemedCount"] == 1
    assert await refused(client, "CancelRedemption", {"code": UNKNOWN_CODE, "orderId": "o1"}) == (
        404,
        "not_found",
        "COUPON_NOT_FOUND",
    )


async def test_racing_orders_on_one_code_leave_exactly_one_holder(
    client: httpx.AsyncClient,
) -> None:
    campaign_id = await create(client, 1)
    code = (await issue(client, campaign_id))["code"]
    results = await asyncio.gather(*(redeem(client, code, f"order-{i}") for i in range(40)))
    winners = [body["orderId"] for status, body in results if status == 200]
    assert len(winners) == 1
    assert (
        sorted(reason(body) for status, body in results if status != 200)
        == ["ALREADY_REDEEMED"] * 39
    )
    _, coupon = await call(client, "GetCoupon", {"code": code})
    assert coupon["orderId"] == winners[0]


async def test_list_campaigns_pages_newest_first_with_counts(client: httpx.AsyncClient) -> None:
    created = [await create(client, 3, name=f"c{i}") for i in range(5)]
    code = (await issue(client, created[2]))["code"]
    await redeem(client, code, "o")
    seen: list[dict[str, Any]] = []
    token = ""
    for _ in range(10):
        status, body = await call(client, "ListCampaigns", {"pageSize": 2, "pageToken": token})
        assert status == 200, body
        assert len(body.get("campaigns", [])) <= 2
        seen += body.get("campaigns", [])
        token = body.get("nextPageToken", "")
        if not token:
            break
    assert [c["campaignId"] for c in seen] == created[::-1]
    counts = {c["campaignId"]: (c.get("issuedCount", 0), c.get("redeemedCount", 0)) for c in seen}
    assert counts[created[2]] == (1, 1)
    assert counts[created[0]] == (0, 0)
    assert seen[0]["name"] == "c4"
    assert seen[0]["total"] == 3
