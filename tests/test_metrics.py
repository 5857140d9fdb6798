"""Answered calls are tallied and added to the Prometheus series in bulk (coupon.metrics):
the bulk add must leave exactly what prometheus_client's own observe() and inc() would, and
calls must reach the series by themselves when traffic stops."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from coupon import metrics
from tests.support import give_up_after

WAIT_S = 10  # hang guard, not a speed check

# Both sides of every bucket bound, the bounds themselves, zero and past the last bound.
LATENCIES = [0.0, 0.0004, 0.001, 0.0010001, 0.0025, 0.007, 0.05, 0.3, 1.0, 4.0, 10.0, 10.5, 120.0]


def samples(method: str) -> dict[str, float]:
    """The latency histogram's samples for `method`: bucket counts (by bound), count, sum."""
    found = {}
    for family in metrics.LATENCY.collect():
        for sample in family.samples:
            if sample.labels.get("method") == method and not sample.name.endswith("_created"):
                found[sample.name.rsplit("_", 1)[1] + sample.labels.get("le", "")] = sample.value
    return found


async def test_tallied_latencies_land_in_the_buckets_observe_would_put_them_in() -> None:
    now = time.perf_counter()
    for seconds in LATENCIES:
        metrics._tally.record(("TalliedCheck", "ok", "test"), seconds, now)
        metrics.LATENCY.labels("ObservedCheck").observe(seconds)
    metrics.flush_calls()
    tallied, observed = samples("TalliedCheck"), samples("ObservedCheck")
    assert tallied["count"] == len(LATENCIES)
    assert tallied == observed
    assert tallied["bucket0.001"] == 3  # 0, 0.0004 and 0.001 itself: bounds are inclusive
    assert tallied["bucket+Inf"] == len(LATENCIES)
    requests = REGISTRY.get_sample_value(
        "coupon_requests_total", {"method": "TalliedCheck", "code": "ok", "key": "test"}
    )
    assert requests == len(LATENCIES)


async def test_calls_reach_the_series_by_themselves_after_traffic_stops() -> None:
    labels = {"method": "QuietCheck", "code": "ok", "key": "test"}
    metrics.flush_calls()  # starts a fresh interval: the next call is only tallied
    metrics._tally.record(("QuietCheck", "ok", "test"), 0.002, time.perf_counter())
    assert REGISTRY.get_sample_value("coupon_requests_total", labels) is None
    deadline = time.monotonic() + WAIT_S
    while REGISTRY.get_sample_value("coupon_requests_total", labels) != 1:
        give_up_after(deadline, "the tallied call to reach the metrics")
        await asyncio.sleep(0.05)  # polling interval
