"""Prometheus metrics of both apps, multi-process aware, and the view that serves them.

One ``Metrics`` object per process, created on first use (nothing registers at import). With
several server processes set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder shared by them
(before they start): ``prometheus_client`` then keeps each process's values in files there
and the view sums them, whichever process answers the scrape. Gauges count "live" values:
those of a process that exited stop counting once it is marked dead (the drain does it).

Hot paths never call into ``prometheus_client`` per socket: the room hub counts frames and
bytes per flush and adds them once.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from django.http import HttpRequest, HttpResponse

_lock = threading.Lock()
_metrics: Metrics | None = None

# Upper bounds of the histogram buckets.
BATCH_FRAME_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
COMMIT_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200)
STORE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Gauge(name, doc, labels, multiprocess_mode="livesum")

        self.sockets_open = gauge("chat_sockets_open", "Open chat WebSockets.")
        self.rooms_with_sockets = gauge(
            "chat_rooms_with_sockets", "Rooms with at least one open socket (per process)."
        )
        self.frames_delivered = Counter(
            "chat_frames_delivered", "Frames handed to chat sockets by the room hubs."
        )
        self.bytes_delivered = Counter(
            "chat_bytes_delivered", "Bytes of WebSocket messages handed to chat sockets."
        )
        self.batch_frames = Histogram(
            "chat_batch_frames",
            "Frames per batch flushed to the sockets of a room.",
            buckets=BATCH_FRAME_BUCKETS,
        )
        self.outbound_backlog_bytes = gauge(
            "chat_outbound_backlog_bytes_max",
            "Largest outbound backlog of a chat socket at the last sample, in bytes.",
        )
        self.socket_closes = Counter(
            "chat_socket_closes", "Chat sockets closed by the server, by close code.", ["code"]
        )
        self.message_store_seconds = Histogram(
            "chat_message_store_seconds",
            "Time to store one chat message (transaction included), in seconds.",
            buckets=STORE_SECONDS_BUCKETS,
        )
        self.commit_batch_messages = Histogram(
            "chat_commit_batch_messages",
            "Sends stored per transaction (group commit: concurrent sends of a room share one).",
            buckets=COMMIT_BATCH_BUCKETS,
        )
        self.assistant_streams = gauge(
            "chat_assistant_streams_running",
            "Assistant replies and panel streams running.",
            ("kind",),
        )
        self.assistant_tokens = Counter(
            "chat_assistant_deltas",
            "Pieces of assistant text received from the model.",
            ["kind"],
        )
        self.event_loop_tasks = gauge(
            "realtime_event_loop_tasks",
            "Tasks of the server's event loop when /metrics was last read (a leak shows as "
            "growth at rest).",
        )
        self.sse_streams_open = gauge("notifications_streams_open", "Open notification streams.")
        self.notifications_delivered = Counter(
            "notifications_delivered", "Notification events written to SSE streams."
        )


def metrics() -> Metrics:
    """The process's metrics, created on first use."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


def exposition() -> tuple[bytes, str]:
    """The text exposition format of every process's metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    metrics()  # a scrape before any traffic still lists every metric
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead() -> None:
    """Stop counting this process's live gauges (call when it exits)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


async def ametrics_response(request: HttpRequest, token: str) -> HttpResponse:
    """``metrics_response`` for an async view: first samples the event loop it runs on."""
    import asyncio

    from asgiref.sync import sync_to_async

    metrics().event_loop_tasks.set(len(asyncio.all_tasks()))
    return await sync_to_async(metrics_response)(request, token)


def metrics_response(request: HttpRequest, token: str) -> HttpResponse:
    """``/metrics`` for staff, or for a scraper sending ``Authorization: Bearer <token>``."""
    header = request.headers.get("Authorization", "")
    authorised = bool(token) and _same(header, f"Bearer {token}")
    user = getattr(request, "user", None)
    if not authorised and not (user is not None and user.is_authenticated and user.is_staff):
        response = HttpResponse("Forbidden: staff or a metrics token only.\n", status=403)
        response["Content-Type"] = "text/plain; charset=utf-8"
        return response
    body, content_type = exposition()
    return HttpResponse(body, content_type=content_type)


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())
