"""Between domain values and protobuf messages: discounts, timestamps, coupon states."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from protobuf import Oneof
from protobuf.wkt import Timestamp

from coupon.campaigns import CouponState, Discount
from coupon.clock import EPOCH
from coupon.errors import InvalidArgument
from coupon.gen import coupon_pb

_STATE_TO_WIRE = {
    CouponState.ISSUED: coupon_pb.CouponState.ISSUED,
    CouponState.REDEEMED: coupon_pb.CouponState.REDEEMED,
    CouponState.EXPIRED: coupon_pb.CouponState.EXPIRED,
}


_SECONDS_PER_DAY = 86_400


def timestamp(moment: datetime | None) -> Timestamp | None:
    """An aware datetime, at any UTC offset, as a Timestamp, exactly. Every instant the service
    holds came from the clock or from a Timestamp (`instant` below), so it is in range."""
    if moment is None:
        return None
    # One datetime subtraction and two field stores: Timestamp.from_datetime goes through
    # integer nanoseconds and keyword construction, about twice the work, and every reply
    # that carries an instant (each issued coupon) pays it.
    since_epoch = moment - EPOCH
    wire = Timestamp()
    wire.seconds = since_epoch.days * _SECONDS_PER_DAY + since_epoch.seconds
    wire.nanos = since_epoch.microseconds * 1000
    return wire


def instant(value: Timestamp | None, field_name: str) -> datetime | None:
    """A request's timestamp as an aware UTC datetime; None when unset."""
    if value is None:
        return None
    try:
        return value.to_datetime().astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field_name} is out of range") from None


def discount_from_wire(value: coupon_pb.Discount | None) -> Discount | None:
    if value is None or value.kind is None:
        return None
    match value.kind:
        case Oneof(field="percent_off", value=int() as percent):
            return Discount.percent(percent)
        case Oneof(field="amount_off", value=coupon_pb.Money() as money):
            return Discount.amount(money.currency, money.minor_units)
    raise InvalidArgument("discount is not valid")


def discount_to_wire(value: Discount | None) -> coupon_pb.Discount | None:
    if value is None:
        return None
    if value.percent_off is not None:
        percent: Oneof[Literal["percent_off"], int] = Oneof("percent_off", value.percent_off)
        return coupon_pb.Discount(kind=percent)
    if value.amount_off is not None:
        money = coupon_pb.Money(
            currency=value.amount_off.currency, minor_units=value.amount_off.minor_units
        )
        amount: Oneof[Literal["amount_off"], coupon_pb.Money] = Oneof("amount_off", money)
        return coupon_pb.Discount(kind=amount)
    return None


def state_to_wire(state: CouponState) -> coupon_pb.CouponState:
    return _STATE_TO_WIRE[state]
