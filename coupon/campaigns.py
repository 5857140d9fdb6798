"""Campaigns and the coupons they issue, as plain values the stores and the service share.

The parse_* functions validate what a client sent and raise InvalidArgument with a message
that names the field; the stores receive only values that passed them.
"""

from __future__ import annotations

import enum
import re
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coupon.codes import is_code
from coupon.errors import InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

NAME_MAX_CHARS = 200
USER_ID_MAX_CHARS = 128
ORDER_ID_MAX_CHARS = 128
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
DEFAULT_LIST_SIZE = 100
MAX_LIST_SIZE = 1000
METADATA_MAX_KEYS = 20
METADATA_KEY_MAX_CHARS = 40
METADATA_VALUE_MAX_CHARS = 500
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BRAND = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# ISO 4217 codes are three capital letters; which ones exist is the brand's business.
_CURRENCY = re.compile(r"[A-Z]{3}")


@dataclass(frozen=True, slots=True)
class Money:
    currency: str
    minor_units: int


@dataclass(frozen=True, slots=True)
class Discount:
    """What a code is worth: exactly one of a percentage or an amount."""

    percent_off: int | None = None
    amount_off: Money | None = None

    @classmethod
    def percent(cls, percent_off: int) -> Discount:
        if not 1 <= percent_off <= 100:
            raise InvalidArgument("discount.percent_off must be between 1 and 100")
        return cls(percent_off=percent_off)

    @classmethod
    def amount(cls, currency: str, minor_units: int) -> Discount:
        if not _CURRENCY.fullmatch(currency):
            raise InvalidArgument(
                "discount.amount_off.currency must be an ISO 4217 code such as KRW"
            )
        if minor_units <= 0:
            raise InvalidArgument("discount.amount_off.minor_units must be greater than 0")
        return cls(amount_off=Money(currency, minor_units))


class CouponState(enum.Enum):
    ISSUED = "issued"  # redeemable now
    REDEEMED = "redeemed"
    EXPIRED = "expired"  # not redeemed, and the campaign has ended


def coupon_state(*, redeemed: bool, ended: bool) -> CouponState:
    """A coupon's state; `ended` is decided by the store's clock (the database's on Postgres)."""
    if redeemed:
        return CouponState.REDEEMED
    if ended:
        return CouponState.EXPIRED
    return CouponState.ISSUED


@dataclass(frozen=True, slots=True)
class NewCampaign:
    """A validated request to create a campaign.

    `start_time` None means "now, by the store's clock"; `end_time` None means never; `brand`
    "" means no brand (visible to all-brands callers only).
    """

    id: str
    name: str
    total: int
    start_time: datetime | None
    end_time: datetime | None = None
    discount: Discount | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    brand: str = ""

    @classmethod
    def validate(
        cls,
        *,
        name: str,
        total: int,
        start_time: datetime | None,
        max_total: int,
        now: datetime | None = None,
        end_time: datetime | None = None,
        discount: Discount | None = None,
        metadata: Mapping[str, str] | None = None,
        brand: str = "",
    ) -> NewCampaign:
        name = name.strip()
        if not 1 <= len(name) <= NAME_MAX_CHARS:
            raise InvalidArgument(f"name must be 1..{NAME_MAX_CHARS} characters after trimming")
        if _has_control_characters(name):
            raise InvalidArgument("name must not contain control characters")
        if not 1 <= total <= max_total:
            raise InvalidArgument(f"total must be between 1 and {max_total}")
        opens = start_time or now
        if end_time is not None and opens is not None and end_time <= opens:
            raise InvalidArgument("end_time must be after start_time (or after now)")
        return cls(
            id=str(uuid.uuid4()),
            name=name,
            total=total,
            start_time=start_time,
            end_time=end_time,
            discount=discount,
            metadata=parse_metadata(metadata or {}),
            brand=parse_brand(brand),
        )


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    total: int
    start_time: datetime
    issued: int
    end_time: datetime | None = None
    discount: Discount | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    brand: str = ""
    redeemed: int = 0  # codes redeemed now (cancelled redemptions not counted)
    created_at: datetime | None = None

    def has_ended(self, now: datetime) -> bool:
        return self.end_time is not None and now >= self.end_time


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """One IssueCoupon call as the store sees it."""

    user_id: str | None = None
    idempotency_key: str | None = None


