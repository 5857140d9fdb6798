"""Native gRPC (grpcio over h2c) against a real server (server.engine: pyvoy), on both stores.

Every method, and every refusal as a gRPC client sees it: the status code, and the
google.rpc.ErrorInfo detail from the `grpc-status-details-bin` trailer, decoded as
google.rpc.Status the way grpcio-status does for any gRPC client.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.grpc_stubs import GrpcStubs, generate
from tests.server_process import ServerProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.postgres import TestDatabases

TIMEOUT_S = 10  # per call: a hang guard, not a speed check


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> GrpcStubs:
    return generate(tmp_path_factory.mktemp("grpc-stubs"))


@dataclass
class GrpcServer:
    process: ServerProcess
    channel: grpc.Channel
    stub: Any  # coupon_pb2_grpc.CouponServiceStub


@pytest.fixture(scope="module", params=["memory", "postgres"])
def grpc_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, stubs: GrpcStubs
) -> Iterator[GrpcServer]:
    dsn = None
    databases: TestDatabases | None = None
    if request.param == "postgres":
        databases = request.getfixturevalue("pg_databases")
        dsn = databases.create()
    tmp = tmp_path_factory.mktemp(f"grpc-{request.param}")
    try:
        with ServerProcess(tmp, dsn, workers=1, engine="pyvoy") as process:
            process.wait_for("/readyz", 200)
            with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
                yield GrpcServer(process, channel, stubs.grpc.CouponServiceStub(channel))
    finally:
        if databases is not None and dsn is not None:
            databases.drop(dsn)


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def error_info(error: grpc.RpcError) -> tuple[str, str] | None:
    """(reason, domain) of the ErrorInfo in grpc-status-details-bin, or None without one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append((info.reason, info.domain))
    assert len(infos) == 1, status
    return infos[0]


def create(server: GrpcServer, stubs: GrpcStubs, **fields: Any) -> str:
    fields.setdefault("name", "gRPC sale")
    fields.setdefault("total", 10)
    answer = server.stub.CreateCampaign(stubs.pb.CreateCampaignRequest(**fields), timeout=TIMEOUT_S)
    assert answer.campaign_id
    return str(answer.campaign_id)


def issue(server: GrpcServer, stubs: GrpcStubs, campaign_id: str, **fields: Any) -> Any:
    return server.stub.IssueCoupon(
        stubs.pb.IssueCouponRequest(campaign_id=campaign_id, **fields), timeout=TIMEOUT_S
    )


def test_create_issue_and_page_through_a_campaign(grpc_server: GrpcServer, stubs: GrpcStubs):
    pb = stubs.pb
    campaign_id = create(grpc_server, stubs, name="Spring", total=3)
    first, call = grpc_server.stub.IssueCoupon.with_call(
        pb.IssueCouponRequest(campaign_id=campaign_id, user_id="alice"), timeout=TIMEOUT_S
    )
    again = issue(grpc_server, stubs, campaign_id, user_id="alice")
    second = issue(grpc_server, stubs, campaign_id)
    assert again.code == first.code != second.code
    assert len(first.code) == 10
    assert first.issued_at.seconds > 0
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.initial_metadata())["x-request-id"]

    page = grpc_server.stub.GetCampaign(
        pb.GetCampaignRequest(campaign_id=campaign_id, page_size=1), timeout=TIMEOUT_S
    )
    assert (page.name, page.total, page.issued_count) == ("Spring", 3, 2)
    assert list(page.issued_codes) == [first.code]
    last = grpc_server.stub.GetCampaign(
        pb.GetCampaignRequest(
            campaign_id=campaign_id, page_size=1, page_token=page.next_page_token
        ),
        timeout=TIMEOUT_S,
    )
    assert list(last.issued_codes) == [second.code]
    assert last.next_page_token == ""


