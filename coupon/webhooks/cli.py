"""`coupon-server --role webhooks` and `coupon-server webhooks list-dead | retry`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from coupon.store.migrations import apply_migrations

if TYPE_CHECKING:
    import argparse

    from coupon.config import Config


def add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    hooks = commands.add_parser("webhooks", help="operate the webhook outbox (PostgreSQL)")
    actions = hooks.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list-dead", help="list dead-lettered batches")
    retry = actions.add_parser("retry", help="queue dead-lettered batches again")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("job_ids", nargs="*", type=int, default=[], metavar="JOB_ID")
    which.add_argument("--all", action="store_true", help="every dead-lettered batch")


def run_if_asked(args: argparse.Namespace, config: Config) -> int | None:
    """The exit code of a webhooks command or role; None when the API server is to run."""
    if args.command == "webhooks":
        return run_command(args, config)
    if args.role == "webhooks":
        return run_delivery_process(config)
    return None


def _outbox_or_exit(config: Config) -> None:
    if config.store.type != "postgres":
        sys.exit(
            "coupon-server: the webhook outbox lives in PostgreSQL (store.type: postgres); "
            "the memory store keeps its events in the server process"
        )
    if not config.webhooks.endpoints:
        sys.exit("coupon-server: no webhooks.endpoints configured")


def run_command(args: argparse.Namespace, config: Config) -> int:
    _outbox_or_exit(config)
    import psycopg

    try:
        return _run_command(args, config)
    except psycopg.Error as e:
        # The class name only: the driver's message may carry host, user or SQL.
        print(f"coupon-server: the database refused ({type(e).__name__})", file=sys.stderr)
        return 1


def _run_command(args: argparse.Namespace, config: Config) -> int:
    from coupon.webhooks.pg_outbox import PgOutbox, batch_size, batch_time, list_dead, retry_dead

    outbox = PgOutbox(config.webhooks, config.database)
    if args.action == "list-dead":
        jobs = asyncio.run(list_dead(outbox))
        print("job_id\tattempts\tevents\tfirst_event_time\tendpoint")
        for job in jobs:
            count, first = batch_size(job.task_kwargs), batch_time(job.task_kwargs)
            print(f"{job.id}\t{job.attempts}\t{count}\t{first}\t{_safe_url(job.task_kwargs)}")
        print(f"{len(jobs)} dead-lettered batch(es)", file=sys.stderr)
        return 0
    ids = list(args.job_ids)
    if args.all:
        ids = [job.id for job in asyncio.run(list_dead(outbox)) if job.id is not None]
    taken = asyncio.run(retry_dead(outbox, config.database.dsn, ids))
    for job_id in ids:
        print(f"{job_id}\t{'queued again' if job_id in taken else 'not dead-lettered (skipped)'}")
    return 0 if len(taken) == len(ids) else 1


def _safe_url(task_kwargs: object) -> str:
    """The endpoint without user info or query, which may hold credentials."""
    url = task_kwargs.get("endpoint") if isinstance(task_kwargs, dict) else None
    if not isinstance(url, str):
        return "?"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def run_delivery_process(config: Config) -> int:
    """`--role webhooks`: deliver only (no HTTP server) until SIGTERM or SIGINT."""
    _outbox_or_exit(config)
    return asyncio.run(_deliver_until_stopped(config))


async def _deliver_until_stopped(config: Config) -> int:
    import psycopg

    from coupon.webhooks.pg_outbox import PgDeliveryWorker, PgOutbox

    with contextlib.suppress(psycopg.Error):
        # The schema may not exist yet when this process starts first; the worker retries
        # until it does either way.
        async with await psycopg.AsyncConnection.connect(
            config.database.dsn, autocommit=True, connect_timeout=config.database.connect_timeout_s
        ) as conn:
            await apply_migrations(conn)
    worker = PgDeliveryWorker(PgOutbox(config.webhooks, config.database))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, stop.set)
    await worker.start()
    await stop.wait()
    await worker.stop()  # POSTs in flight finish, or go back to the queue
    return 0
