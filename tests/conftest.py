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
from tests.support import ServerThread

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from coupon.store import Store

STORE_KINDS = ["memory"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 21, 9, 0, tzinfo=UTC))


@pytest.fixture
def config() -> Config:
    return replace(Config(), limits=LimitsConfig(max_total=1_000_000, max_request_bytes=16 * 1024))


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest) -> Store:
    """A fresh store of each engine; the memory store runs on the real clock here."""
    if request.param == "memory":
        return MemoryStore()
    raise AssertionError(f"unknown store kind {request.param}")


@pytest.fixture
def server(store: Store, config: Config) -> Iterator[str]:
    """A real HTTP server on loopback around `store`; yields its base URL."""
    with ServerThread(create_app(config, store)) as running:
        yield running.base_url


@pytest.fixture
async def client(server: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=server, limits=limits, timeout=30) as http:
        yield http
