"""Grouped issuance on PostgreSQL: batch boundaries, a user's duplicates inside one group, and
the fast paths that answer without a query."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

import coupon.store.postgres as pg_store_module
from coupon.campaigns import IssuedCoupon, IssueRequest
from coupon.errors import CampaignNotStarted, IdempotencyKeyReused, SoldOut
from coupon.store.pg_issuance import issue_group
from coupon.store.queries import queries
from tests.postgres import open_postgres_store
from tests.test_postgres_store import audit, campaign, sql

if TYPE_CHECKING:
    from collections.abc import Sequence

    from coupon.store.postgres import PostgresStore


async def test_one_group_with_duplicate_users_and_more_claims_than_coupons(pg_dsn: str) -> None:
    async with open_postgres_store(pg_dsn) as pg:
        created = await pg.create_campaign(campaign(3))
    calls = ["a", "a", None, "b", "a", None, "b"]
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        outcome = await issue_group(
            conn, queries(), uuid.UUID(created.id), [IssueRequest(user_id=u) for u in calls]
        )
    results = outcome.results
    # Claims in arrival order: a, anonymous#2, b, anonymous#5; three coupons: the last is out.
    assert [type(r).__name__ for r in results] == ["IssuedCoupon"] * 5 + ["SoldOut", "IssuedCoupon"]
    a_codes = {
        r.code for i, r in enumerate(results) if calls[i] == "a" and isinstance(r, IssuedCoupon)
    }
    b_codes = {
        r.code for i, r in enumerate(results) if calls[i] == "b" and isinstance(r, IssuedCoupon)
    }
    assert len(a_codes) == len(b_codes) == 1
    assert [r.repeat for r in results if isinstance(r, IssuedCoupon)] == [
        False,
        True,
        False,
        False,
        True,
        True,
    ]
    assert outcome.sold_out
    rows = await sql(pg_dsn, "SELECT seq, user_id FROM coupons ORDER BY seq")
    assert rows == [(1, "a"), (2, None), (3, "b")]
    assert await audit(pg_dsn) == []


async def test_one_group_shares_a_claim_per_idempotency_key(pg_dsn: str) -> None:
    async with open_postgres_store(pg_dsn) as pg:
        created = await pg.create_campaign(campaign(10))
        earlier = await pg.issue_coupon(created.id, IssueRequest(idempotency_key="old"))
    calls = [
        IssueRequest(idempotency_key="k1"),
        IssueRequest(user_id="u", idempotency_key="k2"),
        IssueRequest(idempotency_key="k1"),
        IssueRequest(user_id="v", idempotency_key="k2"),  # k2 belongs to u: refused
        IssueRequest(idempotency_key="old"),  # stored by an earlier group
        IssueRequest(user_id="u"),  # u's claim (made under k2)
        IssueRequest(user_id="w", idempotency_key="old"),  # "old" belongs to nobody: refused
    ]
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        outcome = await issue_group(conn, queries(), uuid.UUID(created.id), calls)
    k1, u_k2, k1_again, v_k2, old, u, w_old = outcome.results
    assert isinstance(k1, IssuedCoupon)
    assert isinstance(k1_again, IssuedCoupon)
    assert (k1_again.code, k1.repeat, k1_again.repeat) == (k1.code, False, True)
    assert isinstance(u_k2, IssuedCoupon)
    assert isinstance(u, IssuedCoupon)
    assert (u.code, u.repeat) == (u_k2.code, True)
    assert isinstance(old, IssuedCoupon)
    assert (old.code, old.repeat) == (earlier.code, True)
    assert isinstance(v_k2, IdempotencyKeyReused)
    assert isinstance(w_old, IdempotencyKeyReused)
    rows = await sql(pg_dsn, "SELECT user_id, idempotency_key FROM coupons ORDER BY seq")
    assert rows == [(None, "old"), (None, "k1"), ("u", "k2")]
    assert await sql(pg_dsn, "SELECT issued FROM campaigns") == [(3,)]
    assert await audit(pg_dsn) == []


async def test_users_who_already_hold_a_code_give_their_positions_back(pg_dsn: str) -> None:
    async with open_postgres_store(pg_dsn) as pg:
        created = await pg.create_campaign(campaign(3))
        first = await pg.issue_coupon(created.id, IssueRequest(user_id="holder"))
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        outcome = await issue_group(
            conn,
            queries(),
            uuid.UUID(created.id),
            [IssueRequest(user_id="holder"), IssueRequest(), IssueRequest(user_id="new")],
        )
    holder, anonymous, new = outcome.results
    assert isinstance(holder, IssuedCoupon)
    assert (holder.code, holder.repeat) == (first.code, True)
    assert isinstance(anonymous, IssuedCoupon)
    assert isinstance(new, IssuedCoupon)
    assert outcome.sold_out
    # Three claims took positions 2..4 of a campaign of 3; the holder's was given back.
    assert await sql(pg_dsn, "SELECT issued FROM campaigns") == [(3,)]
    assert [r[0] for r in await sql(pg_dsn, "SELECT seq FROM coupons ORDER BY seq")] == [1, 2, 3]
    assert await audit(pg_dsn) == []


@pytest.mark.parametrize(("total", "group_size", "callers"), [(10, 4, 40), (7, 3, 25), (1, 8, 30)])
async def test_racing_calls_in_small_groups_issue_exactly_total(
    pg_dsn: str, total: int, group_size: int, callers: int
) -> None:
    sizes: list[int] = []
    async with open_postgres_store(pg_dsn, max_group_size=group_size) as pg:
        pg._groups._on_group = sizes.append  # observe the groups actually formed
        created = await pg.create_campaign(campaign(total))
        users = [f"u{i % 5}" if i % 3 == 0 else None for i in range(callers)]
        results = await asyncio.gather(
            *(pg.issue_coupon(created.id, IssueRequest(user_id=user)) for user in users),
            return_exceptions=True,
        )
    assert max(sizes) <= group_size
    assert sum(sizes) == callers
    codes = {r.code for r in results if isinstance(r, IssuedCoupon)}
    refused = [r for r in results if not isinstance(r, IssuedCoupon)]
    assert all(isinstance(r, SoldOut) for r in refused)
    assert len(codes) == total
    for user in set(filter(None, users)):
        got = {
            r.code
            for u, r in zip(users, results, strict=True)
            if u == user and isinstance(r, IssuedCoupon)
        }
        assert len(got) <= 1
    assert await sql(
        pg_dsn, "SELECT issued, count(*) FROM coupons JOIN campaigns c ON true GROUP BY issued"
    ) == [(total, total)]
    assert await audit(pg_dsn) == []


@pytest.fixture
def issuance_queries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the issuance transactions the store starts."""
    started: list[int] = []

    async def counting(
        conn: Any, sql_: Any, cid: uuid.UUID, calls: Sequence[IssueRequest], **kwargs: Any
    ) -> Any:
        started.append(len(calls))
        return await issue_group(conn, sql_, cid, calls, **kwargs)

    monkeypatch.setattr(pg_store_module, "issue_group", counting)
    return started