# Not frozen, unlike the values around it: one is made on every issuance, and a frozen
# dataclass sets each field through object.__setattr__, twice the cost of plain slots.
@dataclass(slots=True)
class IssuedCoupon:
    code: str
    issued_at: datetime
    repeat: bool = False  # an earlier coupon handed out again (same user or same key)
    expires_at: datetime | None = None
    discount: Discount | None = None


@dataclass(frozen=True, slots=True)
class Coupon:
    """A coupon as GetCoupon shows it."""

    code: str
    campaign_id: str
    user_id: str | None
    issued_at: datetime
    state: CouponState
    redeemed_at: datetime | None = None
    order_id: str | None = None
    expires_at: datetime | None = None
    discount: Discount | None = None


@dataclass(frozen=True, slots=True)
class Redemption:
    code: str
    campaign_id: str
    order_id: str
    redeemed_at: datetime
    discount: Discount | None = None


@dataclass(frozen=True, slots=True)
class CampaignPage:
    """A campaign and one page of its codes in issue order.

    Each code's position in issue order is its sequence number (1..total); `last_seq` is the
    position of the last code on this page, and `has_more` says whether codes follow it.
    """

    campaign: Campaign
    codes: list[str]
    last_seq: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Where a page of ListCampaigns ended: newest first, ties broken by id."""

    created_at: datetime
    campaign_id: str


@dataclass(frozen=True, slots=True)
class CampaignList:
    campaigns: list[Campaign]
    next: ListCursor | None  # None on the last page


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_campaign_id(text: str) -> str:
    """Return the canonical form of a campaign id, or raise InvalidArgument."""
    if _CANONICAL_UUID.fullmatch(text):
        return text  # what every id this service hands out looks like: no need to rebuild it
    if not text:
        raise InvalidArgument("campaign_id is required")
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise InvalidArgument("campaign_id is not a valid campaign id") from None


def parse_user_id(text: str) -> str | None:
    """Return the user id, or None when the caller gave none."""
    if not text:
        return None
    if len(text) > USER_ID_MAX_CHARS:
        raise InvalidArgument(f"user_id must be at most {USER_ID_MAX_CHARS} characters")
    if _has_control_characters(text):
        raise InvalidArgument("user_id must not contain control characters")
    return text


def parse_idempotency_key(text: str) -> str | None:
    if not text:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(text):
        raise InvalidArgument("idempotency_key must be 1..64 characters of A-Z a-z 0-9 _ -")
    return text


def parse_code(text: str) -> str:
    if not text:
        raise InvalidArgument("code is required")
    if not is_code(text):
        raise InvalidArgument("code is not a coupon code (10 Hangul syllables and digits)")
    return text


def parse_order_id(text: str) -> str:
    if not text:
        raise InvalidArgument("order_id is required")
    if len(text) > ORDER_ID_MAX_CHARS:
        raise InvalidArgument(f"order_id must be at most {ORDER_ID_MAX_CHARS} characters")
    if _has_control_characters(text):
        raise InvalidArgument("order_id must not contain control characters")
    return text


def parse_brand(text: str) -> str:
    if text and not _BRAND.fullmatch(text):
        raise InvalidArgument(
            "brand must be 1..64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return text


def parse_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > METADATA_MAX_KEYS:
        raise InvalidArgument(f"metadata may hold at most {METADATA_MAX_KEYS} keys")
    for key, value in metadata.items():
        if not 1 <= len(key) <= METADATA_KEY_MAX_CHARS:
            raise InvalidArgument(f"metadata keys must be 1..{METADATA_KEY_MAX_CHARS} characters")
        if len(value) > METADATA_VALUE_MAX_CHARS:
            raise InvalidArgument(
                f"metadata values must be at most {METADATA_VALUE_MAX_CHARS} characters"
            )
        if _has_control_characters(key) or _has_control_characters(value):
            raise InvalidArgument("metadata must not contain control characters")
    return dict(metadata)


def parse_page_size(size: int) -> int:
    if size == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 0 and {MAX_PAGE_SIZE}")
    return size


def parse_list_size(size: int) -> int:
    if size == 0:
        return DEFAULT_LIST_SIZE
    if not 1 <= size <= MAX_LIST_SIZE:
        raise InvalidArgument(f"page_size must be between 0 and {MAX_LIST_SIZE}")
    return size


def _has_control_characters(text: str) -> bool:
    # Control characters (NUL above all, which PostgreSQL text cannot hold) are never meant.
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)
