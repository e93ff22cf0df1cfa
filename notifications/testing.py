"""Test helpers: read a notifications stream with a real SSE client (httpx + httpx-sse).

Needs the test dependencies (httpx, httpx-sse); nothing imports this module at run time.

``SSEStream`` reads the response in a background task and logs every event and comment in
arrival order, so a test can wait for what it expects with a timeout and still see everything
that came before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

# httpx-sse's own parsers: the line splitter breaks lines only at CR, LF and CRLF as the SSE
# spec says (httpx's aiter_lines would also split at U+2028), and EventSource.aiter_sse
# drops comments, which the keepalive test needs to see.
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

DEFAULT_WAIT_SECONDS = 10.0


@dataclass
class Received:
    event: ServerSentEvent | None = None
    comment: str | None = None


@dataclass
class SSEStream:
    response: httpx.Response
    log: list[Received] = field(default_factory=list)
    closed: bool = False
    _cursor: int = 0
    _comment_cursor: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        lines = SSELineDecoder()
        decoder = SSEDecoder()
        try:
            async for text in self.response.aiter_text():
                for line in lines.decode(text):
                    if line.startswith(":"):
                        self.log.append(Received(comment=line[1:].strip()))
                    else:
                        sse = decoder.decode(line)
                        if sse is None:
                            continue
                        self.log.append(Received(event=sse))
                    self._changed.set()
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.closed = True
            self._changed.set()

    # --- reading ---------------------------------------------------------------------------

    @property
    def events(self) -> list[ServerSentEvent]:
        return [r.event for r in self.log if r.event is not None]

    def notifications(self) -> list[dict[str, Any]]:
        """Every notification received so far, decoded, in arrival order."""
        return [json.loads(e.data) for e in self.events if e.event == "notification"]

    def notification_ids(self) -> list[int]:
        return [n["id"] for n in self.notifications()]

    async def _wait(self, ready: Callable[[], Any], seconds: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            found = ready()
            if found is not None:
                return found
            if self.closed:
                raise AssertionError(f"stream ended before {what}; got {self.summary()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {seconds:g} s; got {self.summary()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def next_event(self, seconds: float = DEFAULT_WAIT_SECONDS) -> ServerSentEvent:
        """The next event not yet returned (comments are skipped)."""

        def ready() -> ServerSentEvent | None:
            events = self.events
            if self._cursor < len(events):
                self._cursor += 1
                return events[self._cursor - 1]
            return None

        result: ServerSentEvent = await self._wait(ready, seconds, "event")
        return result

    async def wait_event(
        self,
        predicate: Callable[[ServerSentEvent], bool],
        seconds: float = DEFAULT_WAIT_SECONDS,
        what: str = "matching event",
    ) -> ServerSentEvent:
        """The next event matching ``predicate``; the ones before it stay in ``log``."""

        def ready() -> ServerSentEvent | None:
            events = self.events
            while self._cursor < len(events):
                self._cursor += 1
                if predicate(events[self._cursor - 1]):
                    return events[self._cursor - 1]
            return None

        result: ServerSentEvent = await self._wait(ready, seconds, what)
        return result

    async def notification(self, seconds: float = DEFAULT_WAIT_SECONDS) -> dict[str, Any]:
        """The data of the next ``notification`` event."""
        event = await self.wait_event(lambda e: e.event == "notification", seconds, "notification")
        data: dict[str, Any] = json.loads(event.data)
        return data

    async def unread(self, seconds: float = DEFAULT_WAIT_SECONDS) -> dict[str, Any]:
        """The data of the next ``unread`` event."""
        event = await self.wait_event(lambda e: e.event == "unread", seconds, "unread event")
        data: dict[str, Any] = json.loads(event.data)
        return data

    async def wait_notifications(
        self, count: int, seconds: float = DEFAULT_WAIT_SECONDS
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` notifications in total have arrived; return them all."""

        def ready() -> list[dict[str, Any]] | None:
            found = self.notifications()
            return found if len(found) >= count else None

        result: list[dict[str, Any]] = await self._wait(ready, seconds, f"{count} notifications")
        return result

    async def comment(self, seconds: float = DEFAULT_WAIT_SECONDS) -> str:
        """The next comment line not yet returned (e.g. ``keepalive``)."""

        def ready() -> str | None:
            comments = [r.comment for r in self.log if r.comment is not None]
            if self._comment_cursor < len(comments):
                self._comment_cursor += 1
                return comments[self._comment_cursor - 1]
            return None

        result: str = await self._wait(ready, seconds, "comment")
        return result

    def summary(self, limit: int = 10) -> str:
        shown = [
            f"{r.event.event}#{r.event.id}:{r.event.data[:80]}" if r.event else f":{r.comment}"
            for r in self.log[-limit:]
        ]
        return "[" + ", ".join(shown) + "]"

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.response.aclose()


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    path: str = "/notifications/stream/",
    last_event_id: int | str | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[SSEStream]:
    """Open a stream and check it is one (200, text/event-stream); close it on exit."""
    request_headers = dict(headers or {})
    if last_event_id is not None:
        request_headers["Last-Event-ID"] = str(last_event_id)
    async with aconnect_sse(client, "GET", path, headers=request_headers) as source:
        response = source.response
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise AssertionError(f"stream refused: {response.status_code} {body[:300]}")
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raise AssertionError(f"not an event stream: {content_type!r}")
        stream = SSEStream(response)
        stream.start()
        try:
            yield stream
        finally:
            await stream.close()
