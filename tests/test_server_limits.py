"""Server limits on a real server process: idle and slow clients are closed after the header
and body timeouts while a normal client is served, and past server.max_connections a new
request is refused with HTTP 503 instead of hanging."""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import statistics
import time
from typing import TYPE_CHECKING

import httpx

from tests.server_process import ServerProcess
from tests.support import JSON, SERVICE, give_up_after

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

IDLE = 2000
SLOW_HEADERS = 100
SLOW_BODIES = 20
NORMAL_CALLS = 20
TIMEOUT_S = 2.0
WAIT_S = 60.0  # hang guard


@contextlib.contextmanager
def file_limit(needed: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    assert target >= needed, f"this test needs {needed} open files; the hard limit is {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_slow_clients_are_closed_while_a_normal_client_is_served(
    tmp_path: Path,
) -> None:
    extra = {
        "server": {
            "header_timeout_s": TIMEOUT_S,
            "body_timeout_s": TIMEOUT_S,
            "max_connections": 4096,
        }
    }
    with (
        file_limit(IDLE + SLOW_HEADERS + SLOW_BODIES + 500),
        ServerProcess(tmp_path, None, workers=1, extra=extra) as server,
    ):
        server.wait_for("/healthz", 200)
        campaign = httpx.post(
            f"{server.base_url}{SERVICE}/CreateCampaign",
            headers=JSON,
            json={"name": "limits", "total": 1000},
            timeout=30,
        ).json()["campaignId"]
        idle = [connect(server.port) for _ in range(IDLE)]
        slow = [connect(server.port) for _ in range(SLOW_HEADERS)]
        bodies = [connect(server.port) for _ in range(SLOW_BODIES)]
        for sock in slow:
            sock.send(b"POST /coupon.CouponService/IssueCoupon HTTP/1.1\r\nHost: x\r\n")
        for sock in bodies:
            sock.send(
                b"POST /coupon.CouponService/IssueCoupon HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
        latencies: list[float] = []
        answers: list[int] = []
        started = time.monotonic()
        deadline = started + WAIT_S
        closed_idle = closed_slow = closed_bodies = 0
        all_closed_s: float | None = None
        with httpx.Client(base_url=server.base_url, headers=JSON, timeout=30) as http:
            # Serve the normal client while the slow ones keep trickling, one byte per round,
            # until the server has closed every idle and slow connection (bounded).
            while (
                closed_idle < IDLE
                or closed_slow < SLOW_HEADERS
                or closed_bodies < SLOW_BODIES
                or len(answers) < NORMAL_CALLS
            ):
                give_up_after(deadline, f"idle {closed_idle}/{IDLE}, slow {closed_slow}")
                if len(answers) < NORMAL_CALLS:
                    call_started = time.monotonic()
                    response = http.post(f"{SERVICE}/IssueCoupon", json={"campaignId": campaign})
                    latencies.append(time.monotonic() - call_started)
                    answers.append(response.status_code)
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
                for sock in bodies:
                    with contextlib.suppress(OSError):
                        sock.send(b" ")
                with selectors.DefaultSelector() as selector:
                    for sock in idle + slow + bodies:
                        if sock.fileno() >= 0:
                            selector.register(sock, selectors.EVENT_READ)
                    for key, _ in selector.select(timeout=0.1):
                        sock = key.fileobj  # type: ignore[assignment]
                        if closed_by_server(sock):  # type: ignore[arg-type]
                            sock.close()  # type: ignore[union-attr]
                closed_idle = sum(1 for s in idle if s.fileno() < 0)
                closed_slow = sum(1 for s in slow if s.fileno() < 0)
                closed_bodies = sum(1 for s in bodies if s.fileno() < 0)
                if closed_idle == IDLE and all_closed_s is None:
                    all_closed_s = time.monotonic() - started
            after = http.get("/healthz").status_code
        for sock in idle + slow + bodies:
            sock.close()
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
        log = server.log()

    print(
        f"\nidle+slow: {IDLE} idle, {SLOW_HEADERS} slow-header and {SLOW_BODIES} slow-body"
        f" connections; normal client {len(answers)} calls {set(answers)}, latency median"
        f" {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms;"
        f" closed by the server: idle {closed_idle}/{IDLE}, slow-header"
        f" {closed_slow}/{SLOW_HEADERS}, slow-body {closed_bodies}/{SLOW_BODIES}; the idle ones"
        f" all closed {all_closed_s:.1f}s after opening (header_timeout_s = body_timeout_s ="
        f" {TIMEOUT_S})"
    )
    assert answers == [200] * NORMAL_CALLS
    assert after == 200
    assert 'coupon_http_read_timeouts_total{phase="body"}' in metrics
    assert "Traceback" not in log


def test_past_max_connections_a_new_request_is_refused_with_503(tmp_path: Path) -> None:
    cap = 20
    extra = {"server": {"max_connections": cap, "header_timeout_s": 60.0}}
    with ServerProcess(tmp_path, None, workers=1, extra=extra) as server:
        server.wait_for("/healthz", 200)
        held = [connect(server.port) for _ in range(cap)]
        try:
            refused = httpx.get(server.base_url + "/healthz", timeout=30)
        finally:
            for sock in held:
                sock.close()
        server.wait_for("/healthz", 200)

    print(f"\nmax_connections={cap}: with {cap} held open, a new request got {refused.status_code}")
    assert refused.status_code == 503


def test_after_an_answer_the_next_requests_headers_are_due_in_time(tmp_path: Path) -> None:
    """The header deadline starts again after every answer: a kept-alive client that got its
    answer and then trickles its next request's headers, a byte at a time, is closed, and the
    metrics count it as a header timeout."""
    extra = {"server": {"header_timeout_s": TIMEOUT_S, "body_timeout_s": WAIT_S}}
    with ServerProcess(tmp_path, None, workers=1, extra=extra) as server:
        server.wait_for("/healthz", 200)
        deadline = time.monotonic() + WAIT_S
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok\n"):
                piece = sock.recv(4096)
                assert piece, f"closed before its answer: {answer!r}"
                answer += piece
            sock.setblocking(False)
            next_request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100_000
            sent = 0
            closed = False
            with selectors.DefaultSelector() as selector:
                selector.register(sock, selectors.EVENT_READ)
                while not closed:
                    give_up_after(deadline, f"the trickling connection is still open ({sent} B)")
                    try:
                        sent += sock.send(next_request[sent : sent + 1])
                    except OSError:
                        closed = True  # reset by the server
                        break
                    closed = bool(selector.select(timeout=0.1)) and closed_by_server(sock)
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text

    status = answer.split(b" ", 2)[1].decode()
    print(f"\nkept-alive, then trickling: answered {status}, closed after {sent} bytes")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert closed
    assert 'coupon_http_read_timeouts_total{phase="header"} 1.0' in metrics
