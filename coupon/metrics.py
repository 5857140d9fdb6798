"""Prometheus metrics. With several worker processes, prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the server before it starts workers) sums every worker into
one /metrics answer, whichever worker serves the scrape."""

from __future__ import annotations

import os
import time
from typing import Any

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
SOLD_OUT_REFUSALS = REFUSALS.labels("sold_out")
NOT_STARTED_REFUSALS = REFUSALS.labels("not_started")
ENDED_REFUSALS = REFUSALS.labels("ended")
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


# The labelled series of every call, looked up once each: `labels()` costs a lock and a tuple
# of label values on every call otherwise. Bounded: methods, Connect codes and key names
# (from the config) are all few.
_request_series: dict[tuple[str, str, str], Any] = {}
_latency_series: dict[str, Any] = {}


def record_call(method: str, error: Exception | None, started: float) -> None:
    """Count one answered call (started at `perf_counter()` time `started`)."""
    labels = (method, "ok" if error is None else _code_of(error), current_caller().name)
    requests = _request_series.get(labels)
    if requests is None:
        requests = _request_series[labels] = REQUESTS.labels(*labels)
    requests.inc()
    latency = _latency_series.get(method)
    if latency is None:
        latency = _latency_series[method] = LATENCY.labels(method)
    latency.observe(time.perf_counter() - started)


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


# Webhooks (coupon.webhooks). Events are counted once each, whatever the number of endpoints.
WEBHOOK_EVENTS_WRITTEN = Counter(
    "coupon_webhook_events_written", "Events committed to the outbox with their change"
)
WEBHOOK_EVENTS_DELIVERED = Counter(
    "coupon_webhook_events_delivered", "Events acknowledged (2xx) by an endpoint"
)
WEBHOOK_POSTS_FAILED = Counter(
    "coupon_webhook_posts_failed", "Webhook POSTs not acknowledged (error, timeout, non-2xx)"
)
WEBHOOK_EVENTS_DEAD = Counter(
    "coupon_webhook_events_dead_lettered", "Events given up on after webhooks.max_attempts"
)
WEBHOOK_DELIVERY_LAG = Histogram(
    "coupon_webhook_delivery_lag_seconds",
    "From an event's time to its endpoint's acknowledgement",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
