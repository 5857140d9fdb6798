"""The embedded store: everything in one process's memory, lost when it exits.

Each method runs without awaiting between its check and its write, so on one asyncio loop no
two requests interleave inside it: that is what makes issuance exact without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from coupon.campaigns import Campaign, CampaignPage, IssuedCoupon
from coupon.clock import Clock, system_clock
from coupon.codes import new_code
from coupon.errors import CampaignNotFound, CampaignNotStarted, SoldOut

if TYPE_CHECKING:
    from coupon.campaigns import NewCampaign


@dataclass(slots=True)
class _CampaignState:
    campaign: Campaign
    coupons: list[IssuedCoupon] = field(default_factory=list)
    coupon_index_by_user: dict[str, int] = field(default_factory=dict)


class MemoryStore:
    def __init__(self, clock: Clock = system_clock) -> None:
        self._clock = clock
        self._campaigns: dict[str, _CampaignState] = {}
        self._all_codes: set[str] = set()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def is_ready(self) -> bool:
        return True

    async def create_campaign(self, campaign: NewCampaign) -> Campaign:
        created = Campaign(
            id=campaign.id,
            name=campaign.name,
            total=campaign.total,
            start_time=campaign.start_time or self._clock(),
            issued=0,
        )
        self._campaigns[created.id] = _CampaignState(created)
        return created

    async def issue_coupon(self, campaign_id: str, user_id: str | None) -> IssuedCoupon:
        state = self._campaigns.get(campaign_id)
        if state is None:
            raise CampaignNotFound()
        now = self._clock()
        if now < state.campaign.start_time:
            raise CampaignNotStarted(state.campaign.start_time)
        if user_id is not None and user_id in state.coupon_index_by_user:
            return replace(state.coupons[state.coupon_index_by_user[user_id]], repeat=True)
        if len(state.coupons) >= state.campaign.total:
            raise SoldOut()
        code = new_code()
        while code in self._all_codes:
            code = new_code()
        coupon = IssuedCoupon(code=code, issued_at=now)
        self._all_codes.add(code)
        state.coupons.append(coupon)
        if user_id is not None:
            state.coupon_index_by_user[user_id] = len(state.coupons) - 1
        return coupon

    async def get_campaign(self, campaign_id: str, after_seq: int, limit: int) -> CampaignPage:
        state = self._campaigns.get(campaign_id)
        if state is None:
            raise CampaignNotFound()
        page = state.coupons[after_seq : after_seq + limit]
        issued = len(state.coupons)
        return CampaignPage(
            campaign=replace(state.campaign, issued=issued),
            codes=[c.code for c in page],
            last_seq=after_seq + len(page),
            has_more=after_seq + len(page) < issued,
        )

    def codes_of(self, campaign_id: str) -> list[str]:
        """Every stored code of the campaign, in issue order (for tests and audits)."""
        return [c.code for c in self._campaigns[campaign_id].coupons]
