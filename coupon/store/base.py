"""The one interface every campaign store implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from coupon.campaigns import Campaign, CampaignPage, IssuedCoupon, NewCampaign


class Store(Protocol):
    """Keeps campaigns and their codes.

    Every implementation guarantees, at every commit, for every campaign: `issued <= total`
    and `issued` equals the number of stored codes; codes are unique across all campaigns;
    no code is issued before the start instant; a returned code is already stored.
    """

    async def open(self) -> None:
        """Acquire resources. Must not fail because a backing server is down at start-up."""

    async def close(self) -> None:
        """Release resources; issuance already acknowledged stays stored."""

    async def is_ready(self) -> bool:
        """Whether the store can serve requests now."""

    async def create_campaign(self, campaign: NewCampaign) -> Campaign:
        """Store a new campaign; a missing start time means now, by the store's clock."""

    async def issue_coupon(self, campaign_id: str, user_id: str | None) -> IssuedCoupon:
        """Issue one code, or return the user's earlier code.

        Raises CampaignNotFound, CampaignNotStarted or SoldOut (checked in that order, except
        that a user who already holds a code gets it back even when the campaign is sold out).
        """

    async def get_campaign(self, campaign_id: str, after_seq: int, limit: int) -> CampaignPage:
        """Return the campaign and at most `limit` codes issued after position `after_seq`."""
