"""The memory store's outbox: events wait in this process and are lost when it exits.

That matches the memory store itself (its codes are lost too). Delivery uses the same POST,
signature and retry schedule as PostgreSQL's outbox: one lane per endpoint, one POST at a time,
up to `MAX_BATCH` waiting events per POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coupon import metrics
from coupon.webhooks.delivery import DeliveryFailed, endpoints_for

if TYPE_CHECKING:
    from collections.abc import Sequence

    from coupon.config import WebhookEndpoint
    from coupon.webhooks.delivery import Backoff, Deliverer
    from coupon.webhooks.events import Event

log = logging.getLogger("coupon.webhooks")

MAX_BATCH = 256


@dataclass(slots=True)
class DeadBatch:
    endpoint_url: str
    events: list[Event]
    error: str


@dataclass(slots=True)
class _Lane:
    endpoint: WebhookEndpoint
    pending: list[Event] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryOutbox:
    def __init__(
        self,
        endpoints: Sequence[WebhookEndpoint],
        backoff: Backoff,
        deliverer: Deliverer,
        *,
        stop_timeout_s: float,
    ) -> None:
        self._lanes = [_Lane(e) for e in endpoints]
        self._backoff = backoff
        self._deliverer = deliverer
        self._stop_timeout_s = stop_timeout_s
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.dead: list[DeadBatch] = []

    def record(self, events: Sequence[Event]) -> None:
        """Called by the memory store in the same step as the change (no await between)."""
        metrics.WEBHOOK_EVENTS_WRITTEN.inc(len(events))
        for lane in self._lanes:
            wanted = [e for e in events if endpoints_for([lane.endpoint], e.brand)]
            if wanted:
                lane.pending.extend(wanted)
                lane.wake.set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(lane), name=f"coupon-webhooks-{n}")
            for n, lane in enumerate(self._lanes)
        ]

    async def stop(self) -> None:
        """Let each lane finish the POST in flight (bounded by its timeout), then stop."""
        self._stopping.set()
        for lane in self._lanes:
            lane.wake.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=self._stop_timeout_s)
            for task in late:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late)
        await self._deliverer.aclose()
        left = sum(len(lane.pending) for lane in self._lanes)
        if left:
            log.warning("stopping with %d undelivered webhook events (memory store)", left)

    async def _run(self, lane: _Lane) -> None:
        while not self._stopping.is_set():
            if not lane.pending:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            batch = lane.pending[:MAX_BATCH]
            if await self._deliver(lane.endpoint, batch):
                del lane.pending[: len(batch)]

    async def _deliver(self, endpoint: WebhookEndpoint, batch: list[Event]) -> bool:
        """True when the batch is done with (delivered or dead); False when stopping."""
        attempts = 0
        while True:
            try:
                await self._deliverer.post(endpoint, batch)
            except DeliveryFailed as e:
                attempts += 1
                if self._backoff.gives_up(attempts):
                    log.error("webhook batch of %d events dead-lettered: %s", len(batch), e)
                    metrics.WEBHOOK_EVENTS_DEAD.inc(len(batch))
                    self.dead.append(DeadBatch(endpoint.url, batch, str(e)))
                    return True
                delay = self._backoff.delay_s(attempts)
                log.warning("webhook POST failed (%s); retrying in %gs", e, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return False
            else:
                return True
