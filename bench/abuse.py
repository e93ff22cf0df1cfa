"""Server memory while clients abuse a room, and after they leave: current tree vs a baseline.

Scenarios (10 abusive clients each, ``--clients``), one room per scenario:

- ``flood``:  each client sends WebSocket messages of 50 ``message`` frames x 1,200 characters
  (about 62 KB, under daphne's 64 KiB limit) as fast as the connection takes them, and reads
  whatever comes back. The project's default rate limit applies (10 messages per 5 s): an
  attacker does not get to turn it off.
- ``resume``: each client sends ``[{"type":"resume","after":0}] x 50`` every
  ``--resume-interval`` seconds into a room with ``--history`` stored messages, and never reads.
- ``stall``:  each client sits in a busy room without reading while ``--posters`` sockets post
  3,500-character messages of 4-byte characters (14 KB each on the wire; each poster keeps
  10 in flight; rate limit off for them), so the kernel's buffers fill within seconds.

In every scenario a ``probe`` socket in the same room reads everything and pings every 0.25 s:
its ping round trips show what the abuse does to an ordinary client. The abusers leave after
``--seconds`` (flood: close; resume/stall: the connection drops, they cannot read a close
frame); sampling goes on for ``--after-seconds``. Server RSS (/proc/<pid>/statm of the server
process and its children) is sampled every 0.25 s; a run stops early when it grew by
``--rss-cap-mb``. Abusers' close codes (what a slow-consumer or flood bound does) are recorded.

Each run gets a fresh server and a fresh copy of its tree's prepared database. The baseline is
the project at ``--baseline-ref`` (default today's main), checked out in a temporary
``git worktree`` and served by the same command; runs alternate between the two trees.

    .venv/bin/python -m bench.abuse [--quick] [--scenarios flood,resume,stall]
        [--baseline-ref 6a7fcbc | --no-baseline] [--seconds 6] [--after-seconds 4] [--reps 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from bench import harness
from bench.harness import Server, Tree

SCENARIOS = ("flood", "resume", "stall")
ACCOUNTS = ("probe", "abuser", "poster")
FLOOD_FRAMES_PER_MESSAGE = 50
FLOOD_TEXT_CHARS = 1200
RESUMES_PER_MESSAGE = 50
STALL_TEXT_CHARS = 3500
# A 4-byte UTF-8 character: the frames are big on the wire while the text stays under
# CHAT_MAX_TEXT_LENGTH (4,000 characters), and the stall shows within a short run.
STALL_CHARACTER = "\U0001f600"
NON_READER_RCVBUF_BYTES = 4096
POSTER_WINDOW = 10
PROBE_PING_INTERVAL_SECONDS = 0.25
SAMPLE_INTERVAL_SECONDS = 0.25
SETTLE_SECONDS = 1.0
# The project's own default rate limit: an empty value leaves the app default in place.
DEFAULT_RATE_LIMIT = {"CHAT_RATE_LIMIT_MESSAGES": "", "CHAT_RATE_LIMIT_WINDOW_SECONDS": ""}


@dataclass
class Prepared:
    """A tree with its template database and the accounts' session cookies."""

    tree: Tree
    template: Path
    cookies: dict[str, str]


@dataclass
class Sample:
    seconds: float
    rss_bytes: int
    cpu_seconds: float
    # In the kernel's send queues of the server's sockets: memory the server holds for its
    # clients that RSS does not show (up to tcp_wmem's maximum, 4 MiB here, per socket).
    queued_bytes: int


