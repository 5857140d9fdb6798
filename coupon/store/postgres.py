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
from coupon.store.cache import BoundedCache
from coupon.store.grouping import Group, GroupRunner
from coupon.store.migrations import apply_migrations
from coupon.store.pg_commit import GroupTrace, answers_after, commit_status, sever_at
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
    from coupon.webhooks.pg_outbox import PgOutbox

log = logging.getLogger("coupon.store.postgres")

READY_CHECK_TIMEOUT_S = 2.0
# Campaign ids are chosen by callers: what a process remembers about them is bounded.
MAX_CACHED_CAMPAIGNS = 10_000
# A campaign id the database did not know is refused without a query for this long (another
# host may create it meanwhile: the window is short).
NOT_FOUND_TTL_S = 1.0


def session_options(config: DatabaseConfig) -> str:
    """libpq `options`: the server-side timeouts every session of this pool runs under."""
    settings = {
        "statement_timeout": config.statement_timeout_s,
        "lock_timeout": config.lock_timeout_s,
        "idle_in_transaction_session_timeout": config.idle_in_transaction_timeout_s,
    }
    return " ".join(f"-c {name}={round(value * 1000)}" for name, value in settings.items())


def connection_kwargs(config: DatabaseConfig) -> dict[str, Any]:
    """Keyword arguments of every connection (pooled, or fresh to resolve a commit)."""
    kwargs: dict[str, Any] = {
        "autocommit": True,  # transactions are explicit: conn.transaction()
        "connect_timeout": config.connect_timeout_s,
        "application_name": "coupon-issuer",
        # Never a server-side prepared statement: they belong to a server session, which a
        # pooler in transaction mode (PgBouncer) hands to other clients between transactions.
        "prepare_threshold": None,
        # A peer that vanished (host down, network cut) is noticed in about
        # idle + interval * count seconds instead of the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": config.keepalive_idle_s,
        "keepalives_interval": config.keepalive_interval_s,
        "keepalives_count": config.keepalive_count,
        "tcp_user_timeout": round(config.tcp_user_timeout_s * 1000),
    }
    if config.session_options:
        kwargs["options"] = session_options(config)
    return kwargs


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
        outbox: PgOutbox | None = None,
    ) -> None:
        self.config = config
        self._outbox = outbox  # webhook events, written in each change's transaction
        self._clock = clock
        # Clocks of app hosts and the database may differ a little: only refuse "not started"
        # locally when the start is further away than any sane skew.
        self._start_margin = timedelta(seconds=config.start_margin_s)
        # Keyed by the canonical id string the service hands over: the hot path answers from
        # these without building a UUID.
        self._facts: BoundedCache[str, CampaignFacts] = BoundedCache(MAX_CACHED_CAMPAIGNS)
        self._sold_out: BoundedCache[str, bool] = BoundedCache(MAX_CACHED_CAMPAIGNS)
        self._not_found: BoundedCache[str, bool] = BoundedCache(
            MAX_CACHED_CAMPAIGNS, ttl_s=NOT_FOUND_TTL_S
        )
        # The database clock minus this host's, learnt from every group and readiness check:
        # "not started" is decided by the database clock, even without a query.
        self._skew = timedelta(0)
        self._groups: GroupRunner[str, IssueRequest, IssuedCoupon] = GroupRunner(
            self._issue_group,
            max_group_size=config.max_group_size,
            on_group=metrics.GROUP_SIZE.observe,
            wait_s=config.call_timeout_s,
            on_wait_exceeded=StoreUnavailable,
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
            check=self._check_connection,
            # Bounded wait for a connection: when the database is gone, callers get
            # `unavailable` quickly instead of queueing for the default 30 s.
            timeout=config.connect_timeout_s,
            # psycopg_pool retries a failed connection after 1 s, 2 s, 4 s... until this many
            # seconds have passed, then frees the slot and the next call starts a fresh
            # attempt at once. A short bound keeps a slot from sleeping in that backoff while
            # a promoted standby (or a restarted server) already accepts writes.
            reconnect_timeout=config.reconnect_timeout_s,
            kwargs=connection_kwargs(config),
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
                asked = self._clock()
                cursor = await conn.execute(self._q("ping"))
                row = await cursor.fetchone()
            if row is not None:
                self._learn_skew(row[0], asked)
        except StoreUnavailable:
            return False
        return True

    def _learn_skew(self, db_now: datetime, local: datetime) -> None:
        self._skew = db_now - local
        metrics.DB_CLOCK_SKEW.set(self._skew.total_seconds())

    def _update_pool_metric(self) -> None:
        stats = self._pool.get_stats()
        size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
        metrics.POOL_CONNECTIONS.labels("idle").set(idle)
        metrics.POOL_CONNECTIONS.labels("used").set(size - idle)
        metrics.POOL_CONNECTIONS.labels("waiting").set(stats.get("requests_waiting", 0))

    async def _check_connection(self, conn: AsyncConnection[Any]) -> None:
        # The pool's own check has no bound: on a frozen database it would wait forever.
        loop = asyncio.get_running_loop()
        with sever_at(conn, loop.time() + self.config.connect_timeout_s):
            await conn.execute("")

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
        # Callers queue here while one of them migrates: each waits at most its own bound,
        # not one connect_timeout_s per caller ahead of it.
        try:
            async with asyncio.timeout(
                wait_s if wait_s is not None else self.config.call_timeout_s
            ):
                await self._migration_lock.acquire()
        except TimeoutError:
            raise StoreUnavailable() from None
        try:
            if self._migrated:
                return
            # Unbounded: a migration may take longer than a call (it holds its lock meanwhile).
            async with self._connection(wait_s=wait_s, bounded=False) as conn:
                await apply_migrations(conn)
            self._migrated = True
            log.info("postgres store ready: schema up to date")
        finally:
            self._migration_lock.release()

    @contextlib.asynccontextmanager
    async def _connection(
        self, wait_s: float | None = None, *, bounded: bool = True
    ) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection; with `bounded`, its use ends after call_timeout_s (the socket
        is shut down, so even a frozen database cannot hold the call)."""
        deadline = asyncio.get_running_loop().time() + self.config.call_timeout_s
        try:
            with wrap_exceptions():
                async with self._pool.connection(timeout=wait_s) as conn:
                    with sever_at(conn, deadline if bounded else None):
                        yield conn
        finally:
            self._update_pool_metric()

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
        self._facts.put(
            campaign.id,
            CampaignFacts(campaign.total, start_time, campaign.end_time, campaign.discount),
        )
        self._not_found.discard(campaign.id)
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
        answer), and a start instant more than `start_margin_s` away has not come yet. Both are
        reckoned by the database clock as this process knows it (its own clock plus the skew
        last measured); near either boundary the database decides.
        """
        refusal = self.refusal_without_io(campaign_id, request)
        if refusal is not None:
            raise refusal
        await self._ensure_migrated()
        return await self._groups.submit(campaign_id, request)

    def refusal_without_io(self, campaign_id: str, request: IssueRequest) -> CouponError | None:
        # This host's clock, corrected by the database clock's measured skew.
        now = self._clock() + self._skew
        facts = self._facts.get(campaign_id)
        anonymous = request.user_id is None and request.idempotency_key is None
        if anonymous and campaign_id in self._sold_out and self._far_from_end(facts, now):
            return SoldOut()
        if campaign_id in self._not_found:
            return CampaignNotFound()
        if facts is not None and now < facts.start_time - self._start_margin:
            return CampaignNotStarted(facts.start_time)
        return None

    def _far_from_end(self, facts: CampaignFacts | None, now: datetime) -> bool:
        return facts is not None and (
            facts.end_time is None or now < facts.end_time - self._start_margin
        )

    async def _issue_group(
        self, campaign_id: str, group: Group[IssueRequest, IssuedCoupon]
    ) -> list[IssuedCoupon | CouponError]:
        cid = uuid.UUID(campaign_id)
        async with self._connection() as conn:
            # Only the callers still waiting now, as the transaction begins, are served.
            requests = group.claim()
            if not requests:
                return []
            trace = GroupTrace()
            began = self._clock()
            try:
                with sever_at(conn, group.deadline):
                    outcome = await issue_group(
                        conn,
                        self._sql,
                        cid,
                        requests,
                        trace=trace,
                        on_issued=None if self._outbox is None else self._outbox.issued,
                    )
            except psycopg.Error:
                if trace.pending is None or trace.xid is None:
                    raise  # failed before COMMIT: nothing of this group is stored
                outcome = trace.pending
                committed = await self._commit_landed(trace.xid)
                outcome.results = answers_after(outcome, committed)
                # Only a landed commit sold the campaign out.
                outcome.sold_out = outcome.sold_out and committed is True
        if trace.db_now is not None:
            self._learn_skew(trace.db_now, began)
        if self._outbox is not None:
            metrics.WEBHOOK_EVENTS_WRITTEN.inc(_new_codes(outcome.results))
        if outcome.facts is not None:
            self._facts.put(campaign_id, outcome.facts)
        if outcome.sold_out:
            self._sold_out.put(campaign_id, True)
        if outcome.results and all(isinstance(r, CampaignNotFound) for r in outcome.results):
            self._not_found.put(campaign_id, True)
        return outcome.results

    async def _commit_landed(self, xid: str) -> bool | None:
        """The connection broke during COMMIT: learn on a fresh connection whether it landed
        (None: it could not be learnt within connect_timeout_s)."""

        async def connect() -> AsyncConnection[Any]:
            return await psycopg.AsyncConnection.connect(
                self.config.dsn, **connection_kwargs(self.config)
            )

        committed = await commit_status(connect, self._sql, xid, self.config.connect_timeout_s)
        log.warning(
            "connection lost during COMMIT; the transaction %s",
            {True: "committed", False: "was rolled back", None: "has an unknown outcome"}[
                committed
            ],
        )
        return committed

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
        async with self._connection() as conn, self._with_events(conn, code, order_id):
            return await pg_lifecycle.redeem_coupon(
                conn, self._sql, code, order_id=order_id, user_id=user_id, brand=brand
            )

    async def cancel_redemption(self, code: str, order_id: str, *, brand: str | None) -> Coupon:
        await self._ensure_migrated()
        async with self._connection() as conn, self._with_events(conn, code, order_id):
            return await pg_lifecycle.cancel_redemption(conn, self._sql, code, order_id, brand)

    @contextlib.asynccontextmanager
    async def _with_events(
        self, conn: AsyncConnection[Any], code: str, order_id: str
    ) -> AsyncIterator[None]:
        """With webhooks: one transaction holding the change and its event (outbox)."""
        if self._outbox is None:
            yield
            return
        async with conn.transaction():
            yield
            written = await self._outbox.history_written(conn, code, order_id)
        metrics.WEBHOOK_EVENTS_WRITTEN.inc(written)


def _new_codes(results: Sequence[IssuedCoupon | CouponError]) -> int:
    return sum(1 for r in results if isinstance(r, IssuedCoupon) and not r.repeat)
