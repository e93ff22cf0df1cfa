"""A tutorial-style SSE view: Django's StreamingHttpResponse over an async generator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse

KEEPALIVE_SECONDS = 15.0


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


async def events(request: HttpRequest) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[str]:
        yield ": open\n\n"
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            yield ": keepalive\n\n"

    response = StreamingHttpResponse(body(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response
