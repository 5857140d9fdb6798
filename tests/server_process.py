"""`python -m coupon.server` as a real subprocess on a free loopback port, ended by its PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml

from tests.postgres import free_port
from tests.support import give_up_after

if TYPE_CHECKING:
    from collections.abc import Iterator


class ServerProcess:
    """`dsn=None` runs the memory store; `name` keeps the config and log of a restart apart."""

    def __init__(
        self,
        tmp_path: Path,
        dsn: str | None,
        workers: int,
        *,
        name: str = "server",
        shutdown_timeout_s: int | None = None,
        engine: str | None = None,
        extra: dict[str, dict[str, object]] | None = None,
        auth: dict[str, object] | None = None,
        role: str = "server",
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_path / f"{name}.yaml"
        self.log_path = tmp_path / f"{name}.log"
        server: dict[str, object] = {"host": "127.0.0.1", "port": self.port, "workers": workers}
        if shutdown_timeout_s is not None:
            server["shutdown_timeout_s"] = shutdown_timeout_s
        if engine is not None:
            server["engine"] = engine
        config: dict[str, object] = {
            "server": server,
            "store": {"type": "memory" if dsn is None else "postgres"},
            "limits": {"max_total": 1_000_000},
        }
        if dsn is not None:
            config["database"] = {"dsn": dsn, "connect_timeout_s": 1, "pool_min_size": 1}
        for section, values in (extra or {}).items():
            merged = dict(config.get(section) or {})  # type: ignore[call-overload]
            merged.update(values)
            config[section] = merged
        if auth is not None:
            config["auth"] = auth
        self.role = role
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "coupon.server", "--config", str(self.config_path)),
                    *(("--role", self.role) if self.role != "server" else ()),
                ],
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

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def worker_pids(self) -> list[int]:
        """The supervisor's child processes (uvicorn workers, and multiprocessing's helper)."""
        return children_of(self.pid)

    def kill_all(self) -> list[int]:
        """SIGKILL the supervisor and every child of it, by PID; wait until all are gone."""
        process = self._process
        assert process is not None
        children = self.worker_pids()
        # The supervisor first, so it cannot replace a worker it sees die.
        process.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(is_running(pid) for pid in children):
            give_up_after(deadline, f"the end of SIGKILLed processes {children}")
            time.sleep(0.01)  # polling interval
        return [process.pid, *children]

    def terminate(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM the supervisor; return its exit code (None: still running) and the seconds."""
        process = self._process
        assert process is not None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        return returncode, time.monotonic() - started

    def running(self) -> bool:
        assert self._process is not None
        return self._process.poll() is None

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


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<pid>/task/*/children (Linux)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.extend(int(child) for child in children.read_text().split())
    return sorted(set(found))


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def statuses(responses: Iterator[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in responses:
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
    return counts
