"""Server memory per idle WebSocket and per idle SSE stream, against reference apps.

For each variant a fresh server is started (``bench.harness.SERVER_COMMAND``), warmed up with
a few connections of the same kind (opened, then closed: first-use imports, thread pools and
hubs are not per-connection costs), and then ``--ws`` WebSockets or ``--sse`` streams are
opened and held without traffic. Reported per connection: (RSS after - RSS before) / count,
RSS from /proc/<pid>/statm of the server process and its children, read once the server's
CPU has gone quiet after the last connection; and the server CPU it took to open them.

- ``project ws``:   ``/ws/chat/lobby/`` of ``project.asgi:application``; the sockets share
  ``--accounts`` logins (real login form), one room;
- ``project sse``:  ``/notifications/stream/``, same logins; the per-user cap is raised with
  ``NOTIFICATIONS_MAX_STREAMS_PER_USER`` (the project reads ``NOTIFICATIONS_*`` from the
  environment);
- ``tutorial ws`` / ``tutorial sse``: the Channels tutorial consumer and a plain Django async
  ``StreamingHttpResponse`` view (``bench/tutorial``);
- ``bare ws`` / ``bare sse``: a bare ASGI app (``bench/bare_asgi.py``).

``--baseline-ref REF`` adds the project's two variants served from a ``git worktree`` of REF.
``--servers runner,uvicorn,uvicorn+deflate`` runs every variant on each named server
(``bench.harness.SERVER_COMMANDS``), named ``project ws runner``, ``project ws uvicorn``, ...,
with ratios to the first; ``+deflate``: the WebSocket clients offer permessage-deflate, as
browsers do (SSE variants are not repeated for it).
The open-file limit is raised to what the counts need (client and server both hold them).

    .venv/bin/python -m bench.connections [--quick] [--ws 2000] [--sse 2000] [--reps 1]
        [--large]  (10,000 WebSockets / 5,000 streams, one repetition)
        [--servers runner,uvicorn,uvicorn+deflate]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Origin

from bench import harness
from bench.harness import Server, ServerChoice, Tree

# Handshakes in flight at once. Daphne drops a WebSocket the app has not accepted within 5 s
# (--websocket_connect_timeout); the project's connect queues its database work on one thread,
# so on a loaded machine 64 at once already exceed that. Dropped ones are retried and counted.
CONNECT_CONCURRENCY = 16
CONNECT_ATTEMPTS = 3
WARMUP_CONNECTIONS = 20
QUIET_CPU_SECONDS = 0.02  # server CPU per QUIET_POLL_SECONDS below which it counts as idle
QUIET_POLL_SECONDS = 0.5
QUIET_TIMEOUT_SECONDS = 20.0
SSE_READY_TIMEOUT_SECONDS = 60.0


@dataclass
class Variant:
    """How to start one kind of server and open one kind of connection to it."""

    name: str
    kind: str  # "ws" or "sse"
    app: str
    env: dict[str, str]
    path: str
    tree: Tree = harness.CURRENT
    cookies: list[str] = field(default_factory=list)
    # The stream is set up (subscribed, first events sent) once this marker has arrived.
    sse_marker: bytes = b": open"
    results: list[dict[str, float]] = field(default_factory=list)
    family: str = ""  # "project ws", "bare sse", ...: what ratios compare across servers
    server_label: str = ""  # the --servers entry it runs on ("" without --servers)
    command: str | None = None  # a name of harness.SERVER_COMMANDS (None: the default)
    compression: str | None = None  # what its WebSocket clients offer


def on_servers(variants: list[Variant], choices: list[ServerChoice]) -> list[Variant]:
    """Each variant once per server choice (``+deflate`` only for WebSockets); unchanged
    without choices."""
    if not choices:
        return [dataclasses.replace(v, family=v.name) for v in variants]
    return [
        dataclasses.replace(
            v,
            name=f"{v.name} {choice.label}",
            family=v.name,
            server_label=choice.label,
            command=choice.command,
            compression=choice.compression,
            results=[],
        )
        for choice in choices
        for v in variants
        if v.kind == "ws" or not choice.deflate
    ]


class Held:
    """Open connections of one kind, held without reading more than their first bytes."""

    def __init__(self, server: Server, variant: Variant) -> None:
        self.server = server
        self.variant = variant
        self.sockets: list[ClientConnection] = []
        self.streams: list[asyncio.StreamWriter] = []
        self.retries = 0

    def _cookie(self, index: int) -> str:
        cookies = self.variant.cookies
        return cookies[index % len(cookies)] if cookies else ""

    async def open(self, count: int) -> None:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        one: Callable[[int], Awaitable[None]] = (
            self._open_ws if self.variant.kind == "ws" else self._open_sse
        )

        async def gated(index: int) -> None:
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        await one(index)
                        return
                    except (OSError, InvalidHandshake, ConnectionClosed):
                        if attempt == CONNECT_ATTEMPTS - 1:
                            raise
                        self.retries += 1

        await asyncio.gather(*(gated(i) for i in range(count)))

    async def _open_ws(self, index: int) -> None:
        cookie = self._cookie(index)
        ws = await connect(
            self.server.ws_url(self.variant.path),
            additional_headers={"Cookie": cookie} if cookie else None,
            origin=Origin(self.server.base_url),
            open_timeout=120,
            ping_interval=None,
            max_size=None,
            compression=self.variant.compression,
        )
        self.sockets.append(ws)

    async def _open_sse(self, index: int) -> None:
        reader, writer = await asyncio.open_connection(harness.HOST, self.server.port)
        cookie = self._cookie(index)
        request = (
            f"GET {self.variant.path} HTTP/1.1\r\nHost: {harness.HOST}:{self.server.port}\r\n"
            "Accept: text/event-stream\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n"
        )
        writer.write(request.encode())
        received = b""
        try:
            async with asyncio.timeout(SSE_READY_TIMEOUT_SECONDS):
                while self.variant.sse_marker not in received:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError(f"stream ended: {received[:300]!r}")
                    received += chunk
        except BaseException:
            writer.transport.abort()
            raise
        if not received.startswith(b"HTTP/1.1 200"):
            writer.transport.abort()
            raise RuntimeError(f"{self.variant.name}: {received[:300]!r}")
        self.streams.append(writer)

    async def close(self) -> None:
        for writer in self.streams:
            writer.transport.abort()
        self.streams.clear()
        for ws in self.sockets:
            ws.transport.abort()
        self.sockets.clear()


def wait_quiet(server: Server) -> None:
    """Return once the server used almost no CPU for one poll interval (or after a timeout)."""
    deadline = time.monotonic() + QUIET_TIMEOUT_SECONDS
    last = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(QUIET_POLL_SECONDS)
        now = server.cpu_seconds()
        if now - last < QUIET_CPU_SECONDS:
            return
        last = now


async def measure_one(variant: Variant, count: int) -> dict[str, float]:
    server = Server(variant.app, variant.env, variant.tree, variant.command).start()
    try:
        warm = Held(server, variant)
        await warm.open(WARMUP_CONNECTIONS)
        await warm.close()
        await asyncio.to_thread(wait_quiet, server)
        rss_before, cpu_before = server.rss_bytes(), server.cpu_seconds()
        held = Held(server, variant)
        start = time.perf_counter()
        await held.open(count)
        opened = time.perf_counter() - start
        await asyncio.to_thread(wait_quiet, server)
        rss_after, cpu_after = server.rss_bytes(), server.cpu_seconds()
        await held.close()
    except Exception:
        print(f"--- {variant.name} server log ---\n{server.log_tail(3000)}", file=sys.stderr)
        raise
    finally:
        server.cleanup()
    return {
        "rss_before_mb": rss_before / harness.MB,
        "rss_after_mb": rss_after / harness.MB,
        "kib_per_connection": (rss_after - rss_before) / count / 1024,
        "open_seconds": opened,
        "cpu_ms_per_connection": (cpu_after - cpu_before) / count * 1000,
        "retries": held.retries,
    }


def project_variants(tree: Tree, tmp: Path, accounts: int, label: str) -> list[Variant]:
    env = harness.project_env(
        tmp / f"{tree.label}.sqlite3", NOTIFICATIONS_MAX_STREAMS_PER_USER="1000000"
    )
    usernames = [f"bench{i}" for i in range(accounts)]
    harness.prepare_project(tree, env, usernames, {"lobby": 0})
    server = Server(harness.PROJECT_APP, env, tree).start()
    try:
        cookies = harness.login_all(server.base_url, usernames)
    finally:
        server.cleanup()
    common: dict[str, Any] = {"app": harness.PROJECT_APP, "env": env, "tree": tree}
    return [
        Variant(f"{label} ws", "ws", path="/ws/chat/lobby/", cookies=cookies, **common),
        Variant(
            f"{label} sse",
            "sse",
            path="/notifications/stream/",
            cookies=cookies,
            sse_marker=b"event: unread",
            **common,
        ),
    ]


def reference_variants() -> list[Variant]:
    env = harness.reference_env()
    return [
        Variant("tutorial ws", "ws", harness.TUTORIAL_APP, env, "/ws/chat/lobby/"),
        Variant("tutorial sse", "sse", harness.TUTORIAL_APP, env, "/events/"),
        Variant("bare ws", "ws", harness.BARE_APP, env, "/ws/bench/"),
        Variant("bare sse", "sse", harness.BARE_APP, env, "/events/"),
    ]


def describe(variant: Variant, count: int, r: dict[str, float]) -> str:
    return (
        f"{variant.name:22s} n={count:6d}  RSS {r['rss_before_mb']:7.1f} -> "
        f"{r['rss_after_mb']:7.1f} MB = {r['kib_per_connection']:6.1f} KiB/conn  "
        f"opened in {r['open_seconds']:5.1f} s, server CPU {r['cpu_ms_per_connection']:5.2f} "
        f"ms/conn"
        + (f", {r['retries']:.0f} handshakes dropped and retried" if r["retries"] else "")
    )


def summarize(variants: list[Variant], counts: dict[str, int]) -> None:
    print("\nmedians over repetitions")
    per_conn = {
        v.name: harness.median([r["kib_per_connection"] for r in v.results]) for v in variants
    }
    for v in variants:
        cpu = harness.median([r["cpu_ms_per_connection"] for r in v.results])
        print(
            f"{v.name:22s} n={counts[v.kind]:6d}  {per_conn[v.name]:6.1f} KiB/conn  "
            f"server CPU {cpu:5.2f} ms/conn"
        )
    by_key = {(v.family, v.server_label): v.name for v in variants}
    for v in variants:
        bare = by_key.get((f"bare {v.kind}", v.server_label))
        if bare is not None and not v.family.startswith("bare"):
            change = harness.ratio(per_conn[v.name], per_conn[bare])
            print(f"ratio {v.name}/{bare} memory per connection: {change}")
    for v in variants:
        if v.name.startswith("project@"):
            change = harness.ratio(
                per_conn.get(f"project {v.kind}", float("nan")), per_conn[v.name]
            )
            print(f"ratio project {v.kind}/{v.name} memory per connection: {change}")
    compare_servers(variants, per_conn)


def compare_servers(variants: list[Variant], per_conn: dict[str, float]) -> None:
    """Ratios of each variant on a later ``--servers`` entry to the same one on the first."""
    labels = list(dict.fromkeys(v.server_label for v in variants if v.server_label))
    first = {v.family: v for v in variants if labels and v.server_label == labels[0]}
    for v in variants:
        base = first.get(v.family)
        if base is None or v is base:
            continue
        cpu, base_cpu = (
            harness.median([r["cpu_ms_per_connection"] for r in x.results]) for x in (v, base)
        )
        print(
            f"ratio {v.name}/{base.name}: memory per connection "
            f"{harness.ratio(per_conn[v.name], per_conn[base.name])}, "
            f"CPU to open {harness.ratio(cpu, base_cpu)}"
        )


async def measure(variants: list[Variant], counts: dict[str, int], reps: int) -> None:
    for rep in range(reps):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            result = await measure_one(v, counts[v.kind])
            v.results.append(result)
            print(f"rep {rep + 1} " + describe(v, counts[v.kind], result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--ws", type=int, default=2000, help="WebSockets per variant")
    parser.add_argument("--sse", type=int, default=2000, help="SSE streams per variant")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--large", action="store_true", help="10,000 WS and 5,000 SSE, 1 rep")
    parser.add_argument("--accounts", type=int, default=10, help="logins the connections share")
    parser.add_argument("--only", default="", help="comma list of variant names to run")
    parser.add_argument("--baseline-ref", default="", help="also serve the project from REF")
    parser.add_argument(
        "--servers",
        default="",
        help="run every variant on each of these (comma list of daphne, runner, uvicorn;"
        " +deflate: WebSocket clients offer permessage-deflate), e.g. runner,uvicorn",
    )
    args = parser.parse_args()
    harness.exit_on_sigterm()
    if args.quick:
        args.ws, args.sse, args.reps, args.accounts = 300, 300, 1, 2
    if args.large:
        args.ws, args.sse, args.reps = 10_000, 5_000, 1
    counts = {"ws": args.ws, "sse": args.sse}
    limit = harness.raise_nofile(max(counts.values()) + 1000)
    if limit < max(counts.values()) + 100:
        raise SystemExit(f"open-file limit {limit} is too low for {max(counts.values())}")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-conns-")))
        variants = project_variants(harness.CURRENT, tmp, args.accounts, "project")
        if args.baseline_ref:
            tree = stack.enter_context(harness.baseline_tree(args.baseline_ref))
            label = f"project@{tree.label.split('@')[1]}"
            variants += project_variants(tree, tmp, args.accounts, label)
        variants += reference_variants()
        variants = on_servers(variants, harness.parse_servers(args.servers))
        if args.only:
            wanted = set(args.only.split(","))
            variants = [v for v in variants if v.name in wanted]
        print(
            f"{args.ws} WebSockets / {args.sse} SSE streams per variant, {args.reps} reps",
            flush=True,
        )
        asyncio.run(measure(variants, counts, args.reps))
        summarize(variants, counts)


if __name__ == "__main__":
    main()
