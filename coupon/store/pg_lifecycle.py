"""The coupon's life after issuance on PostgreSQL: look up, redeem, cancel, list.

Redemption and cancellation are each one conditional UPDATE that also writes the history row
(coupon.store.sql.queries: redeem_coupon, cancel_redemption). When it matches nothing, the
coupon as it is now says why. Every query carries the caller's brand scope itself, so what
lies outside it is simply not found.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from psycopg.types.json import Jsonb

from coupon.campaigns import (
    Campaign,
    CampaignList,
    Coupon,
    CouponState,
    Discount,
    ListCursor,
    Money,
    Redemption,
    coupon_state,
)
from coupon.errors import AlreadyRedeemed, CouponExpired, CouponNotFound, NotHolder, UserMismatch

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from psycopg import AsyncConnection

    from coupon.campaigns import NewCampaign

# A conditional UPDATE that matched nothing is explained by reading the coupon afterwards; if
# the state it blocked on has changed meanwhile (a cancel between the two), the UPDATE is tried
# again. Each round needs another order to act in between, so a few rounds always suffice.
MAX_ROUNDS = 5

_LIST_START = ListCursor(datetime.max.replace(tzinfo=UTC), "ffffffff-ffff-ffff-ffff-ffffffffffff")


def discount_params(discount: Discount | None) -> dict[str, Any]:
    money = discount.amount_off if discount is not None else None
    return {
        "percent_off": discount.percent_off if discount is not None else None,
        "currency": money.currency if money is not None else None,
        "minor_units": money.minor_units if money is not None else None,
    }


def discount_of(
    percent_off: int | None, currency: str | None, minor_units: int | None
) -> Discount | None:
    if percent_off is not None:
        return Discount(percent_off=percent_off)
    if currency is not None and minor_units is not None:
        return Discount(amount_off=Money(currency, minor_units))
    return None


def create_params(campaign: NewCampaign) -> dict[str, Any]:
    return {
        "id": uuid.UUID(campaign.id),
        "name": campaign.name,
        "total": campaign.total,
        "start_time": campaign.start_time,
        "end_time": campaign.end_time,
        "metadata": Jsonb(dict(campaign.metadata)),
        "brand": campaign.brand,
        **discount_params(campaign.discount),
    }


def campaign_of(campaign_id: str, row: Sequence[Any]) -> Campaign:
    """A Campaign from the columns name .. redeemed of campaign_page / list_campaigns."""
    (name, total, issued, start_time, end_time, percent, currency, minor, metadata, brand,
     created_at, redeemed) = row  # fmt: skip
    return Campaign(
        id=campaign_id,
        name=name,
        total=total,
        start_time=start_time,
        issued=issued,
        end_time=end_time,
        discount=discount_of(percent, currency, minor),
        metadata=metadata,
        brand=brand,
        redeemed=redeemed,
        created_at=created_at,
    )


def _coupon_of(row: Sequence[Any]) -> Coupon:
    """A Coupon from the columns of get_coupon / cancel_redemption."""
    (code, campaign_id, user_id, issued_at, order_id, redeemed_at, end_time, percent, currency,
     minor, ended) = row  # fmt: skip
    return Coupon(
        code=code,
        campaign_id=str(campaign_id),
        user_id=user_id,
        issued_at=issued_at,
        state=coupon_state(redeemed=order_id is not None, ended=ended),
        redeemed_at=redeemed_at,
        order_id=order_id,
        expires_at=end_time,
        discount=discount_of(percent, currency, minor),
    )


async def list_campaigns(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    after: ListCursor | None,
    limit: int,
    brand: str | None,
) -> CampaignList:
    start = after or _LIST_START
    params: dict[str, Any] = {
        "after_created_at": start.created_at,
        "after_id": uuid.UUID(start.campaign_id),
        "limit": limit + 1,
    }
    if brand is None:
        cursor = await conn.execute(sql["list_campaigns"], params)
    else:
        cursor = await conn.execute(sql["list_brand_campaigns"], {**params, "brand": brand})
    rows = await cursor.fetchall()
    campaigns = [campaign_of(str(row[0]), row[1:]) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = campaigns[-1]
        assert last.created_at is not None
        next_cursor = ListCursor(last.created_at, last.id)
    return CampaignList(campaigns, next_cursor)


async def get_coupon(
    conn: AsyncConnection[Any], sql: Mapping[str, str], code: str, brand: str | None
) -> Coupon:
    cursor = await conn.execute(sql["get_coupon"], {"code": code, "brand": brand})
    row = await cursor.fetchone()
    if row is None:
        raise CouponNotFound()
    return _coupon_of(row)


async def redeem_coupon(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    code: str,
    *,
    order_id: str,
    user_id: str | None,
    brand: str | None,
) -> Redemption:
    params = {"code": code, "order_id": order_id, "user_id": user_id, "brand": brand}
    for _ in range(MAX_ROUNDS):
        cursor = await conn.execute(sql["redeem_coupon"], params)
        row = await cursor.fetchone()
        if row is not None:
            campaign_id, redeemed_at, percent, currency, minor = row
            return Redemption(
                code, str(campaign_id), order_id, redeemed_at, discount_of(percent, currency, minor)
            )
        coupon = await get_coupon(conn, sql, code, brand)
        if coupon.user_id is not None and coupon.user_id != user_id:
            raise UserMismatch()
        if coupon.order_id == order_id:
            assert coupon.redeemed_at is not None
            return Redemption(
                code, coupon.campaign_id, order_id, coupon.redeemed_at, coupon.discount
            )
        if coupon.order_id is not None:
            raise AlreadyRedeemed()
        if coupon.state is CouponState.EXPIRED:
            raise CouponExpired()
        # Free and redeemable now: the holder cancelled between the UPDATE and the read.
    raise AlreadyRedeemed()


async def cancel_redemption(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    code: str,
    order_id: str,
    brand: str | None,
) -> Coupon:
    params = {"code": code, "order_id": order_id, "brand": brand}
    for _ in range(MAX_ROUNDS):
        cursor = await conn.execute(sql["cancel_redemption"], params)
        row = await cursor.fetchone()
        if row is not None:
            return _coupon_of(row)
        coupon = await get_coupon(conn, sql, code, brand)
        if coupon.order_id == order_id:
            continue  # this order redeemed it between the UPDATE and the read
        if coupon.order_id is not None:
            raise NotHolder()
        cursor = await conn.execute(sql["cancelled_by"], {"code": code, "order_id": order_id})
        cancelled = await cursor.fetchone()
        if cancelled is None or not cancelled[0]:
            raise NotHolder()
        return coupon
    raise NotHolder()
