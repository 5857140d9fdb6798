"""Campaigns and the coupons they issue, as plain values the stores and the service share."""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coupon.errors import InvalidArgument

if TYPE_CHECKING:
    from datetime import datetime

NAME_MAX_CHARS = 200
USER_ID_MAX_CHARS = 128
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class NewCampaign:
    """A validated request to create a campaign.

    `start_time` None means "now, by the store's clock".
    """

    id: str
    name: str
    total: int
    start_time: datetime | None

    @classmethod
    def validate(
        cls, *, name: str, total: int, start_time: datetime | None, max_total: int
    ) -> NewCampaign:
        name = name.strip()
        if not 1 <= len(name) <= NAME_MAX_CHARS:
            raise InvalidArgument(f"name must be 1..{NAME_MAX_CHARS} characters after trimming")
        if _has_control_characters(name):
            raise InvalidArgument("name must not contain control characters")
        if not 1 <= total <= max_total:
            raise InvalidArgument(f"total must be between 1 and {max_total}")
        return cls(id=str(uuid.uuid4()), name=name, total=total, start_time=start_time)


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    total: int
    start_time: datetime
    issued: int


@dataclass(frozen=True, slots=True)
class IssuedCoupon:
    code: str
    issued_at: datetime
    repeat: bool = False  # the user's earlier coupon, handed out again


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


def parse_campaign_id(text: str) -> str:
    """Return the canonical form of a campaign id, or raise InvalidArgument."""
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


def parse_page_size(size: int) -> int:
    if size == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 0 and {MAX_PAGE_SIZE}")
    return size


def _has_control_characters(text: str) -> bool:
    # Control characters (NUL above all, which PostgreSQL text cannot hold) are never meant.
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)
