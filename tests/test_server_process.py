"""The real entry points as a user runs them: a server process, its config, its exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support import JSON, SERVICE, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = Path(sys.executable).parent / "coupon-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_console_script_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "configs" / "config.yaml").read_text())
    env = {**os.environ, "COUPON_SERVER_PORT": str(port)}
    process = subprocess.Popen(
        [str(SERVER_SCRIPT), "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base)
        assert httpx.get(base + "/readyz").status_code == 200
        created = httpx.post(
            f"{base}{SERVICE}/CreateCampaign", headers=JSON, json={"name": "x", "total": 1}
        )
        campaign = {"campaignId": created.json()["campaignId"]}
        issued = httpx.post(f"{base}{SERVICE}/IssueCoupon", headers=JSON, json=campaign)
        assert issued.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "store=memory" in output


def run_entry(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_a_missing_config_file_is_named_and_exits_2(tmp_path: Path) -> None:
    result = run_entry([str(SERVER_SCRIPT), "--config", str(tmp_path / "absent.yaml")])
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr


def test_several_workers_on_the_memory_store_are_refused() -> None:
    result = run_entry(
        [sys.executable, str(ROOT / "cmd" / "server.py"), "--config", "configs/config.yaml"],
        env={"COUPON_SERVER_WORKERS": "2"},
    )
    assert result.returncode == 2
    assert "memory store" in result.stderr


def test_the_cmd_entry_script_runs_from_a_checkout() -> None:
    result = run_entry([sys.executable, str(ROOT / "cmd" / "server.py"), "--help"])
    assert result.returncode == 0
    assert "--config" in result.stdout


def test_an_open_admin_beyond_loopback_stops_start_up(tmp_path: Path) -> None:
    # Refused before any socket is bound, so 0.0.0.0 here never listens.
    result = run_entry(
        [str(SERVER_SCRIPT), "--config", "configs/config.yaml"],
        env={"COUPON_SERVER_HOST": "0.0.0.0", "COUPON_SERVER_PORT": str(free_port())},
    )
    assert result.returncode == 2
    assert "COUPON_AUTH_ADMIN_TOKEN" in result.stderr
    assert "allow_open_admin" in result.stderr


def test_a_customer_key_file_that_cannot_serve_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "auth:\n  customers:\n    jwt: {algorithms: [RS256], public_key_file: "
        f"{tmp_path / 'absent.pem'}, issuer: i, audience: a}}\n"
    )
    result = run_entry([str(SERVER_SCRIPT), "--config", str(config)])
    assert result.returncode == 2
    assert "absent.pem" in result.stderr
    assert "Traceback" not in result.stderr
