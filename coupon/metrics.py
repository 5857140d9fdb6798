"""Prometheus metrics. With several worker processes, prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the server before it starts workers) sums every worker into
one /metrics answer, whichever worker serves the scrape."""

from __future__ import annotations

import asyncio
import bisect
import os
import time

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
_LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY = Histogram(
    "coupon_request_duration_seconds",
    "Time from the call's start to its answer",
    ["method"],
    buckets=(*_LATENCY_BOUNDS, float("inf")),
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


# How long answered calls may wait to be added to the metrics: every call updated the
# Prometheus series itself before, a lock and a bucket scan per update, about 3 µs of the hot
# path. Calls are now tallied in plain counters and added in bulk, at most this long after
# they are answered, and before every scrape this process serves (so a single process's
# /metrics is always exact; another worker's calls may show up to this much later).
FLUSH_INTERVAL_S = 0.25


class _CallTally:
    """Calls answered and not yet added to REQUESTS and LATENCY. Only the event loop's thread
    records calls, so the tally needs no lock."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.increments: dict[Counter, int] = {}  # other per-call counters (count_one)
        # Per method: a count per latency bucket (the last one +Inf), and the latencies' sum.
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.flush_due = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def record(self, labels: tuple[str, str, str], seconds: float, now: float) -> None:
        self.counts[labels] = self.counts.get(labels, 0) + 1
        method = labels[0]
        buckets = self.buckets.get(method)
        if buckets is None:
            buckets = self.buckets[method] = [0] * (len(_LATENCY_BOUNDS) + 1)
            self.sums[method] = 0.0
        # prometheus_client's bucket for an observation: the first bound >= it.
        buckets[bisect.bisect_left(_LATENCY_BOUNDS, seconds)] += 1
        self.sums[method] += seconds
        if now >= self.flush_due:
            self.flush()
        elif self.timer is None:
            # Calls may stop for a while: the last ones must still reach /metrics. A timer on
            # a loop that has since closed never fires; the next call past flush_due flushes.
            self.timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.flush_due = time.perf_counter() + FLUSH_INTERVAL_S
        for labels, count in self.counts.items():
            REQUESTS.labels(*labels).inc(count)
        self.counts.clear()
        for counter, count in self.increments.items():
            counter.inc(count)
        self.increments.clear()
        for method, buckets in self.buckets.items():
            series = LATENCY.labels(method)
            # prometheus_client (pinned) has no public call to add many observations at once:
            # its histogram keeps a value per bucket (not cumulative) and one for the sum,
            # which observe() increments. tests/test_metrics.py compares the result with
            # observe() itself.
            for index, count in enumerate(buckets):
                if count:
                    series._buckets[index].inc(count)
                    buckets[index] = 0
            series._sum.inc(self.sums[method])
            self.sums[method] = 0.0


_tally = _CallTally()


def record_call(method: str, error: Exception | None, started: float) -> None:
    """Count one answered call (started at `perf_counter()` time `started`). Called on the
    event loop's thread only."""
    now = time.perf_counter()
    labels = (method, "ok" if error is None else _code_of(error), current_caller().name)
    _tally.record(labels, now - started, now)


def count_one(counter: Counter) -> None:
    """Add one to `counter` (a series of one of the counters above) with the calls' tally: for
    counters a call updates, such as COUPONS_ISSUED; the call's own record flushes it."""
    _tally.increments[counter] = _tally.increments.get(counter, 0) + 1


def flush_calls() -> None:
    """Add every call tallied so far to the metrics (before a scrape, and at shutdown)."""
    _tally.flush()


def _code_of(error: Exception) -> str:
    if isinstance(error, ConnectError):
        return error.code.value
    return "internal"


def render() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and its content type."""
    flush_calls()
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
