"""realtime_kit.loops.per_loop: one instance per running event loop, gone with its loop."""

from __future__ import annotations

import asyncio
import gc

import pytest

from realtime_kit.loops import PerLoop, per_loop


def test_one_instance_per_loop_made_on_first_get() -> None:
    made: list[object] = []

    def factory() -> object:
        made.append(object())
        return made[-1]

    cache = per_loop(factory)

    async def twice() -> tuple[object | None, object, object]:
        return cache.peek(), cache.get(), cache.get()

    before, first, second = asyncio.run(twice())
    assert before is None and first is second and len(made) == 1
    _, other, _ = asyncio.run(twice())  # a new loop gets its own
    assert other is not first and len(made) == 2
    gc.collect()
    assert cache.values() == []  # both loops are closed and collected


def test_pop_forgets_the_running_loops_instance() -> None:
    cache: PerLoop[list[int]] = per_loop(list)

    async def run() -> None:
        first = cache.get()
        assert cache.pop() is first
        assert cache.pop() is None
        assert cache.get() is not first

    asyncio.run(run())


def test_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        per_loop(list).get()
