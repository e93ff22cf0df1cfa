"""Shared parts of the delivery benchmarks (fanout, connections, abuse): servers, trees, stats.

The server commands are defined here and nowhere else (``SERVER_COMMAND``, and the named ones
of ``SERVER_COMMANDS`` for ``--servers``): a benchmark starts every server, for the project
and for the reference apps, through ``Server``. Process
handling (sessions, logs, atexit cleanup) is ``tests.servers``'; this module adds what the
benchmarks need on top: a configurable command, a source tree to run from (the current one or
a temporary ``git worktree`` of a baseline ref), the project's database prepared for that tree,
login through the real form with ``DJANGO_DEBUG=0``, and ``/proc`` readings of a process tree.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests import servers
from tests.conftest import UNLIMITED_RATE

REPO_ROOT = servers.REPO_ROOT
HOST = "127.0.0.1"
PASSWORD = servers.TEST_PASSWORD
# Today's main: what ``--baseline-ref`` checks out unless told otherwise.
DEFAULT_BASELINE_REF = "6a7fcbc"

# The one place the server command lives. Placeholders: {python} {host} {port} {app}
# {ws_max_bytes}. BENCH_SERVER_COMMAND replaces it for the tree under test (e.g. when the
# project moves to `{python} -m realtime_kit.server ...`), BENCH_BASELINE_SERVER_COMMAND for
# the baseline checkout, which keeps daphne's command by default. Same flags as tests/servers.py.
SERVER_COMMAND = (
    "{python} -m daphne -b {host} -p {port} --websocket-max-message-size {ws_max_bytes} {app}"
)
SERVER_COMMAND_ENV = "BENCH_SERVER_COMMAND"
BASELINE_SERVER_COMMAND_ENV = "BENCH_BASELINE_SERVER_COMMAND"

# Named servers for side-by-side runs (``--servers runner,uvicorn``); a named server ignores
# BENCH_SERVER_COMMAND. ``runner`` is what ``make run`` serves; ``uvicorn`` has the flags of the
# e2e pass on uvicorn (tests/servers.py, TEST_ASGI_SERVER=uvicorn), and its per-connection log
# lines off like daphne's (no access log, warnings only). uvicorn negotiates permessage-deflate
# with clients that offer it (``--ws-per-message-deflate`` is on by default); daphne never does.
SERVER_COMMANDS = {
    "daphne": SERVER_COMMAND,
    "runner": "{python} -m realtime_kit.server -b {host} -p {port}"
    " --websocket-max-message-size {ws_max_bytes} {app}",
    "uvicorn": "{python} -m uvicorn --host {host} --port {port} --ws websockets"
    " --ws-max-size {ws_max_bytes} --lifespan off --no-access-log --log-level warning {app}",
}
DEFLATE_SUFFIX = "+deflate"

PROJECT_APP = "project.asgi:application"
TUTORIAL_APP = "bench.tutorial.asgi:application"
BARE_APP = "bench.bare_asgi:application"
TUTORIAL_SETTINGS = "bench.tutorial.settings"

MB = 1024 * 1024
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


# --- source trees ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A checkout the project is served from: this worktree, or a baseline ref."""

    path: Path
    label: str
    baseline: bool = False


CURRENT = Tree(REPO_ROOT, "current")


