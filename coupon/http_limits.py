"""Read timeouts uvicorn lacks: a client must send a request's headers within
`header_timeout_s` of connecting (or of its previous answer) and its body within
`body_timeout_s` of the headers, or the connection is closed (at most two sweep intervals,
MAX_SWEEP_INTERVAL_S, past its timeout).

Without them an idle or one-byte-a-second client holds a connection (a file descriptor)
forever, and a body that trickles in holds a call open. uvicorn's own limits still apply:
`limit_concurrency` (server.max_connections) answers 503 past the cap, and
`timeout_keep_alive` closes an idle kept-alive connection.

The same protocol answers each request in one socket write (coupon.http_writes).
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from coupon import metrics
from coupon.http_writes import OneWritePerAnswer

if TYPE_CHECKING:
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

# At shutdown, how long a connection accepted but not yet carrying a request may still send it.
SHUTDOWN_FIRST_REQUEST_S = 1.0


# How often the deadlines are checked, at most. A deadline starts when a connection opens, or
# when a sweep first sees the connection waiting (for a request's headers, or for its body), so
# a slow client is closed between its timeout and two intervals later. The sweeps alone track
# the deadlines: setting one on every request, in uvicorn's per-request callbacks, cost more CPU
# per call than the rest of this module's work.
MAX_SWEEP_INTERVAL_S = 0.25

_HEADERS = "header"  # the phases, as the read-timeout metric names them
_BODY = "body"

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
        # What the connection was last seen waiting for: the phase, in which request (uvicorn's
        # cycle object, None before the first), and until when (loop time). None: not waiting.
        self._waiting: tuple[str, object, float] | None = None
        self._stopping = False
        sweeper = _sweepers.get(server_state)
        if sweeper is None:
            sweeper = _sweepers[server_state] = _DeadlineSweeper(self.loop, server_state)
        self._sweeper = sweeper

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting = (_HEADERS, None, self.loop.time() + self._header_timeout_s)
        self._sweeper.watch(min(self._header_timeout_s, self._body_timeout_s) / 4)

    def _awaited(self) -> tuple[str, object] | None:
        """What the connection waits for now, and in which request: the headers of its first
        request or of the one after an answer; the body of a request whose headers came; or
        nothing while a request is being answered."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return _HEADERS, cycle
        if cycle.more_body:
            return _BODY, cycle
        return None

    def close_if_overdue(self, now: float) -> bool:
        """Close this connection if what it owes is overdue; whether it is still watched."""
        if self.transport.is_closing():
            return False
        awaited = self._awaited()
        waiting = self._waiting
        if awaited is None:
            self._waiting = None
            return True
        phase, request = awaited
        if waiting is None or waiting[0] != phase or waiting[1] is not request:
            within_s = self._header_timeout_s if phase == _HEADERS else self._body_timeout_s
            self._waiting = (phase, request, now + within_s)
            return True
        if now < waiting[2]:
            return True
        self._waiting = None
        metrics.HTTP_READ_TIMEOUTS.labels(phase).inc()
        self.transport.close()
        return False

    def on_headers_complete(self) -> None:
        # HttpToolsProtocol's by name rather than through super(), which builds a proxy object
        # on every call: this runs on every request.
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
        if self.cycle is not None or self.transport.is_closing():  # it has had a request
            super().shutdown()
            return
        if self.parser is not None:
            grace_s = min(SHUTDOWN_FIRST_REQUEST_S, self._header_timeout_s)
            self._waiting = (_HEADERS, None, self.loop.time() + grace_s)


def limited_protocol(header_timeout_s: float, body_timeout_s: float) -> Any:
    """The protocol factory for uvicorn's `http` option (picklable, for worker processes)."""
    return functools.partial(
        LimitedHttpToolsProtocol,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
    )