class Sampler(threading.Thread):
    """Samples the server's RSS and CPU; sets ``capped`` once RSS grew past the cap."""

    def __init__(self, server: Server, cap_bytes: int) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.cap_bytes = cap_bytes
        self.start_time = time.monotonic()
        self.base = server.rss_bytes()
        self.samples: list[Sample] = []
        self.capped = threading.Event()
        self.halt = threading.Event()

    def sample(self) -> Sample:
        reading = Sample(
            time.monotonic() - self.start_time,
            self.server.rss_bytes(),
            self.server.cpu_seconds(),
            kernel_send_queue_bytes(self.server.port),
        )
        self.samples.append(reading)
        if reading.rss_bytes - self.base > self.cap_bytes:
            self.capped.set()
        return reading

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_INTERVAL_SECONDS):
            with contextlib.suppress(OSError):
                self.sample()


@dataclass
class Tally:
    """What the clients saw: bytes sent, frames received, closes by the server, probe RTTs."""

    sent_bytes: int = 0
    sent_messages: int = 0
    received_messages: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)
    first_close_seconds: float | None = None
    ping_rtts_ms: list[float] = field(default_factory=list)
    pings_unanswered: int = 0

    def closed(self, code: int | None, seconds: float) -> None:
        key = str(code)
        self.close_codes[key] = self.close_codes.get(key, 0) + 1
        if self.first_close_seconds is None:
            self.first_close_seconds = seconds


class Scenario:
    """One run of one scenario against one started server."""

    def __init__(self, name: str, server: Server, cookies: dict[str, str], args: Any) -> None:
        self.name = name
        self.server = server
        self.cookies = cookies
        self.args = args
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.started = time.monotonic()

    @property
    def room_path(self) -> str:
        return f"/ws/chat/{self.name}/"

    async def open(self, account: str, reading: bool = True) -> ClientConnection:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if not reading:
            # Set before connecting, so the advertised window stays small: the kernel then
            # buffers little for this client and the server must hold what it cannot send.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NON_READER_RCVBUF_BYTES)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (harness.HOST, self.server.port))
        return await connect(
            self.server.ws_url(self.room_path),
            additional_headers={"Cookie": self.cookies[account]},
            origin=Origin(self.server.base_url),
            open_timeout=30,
            close_timeout=2,
            ping_interval=None,
            max_size=None,
            compression=None,
            proxy=None,
            # A client that never reads: websockets stops reading the socket once this many
            # messages wait, so the kernel buffers fill and the server must hold the rest.
            max_queue=16 if reading else 1,
            sock=sock,
        )

    async def drain(self, ws: ClientConnection) -> None:
        """Read and count everything; record a close by the server while abusing."""
        try:
            async for _ in ws:
                self.tally.received_messages += 1
        except ConnectionClosed:
            pass
        if not self.stop.is_set():
            self.tally.closed(ws.close_code, time.monotonic() - self.started)

    async def watch_close(self, ws: ClientConnection) -> None:
        """For clients that do not read: notice when the server drops them."""
        await ws.wait_closed()
        if not self.stop.is_set():
            self.tally.closed(ws.close_code, time.monotonic() - self.started)

    async def flooder(self, ws: ClientConnection, index: int) -> None:
        text = "x" * FLOOD_TEXT_CHARS
        batch = 0
        with contextlib.suppress(ConnectionClosed):
            while not self.stop.is_set():
                frames = [
                    {"type": "message", "text": text, "client_id": f"f{index}-{batch}-{k}"}
                    for k in range(FLOOD_FRAMES_PER_MESSAGE)
                ]
                data = json.dumps(frames)
                await ws.send(data)
                self.tally.sent_bytes += len(data)
                self.tally.sent_messages += 1
                batch += 1

    async def resumer(self, ws: ClientConnection) -> None:
        data = json.dumps([{"type": "resume", "after": 0}] * RESUMES_PER_MESSAGE)
        with contextlib.suppress(ConnectionClosed):
            while not self.stop.is_set():
                await ws.send(data)
                self.tally.sent_bytes += len(data)
                self.tally.sent_messages += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.args.resume_interval)

    async def poster(self, ws: ClientConnection, index: int) -> None:
        window = asyncio.Semaphore(POSTER_WINDOW)
        mark = f"p{index}-"

        async def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    if isinstance(raw, str):
                        for _ in range(raw.count(f'"{mark}')):
                            window.release()

        reader = asyncio.create_task(read())
        body = STALL_CHARACTER * STALL_TEXT_CHARS
        k = 0
        with contextlib.suppress(ConnectionClosed):
            while not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(window.acquire(), 1.0)
                    text = f"{mark}{k} {body}"
                    await ws.send(json.dumps({"type": "message", "text": text}))
                    self.tally.sent_messages += 1
                    k += 1
        reader.cancel()

    async def probe(self, ws: ClientConnection) -> None:
        sent: deque[float] = deque()

        async def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    if isinstance(raw, str) and '"pong"' in raw and sent:
                        self.tally.ping_rtts_ms.append((time.monotonic() - sent.popleft()) * 1e3)

        reader = asyncio.create_task(read())
        with contextlib.suppress(ConnectionClosed):
            while not self.stop.is_set():
                sent.append(time.monotonic())
                await ws.send('{"type":"ping"}')
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), PROBE_PING_INTERVAL_SECONDS)
        self.tally.pings_unanswered = len(sent)
        reader.cancel()

    async def abusers(self) -> tuple[list[ClientConnection], list[asyncio.Task[None]]]:
        n = self.args.clients
        reading = self.name == "flood"
        sockets = [await self.open("abuser", reading=reading) for _ in range(n)]
        tasks: list[asyncio.Task[None]] = []
        for i, ws in enumerate(sockets):
            if self.name == "flood":
                tasks += [asyncio.create_task(self.flooder(ws, i))]
                tasks += [asyncio.create_task(self.drain(ws))]
            else:
                tasks.append(asyncio.create_task(self.watch_close(ws)))
                if self.name == "resume":
                    tasks.append(asyncio.create_task(self.resumer(ws)))
        if self.name == "stall":
            for i in range(self.args.posters):
                tasks.append(asyncio.create_task(self.poster(await self.open("poster"), i)))
        return sockets, tasks

    async def leave(self, sockets: list[ClientConnection]) -> None:
        if self.name == "flood":
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        else:
            for ws in sockets:
                ws.transport.abort()


