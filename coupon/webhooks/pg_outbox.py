"""PostgreSQL's outbox: events are procrastinate jobs, inserted in the change's transaction.

One job per (transaction, endpoint) names every event of that transaction the endpoint
receives (a group issuance writes up to 256 codes; a job per event would cost a row and a
NOTIFY each). The job holds only what cannot be read back later: which rows changed (a group's
positions first_seq..last_seq in its campaign, or redemption history ids) and when. The
delivering side reads code, user, order and brand from those committed rows (one query per
job) and derives each event's id from its change, so a retry sends the same ids. Writing every
event's fields as JSON in the issuing transaction took 26% of a loaded server's CPU (py-spy),
more than the rest of that transaction.

procrastinate then gives each job its own retry schedule: a worker fetches it, our task POSTs
it, an exception schedules the next attempt (Backoff), and after `webhooks.max_attempts` the
job stays `failed`: that is the dead-letter state, which `coupon-server webhooks list-dead`
lists and `coupon-server webhooks retry` queues again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

import psycopg
from procrastinate import App, PsycopgConnector, RetryDecision
from procrastinate.retry import BaseRetryStrategy
from psycopg_pool import AsyncConnectionPool

from coupon import metrics
from coupon.store.cache import BoundedCache
from coupon.store.postgres import connection_kwargs
from coupon.webhooks.delivery import Backoff, Deliverer, DeliveryFailed, endpoints_for
from coupon.webhooks.events import ISSUED, REDEEMED, REDEMPTION_CANCELLED, Event, event_id
from coupon.webhooks.pg_schema import webhook_queries

if TYPE_CHECKING:
    import uuid
    from collections.abc import Sequence
    from datetime import datetime

    from procrastinate.jobs import Job
    from procrastinate.types import JSONValue
    from psycopg import AsyncConnection

    from coupon.config import DatabaseConfig, WebhooksConfig

log = logging.getLogger("coupon.webhooks")

TASK_NAME = "coupon.deliver_events"
QUEUE = "coupon_webhooks"
BRAND_CACHE_ENTRIES = 10_000


def batch_size(task_kwargs: dict[str, Any]) -> int:
    """How many events a job carries, whichever of the job shapes it has."""
    if isinstance(task_kwargs.get("events"), list):
        return len(task_kwargs["events"])
    if isinstance(task_kwargs.get("history_ids"), list):
        return len(task_kwargs["history_ids"])
    first, last = task_kwargs.get("first_seq"), task_kwargs.get("last_seq")
    return last - first + 1 if isinstance(first, int) and isinstance(last, int) else 0


def batch_time(task_kwargs: dict[str, Any]) -> str:
    """When the job's change happened (its first event's time), as written."""
    events = task_kwargs.get("events")
    if isinstance(events, list) and events and isinstance(events[0], dict):
        return str(events[0].get("time", ""))
    return str(task_kwargs.get("at", ""))


# A pooled connection unused for longer than this is checked (one round trip) before use.
IDLE_CHECK_AFTER_S = 2.0


class _IdleCheck:
    """The pool's check, only for connections that sat idle.

    procrastinate's own pool checks every connection it hands out; with one-statement
    autocommit queries that doubled the round trips of each job's fetch, read and finish.
    A connection just returned has just worked; one that sat idle may have been closed by
    the server meanwhile, and is still checked. One broken under use fails that query: the
    worker restarts (PgDeliveryWorker) or the job is retried, as for any database error.
    """

    def __init__(self) -> None:
        self._returned: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    async def check(self, conn: AsyncConnection[Any]) -> None:
        returned = self._returned.get(conn)
        if returned is None or time.monotonic() - returned > IDLE_CHECK_AFTER_S:
            await AsyncConnectionPool.check_connection(conn)

    async def returned(self, conn: AsyncConnection[Any]) -> None:
        self._returned[conn] = time.monotonic()


async def _autocommit(conn: AsyncConnection[Any]) -> None:
    # procrastinate's queries are single statements (its SQL functions), as is our read of
    # a job's rows: autocommit spares the COMMIT round trip after each.
    await conn.set_autocommit(True)


def _outbox_pool(**kwargs: Any) -> AsyncConnectionPool[Any]:
    """procrastinate's pool (its documented pool_factory), with autocommit connections and
    the idle-only check."""
    idle = _IdleCheck()
    return AsyncConnectionPool(
        **{**kwargs, "check": idle.check, "reset": idle.returned, "configure": _autocommit}
    )


class _RetryOnBackoff(BaseRetryStrategy):
    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        attempts_done = job.attempts + 1  # procrastinate counts attempts before this one
        if self._backoff.gives_up(attempts_done):
            count = batch_size(job.task_kwargs)
            metrics.WEBHOOK_EVENTS_DEAD.inc(count)
            log.error("webhook job %s (%d events) dead-lettered: %s", job.id, count, exception)
            return None
        delay = self._backoff.delay_s(attempts_done)
        log.warning("webhook job %s failed (%s); retrying in %gs", job.id, exception, delay)
        # procrastinate's type says int seconds; it builds a timedelta, which takes floats.
        return RetryDecision(retry_in={"seconds": cast("int", delay)})


class PgOutbox:
    """Writes events on the caller's connection (inside its transaction) and delivers jobs."""

    def __init__(self, config: WebhooksConfig, database: DatabaseConfig) -> None:
        self.config = config
        self._endpoints = {e.url: e for e in config.endpoints}
        self._sql = webhook_queries()
        # The store's session settings (timeouts, keepalives, no prepared statements for
        # PgBouncer), less autocommit: procrastinate's LISTEN connection passes it itself (a
        # second one is an error), and the pooled ones get it from _outbox_pool.
        kwargs = {k: v for k, v in connection_kwargs(database).items() if k != "autocommit"}
        # Also the connections on which deliveries read their events.
        self._connector = PsycopgConnector(
            conninfo=database.dsn,
            min_size=1,
            max_size=config.concurrency + 2,  # + the LISTEN and fetch connections
            kwargs={**kwargs, "application_name": "coupon-webhooks"},
            name="coupon-webhooks",
            pool_factory=_outbox_pool,
        )
        self.app = App(connector=self._connector)
        # Brand-scoped endpoints need each event's brand when it is written.
        self._by_brand = any(e.brand for e in config.endpoints)
        self._brands: BoundedCache[uuid.UUID, str] = BoundedCache(BRAND_CACHE_ENTRIES)
        backoff = Backoff(config.retry_initial_s, config.retry_max_s, config.max_attempts)
        self._task = self.app.task(name=TASK_NAME, queue=QUEUE, retry=_RetryOnBackoff(backoff))(
            self._deliver
        )
        self._deliverer: Deliverer | None = None

    # Writing (inside the change's transaction) ------------------------------------------

    async def issued(
        self,
        conn: AsyncConnection[Any],
        campaign_id: uuid.UUID,
        first_seq: int,
        last_seq: int,
        at: datetime,
    ) -> None:
        """coupon.issued for the group's codes (positions first_seq..last_seq), in the issuing
        transaction. The job names them; delivery reads the rest from the committed rows."""
        brand = await self._brand(conn, campaign_id) if self._by_brand else ""
        batch: dict[str, JSONValue] = {
            "campaign_id": str(campaign_id),
            "first_seq": first_seq,
            "last_seq": last_seq,
            "at": at.isoformat(),
        }
        await self._defer(conn, brand, batch)

    async def history_written(self, conn: AsyncConnection[Any], code: str, order_id: str) -> int:
        """coupon.redeemed / coupon.redemption_cancelled for the history rows this transaction
        wrote for (code, order); returns how many (0 for a repeated call)."""
        cursor = await conn.execute(
            self._sql["history_written_now"], {"code": code, "order_id": order_id}
        )
        rows = await cursor.fetchall()
        if rows:
            history_ids: list[JSONValue] = [history_id for history_id, _, _ in rows]
            _, at, brand = rows[0]
            batch = {"history_ids": history_ids, "at": at.isoformat()}
            await self._defer(conn, brand or "", cast("dict[str, JSONValue]", batch))
        return len(rows)

    async def _defer(
        self, conn: AsyncConnection[Any], brand: str, batch: dict[str, JSONValue]
    ) -> None:
        jobs = [{"endpoint": e.url, **batch} for e in endpoints_for(self.config.endpoints, brand)]
        if jobs:
            await self._task.configure(connection=conn).batch_defer_async(*jobs)

    async def _brand(self, conn: AsyncConnection[Any], campaign_id: uuid.UUID) -> str:
        # A campaign's brand never changes: asked once per campaign, not per group.
        brand = self._brands.get(campaign_id)
        if brand is None:
            cursor = await conn.execute(self._sql["campaign_brand"], {"campaign_id": campaign_id})
            row = await cursor.fetchone()
            brand = "" if row is None or row[0] is None else str(row[0])
            self._brands.put(campaign_id, brand)
        return brand

    # Delivering (procrastinate's worker calls the task) -------------------------------

    async def _deliver(
        self,
        endpoint: str,
        *,
        at: str = "",
        campaign_id: str = "",
        first_seq: int = 0,
        last_seq: int = 0,
        history_ids: list[int] | None = None,
        events: list[dict[str, Any]] | None = None,
    ) -> None:
        del at  # for list-dead; every event's own time is in its row
        target = self._endpoints.get(endpoint)
        if target is None:
            raise DeliveryFailed("its endpoint is no longer in webhooks.endpoints")
        if events is not None:  # a job written by an earlier build, which carried every field
            batch = [Event.from_payload(p) for p in events]
        elif history_ids is not None:
            batch = await self._history_events(history_ids)
        else:
            batch = await self._issued_events(campaign_id, first_seq, last_seq)
        if self._deliverer is None:
            self._deliverer = Deliverer(self.config.timeout_s)
        await self._deliverer.post(target, batch)

    async def _issued_events(self, campaign_id: str, first_seq: int, last_seq: int) -> list[Event]:
        params = {"campaign_id": campaign_id, "first_seq": first_seq, "last_seq": last_seq}
        async with self._connector.pool.connection() as conn:
            cursor = await conn.execute(self._sql["issued_events"], params)
            rows = await cursor.fetchall()
        if len(rows) != last_seq - first_seq + 1:
            # Cannot happen for a committed job (its codes committed with it); retried, then
            # dead-lettered, rather than sent short.
            raise DeliveryFailed(f"{len(rows)} of the batch's codes found")
        return [
            Event(
                id=event_id(ISSUED, code),
                type=ISSUED,
                time=issued_at,
                campaign_id=campaign_id,
                brand=brand or "",
                code=code,
                user_id=user_id or "",
            )
            for code, user_id, issued_at, brand in rows
        ]

    async def _history_events(self, history_ids: list[int]) -> list[Event]:
        async with self._connector.pool.connection() as conn:
            cursor = await conn.execute(self._sql["history_events"], {"history_ids": history_ids})
            rows = await cursor.fetchall()
        if len(rows) != len(history_ids):
            raise DeliveryFailed(f"{len(rows)} of the batch's history rows found")
        events = []
        for history_id, action, at, code, order_id, campaign_id, user_id, brand in rows:
            event_type = REDEEMED if action == "redeem" else REDEMPTION_CANCELLED
            events.append(
                Event(
                    id=event_id(event_type, str(history_id)),
                    type=event_type,
                    time=at,
                    campaign_id=str(campaign_id),
                    brand=brand or "",
                    code=code,
                    user_id=user_id or "",
                    order_id=order_id,
                )
            )
        return events

    async def requeue(self, conn: AsyncConnection[Any], job_kwargs: dict[str, Any]) -> None:
        await self._task.configure(connection=conn).defer_async(**job_kwargs)

    async def close_deliverer(self) -> None:
        if self._deliverer is not None:
            await self._deliverer.aclose()
            self._deliverer = None


