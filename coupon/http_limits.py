"""Read timeouts uvicorn lacks: a client must send a request's headers within
`header_timeout_s` of connecting (or of its previous answer) and its body within
`body_timeout_s` of the headers, or the connection is closed.

Without them an idle or one-byte-a-second client holds a connection (a file descriptor)
forever, and a body that trickles in holds a call open. uvicorn's own limits still apply:
`limit_concurrency` (server.max_connections) answers 503 past the cap, and
`timeout_keep_alive` closes an idle kept-alive connection.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from coupon import metrics

if TYPE_CHECKING:
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

log = logging.getLogger("coupon.server")

# At shutdown, how long a connection accepted but not yet carrying a request may still send it.
SHUTDOWN_FIRST_REQUEST_S = 1.0


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
        self._read_timer: asyncio.TimerHandle | None = None
        self._served_any = False
        self._stopping = False

    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out, phase)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self, phase: str) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            metrics.HTTP_READ_TIMEOUTS.labels(phase).inc()
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._header_timeout_s, "header")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._served_any = True
        self._arm(self._body_timeout_s, "body")
        super().on_headers_complete()
        if self._stopping and self.cycle is not None:
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
            self._arm(min(SHUTDOWN_FIRST_REQUEST_S, self._header_timeout_s), "header")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers are due within the same bound (a kept-alive connection
        # that trickles them would otherwise escape the keep-alive timeout).
        if not self.transport.is_closing():
            self._arm(self._header_timeout_s, "header")


def limited_protocol(header_timeout_s: float, body_timeout_s: float) -> Any:
    """The protocol factory for uvicorn's `http` option (picklable, for worker processes)."""
    return functools.partial(
        LimitedHttpToolsProtocol,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
    )
