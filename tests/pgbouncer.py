"""A real PgBouncer (Debian's package) in transaction mode in front of a test database.

It runs as an unprivileged user (PgBouncer refuses root) on a free loopback port with a
generated config, and is ended by its PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from tests.postgres import SYSTEM_USER, free_port, import_pgserver
from tests.support import give_up_after

if TYPE_CHECKING:
    from types import TracebackType

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    def __init__(self, dsn: str, pool_size: int = 8) -> None:
        params = conninfo_to_dict(dsn)
        self.dbname = str(params["dbname"])
        user = str(params.get("user") or "postgres")
        self.root = Path(tempfile.mkdtemp(prefix="coupon-pgbouncer-"))
        self.root.chmod(0o755)
        self.port = free_port()
        server = f"host={params.get('host') or '127.0.0.1'} port={params.get('port') or 5432}"
        server += f" dbname={self.dbname} user={user}"
        if params.get("password"):
            server += f" password={params['password']}"
        (self.root / "users.txt").write_text(f'"{user}" ""\n', encoding="utf-8")
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{self.dbname} = {server}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n",
            encoding="utf-8",
        )
        for path in self.root.iterdir():
            path.chmod(0o644)
        self.log_path = self.root / "pgbouncer.log"
        self.log_path.touch(mode=0o666)
        self.log_path.chmod(0o666)
        self.dsn = f"postgresql://{user}@127.0.0.1:{self.port}/{self.dbname}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            import_pgserver().utils.ensure_user_exists(SYSTEM_USER)
            kwargs["user"] = SYSTEM_USER
        self._process = subprocess.Popen(
            [PGBOUNCER, str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **kwargs,
        )
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None:
                raise AssertionError(f"pgbouncer exited:\n{self.log()}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2, prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                return self
            except psycopg.OperationalError:
                give_up_after(deadline, f"pgbouncer on port {self.port}:\n{self.log()}")
                time.sleep(0.05)  # polling interval

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()  # only the process we started, by its PID
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
