"""A local OpenAI-compatible server for tests and benchmarks: real HTTP/1.1 on a loopback port.

It answers ``POST /v1/chat/completions`` with ``stream: true`` the way the OpenAI API does
(Server-Sent Events of ``chat.completion.chunk`` objects, then ``data: [DONE]``), so the real
``openai`` client is exercised end to end. What it does is set by a :class:`Scenario`: stream
given tokens at a given pace, answer an error status with an OpenAI-style JSON body, reset the
connection mid-stream, stall, or send a malformed chunk. It records every request, when the
client hung up (``time.monotonic()``, which is system-wide on Linux, so other processes on
this machine can compare) and how many streams are open.

Two ways to drive it:

- in-process: ``FakeOpenAI().start()`` runs the server on its own event loop in a daemon thread;
  set ``server.scenario`` and read ``server.records()``, ``server.open_streams``;
- as a process (``python -m tests.fake_openai --port N``): the same, over HTTP:
  ``POST /_fake/scenario`` (JSON of the Scenario fields), ``GET /_fake/state``,
  ``POST /_fake/reset``.

The 401 body echoes the API key it was given, as the real API echoes part of it: a test that
provokes it proves our app passes neither upstream messages nor the key on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
CREATED = 1_700_000_000

ERROR_BODIES: dict[int, tuple[str, str, str]] = {
    # status: (message, type, code); "{key}" is replaced by the key the client presented.
    401: ("Incorrect API key provided: {key}.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to use this model.", "invalid_request_error", "forbidden"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", "error"),
    503: ("The engine is currently overloaded.", "server_error", "overloaded"),
}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden"}
REASONS |= {404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
REASONS |= {503: "Service Unavailable"}


@dataclass
class Scenario:
    """What the server does with the next chat completion requests (all of them)."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    # Seconds before each content chunk; the first one waits first_delay instead, if set.
    delay: float = 0.0
    first_delay: float | None = None
    # Seconds before the response headers are sent (a slow queue in front of the model).
    headers_delay: float = 0.0
    # An error status (401, 403, 429, 500, 503) answered with an OpenAI-style JSON body.
    status: int = 200
    # Milliseconds the client should wait before retrying a 429/5xx (retry-after-ms).
    retry_after_ms: int = 20
    # After this many content chunks: reset the connection (RST) ...
    reset_after: int | None = None
    # ... or send nothing more and keep the connection open until the client leaves ...
    stall_after: int | None = None
    # ... or send a chunk that is not JSON (then stall).
    malformed_after: int | None = None
    # Send an in-stream {"error": ...} object after this many chunks (then stall).
    error_chunk_after: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scenario:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RequestRecord:
    """One request the server received, and how it ended."""

    path: str
    headers: dict[str, str]
    body: Any
    started_at: float
    status: int = 0
    tokens_sent: int = 0
    # time.monotonic() when each content chunk was written (benchmarks: per-token latency).
    token_times: list[float] = field(default_factory=list)
    # done | client_hangup | reset | error_status | bad_request | stalled (while still open)
    outcome: str = "open"
    ended_at: float | None = None
    # time.monotonic() when the client closed the connection before the stream ended.
    hangup_at: float | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        body = self.body if isinstance(self.body, dict) else {}
        messages = body.get("messages")
        return messages if isinstance(messages, list) else []

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _HttpError(Exception):
    pass


