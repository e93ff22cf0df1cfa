"""Bytes on the wire of a realistic room exchange, with and without permessage-deflate.

For each ``--servers`` entry (``runner`` and ``uvicorn`` by default, ``bench.harness``'s
``SERVER_COMMANDS``), the project is served and the same exchange runs twice, once with
clients that offer permessage-deflate (``websockets``' default, as browsers do) and once with
clients that offer nothing (``compression=None``), in a fresh room each time:

1. ``--users`` people join one after the other (each join is a ``presence_diff`` to the others;
   each socket gets ``hello``, ``presence_state``, ``read_state``);
2. ``--messages`` chat messages of realistic text (``chatter``: short lines made of common chat
   phrases, names, numbers, links and the odd emoji; a random ``client_id`` UUID each, as the
   browser client sends), round-robin, each sent once the previous one reached every socket;
3. a late joiner connects (``hello`` + the last 50 messages of history + presence);
4. the first person leaves and comes back with ``?after=<last seq - --resume>``: a replay of
   ``--resume`` messages in batches;
5. everyone leaves.

Every socket goes through a counting TCP proxy in this process, so what is counted is every
byte of the TCP streams in both directions (handshakes, WebSocket framing, close frames),
not decoded payloads; the login requests before are not part of it. The server's CPU
(utime + stime from /proc) is read around each exchange. The texts and client ids are the same
for every server and mode of one repetition (seeded), so the byte counts compare like for like.

    .venv/bin/python -m bench.wire [--quick] [--servers runner,uvicorn] [--reps 2]
        [--messages 300] [--users 5] [--resume 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from bench import harness
from bench.harness import Server, ServerChoice

MODES = ("deflate", "none")  # what the clients offer; websockets' ``compression`` argument
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
PROXY_READ_BYTES = 65536
WAIT_SECONDS = 30.0
WARMUP_MESSAGES = 10
SETTLE_SECONDS = 0.3  # presence diffs of a join arrive (they are coalesced on the server)

# --- realistic chat text ---------------------------------------------------------------------

OPENERS = (
    "", "", "", "", "hey", "ok so", "lol", "yeah", "hmm", "+1", "agreed,", "wait,", "btw",
    "fwiw", "honestly", "quick question:", "morning!", "sorry,", "nice,", "right, so",
)  # fmt: skip
BODIES = (
    "the deploy to staging failed again, looks like the migration timed out",
    "can someone review my PR for the export page? it's #{n}",
    "I'll be {m} min late to standup",
    "did anyone else see the error rate spike at {h}:{mm}?",
    "lunch at noon? thinking the thai place on {street} street",
    "{name} is out today, ping me instead",
    "pushed a fix, CI is green now",
    "not sure that's right, the docs say the limit is {n} per minute",
    "looks good to me, ship it",
    "who owns the billing service these days?",
    "restarting the worker, give it {m} minutes",
    "the dashboard at https://grafana.internal/d/{code} shows the queue backing up",
    "I think we should just revert and look at it tomorrow",
    "can we move the retro to thursday? I have a dentist appointment",
    "tests pass locally but fail on CI, classic",
    "{name} do you have the numbers from last week's load test?",
    "it's {n} ms at p99 now, was {m}00 before the cache change",
    "anyone know why redis memory doubled overnight?",
    "the customer says the export is missing rows after {h} pm",
    "I'm taking the on-call swap with {name}, fyi",
    "merged, thanks for the quick review",
    "this is blocked on the security review, eta friday",
    "coffee?",
    "that was a fun bug, the timezone was off by one hour in march only",
    "does the new endpoint need auth or is it public?",
    "opened ticket OPS-{n} for it",
    "just saw it, looking now",
    "can you share the logs? the stack trace would help",
    "we hit the rate limit on the mail provider again",
    "happy friday everyone",
    "the build is {m}x slower since the upgrade, I'm bisecting",
    "I'd keep the old flag for one release and then remove it",
)
CLOSERS = (
    "",
    "",
    "",
    "",
    "",
    " :)",
    " thanks!",
    " 🙏",
    " 😅",
    "?",
    "!!",
    " will check after lunch",
)
STREETS = ("Elm", "Baker", "Mission", "Market", "Oak")


def chatter(rng: random.Random) -> str:
    """One line of plausible chat: a phrase with its numbers and names, sometimes two."""

    def line() -> str:
        body = rng.choice(BODIES).format(
            n=rng.randint(10, 9999), m=rng.randint(2, 45), h=rng.randint(1, 12),
            mm=f"{rng.randint(0, 59):02d}", name=rng.choice(NAMES),
            street=rng.choice(STREETS), code=f"{rng.getrandbits(32):08x}",
        )  # fmt: skip
        opener = rng.choice(OPENERS)
        return f"{opener} {body}".strip() + rng.choice(CLOSERS)

    return line() if rng.random() < 0.8 else f"{line()}. {line()}"


# --- a counting TCP proxy --------------------------------------------------------------------


class CountingProxy:
    """Forwards loopback connections to ``target_port``, counting the bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self.handlers: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, harness.HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            harness.HOST, self.target_port
        )
        try:
            await asyncio.gather(
                self._pipe(reader, upstream_writer, "up"),
                self._pipe(upstream_reader, writer, "down"),
            )
        finally:
            for end in (writer, upstream_writer):
                end.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(PROXY_READ_BYTES):
                if direction == "up":
                    self.up += len(chunk)
                else:
                    self.down += len(chunk)
                writer.write(chunk)
                await writer.drain()
            # Pass the half-close on: the other direction may still carry a close frame.
            if writer.can_write_eof():
                writer.write_eof()

    async def finish(self) -> None:
        """Wait until every proxied connection has ended, then stop listening."""
        await asyncio.wait_for(asyncio.gather(*self.handlers), WAIT_SECONDS)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# --- the room exchange -----------------------------------------------------------------------


