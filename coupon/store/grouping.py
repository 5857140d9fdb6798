"""Group commit: calls for the same key that arrive while a group is being written wait, then
go together in the next group.

A lone call starts a group at once (no fixed delay, so latency at low load is one transaction);
under load, group size grows by itself to whatever arrived during the previous transaction.
That is what lifts a hot campaign past one-transaction-per-coupon: the row lock is taken, and
the commit flushed, once per group instead of once per coupon.

Who is in a group: the writer claims the waiting calls only when its transaction can begin
(`Group.claim`, called by the store once it holds a connection). A call that leaves before
then (its deadline passed, its client disconnected, or it waited `wait_s`) is taken out of the
queue and nothing is issued for it. A call that was claimed stays to the end: its group's
outcome is its true answer (a code that is being committed must reach its caller), so a
cancellation that arrives after the claim is absorbed and the call answers with that outcome.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable, Sequence

log = logging.getLogger("coupon.grouping")

K = TypeVar("K", bound="Hashable")
Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(slots=True)
class _Waiting(Generic[Req, Res]):
    request: Req
    future: asyncio.Future[Res]
    deadline: float | None  # loop time after which an unclaimed call gives up
    claimed: bool = False


@dataclass(slots=True)
class _Queue(Generic[Req, Res]):
    waiting: list[_Waiting[Req, Res]] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None


class Group(Generic[Req, Res]):
    """The next group of one key, handed to the writer before any of its calls is claimed."""

    __slots__ = ("_max_size", "_on_group", "_queue", "claimed_calls")

    def __init__(
        self,
        queue: _Queue[Req, Res],
        max_size: int,
        on_group: Callable[[int], None] | None,
    ) -> None:
        self._queue = queue
        self._max_size = max_size
        self._on_group = on_group
        self.claimed_calls: list[_Waiting[Req, Res]] = []  # for the runner

    def claim(self) -> list[Req]:
        """Take the calls still waiting (at most max_group_size), in arrival order.

        Call it when the transaction that serves them begins; only these calls are served,
        and the outcomes returned must follow this order. Empty: every caller left.
        """
        if self.claimed_calls:
            raise RuntimeError("a group is claimed once")
        taken = self._queue.waiting[: self._max_size]
        del self._queue.waiting[: len(taken)]
        for waiting in taken:
            waiting.claimed = True
        self.claimed_calls = taken
        if taken and self._on_group is not None:
            self._on_group(len(taken))
        return [w.request for w in taken]

    @property
    def deadline(self) -> float | None:
        """The loop time by which the claimed calls were promised an answer (the earliest)."""
        deadlines = [w.deadline for w in self.claimed_calls if w.deadline is not None]
        return min(deadlines) if deadlines else None


class GroupRunner(Generic[K, Req, Res]):
    def __init__(
        self,
        run_group: Callable[[K, Group[Req, Res]], Awaitable[Sequence[Res | BaseException]]],
        max_group_size: int,
        on_group: Callable[[int], None] | None = None,
        *,
        wait_s: float | None = None,
        on_wait_exceeded: Callable[[], BaseException] | None = None,
    ) -> None:
        if max_group_size < 1:
            raise ValueError("max_group_size must be at least 1")
        self._run_group = run_group
        self._max_group_size = max_group_size
        self._on_group = on_group
        self._wait_s = wait_s
        self._on_wait_exceeded = on_wait_exceeded or TimeoutError
        self._queues: dict[K, _Queue[Req, Res]] = {}

    async def submit(self, key: K, request: Req) -> Res:
        """Queue the call and wait for the group that carries it to be written."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Res] = loop.create_future()
        deadline = None if self._wait_s is None else loop.time() + self._wait_s
        waiting = _Waiting(request, future, deadline)
        queue.waiting.append(waiting)
        if queue.writer is None:
            queue.writer = asyncio.create_task(self._write_groups(key, queue))
        while True:
            if waiting.claimed:
                try:
                    # shield: a caller that goes away must not cancel the group's transaction
                    # for the others.
                    return await asyncio.shield(future)
                except asyncio.CancelledError:
                    if future.cancelled():
                        raise
                    # The transaction may commit this caller's code, so the caller waits for
                    # it and answers with it (asyncio delivers a cancellation once).
                    continue
            bound = asyncio.timeout_at(deadline)
            try:
                async with bound:
                    return await asyncio.shield(future)
            except TimeoutError:
                if not bound.expired():
                    raise  # the group's own error, not this caller's bound
                if waiting.claimed:
                    continue  # claimed as the bound passed: its outcome is the answer
                self._leave(queue, waiting)
                raise self._on_wait_exceeded() from None
            except asyncio.CancelledError:
                if waiting.claimed:
                    continue
                self._leave(queue, waiting)
                raise

    @staticmethod
    def _leave(queue: _Queue[Req, Res], waiting: _Waiting[Req, Res]) -> None:
        queue.waiting.remove(waiting)
        waiting.future.cancel()

    async def _write_groups(self, key: K, queue: _Queue[Req, Res]) -> None:
        try:
            while queue.waiting:
                await self._write_one(key, Group(queue, self._max_group_size, self._on_group))
        finally:
            queue.writer = None
            if not queue.waiting:
                self._queues.pop(key, None)

    async def _write_one(self, key: K, group: Group[Req, Res]) -> None:
        try:
            outcomes = await self._run_group(key, group)
            claimed = len(group.claimed_calls)
            if len(outcomes) != claimed:
                raise RuntimeError(f"group of {claimed} got {len(outcomes)} outcomes")
        except Exception as error:  # noqa: BLE001 - every waiter gets the group's error
            if not group.claimed_calls:
                # Failed before its transaction began (no connection): the callers waiting now
                # get the error, as nothing was written for them.
                group.claim()
            for waiting in group.claimed_calls:
                _settle(waiting.future, error)
            return
        for waiting, outcome in zip(group.claimed_calls, outcomes, strict=True):
            _settle(waiting.future, outcome)

    async def drain(self) -> None:
        """Wait until every queued call has been written (for a graceful shutdown)."""
        while writers := [q.writer for q in self._queues.values() if q.writer is not None]:
            await asyncio.gather(*writers, return_exceptions=True)


def _settle(future: asyncio.Future[Res], outcome: Res | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
