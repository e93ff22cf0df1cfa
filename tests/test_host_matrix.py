"""The host matrix: the community host (tests/hosts/community) installs the built wheel into
its own venv and passes its end-to-end smoke, on Django 5.2 / Python 3.11 and Django 6.1 /
Python 3.12, with both apps and with each app alone.

The venvs are cached under .venv-hosts/ (tests/packaging.py): the first run installs every
dependency from the package index (a few minutes), later runs only reinstall the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import packaging

HOST_DIR = Path(__file__).resolve().parent / "hosts" / "community"
SMOKE_TIMEOUT_SECONDS = 240
# What the smoke needs besides the wheel: the clients a browser would be.
SMOKE_REQUIREMENTS = ["httpx>=0.27", "httpx-sse>=0.4,<0.5", "websockets>=13"]

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Row:
    name: str
    python: str
    django: str  # a constraint: the newest release of that series

    def requirements(self) -> list[str]:
        return [f"Django{self.django}", *SMOKE_REQUIREMENTS]


ROWS = [
    Row("django52-py311", "3.11", ">=5.2,<5.3"),
    Row("django61-py312", "3.12", ">=6.1,<6.2"),
]


@pytest.fixture(scope="module")
def wheel() -> Path:
    return packaging.build_wheel()


@pytest.fixture(scope="module", params=ROWS, ids=[r.name for r in ROWS])
def host_python(request: pytest.FixtureRequest, wheel: Path) -> tuple[Row, Path]:
    row: Row = request.param
    python = packaging.Interpreter(row.python).path()
    venv = packaging.host_venv(row.name, python, row.requirements(), wheel)
    return row, packaging.venv_python(venv)


def run_smoke(python: Path, apps: str, tmp_path: Path) -> dict[str, object]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHAT_", "NOTIFICATIONS_", "DJANGO_"))
        and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env |= {"COMMUNITY_DB": str(tmp_path / "community.sqlite3"), "COMMUNITY_APPS": apps}
    # From the host's folder, with nothing of the checkout on sys.path: the apps must come
    # from the installed wheel.
    result = subprocess.run(
        [str(python), "smoke.py"],
        cwd=HOST_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_SECONDS,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("SMOKE ")]
    assert result.returncode == 0 and lines, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    seen: dict[str, object] = json.loads(lines[-1][len("SMOKE ") :])
    return seen


def test_apps_come_from_the_wheel_not_the_checkout(host_python: tuple[Row, Path]) -> None:
    _, python = host_python
    out = subprocess.run(
        [str(python), "-c", "import chat, notifications; print(chat.__file__)"],
        cwd=HOST_DIR,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "site-packages" in out and str(packaging.REPO_ROOT / "chat") not in out


def test_both_apps(host_python: tuple[Row, Path], tmp_path: Path) -> None:
    row, python = host_python
    seen = run_smoke(python, "chat,notifications", tmp_path)
    assert str(seen["django"]).startswith(row.django.split(",")[0].lstrip(">="))
    assert str(seen["python"]).startswith(row.python + ".")
    assert seen["ws_path"] == "/community/ws/chat/lobby/"
    assert seen["presence"] is True
    assert seen["assistant"] == "assistant"
    assert seen["mention"] == "alice@example.com mentioned you in Lobby"
    assert seen["sse"] == "Welcome to the community"
    assert seen["writer_delete_page_protected"] is True
    assert seen["members"] == [
        "admin@example.com",
        "alice@example.com",
        "assistant",
        "bob@example.com",
    ]


def test_chat_alone(host_python: tuple[Row, Path], tmp_path: Path) -> None:
    _, python = host_python
    seen = run_smoke(python, "chat", tmp_path)
    assert seen["assistant"] == "assistant"
    assert "sse" not in seen and "notifications/notification/" not in dict(seen["admin"])  # type: ignore[call-overload]


def test_notifications_alone(host_python: tuple[Row, Path], tmp_path: Path) -> None:
    _, python = host_python
    seen = run_smoke(python, "notifications", tmp_path)
    assert seen["sse"] == "Welcome to the community"
    assert "ws_path" not in seen
