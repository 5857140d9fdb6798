"""The PostgreSQL store: exact issuance across processes and hosts sharing one database.

IssueCoupon calls of one campaign that arrive together are written in one transaction
(coupon.store.grouping, coupon.store.pg_issuance): one conditional increment of `issued` by as
many as can still be granted, one multi-row insert, one commit. Replies are built only after
COMMIT, so an acknowledged code is always stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool

from coupon import metrics
from coupon.campaigns import Campaign, CampaignPage, IssuedCoupon, IssueRequest
from coupon.clock import Clock, system_clock
from coupon.errors import (
    CampaignNotFound,
    CampaignNotStarted,
    CouponError,
    SoldOut,
    StoreUnavailable,
)
from coupon.store import pg_lifecycle
from coupon.store.grouping import GroupRunner
from coupon.store.migrations import apply_migrations
from coupon.store.pg_issuance import CampaignFacts, issue_group
from coupon.store.queries import queries

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

    from psycopg import AsyncConnection

    from coupon.campaigns import (
        CampaignList,
        Coupon,
        ListCursor,
        NewCampaign,
        Redemption,
    )
    from coupon.config import DatabaseConfig

log = logging.getLogger("coupon.store.postgres")

READY_CHECK_TIMEOUT_S = 2.0
# psycopg_pool retries a failed connection with doubling delays until this many seconds have
# passed (default 300), then frees the slot, and the next request starts a fresh attempt.
# Kept short so that, after an outage, a slot is never parked in a minute-long backoff while
# the database is back: service resumes within seconds.
RECONNECT_TIMEOUT_S = 10.0


@contextlib.contextmanager
def wrap_exceptions() -> Iterator[None]:
    """Turn connection-level driver errors into StoreUnavailable.

    This is the one place driver errors are translated. The driver's text may hold the host,
    user or SQL, so it is dropped (`from None`) rather than passed on to clients or logs.
    PoolTimeout, PoolClosed and TooManyRequests are OperationalErrors too.
    """
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError):
        raise StoreUnavailable() from None


class PostgresStore:
    def __init__(
        self,
        config: DatabaseConfig,
        *,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 5.0,
        clock: Clock = system_clock,
    ) -> None:
        self.config = config
        self._clock = clock
        # Clocks of app hosts and the database may differ a little: only refuse "not started"
        # locally when the start is further away than any sane skew.
        self._start_margin = timedelta(seconds=config.start_margin_s)
        self._facts: dict[uuid.UUID, CampaignFacts] = {}
        self._sold_out: set[uuid.UUID] = set()
        self._groups: GroupRunner[uuid.UUID, IssueRequest, IssuedCoupon] = GroupRunner(
            self._issue_group,
            max_group_size=config.max_group_size,
            on_group=metrics.GROUP_SIZE.observe,
        )
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._sql = queries()
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            config.dsn,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            open=False,
            # A connection broken while idle in the pool (database restarted) is found and
            # replaced here instead of failing the next request.
            check=AsyncConnectionPool.check_connection,
            # Bounded wait for a connection: when the database is gone, callers get
            # `unavailable` quickly instead of queueing for the default 30 s.
            timeout=config.connect_timeout_s,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            kwargs={
                "autocommit": True,  # transactions are explicit: conn.transaction()
                "connect_timeout": config.connect_timeout_s,
                "application_name": "coupon-issuer",
            },
            name="coupon",
        )
        self._migrated = False
        self._migration_lock = asyncio.Lock()
        self._prepare_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        # wait=False: start-up must not fail when the database is down; the pool keeps
        # connecting in the background and the migrations retry until they succeed.
        await self._pool.open(wait=False)
        self._prepare_task = asyncio.create_task(self._prepare(), name="coupon-pg-migrations")

    async def close(self) -> None:
        # Calls already queued or in a transaction get their answers before the pool goes.
        await self._groups.drain()
        if self._prepare_task is not None:
            self._prepare_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prepare_task
            self._prepare_task = None
        await self._pool.close()

    async def is_ready(self) -> bool:
        try:
            await self._ensure_migrated(wait_s=READY_CHECK_TIMEOUT_S)
            async with self._connection(wait_s=READY_CHECK_TIMEOUT_S) as conn:
                await conn.execute(self._q("ping"))
        except StoreUnavailable:
            return False
        return True

    async def _prepare(self) -> None:
        delay = self._retry_initial_s
        while not self._migrated:
            try:
                await self._ensure_migrated()
            except StoreUnavailable:
                log.warning("postgres unreachable; retrying in %gs", delay)
            except psycopg.Error as e:
                # The class name only: the driver's message may carry host, user or SQL.
                log.error(
                    "postgres migration failed (%s); retrying in %gs", type(e).__name__, delay
                )
            else:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _ensure_migrated(self, wait_s: float | None = None) -> None:
        """Apply pending migrations unless this process already has.

        Called by the background retry loop and, while it is still backing off, by the first
        calls and readiness checks: each worker process has its own flag, and one that has not
        yet seen the database must not refuse calls its siblings already serve.
        """
        if self._migrated:
            return
        async with self._migration_lock:
            if self._migrated:
                return
            async with self._connection(wait_s=wait_s) as conn:
                await apply_migrations(conn)
            self._migrated = True
            log.info("postgres store ready: schema up to date")

    @contextlib.asynccontextmanager
    async def _connection(self, wait_s: float | None = None) -> AsyncIterator[AsyncConnection[Any]]:
        with wrap_exceptions():
            async with self._pool.connection(timeout=wait_s) as conn:
                yield conn

    def _q(self, name: str) -> str:
        return self._sql[name]

    async def create_campaign(self, campaign: NewCampaign) -> Campaign:
        await self._ensure_migrated()
        async with self._connection() as conn:
            cursor = await conn.execute(
                self._q("create_campaign"), pg_lifecycle.create_params(campaign)
            )
            row = await cursor.fetchone()
        assert row is not None
        start_time, created_at = row
        self._facts[uuid.UUID(campaign.id)] = CampaignFacts(
            campaign.total, start_time, campaign.end_time, campaign.discount
        )
        return Campaign(
            id=campaign.id,
            name=campaign.name,
            total=campaign.total,
            start_time=start_time,
            issued=0,
            end_time=campaign.end_time,
            discount=campaign.discount,
            metadata=dict(campaign.metadata),
            brand=campaign.brand,
            created_at=created_at,
        )

    async def issue_coupon(self, campaign_id: str, request: IssueRequest) -> IssuedCoupon:
        """Issue one code, grouped with the campaign's other calls arriving meanwhile.

        Answers without a query when the answer is certain: a campaign this process saw sold
        out stays sold out (for calls with neither user nor key, which cannot hold an earlier
        code, while its end is more than `start_margin_s` away: from then on ENDED is the
        answer), and a start instant more than `start_margin_s` away by this host's clock has
        not come yet. Near either boundary the database clock decides.
        """
        cid = uuid.UUID(campaign_id)
        now = self._clock()
        facts = self._facts.get(cid)
        anonymous = request.user_id is None and request.idempotency_key is None
        if anonymous and cid in self._sold_out and self._far_from_end(facts, now):
            raise SoldOut()
        if facts is not None and now < facts.start_time - self._start_margin:
            raise CampaignNotStarted(facts.start_time)
        await self._ensure_migrated()
        return await self._groups.submit(cid, request)

    def _far_from_end(self, facts: CampaignFacts | None, now: datetime) -> bool:
        return facts is not None and (
            facts.end_time is None or now < facts.end_time - self._start_margin
        )

    async def _issue_group(
        self, cid: uuid.UUID, requests: Sequence[IssueRequest]
    ) -> list[IssuedCoupon | CouponError]:
        async with self._connection() as conn:
            outcome = await issue_group(conn, self._sql, cid, requests)
        if outcome.facts is not None:
            self._facts[cid] = outcome.facts
        if outcome.sold_out:
            self._sold_out.add(cid)
        return outcome.results

    async def get_campaign(
        self, campaign_id: str, after_seq: int, limit: int, *, brand: str | None
    ) -> CampaignPage:
        await self._ensure_migrated()
        async with self._connection() as conn:
            cursor = await conn.execute(
                self._q("campaign_page"),
                {
                    "campaign_id": uuid.UUID(campaign_id),
                    "after_seq": after_seq,
                    "limit": limit + 1,
                    "brand": brand,
                },
            )
            rows = await cursor.fetchall()
        if not rows:
            raise CampaignNotFound()
        page = [(seq, code) for *_, seq, code in rows if code is not None]
        has_more = len(page) > limit
        page = page[:limit]
        return CampaignPage(
            campaign=pg_lifecycle.campaign_of(campaign_id, rows[0][:-2]),
            codes=[code for _, code in page],
            last_seq=page[-1][0] if page else after_seq,
            has_more=has_more,
        )

    async def list_campaigns(
        self, after: ListCursor | None, limit: int, *, brand: str | None
    ) -> CampaignList:
        await self._ensure_migrated()
        async with self._connection() as conn:
            return await pg_lifecycle.list_campaigns(conn, self._sql, after, limit, brand)

    async def get_coupon(self, code: str, *, brand: str | None) -> Coupon:
        await self._ensure_migrated()
        async with self._connection() as conn:
            return await pg_lifecycle.get_coupon(conn, self._sql, code, brand)

    async def redeem_coupon(
        self, code: str, order_id: str, user_id: str | None, *, brand: str | None
    ) -> Redemption:
        await self._ensure_migrated()
        async with self._connection() as conn:
            return await pg_lifecycle.redeem_coupon(
                conn, self._sql, code, order_id=order_id, user_id=user_id, brand=brand
            )

    async def cancel_redemption(self, code: str, order_id: str, *, brand: str | None) -> Coupon:
        await self._ensure_migrated()
        async with self._connection() as conn:
            return await pg_lifecycle.cancel_redemption(conn, self._sql, code, order_id, brand)
