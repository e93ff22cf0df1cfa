"""realtime_kit.drain: the process-level drain signal, with no server (each test its own Drain)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from realtime_kit.drain import Drain, Draining

TIMEOUT = 5.0


async def test_begin_runs_every_callback_once_and_sets_the_flag() -> None:
    drain = Drain()
    calls: list[str] = []

    async def first() -> None:
        calls.append("first")

    async def second() -> None:
        await asyncio.sleep(0.01)
        calls.append("second")

    drain.on_drain(first)
    drain.on_drain(second)
    drain.on_drain(first)  # registering twice (two ready() calls) still runs it once
    assert not drain.draining()
    await asyncio.gather(drain.begin(), drain.begin())
    await drain.begin()
    assert drain.draining()
    assert sorted(calls) == ["first", "second"]


async def test_a_second_begin_waits_for_the_callbacks_of_the_first() -> None:
    drain = Drain()
    release = asyncio.Event()
    done: list[bool] = []

    async def slow() -> None:
        await release.wait()
        done.append(True)

    drain.on_drain(slow)
    first = asyncio.create_task(drain.begin())
    await asyncio.sleep(0)
    second = asyncio.create_task(drain.begin())
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)
    assert done == [True]


async def test_failing_and_overrunning_callbacks_are_logged_and_do_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    drain = Drain()
    finished: list[str] = []

    async def fails() -> None:
        raise RuntimeError("boom")

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def works() -> None:
        finished.append("works")

    for callback in (fails, hangs, works):
        drain.on_drain(callback)
    with caplog.at_level(logging.WARNING, logger="realtime_kit.drain"):
        await asyncio.wait_for(drain.begin(timeout_seconds=0.2), TIMEOUT)
    assert finished == ["works"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("fails" in m and "failed" in m for m in messages), messages
    assert any("hangs" in m and "did not finish within 0.2 s" in m for m in messages), messages


async def test_wait_and_event_are_per_loop_and_set_even_when_asked_late() -> None:
    drain = Drain()
    waiter = asyncio.create_task(drain.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    await drain.begin()
    await asyncio.wait_for(waiter, TIMEOUT)
    assert drain.event().is_set()


def test_an_event_of_another_loop_is_set_too() -> None:
    drain = Drain()
    other = asyncio.new_event_loop()
    try:
        event = other.run_until_complete(_event_of(drain))
        asyncio.run(drain.begin())
        other.run_until_complete(asyncio.wait_for(event.wait(), TIMEOUT))
    finally:
        other.close()


async def _event_of(drain: Drain) -> asyncio.Event:
    return drain.event()


async def test_until_drain_passes_items_through_when_no_drain_comes() -> None:
    drain = Drain()
    assert [item async for item in drain.until_drain(_count(3))] == [0, 1, 2]


async def test_until_drain_raises_when_the_drain_begins_and_the_source_is_closed() -> None:
    drain = Drain()
    closed = asyncio.Event()
    received: list[int] = []

    async def source() -> AsyncGenerator[int, None]:
        try:
            yield 1
            await asyncio.Event().wait()  # waiting for the model, say
            yield 2
        finally:
            closed.set()

    async def consume() -> None:
        items = source()
        try:
            async for item in drain.until_drain(items):
                received.append(item)
        finally:
            await items.aclose()  # what aclosing() does in the views

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await drain.begin()
    with pytest.raises(Draining):
        await asyncio.wait_for(task, TIMEOUT)
    assert received == [1]
    assert closed.is_set()


async def test_until_drain_refuses_to_start_during_a_drain() -> None:
    drain = Drain()
    await drain.begin()
    with pytest.raises(Draining):
        async for _ in drain.until_drain(_count(3)):
            pass


async def test_a_cancelled_consumer_can_close_the_source_at_once() -> None:
    # Django cancels the body's task when the client leaves, while it waits for an item.
    drain = Drain()
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[int, None]:
        try:
            yield 0
            await asyncio.Event().wait()
            yield 1
        finally:
            closed.set()

    async def consume() -> None:
        items = source()
        try:
            async for _ in drain.until_drain(items):
                pass
        finally:
            await items.aclose()  # fails ("already running") if a wait were left behind

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert closed.is_set()
    assert not drain.draining()


async def _count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i
