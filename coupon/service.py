"""The Connect service: checks requests, calls the store, shapes replies.

Every call takes the same walk: parse and validate the request (coupon.campaigns), learn who
calls (coupon.caller), call the store within the caller's brand, shape the reply
(coupon.wire). Domain errors raised on the way are translated in coupon.rpc_errors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from coupon import metrics
from coupon.caller import Caller, current_caller
from coupon.campaigns import (
    IssueRequest,
    NewCampaign,
    parse_campaign_id,
    parse_code,
    parse_idempotency_key,
    parse_list_size,
    parse_order_id,
    parse_page_size,
    parse_user_id,
)
from coupon.clock import Clock, system_clock
from coupon.errors import (
    CampaignEnded,
    CampaignNotStarted,
    CouponError,
    PermissionDenied,
    SoldOut,
)
from coupon.gen.coupon_connect import CouponService
from coupon.gen.coupon_pb import (
    CampaignSummary,
    CancelRedemptionRequest,
    CancelRedemptionResponse,
    CreateCampaignRequest,
    CreateCampaignResponse,
    GetCampaignRequest,
    GetCampaignResponse,
    GetCouponRequest,
    GetCouponResponse,
    IssueCouponRequest,
    IssueCouponResponse,
    ListCampaignsRequest,
    ListCampaignsResponse,
    RedeemCouponRequest,
    RedeemCouponResponse,
)
from coupon.paging import (
    decode_list_token,
    decode_page_token,
    encode_list_token,
    encode_page_token,
)
from coupon.wire import discount_from_wire, discount_to_wire, instant, state_to_wire, timestamp

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

    from coupon.campaigns import Campaign
    from coupon.config import LimitsConfig
    from coupon.refusing_campaigns import RefusingCampaigns
    from coupon.store import Store


log = logging.getLogger("coupon.service")

_ANONYMOUS_ISSUE = IssueRequest()
_REFUSAL_COUNTERS = {
    SoldOut: metrics.SOLD_OUT_REFUSALS,
    CampaignNotStarted: metrics.NOT_STARTED_REFUSALS,
    CampaignEnded: metrics.ENDED_REFUSALS,
}


def issue_request_of(request: IssueCouponRequest, caller: Caller) -> tuple[str, IssueRequest]:
    """The campaign id and the store's request for an IssueCoupon call by `caller`; raises
    InvalidArgument or PermissionDenied to refuse it."""
    campaign_id = parse_campaign_id(request.campaign_id)
    # Most calls carry neither field: skipping their parsers then saves two calls per issuance.
    user_id = parse_user_id(request.user_id) if request.user_id else None
    verified_user = caller.user_id
    if verified_user is not None:
        # A customer's token names the customer: the body may repeat it, never change it.
        if user_id is not None and user_id != verified_user:
            raise PermissionDenied("user_id differs from the customer's token")
        user_id = verified_user
    key_text = request.idempotency_key
    idempotency_key = parse_idempotency_key(key_text) if key_text else None
    if user_id is None and idempotency_key is None:
        # Nothing tells such calls apart: they share one request.
        return campaign_id, _ANONYMOUS_ISSUE
    return campaign_id, IssueRequest(user_id=user_id, idempotency_key=idempotency_key)


def count_issue_refusal(refusal: CouponError) -> None:
    """Count an IssueCoupon refusal of the kinds operators watch (sold out, too early, too
    late) in its own counter."""
    counter = _REFUSAL_COUNTERS.get(type(refusal))
    if counter is not None:
        metrics.count_one(counter)


class CouponServiceImpl(CouponService):
    def __init__(
        self,
        store: Store,
        limits: LimitsConfig,
        refusing: RefusingCampaigns,
        clock: Clock = system_clock,
    ) -> None:
        self._store = store
        self._limits = limits
        self._refusing = refusing  # the early path's, coupon.early_refusals
        self._clock = clock

    async def create_campaign(
        self,
        request: CreateCampaignRequest,
        ctx: RequestContext[CreateCampaignRequest, CreateCampaignResponse],
        /,
    ) -> CreateCampaignResponse:
        caller = current_caller()
        brand = request.brand
        if caller.brand is not None:
            # A brand's key creates campaigns of its own brand, and of no other.
            if brand and brand != caller.brand:
                raise PermissionDenied("this key may only create campaigns of its own brand")
            brand = caller.brand
        new = NewCampaign.validate(
            name=request.name,
            total=request.total,
            start_time=instant(request.start_time, "start_time"),
            end_time=instant(request.end_time, "end_time"),
            discount=discount_from_wire(request.discount),
            metadata=request.metadata,
            brand=brand,
            max_total=self._limits.max_total,
            now=self._clock(),
        )
        created = await self._store.create_campaign(new)
        log.info(
            "campaign created: id=%s total=%d start_time=%s brand=%s by=%s",
            created.id,
            created.total,
            created.start_time.isoformat(),
            created.brand or "-",
            caller.name,
        )
        return CreateCampaignResponse(campaign_id=created.id)

    async def issue_coupon(
        self,
        request: IssueCouponRequest,
        ctx: RequestContext[IssueCouponRequest, IssueCouponResponse],
        /,
    ) -> IssueCouponResponse:
        campaign_id, issue = issue_request_of(request, current_caller())
        try:
            coupon = await self._store.issue_coupon(campaign_id, issue)
        except (SoldOut, CampaignNotStarted, CampaignEnded) as refusal:
            count_issue_refusal(refusal)
            self._refusing.note(campaign_id)  # its next calls may be refused early
            raise
        if not coupon.repeat:
            metrics.count_one(metrics.COUPONS_ISSUED)
        reply = IssueCouponResponse(code=coupon.code, issued_at=timestamp(coupon.issued_at))
        # Only the fields a campaign has: each keyword costs the message's constructor a
        # field's conversion, on every issuance, even for None.
        if coupon.expires_at is not None:
            reply.expires_at = timestamp(coupon.expires_at)
        if coupon.discount is not None:
            reply.discount = discount_to_wire(coupon.discount)
        return reply

    async def get_campaign(
        self,
        request: GetCampaignRequest,
        ctx: RequestContext[GetCampaignRequest, GetCampaignResponse],
        /,
    ) -> GetCampaignResponse:
        campaign_id = parse_campaign_id(request.campaign_id)
        page_size = parse_page_size(request.page_size)
        after_seq = decode_page_token(request.page_token, campaign_id)
        page = await self._store.get_campaign(
            campaign_id, after_seq, page_size, brand=current_caller().brand
        )
        campaign = page.campaign
        fields: dict[str, Any] = {}
        if page.has_more:
            fields["next_page_token"] = encode_page_token(campaign_id, page.last_seq)
        return GetCampaignResponse(
            campaign_id=campaign.id,
            name=campaign.name,
            total=campaign.total,
            start_time=timestamp(campaign.start_time),
            issued_codes=page.codes,
            issued_count=campaign.issued,
            end_time=timestamp(campaign.end_time),
            discount=discount_to_wire(campaign.discount),
            metadata=dict(campaign.metadata),
            redeemed_count=campaign.redeemed,
            brand=campaign.brand,
            **fields,
        )

    async def list_campaigns(
        self,
        request: ListCampaignsRequest,
        ctx: RequestContext[ListCampaignsRequest, ListCampaignsResponse],
        /,
    ) -> ListCampaignsResponse:
        limit = parse_list_size(request.page_size)
        after = decode_list_token(request.page_token)
        listed = await self._store.list_campaigns(after, limit, brand=current_caller().brand)
        fields: dict[str, Any] = {}
        if listed.next is not None:
            fields["next_page_token"] = encode_list_token(listed.next)
        return ListCampaignsResponse(
            campaigns=[_summary(c) for c in listed.campaigns],
            **fields,
        )

    async def get_coupon(
        self,
        request: GetCouponRequest,
        ctx: RequestContext[GetCouponRequest, GetCouponResponse],
        /,
    ) -> GetCouponResponse:
        code = parse_code(request.code)
        coupon = await self._store.get_coupon(code, brand=current_caller().brand)
        return GetCouponResponse(
            code=coupon.code,
            campaign_id=coupon.campaign_id,
            user_id=coupon.user_id or "",
            issued_at=timestamp(coupon.issued_at),
            state=state_to_wire(coupon.state),
            redeemed_at=timestamp(coupon.redeemed_at),
            order_id=coupon.order_id or "",
            expires_at=timestamp(coupon.expires_at),
            discount=discount_to_wire(coupon.discount),
        )

    async def redeem_coupon(
        self,
        request: RedeemCouponRequest,
        ctx: RequestContext[RedeemCouponRequest, RedeemCouponResponse],
        /,
    ) -> RedeemCouponResponse:
        code = parse_code(request.code)
        order_id = parse_order_id(request.order_id)
        user_id = parse_user_id(request.user_id)
        redemption = await self._store.redeem_coupon(
            code, order_id, user_id, brand=current_caller().brand
        )
        return RedeemCouponResponse(
            code=redemption.code,
            campaign_id=redemption.campaign_id,
            order_id=redemption.order_id,
            redeemed_at=timestamp(redemption.redeemed_at),
            discount=discount_to_wire(redemption.discount),
        )

    async def cancel_redemption(
        self,
        request: CancelRedemptionRequest,
        ctx: RequestContext[CancelRedemptionRequest, CancelRedemptionResponse],
        /,
    ) -> CancelRedemptionResponse:
        code = parse_code(request.code)
        order_id = parse_order_id(request.order_id)
        coupon = await self._store.cancel_redemption(code, order_id, brand=current_caller().brand)
        return CancelRedemptionResponse(code=coupon.code, state=state_to_wire(coupon.state))


def _summary(campaign: Campaign) -> CampaignSummary:
    return CampaignSummary(
        campaign_id=campaign.id,
        name=campaign.name,
        total=campaign.total,
        issued_count=campaign.issued,
        redeemed_count=campaign.redeemed,
        start_time=timestamp(campaign.start_time),
        end_time=timestamp(campaign.end_time),
        discount=discount_to_wire(campaign.discount),
        brand=campaign.brand,
    )
