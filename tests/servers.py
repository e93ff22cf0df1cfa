"""Real processes for end-to-end tests: redis-server, a throwaway PostgreSQL, daphne.

Every process is started in its own session and killed at teardown; an ``atexit`` hook kills
whatever a crashed test left behind. Logs go to files in a temporary folder; failures print
their tail so a red test explains itself.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_PASSWORD = "pw-for-tests-1"
USERNAMES = ("alice", "bob", "carol")
# Daphne refuses (close 1009) WebSocket messages above this size, like `make run`.
WS_MAX_MESSAGE_BYTES = 65536
# Daphne under the runner (graceful drain, HTTP bounds), as `make run` serves.
RUNNER_MODULE = "realtime_kit.server"
START_TIMEOUT_SECONDS = 20.0
# A stop (SIGTERM) drains for at most DRAIN_TIMEOUT_SECONDS, then the runner exits; a process
# still there after STOP_TIMEOUT_SECONDS is killed.
DRAIN_TIMEOUT_SECONDS = 3.0
STOP_TIMEOUT_SECONDS = 5.0
LOG_TAIL_CHARS = 6000

_live: set[_Process] = set()


def _kill_all_live() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()


atexit.register(_kill_all_live)


def require_binary(name: str) -> str:
    """Return the path of an installed program; skip (fail when CI=true) if it is missing."""
    path = shutil.which(name)
    if path is None:
        candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
        path = max(candidates, key=_postgres_version, default=None)
    if path is not None:
        return path
    message = f"{name} is not installed (apt-get install redis-server postgresql chromium)."
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} CI=true: missing services are failures.", pytrace=False)
    pytest.skip(message)


def _postgres_version(path: str) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin/initdb: the newest installed version wins."""
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return text[-chars:]


