"""coupon.pyvoy_asgi, the ASGI seam between pyvoy and connectrpc, against a pyvoy stand-in.

The stand-in behaves as pyvoy 1.3.0 does where it matters: receive() hands out a loop future
that is settled later from outside the call (Envoy's thread, there), and the app's sends are
recorded in order. Native gRPC against the real pyvoy is tests/test_grpc.py.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

import pytest

from coupon import pyvoy_asgi
from coupon.app import create_app
from coupon.config import Config
from coupon.gen.coupon_connect import CouponService
from coupon.gen.coupon_pb import (
    CreateCampaignRequest,
    CreateCampaignResponse,
    IssueCouponRequest,
    IssueCouponResponse,
)
from coupon.pyvoy_asgi import adapt_streaming_protocols, unary_paths
from coupon.store.memory import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

SERVICE = "/coupon.CouponService"
ISSUE = f"{SERVICE}/IssueCoupon"
STREAMING = f"{SERVICE}/WatchSomething"  # a path the adapter is not told is unary


class Pyvoy:
    """A request body in one chunk, served the way pyvoy serves it; what the app sends."""

    def __init__(self, body: bytes, *, arrive: bool = True) -> None:
        self.chunks: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        self.arrive = arrive
        self.futures: list[asyncio.Future[Message]] = []
        self.sent: list[Message] = []
        self.asked = asyncio.Event()

    def receive(self) -> asyncio.Future[Message]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        self.futures.append(future)
        self.asked.set()
        # The body is settled from outside the call; after it, only a disconnect would come.
        if self.chunks and self.arrive:
            loop.call_soon(future.set_result, self.chunks.pop(0))
        return future

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def grpc_scope(path: str, content_type: bytes = b"application/grpc") -> Scope:
    return {
        "type": "http",
        "path": path,
        "root_path": "",
        "method": "POST",
        "scheme": "http",
        "query_string": b"",
        "headers": [(b"content-type", content_type), (b"te", b"trailers")],
        "extensions": {"http.response.trailers": {}},
    }


def envelope(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def adapted_service() -> ASGIApp:
    app = create_app(Config(), MemoryStore())
    return adapt_streaming_protocols(app, unary_paths(CouponService.desc()))


async def call(app: ASGIApp, path: str, pyvoy: Pyvoy, content_type: bytes) -> list[Message]:
    await app(grpc_scope(path, content_type), cast("Receive", pyvoy.receive), pyvoy.send)
    return pyvoy.sent


async def create_campaign(app: ASGIApp) -> str:
    request = CreateCampaignRequest(name="seam", total=10).to_binary()
    sent = await call(
        app, f"{SERVICE}/CreateCampaign", Pyvoy(envelope(request)), b"application/grpc"
    )
    return CreateCampaignResponse.from_binary(sent[1]["body"][5:]).campaign_id


async def test_a_unary_grpc_answer_is_one_final_body_then_the_trailers() -> None:
    app = adapted_service()
    campaign_id = await create_campaign(app)
    pyvoy = Pyvoy(envelope(IssueCouponRequest(campaign_id=campaign_id).to_binary()))

    sent = await call(app, ISSUE, pyvoy, b"application/grpc")

    assert [m["type"] for m in sent] == [
        "http.response.start",
        "http.response.body",
        "http.response.trailers",
    ]
    assert sent[0]["trailers"] is True
    body = sent[1]
    assert body["more_body"] is False  # pyvoy answers a final body at once, with no future
    assert body["body"][:1] == b"\x00"
    assert int.from_bytes(body["body"][1:5], "big") == len(body["body"]) - 5
    assert len(IssueCouponResponse.from_binary(body["body"][5:]).code) == 10
    assert sent[2]["headers"] == [(b"grpc-status", b"0")]
    # Only the body was asked for: no receive() armed for a disconnect that Envoy would
    # settle, cross-thread, at the end of the stream.
    assert len(pyvoy.futures) == 1


async def test_a_grpc_web_answer_carries_its_end_message_in_the_same_body() -> None:
    app = adapted_service()
    campaign_id = await create_campaign(app)
    pyvoy = Pyvoy(envelope(IssueCouponRequest(campaign_id=campaign_id).to_binary()))

    sent = await call(app, ISSUE, pyvoy, b"application/grpc-web+proto")

    assert [(m["type"], m.get("more_body")) for m in sent] == [
        ("http.response.start", None),
        ("http.response.body", False),
    ]
    body = sent[1]["body"]
    length = int.from_bytes(body[1:5], "big")
    assert len(IssueCouponResponse.from_binary(body[5 : 5 + length]).code) == 10
    end = body[5 + length :]
    assert end[:1] == b"\x80"  # the gRPC-Web trailers frame follows the message
    assert b"grpc-status: 0" in end


async def test_a_refusal_ends_with_an_empty_final_body_and_the_status_in_trailers() -> None:
    app = adapted_service()
    missing = IssueCouponRequest(campaign_id="00000000-0000-4000-8000-000000000000")

    sent = await call(app, ISSUE, Pyvoy(envelope(missing.to_binary())), b"application/grpc")

    assert [m["type"] for m in sent] == [
        "http.response.start",
        "http.response.body",
        "http.response.trailers",
    ]
    assert sent[1] == {"type": "http.response.body", "body": b"", "more_body": False}
    trailers = dict(sent[2]["headers"])
    assert trailers[b"grpc-status"] == b"5"  # NOT_FOUND
    assert b"grpc-status-details-bin" in trailers  # the ErrorInfo reason


def recording_app(
    steps: Callable[[Receive, Send], Awaitable[None]],
) -> tuple[ASGIApp, list[Any]]:
    """An app that runs `steps`; returns it and the (receive, send) it was given."""
    given: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        given.extend([receive, send])
        await steps(receive, send)

    return app, given


async def send_messages(receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
    await send({"type": "http.response.body", "body": b"one", "more_body": True})
    await send({"type": "http.response.body", "body": b"two", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})


async def test_a_streaming_path_sends_every_message_as_the_app_does() -> None:
    app, _ = recording_app(send_messages)
    pyvoy = Pyvoy(b"request")

    sent = await call(
        adapt_streaming_protocols(app, {ISSUE}), STREAMING, pyvoy, b"application/grpc"
    )

    assert [m.get("body") for m in sent] == [None, b"one", b"two", b"", None]
    assert [m.get("more_body") for m in sent] == [None, True, True, False, None]


async def test_a_unary_path_that_sends_two_messages_loses_and_reorders_nothing() -> None:
    app, _ = recording_app(send_messages)

    sent = await call(
        adapt_streaming_protocols(app, {ISSUE}), ISSUE, Pyvoy(b"request"), b"application/grpc"
    )

    bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
    assert bodies == [(b"one", True), (b"two", False)]
    assert sent[-1]["type"] == "http.response.trailers"


async def test_connect_calls_get_pyvoys_own_receive_and_send() -> None:
    app, given = recording_app(send_messages)
    pyvoy = Pyvoy(b"request")

    await call(adapt_streaming_protocols(app, {ISSUE}), ISSUE, pyvoy, b"application/proto")

    assert given == [pyvoy.receive, pyvoy.send]


async def test_a_body_slower_than_the_read_ahead_is_left_to_the_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pyvoy_asgi, "READ_AHEAD_S", 0)  # gives up on the next loop turn
    entered = asyncio.Event()
    received: list[Message] = []

    async def steps(receive: Receive, send: Send) -> None:
        entered.set()
        received.append(await receive())

    app, _ = recording_app(steps)
    pyvoy = Pyvoy(b"late", arrive=False)
    running = asyncio.create_task(
        call(adapt_streaming_protocols(app, {ISSUE}), ISSUE, pyvoy, b"application/grpc")
    )
    await entered.wait()
    assert not received
    pyvoy.futures[0].set_result({"type": "http.request", "body": b"late", "more_body": False})
    await running

    assert received == [{"type": "http.request", "body": b"late", "more_body": False}]
    assert len(pyvoy.futures) == 1  # the app awaited the read-ahead's future, not a new one


async def test_a_receive_that_fails_fails_in_the_app_not_before_it() -> None:
    failures: list[BaseException] = []

    async def steps(receive: Receive, send: Send) -> None:
        try:
            await receive()
        except RuntimeError as e:
            failures.append(e)

    app, _ = recording_app(steps)
    pyvoy = Pyvoy(b"", arrive=False)
    adapted = adapt_streaming_protocols(app, {ISSUE})
    running = asyncio.create_task(call(adapted, ISSUE, pyvoy, b"application/grpc"))
    await pyvoy.asked.wait()  # the read-ahead has asked
    pyvoy.futures[0].set_exception(RuntimeError("stream reset"))
    await running

    assert [str(e) for e in failures] == ["stream reset"]


async def test_an_app_that_stops_waiting_leaves_pyvoys_future_uncancelled() -> None:
    """pyvoy sets the result of its future whatever happened to the waiter; a cancelled one
    logged an InvalidStateError traceback per call."""

    async def steps(receive: Receive, send: Send) -> None:
        await receive()  # the body
        watch = asyncio.ensure_future(receive())  # connectrpc's disconnect watch
        await asyncio.sleep(0)
        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch

    app, _ = recording_app(steps)
    pyvoy = Pyvoy(b"request")

    await call(adapt_streaming_protocols(app, {ISSUE}), ISSUE, pyvoy, b"application/grpc")

    assert len(pyvoy.futures) == 2
    assert not pyvoy.futures[1].cancelled()
    pyvoy.futures[1].set_result({"type": "http.disconnect"})  # would raise if cancelled


def test_every_method_of_the_service_is_a_unary_path() -> None:
    names = [method.name for method in CouponService.desc().methods]
    assert unary_paths(CouponService.desc()) == {f"{SERVICE}/{name}" for name in names}
    assert f"{SERVICE}/IssueCoupon" in unary_paths(CouponService.desc())