@dataclass
class Member:
    """One socket of the exchange and what it received."""

    ws: ClientConnection
    changed: asyncio.Event
    max_seq: int = 0
    messages: int = 0
    frames: int = 0
    acks: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        with contextlib.suppress(ConnectionClosed):  # the end of the exchange, or a failure
            async for raw in self.ws:
                data = json.loads(raw)
                for frame in data if isinstance(data, list) else [data]:
                    self.take(frame)
                self.changed.set()

    def take(self, frame: dict[str, Any]) -> None:
        self.frames += 1
        if frame.get("type") == "message":
            self.messages += 1
            self.max_seq = max(self.max_seq, int(frame["seq"]))
        elif frame.get("type") == "ack":
            future = self.acks.pop(frame["client_id"], None)
            if future is not None and not future.done():
                future.set_result(int(frame["seq"]))


@dataclass
class Exchange:
    server: Server
    room: str
    cookies: list[str]
    compression: str | None
    rng: random.Random
    proxy: CountingProxy | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    extension: str = ""

    async def join(self, index: int, after: int | None = None) -> Member:
        assert self.proxy is not None and self.proxy.server is not None
        port = self.proxy.server.sockets[0].getsockname()[1]
        query = f"?after={after}" if after is not None else ""
        ws = await connect(
            f"ws://{harness.HOST}:{port}/ws/chat/{self.room}/{query}",
            additional_headers={"Cookie": self.cookies[index % len(self.cookies)]},
            origin=Origin(f"http://{harness.HOST}:{port}"),
            compression=self.compression,
            ping_interval=None,
            max_size=None,
            open_timeout=WAIT_SECONDS,
        )
        assert ws.response is not None
        self.extension = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        member = Member(ws, self.changed)
        member.reader = asyncio.create_task(member.read())
        return member

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_SECONDS):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    async def say(self, sender: Member, everyone: list[Member]) -> int:
        client_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        sender.acks[client_id] = acked
        frame = {"type": "message", "text": chatter(self.rng), "client_id": client_id}
        await sender.ws.send(json.dumps(frame, ensure_ascii=False))
        seq = await asyncio.wait_for(acked, WAIT_SECONDS)
        await self.until(lambda: all(m.max_seq >= seq for m in everyone))
        return seq

    async def run(self, users: int, messages: int, resume: int) -> dict[str, Any]:
        self.proxy = CountingProxy(self.server.port)
        await self.proxy.start()
        cpu_before, start = self.server.cpu_seconds(), time.perf_counter()
        members: list[Member] = []
        for index in range(users):
            members.append(await self.join(index))
            await asyncio.sleep(SETTLE_SECONDS)
        last = 0
        for k in range(messages):
            last = await self.say(members[k % users], members)
        late = await self.join(users)
        members.append(late)
        await self.until(lambda: late.max_seq >= last)
        await members[0].ws.close()
        gone = members.pop(0)
        await asyncio.sleep(SETTLE_SECONDS)
        back = await self.join(0, after=max(0, last - resume))
        members.append(back)
        await self.until(lambda: back.max_seq >= last)
        await asyncio.sleep(SETTLE_SECONDS)
        for member in members:
            await member.ws.close()
        await self.proxy.finish()
        cpu = self.server.cpu_seconds() - cpu_before
        everyone = [gone, *members]
        return {
            "extension": self.extension,
            "up_bytes": self.proxy.up,
            "down_bytes": self.proxy.down,
            "message_frames": sum(m.messages for m in everyone),
            "frames": sum(m.frames for m in everyone),
            "server_cpu_seconds": cpu,
            "wall_seconds": time.perf_counter() - start,
        }


# --- the benchmark ---------------------------------------------------------------------------


def describe(label: str, mode: str, r: dict[str, Any]) -> str:
    return (
        f"{label:10s} {mode:8s} down {r['down_bytes']:9,d} B  up {r['up_bytes']:8,d} B  "
        f"{r['message_frames']:5d} message frames ({r['frames']} frames) = "
        f"{r['down_bytes'] / max(r['message_frames'], 1):6.1f} B down per message frame  "
        f"server CPU {r['server_cpu_seconds'] * 1000:6.0f} ms  "
        f"wall {r['wall_seconds']:5.1f} s  extension: {r['extension'] or '-'}"
    )


