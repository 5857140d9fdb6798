"""Domain values to protobuf messages: the hand-written fast conversions must give exactly
what the protobuf library's own conversion gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from protobuf.wkt import Timestamp

from coupon.wire import instant, timestamp

MOMENTS = [
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # before the epoch: seconds < 0
    datetime(1, 1, 1, tzinfo=UTC),  # the first instant either type can hold
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # and the last
    datetime(2026, 11, 22, 18, 30, 5, 123_456, tzinfo=UTC),
    datetime(2026, 11, 22, 9, 0, tzinfo=timezone(timedelta(hours=9))),  # KST: the same as 00:00Z
    datetime(2026, 3, 1, 0, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=-5, seconds=7))),
]


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_timestamp_is_the_librarys_conversion_and_reads_back_exactly(moment: datetime) -> None:
    converted = timestamp(moment)
    assert converted == Timestamp.from_datetime(moment)
    assert converted is not None
    assert 0 <= converted.nanos < 1_000_000_000
    assert instant(converted, "t") == moment


def test_no_instant_is_no_timestamp() -> None:
    assert timestamp(None) is None
