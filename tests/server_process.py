"""`python -m coupon.server` as a real subprocess on a free loopback port, ended by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import yaml

from tests.postgres import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class ServerProcess:
    def __init__(self, tmp_path: Path, dsn: str, workers: int) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_path / "server.yaml"
        self.log_path = tmp_path / "server.log"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, "workers": workers},
            "store": {"type": "postgres"},
            "database": {"dsn": dsn, "connect_timeout_s": 1, "pool_min_size": 1},
            "limits": {"max_total": 1_000_000},
        }
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "coupon.server", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        process = self._process
        assert process is not None
        # Only the process we started, by its PID; uvicorn's supervisor stops its workers.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, path: str, status: int, timeout_s: float = 30.0) -> None:
        """Poll `path` (never a fixed sleep) until it answers `status`."""
        deadline = time.monotonic() + timeout_s
        last: object = "no answer"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            try:
                last = httpx.get(self.base_url + path, timeout=2.0).status_code
                if last == status:
                    return
            except httpx.TransportError as e:
                last = e
            time.sleep(0.05)  # polling interval
        raise AssertionError(f"{path} never answered {status} (last: {last}):\n{self.log()}")


def statuses(responses: Iterator[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in responses:
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
    return counts