@contextlib.contextmanager
def baseline_tree(ref: str) -> Iterator[Tree]:
    """A temporary ``git worktree`` of ``ref`` (detached), removed on exit."""
    parent = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    path = parent / "tree"
    git = ["git", "-C", str(REPO_ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), ref], check=True,
                   capture_output=True, text=True)  # fmt: skip
    sha = subprocess.run([*git, "-C", str(path), "rev-parse", "--short", "HEAD"],
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield Tree(path, f"baseline@{sha}", baseline=True)
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False,
                       capture_output=True)  # fmt: skip
        subprocess.run([*git, "worktree", "prune"], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            parent.rmdir()


# --- servers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerChoice:
    """One entry of ``--servers``: a named server command (``SERVER_COMMANDS``), and whether
    the benchmark's WebSocket clients offer permessage-deflate (``uvicorn+deflate``), as
    browsers do. Without the suffix they offer no extension (the benchmarks' default)."""

    command: str
    deflate: bool = False

    @property
    def label(self) -> str:
        return self.command + (DEFLATE_SUFFIX if self.deflate else "")

    @property
    def compression(self) -> str | None:
        """The ``compression`` argument of ``websockets.connect`` for this choice."""
        return "deflate" if self.deflate else None


def parse_servers(spec: str) -> list[ServerChoice]:
    """``"runner,uvicorn,uvicorn+deflate"`` -> choices; unknown names exit with the known ones."""
    choices = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        command = item.removesuffix(DEFLATE_SUFFIX)
        if command not in SERVER_COMMANDS:
            raise SystemExit(f"unknown server {item!r}: one of {', '.join(SERVER_COMMANDS)}")
        choices.append(ServerChoice(command, item.endswith(DEFLATE_SUFFIX)))
    return choices


def server_command(
    app: str, port: int, baseline: bool = False, command: str | None = None
) -> list[str]:
    """The argv that serves ``app`` on ``port``: the named ``command`` of ``SERVER_COMMANDS``,
    else ``SERVER_COMMAND`` (or its environment override)."""
    template = os.environ.get(BASELINE_SERVER_COMMAND_ENV if baseline else SERVER_COMMAND_ENV)
    if command is not None:
        template = SERVER_COMMANDS[command]
    values = {
        "python": shlex.quote(sys.executable),
        "host": HOST,
        "port": str(port),
        "app": app,
        "ws_max_bytes": str(servers.WS_MAX_MESSAGE_BYTES),
    }
    return shlex.split((template or SERVER_COMMAND).format(**values))


class Server(servers._Process):
    """One server process (the project or a reference app) serving from a tree."""

    name = "server"

    def __init__(
        self, app: str, env: dict[str, str], tree: Tree = CURRENT, command: str | None = None
    ) -> None:
        super().__init__()
        self.app = app
        self.env = env
        self.tree = tree
        self.command = command
        self.port = servers.free_port()

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://{HOST}:{self.port}{path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> Server:
        # The tree's own code, whatever the caller's PYTHONPATH says.
        env = {**os.environ, **self.env, "PYTHONPATH": str(self.tree.path)}
        env["PYTHONUNBUFFERED"] = "1"
        argv = server_command(self.app, self.port, self.tree.baseline, self.command)
        self._spawn(argv, env=env, cwd=self.tree.path)
        servers._wait_until(self._healthy, self, servers.START_TIMEOUT_SECONDS, "GET /healthz")
        return self

    def profile(self) -> None:
        """With ``BENCH_PROFILE=DIR``, py-spy records the server from now until it stops
        (collapsed stacks per server in DIR, for flame graph tools or grep). A script calls
        this where its measurement starts. py-spy is not a requirement: ``pip install py-spy``.
        """
        folder = os.environ.get("BENCH_PROFILE")
        if not folder:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = Path(folder) / f"{self.app.rsplit('.', 1)[0].replace('.', '-')}-{self.port}.txt"
        py_spy = Path(sys.executable).with_name("py-spy")
        subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--nonblocking",
                "-f",
                "raw",
                "-r",
                "200",
                "-o",
                str(out),
                "-p",
                str(self.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        # No graceful shutdown: benchmarks do not measure it, and a busy daphne can take the
        # whole SIGTERM grace period (or segfault with SSE streams open, REALTIME_NOTES.md).
        self.kill()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)


def start_server(
    app: str, env: dict[str, str], tree: Tree = CURRENT, command: str | None = None
) -> Server:
    return Server(app, env, tree, command).start()


def reference_env(settings_module: str = TUTORIAL_SETTINGS) -> dict[str, str]:
    """Environment of the reference apps (the bare app ignores Django settings)."""
    return {"DJANGO_SETTINGS_MODULE": settings_module, "DJANGO_LOG_LEVEL": "WARNING"}


# --- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # The command name may contain spaces and parentheses: split after the last ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a server command may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants, in seconds."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = _stat_fields(member)
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS_PER_SECOND


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its descendants, in bytes."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE_BYTES
    return total


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a CI runner) into SystemExit, so servers and the baseline
    worktree are cleaned up as on Ctrl-C instead of being left running."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the project's database ------------------------------------------------------------------

