"""Durable ingest: messages stored (and delivered) per second into one room by concurrent senders.

For each database (SQLite, then a throwaway PostgreSQL cluster) two project servers run in
turn, identical but for ``CHAT_GROUP_COMMIT_MAX_MESSAGES``:

- ``group commit``: the default (100): sends waiting while a transaction runs share the next;
- ``one per send``: 1, every send its own transaction: the baseline, in the same invocation.

``--senders`` sockets (default 100) each send ``--messages`` / senders messages, keeping
``--window`` of their own in flight (the next leaves when an ack arrives), rate limit off. One
more socket only reads and checks what it got: every seq from 1 to the total, once, in order.
Senders receive the whole room too (every socket of a room does); they count their acks in the
raw text instead of decoding it, so that the client is not what is measured.

Printed per run: stored messages/s (first send to last ack), delivered/s (first send to the
reader's last message) and server CPU per stored message; then the ratio of the two variants'
throughput per database.

    .venv/bin/python -m bench.ingest [--dbs sqlite,postgres] [--senders 100] [--messages 20000]
        [--window 1] [--layer memory|redis]

``--layer redis`` starts a throwaway redis-server and runs the servers on channels-redis (the
layer of a deployment with several processes) instead of the in-memory layer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect

from bench import harness
from bench.harness import Server
from tests import servers

LOBBY = "lobby"
METRICS_TOKEN = "bench-ingest"  # noqa: S105 (a throwaway server's)
ACCOUNTS = 10  # logins shared by the sockets (hashing a password per socket is slow)
VARIANTS = (("group commit", "100"), ("one per send", "1"))


@dataclass
class Run:
    db: str
    variant: str
    stored: int
    seconds: float
    delivered_seconds: float
    cpu_seconds: float
    client_cpu_seconds: float
    mean_batch: float

    @property
    def per_second(self) -> float:
        return self.stored / self.seconds

    def line(self) -> str:
        return (
            f"{self.db:8} {self.variant:13} stored {self.stored:6}  "
            f"{self.per_second:8,.0f} msg/s stored  "
            f"{self.stored / self.delivered_seconds:8,.0f} msg/s delivered to the reader  "
            f"server CPU {self.cpu_seconds / self.stored * 1e6:7.0f} us/message  "
            f"client CPU {self.client_cpu_seconds / self.delivered_seconds:4.0%}  "
            f"messages per transaction {self.mean_batch:5.1f}"
        )


async def sender(ws: ClientConnection, name: str, count: int, window: int) -> None:
    sent = acked = 0
    while sent < min(window, count):
        await ws.send(
            json.dumps({"type": "message", "text": f"{name} {sent}", "client_id": f"{name}-{sent}"})
        )
        sent += 1
    while acked < count:
        raw = await ws.recv()
        text = raw if isinstance(raw, str) else raw.decode()
        got = text.count('"type":"ack"')
        if '"type":"error"' in text:
            raise RuntimeError(f"{name}: {text[:300]}")
        acked += got
        while got and sent < count:
            frame = {"type": "message", "text": f"{name} {sent}", "client_id": f"{name}-{sent}"}
            await ws.send(json.dumps(frame))
            sent += 1
            got -= 1


async def reader(ws: ClientConnection, total: int) -> float:
    """Read until seq ``total``; check every seq came once, in order; the time it arrived."""
    expected = 1
    while expected <= total:
        raw = await ws.recv()
        frames = json.loads(raw)
        for frame in frames if isinstance(frames, list) else [frames]:
            if frame.get("type") == "message":
                assert frame["seq"] == expected, f"seq {frame['seq']}, expected {expected}"
                expected += 1
    return time.perf_counter()


async def skip_greeting(ws: ClientConnection) -> None:
    """Read up to read_state (hello, history, presence_state, read_state) before measuring."""
    while True:
        raw = await ws.recv()
        if '"type":"read_state"' in (raw if isinstance(raw, str) else raw.decode()):
            return


async def one_run(
    db: str, variant: str, server: Server, cookies: list[str], args: argparse.Namespace
) -> Run:
    path = f"/ws/chat/{LOBBY}/"
    headers = lambda i: {"Cookie": cookies[i % len(cookies)], "Origin": server.base_url}  # noqa: E731
    read_ws = await connect(server.ws_url(path), additional_headers=headers(0), max_size=None)
    sockets = [
        await connect(server.ws_url(path), additional_headers=headers(i), max_size=None)
        for i in range(args.senders)
    ]
    for ws in [read_ws, *sockets]:
        await skip_greeting(ws)
    per_sender = args.messages // args.senders
    total = per_sender * args.senders
    server.profile()
    cpu_before, client_before = server.cpu_seconds(), time.process_time()
    start = time.perf_counter()
    reading = asyncio.ensure_future(reader(read_ws, total))
    await asyncio.gather(
        *(sender(ws, f"s{i}", per_sender, args.window) for i, ws in enumerate(sockets))
    )
    stored_at = time.perf_counter()
    delivered_at = await asyncio.wait_for(reading, 120)
    cpu = server.cpu_seconds() - cpu_before
    client_cpu = time.process_time() - client_before
    for ws in [read_ws, *sockets]:
        await ws.close()
    batch = mean_batch(server)
    return Run(db, variant, total, stored_at - start, delivered_at - start, cpu, client_cpu, batch)


def mean_batch(server: Server) -> float:
    """Mean sends per transaction, from the server's ``chat_commit_batch_messages``."""
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    body = httpx.get(f"{server.base_url}/metrics", headers=headers, timeout=10).text
    values = dict(
        line.split(" ", 1) for line in body.splitlines() if line.startswith("chat_commit_batch")
    )
    count = float(values.get("chat_commit_batch_messages_count", "nan"))
    return float(values.get("chat_commit_batch_messages_sum", "nan")) / count