class _Process:
    """A child process in its own session (process group), logging to a file."""

    name = "process"

    def __init__(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"e2e-{self.name}-"))
        self.log_path = self.tmpdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start: {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args,
                cwd=cwd or self.tmpdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _live.add(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return _tail(self.log_path, chars)

    def _fail_start(self, why: str) -> None:
        tail = self.log_tail()
        self.kill()
        raise RuntimeError(f"{self.name} did not start: {why}\n--- {self.log_path} ---\n{tail}")

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group at once."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        _live.discard(self)

    def stop(self) -> None:
        """Ask the process to exit (SIGTERM), then SIGKILL it if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def cleanup(self) -> None:
        """Stop the process and remove its temporary folder."""
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _wait_until(check: Callable[[], bool], proc: _Process, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running:
            proc._fail_start(f"exited with code {proc.proc.returncode if proc.proc else None}")
        if check():
            return
        time.sleep(0.05)
    proc._fail_start(f"{what} not ready after {timeout:g} s")


# --- Redis -----------------------------------------------------------------------------------


class RedisServer(_Process):
    """A redis-server without persistence on a loopback port."""

    name = "redis"

    def __init__(self, port: int | None = None) -> None:
        self.binary = require_binary("redis-server")
        super().__init__()
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self._spawn([*args, "--bind", "127.0.0.1"])
        _wait_until(self._ping, self, START_TIMEOUT_SECONDS, "redis PING")
        return self

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()


# --- PostgreSQL ------------------------------------------------------------------------------


class PostgresServer(_Process):
    """A throwaway PostgreSQL cluster in a temporary folder, trust auth, loopback only.

    Debian's PostgreSQL refuses to run as root, so as root the cluster belongs to ``postgres``.
    """

    name = "postgres"

    def __init__(self, port: int | None = None) -> None:
        self.initdb = require_binary("initdb")
        # The server must be the version of the initdb that made the cluster.
        sibling = Path(self.initdb).resolve().parent / "postgres"
        self.postgres = str(sibling) if sibling.exists() else require_binary("postgres")
        super().__init__()
        self.port = port or free_port()
        self.data_dir = self.tmpdir / "data"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            self._as_postgres = [require_binary("runuser"), "-u", "postgres", "--"]
            shutil.chown(self.tmpdir, user="postgres", group="postgres")
            self.log_path.touch()
            shutil.chown(self.log_path, user="postgres", group="postgres")

    def _dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=2"

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self._dsn()) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def start(self) -> PostgresServer:
        if not self.data_dir.exists():
            initdb = [self.initdb, "-D", str(self.data_dir), "-U", "postgres", "-A", "trust"]
            result = subprocess.run(
                [*self._as_postgres, *initdb, "-E", "UTF8", "--no-sync"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.tmpdir),
            # Throwaway data: durability only costs time here.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        args = [self.postgres, "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        self._spawn([*self._as_postgres, *args])
        _wait_until(self._ready, self, START_TIMEOUT_SECONDS, "PostgreSQL")
        return self

    def stop(self) -> None:
        # SIGINT to the postmaster is a "fast shutdown"; runuser only waits for it.
        pid_file = self.data_dir / "postmaster.pid"
        if self.running and pid_file.exists():
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert self.proc is not None
                self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        self.kill()

    def create_database(self, name: str) -> str:
        """Create an empty database and return its ``postgres://`` URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"


# --- daphne ----------------------------------------------------------------------------------


def asgi_server() -> str:
    """The server the end-to-end tests run the project on: ``daphne`` (through our runner, the
    default) or ``uvicorn`` (``TEST_ASGI_SERVER=uvicorn``; CI runs the e2e suite on both)."""
    return os.environ.get("TEST_ASGI_SERVER", "daphne")


class DaphneServer(_Process):
    """``project.asgi:application`` on a loopback port, served by daphne through our runner
    (``python -m realtime_kit.server``, as ``make run`` does), with extra environment and
    runner options (``args``)."""

    name = "daphne"

    def __init__(
        self, env: dict[str, str], port: int | None = None, args: list[str] | None = None
    ) -> None:
        super().__init__()
        self.extra_env = dict(env)
        self.extra_args = list(args or [])
        self._port = port or free_port()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self._port}{path}"

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> DaphneServer:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", **self.extra_env}
        env["PYTHONUNBUFFERED"] = "1"
        if asgi_server() == "uvicorn":
            args = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port"]
            args += [str(self._port), "--ws", "websockets", "--ws-max-size"]
            args += [str(WS_MAX_MESSAGE_BYTES), "--lifespan", "off", "--no-access-log"]
            args += ["--timeout-graceful-shutdown", str(int(DRAIN_TIMEOUT_SECONDS))]
        else:
            args = [sys.executable, "-m", RUNNER_MODULE, "-b", "127.0.0.1"]
            args += ["-p", str(self._port)]
            args += ["--websocket-max-message-size", str(WS_MAX_MESSAGE_BYTES)]
            args += ["--drain-timeout", str(DRAIN_TIMEOUT_SECONDS), *self.extra_args]
        self._spawn([*args, "project.asgi:application"], env=env, cwd=REPO_ROOT)
        _wait_until(self._healthy, self, START_TIMEOUT_SECONDS, "GET /healthz")
        started_daphnes.append(self)
        return self

    def restart(self) -> DaphneServer:
        self.stop()
        return self.start()


# Daphnes started since the last reset; conftest prints their logs when a test fails.
started_daphnes: list[DaphneServer] = []


def server_threads(server: DaphneServer) -> int:
    """Threads of ``server``'s process, as the kernel counts them."""
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


def db_connections(server: DaphneServer, env: dict[str, str]) -> int:
    """Open database connections of ``server``: PostgreSQL backends, or SQLite file handles."""
    if env.get("DATABASE_URL"):
        import psycopg

        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert row is not None
        return int(row[0])
    assert server.proc is not None
    database = str(Path(env["SQLITE_PATH"]).resolve())
    count = 0
    for fd in Path(f"/proc/{server.proc.pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == database
        except OSError:
            continue
    return count


# --- database --------------------------------------------------------------------------------

_SEED_SCRIPT = textwrap.dedent(
    """
    import django, json, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from chat.models import Membership, Room

    args = json.loads(sys.argv[1])
    call_command("migrate", interactive=False, verbosity=0)
    User = get_user_model()
    users = {}
    for name in args["usernames"]:
        user, _ = User.objects.get_or_create(username=name)
        user.set_password(args["password"])
        user.save()
        users[name] = user
    Room.objects.get_or_create(slug="lobby", defaults={"title": "Lobby"})
    secret, _ = Room.objects.get_or_create(
        slug="secret", defaults={"title": "Secret", "is_private": True}
    )
    Membership.objects.get_or_create(room=secret, user=users["alice"])
    """
)

_MESSAGES_SCRIPT = textwrap.dedent(
    """
    import django, json, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from chat.models import Message, Room

    args = json.loads(sys.argv[1])
    user = get_user_model().objects.get(username=args["username"])
    with transaction.atomic():
        room = Room.objects.select_for_update().get(slug=args["room"])
        first = room.last_seq + 1
        Message.objects.bulk_create(
            Message(room=room, seq=seq, user=user, text=f"seeded {seq}")
            for seq in range(first, first + args["count"])
        )
        Room.objects.filter(pk=room.pk).update(last_seq=first + args["count"] - 1)
    """
)


def _django_env(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", **env}


def run_django_script(script: str, env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """Run Python code with Django's settings and ``env`` in a fresh process; return stdout."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        env=_django_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"Django script failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


_STAFF_SCRIPT = """
import django, sys
django.setup()
from django.contrib.auth import get_user_model
user, _ = get_user_model().objects.get_or_create(username=sys.argv[1])
user.is_staff = user.is_superuser = True
user.set_password(sys.argv[2])
user.save()
"""


def create_superuser(env: dict[str, str], username: str, password: str) -> None:
    """A staff superuser in ``env``'s database, for tests that drive the admin."""
    run_django_script(_STAFF_SCRIPT, env, username, password)


def prepare_database(env: dict[str, str]) -> None:
    """Migrate the database ``env`` points at; create alice, bob, carol, lobby and secret."""
    payload = json.dumps({"usernames": USERNAMES, "password": TEST_PASSWORD})
    run_django_script(_SEED_SCRIPT, env, payload)


def seed_messages(env: dict[str, str], room: str, count: int, username: str = "carol") -> None:
    """Store ``count`` messages in ``room`` directly (no server, no rate limit)."""
    payload = json.dumps({"room": room, "count": count, "username": username})
    run_django_script(_MESSAGES_SCRIPT, env, payload)


# --- HTTP and WebSocket clients --------------------------------------------------------------


def _login_form(username: str, password: str, client_cookies: httpx.Cookies) -> dict[str, str]:
    return {
        "username": username,
        "password": password,
        "csrfmiddlewaretoken": client_cookies["csrftoken"],
    }


def _session_cookie(response: httpx.Response, username: str, cookies: httpx.Cookies) -> str:
    assert response.status_code == 302, f"login of {username} failed: {response.status_code}"
    return f"sessionid={cookies['sessionid']}; csrftoken={cookies['csrftoken']}"


async def login(base_url: str, username: str, password: str = TEST_PASSWORD) -> str:
    """Log in through the real login form; return the Cookie header of the session."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        page = await client.get("/accounts/login/")
        assert page.status_code == 200, page.text[:500]
        form = _login_form(username, password, client.cookies)
        response = await client.post("/accounts/login/", data=form)
        return _session_cookie(response, username, client.cookies)


def login_sync(base_url: str, username: str, password: str = TEST_PASSWORD) -> str:
    """``login`` for synchronous code (fixtures of a wider scope than the event loop)."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        page = client.get("/accounts/login/")
        assert page.status_code == 200, page.text[:500]
        response = client.post(
            "/accounts/login/", data=_login_form(username, password, client.cookies)
        )
        return _session_cookie(response, username, client.cookies)


async def ws_connect(
    server: DaphneServer, path: str, cookie: str | None, origin: str | None = "default"
) -> ClientConnection:
    """Open a WebSocket to ``server``; Origin is the server's own unless given (None omits)."""
    headers = {"Cookie": cookie} if cookie else None
    if origin == "default":
        origin = server.base_url
    return await connect(
        server.ws_url(path),
        additional_headers=headers,
        origin=origin,  # type: ignore[arg-type]
        open_timeout=10,
        close_timeout=2,
        max_size=None,
    )


def decode_frames(raw: str | bytes) -> list[dict[str, Any]]:
    """Decode one server WebSocket message (an object or an array of objects) into frames."""
    assert isinstance(raw, str), f"server sent a binary message: {raw!r}"
    decoded = json.loads(raw)
    frames = decoded if isinstance(decoded, list) else [decoded]
    assert all(isinstance(frame, dict) for frame in frames), raw
    return frames


async def recv_frames(ws: ClientConnection, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Receive one WebSocket message and return its frames (always a list)."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return decode_frames(raw)


# The frames of the message protocol these helpers test. Clients ignore other frame types
# (presence, typing, read markers belong to other features), so the chat helpers skip them.
CHAT_FRAME_TYPES = frozenset({"hello", "message", "message_update", "ack", "pong", "error"})


async def recv_chat_frames(
    ws: ClientConnection, timeout: float = 5.0, ignored: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Like ``recv_frames``, but skip frames of other types (kept in ``ignored`` if given)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
        frames = await recv_frames(ws, remaining)
        chat = [f for f in frames if f.get("type") in CHAT_FRAME_TYPES]
        if ignored is not None:
            ignored.extend(f for f in frames if f.get("type") not in CHAT_FRAME_TYPES)
        if chat:
            return chat


async def recv_until(
    ws: ClientConnection, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Collect frames until one matches ``predicate``; return them all, the match last.

    Frames after the match in the same WebSocket message are returned too.
    """
    frames: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            batch = await recv_frames(ws, max(remaining, 0.001))
        except TimeoutError:
            raise AssertionError(
                f"no matching frame within {timeout:g} s; got {_summary(frames)}"
            ) from None
        frames.extend(batch)
        if any(predicate(frame) for frame in batch):
            return frames


async def assert_silent(ws: ClientConnection, timeout: float = 0.3) -> None:
    """Assert that nothing arrives within ``timeout`` (used after a final expected frame)."""
    with contextlib.suppress(TimeoutError):
        frames = await recv_frames(ws, timeout)
        raise AssertionError(f"unexpected frames: {_summary(frames)}")


def _summary(frames: list[dict[str, Any]], limit: int = 20) -> str:
    shown = [json.dumps(f)[:200] for f in frames[-limit:]]
    more = f"... ({len(frames) - limit} earlier) " if len(frames) > limit else ""
    return more + "[" + ", ".join(shown) + "]"


@contextlib.contextmanager
def running(*servers: _Process) -> Iterator[None]:
    """Stop the given servers on exit, even when the body fails."""
    try:
        yield
    finally:
        for server in servers:
            server.cleanup()


class ChatClient:
    """A chat WebSocket that logs every frame it receives, for tests that read at their pace.

    ``log`` holds every frame in arrival order; ``next_frame`` and ``wait_for`` walk it with a
    cursor, receiving more when they reach its end. Frames skipped by ``wait_for`` stay in
    ``log`` (``messages()`` and ``seqs()`` read it), so nothing a test did not expect is lost.
    Frames outside ``CHAT_FRAME_TYPES`` go to ``other`` instead.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.log: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []
        self._cursor = 0
        self.hello: dict[str, Any] = {}

    @classmethod
    async def open(
        cls, server: DaphneServer, cookie: str, room: str = "lobby", query: str = ""
    ) -> ChatClient:
        """Connect to a room and read its ``hello`` frame."""
        path = f"/ws/chat/{room}/" + (f"?{query}" if query else "")
        client = cls(await ws_connect(server, path, cookie))
        client.hello = await client.next_frame(10)
        assert client.hello["type"] == "hello", client.hello
        return client

    async def next_frame(self, timeout: float = 5.0) -> dict[str, Any]:
        """Return the next frame not yet returned, receiving one if needed."""
        if self._cursor == len(self.log):
            try:
                self.log.extend(await recv_chat_frames(self.ws, timeout, self.other))
            except TimeoutError:
                raise AssertionError(
                    f"no frame within {timeout:g} s; last frames {_summary(self.log, 5)}"
                ) from None
        frame = self.log[self._cursor]
        self._cursor += 1
        return frame

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Return the next frame matching ``predicate``; the frames before it stay in ``log``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching frame within {timeout:g} s; got {_summary(self.log)}"
                )
            frame = await self.next_frame(remaining)
            if predicate(frame):
                return frame

    async def wait_seq(self, seq: int, timeout: float = 10.0) -> None:
        """Wait until a message with at least ``seq`` arrives."""
        await self.wait_for(lambda f: f["type"] == "message" and f["seq"] >= seq, timeout)

    def messages(self) -> list[dict[str, Any]]:
        return [frame for frame in self.log if frame["type"] == "message"]

    def seqs(self) -> list[int]:
        return [frame["seq"] for frame in self.messages()]

    async def send(self, frame: Any) -> None:
        """Send one JSON value (a frame, an array, anything) as a text message."""
        await self.ws.send(json.dumps(frame))

    async def post(self, text: str, client_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a message and return the ack or error answering it."""
        await self.send({"type": "message", "text": text, "client_id": client_id})
        return await self.wait_for(
            lambda f: f["type"] in ("ack", "error") and f.get("client_id") == client_id, timeout
        )

    async def ping(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Send a ping; return the frames received before its pong (the pong excluded)."""
        start = len(self.log)
        await self.send({"type": "ping"})
        await self.wait_for(lambda f: f["type"] == "pong", timeout)
        return [f for f in self.log[start:] if f["type"] != "pong"]

    async def close(self) -> None:
        await self.ws.close()

    def drop(self) -> None:
        """Lose the connection abruptly: no close frame, as when a network goes away."""
        transport = self.ws.transport
        transport.abort()
