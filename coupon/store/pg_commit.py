"""An ambiguous COMMIT, resolved: when the connection breaks while COMMIT is on its way, the
transaction may or may not have committed. Answering `unavailable` to the whole group would
be wrong when it did (an anonymous caller retries and takes a second coupon), so the group
asks the database on a fresh connection: `pg_xact_status(xid)` of the transaction's id, which
take_many returned in its own round trip. Committed (and durable: see _confirm_durable): every
caller gets the group's outcome.
Aborted: callers of a new code get `unavailable` (nothing of theirs is stored). Not knowable
within the bound (the database is unreachable): those callers get CommitUnknown.

Also here: the group's deadline. A frozen database (stopped process, stalled host) answers
nothing and enforces no server-side timeout, so at the deadline the group's socket is shut
down; the driver then fails at once, and the outcome is resolved as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from coupon.campaigns import IssuedCoupon
from coupon.errors import CommitUnknown, CouponError, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping
    from datetime import datetime

    from psycopg import AsyncConnection

    from coupon.store.pg_issuance import GroupOutcome

log = logging.getLogger("coupon.store.postgres")

POLL_S = 0.05  # between status checks while the old transaction is still finishing


@dataclass(slots=True)
class GroupTrace:
    """What a group's transaction tells its caller before COMMIT (filled by issue_group)."""

    xid: str | None = None  # the transaction's id, from take_many
    db_now: datetime | None = None  # the database clock at the transaction's start
    pending: GroupOutcome | None = None  # the outcome that holds if COMMIT lands


@contextlib.contextmanager
def sever_at(conn: AsyncConnection[Any], deadline: float | None) -> Iterator[None]:
    """Shut the connection's socket down at `deadline` (loop time) unless the block ended."""
    if deadline is None:
        yield
        return
    handle = asyncio.get_running_loop().call_at(deadline, _sever, conn)
    try:
        yield
    finally:
        handle.cancel()


def _sever(conn: AsyncConnection[Any]) -> None:
    # shutdown() on a duplicate acts on the shared socket: the driver's pending read gets
    # end-of-file and fails, while its own descriptor stays valid (no reuse race).
    with contextlib.suppress(OSError, psycopg.Error):
        fd = os.dup(conn.pgconn.socket)
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        log.warning("a group transaction passed its deadline; its connection was shut down")


async def commit_status(
    connect: Callable[[], Awaitable[AsyncConnection[Any]]],
    sql: Mapping[str, str],
    xid: str,
    timeout_s: float,
) -> bool | None:
    """True: committed; False: aborted; None: not known within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            conn = await connect()
            async with conn:
                while True:
                    cursor = await conn.execute(sql["xact_status"], {"xid": xid})
                    row = await cursor.fetchone()
                    status = row[0] if row else None
                    if status == "committed":
                        await _confirm_durable(conn, sql)
                        return True
                    if status == "aborted":
                        return False
                    if status != "in progress":
                        return None  # too old to know (wraparound horizon)
                    # The old backend has not yet seen its connection end; it will decide.
                    await asyncio.sleep(POLL_S)
    except (TimeoutError, psycopg.Error) as e:
        log.warning("could not learn a group's commit status (%s)", type(e).__name__)
        return None


async def _confirm_durable(conn: AsyncConnection[Any], sql: Mapping[str, str]) -> None:
    """Return only once what this session read is durable where the data's future lies.

    Around a failover the old primary may come back writable for a moment after crash
    recovery and show a commit its synchronous standby never confirmed, which the promotion
    then drops (seen in tests/test_failover.py). A transaction of our own that takes an id
    commits only once the synchronous standbys hold the WAL up to its commit record, which
    follows the group's: on such an isolated primary it waits until the caller's bound runs
    out (CommitUnknown), and never confirms a commit that can still be lost.
    """
    async with conn.transaction():
        await conn.execute(sql["take_xid"])


def answers_after(
    pending: GroupOutcome, committed: bool | None
) -> list[IssuedCoupon | CouponError]:
    """Each caller's true answer once the commit's fate is known (or known to be unknown)."""
    if committed:
        return list(pending.results)
    new_codes = {r.code for r in pending.results if isinstance(r, IssuedCoupon) and not r.repeat}
    lost: CouponError = StoreUnavailable() if committed is False else CommitUnknown()
    # Codes held from earlier transactions and refusals do not depend on this commit.
    return [
        lost if isinstance(r, IssuedCoupon) and r.code in new_codes else r for r in pending.results
    ]
