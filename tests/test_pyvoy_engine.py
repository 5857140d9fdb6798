"""`server.engine: pyvoy` as an operator runs it: one port for every protocol, workers, SIGTERM.

The gRPC calls themselves are tests/test_grpc.py; this file checks that everything the uvicorn
engine offers still holds inside Envoy.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType

from coupon.codes import is_code
from coupon.gen.coupon_connect import CouponServiceClientSync
from coupon.gen.coupon_pb import IssueCouponRequest, IssueCouponResponse
from tests.server_process import ServerProcess, children_of
from tests.support import JSON, SERVICE, give_up_after

WAIT_S = 30  # hang guard for polling loops, not a speed check


def ok_issue_calls(metrics: str) -> float:
    """coupon_requests_total for IssueCoupon answered ok, summed over its other labels."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("coupon_requests_total{")
        and 'code="ok"' in line
        and 'method="IssueCoupon"' in line
    )


def create_campaign(base_url: str, total: int) -> str:
    answer = httpx.post(
        f"{base_url}{SERVICE}/CreateCampaign", headers=JSON, json={"name": "x", "total": total}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["campaignId"])


def test_one_port_serves_connect_json_binary_health_and_metrics(tmp_path: Path):
    with ServerProcess(tmp_path, None, workers=1, engine="pyvoy") as server:
        server.wait_for("/readyz", 200)
        base = server.base_url
        assert httpx.get(base + "/healthz").text == "ok\n"
        campaign_id = create_campaign(base, 3)

        as_json = httpx.post(
            f"{base}{SERVICE}/IssueCoupon", headers=JSON, json={"campaignId": campaign_id}
        )
        assert as_json.status_code == 200
        assert as_json.http_version == "HTTP/1.1"
        binary = httpx.post(
            f"{base}{SERVICE}/IssueCoupon",
            headers={"Content-Type": "application/proto"},
            content=IssueCouponRequest(campaign_id=campaign_id).to_binary(),
        )
        assert binary.status_code == 200
        code = IssueCouponResponse.from_binary(binary.content).code
        assert len(code) == 10
        assert code != as_json.json()["code"]

        metrics = httpx.get(base + "/metrics").text
        assert ok_issue_calls(metrics) == 2
        assert "coupon_coupons_issued_total 2.0" in metrics
        log = server.log()
    assert "engine=pyvoy" in log
    assert "Traceback" not in log


def test_grpc_web_answers_and_refusals_through_envoy(tmp_path: Path):
    """gRPC-Web rides HTTP/1.1 through coupon.pyvoy_asgi (native gRPC is tests/test_grpc.py)."""
    with ServerProcess(tmp_path, None, workers=1, engine="pyvoy") as server:
        server.wait_for("/readyz", 200)
        campaign_id = create_campaign(server.base_url, 1)
        with CouponServiceClientSync(server.base_url, protocol=ProtocolType.GRPC_WEB) as client:
            reply = client.issue_coupon(IssueCouponRequest(campaign_id=campaign_id))
            with pytest.raises(ConnectError) as sold_out:
                client.issue_coupon(IssueCouponRequest(campaign_id=campaign_id))
        log = server.log()
    assert is_code(reply.code)
    assert sold_out.value.code == Code.RESOURCE_EXHAUSTED
    assert "Traceback" not in log


def test_two_envoy_workers_share_the_port_on_postgres(tmp_path: Path, pg_dsn: str):
    with ServerProcess(tmp_path, pg_dsn, workers=2, engine="pyvoy") as server:
        server.wait_for("/readyz", 200)  # one Envoy may answer before the other has started
        deadline = time.monotonic() + WAIT_S
        while "with 2 Envoy process(es)" not in server.log():
            give_up_after(deadline, "both Envoy processes started")
            time.sleep(0.05)  # polling interval
        envoys = children_of(server.pid)
        names = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in envoys]
        campaign_id = create_campaign(server.base_url, 100)
        # Fresh connections, so the kernel spreads them over both processes' listeners.
        codes = set()
        for _ in range(40):
            answer = httpx.post(
                f"{server.base_url}{SERVICE}/IssueCoupon",
                headers={**JSON, "Connection": "close"},
                json={"campaignId": campaign_id},
            )
            assert answer.status_code == 200, answer.text
            codes.add(answer.json()["code"])
        page = httpx.post(
            f"{server.base_url}{SERVICE}/GetCampaign",
            headers=JSON,
            json={"campaignId": campaign_id},
        ).json()
        # /metrics sums both processes, whichever one answered it; the other one adds its
        # calls within coupon.metrics.FLUSH_INTERVAL_S of answering them.
        deadline = time.monotonic() + WAIT_S
        while ok_issue_calls(metrics := httpx.get(server.base_url + "/metrics").text) < 40:
            give_up_after(deadline, f"/metrics to count 40 answers: {ok_issue_calls(metrics)}")
            time.sleep(0.05)  # polling interval
        returncode, _ = server.terminate(timeout_s=30)
    assert names == ["envoy", "envoy"], names
    assert len(codes) == 40
    assert page["issuedCount"] == 40
    assert set(page["issuedCodes"]) == codes
    assert ok_issue_calls(metrics) == 40  # and no more
    assert returncode == 0


