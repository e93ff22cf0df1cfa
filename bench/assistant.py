"""What the assistant's streaming path adds to a model's latency, measured against reading the
same upstream directly, in the same run.

Starts the fake OpenAI-compatible server (tests/fake_openai.py) as its own process and one
daphne pointed at it, then alternates, round by round:

- direct:   the ``openai`` client straight to the fake server (the baseline);
- endpoint: ``POST /chat/assistant/stream/`` through daphne (openai client inside), read as SSE;
- room:     ``@assistant`` in a room over a WebSocket (registry, coalescing, channel layer).

The fake server records when it wrote each token (``time.monotonic()``, system-wide on Linux);
the client records when each token arrived. Per-token latency = arrival - write. Also timed:
time to first token from the client's request, and how long the model server waits to see the
connection drop after the client leaves the endpoint mid-stream.

    .venv/bin/python bench/assistant.py [--tokens 200] [--delay-ms 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import httpx
import openai
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import DaphneServer, login, prepare_database

REPO = Path(__file__).resolve().parent.parent
TOKEN_WIDTH = 6  # every token is "tNNNN " so a character offset maps to a token index
QUESTION = [{"role": "user", "content": "benchmark"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tokens(count: int) -> list[str]:
    return [f"t{i:04d} " for i in range(count)]


class FakeProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_openai", "--port", str(self.port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/_fake/state", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the fake server did not start")

    async def reset(self, http: httpx.AsyncClient, **scenario: Any) -> None:
        await http.post(f"{self.url}/_fake/reset", json=scenario)

    async def last_record(self, http: httpx.AsyncClient) -> dict[str, Any]:
        for _ in range(200):
            state = (await http.get(f"{self.url}/_fake/state")).json()
            if state["requests"] and state["open_streams"] == 0:
                return dict(state["requests"][-1])
            await asyncio.sleep(0.01)
        raise RuntimeError("the fake server still has a stream open")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def per_token(arrivals: list[float], writes: list[float]) -> list[float]:
    return [(a - w) * 1e3 for a, w in zip(arrivals, writes, strict=False)]


async def direct(fake: FakeProcess) -> tuple[float, list[float]]:
    """The baseline: (start, arrival time of each token)."""
    client = openai.AsyncOpenAI(api_key="bench", base_url=f"{fake.url}/v1", max_retries=0)
    arrivals: list[float] = []
    start = time.monotonic()
    stream = await client.chat.completions.create(
        model="fake",
        messages=cast(Any, QUESTION),
        stream=True,
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
    await client.close()
    return start, arrivals


async def endpoint(http: httpx.AsyncClient) -> tuple[float, list[float]]:
    arrivals: list[float] = []
    start = time.monotonic()
    async with http.stream("POST", "/chat/assistant/stream/", json={"messages": QUESTION}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
            elif line == "data: [DONE]":
                break
    return start, arrivals


async def room(ws: Any, count: int) -> tuple[float, list[float], int]:
    """(start, arrival time of each token, delta frames) of one @assistant reply."""
    arrivals: list[float] = []
    frames = 0
    chars = 0
    start = time.monotonic()
    await ws.send(json.dumps({"type": "message", "text": "@assistant benchmark"}))
    while True:
        raw = await asyncio.wait_for(ws.recv(), 30)
        decoded = json.loads(raw)
        for frame in decoded if isinstance(decoded, list) else [decoded]:
            if frame["type"] == "assistant.delta":
                frames += 1
                now = time.monotonic()
                chars += len(frame["content"])
                arrivals.extend([now] * (chars // TOKEN_WIDTH - len(arrivals)))
            elif frame["type"] == "assistant.end":
                assert len(arrivals) == count, (len(arrivals), count)
                return start, arrivals, frames


async def cancel_latency(http: httpx.AsyncClient, fake: FakeProcess) -> float:
    """ms from the client closing the endpoint's stream to the model server seeing it."""
    async with http.stream("POST", "/chat/assistant/stream/", json={"messages": QUESTION}) as r:
        seen = 0
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen == 3:
                    break
        closed = time.monotonic()
    async with httpx.AsyncClient() as control:
        record = await fake.last_record(control)
    return (record["hangup_at"] - closed) * 1e3


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"median {statistics.median(ordered):7.2f}  p99 {p99:7.2f}"


