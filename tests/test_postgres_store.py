"""Postgres-only behaviour: database clock, migrations, audits, collisions, paging, secrecy."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import psycopg
import pytest

import coupon.store.pg_issuance as pg_issuance
from coupon import metrics
from coupon.campaigns import IssueRequest, NewCampaign
from coupon.clock import ManualClock
from coupon.config import DatabaseConfig
from coupon.errors import CampaignNotStarted, SoldOut, StoreUnavailable
from coupon.store.migrations import apply_migrations
from coupon.store.postgres import PostgresStore
from coupon.store.queries import migrations
from tests.postgres import free_port, open_postgres_store

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from datetime import datetime


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    async with open_postgres_store(pg_dsn, pool_max_size=10) as store:
        yield store


def campaign(total: int, start_time: datetime | None = None) -> NewCampaign:
    return NewCampaign.validate(name="storm", total=total, start_time=start_time, max_total=10**7)


async def sql(dsn: str, query: str, *params: object) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(query, params or None)  # type: ignore[arg-type]
        return await cursor.fetchall() if cursor.description else []


async def audit(dsn: str) -> list[tuple[object, ...]]:
    """Campaigns breaking `issued = count(codes)` or `issued <= total` (expected: none)."""
    return await sql(
        dsn,
        """
        SELECT c.id, c.total, c.issued, count(cp.code)
        FROM campaigns c LEFT JOIN coupons cp ON cp.campaign_id = c.id
        GROUP BY c.id
        HAVING c.issued <> count(cp.code) OR c.issued > c.total
        """,
    )


async def test_start_instant_is_decided_by_the_database_clock(pg_dsn: str):
    (db_now,) = (await sql(pg_dsn, "SELECT now()"))[0]
    # This host's clock runs a day ahead: it must not open the campaign early.
    clock = ManualClock(db_now + timedelta(days=1))  # type: ignore[operator]
    async with open_postgres_store(pg_dsn, clock=clock) as pg:
        created = await pg.create_campaign(campaign(5, start_time=db_now + timedelta(hours=1)))  # type: ignore[operator]

        with pytest.raises(CampaignNotStarted):
            await pg.issue_coupon(created.id, IssueRequest())
    await sql(pg_dsn, "UPDATE campaigns SET start_time = now() WHERE id = %s", created.id)
    async with open_postgres_store(pg_dsn, clock=clock) as pg:
        issued = await pg.issue_coupon(created.id, IssueRequest())

    assert issued.code
    assert (await sql(pg_dsn, "SELECT issued FROM campaigns"))[0] == (1,)


async def test_a_host_clock_behind_the_database_does_not_refuse_an_open_campaign(pg_dsn: str):
    (db_now,) = (await sql(pg_dsn, "SELECT now()"))[0]
    # This host's clock runs ten minutes behind, far more than start_margin_s.
    clock = ManualClock(db_now - timedelta(minutes=10))  # type: ignore[operator]
    async with open_postgres_store(pg_dsn, clock=clock, start_margin_s=2.0) as pg:
        created = await pg.create_campaign(campaign(5, start_time=db_now))
        issued = await pg.issue_coupon(created.id, IssueRequest())
        skew = metrics.DB_CLOCK_SKEW._value.get()

    assert issued.code
    # Learnt from the readiness check and the group: the database is ~600 s ahead.
    assert timedelta(minutes=9) < timedelta(seconds=skew) < timedelta(minutes=11)


async def test_migrations_twice_are_a_no_op_and_concurrent_runs_are_safe(pg_dsn: str):
    # The template already holds every migration: running them again applies nothing.
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        assert await apply_migrations(conn) == []

    # Back to an empty database, whatever later migrations add.
    await sql(pg_dsn, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    conns = [await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) for _ in range(6)]
    try:
        applied = await asyncio.gather(*(apply_migrations(c) for c in conns))
    finally:
        for c in conns:
            await c.close()

    all_versions = [m.version for m in migrations()]
    assert sorted(v for run in applied for v in run) == all_versions  # exactly one run applied
    rows = await sql(pg_dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == all_versions


async def test_concurrent_issuance_passes_the_sql_audit(pg: PostgresStore, pg_dsn: str):
    created = [await pg.create_campaign(campaign(total)) for total in (50, 120)]

    async def issue(campaign_id: str) -> str | None:
        try:
            return (await pg.issue_coupon(campaign_id, IssueRequest())).code
        except SoldOut:
            return None

    results = await asyncio.gather(*(issue(c.id) for c in created for _ in range(200)))

    codes = [r for r in results if r is not None]
    assert len(codes) == len(set(codes)) == 170
    assert await audit(pg_dsn) == []
    rows = await sql(pg_dsn, "SELECT total, issued FROM campaigns ORDER BY total")
    assert rows == [(50, 50), (120, 120)]


async def test_code_collision_is_retried_with_a_fresh_code(
    pg: PostgresStore, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    first = await pg.create_campaign(campaign(3))
    second = await pg.create_campaign(campaign(3))
    taken = (await pg.issue_coupon(first.id, IssueRequest())).code
    fresh = "가나다라마바사아자0"
    draws = iter([taken, taken, fresh])
    monkeypatch.setattr(pg_issuance, "new_code", lambda: next(draws))

    issued = await pg.issue_coupon(second.id, IssueRequest())

    assert issued.code == fresh
    assert await audit(pg_dsn) == []
    rows = await sql(pg_dsn, "SELECT seq FROM coupons WHERE campaign_id = %s", second.id)
    assert rows == [(1,)]


async def test_concurrent_calls_of_one_user_consume_exactly_one(pg: PostgresStore, pg_dsn: str):
    created = await pg.create_campaign(campaign(5))

    results = await asyncio.gather(
        *(pg.issue_coupon(created.id, IssueRequest(user_id="alice")) for _ in range(20))
    )

    assert len({r.code for r in results}) == 1
    assert (await sql(pg_dsn, "SELECT issued FROM campaigns"))[0] == (1,)
    assert await audit(pg_dsn) == []


async def test_a_holder_gets_the_code_back_when_sold_out(pg: PostgresStore):
    created = await pg.create_campaign(campaign(2))
    held = await pg.issue_coupon(created.id, IssueRequest(user_id="alice"))
    await pg.issue_coupon(created.id, IssueRequest())

    assert (await pg.issue_coupon(created.id, IssueRequest(user_id="alice"))).code == held.code
    with pytest.raises(SoldOut):
        await pg.issue_coupon(created.id, IssueRequest(user_id="bob"))


async def test_paging_during_issuance_returns_every_code_once_in_order(
    pg: PostgresStore, pg_dsn: str
):
    total = 2000
    created = await pg.create_campaign(campaign(total))
    done = asyncio.Event()

    async def issue_all() -> None:
        sem = asyncio.Semaphore(20)

        async def one() -> None:
            async with sem:
                await pg.issue_coupon(created.id, IssueRequest())

        await asyncio.gather(*(one() for _ in range(total)))
        done.set()

    async def page_all() -> list[str]:
        seen: list[str] = []
        after = 0
        while True:
            finished = done.is_set()  # read before the page: a page after it sees everything
            page = await pg.get_campaign(created.id, after, 250, brand=None)
            seen.extend(page.codes)
            after = page.last_seq
            if finished and not page.has_more:
                return seen
            if not page.codes:
                await asyncio.sleep(0.005)  # let the issuers run before asking again

    _, seen = await asyncio.gather(issue_all(), page_all())

    stored = await sql(pg_dsn, "SELECT code FROM coupons ORDER BY seq")
    assert len(seen) == len(set(seen)) == total
    assert seen == [r[0] for r in stored]


async def test_no_dsn_or_password_in_logs_or_errors(caplog: pytest.LogCaptureFixture):
    password = "s3cr3t-Pa55word"
    dsn = f"postgresql://coupon:{password}@127.0.0.1:{free_port()}/coupon"
    caplog.set_level(logging.DEBUG)
    store = PostgresStore(DatabaseConfig(dsn=dsn, connect_timeout_s=1), retry_initial_s=0.05)
    await store.open()  # must not fail with the database down
    try:
        async with asyncio.timeout(15):
            while "postgres unreachable" not in caplog.text:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # polling the log, bounded by the timeout
        assert not await store.is_ready()
        with pytest.raises(StoreUnavailable) as caught:
            await store.create_campaign(campaign(1))
        errors = [str(caught.value)]
        store._migrated = True  # reach the pool itself, past the readiness gate
        for call in (
            store.issue_coupon("0b9a6a4e-64a4-4f3e-9c39-3a0c3b3c0f8e", IssueRequest()),
            store.get_campaign("0b9a6a4e-64a4-4f3e-9c39-3a0c3b3c0f8e", 0, 10, brand=None),
        ):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            errors.append(str(caught.value))
            assert caught.value.__cause__ is None
            assert caught.value.__suppress_context__
    finally:
        await store.close()

    for text in [*errors, caplog.text]:
        assert password not in text
        assert dsn not in text
    assert set(errors) == {StoreUnavailable().message}
