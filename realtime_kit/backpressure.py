"""ASGI middleware that gives daphne's streaming HTTP responses backpressure.

Daphne's ``send`` writes into Twisted's transport buffer and returns at once (daphne#170): a
view streaming to a slow client grows the process by everything that client has not read yet.
Twisted itself knows when that buffer is full: it pauses the producer registered on the HTTP
request, and resumes it once the socket has taken the data. This middleware registers such a
producer for every response sent in several body messages and makes ``send`` wait while it is
paused. A streaming response then holds about one chunk plus Twisted's 64 KiB buffer in the
server, however slowly its client reads. Measurements are in docs/deployment.md.

Daphne hands applications ``functools.partial(server.handle_reply, protocol)`` as ``send``,
where ``protocol`` is the Twisted request; that is how the middleware finds it. Any other
``send`` (another server, a test client) passes through untouched: uvicorn and hypercorn
apply flow control themselves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Loose on purpose: Django's and Channels' handlers each type scope and messages differently.
ASGIApp = Callable[..., Awaitable[None]]


def twisted_request(send: Send) -> Any | None:
    """Return the Twisted request behind daphne's ``send``, or None for any other server."""
    if not isinstance(send, functools.partial) or not send.args:
        return None
    # Imported here: only a running daphne has a Twisted reactor installed.
    from twisted.web.http import Request

    candidate = send.args[0]
    return candidate if isinstance(candidate, Request) else None


class WriteGate:
    """A Twisted push producer for one response: paused while the socket's buffer is full.

    Twisted calls ``pauseProducing``/``resumeProducing``/``stopProducing`` on the event loop
    thread (daphne runs Twisted on asyncio), so plain attributes and a future suffice.
    """

    def __init__(self, request: Any) -> None:
        self._request = request
        self.registered = False
        self.paused = False
        self.stopped = False
        self._resumed: asyncio.Future[None] | None = None

    # --- IPushProducer, called by Twisted ---------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()

    # --- used by the middleware -------------------------------------------------------------

    def _channel(self) -> Any | None:
        # Twisted sets request.channel to None when the connection is lost and deletes it
        # once the request is finished.
        return getattr(self._request, "channel", None)

    def register(self) -> None:
        """Start receiving pause/resume calls for this response (idempotent)."""
        channel = self._channel()
        if self.registered or channel is None or self._request.producer is not None:
            return
        self._request.registerProducer(self, True)
        self.registered = True
        # Fires when the response is finished or the connection lost (a waiter must wake).
        self._request.notifyFinish().addBoth(self._request_done)
        # The buffer may already be full (the channel is waiting for the transport).
        if getattr(channel, "_waitingForTransport", False):
            self.paused = True

    def unregister(self) -> None:
        """Stop receiving calls; Twisted complains about a producer left on a finished request."""
        if self.registered and self._channel() is not None:
            self._request.unregisterProducer()
        self.registered = False
        self._wake()

    @property
    def connected(self) -> bool:
        return self._channel() is not None and not getattr(self._request, "_disconnected", False)

    async def wait_writable(self) -> None:
        """Return once the transport takes more data, or the connection is gone."""
        while self.paused and self.registered and not self.stopped and self.connected:
            self._resumed = asyncio.get_running_loop().create_future()
            try:
                await self._resumed
            finally:
                self._resumed = None

    def _request_done(self, _result: object) -> None:
        # Returning None also consumes the Failure of a lost connection.
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def abort(self) -> None:
        """Drop the connection, so the client sees a cut response and not a complete one."""
        channel = self._channel()
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()


class DaphneBackpressure:
    """Wrap an ASGI HTTP application so its ``send`` waits for slow clients under daphne."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = twisted_request(send) if scope["type"] == "http" else None
        if request is None:
            await self.app(scope, receive, send)
            return
        gate = WriteGate(request)
        state = {"started": False, "finished": False}

        async def gated_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body":
                if message.get("more_body", False):
                    gate.register()
                else:
                    # Unregister before daphne finishes the request (Twisted checks).
                    gate.unregister()
                    state["finished"] = True
            await send(message)
            if gate.registered:
                await gate.wait_writable()

        try:
            await self.app(scope, receive, gated_send)
        except Exception:
            if not state["started"] or state["finished"]:
                raise
            # Daphne cannot report an error once the status line is out (its fallback 500
            # raises "response already started"). Cut the connection so the client sees an
            # incomplete body rather than a short one that looks complete.
            logger.exception("Streaming response to %s failed; aborting", scope.get("path"))
            gate.abort()
        finally:
            gate.unregister()
