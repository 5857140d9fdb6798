"""The generated Connect client, speaking binary protobuf, against a real server."""

from __future__ import annotations

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from protobuf import Oneof
from protobuf.wkt import Timestamp

from coupon.codes import is_code
from coupon.gen.coupon_connect import CouponServiceClient
from coupon.gen.coupon_pb import (
    CancelRedemptionRequest,
    CouponState,
    CreateCampaignRequest,
    Discount,
    GetCampaignRequest,
    GetCouponRequest,
    IssueCouponRequest,
    RedeemCouponRequest,
)
from coupon.gen.google.rpc.error_details_pb import ErrorInfo


def reason_of(error: ConnectError) -> tuple[str, str]:
    """(domain, reason) of the error's google.rpc.ErrorInfo detail, as a client reads it."""
    (detail,) = error.details
    info = detail.value(ErrorInfo)
    assert isinstance(info, ErrorInfo)
    return info.domain, info.reason


async def test_the_main_calls_through_the_generated_client(server: str) -> None:
    async with CouponServiceClient(server) as client:
        created = await client.create_campaign(
            CreateCampaignRequest(name="Proto", total=2, start_time=Timestamp(seconds=0))
        )
        codes = []
        for user in ("a", "b"):
            reply = await client.issue_coupon(
                IssueCouponRequest(campaign_id=created.campaign_id, user_id=user)
            )
            assert is_code(reply.code)
            assert reply.issued_at is not None
            codes.append(reply.code)
        with pytest.raises(ConnectError) as sold_out:
            await client.issue_coupon(IssueCouponRequest(campaign_id=created.campaign_id))
        assert sold_out.value.code == Code.RESOURCE_EXHAUSTED

        page = await client.get_campaign(
            GetCampaignRequest(campaign_id=created.campaign_id, page_size=1)
        )
        assert page.name == "Proto"
        assert page.total == 2
        assert page.issued_count == 2
        assert list(page.issued_codes) == codes[:1]
        rest = await client.get_campaign(
            GetCampaignRequest(campaign_id=created.campaign_id, page_token=page.next_page_token)
        )
        assert list(rest.issued_codes) == codes[1:]
        assert rest.next_page_token == ""


async def test_errors_reach_the_generated_client_as_connect_codes(server: str) -> None:
    async with CouponServiceClient(server) as client:
        with pytest.raises(ConnectError) as not_found:
            await client.get_campaign(
                GetCampaignRequest(campaign_id="00000000-0000-4000-8000-000000000000")
            )
        assert not_found.value.code == Code.NOT_FOUND
        with pytest.raises(ConnectError) as invalid:
            await client.create_campaign(CreateCampaignRequest(name="x", total=0))
        assert invalid.value.code == Code.INVALID_ARGUMENT


async def test_grpc_web_clients_work(server: str) -> None:
    async with CouponServiceClient(server, protocol=ProtocolType.GRPC_WEB) as client:
        created = await client.create_campaign(CreateCampaignRequest(name="web", total=1))
        reply = await client.issue_coupon(IssueCouponRequest(campaign_id=created.campaign_id))
        assert is_code(reply.code)
        with pytest.raises(ConnectError) as sold_out:
            await client.issue_coupon(IssueCouponRequest(campaign_id=created.campaign_id))
        assert sold_out.value.code == Code.RESOURCE_EXHAUSTED


async def test_refusals_carry_their_reason_to_the_generated_client(server: str) -> None:
    async with CouponServiceClient(server) as client:
        created = await client.create_campaign(
            CreateCampaignRequest(
                name="life", total=1, discount=Discount(kind=Oneof("percent_off", 25))
            )
        )
        issued = await client.issue_coupon(
            IssueCouponRequest(campaign_id=created.campaign_id, idempotency_key="k1")
        )
        assert issued.discount is not None
        assert issued.discount.kind == Oneof("percent_off", 25)
        redeemed = await client.redeem_coupon(RedeemCouponRequest(code=issued.code, order_id="o1"))
        assert (redeemed.order_id, redeemed.campaign_id) == ("o1", created.campaign_id)
        coupon = await client.get_coupon(GetCouponRequest(code=issued.code))
        assert coupon.state == CouponState.REDEEMED

        refusals = {
            "SOLD_OUT": client.issue_coupon(IssueCouponRequest(campaign_id=created.campaign_id)),
            "IDEMPOTENCY_KEY_REUSED": client.issue_coupon(
                IssueCouponRequest(
                    campaign_id=created.campaign_id, idempotency_key="k1", user_id="u"
                )
            ),
            "ALREADY_REDEEMED": client.redeem_coupon(
                RedeemCouponRequest(code=issued.code, order_id="o2")
            ),
            "NOT_HOLDER": client.cancel_redemption(
                CancelRedemptionRequest(code=issued.code, order_id="o2")
            ),
            "COUPON_NOT_FOUND": client.get_coupon(GetCouponRequest(code="가나다라마바사아자1")),
            "CAMPAIGN_NOT_FOUND": client.get_campaign(
                GetCampaignRequest(campaign_id="00000000-0000-4000-8000-000000000000")
            ),
        }
        for expected, pending in refusals.items():
            with pytest.raises(ConnectError) as refused:
                await pending
            assert reason_of(refused.value) == ("coupon", expected)
