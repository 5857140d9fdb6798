"""Which outbox a config needs, and what runs its deliveries in this process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from coupon.webhooks.delivery import Backoff, Deliverer
from coupon.webhooks.memory_outbox import MemoryOutbox

if TYPE_CHECKING:
    from coupon.config import Config
    from coupon.webhooks.pg_outbox import PgOutbox


class Runner(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class Webhooks:
    """No endpoints configured: both None, and no event is written."""

    memory: MemoryOutbox | None = None
    postgres: PgOutbox | None = None

    def runner(self) -> Runner | None:
        """What delivers in this process; None when nothing is configured."""
        if self.memory is not None:
            return self.memory
        if self.postgres is not None:
            from coupon.webhooks.pg_outbox import PgDeliveryWorker

            return PgDeliveryWorker(self.postgres)
        return None


def build_webhooks(config: Config) -> Webhooks:
    hooks = config.webhooks
    if not hooks.endpoints:
        return Webhooks()
    if config.store.type == "postgres":
        from coupon.webhooks.pg_outbox import PgOutbox

        return Webhooks(postgres=PgOutbox(hooks, config.database))
    backoff = Backoff(hooks.retry_initial_s, hooks.retry_max_s, hooks.max_attempts)
    return Webhooks(
        memory=MemoryOutbox(
            hooks.endpoints,
            backoff,
            Deliverer(hooks.timeout_s),
            stop_timeout_s=hooks.timeout_s + 1.0,
        )
    )
