"""A pg_auto_failover formation on loopback: monitor, primary and synchronous standby.

Built from Debian's packages (`postgresql-15-auto-failover`, `pg-auto-failover-cli`,
`postgresql-15`), which scripts/test.sh installs as root. Everything lives in one temp dir
(data, pg_autoctl's config and state via XDG_*, Unix sockets, logs) and every server listens on
127.0.0.1 at a free port. pg_autoctl refuses to run as root, so under root it runs as Debian's
`postgres` user. Readiness is always read from the monitor's own table, polled with a bound;
teardown ends only the pg_autoctl processes started here (and their children), by PID.

The HA manager's timers are shortened for a test on one machine (see docs/ha.md for what each
one trades): a dead node is noticed within about two seconds instead of twenty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from tests.postgres import free_port
from tests.server_process import children_of, is_running
from tests.support import give_up_after

if TYPE_CHECKING:
    from collections.abc import Iterator

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RUN_AS = "postgres"  # Debian's PostgreSQL user; used only when the suite runs as root
DBNAME = "coupon"
FORMATION_WAIT_S = 120.0  # creating both nodes, base backup included
STATE_WAIT_S = 60.0  # any later change of state (failover, rejoin)

# Monitor timers (milliseconds). Defaults: 5000, 5000, 2, 2000, 20000, 30000.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": 1000,
    "pgautofailover.health_check_timeout": 1000,
    "pgautofailover.health_check_max_retries": 1,
    "pgautofailover.health_check_retry_delay": 500,
    "pgautofailover.node_considered_unhealthy_timeout": 2000,
    "pgautofailover.primary_demote_timeout": 5000,
}
# Every server: no Unix socket outside our dir; base backups must not wait for a spread
# checkpoint (pg_basebackup's default took 90 s here on a fresh primary).
POSTGRES_SETTINGS = {"listen_addresses": "'127.0.0.1'", "checkpoint_completion_target": 0}


@dataclass
class Node:
    name: str
    port: int
    pgdata: Path
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={DBNAME} connect_timeout=2"


class HACluster:
    """Monitor + two data nodes; `dsn` is the multi-host DSN the service uses."""

    def __init__(self) -> None:
        if shutil.which("pg_autoctl") is None or not (PG_BIN / "postgres").exists():
            raise RuntimeError(
                "pg_auto_failover is not installed: apt-get install postgresql-15-auto-failover"
                " pg-auto-failover-cli (scripts/test.sh does so when run as root)"
            )
        self.root = Path(tempfile.mkdtemp(prefix="coupon-ha-"))
        self.root.chmod(0o755)
        self._user = RUN_AS if os.geteuid() == 0 else None
        self.sockets = self.root / "sockets"
        for sub in ("config", "share", "run", "sockets"):
            (self.root / sub).mkdir()
        if self._user is not None:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, self._user, self._user)
        self.monitor = Node("monitor", free_port(), self.root / "monitor")
        self.nodes = [Node(f"node{n}", free_port(), self.root / f"node{n}") for n in (1, 2)]
        self.monitor_dsn = (
            f"host=127.0.0.1 port={self.monitor.port} user=autoctl_node"
            " dbname=pg_auto_failover connect_timeout=2"
        )
        hosts = ",".join("127.0.0.1" for _ in self.nodes)
        ports = ",".join(str(node.port) for node in self.nodes)
        self.dsn = (
            f"host={hosts} port={ports} user=postgres dbname={DBNAME}"
            " target_session_attrs=read-write"
        )

    # -- building --------------------------------------------------------------------------

    def start(self) -> None:
        """Monitor, then node1 (becomes primary), then node2 (base backup, sync standby)."""
        self._initdb(self.monitor, {**POSTGRES_SETTINGS, **MONITOR_SETTINGS})
        pgdata = str(self.monitor.pgdata)
        self._run_as_user(
            ["pg_autoctl", "create", "monitor", "--pgdata", pgdata,
             "--pgport", str(self.monitor.port), "--hostname", "127.0.0.1",
             "--auth", "trust", "--no-ssl", "--pgctl", str(PG_BIN / "pg_ctl")],
        )  # fmt: skip
        # `create monitor` has no --listen; without this it would listen on every address.
        self._run_as_user(
            ["pg_autoctl", "config", "set", "--pgdata", pgdata,
             "postgresql.listen_addresses", "127.0.0.1"],
        )  # fmt: skip
        self._spawn(self.monitor, "run", "--pgdata", pgdata)
        self._wait_for_monitor()
        first, second = self.nodes
        self._initdb(first, POSTGRES_SETTINGS)
        self._create_node(first)
        self.wait_states({first.name: "single"}, FORMATION_WAIT_S)
        # node2 is made by a base backup of node1, settings included.
        self._create_node(second)
        self.wait_states({first.name: "primary", second.name: "secondary"}, FORMATION_WAIT_S)

    def _initdb(self, node: Node, settings: dict[str, Any]) -> None:
        self._run_as_user(
            [str(PG_BIN / "initdb"), "-D", str(node.pgdata), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
        )  # fmt: skip
        lines = [f"unix_socket_directories = '{self.sockets}'"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        with (node.pgdata / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tests/ha_cluster.py\n" + "\n".join(lines) + "\n")

    def _create_node(self, node: Node) -> None:
        monitor_uri = (
            f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover"
            "?sslmode=disable"
        )
        self._spawn(
            node,
            "create", "postgres", "--pgdata", str(node.pgdata), "--pgport", str(node.port),
            "--pghost", str(self.sockets), "--listen", "127.0.0.1", "--hostname", "127.0.0.1",
            "--name", node.name, "--dbname", DBNAME, "--monitor", monitor_uri,
            "--auth", "trust", "--no-ssl", "--pgctl", str(PG_BIN / "pg_ctl"), "--run",
        )  # fmt: skip

    def restart_node(self, node: Node) -> None:
        """`pg_autoctl run` again on a node whose processes were killed."""
        self._spawn(node, "run", "--pgdata", str(node.pgdata))

    def _env(self) -> dict[str, str]:
        return {
            "PATH": f"{PG_BIN}:/usr/bin:/bin",
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "PG_CONFIG": str(PG_BIN / "pg_config"),
            "PGHOST": str(self.sockets),  # else libpq's default, Debian's /var/run/postgresql
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_DATA_HOME": str(self.root / "share"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
        }

    def _user_kwargs(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user, "group": self._user, "extra_groups": []}

    def _run_as_user(self, args: list[str]) -> None:
        subprocess.run(
            args,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            env=self._env(),
            cwd=self.root,
            **self._user_kwargs(),
        )

    def _spawn(self, node: Node, *args: str) -> None:
        log = self.root / f"{node.name}.{len(node.logs)}.log"
        node.logs.append(log)
        with log.open("wb") as out:
            node.process = subprocess.Popen(
                ["pg_autoctl", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.root,
                **self._user_kwargs(),
            )

    def _wait_for_monitor(self) -> None:
        deadline = time.monotonic() + FORMATION_WAIT_S
        while True:
            self._check_alive(self.monitor)
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(self.monitor_dsn) as conn:
                    conn.execute("SELECT 1 FROM pgautofailover.formation")
                return
            give_up_after(deadline, f"the monitor\n{self.logs()}")
            time.sleep(0.05)  # polling interval

    # -- reading the state -----------------------------------------------------------------

    def states(self) -> dict[str, tuple[str, str]]:
        """Node name -> (reported state, goal state), from the monitor."""
        with psycopg.connect(self.monitor_dsn) as conn:
            rows = conn.execute(
                "SELECT nodename, reportedstate::text, goalstate::text FROM pgautofailover.node"
            ).fetchall()
        return {name: (reported, goal) for name, reported, goal in rows}

    def wait_states(self, wanted: dict[str, str], timeout_s: float = STATE_WAIT_S) -> None:
        """Poll the monitor until each named node reports its wanted state as its goal too."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, tuple[str, str]] = {}
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                seen = self.states()
                if all(seen.get(name) == (state, state) for name, state in wanted.items()):
                    return
            for node in self.nodes:
                if node.name in wanted:
                    self._check_alive(node)
            give_up_after(deadline, f"states {wanted}, last seen {seen}\n{self.logs()}")
            time.sleep(0.05)  # polling interval

    def role(self, state: str) -> Node:
        """The node whose reported and goal states are both `state`."""
        states = self.states()
        for node in self.nodes:
            if states.get(node.name) == (state, state):
                return node
        raise AssertionError(f"no node in state {state}: {states}")

    def wait_healthy(self) -> tuple[Node, Node]:
        """Wait for one primary and one secondary; return (primary, standby)."""
        deadline = time.monotonic() + STATE_WAIT_S
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                states = sorted(state for state in self.states().values())
                if states == [("primary", "primary"), ("secondary", "secondary")]:
                    return self.role("primary"), self.role("secondary")
            give_up_after(deadline, f"a primary and a secondary\n{self.logs()}")
            time.sleep(0.05)  # polling interval

    def _check_alive(self, node: Node) -> None:
        if node.process is not None and node.process.poll() is not None:
            raise AssertionError(f"pg_autoctl for {node.name} exited\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        parts = []
        for node in (self.monitor, *self.nodes):
            for log in node.logs:
                lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
                parts.append(f"--- {log.name}\n" + "\n".join(lines[-tail:]))
        return "\n".join(parts)

    # -- faults ----------------------------------------------------------------------------

    def postmaster_pid(self, node: Node) -> int:
        return int((node.pgdata / "postmaster.pid").read_text().splitlines()[0])

    def kill_postmaster(self, node: Node) -> int:
        """SIGKILL the node's postmaster only; its pg_autoctl stays up and reports it."""
        pid = self.postmaster_pid(node)
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_node(self, node: Node) -> list[int]:
        """SIGKILL the node's pg_autoctl and every process under it (the node dies)."""
        assert node.process is not None
        pids = [node.process.pid, *descendants(node.process.pid)]
        # The supervisor first, so it cannot restart a service it sees die.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(is_running(pid) for pid in pids):
            give_up_after(deadline, f"the end of SIGKILLed processes {pids}")
            time.sleep(0.01)  # polling interval
        return pids

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the pg_autoctl processes started here (nodes first), by PID; remove the dir."""
        for node in (*self.nodes, self.monitor):
            process = node.process
            if process is None or process.poll() is not None:
                continue
            pids = [process.pid, *descendants(process.pid)]
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for child in children_of(pid):
        found.extend([child, *descendants(child)])
    return found


@contextlib.contextmanager
def ha_cluster() -> Iterator[HACluster]:
    cluster = HACluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
