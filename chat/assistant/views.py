"""HTTP views of the assistant: the private panel and its streaming endpoint.

``POST /chat/assistant/stream/`` answers Server-Sent Events from an async view (the classic
pattern): ``data: {"content": "<delta>"}`` per delta, then ``data: [DONE]``; a failure ends
the stream with ``event: error`` and ``data: {"code", "message"}``; so does a server restart
(code ``interrupted``: the runner's drain ends the stream, which the panel shows as
interrupted, keeping the text so far). When the client goes away
Django cancels the response and closes its iterator with ``aclosing``; the backend's
``finally`` then closes the upstream stream, so the model server sees its connection drop.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.views.decorators.http import require_POST

from realtime_kit import drain
from realtime_kit.leases import Lease
from realtime_kit.metrics import metrics

from ..api import error_response
from ..conf import app_settings
from ..llm import BaseLLMBackend, ChatMessage, LLMError, get_backend
from . import protocol as assistant_protocol
from . import quotas

logger = logging.getLogger(__name__)

RESTART_MESSAGE = "The server restarted during the reply; ask again."


@login_required
def assistant_panel(request: HttpRequest) -> HttpResponse:
    """A private "Ask the assistant" page that streams from ``assistant_stream``."""
    backend = get_backend()
    return render(
        request,
        "chat/assistant.html",
        {
            "is_demo": backend.is_demo,
            "backend_label": backend.label,
            "max_content_chars": app_settings.ASSISTANT_MAX_CONTENT_CHARS,
            "max_messages": app_settings.ASSISTANT_MAX_MESSAGES,
        },
    )


@require_POST
async def assistant_stream(request: HttpRequest) -> HttpResponseBase:
    """Stream the assistant's reply to a conversation as Server-Sent Events."""
    user = await request.auser()
    if not user.is_authenticated:
        return error_response(401, "unauthenticated", "Log in first.")
    limits = assistant_protocol.RequestLimits(
        max_bytes=app_settings.ASSISTANT_MAX_REQUEST_BYTES,
        max_messages=app_settings.ASSISTANT_MAX_MESSAGES,
        max_content_chars=app_settings.ASSISTANT_MAX_CONTENT_CHARS,
    )
    # Refuse a big body by its header before reading it (Django would read it into memory).
    declared = request.META.get("CONTENT_LENGTH") or "0"
    if declared.isdigit() and int(declared) > limits.max_bytes:
        return error_response(
            400, assistant_protocol.TOO_LARGE, f"The body is limited to {limits.max_bytes} bytes."
        )
    try:
        messages = assistant_protocol.parse_stream_request(
            request.body, request.content_type or "", limits
        )
    except assistant_protocol.BadRequest as exc:
        return error_response(400, exc.code, exc.message)
    held = await quotas.acquire_panel_stream(user.pk)
    if isinstance(held, quotas.Refused):
        return _refused(held)
    try:
        backend = get_backend()
        # The stream may last a minute: don't hold this request's database connection.
        await sync_to_async(close_old_connections)()
    except BaseException:
        await held.release()
        raise
    body = _releasing(reply_events(backend, messages), held)
    # A client that leaves before the body starts never runs its finally: the lease is then
    # released when the generator is collected.
    weakref.finalize(body, held.release_soon)
    response = StreamingHttpResponse(body, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


_REFUSED_MESSAGES = {
    quotas.BUSY: (429, "Too many assistant streams: wait for one to finish."),
    quotas.RATE_LIMITED: (429, "Too many assistant requests; retry later."),
    quotas.UNAVAILABLE: (503, "The assistant is unavailable; retry."),
}


def _refused(refused: quotas.Refused) -> HttpResponseBase:
    status, message = _REFUSED_MESSAGES[refused.code]
    response = error_response(status, refused.code, message)
    response["Retry-After"] = str(max(1, math.ceil(refused.retry_after_seconds)))
    return response


async def _releasing(
    body: AsyncGenerator[bytes, None], lease: Lease
) -> AsyncGenerator[bytes, None]:
    """``body``, then give the user's panel slot back however the stream ends."""
    running = metrics().assistant_streams.labels(kind="panel")
    running.inc()
    try:
        async with aclosing(body) as events:
            async for event in events:
                yield event
    finally:
        running.dec()
        # Not awaited: this may run while the response is being cancelled.
        lease.release_soon()


async def reply_events(
    backend: BaseLLMBackend, messages: Sequence[ChatMessage]
) -> AsyncGenerator[bytes, None]:
    """The SSE body of one reply. Close with ``aclosing`` (Django does)."""
    # Daphne sends the response headers with the first body chunk: send one at once.
    yield assistant_protocol.sse_comment("stream")
    try:
        async with aclosing(backend.stream(messages)) as deltas:
            tokens = metrics().assistant_tokens.labels(kind="panel")
            async for delta in drain.until_drain(deltas):
                tokens.inc()
                yield assistant_protocol.sse_json({"content": delta})
    except LLMError as exc:
        yield assistant_protocol.sse_json({"code": exc.code, "message": exc.message}, event="error")
        return
    except drain.Draining:
        # The body then ends normally (the last chunk is sent): the panel is told, not cut off.
        restarting = {"code": assistant_protocol.INTERRUPTED, "message": RESTART_MESSAGE}
        yield assistant_protocol.sse_json(restarting, event="error")
        return
    yield assistant_protocol.SSE_DONE
