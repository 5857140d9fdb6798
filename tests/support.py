"""Test helpers: a real uvicorn server on a loopback port, and small JSON RPC helpers."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

if TYPE_CHECKING:
    from collections.abc import Iterator

    from starlette.types import ASGIApp

SERVICE = "/coupon.CouponService"
JSON = {"Content-Type": "application/json"}


def pooled_client(base_url: str, connections: int) -> httpx.AsyncClient:
    """A JSON client for storms: up to `connections` connections, all kept alive between
    calls, and a timeout far past any call's own bound (a hang fails the test, slowly)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60, headers=JSON)


def give_up_after(deadline: float, what: str) -> None:
    """End a polling loop that has waited past its bound (a hang guard, not a speed check)."""
    if time.monotonic() >= deadline:
        raise TimeoutError(f"gave up waiting: {what}")


def wait_until_healthy(base_url: str, timeout_s: float = 15.0, path: str = "/healthz") -> None:
    """Poll the health endpoint (never a fixed sleep) until it answers 200 or time runs out."""
    deadline = time.monotonic() + timeout_s
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(base_url + path, timeout=1.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as e:
            last = e
        time.sleep(0.02)  # polling interval, not a wait for readiness
    raise TimeoutError(f"{base_url}{path} not healthy after {timeout_s}s: {last}")


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 from a background thread of this process."""

    def __init__(self, app: ASGIApp) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app, lifespan="on", log_level="warning", access_log=False, timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        wait_until_healthy(self.base_url)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()


def serve(app: ASGIApp) -> Iterator[str]:
    with ServerThread(app) as server:
        yield server.base_url


async def call(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | bytes
) -> tuple[int, dict[str, Any]]:
    """POST a Connect unary JSON call; returns (HTTP status, decoded JSON body)."""
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    response = await client.post(f"{SERVICE}/{method}", content=content, headers=JSON)
    return response.status_code, (response.json() if response.content else {})
