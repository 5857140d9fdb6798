"""`server.engine: pyvoy`: the app inside Envoy, so one port serves HTTP/2 and native gRPC too.

uvicorn speaks HTTP/1.1, which has no trailers, and native gRPC puts its status in trailers.
pyvoy runs the same ASGI app inside Envoy (a dynamic module embedding Python); Envoy's listener
tells the protocols apart per connection: HTTP/1.1 (Connect, gRPC-Web, health, metrics) and
HTTP/2 with prior knowledge (h2c: native gRPC, Connect over HTTP/2), on `server.port`.

pyvoy has no worker processes: `server.workers` Envoy processes bind the same port (Envoy's
listeners set SO_REUSEPORT), each with its own interpreter, like uvicorn's workers. Envoy exits
at once on SIGTERM, cutting in-flight calls, so a stop goes in three steps, through Envoy's
admin API:
1. close every listener (new connections are refused at once), then start Envoy's drain,
   which tells every open connection to close (HTTP/1.1 `Connection: close` on its next
   response, HTTP/2 GOAWAY), so clients on kept-alive connections go elsewhere;
2. wait, up to `server.shutdown_timeout_s`, until no request is active;
3. SIGTERM Envoy, which runs the app's lifespan shutdown (the store closes) and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import urllib.request
from typing import TYPE_CHECKING

from pyvoy import PyvoyServer, StartupError

if TYPE_CHECKING:
    from coupon.config import Config

log = logging.getLogger("coupon.server")

APP = "coupon.pyvoy_app:app"
ACTIVE_REQUESTS = "http.ingress_http.downstream_rq_active"
_POLL_S = 0.05


def serve(config: Config) -> int:
    """Run `server.workers` Envoy processes until SIGTERM/SIGINT; 0 after a graceful stop."""
    return asyncio.run(_serve(config))


async def _serve(config: Config) -> int:
    servers = [
        PyvoyServer(
            APP,
            address=config.server.host,
            port=config.server.port,
            lifespan=True,  # required: the store opens and closes in the app's lifespan
            log_level="error",
            stdout=None,  # inherit: the app's log lines go where the server's go
            stderr=None,
            # A drain tells every connection to close at once rather than spread over time.
            additional_envoy_args=[
                "--drain-strategy",
                "immediate",
                "--drain-time-s",
                str(config.server.shutdown_timeout_s),
            ],
        )
        for _ in range(config.server.workers)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, stop.set)
    try:
        try:
            await asyncio.gather(*(server.start() for server in servers))
        except StartupError:
            # Envoy has said why on stderr (a port in use, most often).
            log.error("Envoy did not start; its own message is above")
            return 1
        log.info(
            "serving HTTP/1.1 and h2c (native gRPC) on %s:%d with %d Envoy process(es)",
            servers[0].listener_address,
            servers[0].listener_port,
            len(servers),
        )
        stopping = asyncio.create_task(stop.wait())
        exits = [asyncio.create_task(server.wait()) for server in servers]
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopping not in done:
            log.error("an Envoy process exited on its own; stopping the others")
            return 1
        await asyncio.gather(
            *(_drain(server, config.server.shutdown_timeout_s) for server in servers)
        )
        return 0
    finally:
        await asyncio.gather(*(server.stop() for server in servers))


async def _drain(server: PyvoyServer, timeout_s: float) -> None:
    # pyvoy keeps the admin address it read from Envoy private; it is the only way in.
    admin = server._admin_address
    if admin is None or server.stopped:
        return
    try:
        # The plain drain closes the listeners at once; the graceful one then marks the open
        # connections to close (skip_exit: we stop Envoy ourselves).
        await asyncio.to_thread(_admin, admin, "/drain_listeners", "POST")
        await asyncio.to_thread(_admin, admin, "/drain_listeners?graceful&skip_exit", "POST")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_active_requests, admin) == 0:
                return
            await asyncio.sleep(_POLL_S)  # polling interval
        log.warning("calls still running after %ss; stopping anyway", timeout_s)
    except OSError as e:
        log.warning("could not drain Envoy before stopping it: %s", e)


def _admin(admin: str, path: str, method: str = "GET") -> bytes:
    request = urllib.request.Request(f"http://{admin}{path}", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return bytes(response.read())


def _active_requests(admin: str) -> int:
    body = _admin(admin, f"/stats?format=json&filter=^{ACTIVE_REQUESTS}$")
    stats = json.loads(body).get("stats", [])
    return sum(int(stat.get("value", 0)) for stat in stats)