async def test_a_sold_out_campaign_answers_without_a_query(
    pg_dsn: str, issuance_queries: list[int]
) -> None:
    async with open_postgres_store(pg_dsn) as pg:
        created = await pg.create_campaign(campaign(1))
        held = await pg.issue_coupon(created.id, IssueRequest(user_id="winner"))
        with pytest.raises(SoldOut):
            await pg.issue_coupon(created.id, IssueRequest())
        transactions = len(issuance_queries)
        for _ in range(50):
            with pytest.raises(SoldOut):
                await pg.issue_coupon(created.id, IssueRequest())
        assert len(issuance_queries) == transactions
        # A user may hold a code, so a user's call still asks the database.
        again = await pg.issue_coupon(created.id, IssueRequest(user_id="winner"))
        assert (again.code, again.repeat) == (held.code, True)
        assert len(issuance_queries) == transactions + 1


async def test_a_start_far_ahead_is_refused_without_a_query_near_it_the_database_decides(
    pg_dsn: str, issuance_queries: list[int]
) -> None:
    (db_now,) = (await sql(pg_dsn, "SELECT now()"))[0]
    async with open_postgres_store(pg_dsn, start_margin_s=2.0) as pg:
        far: PostgresStore = pg
        later = await far.create_campaign(campaign(5, start_time=db_now + timedelta(hours=1)))  # type: ignore[operator]
        with pytest.raises(CampaignNotStarted):
            await far.issue_coupon(later.id, IssueRequest())
        assert issuance_queries == []
        # Within the margin this host cannot be sure, so the database clock decides.
        near = await far.create_campaign(campaign(5, start_time=db_now + timedelta(seconds=1)))  # type: ignore[operator]
        await sql(
            pg_dsn,
            "UPDATE campaigns SET start_time = now() - interval '1 s' WHERE id = %s",
            near.id,
        )
        issued = await far.issue_coupon(near.id, IssueRequest())
        assert issued.code
        assert issuance_queries == [1]
