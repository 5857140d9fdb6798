"""PostgreSQL's outbox: events are procrastinate jobs, inserted in the change's transaction.

One job per (transaction, endpoint) carries every event of that transaction the endpoint
receives (a group issuance writes up to 256 codes; a job per event would cost a row and a
NOTIFY each). procrastinate then gives each job its own retry schedule: a worker fetches it,
our task POSTs it, an exception schedules the next attempt (Backoff), and after
`webhooks.max_attempts` the job stays `failed`: that is the dead-letter state, which
`coupon-server webhooks list-dead` lists and `coupon-server webhooks retry` queues again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, cast

import psycopg
from procrastinate import App, PsycopgConnector, RetryDecision
from procrastinate.retry import BaseRetryStrategy

from coupon import metrics
from coupon.store.postgres import connection_kwargs
from coupon.webhooks.delivery import Backoff, Deliverer, DeliveryFailed, endpoints_for
from coupon.webhooks.events import ISSUED, REDEEMED, REDEMPTION_CANCELLED, Event, new_event
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


class _RetryOnBackoff(BaseRetryStrategy):
    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        attempts_done = job.attempts + 1  # procrastinate counts attempts before this one
        if self._backoff.gives_up(attempts_done):
            count = len(cast("list[Any]", job.task_kwargs.get("events") or []))
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
        # PgBouncer); procrastinate sets autocommit itself where it needs it.
        kwargs = {k: v for k, v in connection_kwargs(database).items() if k != "autocommit"}
        self.app = App(
            connector=PsycopgConnector(
                conninfo=database.dsn,
                min_size=1,
                max_size=config.concurrency + 2,  # + the LISTEN and fetch connections
                kwargs={**kwargs, "application_name": "coupon-webhooks"},
                name="coupon-webhooks",
            )
        )
        backoff = Backoff(config.retry_initial_s, config.retry_max_s, config.max_attempts)
        self._task = self.app.task(name=TASK_NAME, queue=QUEUE, retry=_RetryOnBackoff(backoff))(
            self._deliver
        )
        self._deliverer: Deliverer | None = None

    # Writing (inside the change's transaction) ------------------------------------------

    async def record(self, conn: AsyncConnection[Any], events: Sequence[Event]) -> None:
        jobs: list[dict[str, JSONValue]] = []
        for endpoint in self.config.endpoints:
            wanted = [e.to_payload() for e in events if endpoints_for([endpoint], e.brand)]
            if wanted:
                jobs.append({"endpoint": endpoint.url, "events": cast("list[JSONValue]", wanted)})
        if jobs:
            await self._task.configure(connection=conn).batch_defer_async(*jobs)

    async def issued(
        self,
        conn: AsyncConnection[Any],
        campaign_id: uuid.UUID,
        coupons: Sequence[tuple[str, str | None]],
        at: datetime,
    ) -> None:
        """coupon.issued for each (code, user) just stored, in the issuing transaction."""
        brand = await self._brand(conn, campaign_id)
        await self.record(
            conn,
            [
                new_event(
                    ISSUED,
                    time=at,
                    campaign_id=str(campaign_id),
                    brand=brand,
                    code=code,
                    user_id=user_id,
                )
                for code, user_id in coupons
            ],
        )

    async def history_written(self, conn: AsyncConnection[Any], code: str, order_id: str) -> int:
        """coupon.redeemed / coupon.redemption_cancelled for the history rows this transaction
        wrote for (code, order); returns how many (0 for a repeated call)."""
        cursor = await conn.execute(
            self._sql["history_written_now"], {"code": code, "order_id": order_id}
        )
        events = [
            new_event(
                REDEEMED if action == "redeem" else REDEMPTION_CANCELLED,
                time=at,
                campaign_id=str(campaign_id),
                brand=brand or "",
                code=code,
                user_id=user_id,
                order_id=order_id,
            )
            for action, at, campaign_id, user_id, brand in await cursor.fetchall()
        ]
        await self.record(conn, events)
        return len(events)

    async def _brand(self, conn: AsyncConnection[Any], campaign_id: uuid.UUID) -> str:
        cursor = await conn.execute(self._sql["campaign_brand"], {"campaign_id": campaign_id})
        row = await cursor.fetchone()
        return "" if row is None or row[0] is None else str(row[0])

    # Delivering (procrastinate's worker calls the task) -------------------------------

    async def _deliver(self, endpoint: str, events: list[dict[str, Any]]) -> None:
        target = self._endpoints.get(endpoint)
        if target is None:
            raise DeliveryFailed("its endpoint is no longer in webhooks.endpoints")
        if self._deliverer is None:
            self._deliverer = Deliverer(self.config.timeout_s)
        await self._deliverer.post(target, [Event.from_payload(p) for p in events])

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