class PgDeliveryWorker:
    """procrastinate's worker inside this process, plus the rescue of jobs held by the dead.

    A process killed mid-POST leaves its job `doing`; once its heartbeat is older than
    `stalled_after_s`, any delivering process puts the job back in the queue. SIGTERM (stop)
    lets POSTs in flight finish (each bounded by timeout_s); procrastinate returns any still
    running after that to the queue.
    """

    def __init__(self, outbox: PgOutbox) -> None:
        self._outbox = outbox
        self._config = outbox.config
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="coupon-webhooks-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _supervise(self) -> None:
        """Keep a worker running; the database may be down at start-up or go away later."""
        delay = 0.5
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - driver and procrastinate errors alike
                # The class name only: the driver's message may carry host, user or SQL.
                log.warning(
                    "webhook worker stopped (%s); restarting in %gs", type(e).__name__, delay
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _run_once(self) -> None:
        app = self._outbox.app
        config = self._config
        async with app.open_async():
            rescue = asyncio.create_task(self._rescue_stalled(), name="coupon-webhooks-rescue")
            try:
                await app.run_worker_async(
                    queues=[QUEUE],
                    name="coupon-webhooks",
                    concurrency=config.concurrency,
                    install_signal_handlers=False,
                    delete_jobs="successful",
                    fetch_job_polling_interval=config.poll_interval_s,
                    shutdown_graceful_timeout=config.timeout_s + 1.0,
                    update_heartbeat_interval=config.stalled_after_s / 3,
                    stalled_worker_timeout=config.stalled_after_s,
                )
            finally:
                rescue.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rescue
                await self._outbox.close_deliverer()

    async def _rescue_stalled(self) -> None:
        manager = self._outbox.app.job_manager
        while True:
            await asyncio.sleep(self._config.stalled_after_s / 2)
            try:
                stalled = await manager.get_stalled_jobs(
                    task_name=TASK_NAME, seconds_since_heartbeat=self._config.stalled_after_s
                )
                for job in stalled:
                    # Another process may have rescued it first; then this one is refused.
                    with contextlib.suppress(psycopg.Error):
                        await manager.retry_job(job)
                        log.warning(
                            "webhook job %s was held by a stopped process: requeued", job.id
                        )
            except psycopg.Error as e:
                log.warning("stalled webhook jobs not checked (%s)", type(e).__name__)


async def list_dead(outbox: PgOutbox) -> list[Job]:
    async with outbox.app.open_async():
        jobs = await outbox.app.job_manager.list_jobs_async(task=TASK_NAME, status="failed")
    return sorted(jobs, key=lambda job: job.id or 0)


async def retry_dead(outbox: PgOutbox, dsn: str, job_ids: Sequence[int]) -> list[int]:
    """Queue each dead job again as a fresh job (full retry budget); return the ids taken."""
    sql = webhook_queries()
    taken = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for job_id in job_ids:
            async with conn.transaction():
                cursor = await conn.execute(
                    sql["take_dead_job"], {"job_id": job_id, "task_name": TASK_NAME}
                )
                row = await cursor.fetchone()
                if row is None:
                    continue
                await outbox.requeue(conn, row[0])
                taken.append(job_id)
    return taken
