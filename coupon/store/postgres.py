"""The PostgreSQL store: exact issuance across processes and hosts sharing one database.

One transaction per issued code: a conditional increment of the campaign's `issued` (which
takes the campaign row lock until COMMIT, and lets the database clock decide the start
instant), then the insert of the code with seq = the new `issued`. The reply is built only
after COMMIT, so an acknowledged code is always stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool

from coupon.campaigns import Campaign, CampaignPage, IssuedCoupon
from coupon.codes import new_code
from coupon.errors import CampaignNotFound, CampaignNotStarted, SoldOut, StoreUnavailable
from coupon.store.migrations import apply_migrations
from coupon.store.queries import queries

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from datetime import datetime

    from psycopg import AsyncConnection

    from coupon.campaigns import NewCampaign
    from coupon.config import DatabaseConfig

log = logging.getLogger("coupon.store.postgres")

# A collision needs two equal 134-bit codes; more than a few in a row means a bug, not bad luck.
MAX_CODE_ATTEMPTS = 8
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


class _UserAlreadyHolds(Exception):
    """A concurrent call of the same user stored its code first."""


class PostgresStore:
    def __init__(
        self, config: DatabaseConfig, *, retry_initial_s: float = 0.5, retry_max_s: float = 5.0
    ) -> None:
        self.config = config
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
                self._q("create_campaign"),
                {
                    "id": uuid.UUID(campaign.id),
                    "name": campaign.name,
                    "total": campaign.total,
                    "start_time": campaign.start_time,
                },
            )
            row = await cursor.fetchone()
        assert row is not None
        return Campaign(
            id=campaign.id,
            name=campaign.name,
            total=campaign.total,
            start_time=row[0],
            issued=0,
        )

    async def issue_coupon(self, campaign_id: str, user_id: str | None) -> IssuedCoupon:
        """Issue one code in one transaction; see the module docstring.

        Check order (same as the memory store): not found, not started, the user's earlier
        code, sold out. A user who holds a code gets it back even when the campaign is sold
        out, because the earlier code is looked up before the increment is attempted and
        again when the increment finds the campaign full (a concurrent call of the same user
        may have just committed).
        """
        await self._ensure_migrated()
        cid = uuid.UUID(campaign_id)
        try:
            async with self._connection() as conn, conn.transaction():
                if user_id is not None:
                    held = await self._probe(conn, cid, user_id)
                    if held is not None:
                        return held
                cursor = await conn.execute(self._q("take_one"), {"campaign_id": cid})
                taken = await cursor.fetchone()
                if taken is None:
                    held = await self._probe(conn, cid, user_id)
                    if held is not None:
                        return held
                    raise SoldOut()
                seq, now = taken
                code = await self._insert_coupon(conn, cid, seq, user_id, now)
                # Leaving the block commits; only then is the code acknowledged.
                return IssuedCoupon(code=code, issued_at=now)
        except _UserAlreadyHolds:
            # The transaction was rolled back, so this call consumed nothing.
            async with self._connection() as conn:
                held = await self._probe(conn, cid, user_id)
            if held is None:  # pragma: no cover - the unique index said it exists
                raise StoreUnavailable() from None
            return held

    async def _probe(
        self, conn: AsyncConnection[Any], cid: uuid.UUID, user_id: str | None
    ) -> IssuedCoupon | None:
        """Raise why the campaign cannot issue, or return the user's earlier code.

        None means the campaign exists, has started and holds no code of this user.
        """
        cursor = await conn.execute(
            self._q("probe_campaign"), {"campaign_id": cid, "user_id": user_id}
        )
        row = await cursor.fetchone()
        if row is None:
            raise CampaignNotFound()
        start_time, started, code, issued_at = row
        if not started:
            raise CampaignNotStarted(start_time)
        if code is not None:
            return IssuedCoupon(code=code, issued_at=issued_at)
        return None

    async def _insert_coupon(
        self,
        conn: AsyncConnection[Any],
        cid: uuid.UUID,
        seq: int,
        user_id: str | None,
        issued_at: datetime,
    ) -> str:
        """Store a fresh code at position `seq` and return it."""
        for _ in range(MAX_CODE_ATTEMPTS):
            code = new_code()
            try:
                cursor = await conn.execute(
                    self._q("insert_coupon"),
                    {
                        "code": code,
                        "campaign_id": cid,
                        "seq": seq,
                        "user_id": user_id,
                        "issued_at": issued_at,
                    },
                )
            except psycopg.errors.UniqueViolation as e:
                if e.diag.constraint_name == "coupons_campaign_user_key":
                    raise _UserAlreadyHolds() from None
                raise
            if await cursor.fetchone() is not None:
                return code
            # ON CONFLICT (code) DO NOTHING: a collision; the transaction is still good.
        raise RuntimeError(f"no unique code after {MAX_CODE_ATTEMPTS} attempts")

    async def get_campaign(self, campaign_id: str, after_seq: int, limit: int) -> CampaignPage:
        await self._ensure_migrated()
        async with self._connection() as conn:
            cursor = await conn.execute(
                self._q("campaign_page"),
                {"campaign_id": uuid.UUID(campaign_id), "after_seq": after_seq, "limit": limit + 1},
            )
            rows = await cursor.fetchall()
        if not rows:
            raise CampaignNotFound()
        name, total, issued, start_time = rows[0][:4]
        page = [(seq, code) for *_, seq, code in rows if code is not None]
        has_more = len(page) > limit
        page = page[:limit]
        return CampaignPage(
            campaign=Campaign(
                id=campaign_id, name=name, total=total, start_time=start_time, issued=issued
            ),
            codes=[code for _, code in page],
            last_seq=page[-1][0] if page else after_seq,
            has_more=has_more,
        )