async def run_scenario(name: str, server: Server, cookies: dict[str, str], args: Any) -> dict:
    scenario = Scenario(name, server, cookies, args)
    probe_ws = await scenario.open("probe")
    await asyncio.sleep(SETTLE_SECONDS)
    sampler = Sampler(server, args.rss_cap_mb * harness.MB)
    sampler.sample()
    sampler.start()
    scenario.started = sampler.start_time
    probe = asyncio.create_task(scenario.probe(probe_ws))
    sockets, tasks = await scenario.abusers()
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not sampler.capped.is_set():
        await asyncio.sleep(0.1)
    left_at = time.monotonic() - sampler.start_time
    scenario.stop.set()
    await probe
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await scenario.leave(sockets)
    await asyncio.sleep(args.after_seconds)
    sampler.halt.set()
    sampler.join()
    final = sampler.sample()
    await probe_ws.close()
    return summarize_run(sampler, scenario.tally, left_at, final, sampler.capped.is_set())


def kernel_send_queue_bytes(port: int) -> int:
    """Bytes in the kernel's send queues of the server's connections (0 without ``ss``)."""
    try:
        out = subprocess.run(
            ["ss", "-tnH", "state", "established", "sport", "=", f":{port}"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def summarize_run(
    sampler: Sampler, tally: Tally, left_at: float, final: Sample, capped: bool
) -> dict[str, Any]:
    base = sampler.base
    during = [s for s in sampler.samples if s.seconds <= left_at] or sampler.samples[:1]
    at_leave = during[-1]
    timeline = []
    next_mark = 0.0
    for s in sampler.samples:
        if s.seconds >= next_mark:
            rss_mb, queued_mb = (s.rss_bytes - base) / harness.MB, s.queued_bytes / harness.MB
            timeline.append((s.seconds, rss_mb, queued_mb, s.seconds > left_at))
            next_mark = int(s.seconds) + 1.0
    rtts = tally.ping_rtts_ms
    return {
        "peak_mb": max((s.rss_bytes - base) for s in sampler.samples) / harness.MB,
        "peak_held_mb": max(s.rss_bytes - base + s.queued_bytes for s in sampler.samples)
        / harness.MB,
        "end_mb": (final.rss_bytes - base) / harness.MB,
        "end_held_mb": (final.rss_bytes - base + final.queued_bytes) / harness.MB,
        "base_mb": base / harness.MB,
        "cpu_during_s": at_leave.cpu_seconds - sampler.samples[0].cpu_seconds,
        "cpu_after_s": final.cpu_seconds - at_leave.cpu_seconds,
        "left_at_s": left_at,
        "capped": capped,
        "timeline": timeline,
        "sent_mb": tally.sent_bytes / harness.MB,
        "sent_messages": tally.sent_messages,
        "received_messages": tally.received_messages,
        "close_codes": tally.close_codes,
        "first_close_s": tally.first_close_seconds,
        "probe_p50_ms": harness.percentile(rtts, 0.5),
        "probe_p99_ms": harness.percentile(rtts, 0.99),
        "probe_max_ms": max(rtts, default=float("nan")),
        "probe_unanswered": tally.pings_unanswered,
    }


def prepare(tree: Tree, tmp: Path, history: int) -> Prepared:
    template = tmp / f"{tree.label}-template.sqlite3"
    env = harness.project_env(template)
    harness.prepare_project(tree, env, ACCOUNTS, {"flood": 0, "resume": history, "stall": 0})
    server = Server(harness.PROJECT_APP, env, tree).start()
    try:
        cookies = dict(zip(ACCOUNTS, harness.login_all(server.base_url, ACCOUNTS), strict=True))
    finally:
        server.cleanup()
    return Prepared(tree, template, cookies)


def scenario_env(name: str, database: Path) -> dict[str, str]:
    extra = {} if name == "stall" else DEFAULT_RATE_LIMIT
    return harness.project_env(database, **extra)


def run_once(name: str, prepared: Prepared, tmp: Path, run_id: int, args: Any) -> dict:
    database = tmp / f"run{run_id}.sqlite3"
    harness.copy_sqlite(prepared.template, database)
    server = Server(harness.PROJECT_APP, scenario_env(name, database), prepared.tree).start()
    try:
        return asyncio.run(run_scenario(name, server, prepared.cookies, args))
    finally:
        server.cleanup()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)


def describe(name: str, label: str, r: dict[str, Any]) -> str:
    def over_time(column: int) -> str:
        rows = r["timeline"]
        return " ".join(
            f"{'|' if row[3] and i and not rows[i - 1][3] else ''}{row[0]:.0f}s:{row[column]:+.0f}"
            for i, row in enumerate(rows)
        )

    closed = sum(r["close_codes"].values())
    returned = 100 * (r["peak_mb"] - r["end_mb"]) / r["peak_mb"] if r["peak_mb"] > 0 else 0.0
    parts = [
        f"{name:7s} {label:18s} RSS {r['base_mb']:.0f} MB, growth peak {r['peak_mb']:+.1f} MB"
        + (" (CAPPED)" if r["capped"] else ""),
        f"{r['after_seconds']:g} s after leaving {r['end_mb']:+.1f} MB "
        f"({returned:.0f} % of the peak returned)",
        f"held (RSS growth + kernel send queues) peak {r['peak_held_mb']:+.1f} MB, "
        f"after leaving {r['end_held_mb']:+.1f} MB",
        f"server CPU {r['cpu_during_s']:.1f} s during, {r['cpu_after_s']:.1f} s after",
        f"abusers sent {r['sent_messages']} messages ({r['sent_mb']:.1f} MB)",
        f"closed by server {closed} (codes {r['close_codes']}, first after "
        f"{r['first_close_s']:.1f} s)"
        if closed
        else "none closed by server",
        f"probe ping p50 {r['probe_p50_ms']:.1f} ms p99 {r['probe_p99_ms']:.1f} ms max "
        f"{r['probe_max_ms']:.1f} ms, {r['probe_unanswered']} unanswered",
    ]
    return (
        "; ".join(parts)
        + f"\n        RSS growth (MB, | = abusers left)   {over_time(1)}"
        + f"\n        kernel send queues (MB)            {over_time(2)}"
    )


def summarize(results: dict[tuple[str, str], list[dict]], labels: list[str]) -> None:
    med = harness.median
    keys = ("peak_mb", "end_mb", "peak_held_mb", "end_held_mb", "probe_p99_ms")
    print("\nmedians over repetitions (MB over the server's RSS before the abuse)")
    print(
        f"{'':26s} {'RSS peak':>9s} {'RSS after':>9s} {'held peak':>9s} {'held after':>10s}"
        f" {'probe p99 ms':>12s}"
    )
    for name in dict.fromkeys(n for n, _ in results):
        rows = {}
        for label in labels:
            runs = results[(name, label)]
            rows[label] = [med([r[key] for r in runs]) for key in keys]
            peak, end, held, held_end, p99 = rows[label]
            print(
                f"{name:7s} {label:18s} {peak:+9.1f} {end:+9.1f} {held:+9.1f} {held_end:+10.1f}"
                f" {p99:12.1f}"
            )
        if len(labels) == 2:
            widths = (9, 9, 9, 10, 12)
            pairs = zip(rows[labels[0]], rows[labels[1]], widths, strict=True)
            ratios = " ".join(f"{harness.ratio(a, b).strip():>{w}s}" for a, b, w in pairs)
            print(f"{name:7s} {'ratio cur/base':18s} {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--baseline-ref", default=harness.DEFAULT_BASELINE_REF)
    parser.add_argument("--no-baseline", action="store_true", help="the current tree only")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="abuse phase")
    parser.add_argument("--after-seconds", type=float, default=4.0, help="after they left")
    parser.add_argument("--clients", type=int, default=10, help="abusive clients")
    parser.add_argument("--posters", type=int, default=3, help="stall: posting sockets")
    parser.add_argument("--history", type=int, default=1000, help="resume: stored messages")
    parser.add_argument("--resume-interval", type=float, default=0.5, help="seconds")
    parser.add_argument("--rss-cap-mb", type=int, default=2048, help="stop a run past this")
    args = parser.parse_args()
    harness.exit_on_sigterm()
    if args.quick:
        args.seconds, args.after_seconds, args.history, args.reps = 2.5, 1.5, 300, 1
    names = [n for n in args.scenarios.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-abuse-")))
        trees = [harness.CURRENT]
        if not args.no_baseline:
            trees.append(stack.enter_context(harness.baseline_tree(args.baseline_ref)))
        prepared = [prepare(tree, tmp, args.history) for tree in trees]
        labels = [p.tree.label for p in prepared]
        print(
            f"{args.clients} abusive clients, {args.seconds:g} s abuse + {args.after_seconds:g} s "
            f"after, {args.reps} rep(s); trees: {', '.join(labels)}",
            flush=True,
        )
        results: dict[tuple[str, str], list[dict]] = {(n, lb): [] for n in names for lb in labels}
        run_id = 0
        for rep in range(args.reps):
            for s_index, name in enumerate(names):
                order = prepared if (rep + s_index) % 2 == 0 else prepared[::-1]
                for p in order:
                    run_id += 1
                    result = run_once(name, p, tmp, run_id, args)
                    result["after_seconds"] = args.after_seconds
                    results[(name, p.tree.label)].append(result)
                    print(f"rep {rep + 1} " + describe(name, p.tree.label, result), flush=True)
        summarize(results, labels)


if __name__ == "__main__":
    main()
