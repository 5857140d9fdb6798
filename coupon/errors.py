"""Domain errors: what can go wrong when running a campaign, independent of transport.

Each subclass's docstring is its default message, which the client sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime


class CouponError(Exception):
    """The coupon service could not complete the request."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(CouponError):
    """The request is invalid."""


class CampaignNotFound(CouponError):
    """No campaign has that id."""


class CampaignNotStarted(CouponError):
    """The campaign has not started yet."""

    def __init__(self, starts_at: datetime) -> None:
        self.starts_at = starts_at
        super().__init__(f"the campaign starts at {starts_at.isoformat()}")


class SoldOut(CouponError):
    """Every coupon of this campaign has been issued."""


class StoreUnavailable(CouponError):
    """The coupon store is unavailable; retry later."""


class Unauthenticated(CouponError):
    """This call needs an admin token: Authorization: Bearer <token>."""


class PermissionDenied(CouponError):
    """The admin token is not valid."""
