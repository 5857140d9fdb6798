"""Prometheus metrics. With several worker processes, prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the server before it starts workers) sums every worker into
one /metrics answer, whichever worker serves the scrape."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from connectrpc.errors import ConnectError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from coupon.caller import current_caller

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter(
    "coupon_requests",
    "Connect calls answered, by method, Connect code and the caller's key name",
    ["method", "code", "key"],
)
LATENCY = Histogram(
    "coupon_request_duration_seconds",
    "Time from the call's start to its answer",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COUPONS_ISSUED = Counter("coupon_coupons_issued", "New codes issued (repeats for a user excluded)")
REFUSALS = Counter("coupon_issue_refusals", "IssueCoupon calls refused, by reason", ["reason"])
GROUP_SIZE = Histogram(
    "coupon_issue_group_size",
    "IssueCoupon calls served by one database transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
POOL_CONNECTIONS = Gauge(
    "coupon_pool_connections",
    "Database pool connections, by state",
    ["state"],
    multiprocess_mode="livesum",
)

DB_CLOCK_SKEW = Gauge(
    "coupon_db_clock_skew_seconds",
    "The database clock minus this process's clock, last measured (PostgreSQL)",
    multiprocess_mode="liveall",
)

HTTP_READ_TIMEOUTS = Counter(
    "coupon_http_read_timeouts",
    "Connections closed because a request's headers or body came too slowly",
    ["phase"],
)


class MetricsInterceptor:
    """A Connect metadata interceptor placed first, so it also counts calls refused before their
    body was parsed (bad JSON, oversize bodies, auth)."""

    async def on_start(self, ctx: RequestContext[Any, Any]) -> float:
        return time.perf_counter()

    async def on_end(
        self, started: float, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        method = ctx.method.name
        code = "ok" if error is None else _code_of(error)
        REQUESTS.labels(method, code, current_caller().name).inc()
        LATENCY.labels(method).observe(time.perf_counter() - started)


def _code_of(error: Exception) -> str:
    if isinstance(error, ConnectError):
        return error.code.value
    return "internal"


def render() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and its content type."""
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
