"""Group commit: the sends of one room that arrive while a transaction runs share the next one.

Every database call of a process goes through one thread (``database_sync_to_async``), so
concurrent sends wait for each other anyway; storing them one transaction each makes the room
cost a commit (an fsync on PostgreSQL, SQLite's journal) per message. Here a send joins its
room's queue and, when no transaction of that room is running in this process, starts one;
everything that queued meanwhile goes into the next transaction, at most
``CHAT_GROUP_COMMIT_MAX_MESSAGES`` messages each (``services.post_messages``). Nobody waits for a
timer: a lone send is stored at once, as before, and batches form only under load.

Guarantees are unchanged: seqs are gap-free (handed out under the room's row lock, across
processes), a send is acked only after its transaction committed, a resend of a client_id is
answered with the stored message, and a rate-limited or revoked send fails alone. A database
failure fails the transaction's sends, each answered ``unavailable`` (none stored).

Bounds: a socket has at most ``CHAT_MAX_PENDING_SENDS`` sends in flight (pipelined: the
consumer submits them in the order the client sent them, ``submit``, and answers them in that
order), so a room's queue holds at most that many sends per socket of this process (each at
most ``CHAT_MAX_TEXT_BYTES``), and a transaction at most ``CHAT_GROUP_COMMIT_MAX_MESSAGES`` of
them. A socket's sends keep their order: they join the queue in the order submitted, batches
are taken from its front, and one room's batches of this process commit one after the other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from realtime_kit.loops import PerLoop, per_loop
from realtime_kit.metrics import metrics

from . import services
from .conf import app_settings
from .services import PostRequest, PostResult

logger = logging.getLogger(__name__)


@dataclass
class _Queue:
    waiting: list[tuple[PostRequest, asyncio.Future[PostResult]]] = field(default_factory=list)
    committing: bool = False
    task: asyncio.Task[None] | None = None  # the running commits (held: tasks are weak refs)


# Per event loop (one under daphne; one per test), then per room id.
_queues: PerLoop[dict[int, _Queue]] = per_loop(dict)


async def post(room_id: int, request: PostRequest) -> PostResult:
    """Store ``request`` in room ``room_id`` (with others, if they are waiting); its outcome.

    Raises what ``services.post_message`` raises: RateLimited, Revoked, DatabaseError."""
    # A sender that goes away (socket closed) cancels only its own future: the commit runs in
    # its own task, stores the message anyway (as a single send did), and skips the answer.
    return await submit(room_id, request)


def submit(room_id: int, request: PostRequest) -> asyncio.Future[PostResult]:
    """Queue ``request`` for room ``room_id`` now (in call order); the future of its outcome.

    The outcome is what ``post`` returns or raises. Cancelling the future drops only the
    answer: the message is stored anyway."""
    loop = asyncio.get_running_loop()
    rooms = _queues.get()
    queue = rooms.setdefault(room_id, _Queue())
    future: asyncio.Future[PostResult] = loop.create_future()
    queue.waiting.append((request, future))
    if not queue.committing:
        queue.committing = True
        queue.task = loop.create_task(_commit_all(room_id, queue, rooms))
    return future


async def _commit_all(room_id: int, queue: _Queue, rooms: dict[int, _Queue]) -> None:
    most = app_settings.GROUP_COMMIT_MAX_MESSAGES
    closed = True  # the database thread's connection, as far as this room's batches go
    try:
        while queue.waiting:
            batch, queue.waiting = queue.waiting[:most], queue.waiting[most:]
            metrics().commit_batch_messages.observe(len(batch))
            events: list[dict[str, Any]] = []
            try:
                outcomes, closed = await _post_batch(
                    room_id, [r for r, _ in batch], events, lambda: bool(queue.waiting)
                )
            except Exception as exc:  # DatabaseError, or the room was deleted meanwhile
                closed = True  # a failed batch closes the connection
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            # Committed: broadcast from here, in seq order (the database thread is free for the
            # next batch meanwhile, instead of waiting for this loop once per message).
            await _broadcast(room_id, events)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
    finally:
        queue.committing = False
        if not queue.waiting and rooms.get(room_id) is queue:
            del rooms[room_id]
        if not closed:
            # Left while more sends waited (cancelled): the connection still goes as the
            # host's CONN_MAX_AGE says (at once by default).
            await _close_old_connections()


def _post_batch_sync(
    room_id: int,
    requests: Sequence[PostRequest],
    events: list[dict[str, Any]],
    more_waiting: Callable[[], bool],
) -> tuple[list[PostResult | Exception], bool]:
    """``services.post_messages``, then close the connection unless more sends wait (whether
    it closed it). A failure always closes it, so a broken one is never reused."""
    # Not database_sync_to_async, which closes the connection after every call: the batches
    # of a busy room follow one another, and opening a PostgreSQL connection per batch was
    # ~9 % of the server's CPU with 100 senders (bench.ingest, py-spy). A lone send still
    # costs one thread hop, as before. Other calls on this thread (Channels'
    # database_sync_to_async) close the connection before they run, as they always did.
    try:
        outcomes = services.post_messages(room_id, requests, events)
    except BaseException:
        close_old_connections()
        raise
    if more_waiting():  # read from this thread: at worst one extra close, or one extra hop
        return outcomes, False
    close_old_connections()
    return outcomes, True


# The process's shared thread, like every other database call of the consumers.
_post_batch = sync_to_async(_post_batch_sync, thread_sensitive=True)
_close_old_connections = sync_to_async(close_old_connections, thread_sensitive=True)


async def _broadcast(room_id: int, events: list[dict[str, Any]]) -> None:
    try:
        await services.abroadcast_many(room_id, events)
    except Exception:
        # Stored and acked regardless (like a failed on_commit broadcast): the room's
        # sockets find the messages by seq (gap fill, pong last_seq, resume).
        first, last = events[0]["seq"], events[-1]["seq"]
        logger.exception("Broadcasting messages %s-%s of room %s failed", first, last, room_id)
