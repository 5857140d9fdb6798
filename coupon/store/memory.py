"""The embedded store: everything in one process's memory, lost when it exits.

Each method runs without awaiting between its check and its write, so on one asyncio loop no
two requests interleave inside it: that is what makes issuance and redemption exact without a
lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

from coupon.campaigns import (
    Campaign,
    CampaignList,
    CampaignPage,
    Coupon,
    IssuedCoupon,
    ListCursor,
    Redemption,
    coupon_state,
)
from coupon.clock import Clock, microseconds_since_epoch, system_clock
from coupon.codes import new_code
from coupon.errors import (
    AlreadyRedeemed,
    CampaignEnded,
    CampaignNotFound,
    CampaignNotStarted,
    CouponError,
    CouponExpired,
    CouponNotFound,
    IdempotencyKeyReused,
    NotHolder,
    SoldOut,
    UserMismatch,
)
from coupon.webhooks.events import ISSUED, REDEEMED, REDEMPTION_CANCELLED, new_event

if TYPE_CHECKING:
    from datetime import datetime

    from coupon.campaigns import IssueRequest, NewCampaign
    from coupon.webhooks.memory_outbox import MemoryOutbox


# A stored coupon: what issuing fixed, (code, campaign id, user id, issued at), a plain tuple of
# strings and a datetime. The garbage collector stops tracking such a tuple after its first
# pass, so the coupons never join the old generation that a collection rescans object by
# object while every call waits: as slots objects, a full collection of a server holding a
# million coupons took 760 ms (134 ms now, the store's dicts and lists still walked). What
# changes after issuance (the order holding a coupon) is kept apart, in MemoryStore._holds.
_Coupon = tuple[str, str, "str | None", "datetime"]
_CODE: Final = 0
_CAMPAIGN_ID: Final = 1
_USER_ID: Final = 2
_ISSUED_AT: Final = 3

# The order holding a redeemed coupon, and when it redeemed it.
_Hold = tuple[str, "datetime"]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One row of the append-only redemption history."""

    code: str
    order_id: str
    action: str  # "redeem" | "cancel"
    at: datetime


@dataclass(slots=True)
class _CampaignState:
    campaign: Campaign
    coupons: list[_Coupon] = field(default_factory=list)
    by_user: dict[str, _Coupon] = field(default_factory=dict)
    by_key: dict[str, _Coupon] = field(default_factory=dict)
    redeemed: int = 0


