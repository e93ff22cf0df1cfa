"""Client side of ``bench.fanout``, in its own process so its CPU is not the server's.

Opens ``publishers + subscribers`` WebSockets to one room and waits for commands, one JSON
line each on stdin, answering one JSON line each on stdout:

- ``{"cmd": "run", "tag": "r3", "publishers": 100, "window": 20, "messages": 400}``: the
  first ``publishers`` sockets share ``messages`` between them; each keeps at most ``window``
  of its messages in flight, sending the next one when the echo of an earlier one arrives.
  Every socket (publishers too) receives every message; the run ends when all of them have,
  or when nothing arrived for ``IDLE_TIMEOUT_SECONDS`` (lost frames are reported).
- ``{"cmd": "quit"}``.

A message's text is ``~<tag>~<publisher>.<k>.<monotonic ns at send>!``: readers find it in
whatever frame wraps it (a project frame, an array of them, the tutorial's ``{"message"}``)
without decoding JSON, so the client's cost per frame stays small. ``time.monotonic_ns`` is
one clock for the whole process, so receive - send is the delivery latency.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

from bench.harness import percentile

CONNECT_CONCURRENCY = 32
SETTLE_SECONDS = 1.5  # presence diffs and history of the last joins arrive before a run
IDLE_TIMEOUT_SECONDS = 10.0


def encode(protocol: str, text: str, client_id: str) -> str:
    """The publisher's frame for ``text`` in the variant's client protocol."""
    if protocol == "project":
        return json.dumps({"type": "message", "text": text, "client_id": client_id})
    return json.dumps({"message": text})


@dataclass
class Run:
    tag: str
    expected: int
    subscriber_expected: int
    delivered: int = 0
    delivered_subscribers: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    windows: dict[int, asyncio.Semaphore] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    progress_at: float = field(default_factory=time.monotonic)


class Clients:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.protocol: str = config["protocol"]
        self.sockets: list[ClientConnection] = []
        self.publishers: int = config["publishers"]
        self.run: Run | None = None
        self.readers: list[asyncio.Task[None]] = []

    async def open(self) -> float:
        start = time.perf_counter()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        cookies: list[str] = self.config["cookies"] or [""]
        total = self.publishers + self.config["subscribers"]

        async def one(index: int) -> ClientConnection:
            cookie = cookies[index % len(cookies)]
            async with gate:
                return await connect(
                    self.config["url"],
                    additional_headers={"Cookie": cookie} if cookie else None,
                    origin=Origin(self.config["origin"]),
                    open_timeout=120,
                    ping_interval=None,
                    max_size=None,
                    # None, or "deflate" to offer permessage-deflate as browsers do.
                    compression=self.config.get("compression"),
                )

        self.sockets = list(await asyncio.gather(*(one(i) for i in range(total))))
        elapsed = time.perf_counter() - start
        self.readers = [asyncio.create_task(self.read(i, ws)) for i, ws in enumerate(self.sockets)]
        await asyncio.sleep(SETTLE_SECONDS)
        return elapsed

    async def read(self, index: int, ws: ClientConnection) -> None:
        subscriber = index >= self.publishers
        async for raw in ws:
            run = self.run
            if run is None or not isinstance(raw, str):
                continue
            tag = run.tag
            at = raw.find(tag)
            if at < 0:
                continue
            now = time.monotonic_ns()
            count = 0
            while at >= 0:
                start = at + len(tag)
                end = raw.find("!", start)
                publisher, _k, sent = raw[start:end].split(".")
                count += 1
                if subscriber:
                    run.latencies_ns.append(now - int(sent))
                elif int(publisher) == index:
                    run.windows[index].release()
                at = raw.find(tag, end)
            run.delivered += count
            if subscriber:
                run.delivered_subscribers += count
            run.progress_at = time.monotonic()
            if run.delivered >= run.expected:
                run.done.set()

    async def publish(self, run: Run, index: int, count: int, window: int) -> None:
        gate = run.windows[index] = asyncio.Semaphore(window)
        ws = self.sockets[index]
        for k in range(count):
            await gate.acquire()
            text = f"{run.tag}{index}.{k}.{time.monotonic_ns()}!"
            await ws.send(encode(self.protocol, text, f"c{run.tag[1:-1]}-{index}-{k}"))

    async def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        publishers = min(int(command["publishers"]), self.publishers)
        messages, window = int(command["messages"]), int(command["window"])
        subscribers = len(self.sockets) - self.publishers
        run = Run(
            tag=f"~{command['tag']}~",
            expected=messages * len(self.sockets),
            subscriber_expected=messages * subscribers,
        )
        shares = [messages // publishers + (i < messages % publishers) for i in range(publishers)]
        cpu_start, start = time.process_time(), time.perf_counter()
        self.run = run
        senders = [
            asyncio.create_task(self.publish(run, i, share, window))
            for i, share in enumerate(shares)
            if share
        ]
        while not run.done.is_set():
            try:
                await asyncio.wait_for(run.done.wait(), 1.0)
            except TimeoutError:
                if time.monotonic() - run.progress_at > IDLE_TIMEOUT_SECONDS:
                    break
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        self.run = None
        for task in senders:
            task.cancel()
        latencies_ms = [ns / 1e6 for ns in run.latencies_ns]
        return {
            "expected": run.expected,
            "delivered": run.delivered,
            "subscriber_expected": run.subscriber_expected,
            "delivered_subscribers": run.delivered_subscribers,
            "wall_seconds": wall,
            "client_cpu_seconds": cpu,
            "latency_p50_ms": percentile(latencies_ms, 0.50),
            "latency_p99_ms": percentile(latencies_ms, 0.99),
            "latency_max_ms": max(latencies_ms, default=float("nan")),
        }

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


def reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def main() -> None:
    config = json.loads(sys.argv[1])
    clients = Clients(config)
    reply({"ready": True, "connect_seconds": await clients.open()})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        command = json.loads(line or '{"cmd": "quit"}')
        if command["cmd"] == "quit":
            break
        reply(await clients.execute(command))
    await clients.close()


if __name__ == "__main__":
    asyncio.run(main())
