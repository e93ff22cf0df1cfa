"""Export throughput and server memory: streaming export vs a naive ``list()`` baseline.

For each database (SQLite, then a throwaway PostgreSQL cluster) it stores ``--rows`` messages
in one room, then runs each case against a fresh daphne process and samples that process's
RSS (``/proc/<pid>/status``) while one client downloads the export:

- ``stream ndjson`` / ``stream csv``: ``GET /chat/lobby/export/`` as shipped (keyset pages,
  ``DaphneBackpressure``), read as fast as the client can;
- ``stream ndjson, no bound``: the same view in a daphne app without ``DaphneBackpressure``;
- ``naive json``: the baseline, a view that does ``list()`` of the queryset (model instances
  with ``select_related("user")``) and returns one JSON document. It lives here, in a URLconf
  the bench generates, never in the app;
- ``slow reader``: the NDJSON export read at ``--slow-rate`` bytes/s for ``--slow-seconds``,
  with and without the bound;
- ``previous ndjson`` / ``previous csv`` (with ``--baseline-ref REF``): the shipped export of
  a ``git worktree`` of REF (``bench.harness.baseline_tree``) on the same database, e.g. the
  main commit before a change to the export.

    .venv/bin/python bench/export.py [--rows 1000000] [--dbs sqlite,postgres]
        [--slow-seconds 60] [--slow-rate 1000000] [--page-size 2000] [--baseline-ref REF]

Prints one line per case, then the ratios. Takes several minutes for a million rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from tests import servers

MB = 1024 * 1024

_SEED = textwrap.dedent(
    """
    import django, json, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from chat.models import Message, Room

    a = json.loads(sys.argv[1])
    users = list(get_user_model().objects.order_by("username"))
    room = Room.objects.get(slug="lobby")
    pad = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2
    count, batch = a["count"], 20000
    with transaction.atomic():
        for first in range(1, count + 1, batch):
            Message.objects.bulk_create(
                [
                    Message(
                        room=room, seq=s, user=users[s % len(users)], text=f"message {s}: {pad}",
                        client_id=f"c{s}" if s % 2 else "",
                    )
                    for s in range(first, min(first + batch, count + 1))
                ],
                batch_size=5000,
            )
        Room.objects.filter(pk=room.pk).update(last_seq=count)
    # A table that grew in production has statistics; a bulk load has none yet, and without
    # them PostgreSQL plans each keyset page as a hash join and sort of the whole room.
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")
    """
)

# A settings module and URLconf generated into a temporary folder: the naive baseline is
# served by the bench's own URL, and the app gains no bench-only code.
_SETTINGS = textwrap.dedent(
    """
    import os
    from project.settings import *  # noqa: F403
    ROOT_URLCONF = "bench_export_urls"
    # The bench logs in over plain HTTP with DEBUG off.
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = False
    CHAT_EXPORT_PAGE_SIZE = int(os.environ["BENCH_EXPORT_PAGE_SIZE"])
    """
)
_URLS = textwrap.dedent(
    """
    from django.urls import include, path
    from bench.export import naive_export
    urlpatterns = [
        path("bench/naive/<slug:slug>/", naive_export),
        path("", include("project.urls")),
    ]
    """
)
# The shipped HTTP stack minus DaphneBackpressure (no WebSockets needed here).
_UNBOUNDED_ASGI = textwrap.dedent(
    """
    from django.core.asgi import get_asgi_application
    application = get_asgi_application()
    """
)


async def naive_export(request: Any, slug: str) -> Any:
    """The baseline: every message as a model instance, then one JSON document."""
    from asgiref.sync import sync_to_async
    from django.http import HttpResponse

    from chat import protocol
    from chat.models import Message, Room

    def build() -> bytes:
        room = Room.objects.get(slug=slug)
        messages = list(Message.objects.filter(room=room).select_related("user").order_by("seq"))
        frames = [protocol.message_frame(m, room.slug, m.user) for m in messages]
        return json.dumps(frames, ensure_ascii=False).encode()

    return HttpResponse(await sync_to_async(build)(), content_type="application/json")


class BenchDaphne(servers.DaphneServer):
    """A daphne serving ``app`` (a dotted ``module:attribute``) with the bench's modules, from
    this checkout or from ``tree`` (a baseline checkout)."""

    def __init__(self, env: dict[str, str], app: str, tree: Path | None = None) -> None:
        super().__init__(env)
        self.app = app
        self.tree = tree

    def start(self) -> BenchDaphne:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        root = self.tree or servers.REPO_ROOT
        if self.tree is not None:
            # The bench's generated modules first, then the baseline's code instead of ours.
            site = env["PYTHONPATH"].split(os.pathsep)[0]
            env["PYTHONPATH"] = f"{site}{os.pathsep}{self.tree}"
        args = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port)]
        self._spawn([*args, self.app], env=env, cwd=root)
        servers._wait_until(self._healthy, self, 60, "GET /healthz")
        return self


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class RssSampler:
    """Sample a process's RSS every ``interval`` seconds in a thread; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.base = rss_mb(pid)
        self.peak = self.base
        self.timeline: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def _run(self) -> None:
        last_mark = -1.0
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            self.peak = max(self.peak, value)
            elapsed = time.monotonic() - self._start
            if elapsed - last_mark >= 1.0:
                self.timeline.append((elapsed, value - self.base))
                last_mark = elapsed
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.base


