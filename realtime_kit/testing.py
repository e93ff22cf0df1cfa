"""A live daphne for host sites' tests: ``python -m realtime_kit.server`` with their settings.

Re-exported by ``chat.testing``; usable by a site that installs either app. The server is
another process: it sees the database named by the settings and ``env``, not an in-memory
test database, so point it at a file or a PostgreSQL database the test prepared. It waits
for ``health_path`` (route ``realtime_kit.health.healthz`` there). Needs ``httpx``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

SERVER_START_TIMEOUT_SECONDS = 20.0
SERVER_STOP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """A daphne serving the host's ``application`` (``"mysite.asgi:application"``)."""

    application: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    health_path: str = "/healthz"
    args: list[str] = field(default_factory=list)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def start(self) -> LiveServer:
        """Start the server and wait until ``health_path`` answers 200."""
        module = os.environ.get("DJANGO_SETTINGS_MODULE") or settings.SETTINGS_MODULE
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": module, **self.env}
        env["PYTHONUNBUFFERED"] = "1"
        args = [sys.executable, "-m", "realtime_kit.server", "-b", "127.0.0.1"]
        args += ["-p", str(self.port), *self.args, self.application]
        fd, log_name = tempfile.mkstemp(prefix="live-daphne-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_name)
        with open(self.log_path, "ab") as log:
            # Our own interpreter and module; the host's test names the application.
            self.proc = subprocess.Popen(  # noqa: S603
                args,
                env=env,
                cwd=self.cwd or Path.cwd(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait()
        return self

    def wait(self, timeout: float = SERVER_START_TIMEOUT_SECONDS) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"daphne exited at start:\n{self.log()}")
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daphne not ready after {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        """The server's output so far (attach it to a failing test's report)."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        """SIGTERM (the runner drains), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=SERVER_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=SERVER_STOP_TIMEOUT_SECONDS)


@contextlib.contextmanager
def live_server(application: str, **options: Any) -> Iterator[LiveServer]:
    """A started ``LiveServer`` for the ``with`` block (see ``LiveServer`` for the options)."""
    server = LiveServer(application, **options).start()
    try:
        yield server
    finally:
        server.stop()
        if server.log_path is not None:
            server.log_path.unlink(missing_ok=True)
