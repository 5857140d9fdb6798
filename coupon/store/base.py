"""The one interface every campaign store implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from coupon.campaigns import (
        Campaign,
        CampaignList,
        CampaignPage,
        Coupon,
        IssuedCoupon,
        IssueRequest,
        ListCursor,
        NewCampaign,
        Redemption,
    )
    from coupon.errors import CouponError


class Store(Protocol):
    """Keeps campaigns, their codes, and the codes' redemptions.

    Every implementation guarantees, at every commit, for every campaign: `issued <= total`
    and `issued` equals the number of stored codes; codes are unique across all campaigns;
    no code is issued before the start instant nor from the end instant on; a returned code is
    already stored; a code is held by at most one order at a time, and every redemption and
    cancellation is kept in an append-only history.

    `brand` scopes a call to one brand's campaigns and codes; None means every brand. What
    lies outside the scope is reported exactly as if it did not exist (CampaignNotFound,
    CouponNotFound). IssueCoupon is the customers' call and is not brand-scoped.
    """

    async def open(self) -> None:
        """Acquire resources. Must not fail because a backing server is down at start-up."""

    async def close(self) -> None:
        """Release resources; issuance already acknowledged stays stored."""

    async def is_ready(self) -> bool:
        """Whether the store can serve requests now."""

    async def create_campaign(self, campaign: NewCampaign) -> Campaign:
        """Store a new campaign; a missing start time means now, by the store's clock."""

    async def issue_coupon(self, campaign_id: str, request: IssueRequest) -> IssuedCoupon:
        """Issue one code, or return the caller's earlier code.

        An earlier code is the one issued to the same user, or under the same idempotency key
        (a key first used with another user raises IdempotencyKeyReused). Otherwise raises
        CampaignNotFound, CampaignNotStarted, CampaignEnded or SoldOut, checked in that order;
        a caller who already holds a code gets it back even when the campaign is sold out or
        has ended.
        """

    def refusal_without_io(self, campaign_id: str, request: IssueRequest) -> CouponError | None:
        """The refusal issue_coupon would raise for this call, when the store knows it for
        certain without I/O (no query, no await); None when it would issue or return an
        earlier code, or cannot tell without asking. A refusal answered from here must be
        the one issue_coupon gives: coupon.early_refusals answers a sold-out storm with it."""

    async def get_campaign(
        self, campaign_id: str, after_seq: int, limit: int, *, brand: str | None
    ) -> CampaignPage:
        """Return the campaign and at most `limit` codes issued after position `after_seq`."""

    async def list_campaigns(
        self, after: ListCursor | None, limit: int, *, brand: str | None
    ) -> CampaignList:
        """Campaigns newest first (by creation, ties by id), starting after `after`."""

    async def get_coupon(self, code: str, *, brand: str | None) -> Coupon:
        """The coupon and its state now; no side effect. Raises CouponNotFound."""

    async def redeem_coupon(
        self, code: str, order_id: str, user_id: str | None, *, brand: str | None
    ) -> Redemption:
        """Redeem the code for the order, atomically: at most one order holds a code.

        The same order again returns the same redemption. Raises, checked in this order:
        CouponNotFound; UserMismatch (the code was issued to a user and `user_id` differs);
        AlreadyRedeemed (another order holds it); CouponExpired (from the campaign's end time
        on, by the store's clock).
        """

    async def cancel_redemption(self, code: str, order_id: str, *, brand: str | None) -> Coupon:
        """Give the code back from the order that holds it; returns the coupon after.

        Cancelling again (the order no longer holds it, and no other order does, and this
        order's redemption was cancelled) succeeds and changes nothing. Raises CouponNotFound,
        or NotHolder when another order holds the code or this order never redeemed it.
        """