class MemoryStore:
    def __init__(self, clock: Clock = system_clock, outbox: MemoryOutbox | None = None) -> None:
        self._clock = clock
        self._outbox = outbox  # webhook events, recorded in the same step as each change
        self._campaigns: dict[str, _CampaignState] = {}
        self._coupons: dict[str, _Coupon] = {}  # every code of every campaign
        self._holds: dict[str, _Hold] = {}  # by code: the coupons redeemed now
        self.history: list[HistoryEntry] = []

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def is_ready(self) -> bool:
        return True

    async def create_campaign(self, campaign: NewCampaign) -> Campaign:
        now = self._clock()
        created = Campaign(
            id=campaign.id,
            name=campaign.name,
            total=campaign.total,
            start_time=campaign.start_time or now,
            issued=0,
            end_time=campaign.end_time,
            discount=campaign.discount,
            metadata=dict(campaign.metadata),
            brand=campaign.brand,
            created_at=now,
        )
        self._campaigns[created.id] = _CampaignState(created)
        return created

    async def issue_coupon(self, campaign_id: str, request: IssueRequest) -> IssuedCoupon:
        # No await from the checks to the returned answer: a cancellation (deadline, client
        # gone) is delivered only at an await, so it lands before anything is issued or after
        # the answer is fixed. Nothing is orphaned here; a reply can still be lost in transit.
        now = self._clock()
        decision = self._decide(campaign_id, request, now)
        if isinstance(decision, CouponError):
            raise decision
        if isinstance(decision, tuple):  # the caller's earlier coupon
            return self._issued(self._campaigns[campaign_id], decision, repeat=True)
        state = decision
        code = new_code()
        while code in self._coupons:
            code = new_code()
        coupon = (code, campaign_id, request.user_id, now)
        self._coupons[code] = coupon
        state.coupons.append(coupon)
        if request.user_id is not None:
            state.by_user[request.user_id] = coupon
        if request.idempotency_key is not None:
            state.by_key[request.idempotency_key] = coupon
        if self._outbox is not None:  # checked here, not in _event: a call less per issuance
            self._event(ISSUED, state, coupon, now)
        return self._issued(state, coupon, repeat=False)

    def refusal_without_io(self, campaign_id: str, request: IssueRequest) -> CouponError | None:
        # Everything is in memory: the answer is always certain.
        decision = self._decide(campaign_id, request, self._clock())
        return decision if isinstance(decision, CouponError) else None

    def _decide(
        self, campaign_id: str, request: IssueRequest, now: datetime
    ) -> CouponError | _Coupon | _CampaignState:
        """What issuing would do, decided without doing it: the refusal (returned, not
        raised, so that asking costs no exception), the caller's earlier coupon, or the
        campaign's state to issue from. The checks come in the order Store.issue_coupon
        documents."""
        state = self._campaigns.get(campaign_id)
        if state is None:
            return CampaignNotFound()
        campaign = state.campaign
        if now < campaign.start_time:
            return CampaignNotStarted(campaign.start_time)
        earlier = self._earlier_coupon(state, request)
        if earlier is not None:
            return earlier
        if campaign.has_ended(now):
            return CampaignEnded()
        if len(state.coupons) >= campaign.total:
            return SoldOut()
        return state

    @staticmethod
    def _earlier_coupon(
        state: _CampaignState, request: IssueRequest
    ) -> _Coupon | IdempotencyKeyReused | None:
        if request.idempotency_key is not None:
            keyed = state.by_key.get(request.idempotency_key)
            if keyed is not None:
                return keyed if keyed[_USER_ID] == request.user_id else IdempotencyKeyReused()
        if request.user_id is not None:
            return state.by_user.get(request.user_id)
        return None

    @staticmethod
    def _issued(state: _CampaignState, coupon: _Coupon, *, repeat: bool) -> IssuedCoupon:
        return IssuedCoupon(
            code=coupon[_CODE],
            issued_at=coupon[_ISSUED_AT],
            repeat=repeat,
            expires_at=state.campaign.end_time,
            discount=state.campaign.discount,
        )

    async def get_campaign(
        self, campaign_id: str, after_seq: int, limit: int, *, brand: str | None
    ) -> CampaignPage:
        state = self._visible_campaign(campaign_id, brand)
        page = state.coupons[after_seq : after_seq + limit]
        issued = len(state.coupons)
        return CampaignPage(
            campaign=self._snapshot(state),
            codes=[c[_CODE] for c in page],
            last_seq=after_seq + len(page),
            has_more=after_seq + len(page) < issued,
        )

    async def list_campaigns(
        self, after: ListCursor | None, limit: int, *, brand: str | None
    ) -> CampaignList:
        visible = [
            s for s in self._campaigns.values() if brand is None or s.campaign.brand == brand
        ]
        visible.sort(key=_newest_first)
        if after is not None:
            boundary = (-microseconds_since_epoch(after.created_at), _inverted(after.campaign_id))
            visible = [s for s in visible if _newest_first(s) > boundary]
        page = visible[:limit]
        next_cursor = None
        if len(visible) > limit:
            last = page[-1].campaign
            assert last.created_at is not None
            next_cursor = ListCursor(last.created_at, last.id)
        return CampaignList([self._snapshot(s) for s in page], next_cursor)

    async def get_coupon(self, code: str, *, brand: str | None) -> Coupon:
        coupon, state = self._visible_coupon(code, brand)
        return self._coupon_view(coupon, state)

    async def redeem_coupon(
        self, code: str, order_id: str, user_id: str | None, *, brand: str | None
    ) -> Redemption:
        coupon, state = self._visible_coupon(code, brand)
        if coupon[_USER_ID] is not None and coupon[_USER_ID] != user_id:
            raise UserMismatch()
        hold = self._holds.get(code)
        if hold is not None:
            holding_order, _ = hold
            if holding_order != order_id:
                raise AlreadyRedeemed()
            return self._redemption(coupon, hold, state)
        now = self._clock()
        if state.campaign.has_ended(now):
            raise CouponExpired()
        hold = self._holds[code] = (order_id, now)
        state.redeemed += 1
        self.history.append(HistoryEntry(code, order_id, "redeem", now))
        if self._outbox is not None:
            self._event(REDEEMED, state, coupon, now, order_id)
        return self._redemption(coupon, hold, state)

    async def cancel_redemption(self, code: str, order_id: str, *, brand: str | None) -> Coupon:
        coupon, state = self._visible_coupon(code, brand)
        hold = self._holds.get(code)
        if hold is not None and hold[0] == order_id:  # held by this order
            now = self._clock()
            del self._holds[code]
            state.redeemed -= 1
            self.history.append(HistoryEntry(code, order_id, "cancel", now))
            if self._outbox is not None:
                self._event(REDEMPTION_CANCELLED, state, coupon, now, order_id)
        elif hold is not None or not self._cancelled_by(code, order_id):
            raise NotHolder()
        return self._coupon_view(coupon, state)

    def _event(
        self,
        event_type: str,
        state: _CampaignState,
        coupon: _Coupon,
        now: datetime,
        order_id: str | None = None,
    ) -> None:
        """Record the change's webhook event; only called when the store has an outbox."""
        assert self._outbox is not None
        event = new_event(
            event_type,
            time=now,
            campaign_id=coupon[_CAMPAIGN_ID],
            brand=state.campaign.brand,
            code=coupon[_CODE],
            user_id=coupon[_USER_ID],
            order_id=order_id,
        )
        self._outbox.record([event])

    def _cancelled_by(self, code: str, order_id: str) -> bool:
        return any(
            h.code == code and h.order_id == order_id and h.action == "cancel" for h in self.history
        )

    def _visible_campaign(self, campaign_id: str, brand: str | None) -> _CampaignState:
        state = self._campaigns.get(campaign_id)
        if state is None or (brand is not None and state.campaign.brand != brand):
            raise CampaignNotFound()
        return state

    def _visible_coupon(self, code: str, brand: str | None) -> tuple[_Coupon, _CampaignState]:
        coupon = self._coupons.get(code)
        if coupon is None:
            raise CouponNotFound()
        state = self._campaigns[coupon[_CAMPAIGN_ID]]
        if brand is not None and state.campaign.brand != brand:
            raise CouponNotFound()
        return coupon, state

    def _coupon_view(self, coupon: _Coupon, state: _CampaignState) -> Coupon:
        code, campaign_id, user_id, issued_at = coupon
        order_id, redeemed_at = self._holds.get(code, (None, None))
        return Coupon(
            code=code,
            campaign_id=campaign_id,
            user_id=user_id,
            issued_at=issued_at,
            state=coupon_state(
                redeemed=order_id is not None,
                ended=state.campaign.has_ended(self._clock()),
            ),
            redeemed_at=redeemed_at,
            order_id=order_id,
            expires_at=state.campaign.end_time,
            discount=state.campaign.discount,
        )

    @staticmethod
    def _redemption(coupon: _Coupon, hold: _Hold, state: _CampaignState) -> Redemption:
        order_id, redeemed_at = hold
        return Redemption(
            code=coupon[_CODE],
            campaign_id=coupon[_CAMPAIGN_ID],
            order_id=order_id,
            redeemed_at=redeemed_at,
            discount=state.campaign.discount,
        )

    @staticmethod
    def _snapshot(state: _CampaignState) -> Campaign:
        return replace(state.campaign, issued=len(state.coupons), redeemed=state.redeemed)

    def codes_of(self, campaign_id: str) -> list[str]:
        """Every stored code of the campaign, in issue order (for tests and audits)."""
        return [c[_CODE] for c in self._campaigns[campaign_id].coupons]


def _inverted(campaign_id: str) -> tuple[int, ...]:
    # Newest first means descending ids too; negate each character so one ascending sort serves.
    return tuple(-ord(c) for c in campaign_id)


def _newest_first(state: _CampaignState) -> tuple[int, tuple[int, ...]]:
    created_at = state.campaign.created_at
    assert created_at is not None
    return (-microseconds_since_epoch(created_at), _inverted(state.campaign.id))
