"""Where the sync work of a long-lived stream runs: the process's shared thread, not its own.

Django's ASGI handler gives every HTTP request a thread-sensitive context of its own (asgiref's
``ThreadSensitiveContext``): the request's ``sync_to_async`` calls, the async ORM's included,
run on a thread made for that request, which keeps its own database connection, until the
response ends. For a request that lasts milliseconds that is isolation; for a stream held for
hours it is one open database connection per stream (measured with SQLite: its page cache and
WAL index mapping, ~65 KiB of RSS per stream; with PostgreSQL, one server connection each).

``detached`` awaits a coroutine in a fresh ``contextvars.Context``: outside any request's
context, asgiref sends its thread-sensitive calls to the process's one shared thread, where
Channels' consumers and the apps' hubs already do their database work (``database_sync_to_async``
closes that thread's connection after each call once ``CONN_MAX_AGE`` says so). The request's
own thread (made by Django's sync middleware) then never opens a connection for the stream.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["detached"]


async def detached(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` outside the current request's context (cancelled with the caller)."""

    async def run() -> T:
        return await awaitable

    # A fresh Context, not a copy: a copy would still name the request's thread-sensitive
    # context. Awaiting the task directly propagates the caller's cancellation into it.
    return await asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
