"""Real PostgreSQL for the test suite: never a fake, never skipped.

`COUPON_TEST_DSN` names a server to use (its role needs CREATEDB); otherwise one throw-away
server per test session is started with the `pgserver` package in a temp dir. Each test gets
its own database, copied from a template that already holds the migrations (a file copy:
much faster than migrating every time). `DedicatedPostgres` is a separate server on a TCP port
that a test may stop and start without disturbing the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from coupon.clock import Clock, system_clock
from coupon.config import DatabaseConfig
from coupon.store.migrations import apply_migrations
from coupon.store.postgres import PostgresStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

DSN_ENV = "COUPON_TEST_DSN"
SYSTEM_USER = "pgserver"  # pgserver's own choice: postgres refuses to run as root


def import_pgserver() -> Any:
    # pgserver warns at import time when XDG_RUNTIME_DIR is unset (as under root in CI),
    # and the suite turns warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.utils
    return pgserver


def with_dbname(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


def migrate(dsn: str) -> None:
    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await apply_migrations(conn)

    # A thread of its own: the caller may be inside a running event loop (fixtures are
    # resolved lazily from async fixtures).
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        executor.submit(asyncio.run, run()).result()


class TestDatabases:
    """Creates a fresh, migrated database per test on one server."""

    __test__ = False

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.template = f"coupon_template_{uuid.uuid4().hex[:8]}"
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        migrate(with_dbname(admin_dsn, self.template))

    def _admin(self, statement: sql.Composable) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(statement)

    def create(self) -> str:
        name = f"coupon_test_{uuid.uuid4().hex[:12]}"
        self._admin(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
        )
        return with_dbname(self.admin_dsn, name)

    def drop(self, dsn: str) -> None:
        name = conninfo_to_dict(dsn)["dbname"]
        assert isinstance(name, str)
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def close(self) -> None:
        self._admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.template))
        )


@contextlib.contextmanager
def provision() -> Iterator[TestDatabases]:
    """The session's PostgreSQL; raises (so tests fail) when it cannot be provided."""
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        databases = TestDatabases(dsn)
        try:
            yield databases
        finally:
            databases.close()
        return
    pgserver = import_pgserver()
    root = Path(tempfile.mkdtemp(prefix="coupon-pg-"))
    root.chmod(0o755)  # pgserver runs postgres as an unprivileged user when we are root
    server = pgserver.get_server(root / "data", cleanup_mode="delete")
    try:
        # Throw-away data: durability settings only slow the suite down.
        server.psql(
            "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
            " ALTER SYSTEM SET full_page_writes = off; SELECT pg_reload_conf();"
        )
        yield TestDatabases(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def wait_ready(store: PostgresStore, timeout_s: float = 15.0) -> None:
    """Poll readiness (never a fixed sleep) until ready or the time is up."""
    async with asyncio.timeout(timeout_s):
        while not await store.is_ready():  # noqa: ASYNC110 - polling a database, not an event
            await asyncio.sleep(0.02)  # polling interval


@contextlib.asynccontextmanager
async def open_postgres_store(
    dsn: str, clock: Clock = system_clock, **config: Any
) -> AsyncIterator[PostgresStore]:
    """An open PostgresStore on `dsn`, ready to serve; closed on exit."""
    store = PostgresStore(DatabaseConfig(dsn=dsn, **config), retry_initial_s=0.05, clock=clock)
    await store.open()
    try:
        await wait_ready(store)
        yield store
    finally:
        await store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DedicatedPostgres:
    """A PostgreSQL of its own on 127.0.0.1:<free port>, which a test may stop and start."""

    def __init__(self) -> None:
        pgserver = import_pgserver()
        self._bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        self._user: str | None = None
        self.root = Path(tempfile.mkdtemp(prefix="coupon-pg-outage-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.data.mkdir()
        if os.geteuid() == 0:
            pgserver.utils.ensure_user_exists(SYSTEM_USER)
            self._user = SYSTEM_USER
            shutil.chown(self.data, SYSTEM_USER, SYSTEM_USER)
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "utf8")

    def _run(self, exe: str, *args: str) -> None:
        kwargs: dict[str, Any] = {"user": self._user} if self._user else {}
        subprocess.run(
            [str(self._bin / exe), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            **kwargs,
        )

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.data / "log"), "-w", "-o", options,
            "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
