"""realtime_kit.threads: work awaited through ``detached`` leaves the request's own thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async

from realtime_kit.threads import detached


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
