"""The issue's smaller items: sanitized driver warnings, the pool metric, bounded caches,
the not-found cache and start-up refusal of nonsensical config values."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import pytest

from coupon.campaigns import IssueRequest
from coupon.config import ConfigError, load_config
from coupon.errors import CampaignNotFound
from coupon.store.cache import BoundedCache
from tests.postgres import free_port, open_postgres_store
from tests.server_process import ServerProcess
from tests.support import give_up_after

if TYPE_CHECKING:
    from pathlib import Path


def test_the_pools_warnings_name_no_host_port_or_user(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here: every connection attempt fails
    dsn = f"postgresql://secretuser:secretpw@127.0.0.1:{port}/secretdb"
    with ServerProcess(tmp_path, dsn, workers=1) as server:
        server.wait_for("/healthz", 200)
        deadline = time.monotonic() + 60
        while "error connecting" not in server.log():
            give_up_after(deadline, "the pool's connection warning")
            time.sleep(0.05)  # polling interval
        log = server.log()

    warnings = [line for line in log.splitlines() if "psycopg" in line]
    print(f"\npool warning as logged: {warnings[:1]}")
    for secret in ("secretuser", "secretpw", "secretdb", str(port)):
        assert secret not in log, secret
    assert "details withheld" in log


async def test_the_pool_connections_metric_is_written(pg_dsn: str) -> None:
    from coupon import metrics

    async with open_postgres_store(pg_dsn, pool_min_size=2) as pg:
        await pg.is_ready()
        values = {
            state: metrics.POOL_CONNECTIONS.labels(state)._value.get()
            for state in ("idle", "used", "waiting")
        }
    assert values["idle"] + values["used"] >= 1
    assert values["waiting"] == 0


def test_a_bounded_cache_forgets_the_least_recently_used_and_the_expired() -> None:
    now = [0.0]
    cache: BoundedCache[str, int] = BoundedCache(3, ttl_s=10.0, monotonic=lambda: now[0])
    for n, key in enumerate("abcd"):
        cache.put(key, n)
    assert len(cache) == 3
    assert cache.get("a") is None  # evicted: the oldest
    assert cache.get("b") == 1
    now[0] = 10.0
    assert cache.get("c") is None  # expired
    assert "b" not in cache


async def test_an_unknown_campaign_id_is_refused_from_the_cache_within_its_ttl(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coupon.store.postgres as pg_module

    groups: list[int] = []
    original = pg_module.issue_group

    async def counting(*args: object, **kwargs: object) -> object:
        groups.append(1)
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pg_module, "issue_group", counting)
    unknown = str(uuid.uuid4())
    async with open_postgres_store(pg_dsn) as pg:
        for _ in range(20):
            with pytest.raises(CampaignNotFound):
                await pg.issue_coupon(unknown, IssueRequest())
    assert len(groups) == 1  # one transaction, then the cache answered


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("database.max_group_size", 0),
        ("database.max_group_size", -5),
        ("database.start_margin_s", -1),
        ("database.start_margin_s", ".nan"),
        ("database.connect_timeout_s", 0),
        ("database.call_timeout_s", 0),
        ("database.statement_timeout_s", -1),
        ("database.keepalive_count", 0),
        ("server.log_level", "loud"),
        ("server.header_timeout_s", 0),
        ("server.body_timeout_s", ".inf"),
        ("server.max_connections", 0),
        ("server.keepalive_timeout_s", 0),
    ],
)
def test_nonsensical_values_are_refused_at_start_up_naming_the_key(
    tmp_path: Path, key: str, value: object
) -> None:
    section, name = key.split(".")
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, environ={})


def test_a_server_with_a_bad_value_exits_2_with_a_message_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "config.yaml"
    path.write_text("database:\n  max_group_size: 0\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "coupon.server", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "database.max_group_size" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_call_waiting_for_another_callers_migration_gives_up_at_its_bound(
    pg_dsn: str,
) -> None:
    from coupon.config import DatabaseConfig
    from coupon.errors import StoreUnavailable
    from coupon.store.postgres import PostgresStore

    store = PostgresStore(DatabaseConfig(dsn=pg_dsn, call_timeout_s=0.2))
    # A first migration that never ends (the lock its callers queue on is held meanwhile).
    await store._migration_lock.acquire()
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.issue_coupon(str(uuid.uuid4()), IssueRequest()), 30)
        assert not await asyncio.wait_for(store.is_ready(), 30)
    finally:
        store._migration_lock.release()
