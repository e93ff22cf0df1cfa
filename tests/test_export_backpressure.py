"""In-process tests of realtime_kit.backpressure.DaphneBackpressure on Twisted's real HTTP objects.

The Twisted HTTP channel runs on a StringTransport: the tests play the transport's part by
calling ``pauseProducing``/``resumeProducing`` on the channel, exactly as a TCP transport does
when its write buffer fills up and drains.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request

from realtime_kit.backpressure import DaphneBackpressure, twisted_request

START = {"type": "http.response.start", "status": 200, "headers": []}


def body(data: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


class Daphne:
    """Just enough of daphne: ``send`` is ``partial(handle_reply, request)``."""

    def __init__(self) -> None:
        self.channel = HTTPChannel()
        # No reactor for the idle timeout.
        self.channel.callLater = Clock().callLater  # type: ignore[method-assign, assignment]
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.request = Request(self.channel)
        self.channel.requests.append(self.request)  # as the channel does for a parsed request
        self.sent: list[dict[str, Any]] = []

    async def handle_reply(self, request: Request, message: dict[str, Any]) -> None:
        assert request is self.request
        self.sent.append(message)

    @property
    def send(self) -> Any:
        return functools.partial(self.handle_reply, self.request)


async def no_receive() -> dict[str, Any]:
    raise AssertionError("the middleware must not receive")


async def settle() -> None:
    """Let every runnable task run until it blocks (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def streaming_app(chunks: int, progress: list[int]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(START)
        for i in range(chunks):
            await send(body(b"x" * 10, True))
            progress.append(i)
        await send(body(b"", False))

    return app


def test_twisted_request_is_found_only_behind_daphnes_send() -> None:
    daphne = Daphne()
    assert twisted_request(daphne.send) is daphne.request

    async def other_send(message: Any) -> None:
        return None

    assert twisted_request(other_send) is None
    assert twisted_request(functools.partial(other_send)) is None


async def test_other_servers_pass_through() -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    progress: list[int] = []
    await DaphneBackpressure(streaming_app(3, progress))({"type": "http"}, no_receive, send)
    assert progress == [0, 1, 2]
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 4


async def test_send_waits_while_the_transport_is_paused() -> None:
    daphne = Daphne()
    progress: list[int] = []
    app = DaphneBackpressure(streaming_app(5, progress))
    task = asyncio.create_task(app({"type": "http"}, no_receive, daphne.send))
    await settle()
    # Nothing paused yet: the app streamed everything.
    assert progress == [0, 1, 2, 3, 4]
    await task
    assert daphne.channel._requestProducer is None  # unregistered before the last message

    daphne = Daphne()
    progress = []
    task = asyncio.create_task(
        DaphneBackpressure(pausing_app(daphne, progress))({"type": "http"}, no_receive, daphne.send)
    )
    await settle()
    # The transport paused after chunk 1 was written: send does not return.
    assert progress == [0]
    assert len(daphne.sent) == 3
    daphne.channel.resumeProducing()
    await settle()
    assert progress == [0, 1, 2]
    await task
    assert daphne.sent[-1] == body(b"", False)
    assert daphne.channel._requestProducer is None


def pausing_app(daphne: Daphne, progress: list[int]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(START)
        await send(body(b"a", True))
        progress.append(0)
        # The transport's buffer fills up while the next chunk is written.
        daphne.channel.pauseProducing()
        await send(body(b"b", True))
        progress.append(1)
        await send(body(b"c", True))
        progress.append(2)
        await send(body(b"", False))

    return app


async def test_a_full_buffer_before_the_first_body_is_honoured() -> None:
    daphne = Daphne()
    daphne.channel.pauseProducing()  # e.g. a previous response is still being sent
    progress: list[int] = []
    task = asyncio.create_task(
        DaphneBackpressure(streaming_app(3, progress))({"type": "http"}, no_receive, daphne.send)
    )
    await settle()
    assert progress == []
    daphne.channel.resumeProducing()
    await settle()
    assert progress == [0, 1, 2]
    await task


async def test_a_lost_connection_wakes_a_paused_send() -> None:
    daphne = Daphne()
    progress: list[int] = []
    task = asyncio.create_task(
        DaphneBackpressure(pausing_app(daphne, progress))({"type": "http"}, no_receive, daphne.send)
    )
    await settle()
    assert progress == [0]
    daphne.channel.connectionLost(Failure(ConnectionResetError()))
    await settle()
    # Daphne drops what is sent after a disconnect; the app is woken and can finish.
    assert progress == [0, 1, 2]
    await task


async def test_cancelling_a_paused_send_unregisters_the_producer() -> None:
    daphne = Daphne()
    progress: list[int] = []
    task = asyncio.create_task(
        DaphneBackpressure(pausing_app(daphne, progress))({"type": "http"}, no_receive, daphne.send)
    )
    await settle()
    assert daphne.channel._requestProducer is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert daphne.channel._requestProducer is None


async def test_an_error_after_the_response_started_aborts_the_connection() -> None:
    daphne = Daphne()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(START)
        await send(body(b"partial", True))
        raise RuntimeError("database went away")

    await DaphneBackpressure(app)({"type": "http", "path": "/x"}, no_receive, daphne.send)
    assert daphne.transport.disconnecting  # aborted: the client sees a cut response


async def test_an_error_before_the_response_started_propagates() -> None:
    daphne = Daphne()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await DaphneBackpressure(app)({"type": "http"}, no_receive, daphne.send)
    assert not daphne.transport.disconnecting