def test_the_life_of_a_coupon(grpc_server: GrpcServer, stubs: GrpcStubs):
    pb = stubs.pb
    ends = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    campaign_id = create(
        grpc_server,
        stubs,
        name="Autumn",
        total=5,
        end_time=ts(ends),
        discount=pb.Discount(percent_off=15),
        metadata={"tier": "gold"},
    )
    issued = issue(grpc_server, stubs, campaign_id, user_id="bob", idempotency_key="try-1")
    retried = issue(grpc_server, stubs, campaign_id, user_id="bob", idempotency_key="try-1")
    assert retried.code == issued.code
    assert issued.expires_at.ToDatetime(tzinfo=UTC) == ends
    assert issued.discount.percent_off == 15
    code = issued.code

    coupon = grpc_server.stub.GetCoupon(pb.GetCouponRequest(code=code), timeout=TIMEOUT_S)
    assert (coupon.campaign_id, coupon.user_id) == (campaign_id, "bob")
    assert coupon.state == pb.COUPON_STATE_ISSUED

    redeem = pb.RedeemCouponRequest(code=code, order_id="order-1", user_id="bob")
    redeemed = grpc_server.stub.RedeemCoupon(redeem, timeout=TIMEOUT_S)
    assert (redeemed.code, redeemed.campaign_id, redeemed.order_id) == (
        code,
        campaign_id,
        "order-1",
    )
    assert redeemed.discount.percent_off == 15
    assert grpc_server.stub.RedeemCoupon(redeem, timeout=TIMEOUT_S) == redeemed  # same answer
    coupon = grpc_server.stub.GetCoupon(pb.GetCouponRequest(code=code), timeout=TIMEOUT_S)
    assert (coupon.state, coupon.order_id) == (pb.COUPON_STATE_REDEEMED, "order-1")

    cancel = pb.CancelRedemptionRequest(code=code, order_id="order-1")
    assert grpc_server.stub.CancelRedemption(cancel, timeout=TIMEOUT_S).state == (
        pb.COUPON_STATE_ISSUED
    )
    assert grpc_server.stub.CancelRedemption(cancel, timeout=TIMEOUT_S).state == (
        pb.COUPON_STATE_ISSUED
    )  # again: a no-op that succeeds

    campaign = grpc_server.stub.GetCampaign(
        pb.GetCampaignRequest(campaign_id=campaign_id), timeout=TIMEOUT_S
    )
    assert (campaign.issued_count, campaign.redeemed_count) == (1, 0)
    assert dict(campaign.metadata) == {"tier": "gold"}
    listed = grpc_server.stub.ListCampaigns(
        pb.ListCampaignsRequest(page_size=1000), timeout=TIMEOUT_S
    )
    summaries = {c.campaign_id: c for c in listed.campaigns}
    assert summaries[campaign_id].name == "Autumn"
    assert summaries[campaign_id].issued_count == 1


# -- refusals: (status code, ErrorInfo reason or None) -------------------------------------

Refusal = Callable[[GrpcServer, GrpcStubs], object]
NOW = datetime.now(UTC)
A_CODE = "가나다라마바사아자0"  # well-formed, never issued


def _invalid_total(s: GrpcServer, p: GrpcStubs) -> object:
    return create(s, p, total=0)


def _unknown_campaign(s: GrpcServer, p: GrpcStubs) -> object:
    return issue(s, p, str(uuid.uuid4()))


def _not_started(s: GrpcServer, p: GrpcStubs) -> object:
    return issue(s, p, create(s, p, start_time=ts(NOW + timedelta(days=30))))


def _sold_out(s: GrpcServer, p: GrpcStubs) -> object:
    campaign_id = create(s, p, total=1)
    issue(s, p, campaign_id)
    return issue(s, p, campaign_id)


def _malformed_protobuf(s: GrpcServer, p: GrpcStubs) -> object:
    raw = s.channel.unary_unary("/coupon.CouponService/CreateCampaign")
    return raw(b"\xff\xff\xff", timeout=TIMEOUT_S)  # a field header with no field


def _ended(s: GrpcServer, p: GrpcStubs) -> object:
    window = {"start_time": ts(NOW - timedelta(hours=2)), "end_time": ts(NOW - timedelta(hours=1))}
    return issue(s, p, create(s, p, **window))


