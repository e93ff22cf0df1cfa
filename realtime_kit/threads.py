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

``release_request_thread`` goes one step further for a stream whose body has started: the
request's thread has nothing left to do (the view returned, every middleware has processed the
response), yet it lives, idle, until the response ends: ~22 KiB of RSS per open stream
(measured, docs/benchmarks.md). The body ends it; a later thread-sensitive call of the request
(Django's ``response.close()`` at the end) gets a fresh thread for the moment it runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from asgiref.sync import SyncToAsync

T = TypeVar("T")

__all__ = ["detached", "release_request_thread"]

logger = logging.getLogger(__name__)


async def detached(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` outside the current request's context (cancelled with the caller)."""

    async def run() -> T:
        return await awaitable

    # A fresh Context, not a copy: a copy would still name the request's thread-sensitive
    # context. Awaiting the task directly propagates the caller's cancellation into it.
    return await asyncio.get_running_loop().create_task(run(), context=contextvars.Context())


def release_request_thread() -> bool:
    """End the idle thread of the current request's thread-sensitive context; whether one was.

    Call it from a streaming body once it has started, in the request's context (Django runs
    the body there). The thread first closes the database connections it opened (host
    middleware may have queried), then exits once idle. Nothing to do outside a request, or
    when the context has no thread yet.
    """
    # asgiref keeps one executor per ThreadSensitiveContext in this mapping, creating it on the
    # first thread-sensitive call and shutting it down when the context exits; without an
    # entry it makes a new one on demand. Not a documented API: if a later asgiref moves it,
    # this does nothing (and tests/test_threads.py fails, saying so).
    executors = getattr(SyncToAsync, "context_to_thread_executor", None)
    context = getattr(SyncToAsync, "thread_sensitive_context", None)
    if executors is None or context is None:
        return False
    current = context.get(None)
    if current is None:
        return False
    executor = executors.get(current)
    if not isinstance(executor, ThreadPoolExecutor):
        return False  # none yet, or one the caller supplied (not ours to end)
    del executors[current]
    executor.submit(_close_connections)
    executor.shutdown(wait=False)
    return True


def _close_connections() -> None:
    # Runs on the thread being released: its own connections (thread-local), which nothing
    # would close otherwise (the request's end closes those of the thread it runs on).
    from django.db import connections

    try:
        connections.close_all()
    except Exception:  # a broken connection must not keep the thread
        logger.warning("Closing a released request thread's connections failed", exc_info=True)