async def run(args: argparse.Namespace) -> None:
    fake = FakeProcess()
    folder = Path(tempfile.mkdtemp(prefix="bench-assistant-"))
    env = {
        "SQLITE_PATH": str(folder / "db.sqlite3"),
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "DJANGO_DEBUG": "1",
        "DJANGO_LOG_LEVEL": "WARNING",
        "OPENAI_API_KEY": "bench",
        "OPENAI_BASE_URL": f"{fake.url}/v1",
        "CHAT_LLM_MAX_RETRIES": "0",
        "CHAT_RATE_LIMIT_MESSAGES": "1000000",
        "CHAT_ASSISTANT_RATE_LIMIT_REPLIES": "1000000",
    }
    prepare_database(env)
    server = DaphneServer(env).start()
    try:
        cookie = await login(server.base_url, "alice")
        headers = {"Cookie": cookie, "X-CSRFToken": cookie.split("csrftoken=")[1]}
        ws_url = server.ws_url("/ws/chat/lobby/")
        async with (
            httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as http,
            httpx.AsyncClient(timeout=10) as control,
            connect(ws_url, additional_headers={"Cookie": cookie}, origin=server.base_url) as ws,  # type: ignore[arg-type]
        ):
            # Warm-up: the first request imports openai and opens connections.
            await fake.reset(control, tokens=tokens(5))
            await direct(fake)
            await endpoint(http)
            await room(ws, 5)
            for delay_ms in (args.delay_ms, 0):
                scenario = {"tokens": tokens(args.tokens), "delay": delay_ms / 1e3}
                await report(args, fake, http, control, ws, scenario, delay_ms)
            await fake.reset(control, tokens=tokens(2000), delay=0.01)
            cancels = [await cancel_latency(http, fake) for _ in range(args.rounds * 2)]
            print(
                f"\ncancel: client closes endpoint -> model server sees hang-up (ms): "
                f"{summary(cancels)}  max {max(cancels):.2f}"
            )
    finally:
        server.cleanup()
        fake.stop()


async def report(
    args: argparse.Namespace,
    fake: FakeProcess,
    http: httpx.AsyncClient,
    control: httpx.AsyncClient,
    ws: Any,
    scenario: dict[str, Any],
    delay_ms: float,
) -> None:
    ttft: dict[str, list[float]] = {"direct": [], "endpoint": [], "room": []}
    latency: dict[str, list[float]] = {"direct": [], "endpoint": [], "room": []}
    total: dict[str, list[float]] = {"direct": [], "endpoint": [], "room": []}
    frames: list[int] = []
    for _ in range(args.rounds):
        for name in ("direct", "endpoint", "room"):
            await fake.reset(control, **scenario)
            if name == "direct":
                start, arrivals = await direct(fake)
            elif name == "endpoint":
                start, arrivals = await endpoint(http)
            else:
                start, arrivals, n = await room(ws, args.tokens)
                frames.append(n)
            record = await fake.last_record(control)
            assert len(arrivals) == args.tokens, (name, len(arrivals))
            ttft[name].append((arrivals[0] - start) * 1e3)
            latency[name].extend(per_token(arrivals, record["token_times"]))
            total[name].append((arrivals[-1] - start) * 1e3)
    print(f"\n{args.tokens} tokens, upstream pace {delay_ms:g} ms/token, {args.rounds} rounds")
    for name in ttft:
        print(
            f"{name:9} first token (ms) {summary(ttft[name])} | per-token write->arrival (ms) "
            f"{summary(latency[name])} | whole reply (ms) median "
            f"{statistics.median(total[name]):8.1f}"
        )
    for name in ("endpoint", "room"):
        added = statistics.median(latency[name]) - statistics.median(latency["direct"])
        ratio = statistics.median(ttft[name]) / statistics.median(ttft["direct"])
        print(
            f"{name:9} adds {added:6.2f} ms per token (median) and "
            f"{statistics.median(ttft[name]) - statistics.median(ttft['direct']):6.2f} ms to the "
            f"first token; first-token ratio {ratio:4.1f}x direct"
        )
    print(f"room      {statistics.median(frames):g} delta frames for {args.tokens} tokens (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
