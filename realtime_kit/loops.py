"""One instance per event loop: the per-process hubs, queues, keepers and sweepers.

Under daphne a process runs one event loop, so "per loop" is "per process". Tests run one loop
per test, and an object bound to a closed loop (its tasks, futures, connections) must not
leak into the next: the instances are held in a ``weakref.WeakKeyDictionary`` keyed by the
loop, so each goes away with its loop. Every call must come from code running in a loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["PerLoop", "per_loop"]


class PerLoop(Generic[T]):
    """The running loop's instance, made by ``factory`` on first use of ``get()``."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._instances: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        instance = self._instances.get(loop)
        if instance is None:
            instance = self._instances[loop] = self._factory()
        return instance

    def peek(self) -> T | None:
        """The running loop's instance if it has one (none is made)."""
        return self._instances.get(asyncio.get_running_loop())

    def set(self, instance: T) -> None:
        self._instances[asyncio.get_running_loop()] = instance

    def pop(self) -> T | None:
        """Forget the running loop's instance; it, or None if there was none."""
        return self._instances.pop(asyncio.get_running_loop(), None)

    def values(self) -> list[T]:
        """Every loop's instance (a copy: loops may go away meanwhile)."""
        return list(self._instances.values())


def per_loop(factory: Callable[[], T]) -> PerLoop[T]:
    """``per_loop(Hub).get()`` is the running loop's ``Hub``, made the first time."""
    return PerLoop(factory)
