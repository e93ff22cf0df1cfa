"""Writing to one WebSocket without letting a slow reader grow the server.

Two writers, chosen per socket from the ASGI ``send`` the server gave the application:

- ``DaphneWriter``: daphne's ``send`` writes into Twisted's buffer and returns at once
  (daphne#170), so a client that does not read grows that buffer without bound. This writer
  writes the WebSocket frame itself, framed once per batch for every recipient (autobahn's
  ``PreparedMessage``; none per socket), and reads the transport's buffered byte count: that
  *is* the socket's outbound backlog. When that backlog is empty the frame goes to the socket
  at once (one ``send``) instead of through Twisted's buffer, which would register the socket
  for writing, wait for the next reactor turn and unregister it again: per write that was
  most of the CPU of a broadcast that is not batched (docs/benchmarks.md).
- ``AsgiWriter``: any other server (uvicorn, the in-process test communicator). Messages wait
  in a byte-counted queue drained by one task; ``await send`` applies whatever flow control
  the server has (uvicorn's websockets waits while its transport is paused).

Both report ``backlog_bytes()``; the socket closes itself once that passes its bound
(``CHAT_MAX_OUTBOUND_BYTES``, close code 4008) and drops ephemeral frames before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

DRAIN_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class Packed:
    """One WebSocket message: text (JSON) or binary (MessagePack). ``data`` is what goes on
    the wire (UTF-8 for text): encoded once per batch for every socket that gets it."""

    text: str
    data: bytes
    binary: bool = False

    @functools.cached_property
    def frame(self) -> bytes:
        """The whole WebSocket frame a server sends (unmasked, not compressed), built once
        however many sockets get it. Only daphne's writer uses it. Bound: one copy of
        ``data`` plus a 2 to 10 byte header (``data`` is at most ``CHAT_MAX_SEND_BYTES``), cached
        on this Packed and freed with it once the batch is written."""
        # Imported here: only a running daphne has autobahn loaded.
        from autobahn.websocket.protocol import PreparedMessage

        prepared = PreparedMessage(self.data, self.binary, applyMask=False, doNotCompress=True)
        return bytes(prepared.payloadHybi)

    @classmethod
    def of(cls, text: str) -> Packed:
        return cls(text, text.encode("utf-8"))

    @classmethod
    def of_binary(cls, data: bytes) -> Packed:
        return cls("", data, binary=True)


class Writer:
    """Base: ``write`` never blocks and never raises for a socket that went away."""

    closed = False

    def write(self, message: Packed) -> None:
        raise NotImplementedError

    def backlog_bytes(self) -> int:
        raise NotImplementedError

    async def close(self, code: int, *, discard: bool = False) -> None:
        """Close with ``code``; ``discard`` drops what is still queued (a slow consumer)."""
        raise NotImplementedError

    async def wait_below(self, max_bytes: int, timeout_seconds: float) -> bool:
        """Wait until at most ``max_bytes`` are still unsent; False if that took too long.

        For what the server pulls at its own pace (replays): it waits for the client
        instead of piling a whole room into the buffer. Polls: replays are rare, and
        neither server offers a drain callback for WebSocket sends.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while self.backlog_bytes() > max_bytes and not self.closed:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        return True


# Middleware layers to look through for daphne's own ``send`` (Channels' session middleware
# wraps it in a bound method whose object keeps the original as ``real_send``).
MAX_WRAPPERS = 8


def daphne_protocol(send: Send) -> Any | None:
    """The autobahn WebSocket protocol behind daphne's ``send``, or None for another server."""
    try:
        # Imported here: only a running daphne has Twisted and autobahn loaded.
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # pragma: no cover - daphne is a dependency
        return None
    current: Any = send
    for _ in range(MAX_WRAPPERS):
        if isinstance(current, functools.partial):
            candidate = current.args[0] if current.args else None
            return candidate if isinstance(candidate, WebSocketProtocol) else None
        inner = getattr(getattr(current, "__self__", None), "real_send", None)
        if inner is None:
            return None
        current = inner
    return None


class DaphneWriter(Writer):
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        # A plain TCP connection (not TLS, which Twisted layers as another transport) can be
        # written to with the socket's own ``send``.
        transport = getattr(protocol, "transport", None)
        self._socket = getattr(transport, "socket", None)
        if getattr(transport, "TLS", False):
            self._socket = None

    @property
    def open(self) -> bool:
        return not self.closed and self.protocol.state == self.protocol.STATE_OPEN

    def write(self, message: Packed) -> None:
        if not self.open:
            return
        transport = self.protocol.transport
        frame = message.frame
        if (
            self._socket is not None
            and transport.connected
            and not transport.disconnecting
            and self.backlog_bytes() == 0
        ):
            # Nothing queued before it: sending now keeps the order. Whatever the kernel does
            # not take goes to Twisted's buffer (and counts as backlog) as before.
            try:
                sent = self._socket.send(frame)
            except OSError:
                # Full (EAGAIN) or broken: Twisted's own write finds out and closes.
                sent = 0
            if sent == len(frame):
                return
            frame = frame[sent:]
        # What autobahn's sendMessage would end with (it frames per call and per socket).
        transport.write(frame)

    def backlog_bytes(self) -> int:
        transport = getattr(self.protocol, "transport", None)
        if transport is None:
            return 0
        # twisted.internet.abstract.FileDescriptor: written-but-unsent bytes live in
        # dataBuffer (from offset on) and in the list not yet joined into it.
        buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
        return buffered + getattr(transport, "_tempDataLen", 0)

    async def close(self, code: int, *, discard: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.protocol.state != self.protocol.STATE_OPEN:
            return
        # sendCloseFrame, not sendClose: the latter refuses codes like 1012 (service restart).
        # A slow consumer (``discard``) gets the close frame after what it has not read: a
        # client that reads slowly still learns why; one that does not read at all is
        # dropped by autobahn once its close handshake times out (1 s), freeing the buffer.
        self.protocol.sendCloseFrame(code=code, isReply=False)


class AsgiWriter(Writer):
    def __init__(self, send: Send) -> None:
        self._send = send
        self._queue: deque[Packed] = deque()
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None

    def write(self, message: Packed) -> None:
        if self.closed:
            return
        self._queue.append(message)
        self._queued_bytes += len(message.data)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    def backlog_bytes(self) -> int:
        return self._queued_bytes

    async def _drain(self) -> None:
        try:
            while self._queue:
                message = self._queue[0]
                event: dict[str, Any] = {"type": "websocket.send"}
                if message.binary:
                    event["bytes"] = message.data
                else:
                    event["text"] = message.text
                try:
                    await self._send(event)
                except Exception:
                    # The socket is gone (the server raises on send after a disconnect).
                    logger.debug("Dropping frames to a closed socket", exc_info=True)
                    self._queue.clear()
                    self._queued_bytes = 0
                    return
                if self._queue:
                    self._queue.popleft()
                    self._queued_bytes -= len(message.data)
        finally:
            self._task = None

    async def close(self, code: int, *, discard: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if discard:
            self._queue.clear()
            self._queued_bytes = 0
        task = self._task
        if task is not None and not discard:
            with contextlib.suppress(Exception):
                await task
        elif task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self._send({"type": "websocket.close", "code": code})


def make_writer(send: Send) -> Writer:
    protocol = daphne_protocol(send)
    return DaphneWriter(protocol) if protocol is not None else AsgiWriter(send)
