"""Domain errors: what can go wrong when running a campaign, independent of transport.

Each subclass's docstring is its default message, which the client sees. A subclass with a
`reason` is a refusal a client program acts on: the reason reaches it machine-readably
(coupon.rpc_errors sends it as a google.rpc.ErrorInfo detail).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from datetime import datetime


class CouponError(Exception):
    """The coupon service could not complete the request."""

    reason: ClassVar[str | None] = None

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(CouponError):
    """The request is invalid."""


class CampaignNotFound(CouponError):
    """No campaign has that id."""

    reason = "CAMPAIGN_NOT_FOUND"


class CouponNotFound(CouponError):
    """No coupon has that code."""

    reason = "COUPON_NOT_FOUND"


class CampaignNotStarted(CouponError):
    """The campaign has not started yet."""

    reason = "NOT_STARTED"

    def __init__(self, starts_at: datetime) -> None:
        self.starts_at = starts_at
        super().__init__(f"the campaign starts at {starts_at.isoformat()}")


class CampaignEnded(CouponError):
    """The campaign has ended: it issues no more coupons."""

    reason = "ENDED"


class CouponExpired(CouponError):
    """The coupon has expired: its campaign has ended."""

    reason = "EXPIRED"


class SoldOut(CouponError):
    """Every coupon of this campaign has been issued."""

    reason = "SOLD_OUT"


class AlreadyRedeemed(CouponError):
    """The coupon is redeemed by another order."""

    reason = "ALREADY_REDEEMED"


class NotHolder(CouponError):
    """The coupon is not redeemed by this order, so this order cannot cancel it."""

    reason = "NOT_HOLDER"


class UserMismatch(CouponError):
    """The coupon was issued to another user."""

    reason = "USER_MISMATCH"


class IdempotencyKeyReused(CouponError):
    """This idempotency key was already used for another user."""

    reason = "IDEMPOTENCY_KEY_REUSED"


class StoreUnavailable(CouponError):
    """The coupon store is unavailable; retry later."""


class CommitUnknown(CouponError):
    """The store lost its connection while committing and could not learn whether the coupon
    was issued; check before retrying (a retry may take a second coupon)."""


class Unauthenticated(CouponError):
    """This call needs a credential: Authorization: Bearer <token>."""


class PermissionDenied(CouponError):
    """The credential does not allow this call."""
