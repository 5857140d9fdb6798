"""Read timeouts uvicorn lacks: a client must send a request's headers within
`header_timeout_s` of connecting (or of its previous answer) and its body within
`body_timeout_s` of the headers, or the connection is closed.

Without them an idle or one-byte-a-second client holds a connection (a file descriptor)
forever, and a body that trickles in holds a call open. uvicorn's own limits still apply:
`limit_concurrency` (server.max_connections) answers 503 past the cap, and
`timeout_keep_alive` closes an idle kept-alive connection.

The same protocol answers each request in one socket write (coupon.http_writes).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from coupon import metrics
from coupon.http_writes import OneWritePerAnswer

if TYPE_CHECKING:
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

log = logging.getLogger("coupon.server")

# At shutdown, how long a connection accepted but not yet carrying a request may still send it.
SHUTDOWN_FIRST_REQUEST_S = 1.0


# How often the deadlines are checked, at most: a slow client is closed between its timeout and
# that much later. One timer per server rather than one per request: arming and cancelling a
# timer around every request cost more CPU than the rest of this module's work per call.
MAX_SWEEP_INTERVAL_S = 0.25

_sweepers: weakref.WeakKeyDictionary[ServerState, _DeadlineSweeper] = weakref.WeakKeyDictionary()


class _DeadlineSweeper:
    """Closes the server's connections whose headers or body are overdue, a few times a
    second, while it has any connection to watch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server_state: ServerState) -> None:
        self._loop = loop
        self._connections = server_state.connections
        self._interval_s = MAX_SWEEP_INTERVAL_S
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, interval_s: float) -> None:
        self._interval_s = min(self._interval_s, interval_s)
        if self._timer is None:
            self._timer = self._loop.call_later(self._interval_s, self._sweep)

    def _sweep(self) -> None:
        now = self._loop.time()
        watched = False
        for connection in list(self._connections):
            if isinstance(connection, LimitedHttpToolsProtocol):
                watched = connection.close_if_overdue(now) or watched
        self._timer = self._loop.call_later(self._interval_s, self._sweep) if watched else None


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float,
        body_timeout_s: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        # When the awaited headers or body are overdue (loop time), and which of the two.
        self._deadline: float | None = None
        self._phase = "header"
        self._served_any = False
        self._stopping = False
        sweeper = _sweepers.get(server_state)
        if sweeper is None:
            sweeper = _sweepers[server_state] = _DeadlineSweeper(self.loop, server_state)
        self._sweeper = sweeper

    def _expect(self, phase: str, within_s: float) -> None:
        self._phase = phase
        self._deadline = self.loop.time() + within_s

    def close_if_overdue(self, now: float) -> bool:
        """Close this connection if what it owes is overdue; whether it is still watched."""
        if self._deadline is None:
            return not self.transport.is_closing()
        if now < self._deadline:
            return True
        self._deadline = None
        if not self.transport.is_closing():
            metrics.HTTP_READ_TIMEOUTS.labels(self._phase).inc()
            self.transport.close()
        return False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect("header", self._header_timeout_s)
        self._sweeper.watch(min(self._header_timeout_s, self._body_timeout_s) / 4)

    # The per-request callbacks below call HttpToolsProtocol's by name rather than through
    # super(), which builds a proxy object on every call, and set their deadline without
    # _expect's extra call: they run three times per request.

    def on_headers_complete(self) -> None:
        self._served_any = True
        self._phase = "body"
        self._deadline = self.loop.time() + self._body_timeout_s
        HttpToolsProtocol.on_headers_complete(self)
        if self.cycle is not None:
            self.cycle.transport = OneWritePerAnswer(self.transport)
            if self._stopping:
                self.cycle.keep_alive = False  # answer it, then close

    def shutdown(self) -> None:
        """A graceful stop. uvicorn closes every connection without a request in progress at
        once, including one accepted a moment ago whose first request is on its way: that
        client saw its connection accepted, then dropped unanswered. Such a connection gets
        a short grace to send its request, which is answered with `Connection: close`."""
        self._stopping = True
        if self._served_any or self.transport.is_closing():
            super().shutdown()
            return
        if self.parser is not None and self.cycle is None:
            self._expect("header", min(SHUTDOWN_FIRST_REQUEST_S, self._header_timeout_s))

    def on_message_complete(self) -> None:
        self._deadline = None
        HttpToolsProtocol.on_message_complete(self)

    def on_response_complete(self) -> None:
        HttpToolsProtocol.on_response_complete(self)
        # The next request's headers are due within the same bound (a kept-alive connection
        # that trickles them would otherwise escape the keep-alive timeout).
        if not self.transport.is_closing():
            self._phase = "header"
            self._deadline = self.loop.time() + self._header_timeout_s


def limited_protocol(header_timeout_s: float, body_timeout_s: float) -> Any:
    """The protocol factory for uvicorn's `http` option (picklable, for worker processes)."""
    return functools.partial(
        LimitedHttpToolsProtocol,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
    )
