"""realtime_kit.threads: work awaited through ``detached`` leaves the request's own thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async

from realtime_kit.threads import detached, release_request_thread


def _thread() -> int:
    return threading.get_ident()


async def test_detached_work_runs_on_the_shared_thread_not_the_request_thread() -> None:
    shared = await sync_to_async(_thread)()
    # Django's ASGI handler enters one of these per request.
    async with ThreadSensitiveContext():
        own = await sync_to_async(_thread)()
        moved = await detached(sync_to_async(_thread)())
    assert own != shared
    assert moved == shared


async def test_cancelling_the_caller_cancels_the_detached_work() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.ensure_future(detached(work()))
    await asyncio.wait_for(started.wait(), 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cancelled.is_set()


def _current_thread() -> threading.Thread:
    return threading.current_thread()


async def test_release_ends_the_request_thread_and_later_calls_get_a_new_one() -> None:
    async with ThreadSensitiveContext():
        first = await sync_to_async(_current_thread)()
        assert first.is_alive()
        assert release_request_thread(), (
            "asgiref no longer keeps per-context executors where realtime_kit.threads looks"
        )
        first.join(timeout=5)
        assert not first.is_alive()
        # Django's response.close() at the end of the request still runs, on a fresh thread.
        second = await sync_to_async(_current_thread)()
        assert second is not first and second.is_alive()
    second.join(timeout=5)
    assert not second.is_alive()  # the context's exit ended that one, as before


async def test_release_without_a_request_thread_does_nothing() -> None:
    assert not release_request_thread()  # outside any request context
    async with ThreadSensitiveContext():
        assert not release_request_thread()  # no thread-sensitive call made one yet
