"""The process is draining: a restart is under way, so long-lived work should end cleanly now.

The runner (``realtime_kit.server``) calls ``begin_drain()`` once, on SIGTERM, in the server's
event loop, after it stopped accepting connections and before it closes the WebSockets. The
apps react in two ways:

- work that must *finish* before the sockets close (store an interrupted assistant reply and
  tell the room) registers an async callback with ``on_drain()`` in ``AppConfig.ready()``;
  ``begin_drain()`` runs the callbacks concurrently, each bounded, and returns when they are done;
- streams that only need to *stop* (an SSE body) check ``draining()`` or wait on ``wait()`` /
  ``until_drain()`` and end their response normally, so clients reconnect and resume.

Nothing here runs unless a runner calls ``begin_drain()``: under plain daphne or uvicorn the
apps behave as before. The state is per process; asyncio events are created lazily, one per
event loop that asks for one (none at import time).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
DrainCallback = Callable[[], Awaitable[None]]

# How long one callback may run when the caller gives no bound (the runner passes its own).
DEFAULT_CALLBACK_TIMEOUT_SECONDS = 5.0


class Draining(Exception):
    """Raised by ``until_drain`` when the drain begins before its source ends."""


class Drain:
    """One process's drain state: the callbacks, the flag, and an event per event loop."""

    def __init__(self) -> None:
        self._callbacks: list[DrainCallback] = []
        self._draining = False
        self._events: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
            weakref.WeakKeyDictionary()
        )
        self._run: asyncio.Task[None] | None = None

    def on_drain(self, callback: DrainCallback) -> None:
        """Run ``callback()`` (a coroutine function) when the drain begins; once per callback."""
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    def draining(self) -> bool:
        """Whether the drain has begun (it never ends: the process exits after it)."""
        return self._draining

    def event(self) -> asyncio.Event:
        """The running loop's event, set once the drain begins."""
        loop = asyncio.get_running_loop()
        event = self._events.get(loop)
        if event is None:
            event = self._events[loop] = asyncio.Event()
            if self._draining:
                event.set()
        return event

    async def wait(self) -> None:
        """Return once the drain has begun."""
        await self.event().wait()

    async def begin(self, timeout_seconds: float = DEFAULT_CALLBACK_TIMEOUT_SECONDS) -> None:
        """Start draining and run every callback, each within ``timeout_seconds``.

        Idempotent: a second call waits for the first one's callbacks instead of running them
        again. A callback that fails or overruns is logged; it never stops the others.
        """
        if self._run is None:
            self._draining = True
            self._set_events()
            self._run = asyncio.ensure_future(self._run_callbacks(timeout_seconds))
        await asyncio.shield(self._run)

    def _set_events(self) -> None:
        running = asyncio.get_running_loop()
        for loop, event in list(self._events.items()):
            if loop is running:
                event.set()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def _run_callbacks(self, timeout_seconds: float) -> None:
        await asyncio.gather(*(self._call(cb, timeout_seconds) for cb in self._callbacks))

    async def _call(self, callback: DrainCallback, timeout_seconds: float) -> None:
        name = getattr(callback, "__qualname__", repr(callback))
        try:
            async with asyncio.timeout(timeout_seconds):
                await callback()
        except TimeoutError:
            logger.warning("Drain callback %s did not finish within %g s", name, timeout_seconds)
        except Exception:
            logger.exception("Drain callback %s failed", name)

    async def until_drain(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Yield from ``items`` until they end; raise ``Draining`` if the drain begins first.

        Waiting for the next item is cancelled when the drain begins, as a client hang-up
        would cancel it, and the caller closes ``items`` (``aclosing``): its ``finally`` runs.
        """
        if self._draining:
            raise Draining
        stop = asyncio.ensure_future(self.wait())
        step: asyncio.Future[T] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(items))
                await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    raise Draining  # finally cancels the wait for the next item
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            # Also when our consumer leaves mid-wait: ``items`` must not be left running in
            # another task, or closing it would fail ("already running").
            for waiter in (step, stop):
                if waiter is not None and not waiter.done():
                    waiter.cancel()
            await asyncio.gather(
                *(w for w in (step, stop) if w is not None), return_exceptions=True
            )


# This process's drain. The functions below look it up when called, so a test can put a
# fresh Drain in its place (monkeypatch) without touching the one the server uses.
_drain = Drain()


def on_drain(callback: DrainCallback) -> None:
    """Run ``callback()`` (a coroutine function) when this process drains; once per callback."""
    _drain.on_drain(callback)


def draining() -> bool:
    """Whether this process has begun draining."""
    return _drain.draining()


async def wait() -> None:
    """Return once this process has begun draining."""
    await _drain.wait()


def until_drain(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield from ``items`` until they end; raise ``Draining`` if this process drains first."""
    return _drain.until_drain(items)


async def begin_drain(timeout_seconds: float = DEFAULT_CALLBACK_TIMEOUT_SECONDS) -> None:
    """Start this process's drain (see ``Drain.begin``); the runner calls it on SIGTERM."""
    await _drain.begin(timeout_seconds)