@dataclass
class Result:
    db: str
    case: str
    rows: int
    seconds: float
    first_byte_ms: float
    body_mb: float
    rss_growth_mb: float
    note: str = ""
    # The server's CPU over the download: rows per CPU second is what one idle core would
    # serve, a figure that holds while other work shares the machine (wall time does not).
    server_cpu_seconds: float = 0.0

    def line(self) -> str:
        rate = f"{self.rows / self.seconds:>9,.0f} rows/s" if self.rows else " " * 16
        cpu_rate = " " * 22
        if self.rows and self.server_cpu_seconds:
            cpu_rate = f"{self.rows / self.server_cpu_seconds:>9,.0f} rows/CPU-s"
        return (
            f"{self.db:8s} {self.case:26s} rows={self.rows:>8d} {self.seconds:7.1f} s {rate}"
            f"  server {cpu_rate}"
            f"  first byte {self.first_byte_ms:7.1f} ms  body {self.body_mb:7.1f} MB"
            f"  peak RSS +{self.rss_growth_mb:7.1f} MB {self.note}"
        )


async def download(
    server: BenchDaphne, cookie: str, path: str, rate: float | None = None, seconds: float = 0
) -> tuple[int, int, float, float]:
    """GET ``path``; return (bytes, newlines, first byte seconds, total seconds)."""
    loop = asyncio.get_running_loop()
    got = newlines = 0
    first = 0.0
    marker = b'"seq"'
    markers = 0
    tail = b""
    # No timeout: the naive baseline sends nothing until its whole document is built.
    async with httpx.AsyncClient(base_url=server.base_url, timeout=None) as client:  # noqa: S113
        start = loop.time()
        async with client.stream("GET", path, headers={"Cookie": cookie}) as response:
            assert response.status_code == 200, response.status_code
            async for chunk in response.aiter_raw():
                if not first:
                    first = loop.time() - start
                got += len(chunk)
                newlines += chunk.count(b"\n")
                if path.startswith("/bench/naive"):
                    markers += (tail + chunk).count(marker) - tail.count(marker)
                    tail = chunk[-8:]
                if rate is not None:
                    ahead = got / rate - (loop.time() - start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                    if loop.time() - start >= seconds:
                        break
        total = loop.time() - start
    if path.startswith("/bench/naive"):
        newlines = markers
    return got, newlines, first, total


async def measure(
    db: str,
    case: str,
    env: dict[str, str],
    app: str,
    path: str,
    expected_rows: int,
    rate: float | None = None,
    seconds: float = 0,
    tree: Path | None = None,
) -> Result:
    server = BenchDaphne(env, app, tree).start()
    try:
        cookie = await servers.login(server.base_url, "alice")
        # Warm up imports and the first connection with a tiny export.
        await download(server, cookie, f"/chat/lobby/export/?after={expected_rows - 5}")
        pid = server.proc.pid if server.proc else 0
        cpu_before = harness.cpu_seconds(pid)
        with RssSampler(pid) as sampler:
            got, lines, first, total = await download(server, cookie, path, rate, seconds)
            cpu = harness.cpu_seconds(pid) - cpu_before
            if rate is not None:
                # Keep sampling while the server would go on filling its buffer.
                await asyncio.sleep(1.0)
        rows = lines - (1 if "csv" in case else 0)
        note = ""
        if rate is None and rows != expected_rows:
            note = f"(!! expected {expected_rows} rows)"
        if rate is not None:
            step = max(1, int(seconds) // 6)
            marks = [f"{t:.0f}s:+{max(g, 0):.0f}" for t, g in sampler.timeline[::step]]
            note = "RSS growth over time (MB) " + " ".join(marks)
        return Result(
            db,
            case,
            rows if rate is None else 0,
            total,
            first * 1000,
            got / MB,
            sampler.growth,
            note,
            cpu,
        )
    finally:
        server.cleanup()


async def run_db(
    db: str, env: dict[str, str], args: argparse.Namespace, baseline: Path | None
) -> list[Result]:
    rows = args.rows
    bounded, unbounded = "project.asgi:application", "bench_export_asgi:application"
    results: list[Result] = []
    ndjson, csv = "/chat/lobby/export/?format=ndjson", "/chat/lobby/export/?format=csv"
    cases: list[tuple[str, str, str, float | None]] = [
        ("stream ndjson", bounded, ndjson, None),
        ("stream csv", bounded, csv, None),
    ]
    if baseline is not None:
        cases += [("previous ndjson", bounded, ndjson, None), ("previous csv", bounded, csv, None)]
    cases += [
        ("stream ndjson, no bound", unbounded, ndjson, None),
        ("naive json (list())", bounded, "/bench/naive/lobby/", None),
    ]
    if db in args.slow_dbs.split(","):
        slow = "/chat/lobby/export/?format=ndjson"
        cases += [
            (f"slow reader {args.slow_rate / 1e6:g} MB/s", bounded, slow, args.slow_rate),
            (
                f"slow reader {args.slow_rate / 1e6:g} MB/s, no bound",
                unbounded,
                slow,
                args.slow_rate,
            ),
        ]
    if db == "sqlite" and shutil.which("sqlite3") is None:
        print("sqlite3 CLI (reference) skipped: no sqlite3 on PATH (apt-get install sqlite3)")
    elif db == "sqlite":
        results.append(sqlite_cli(env["SQLITE_PATH"], rows))
        print(results[-1].line(), flush=True)
    for case, app, path, rate in cases:
        tree = baseline if case.startswith("previous") else None
        result = await measure(db, case, env, app, path, rows, rate, args.slow_seconds, tree)
        print(result.line(), flush=True)
        results.append(result)
    return results


def seed(env: dict[str, str], rows: int) -> float:
    start = time.monotonic()
    servers.prepare_database(env)
    servers.run_django_script(_SEED, env, json.dumps({"count": rows}), timeout=3600)
    return time.monotonic() - start


# The same room as NDJSON-like lines from the sqlite3 command-line shell: a C reference for
# reading and formatting the rows (no HTTP, no Python).
CLI_QUERY = (
    "SELECT json_object('type','message','seq',m.seq,'user',u.username,'text',m.text,"
    "'client_id',m.client_id,'status',m.status,'created_at',m.created_at,"
    "'edited_at',m.edited_at,'deleted',m.deleted) "
    "FROM chat_message m JOIN chat_room r ON r.id = m.room_id "
    "JOIN auth_user u ON u.id = m.user_id WHERE r.slug = 'lobby' ORDER BY m.seq;"
)


def sqlite_cli(path: str, expected_rows: int) -> Result:
    """Run CLI_QUERY in ``sqlite3`` and count its output lines, wall time and CPU."""
    start = time.monotonic()
    proc = subprocess.Popen(
        ["sqlite3", "-readonly", "-batch", path, CLI_QUERY], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    got = lines = 0
    while chunk := proc.stdout.read(1 << 20):
        got += len(chunk)
        lines += chunk.count(b"\n")
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.monotonic() - start
    note = "" if lines == expected_rows else f"(!! {lines} rows, status {status})"
    cpu = usage.ru_utime + usage.ru_stime
    return Result("sqlite", "sqlite3 CLI (reference)", lines, total, 0.0, got / MB, 0.0, note, cpu)


def ratios(results: list[Result]) -> None:
    by = {(r.db, r.case): r for r in results}
    for db in dict.fromkeys(r.db for r in results):
        stream, naive = by.get((db, "stream ndjson")), by.get((db, "naive json (list())"))
        if stream and naive:
            print(
                f"ratio {db}: naive/stream ndjson  time {naive.seconds / stream.seconds:5.2f}x"
                f"  first byte {naive.first_byte_ms / max(stream.first_byte_ms, 0.1):7.0f}x"
                f"  peak RSS growth {naive.rss_growth_mb / max(stream.rss_growth_mb, 0.1):6.0f}x"
            )
        for fmt in ("ndjson", "csv"):
            new, old = by.get((db, f"stream {fmt}")), by.get((db, f"previous {fmt}"))
            if new and old:
                print(
                    f"ratio {db}: previous/stream {fmt}  time {old.seconds / new.seconds:5.2f}x"
                    f"  ({old.rows / old.seconds:,.0f} -> {new.rows / new.seconds:,.0f} rows/s)"
                )
        cli = by.get((db, "sqlite3 CLI (reference)"))
        for case in ("stream ndjson", "stream csv"):
            mine = by.get((db, case))
            if cli and mine and mine.server_cpu_seconds and cli.server_cpu_seconds:
                ours = mine.rows / mine.server_cpu_seconds
                theirs = cli.rows / cli.server_cpu_seconds
                print(
                    f"ratio {db}: sqlite3 CLI/{case} rows per CPU second {theirs / ours:5.2f}x"
                    f"  ({ours:,.0f} vs {theirs:,.0f} rows/CPU-s)"
                )
        unbounded = by.get((db, "stream ndjson, no bound"))
        if stream and unbounded:
            print(
                f"ratio {db}: no bound/bound (fast reader)  peak RSS growth "
                f"{unbounded.rss_growth_mb / max(stream.rss_growth_mb, 0.1):6.1f}x"
            )
        slow = [r for r in results if r.db == db and r.case.startswith("slow")]
        if len(slow) == 2:
            print(
                f"ratio {db}: slow reader no bound/bound  peak RSS growth "
                f"{slow[1].rss_growth_mb / max(slow[0].rss_growth_mb, 0.1):6.1f}x"
            )


async def main_async(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        baseline = None
        if args.baseline_ref:
            tree = stack.enter_context(harness.baseline_tree(args.baseline_ref))
            print(f"previous: {tree.label}", flush=True)
            baseline = tree.path
        await run_all(args, baseline)


async def run_all(args: argparse.Namespace, baseline: Path | None) -> None:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        site = Path(tmp)
        (site / "bench_export_settings.py").write_text(_SETTINGS)
        (site / "bench_export_urls.py").write_text(_URLS)
        (site / "bench_export_asgi.py").write_text(_UNBOUNDED_ASGI)
        common = {
            "DJANGO_SETTINGS_MODULE": "bench_export_settings",
            "PYTHONPATH": f"{site}{os.pathsep}{servers.REPO_ROOT}",
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": "bench-" + uuid.uuid4().hex,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_LOG_LEVEL": "WARNING",
            "REDIS_URL": "",
            "BENCH_EXPORT_PAGE_SIZE": str(args.page_size),
        }
        for db in args.dbs.split(","):
            postgres = None
            if db == "sqlite":
                env = {**common, "DATABASE_URL": "", "SQLITE_PATH": str(site / "bench.sqlite3")}
            elif db == "postgres":
                postgres = servers.PostgresServer().start()
                env = {**common, "DATABASE_URL": postgres.create_database("bench")}
            else:
                raise SystemExit(f"unknown database {db!r}")
            try:
                took = seed(env, args.rows)
                print(f"{db}: stored {args.rows} messages in {took:.0f} s", flush=True)
                results += await run_db(db, env, args, baseline)
            finally:
                if postgres is not None:
                    postgres.cleanup()
    ratios(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dbs", default="sqlite,postgres")
    parser.add_argument("--slow-dbs", default="sqlite", help="databases to run the slow reader on")
    parser.add_argument("--slow-rate", type=float, default=1_000_000, help="bytes per second")
    parser.add_argument("--slow-seconds", type=float, default=60)
    parser.add_argument("--page-size", type=int, default=2000)
    parser.add_argument(
        "--baseline-ref", help="also export with the code of this git ref (previous ndjson/csv)"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