def half_sent_call(port: int, campaign_id: str) -> tuple[socket.socket, bytes]:
    """An IssueCoupon whose body is half sent: in flight in Envoy until the rest comes."""
    body = f'{{"campaignId":"{campaign_id}"}}'.encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(
        b"POST /coupon.CouponService/IssueCoupon HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10]
    )
    return sock, body[10:]


def answers_until_refused(client: httpx.Client) -> list[str]:
    """Calls on a kept-alive client, one at a time, until its connection is refused (bounded):
    each answer's status and Connection header, or the class of the connection failure."""
    answers: list[str] = []
    deadline = time.monotonic() + WAIT_S
    while not answers or answers[-1] != "ConnectError":
        give_up_after(deadline, f"new connections refused; got {answers}")
        try:
            response = client.get("/healthz", timeout=5)
            answers.append(f"{response.status_code} {response.headers.get('connection', '-')}")
        except httpx.TransportError as e:
            answers.append(type(e).__name__)
    return answers


def test_sigterm_closes_connections_finishes_the_call_in_flight_and_exits_0(tmp_path: Path):
    with (
        ServerProcess(tmp_path, None, workers=1, engine="pyvoy", shutdown_timeout_s=20) as s,
        httpx.Client(base_url=s.base_url) as kept_alive,
    ):
        s.wait_for("/readyz", 200)
        campaign_id = create_campaign(s.base_url, 1)
        assert kept_alive.get("/healthz").status_code == 200  # its connection is open now
        sock, rest = half_sent_call(s.port, campaign_id)
        started = time.monotonic()
        s.terminate(timeout_s=0)  # SIGTERM, without waiting
        during = answers_until_refused(kept_alive)
        still_running = s.running()
        sock.sendall(rest)
        reply = sock.recv(4096)
        sock.close()
        returncode, _ = s.terminate(timeout_s=WAIT_S)
        stopped_after = time.monotonic() - started
        log = s.log()
    print(
        f"\npyvoy sigterm: a kept-alive client got {during}; in-flight call got {reply[:15]!r};"
        f" exit {returncode} after {stopped_after:.2f}s"
    )
    # Told to close on its open connection (maybe after answers from before the drain began),
    # then refused when it reconnects; never cut or left hanging.
    assert during[-2:] == ["200 close", "ConnectError"], during
    assert all(answer == "200 -" for answer in during[:-2]), during
    assert still_running  # the server waited for the call in flight
    assert reply.startswith(b"HTTP/1.1 200 OK"), reply
    assert b'"code":"' in reply
    assert returncode == 0, log
    assert "Traceback" not in log


@pytest.mark.parametrize("timeout_s", [2])
def test_a_call_that_never_finishes_does_not_outlive_shutdown_timeout(
    tmp_path: Path, timeout_s: int
):
    with ServerProcess(
        tmp_path, None, workers=1, engine="pyvoy", shutdown_timeout_s=timeout_s
    ) as server:
        server.wait_for("/readyz", 200)
        sock, _ = half_sent_call(server.port, create_campaign(server.base_url, 1))
        # Bounded well below the 20 s default, so only the configured timeout can pass.
        returncode, seconds = server.terminate(timeout_s=timeout_s + 15.0)
        sock.close()
        log = server.log()
    print(f"\npyvoy shutdown timeout: exit {returncode} after {seconds:.2f}s")
    assert returncode == 0, log
    assert f"calls still running after {timeout_s}s; stopping anyway" in log


def test_a_port_in_use_stops_the_server_with_envoys_reason_and_exit_1(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(f"server: {{port: {port}, engine: pyvoy}}\n")
        done = subprocess.run(
            [sys.executable, "-m", "coupon.server", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert "Address already in use" in done.stderr
    assert "Envoy did not start" in done.stderr
    assert "Traceback" not in done.stderr