def summarize(results: dict[tuple[str, str], list[dict[str, Any]]], labels: list[str]) -> None:
    med = harness.median

    def value(label: str, mode: str, key: str) -> float:
        return med([float(r[key]) for r in results[label, mode]])

    print("\nmedians over repetitions")
    print(f"{'server':10s} {'offer':8s} {'down B':>10s} {'up B':>9s} {'server CPU ms':>14s}")
    for label in labels:
        for mode in MODES:
            print(
                f"{label:10s} {mode:8s} {value(label, mode, 'down_bytes'):10,.0f}"
                f" {value(label, mode, 'up_bytes'):9,.0f}"
                f" {value(label, mode, 'server_cpu_seconds') * 1000:14.0f}"
            )
    for label in labels:
        down = harness.ratio(
            value(label, "deflate", "down_bytes"), value(label, "none", "down_bytes")
        )
        up = harness.ratio(value(label, "deflate", "up_bytes"), value(label, "none", "up_bytes"))
        cpu = harness.ratio(
            value(label, "deflate", "server_cpu_seconds"),
            value(label, "none", "server_cpu_seconds"),
        )
        print(f"ratio {label} deflate/none: bytes down {down}, bytes up {up}, server CPU {cpu}")
    first = labels[0]
    for label in labels[1:]:
        for mode in MODES:
            down = harness.ratio(value(label, mode, "down_bytes"), value(first, mode, "down_bytes"))
            cpu = harness.ratio(
                value(label, mode, "server_cpu_seconds"), value(first, mode, "server_cpu_seconds")
            )
            print(f"ratio {label}/{first} offering {mode}: bytes down {down}, server CPU {cpu}")


async def measure(
    servers: dict[str, Server], cookies: list[str], args: argparse.Namespace
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    results: dict[tuple[str, str], list[dict[str, Any]]] = {
        (label, mode): [] for label in servers for mode in MODES
    }
    labels = list(servers)
    for label in labels:
        # A fresh process pays its first-use imports and caches in its first exchange.
        warmup = Exchange(servers[label], f"wire-warmup-{label}", cookies, "deflate",
                          random.Random(-1))  # fmt: skip
        await warmup.run(2, WARMUP_MESSAGES, WARMUP_MESSAGES)
    for rep in range(args.reps):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            modes = MODES if rep % 2 == 0 else MODES[::-1]
            for mode in modes:
                exchange = Exchange(
                    servers[label],
                    room_slug(label, mode, rep),
                    cookies,
                    None if mode == "none" else mode,
                    random.Random(rep),  # the same texts for every server and mode
                )
                result = await exchange.run(args.users, args.messages, args.resume)
                results[label, mode].append(result)
                print(f"rep {rep + 1} " + describe(label, mode, result), flush=True)
    return results


def room_slug(label: str, mode: str, rep: int) -> str:
    return f"wire-{label}-{mode}-{rep}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--servers", default="runner,uvicorn", help="comma list, see harness")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--messages", type=int, default=300, help="chat messages per exchange")
    parser.add_argument("--users", type=int, default=5, help="people in the room (+1 late)")
    parser.add_argument("--resume", type=int, default=200, help="messages replayed on resume")
    args = parser.parse_args()
    harness.exit_on_sigterm()
    if args.quick:
        args.reps, args.messages, args.users, args.resume = 1, 40, 3, 30
    choices: list[ServerChoice] = harness.parse_servers(args.servers)
    labels = list(dict.fromkeys(choice.command for choice in choices))  # both modes run anyway
    usernames = list(NAMES[: args.users + 1])
    rooms = {room_slug(label, mode, rep): 0 for label in labels for mode in MODES
             for rep in range(args.reps)}  # fmt: skip
    rooms.update({f"wire-warmup-{label}": 0 for label in labels})
    print(
        f"{args.users} users + 1 late joiner, {args.messages} messages, resume of "
        f"{args.resume}; servers {', '.join(labels)}; {args.reps} repetitions",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-wire-")))
        env = harness.project_env(tmp / "wire.sqlite3")
        harness.prepare_project(harness.CURRENT, env, usernames, rooms)
        servers: dict[str, Server] = {}
        for label in labels:
            server = Server(harness.PROJECT_APP, env, command=label)
            stack.callback(server.cleanup)
            servers[label] = server.start()
        cookies = harness.login_all(servers[labels[0]].base_url, usernames)
        try:
            results = asyncio.run(measure(servers, cookies, args))
        except Exception:
            for label, server in servers.items():
                print(f"--- {label} log ---\n{server.log_tail(3000)}", file=sys.stderr)
            raise
        summarize(results, labels)


if __name__ == "__main__":
    main()
