"""The coupon's life at the Store interface, on every store: expiry at the end instant (the
store's clock decides: a manual clock in memory, the database clock on PostgreSQL), brand
scope, and the redemption history; and, in memory, coupons kept out of the garbage collector's
rescans."""

from __future__ import annotations

import gc
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
import pytest

from coupon.campaigns import Campaign, CouponState, Discount, IssueRequest, NewCampaign
from coupon.clock import ManualClock
from coupon.errors import (
    CampaignEnded,
    CampaignNotFound,
    CouponExpired,
    CouponNotFound,
)
from coupon.store.memory import MemoryStore
from tests.postgres import open_postgres_store
from tests.test_postgres_store import sql
from tests.test_redemption_races import redemption_audit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from coupon.store import Store
    from coupon.store.postgres import PostgresStore


@dataclass
class Engine:
    """A store plus the two things a test needs that the Store interface does not offer."""

    store: Store
    end_now: Callable[[str], Awaitable[None]]  # make the campaign's end instant pass
    history: Callable[[], Awaitable[list[tuple[str, str, str]]]]  # (code, order, action)


@pytest.fixture(params=["memory", "postgres"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    if request.param == "memory":
        clock = ManualClock(datetime.now(UTC))
        memory = MemoryStore(clock)

        async def end_memory(campaign_id: str) -> None:
            clock.set(clock() + timedelta(days=2))

        async def memory_history() -> list[tuple[str, str, str]]:
            return [(h.code, h.order_id, h.action) for h in memory.history]

        yield Engine(memory, end_memory, memory_history)
        return
    dsn = request.getfixturevalue("pg_dsn")
    async with open_postgres_store(dsn) as pg:

        async def end_postgres(campaign_id: str) -> None:
            # The database clock decides: the end instant becomes "now" by that clock.
            await sql(dsn, "UPDATE campaigns SET end_time = now() WHERE id = %s", campaign_id)

        async def pg_history() -> list[tuple[str, str, str]]:
            rows = await sql(dsn, "SELECT code, order_id, action FROM redemptions ORDER BY id")
            return [(str(c), str(o), str(a)) for c, o, a in rows]

        yield Engine(pg, end_postgres, pg_history)


def new_campaign(total: int = 10, brand: str = "", ends: bool = True) -> NewCampaign:
    return NewCampaign.validate(
        name="life",
        total=total,
        start_time=None,
        end_time=datetime.now(UTC) + timedelta(days=1) if ends else None,
        discount=Discount.percent(10),
        brand=brand,
        max_total=1000,
    )


async def test_from_the_end_instant_nothing_is_issued_or_redeemed_but_holders_keep_theirs(
    engine: Engine,
) -> None:
    store = engine.store
    created = await store.create_campaign(new_campaign())
    alice = await store.issue_coupon(created.id, IssueRequest(user_id="alice"))
    keyed = await store.issue_coupon(created.id, IssueRequest(idempotency_key="k"))
    held = await store.issue_coupon(created.id, IssueRequest())
    assert alice.expires_at == created.end_time
    assert alice.discount == Discount.percent(10)
    redemption = await store.redeem_coupon(held.code, "o1", None, brand=None)

    await engine.end_now(created.id)

    with pytest.raises(CampaignEnded):
        await store.issue_coupon(created.id, IssueRequest())
    with pytest.raises(CampaignEnded):
        await store.issue_coupon(created.id, IssueRequest(user_id="bob"))
    again = await store.issue_coupon(created.id, IssueRequest(user_id="alice"))
    assert (again.code, again.repeat) == (alice.code, True)
    assert (await store.issue_coupon(created.id, IssueRequest(idempotency_key="k"))).code == (
        keyed.code
    )
    assert (await store.get_coupon(alice.code, brand=None)).state is CouponState.EXPIRED
    with pytest.raises(CouponExpired):
        await store.redeem_coupon(alice.code, "o2", "alice", brand=None)
    # The order that redeemed before the end still gets its answer, and may give the code back.
    assert await store.redeem_coupon(held.code, "o1", None, brand=None) == redemption
    assert (await store.get_coupon(held.code, brand=None)).state is CouponState.REDEEMED
    cancelled = await store.cancel_redemption(held.code, "o1", brand=None)
    assert cancelled.state is CouponState.EXPIRED
    with pytest.raises(CouponExpired):
        await store.redeem_coupon(held.code, "o1", None, brand=None)
    page = await store.get_campaign(created.id, 0, 10, brand=None)
    assert (page.campaign.issued, page.campaign.redeemed) == (3, 0)


async def test_a_brand_sees_only_its_own_campaigns_and_codes(engine: Engine) -> None:
    store = engine.store
    acme = [await store.create_campaign(new_campaign(brand="acme")) for _ in range(3)]
    beta = await store.create_campaign(new_campaign(brand="beta"))
    plain = await store.create_campaign(new_campaign(ends=False))
    code = (await store.issue_coupon(beta.id, IssueRequest())).code

    def newest_first(campaigns: list[Campaign]) -> list[str]:
        # Campaigns created at the same instant (one manual clock tick) are ordered by id.
        return [c.id for c in sorted(campaigns, key=lambda c: (c.created_at, c.id), reverse=True)]

    listed = await store.list_campaigns(None, 10, brand="acme")
    assert [c.id for c in listed.campaigns] == newest_first(acme)
    assert listed.next is None
    everything = newest_first([*acme, beta, plain])
    first = await store.list_campaigns(None, 2, brand=None)
    assert [c.id for c in first.campaigns] == everything[:2]
    rest = await store.list_campaigns(first.next, 10, brand=None)
    assert [c.id for c in rest.campaigns] == everything[2:]
    assert rest.next is None
    by_id = {c.id: c for c in first.campaigns + rest.campaigns}
    assert by_id[beta.id].issued == 1
    assert (by_id[acme[0].id].brand, by_id[plain.id].brand) == ("acme", "")
    assert by_id[acme[0].id].discount == Discount.percent(10)

    with pytest.raises(CampaignNotFound):
        await store.get_campaign(beta.id, 0, 10, brand="acme")
    assert (await store.get_campaign(beta.id, 0, 10, brand="beta")).codes == [code]
    with pytest.raises(CouponNotFound):
        await store.get_coupon(code, brand="acme")
    with pytest.raises(CouponNotFound):
        await store.redeem_coupon(code, "o", None, brand="acme")
    with pytest.raises(CouponNotFound):
        await store.cancel_redemption(code, "o", brand="acme")
    assert (await store.get_coupon(code, brand="beta")).state is CouponState.ISSUED
    await store.redeem_coupon(code, "o", None, brand="beta")
    assert (await store.cancel_redemption(code, "o", brand=None)).state is CouponState.ISSUED


async def test_the_history_holds_each_redemption_and_cancellation_once(engine: Engine) -> None:
    store = engine.store
    created = await store.create_campaign(new_campaign())
    code = (await store.issue_coupon(created.id, IssueRequest())).code
    await store.redeem_coupon(code, "o1", None, brand=None)
    await store.redeem_coupon(code, "o1", None, brand=None)  # the same answer, no new entry
    await store.cancel_redemption(code, "o1", brand=None)
    await store.cancel_redemption(code, "o1", brand=None)  # a no-op
    await store.redeem_coupon(code, "o2", None, brand=None)
    assert await engine.history() == [
        (code, "o1", "redeem"),
        (code, "o1", "cancel"),
        (code, "o2", "redeem"),
    ]


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    async with open_postgres_store(pg_dsn) as store:
        yield store


async def test_the_history_table_refuses_updates_and_deletes(
    pg: PostgresStore, pg_dsn: str
) -> None:
    created = await pg.create_campaign(new_campaign())
    code = (await pg.issue_coupon(created.id, IssueRequest())).code
    await pg.redeem_coupon(code, "o1", None, brand=None)
    for statement in (
        "UPDATE redemptions SET order_id = 'forged'",
        "DELETE FROM redemptions",
        "TRUNCATE redemptions",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await sql(pg_dsn, statement)
    assert await sql(pg_dsn, "SELECT order_id, action FROM redemptions") == [("o1", "redeem")]


@pytest.mark.parametrize(
    "assignment",
    [
        "discount_percent_off = 0",
        "discount_percent_off = 101",
        "discount_currency = 'KRW', discount_minor_units = 10",  # and 10 percent: two kinds
        "discount_percent_off = NULL, discount_currency = 'KRW'",
        "discount_percent_off = NULL, discount_currency = 'krw', discount_minor_units = 10",
        "discount_percent_off = NULL, discount_currency = 'KRW', discount_minor_units = 0",
        "end_time = start_time",
        "metadata = '[1]'",
    ],
)
async def test_the_database_refuses_malformed_campaign_fields(
    pg: PostgresStore, pg_dsn: str, assignment: str
) -> None:
    created = await pg.create_campaign(new_campaign())
    with pytest.raises(psycopg.errors.CheckViolation):
        await sql(
            pg_dsn,
            f"UPDATE campaigns SET {assignment} WHERE id = %s",
            created.id,
        )


async def test_a_code_held_by_an_order_is_refused_by_the_database_without_a_time(
    pg: PostgresStore, pg_dsn: str
) -> None:
    created = await pg.create_campaign(new_campaign())
    code = (await pg.issue_coupon(created.id, IssueRequest())).code
    with pytest.raises(psycopg.errors.CheckViolation):
        await sql(pg_dsn, "UPDATE coupons SET order_id = 'o' WHERE code = %s", code)


async def test_the_documented_audit_finds_a_forged_redemption(
    pg: PostgresStore, pg_dsn: str
) -> None:
    created = await pg.create_campaign(new_campaign())
    code = (await pg.issue_coupon(created.id, IssueRequest())).code
    await pg.redeem_coupon(code, "o1", None, brand=None)
    assert await redemption_audit(pg_dsn) == []
    # Behind the store's back: a second order "redeems" the held code, and the coupon is freed.
    await sql(
        pg_dsn, "INSERT INTO redemptions (code, order_id, action) VALUES (%s, 'o2', 'redeem')", code
    )
    await sql(
        pg_dsn, "UPDATE coupons SET order_id = NULL, redeemed_at = NULL WHERE code = %s", code
    )
    found = await redemption_audit(pg_dsn)
    assert (code, "o2", "redeem", "o1", "redeem") in found  # redeemed while held
    assert (code, None, "o2", "redeem") in found  # the history says o2 holds it
    assert (uuid.UUID(created.id), 1, 0) in found  # counted 1, held 0


async def test_the_memory_stores_coupons_are_not_rescanned_by_the_garbage_collector() -> None:
    """Each full garbage collection rescans every object the collector tracks, while every
    call waits: with a tracked object per coupon, one took 760 ms in a server holding a million
    coupons. Issued and redeemed coupons, whoever took them, must not add a tracked object
    each."""
    store = MemoryStore()

    async def issue_and_redeem(coupons: int, redemptions: int) -> list[str]:
        created = await store.create_campaign(new_campaign(total=coupons))
        codes = []
        for n in range(coupons // 3):
            anonymous, by_user = IssueRequest(), IssueRequest(user_id=f"u{n}")
            for request in (anonymous, by_user, IssueRequest(idempotency_key=f"k{n}")):
                codes.append((await store.issue_coupon(created.id, request)).code)
        for n, code in enumerate(codes[::3][:redemptions]):  # the anonymous ones
            await store.redeem_coupon(code, f"order-{n}", None, brand=None)
        return codes

    await issue_and_redeem(30, 1)  # first calls import and cache what later calls reuse
    gc.collect()
    tracked_before = len(gc.get_objects())
    codes = await issue_and_redeem(900, 100)
    gc.collect()
    grown = len(gc.get_objects()) - tracked_before
    assert len(set(codes)) == 900
    # The redemption history, an entry per redemption, is not the coupons': 100 of these.
    assert grown < 150, f"{grown} more tracked objects after issuing 900 coupons"