_SETUP_SCRIPT = textwrap.dedent(
    """
    import django, json, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.core.management import call_command
    from django.db import transaction
    from chat.models import Message, Room

    a = json.loads(sys.argv[1])
    call_command("migrate", interactive=False, verbosity=0)
    User = get_user_model()
    hashed = make_password(a["password"])  # one hash for every account: setup stays fast
    User.objects.bulk_create(
        [User(username=name, password=hashed) for name in a["usernames"]],
        ignore_conflicts=True,
    )
    author = User.objects.get(username=a["usernames"][0])
    # Seeded texts stay short: the project replays 200 messages per WebSocket message, and
    # daphne closes a socket whose outgoing message exceeds 64 KiB (REALTIME_NOTES.md).
    for slug, count in a["rooms"].items():
        room, _ = Room.objects.get_or_create(slug=slug, defaults={"title": slug})
        if not count:
            continue
        with transaction.atomic():
            Message.objects.bulk_create(
                [
                    Message(room=room, seq=s, user=author, text=f"history {s}: " + "x" * 80)
                    for s in range(1, count + 1)
                ],
                batch_size=2000,
            )
            Room.objects.filter(pk=room.pk).update(last_seq=count)
    """
)


def project_env(sqlite_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a benchmarked project server: SQLite, in-memory layer, DEBUG off.

    The rate limit is off as in the e2e tests (``tests.conftest.UNLIMITED_RATE``) unless
    ``extra`` sets it. DEBUG off: with DEBUG on Django records every query.
    """
    env = {
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "SQLITE_PATH": str(sqlite_path),
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "bench-only",
        "DJANGO_ALLOWED_HOSTS": HOST,
        "DJANGO_LOG_LEVEL": "WARNING",
        "CHAT_RATE_LIMIT_MESSAGES": UNLIMITED_RATE,
        "CHAT_RATE_LIMIT_WINDOW_SECONDS": "5",
        # Benchmarks share a few logins among hundreds of sockets (password hashing is slow);
        # the per-user socket cap (20) would refuse most of them.
        "CHAT_MAX_SOCKETS_PER_USER": "100000",
    }
    env.update(extra)
    return env


def prepare_project(
    tree: Tree, env: dict[str, str], usernames: Sequence[str], rooms: dict[str, int]
) -> None:
    """Migrate the tree's database; create the accounts and rooms (slug -> seeded messages)."""
    payload = json.dumps({"usernames": list(usernames), "password": PASSWORD, "rooms": rooms})
    result = subprocess.run(
        [sys.executable, "-c", _SETUP_SCRIPT, payload],
        cwd=tree.path,
        env={**os.environ, **env, "PYTHONPATH": str(tree.path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"database setup failed:\n{result.stdout}\n{result.stderr}")


def copy_sqlite(source: Path, target: Path) -> None:
    """Copy a consistent snapshot of a SQLite database (WAL included) to a new file."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def login(base_url: str, username: str, password: str = PASSWORD) -> str:
    """Log in through the real login form; return the ``Cookie`` header of the session.

    Like ``tests.servers.login``, but the cookies travel by hand: with DEBUG off they are
    ``Secure`` and an HTTP cookie jar would not send them back over plain http.
    """
    with httpx.Client(base_url=base_url, timeout=30) as client:
        page = client.get("/accounts/login/")
        assert page.status_code == 200, page.text[:300]
        csrf = page.cookies["csrftoken"]
        client.cookies.clear()
        form = {"username": username, "password": password, "csrfmiddlewaretoken": csrf}
        response = client.post(
            "/accounts/login/", data=form, headers={"Cookie": f"csrftoken={csrf}"}
        )
        assert response.status_code == 302, f"login of {username}: {response.status_code}"
        return f"sessionid={response.cookies['sessionid']}; csrftoken={csrf}"


def login_all(base_url: str, usernames: Sequence[str]) -> list[str]:
    return [login(base_url, name) for name in usernames]


# --- numbers ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def ratio(value: float, base: float) -> str:
    if not base or base != base or value != value:
        return "   n/a"
    return f"{value / base:6.2f}x"
