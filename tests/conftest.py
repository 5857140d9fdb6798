"""Shared fixtures. Contract tests take `store` and run once per store engine."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx
import pytest

from coupon.app import create_app
from coupon.clock import ManualClock
from coupon.config import Config, LimitsConfig
from coupon.store.memory import MemoryStore
from coupon.store.postgres import PostgresStore
from tests.postgres import DedicatedPostgres, TestDatabases, open_postgres_store, provision
from tests.support import ServerThread, wait_until_healthy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from coupon.store import Store

STORE_KINDS = ["memory", "postgres"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 21, 9, 0, tzinfo=UTC))


@pytest.fixture
def config() -> Config:
    return replace(Config(), limits=LimitsConfig(max_total=1_000_000, max_request_bytes=16 * 1024))


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[TestDatabases]:
    """The session's PostgreSQL (COUPON_TEST_DSN or a throw-away pgserver); fails if absent."""
    with provision() as databases:
        yield databases


@pytest.fixture
def pg_dsn(pg_databases: TestDatabases) -> Iterator[str]:
    """A fresh database with the schema in place, dropped after the test."""
    dsn = pg_databases.create()
    yield dsn
    pg_databases.drop(dsn)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A fresh, open store of each engine; the memory store runs on the real clock here."""
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "postgres":
        async with open_postgres_store(request.getfixturevalue("pg_dsn")) as pg_store:
            yield pg_store
    else:
        raise AssertionError(f"unknown store kind {request.param}")


@pytest.fixture
def server(store: Store, config: Config) -> Iterator[str]:
    """A real HTTP server on loopback around `store`; yields its base URL."""
    app_store = store
    if isinstance(store, PostgresStore):
        # A pool belongs to the event loop that opened it and the server runs its own loop,
        # so the app gets its own store on the same database.
        app_store = PostgresStore(store.config)
    with ServerThread(create_app(config, app_store)) as running:
        wait_until_healthy(running.base_url, path="/readyz")
        yield running.base_url


@pytest.fixture
async def client(server: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=server, limits=limits, timeout=30) as http:
        yield http


@pytest.fixture
def dedicated_pg() -> Iterator[DedicatedPostgres]:
    """A PostgreSQL of its own (not started yet) that the test may stop and start."""
    pg = DedicatedPostgres()
    try:
        yield pg
    finally:
        pg.close()