def _unknown_code(s: GrpcServer, p: GrpcStubs) -> object:
    return s.stub.GetCoupon(p.pb.GetCouponRequest(code=A_CODE), timeout=TIMEOUT_S)


def _key_reused(s: GrpcServer, p: GrpcStubs) -> object:
    campaign_id = create(s, p)
    issue(s, p, campaign_id, user_id="ann", idempotency_key="k-1")
    return issue(s, p, campaign_id, user_id="ben", idempotency_key="k-1")


def _redeemed_code(s: GrpcServer, p: GrpcStubs, user_id: str = "") -> str:
    code = str(issue(s, p, create(s, p), user_id=user_id).code)
    s.stub.RedeemCoupon(
        p.pb.RedeemCouponRequest(code=code, order_id="order-1", user_id=user_id),
        timeout=TIMEOUT_S,
    )
    return code


def _already_redeemed(s: GrpcServer, p: GrpcStubs) -> object:
    code = _redeemed_code(s, p)
    request = p.pb.RedeemCouponRequest(code=code, order_id="order-2")
    return s.stub.RedeemCoupon(request, timeout=TIMEOUT_S)


def _not_holder(s: GrpcServer, p: GrpcStubs) -> object:
    code = _redeemed_code(s, p)
    request = p.pb.CancelRedemptionRequest(code=code, order_id="order-2")
    return s.stub.CancelRedemption(request, timeout=TIMEOUT_S)


def _user_mismatch(s: GrpcServer, p: GrpcStubs) -> object:
    code = issue(s, p, create(s, p), user_id="carol").code
    request = p.pb.RedeemCouponRequest(code=code, order_id="order-1", user_id="dave")
    return s.stub.RedeemCoupon(request, timeout=TIMEOUT_S)


REFUSALS: list[tuple[Refusal, grpc.StatusCode, str | None]] = [
    (_invalid_total, grpc.StatusCode.INVALID_ARGUMENT, None),
    (_malformed_protobuf, grpc.StatusCode.INVALID_ARGUMENT, None),
    (_unknown_campaign, grpc.StatusCode.NOT_FOUND, "CAMPAIGN_NOT_FOUND"),
    (_not_started, grpc.StatusCode.FAILED_PRECONDITION, "NOT_STARTED"),
    (_sold_out, grpc.StatusCode.RESOURCE_EXHAUSTED, "SOLD_OUT"),
    (_ended, grpc.StatusCode.FAILED_PRECONDITION, "ENDED"),
    (_unknown_code, grpc.StatusCode.NOT_FOUND, "COUPON_NOT_FOUND"),
    (_key_reused, grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"),
    (_already_redeemed, grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_REDEEMED"),
    (_not_holder, grpc.StatusCode.FAILED_PRECONDITION, "NOT_HOLDER"),
    (_user_mismatch, grpc.StatusCode.FAILED_PRECONDITION, "USER_MISMATCH"),
]


@pytest.mark.parametrize(
    ("make", "code", "reason"), REFUSALS, ids=[make.__name__.strip("_") for make, _, _ in REFUSALS]
)
def test_refusals_carry_the_status_code_and_the_error_info_reason(
    grpc_server: GrpcServer,
    stubs: GrpcStubs,
    make: Refusal,
    code: grpc.StatusCode,
    reason: str | None,
):
    error = refusal(lambda: make(grpc_server, stubs))
    assert error.code() == code, error  # type: ignore[attr-defined]
    assert error.details(), "a human-readable message"  # type: ignore[attr-defined]
    expected = None if reason is None else (reason, "coupon")
    assert error_info(error) == expected


def test_an_unknown_method_is_unimplemented(grpc_server: GrpcServer):
    raw = grpc_server.channel.unary_unary("/coupon.CouponService/DeleteEverything")
    error = refusal(lambda: raw(b"", timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_the_server_logged_no_traceback(grpc_server: GrpcServer):
    """Runs after the calls above (same module-scoped server): none of them left a traceback
    (pyvoy's cancelled receive() futures did, once per call, before coupon.pyvoy_app)."""
    log = grpc_server.process.log()
    assert "Traceback" not in log, log
    assert "InvalidStateError" not in log, log
