"""Room replies that outlive the process streaming them.

A reply runs as a task in one process (chat/assistant/replies.py). If that process dies
(SIGKILL, OOM, a crashed host), its task dies with it and nothing would ever store the reply
or tell the members it ended. So every running reply has an ``AssistantRun`` row:

- the owner inserts it when the reply starts, refreshes ``heartbeat_at`` and the text so far
  every ``CHAT_ASSISTANT_HEARTBEAT_SECONDS`` (one UPDATE per reply), and deletes it in the
  transaction that stores the reply (or when nothing is stored);
- every process runs a sweeper (started by the first chat socket of its event loop) that, every
  half ``CHAT_ASSISTANT_TAKEOVER_SECONDS``, claims the rows whose heartbeat is older than that
  (an UPDATE conditioned on the heartbeat it read, so one process wins), stores the recorded
  text as a message with status ``interrupted`` (idempotent: its client_id is the stream id)
  and broadcasts ``assistant.end`` with that status.

Members therefore see a dead process's reply end within TAKEOVER + TAKEOVER/2 seconds, with the
text of its last heartbeat (up to one heartbeat less than they saw streaming). A process that
was only slow, and whose run was claimed meanwhile, finds on its next heartbeat that it no
longer owns the row and stops without storing anything. A process restarted after a crash
ends its own old runs the same way once a socket connects.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from channels.db import database_sync_to_async
from django.db import DatabaseError, transaction
from django.utils import timezone

from realtime_kit import drain
from realtime_kit.loops import per_loop

from .. import services
from ..conf import app_settings
from ..models import AssistantRun
from . import protocol as ap

logger = logging.getLogger(__name__)

# Rows claimed per sweep: a burst of orphans (a process with many replies died) is ended over
# a few sweeps rather than in one long transaction.
CLAIM_BATCH = 20

# This process's name in AssistantRun.owner.
PROCESS_TOKEN = uuid.uuid4().hex


@dataclass(frozen=True)
class Orphan:
    """A run claimed from a dead process: what is needed to end it."""

    pk: int
    stream_id: str
    room_id: int
    text: str
    owner: str


# --- the owner's side ---------------------------------------------------------------------


def open_run(stream_id: str, room_id: int, request_seq: int) -> None:
    AssistantRun.objects.create(
        stream_id=stream_id,
        room_id=room_id,
        request_seq=request_seq,
        owner=PROCESS_TOKEN,
        heartbeat_at=timezone.now(),
    )


def checkpoint(stream_id: str, text: str) -> bool:
    """Record the text so far and that we are alive; False when the run is no longer ours."""
    updated = AssistantRun.objects.filter(stream_id=stream_id, owner=PROCESS_TOKEN).update(
        text=text, heartbeat_at=timezone.now()
    )
    return updated == 1


def close_run(stream_id: str) -> None:
    """Forget the run (call inside the transaction that stores the reply, or after)."""
    AssistantRun.objects.filter(stream_id=stream_id, owner=PROCESS_TOKEN).delete()


acheckpoint = database_sync_to_async(checkpoint)
aclose_run = database_sync_to_async(close_run)


# --- the sweeper --------------------------------------------------------------------------


def claim_stale() -> list[Orphan]:
    """Claim the runs whose heartbeat is older than ``CHAT_ASSISTANT_TAKEOVER_SECONDS``."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=app_settings.ASSISTANT_TAKEOVER_SECONDS)
    stale = list(
        AssistantRun.objects.filter(heartbeat_at__lt=cutoff)
        .order_by("heartbeat_at")
        .values_list("pk", "heartbeat_at")[:CLAIM_BATCH]
    )
    claimed = []
    for pk, seen in stale:
        token = uuid.uuid4().hex
        # Conditioned on the heartbeat we read: of several sweepers (or a late heartbeat of
        # the owner) exactly one UPDATE matches.
        if AssistantRun.objects.filter(pk=pk, heartbeat_at=seen).update(
            owner=token, heartbeat_at=now
        ):
            run = AssistantRun.objects.get(pk=pk)
            claimed.append(Orphan(pk, run.stream_id, run.room_id, run.text, token))
    return claimed


def store_orphan(orphan: Orphan) -> int | None:
    """Store a claimed run's text as interrupted and delete the run; the message's seq."""
    # Imported here: assistant imports this module.
    from .replies import assistant_user

    with transaction.atomic():
        if not AssistantRun.objects.filter(pk=orphan.pk, owner=orphan.owner).delete()[0]:
            return None  # claimed again by a sweeper that thought we were dead: it ends it
        if not orphan.text:
            return None
        result = services.post_message(
            orphan.room_id,
            assistant_user(),
            orphan.text,
            client_id=orphan.stream_id,
            status=ap.INTERRUPTED,
            check_rate=False,
        )
    return result.message.seq


aclaim_stale = database_sync_to_async(claim_stale)
astore_orphan = database_sync_to_async(store_orphan)


async def sweep() -> int:
    """End the runs of dead processes once; how many were ended."""
    # Imported here: replies imports this module.
    from .replies import broadcast_frame

    ended = 0
    for orphan in await aclaim_stale():
        seq = await astore_orphan(orphan)
        logger.warning(
            "Assistant reply %s in room %s lost its process; stored as interrupted (seq %s)",
            orphan.stream_id,
            orphan.room_id,
            seq,
        )
        await broadcast_frame(orphan.room_id, ap.end_frame(orphan.stream_id, ap.INTERRUPTED, seq))
        ended += 1
    return ended


async def _sweep_loop() -> None:
    interval = app_settings.ASSISTANT_TAKEOVER_SECONDS / 2
    while not drain.draining():
        try:
            await sweep()
        except DatabaseError:
            # The database is down: the next sweep tries again, nothing is lost meanwhile.
            logger.warning("Sweeping orphaned assistant replies failed", exc_info=True)
        except Exception:
            logger.exception("Sweeping orphaned assistant replies failed")
        await asyncio.sleep(interval)


def _start_sweeper() -> asyncio.Task[None]:
    loop = asyncio.get_running_loop()
    return loop.create_task(_sweep_loop(), name="chat.assistant.runs.sweeper")


_sweepers = per_loop(_start_sweeper)


def ensure_sweeper() -> None:
    """Start this event loop's sweeper if it is not running (call from async code)."""
    task = _sweepers.peek()
    if task is not None and task.done():
        _sweepers.pop()
    _sweepers.get()


async def stop_sweeper() -> None:
    """Drain callback: a process going away takes over nothing more."""
    task = _sweepers.pop()
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