class FakeOpenAI:
    """The server; ``start()`` runs it in a daemon thread, ``stop()`` ends it."""

    def __init__(self, scenario: Scenario | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._scenario = scenario or Scenario()
        self._records: list[RequestRecord] = []
        self._open_streams = 0
        # Reentrant: wait_until's checks read properties that take the lock again.
        self._cond = threading.Condition(threading.RLock())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._chunk_id = 0

    # --- control (any thread) ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL should be set to."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def scenario(self) -> Scenario:
        with self._cond:
            return self._scenario

    @scenario.setter
    def scenario(self, value: Scenario) -> None:
        with self._cond:
            self._scenario = value

    @property
    def open_streams(self) -> int:
        with self._cond:
            return self._open_streams

    def records(self) -> list[RequestRecord]:
        """Chat completion requests received so far (control requests excluded)."""
        with self._cond:
            return list(self._records)

    def hangups(self) -> list[float]:
        return [r.hangup_at for r in self.records() if r.hangup_at is not None]

    def reset(self, scenario: Scenario | None = None) -> None:
        """Forget the records (open streams stay counted) and set a new scenario."""
        with self._cond:
            self._records.clear()
            self._scenario = scenario or Scenario()

    def wait_until(self, check: Callable[[FakeOpenAI], bool], timeout: float = 10.0) -> bool:
        """Wait until ``check(self)`` is true (re-checked on every state change and 20 Hz)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # Checks read the public properties, which take the (reentrant) lock.
                if check(self):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no stream is open."""
        return self.wait_until(lambda s: s.open_streams == 0, timeout)

    def wait_requests(self, count: int, timeout: float = 10.0) -> bool:
        return self.wait_until(lambda s: len(s.records()) >= count, timeout)

    # --- life cycle --------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeOpenAI:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, port, limit=MAX_HEADER_BYTES)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP ----------------------------------------------------------------------------

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, _HttpError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; return whether the connection may serve another."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        except asyncio.LimitOverrunError:
            raise _HttpError("headers too large") from None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY_BYTES:
            raise _HttpError("body too large")
        raw = await reader.readexactly(length) if length else b""
        if path.startswith("/_fake/"):
            await self._control(method, path, raw, writer)
            return True
        if method != "POST" or path.rstrip("/") != "/v1/chat/completions":
            await self._send_json(writer, 404, {"error": {"message": "Not found", "type": "x"}})
            return True
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        record = RequestRecord(path=path, headers=headers, body=body, started_at=time.monotonic())
        with self._cond:
            self._records.append(record)
            scenario = self._scenario
            self._cond.notify_all()
        try:
            return await self._completion(record, scenario, reader, writer)
        finally:
            if record.ended_at is None:
                record.ended_at = time.monotonic()
            self._changed()

    async def _control(
        self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter
    ) -> None:
        if path == "/_fake/scenario" and method == "POST":
            self.scenario = Scenario.from_json(json.loads(raw or b"{}"))
        elif path == "/_fake/reset" and method == "POST":
            data = json.loads(raw or b"{}")
            self.reset(Scenario.from_json(data) if data else None)
        state = {
            "open_streams": self.open_streams,
            "requests": [r.to_json() for r in self.records()],
            "scenario": dataclasses.asdict(self.scenario),
        }
        await self._send_json(writer, 200, state)

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Any,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(payload))}
        headers.update(extra_headers or {})
        writer.write(_status_line(status, headers) + payload)
        await writer.drain()

    async def _completion(
        self,
        record: RequestRecord,
        scenario: Scenario,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if scenario.headers_delay:
            await asyncio.sleep(scenario.headers_delay)
        if scenario.status != 200:
            return await self._error_status(record, scenario, writer)
        if not isinstance(record.body, dict) or not record.body.get("stream"):
            record.status, record.outcome = 400, "bad_request"
            error = {"message": "This fake server only streams.", "type": "invalid_request_error"}
            await self._send_json(writer, 400, {"error": error})
            return True
        record.status = 200
        headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Transfer-Encoding": "chunked",
            "Cache-Control": "no-cache",
            "x-request-id": f"req_fake_{len(self._records)}",
        }
        writer.write(_status_line(200, headers))
        await writer.drain()
        with self._cond:
            self._open_streams += 1
            self._cond.notify_all()
        # The client sends nothing while it reads a stream: EOF here means it hung up.
        hangup = asyncio.ensure_future(reader.read(1))
        body = asyncio.ensure_future(self._stream_body(record, scenario, writer))
        try:
            await asyncio.wait({hangup, body}, return_when=asyncio.FIRST_COMPLETED)
            if body.done():
                if hangup.done():
                    # EOF, or bytes of a pipelined request we cannot put back: close.
                    return False
                hangup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hangup
                return body.result()
            record.hangup_at = time.monotonic()
            record.outcome = "client_hangup"
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await body
            return False
        finally:
            for task in (hangup, body):
                task.cancel()
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()

    async def _error_status(
        self, record: RequestRecord, scenario: Scenario, writer: asyncio.StreamWriter
    ) -> bool:
        message, kind, code = ERROR_BODIES.get(
            scenario.status, ("Unexpected error.", "server_error", "error")
        )
        key = record.headers.get("authorization", "").removeprefix("Bearer ")
        body = {"error": {"message": message.format(key=key), "type": kind, "code": code}}
        headers = {"x-request-id": "req_fake_error"}
        if scenario.status == 429 or scenario.status >= 500:
            headers["retry-after-ms"] = str(scenario.retry_after_ms)
        record.status, record.outcome = scenario.status, "error_status"
        await self._send_json(writer, scenario.status, body, headers)
        record.ended_at = time.monotonic()
        return True

    def _chunk(self, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
        self._chunk_id += 1
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def _stream_body(
        self, record: RequestRecord, scenario: Scenario, writer: asyncio.StreamWriter
    ) -> bool:
        body = record.body if isinstance(record.body, dict) else {}
        model = str(body.get("model", "fake-model"))

        async def send(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()

        await send(self._chunk(model, {"role": "assistant", "content": ""}, None))
        for index, token in enumerate(scenario.tokens):
            if index == scenario.reset_after:
                _reset(writer)
                record.outcome = "reset"
                record.ended_at = time.monotonic()
                return False
            if index == scenario.stall_after:
                record.outcome = "stalled"
                await asyncio.Future()  # until the client hangs up (or the server stops)
            if index == scenario.malformed_after:
                await send(b'data: {"id": "chatcmpl-fake", "choices": [{"delta": \n\n')
                record.outcome = "stalled"
                await asyncio.Future()
            if index == scenario.error_chunk_after:
                error = {"error": {"message": "The model crashed.", "type": "server_error"}}
                await send(b"data: " + json.dumps(error).encode() + b"\n\n")
                record.outcome = "stalled"
                await asyncio.Future()
            pause = scenario.delay
            if index == 0 and scenario.first_delay is not None:
                pause = scenario.first_delay
            if pause:
                await asyncio.sleep(pause)
            await send(self._chunk(model, {"content": token}, None))
            record.token_times.append(time.monotonic())
            record.tokens_sent += 1
            self._changed()
        await send(self._chunk(model, {}, "stop"))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage: dict[str, Any] = {"prompt_tokens": 1, "completion_tokens": len(scenario.tokens)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            chunk: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk"}
            chunk |= {"created": CREATED, "model": model, "choices": [], "usage": usage}
            await send(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await send(b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        record.outcome = "done"
        record.ended_at = time.monotonic()
        return True


def _status_line(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST, as a crashing server or a dropped proxy does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--scenario", default="{}", help="JSON of Scenario fields")
    args = parser.parse_args()
    server = FakeOpenAI(Scenario.from_json(json.loads(args.scenario)), host=args.host)
    server.start(args.port)
    print(f"fake OpenAI server on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()


# --- pytest fixtures (import them into a test module to use them) ------------------------

try:
    import pytest
except ImportError:  # the benchmark runs without pytest
    pass
else:

    @pytest.fixture(scope="session")
    def fake_openai_server() -> Iterator[FakeOpenAI]:
        """One fake server for the whole session, in a thread of the test process."""
        server = FakeOpenAI().start()
        yield server
        server.stop()

    @pytest.fixture
    def fake_openai(fake_openai_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
        """The session's fake server with fresh records and the default scenario.

        After the test, it checks that the app left no upstream stream open.
        """
        fake_openai_server.reset()
        yield fake_openai_server
        assert fake_openai_server.wait_idle(10), "an upstream stream was left open"
