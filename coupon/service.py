"""The Connect service: checks requests, calls the store, shapes replies.

Domain errors raised here or in the store are translated in coupon.rpc_errors.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from protobuf.wkt import Timestamp

from coupon import metrics
from coupon.campaigns import NewCampaign, parse_campaign_id, parse_page_size, parse_user_id
from coupon.errors import CampaignNotStarted, InvalidArgument, SoldOut
from coupon.gen.coupon_connect import CouponService
from coupon.gen.coupon_pb import (
    CreateCampaignRequest,
    CreateCampaignResponse,
    GetCampaignRequest,
    GetCampaignResponse,
    IssueCouponRequest,
    IssueCouponResponse,
)
from coupon.paging import decode_page_token, encode_page_token

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

    from coupon.config import LimitsConfig
    from coupon.store import Store


log = logging.getLogger("coupon.service")


class CouponServiceImpl(CouponService):
    def __init__(self, store: Store, limits: LimitsConfig) -> None:
        self._store = store
        self._limits = limits

    async def create_campaign(
        self,
        request: CreateCampaignRequest,
        ctx: RequestContext[CreateCampaignRequest, CreateCampaignResponse],
        /,
    ) -> CreateCampaignResponse:
        new = NewCampaign.validate(
            name=request.name,
            total=request.total,
            start_time=_start_time(request.start_time),
            max_total=self._limits.max_total,
        )
        created = await self._store.create_campaign(new)
        log.info(
            "campaign created: id=%s total=%d start_time=%s",
            created.id,
            created.total,
            created.start_time.isoformat(),
        )
        return CreateCampaignResponse(campaign_id=created.id)

    async def issue_coupon(
        self,
        request: IssueCouponRequest,
        ctx: RequestContext[IssueCouponRequest, IssueCouponResponse],
        /,
    ) -> IssueCouponResponse:
        campaign_id = parse_campaign_id(request.campaign_id)
        user_id = parse_user_id(request.user_id)
        try:
            coupon = await self._store.issue_coupon(campaign_id, user_id)
        except SoldOut:
            metrics.REFUSALS.labels("sold_out").inc()
            raise
        except CampaignNotStarted:
            metrics.REFUSALS.labels("not_started").inc()
            raise
        if not coupon.repeat:
            metrics.COUPONS_ISSUED.inc()
        return IssueCouponResponse(
            code=coupon.code, issued_at=Timestamp.from_datetime(coupon.issued_at)
        )

    async def get_campaign(
        self,
        request: GetCampaignRequest,
        ctx: RequestContext[GetCampaignRequest, GetCampaignResponse],
        /,
    ) -> GetCampaignResponse:
        campaign_id = parse_campaign_id(request.campaign_id)
        page_size = parse_page_size(request.page_size)
        after_seq = decode_page_token(request.page_token, campaign_id)
        page = await self._store.get_campaign(campaign_id, after_seq, page_size)
        campaign = page.campaign
        fields: dict[str, Any] = {}
        if page.has_more:
            fields["next_page_token"] = encode_page_token(campaign_id, page.last_seq)
        return GetCampaignResponse(
            campaign_id=campaign.id,
            name=campaign.name,
            total=campaign.total,
            start_time=Timestamp.from_datetime(campaign.start_time),
            issued_codes=page.codes,
            issued_count=campaign.issued,
            **fields,
        )


def _start_time(timestamp: Timestamp | None) -> datetime | None:
    if timestamp is None:
        return None
    try:
        return timestamp.to_datetime().astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument("start_time is out of range") from None
