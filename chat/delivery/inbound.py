"""Bounding what one socket may have waiting for the application (client → server).

Daphne reads every WebSocket message a client sends into an unbounded ``asyncio.Queue`` (the
application's ``receive``), however slowly the application handles them: a client sending as
fast as it can grows the server without bound. ``InboundGate`` counts the bytes waiting in
that queue and stops reading the client's TCP socket (``transport.pauseProducing()``) while
they exceed ``high_bytes``, resuming below half of it. The client's sends then block in its
own TCP window: the flood costs the flooder, not the server.

Other servers bound their queue themselves (uvicorn's websockets: ``ws_max_queue``, 32
messages); for them ``bound_receive`` returns ``receive`` unchanged.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


def _size(message: Message) -> int:
    text = message.get("text")
    if text is not None:
        # The bytes the client sent (what daphne decoded this text from).
        return len(text.encode("utf-8"))
    data = message.get("bytes")
    return len(data) if data is not None else 0


class InboundGate:
    def __init__(self, queue: asyncio.Queue[Message], transport: Any, high_bytes: int) -> None:
        self.queue = queue
        self.transport = transport
        self.high_bytes = high_bytes
        self.waiting_bytes = 0
        # Sizes of the waiting messages, in the queue's own (FIFO) order: each is measured once.
        # Made for a message and dropped once none waits: an empty deque is ~760 bytes, and an
        # idle socket has nothing waiting (daphne queues websocket.connect through here too).
        self._sizes: deque[int] | None = None
        self.paused = False
        self._put_nowait = queue.put_nowait
        # Daphne calls queue.put_nowait for every client message: count it on the way in.
        queue.put_nowait = self._counted_put  # type: ignore[method-assign,assignment]

    def _counted_put(self, message: Message) -> None:
        self._put_nowait(message)
        size = _size(message)
        if self._sizes is None:
            self._sizes = deque()
        self._sizes.append(size)
        self.waiting_bytes += size
        if not self.paused and self.waiting_bytes > self.high_bytes:
            self.paused = True
            self.transport.pauseProducing()

    async def receive(self) -> Message:
        message = await self.queue.get()
        if self._sizes:
            self.waiting_bytes -= self._sizes.popleft()
            if not self._sizes:
                self._sizes = None
        if self.paused and self.waiting_bytes <= self.high_bytes // 2:
            self.paused = False
            self.transport.resumeProducing()
        return message


def bound_receive(receive: Receive, protocol: Any | None, high_bytes: int) -> Receive:
    """``receive`` that stops reading the client while ``high_bytes`` wait (daphne only)."""
    queue = getattr(receive, "__self__", None)
    transport = getattr(protocol, "transport", None)
    if protocol is None or not isinstance(queue, asyncio.Queue) or transport is None:
        return receive
    return InboundGate(queue, transport, high_bytes).receive
