"""The ASGI seam between pyvoy 1.3.0 and connectrpc 0.13 for gRPC and gRPC-Web calls.

connectrpc serves those two protocols with its streaming machinery even for a unary method,
and that machinery meets three behaviours of pyvoy, two costly and one a bug, each handled
here, in the ASGI calls between the two libraries (neither is patched):

1. pyvoy's receive() and a response body sent with `more_body: True` return futures that
   Envoy's thread settles through `call_soon_threadsafe`, a cross-thread round trip each;
   a final body (`more_body: False`) returns at once. connectrpc writes a unary call's one
   message as a `more_body: True` body, then an empty final body and the trailers. So for a
   unary method the message is held and written with the final body: the same bytes, in one
   write, never earlier than connectrpc sent them (a Connect unary answer is written so too).
2. connectrpc reads a gRPC request inside its disconnect watch, so the read's suspension lets
   the watch start and arm a receive() that Envoy settles only when the stream ends: another
   round trip per call, and the cause of (3). Reading the request's first chunk before the
   call starts (a unary request is one chunk in practice) keeps the watch unarmed for a call
   that needs no await of its own; a handler that awaits (the PostgreSQL store) still has its
   watch, so a caller that leaves is still noticed. The read-ahead waits at most
   READ_AHEAD_S: a body that is slower than that is left to connectrpc as before, within the
   call's deadline, so a grpc-timeout is late by at most that much for a stalled body.
3. When connectrpc cancels its watch at the end of a call, pyvoy still sets the result of the
   receive() future it handed out, and the loop logs an InvalidStateError traceback. Awaiting
   pyvoy's future through a shield cancels only our wait; pyvoy's future stays pending until
   pyvoy settles it.

Streaming methods (none today) get only (3): their messages pass through unchanged.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from coupon.app import request_content_type

if TYPE_CHECKING:
    from collections.abc import Collection

    from protobuf import DescService
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

READ_AHEAD_S = 1.0


def adapt_streaming_protocols(app: ASGIApp, unary_paths: Collection[str]) -> ASGIApp:
    """Wrap `app` for pyvoy: gRPC and gRPC-Web calls get the receive and send described above;
    `unary_paths` are the request paths whose request and response are one message each."""
    unary = frozenset(unary_paths)

    async def adapted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_grpc(scope):
            await app(scope, receive, send)
            return
        if scope["path"] not in unary:
            await app(scope, _ShieldedReceive(receive), send)
            return
        call = _UnaryCall(receive, send)
        await call.read_ahead()
        await app(scope, call.receive, call.send)

    return adapted


def unary_paths(service: DescService) -> frozenset[str]:
    """The request paths of the service's unary methods (`/package.Service/Method`)."""
    return frozenset(
        f"/{service.type_name}/{method.name}"
        for method in service.methods
        if method.method_kind == "unary"
    )


def _is_grpc(scope: Scope) -> bool:
    """gRPC or gRPC-Web."""
    return request_content_type(scope).startswith(b"application/grpc")


class _ShieldedReceive:
    """pyvoy's receive(), its futures awaited through a shield (3)."""

    __slots__ = ("_pending", "_receive")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._pending: asyncio.Future[Message] | None = None

    async def __call__(self) -> Message:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        message = await asyncio.shield(self._pending)
        self._pending = None
        return message


class _UnaryCall(_ShieldedReceive):
    """One unary call: the request's first chunk read ahead (2), the answer in one write (1)."""

    __slots__ = ("_ahead", "_held", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        super().__init__(receive)
        self._send = send
        self._ahead: Message | None = None
        self._held: Message | None = None

    async def read_ahead(self) -> None:
        # A timer and a done-callback rather than asyncio.timeout and a shield: the same wait
        # at a fraction of the cost, and pyvoy's future is never cancelled.
        loop = asyncio.get_running_loop()
        pending = self._pending = asyncio.ensure_future(self._receive())
        arrived = loop.create_future()

        def wake(_: object = None) -> None:
            if not arrived.done():
                arrived.set_result(None)

        pending.add_done_callback(wake)
        timer = loop.call_later(READ_AHEAD_S, wake)
        try:
            await arrived
        finally:
            timer.cancel()
            pending.remove_done_callback(wake)
        # Slower than READ_AHEAD_S, or failed: connectrpc's first receive() awaits the same
        # future, within the call's deadline, and sees its error as before.
        if pending.done() and pending.exception() is None:
            self._ahead = pending.result()
            self._pending = None

    async def receive(self) -> Message:
        if self._ahead is not None:
            message, self._ahead = self._ahead, None
            return message
        return await self()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                if self._held is not None:  # a second message after all: stream them
                    await self._send(self._held)
                self._held = message
                return
            if self._held is not None:
                body = self._held.get("body", b"") + message.get("body", b"")
                message = {"type": "http.response.body", "body": body, "more_body": False}
                self._held = None
        await self._send(message)
