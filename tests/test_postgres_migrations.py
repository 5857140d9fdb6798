"""The migration path from a database made by the v1 release (0001 only, with data) to now."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import psycopg

from coupon.campaigns import CouponState, IssueRequest
from coupon.codes import new_code
from coupon.store.migrations import apply_migrations
from coupon.store.queries import migrations, queries
from tests.postgres import open_postgres_store
from tests.test_postgres_store import audit, sql

V1_START = datetime(2026, 1, 1, tzinfo=UTC)


async def make_v1_database(dsn: str) -> tuple[uuid.UUID, list[str]]:
    """What the v1 release left behind: migration 0001 applied and a campaign with codes."""
    await sql(dsn, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    first = migrations()[0]
    assert first.version == 1
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(queries()["create_migrations_table"])
        await conn.execute(first.sql)
        await conn.execute(queries()["record_migration"], {"version": 1, "name": first.name})
        campaign_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO campaigns (id, name, total, issued, start_time) VALUES (%s, %s, 3, 2, %s)",
            (campaign_id, "from v1", V1_START),
        )
        codes = [new_code(), new_code()]
        for seq, (code, user) in enumerate(zip(codes, ["alice", None], strict=True), start=1):
            await conn.execute(
                "INSERT INTO coupons (code, campaign_id, seq, user_id, issued_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (code, campaign_id, seq, user, V1_START),
            )
    return campaign_id, codes


async def test_a_v1_database_migrates_and_its_campaigns_live_on(pg_dsn: str) -> None:
    campaign_id, (alice_code, anonymous_code) = await make_v1_database(pg_dsn)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        applied = await apply_migrations(conn)
    assert applied == [m.version for m in migrations()[1:]]
    assert applied
    rows = await sql(pg_dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in migrations()]

    async with open_postgres_store(pg_dsn) as pg:
        page = await pg.get_campaign(str(campaign_id), 0, 10, brand=None)
        old = page.campaign
        assert (old.name, old.total, old.issued, old.redeemed) == ("from v1", 3, 2, 0)
        assert (old.end_time, old.discount, dict(old.metadata), old.brand) == (None, None, {}, "")
        assert page.codes == [alice_code, anonymous_code]
        listed = await pg.list_campaigns(None, 10, brand=None)
        assert [c.id for c in listed.campaigns] == [str(campaign_id)]
        assert await pg.list_campaigns(None, 10, brand="acme") == type(listed)([], None)

        # v1's codes and users carry over: a repeat, a redemption, an idempotent new code.
        again = await pg.issue_coupon(str(campaign_id), IssueRequest(user_id="alice"))
        assert (again.code, again.repeat) == (alice_code, True)
        await pg.redeem_coupon(alice_code, "order-1", "alice", brand=None)
        coupon = await pg.get_coupon(alice_code, brand=None)
        assert (coupon.state, coupon.order_id, coupon.user_id) == (
            CouponState.REDEEMED,
            "order-1",
            "alice",
        )
        keyed = await pg.issue_coupon(str(campaign_id), IssueRequest(idempotency_key="k"))
        assert (
            await pg.issue_coupon(str(campaign_id), IssueRequest(idempotency_key="k"))
        ).code == (keyed.code)
        page = await pg.get_campaign(str(campaign_id), 0, 10, brand=None)
        assert (page.campaign.issued, page.campaign.redeemed) == (3, 1)
    assert await audit(pg_dsn) == []


async def test_0003_counts_what_is_already_redeemed(pg_dsn: str) -> None:
    """A database at 0002 (whose redeemedCount was a count of codes) with redeemed codes."""
    await sql(pg_dsn, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(queries()["create_migrations_table"])
        for migration in migrations()[:2]:
            await conn.execute(migration.sql)
            await conn.execute(
                queries()["record_migration"],
                {"version": migration.version, "name": migration.name},
            )
        campaign_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO campaigns (id, name, total, issued, start_time)"
            " VALUES (%s, 'at 0002', 40, 40, %s)",
            (campaign_id, V1_START),
        )
        for seq in range(1, 41):
            order = f"o{seq}" if seq % 3 == 0 else None  # 13 redeemed, spread over the shards
            await conn.execute(
                "INSERT INTO coupons (code, campaign_id, seq, issued_at, order_id, redeemed_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (new_code(), campaign_id, seq, V1_START, order, V1_START if order else None),
            )
        assert [m.version for m in migrations()[2:]] == await apply_migrations(conn)
    async with open_postgres_store(pg_dsn) as pg:
        page = await pg.get_campaign(str(campaign_id), 0, 1, brand=None)
        assert page.campaign.redeemed == 13
        code = (await sql(pg_dsn, "SELECT code FROM coupons WHERE order_id = 'o3'"))[0][0]
        await pg.cancel_redemption(str(code), "o3", brand=None)
        assert (await pg.get_campaign(str(campaign_id), 0, 1, brand=None)).campaign.redeemed == 12
