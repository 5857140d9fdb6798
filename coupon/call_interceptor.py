"""The one metadata interceptor every call goes through, before its body is read.

It gives the call its request id (coupon.request_ids), decides who calls and whether they may
(coupon.auth), and counts the answer with its latency (coupon.metrics): so a call refused
before its body was parsed (bad credential, bad JSON, an oversize body) still has an id and is
still counted. One interceptor rather than one per concern: connectrpc awaits each metadata
interceptor's start and end on every call, which on the hot path cost more than the work.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from connectrpc.errors import ConnectError

from coupon import auth, metrics, request_ids

if TYPE_CHECKING:
    import contextvars

    from connectrpc.request import RequestContext


# When the call began (time.perf_counter()) and the token that ends its request id. A tuple,
# not a dataclass: building one runs no __init__, and one is built on every call.
CallStarted = tuple[float, "contextvars.Token[str]"]


class CallInterceptor:
    def __init__(self, authenticator: auth.Authenticator) -> None:
        self._authenticator = authenticator

    async def on_start(self, ctx: RequestContext[Any, Any]) -> CallStarted:
        started = (time.perf_counter(), request_ids.begin(ctx))
        try:
            auth.identify(self._authenticator, ctx)
        except ConnectError as refusal:
            # connectrpc ends only interceptors whose start returned: end this call here.
            self._end(started, ctx, refusal)
            raise
        return started

    async def on_end(
        self, started: CallStarted, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        self._end(started, ctx, error)
        if isinstance(error, ConnectError):
            # connectrpc keeps the error in a local of the frame that caught it, a frame the
            # error's traceback holds: a reference cycle for every refused call (sold out, not
            # found, ...), about 40 objects that only the garbage collector reclaims; on a
            # sold-out storm that was most of its passes. Past this point the error is only
            # written to the wire (code, message, details), and a bug's traceback was logged
            # where it was turned into `internal` (ErrorInterceptor).
            error.__traceback__ = None

    @staticmethod
    def _end(started: CallStarted, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        at, request_id = started
        metrics.record_call(ctx.method.name, error, at)
        request_ids.end(request_id)
