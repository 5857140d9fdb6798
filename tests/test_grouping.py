"""The group-commit runner on its own, with the 'transaction' under the test's control."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from coupon.store.grouping import Group, GroupRunner

if TYPE_CHECKING:
    from collections.abc import Sequence


class Recorder:
    """A group writer whose connections and transactions come only when the test says so."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.connected = asyncio.Event()
        self.connected.set()  # a connection is at hand unless a test clears this
        self.connecting = asyncio.Event()
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def run(self, key: str, group: Group[int, int]) -> Sequence[int | BaseException]:
        self.connecting.set()
        await self.connected.wait()
        requests = group.claim()  # the transaction begins
        self.groups.append(list(requests))
        self.started.set()
        await self.release.wait()
        return [ValueError(f"odd {r}") if r % 2 else r * 10 for r in requests]


async def test_a_lone_call_is_written_at_once() -> None:
    recorder = Recorder()
    recorder.release.set()
    runner: GroupRunner[str, int, int] = GroupRunner(recorder.run, max_group_size=8)
    assert await runner.submit("c", 2) == 20
    assert recorder.groups == [[2]]


async def test_calls_arriving_during_a_write_go_together_next_with_their_own_outcomes() -> None:
    recorder = Recorder()
    sizes: list[int] = []
    runner: GroupRunner[str, int, int] = GroupRunner(
        recorder.run, max_group_size=3, on_group=sizes.append
    )
    first = asyncio.create_task(runner.submit("c", 0))
    await recorder.started.wait()
    later = [asyncio.create_task(runner.submit("c", n)) for n in range(1, 8)]
    await asyncio.sleep(0)  # let them queue; the first group's transaction is still open
    recorder.release.set()
    assert await first == 0
    results = await asyncio.gather(*later, return_exceptions=True)
    assert recorder.groups == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert sizes == [1, 3, 3, 1]
    assert [r if isinstance(r, int) else str(r) for r in results] == [
        "odd 1",
        20,
        "odd 3",
        40,
        "odd 5",
        60,
        "odd 7",
    ]


async def test_keys_are_grouped_separately() -> None:
    recorder = Recorder()
    recorder.release.set()
    runner: GroupRunner[str, int, int] = GroupRunner(recorder.run, max_group_size=8)
    assert await asyncio.gather(runner.submit("a", 2), runner.submit("b", 4)) == [20, 40]
    assert sorted(recorder.groups) == [[2], [4]]


async def test_a_failing_group_fails_each_of_its_calls_and_the_next_group_still_runs() -> None:
    calls = 0

    async def flaky(key: str, group: Group[int, int]) -> Sequence[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0)
            raise ConnectionError("database went away")
        return group.claim()

    runner: GroupRunner[str, int, int] = GroupRunner(flaky, max_group_size=8)
    first = asyncio.create_task(runner.submit("c", 1))
    second = asyncio.create_task(runner.submit("c", 2))
    with pytest.raises(ConnectionError):
        await first
    with pytest.raises(ConnectionError):
        await second
    assert await runner.submit("c", 3) == 3


async def test_a_claimed_caller_that_is_cancelled_still_gets_its_groups_outcome() -> None:
    # Its transaction may commit its code: the code must reach it, not be orphaned.
    recorder = Recorder()
    runner: GroupRunner[str, int, int] = GroupRunner(recorder.run, max_group_size=8)
    impatient = asyncio.create_task(runner.submit("c", 2))
    await recorder.started.wait()
    patient = asyncio.create_task(runner.submit("c", 4))
    impatient.cancel()
    await asyncio.sleep(0)  # the cancellation is delivered while the group is open
    recorder.release.set()
    assert await impatient == 20
    assert await patient == 40
    assert recorder.groups == [[2], [4]]


async def test_a_queued_caller_that_is_cancelled_leaves_the_queue_and_is_never_served() -> None:
    recorder = Recorder()
    runner: GroupRunner[str, int, int] = GroupRunner(recorder.run, max_group_size=8)
    first = asyncio.create_task(runner.submit("c", 2))
    await recorder.started.wait()
    queued = [asyncio.create_task(runner.submit("c", n)) for n in (4, 6, 8)]
    await asyncio.sleep(0)
    queued[1].cancel()
    await asyncio.sleep(0)
    recorder.release.set()
    assert await first == 20
    assert await queued[0] == 40
    assert await queued[2] == 80
    assert queued[1].cancelled()
    assert recorder.groups == [[2], [4, 8]]


async def test_callers_that_leave_while_the_group_waits_for_a_connection_are_not_in_it() -> None:
    recorder = Recorder()
    recorder.release.set()
    recorder.connected.clear()
    runner: GroupRunner[str, int, int] = GroupRunner(recorder.run, max_group_size=8)
    leaving = [asyncio.create_task(runner.submit("c", n)) for n in (2, 4)]
    await recorder.connecting.wait()
    staying = asyncio.create_task(runner.submit("c", 6))
    for task in leaving:
        task.cancel()
    await asyncio.sleep(0)
    recorder.connected.set()
    assert await staying == 60
    assert recorder.groups == [[6]]


async def test_a_caller_queued_longer_than_wait_s_leaves_with_the_given_error() -> None:
    recorder = Recorder()
    recorder.connected.clear()  # no connection ever: the call can only leave by its bound
    runner: GroupRunner[str, int, int] = GroupRunner(
        recorder.run,
        max_group_size=8,
        wait_s=0.01,
        on_wait_exceeded=lambda: LookupError("store too slow"),
    )
    with pytest.raises(LookupError, match="store too slow"):
        await runner.submit("c", 2)
    recorder.connected.set()
    recorder.release.set()
    await runner.drain()
    assert recorder.groups == [[]]


async def test_drain_waits_for_queued_groups() -> None:
    recorder = Recorder()
    runner: GroupRunner[str, int, int] = GroupRunner(recorder.run, max_group_size=8)
    task = asyncio.create_task(runner.submit("c", 2))
    await recorder.started.wait()
    drained = asyncio.create_task(runner.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    recorder.release.set()
    await drained
    assert task.done()
    assert task.result() == 20


async def test_a_groups_own_timeout_error_reaches_its_callers() -> None:
    async def slow_driver(key: str, group: Group[int, int]) -> Sequence[int | BaseException]:
        group.claim()
        raise TimeoutError("the driver timed out")

    for wait_s in (None, 30.0):
        runner: GroupRunner[str, int, int] = GroupRunner(slow_driver, 8, wait_s=wait_s)
        with pytest.raises(TimeoutError, match="the driver timed out"):
            await asyncio.wait_for(runner.submit("c", 1), 30)