async def run_db(
    db: str,
    env: dict[str, str],
    tmp: Path,
    postgres: servers.PostgresServer | None,
    args: argparse.Namespace,
) -> list[Run]:
    usernames = [f"ingest{i}" for i in range(ACCOUNTS)]
    runs = []
    for variant, batch in VARIANTS:
        if variant not in args.variants.split(","):
            continue
        # A fresh database per variant: both start from the same empty room.
        run_env = {**env, "CHAT_GROUP_COMMIT_MAX_MESSAGES": batch}
        run_env["CHAT_METRICS_TOKEN"] = METRICS_TOKEN
        if postgres is not None:
            run_env["DATABASE_URL"] = postgres.create_database(f"bench_ingest_{batch}")
        else:
            run_env["SQLITE_PATH"] = str(tmp / f"{batch}.sqlite3")
        harness.prepare_project(harness.CURRENT, run_env, usernames, {LOBBY: 0})
        server = Server(harness.PROJECT_APP, run_env).start()
        try:
            cookies = harness.login_all(server.base_url, usernames)
            run = await one_run(db, variant, server, cookies, args)
        finally:
            server.cleanup()
        print(run.line(), flush=True)
        runs.append(run)
    return runs


async def main_async(args: argparse.Namespace) -> None:
    harness.raise_nofile(4 * args.senders + 100)
    runs: list[Run] = []
    redis = servers.RedisServer().start() if args.layer == "redis" else None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            for db in args.dbs.split(","):
                env = harness.project_env(Path(tmp) / "unused.sqlite3")
                if redis is not None:
                    env["REDIS_URL"] = redis.url
                postgres = None
                if db == "postgres":
                    postgres = servers.PostgresServer().start()
                elif db != "sqlite":
                    raise SystemExit(f"unknown database {db!r}")
                try:
                    runs += await run_db(db, env, Path(tmp), postgres, args)
                finally:
                    if postgres is not None:
                        postgres.cleanup()
    finally:
        if redis is not None:
            redis.cleanup()
    print()
    for db in args.dbs.split(","):
        if len({r.variant for r in runs if r.db == db}) < len(VARIANTS):
            continue  # a variant was left out: no ratio
        group, single = (
            next(r for r in runs if r.db == db and r.variant == v) for v, _ in VARIANTS
        )
        print(
            f"{db}: group commit {group.per_second:,.0f} msg/s vs one per send "
            f"{single.per_second:,.0f} msg/s: {harness.ratio(group.per_second, single.per_second)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dbs", default="sqlite,postgres")
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=1, help="messages in flight per sender")
    parser.add_argument("--layer", choices=("memory", "redis"), default="memory")
    parser.add_argument(
        "--variants",
        default=",".join(v for v, _ in VARIANTS),
        help="comma-separated subset (no ratio unless both run)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
