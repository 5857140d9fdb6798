"""Group commit: calls for the same key that arrive while a group is being written wait, then
go together in the next group.

A lone call starts a group at once (no fixed delay, so latency at low load is one transaction);
under load, group size grows by itself to whatever arrived during the previous transaction.
That is what lifts a hot campaign past one-transaction-per-coupon: the row lock is taken, and
the commit flushed, once per group instead of once per coupon.
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


@dataclass(slots=True)
class _Queue(Generic[Req, Res]):
    waiting: list[_Waiting[Req, Res]] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None


class GroupRunner(Generic[K, Req, Res]):
    def __init__(
        self,
        run_group: Callable[[K, Sequence[Req]], Awaitable[Sequence[Res | BaseException]]],
        max_group_size: int,
        on_group: Callable[[int], None] | None = None,
    ) -> None:
        if max_group_size < 1:
            raise ValueError("max_group_size must be at least 1")
        self._run_group = run_group
        self._max_group_size = max_group_size
        self._on_group = on_group
        self._queues: dict[K, _Queue[Req, Res]] = {}

    async def submit(self, key: K, request: Req) -> Res:
        """Queue the call and wait for the group that carries it to be written."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        queue.waiting.append(_Waiting(request, future))
        if queue.writer is None:
            queue.writer = asyncio.create_task(self._write_groups(key, queue))
        # shield: a caller that goes away must not cancel the group's transaction for the others.
        return await asyncio.shield(future)

    async def _write_groups(self, key: K, queue: _Queue[Req, Res]) -> None:
        try:
            while queue.waiting:
                group = queue.waiting[: self._max_group_size]
                del queue.waiting[: len(group)]
                if self._on_group is not None:
                    self._on_group(len(group))
                await self._write_one(key, group)
        finally:
            queue.writer = None
            if not queue.waiting:
                self._queues.pop(key, None)

    async def _write_one(self, key: K, group: list[_Waiting[Req, Res]]) -> None:
        try:
            outcomes = await self._run_group(key, [w.request for w in group])
            if len(outcomes) != len(group):
                raise RuntimeError(f"group of {len(group)} got {len(outcomes)} outcomes")
        except Exception as error:  # noqa: BLE001 - every waiter gets the group's error
            for waiting in group:
                _settle(waiting.future, error)
            return
        for waiting, outcome in zip(group, outcomes, strict=True):
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
