"""A connection broken at COMMIT, for real: a TCP proxy between the store and PostgreSQL cuts
the connection when a group's COMMIT passes through it. Every caller's answer is compared with
what the database holds:

- landed: COMMIT reached the server and committed; only its reply was lost. Every caller of the
  group gets its code (the store asked pg_xact_status on a fresh connection).
- lost: the connection was cut before COMMIT reached the server. Nothing of the group is
  stored, and its callers get `unavailable`.
- unreachable: as landed, but no fresh connection can be made to ask. The callers of new codes
  get CommitUnknown (Connect `unknown`): their codes are in fact stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from coupon.campaigns import IssuedCoupon, IssueRequest
from coupon.errors import CommitUnknown, CouponError, StoreUnavailable
from coupon.rpc_errors import to_connect_error
from tests.postgres import open_postgres_store
from tests.support import give_up_after
from tests.test_postgres_store import campaign, sql

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

# The simple-protocol Query message psycopg sends to commit ('Q', length 11, "COMMIT\0"); the
# SQL text of other statements may mention COMMIT in its comments.
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"
QUEUED = 30  # callers that wait behind a blocked first group, then go together
WAIT_S = 30.0  # hang guard


class CommitCutter:
    """A loopback TCP proxy to PostgreSQL that, once armed, cuts the first COMMIT it sees."""

    def __init__(self, dsn: str, mode: str) -> None:
        params = conninfo_to_dict(dsn)
        self.host = str(params.get("host") or "127.0.0.1")
        self.port = int(params.get("port") or 5432)
        self.mode = mode  # "landed", "lost" or "unreachable"
        self.armed = False
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.host.startswith("/"):  # a Unix-socket directory (the suite's pgserver)
            return await asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.port}")
        return await asyncio.open_connection(self.host, self.port)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.cut.is_set() and self.mode == "unreachable":
            client_w.close()
            return
        server_r, server_w = await self._upstream()
        reply_dropped = asyncio.Event()
        cutting = False

        async def to_server() -> None:
            nonlocal cutting
            while data := await client_r.read(65536):
                if self.armed and not self.cut.is_set() and COMMIT_MESSAGE in data:
                    self.cut.set()
                    cutting = True
                    if self.mode != "lost":
                        server_w.write(data)  # COMMIT reaches the server...
                        await server_w.drain()
                        await reply_dropped.wait()  # ...and its reply is dropped
                    break
                server_w.write(data)
                await server_w.drain()

        async def to_client() -> None:
            while data := await server_r.read(65536):
                if cutting:
                    reply_dropped.set()
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(to_server()), asyncio.create_task(to_client())]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for writer in (client_w, server_w):
                writer.close()


@contextlib.asynccontextmanager
async def commit_cutter(dsn: str, mode: str) -> AsyncIterator[tuple[CommitCutter, str]]:
    cutter = CommitCutter(dsn, mode)
    port = await cutter.start()
    try:
        yield cutter, make_conninfo(dsn, host="127.0.0.1", port=port)
    finally:
        await cutter.close()


async def waiting_on_a_lock(dsn: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not (await sql(dsn, "SELECT 1 FROM pg_locks WHERE NOT granted")):
        give_up_after(deadline, "a transaction waiting on the campaign's row lock")
        await asyncio.sleep(0.01)  # polling interval


def answer_of(result: IssuedCoupon | BaseException) -> str:
    if isinstance(result, IssuedCoupon):
        return "code"
    if isinstance(result, CouponError):
        return to_connect_error(result).code.value
    return type(result).__name__


@pytest.mark.parametrize("mode", ["landed", "lost", "unreachable"])
async def test_a_connection_cut_at_commit_gives_each_caller_the_true_answer(
    pg_dsn: str, mode: str
) -> None:
    async with (
        commit_cutter(pg_dsn, mode) as (cutter, proxy_dsn),
        open_postgres_store(proxy_dsn, connect_timeout_s=2) as pg,
    ):
        created = await pg.create_campaign(campaign(1000))
        # Hold the row lock so the first call's group blocks and the others queue behind it.
        locker = await psycopg.AsyncConnection.connect(pg_dsn)
        await locker.execute("SELECT 1 FROM campaigns WHERE id = %s FOR UPDATE", (created.id,))
        first = asyncio.create_task(pg.issue_coupon(created.id, IssueRequest()))
        await waiting_on_a_lock(pg_dsn)  # the first group is in take_many
        calls = [
            asyncio.create_task(pg.issue_coupon(created.id, IssueRequest())) for _ in range(QUEUED)
        ]
        await asyncio.sleep(0)
        await locker.rollback()
        await locker.close()
        # The first group commits untouched; arm the cut for the next COMMIT (the queued group).
        first_result = await asyncio.wait_for(first, WAIT_S)
        cutter.armed = True
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT_S)
        assert cutter.cut.is_set()

    stored = {code for (code,) in await sql(pg_dsn, "SELECT code FROM coupons")}
    (issued,) = (await sql(pg_dsn, "SELECT issued FROM campaigns"))[0]
    answers: dict[str, int] = {}
    for result in results:
        answers[answer_of(result)] = answers.get(answer_of(result), 0) + 1
    codes = [r.code for r in results if isinstance(r, IssuedCoupon)]
    print(
        f"\nCOMMIT cut ({mode}): {QUEUED} callers of the cut group answered {answers};"
        f" stored {len(stored)} codes (issued {issued}), of which the first group's 1;"
        f" every code answered is stored: {set(codes) <= stored}"
    )
    assert isinstance(first_result, IssuedCoupon)
    assert issued == len(stored)
    assert first_result.code in stored
    if mode == "landed":
        assert answers == {"code": QUEUED}
        assert set(codes) | {first_result.code} == stored
    elif mode == "lost":
        assert all(isinstance(r, StoreUnavailable) for r in results), answers
        assert stored == {first_result.code}
    else:
        assert all(isinstance(r, CommitUnknown) for r in results), answers
        assert answers == {"unknown": QUEUED}
        assert len(stored) == QUEUED + 1  # the commit landed: `unknown` was the honest answer
