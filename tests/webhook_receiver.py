"""A real webhook receiver on a loopback port: verifies signatures, can fail, can go down."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from coupon.webhooks.signing import HEADER, verify
from tests.postgres import free_port


@dataclass
class Tallies:
    posts: int = 0
    answered_500: int = 0
    bad_signatures: int = 0
    events: int = 0  # every event received, duplicates included
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)

    def line(self) -> str:
        types = Counter(e["type"] for e in self.by_id.values())
        return (
            f"receiver: {self.posts} POSTs ({self.answered_500} answered 500 on purpose),"
            f" {self.events} events received, {len(self.by_id)} distinct ids,"
            f" {self.events - len(self.by_id)} duplicates, {self.bad_signatures} bad signatures;"
            f" by type {dict(sorted(types.items()))}"
        )


class Receiver:
    """`fail_first`: that many POSTs answer 500. `go_down()` closes the port until `come_up()`.

    `hold`: while set, each POST waits (bounded) before answering, so a test can kill the
    sender with POSTs in flight.
    """

    def __init__(self, secret: str, *, fail_first: int = 0) -> None:
        self.secret = secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.tallies = Tallies()
        self._fail_left = fail_first
        self._lock = threading.Lock()
        self.in_flight = threading.Semaphore(0)  # released once per POST received
        self.release = threading.Event()
        self.release.set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Receiver:
        self.come_up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.go_down()

    def come_up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.in_flight.release()
                receiver.release.wait(timeout=30)
                status = receiver._take(body, self.headers.get(HEADER, ""))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def go_down(self) -> None:
        """Close the listening socket: senders get connection refused until come_up()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._server = None

    def _take(self, body: bytes, signature: str) -> int:
        with self._lock:
            self.tallies.posts += 1
            if not verify(self.secret, body, signature, now=int(time.time())):
                self.tallies.bad_signatures += 1
                return 400
            if self._fail_left > 0:
                self._fail_left -= 1
                self.tallies.answered_500 += 1
                return 500
            for event in json.loads(body)["events"]:
                self.tallies.events += 1
                self.tallies.by_id[event["id"]] = event
            return 200

    def distinct_events(self) -> int:
        with self._lock:
            return len(self.tallies.by_id)

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.tallies.by_id.values())
