"""The distribution: what the wheel holds, and that a fresh venv installs the checkout."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import packaging

# One file of each kind per app: a wheel without package data installs, then fails at runtime
# (TemplateDoesNotExist, a 404 for chat.js, "no migrations to apply").
REQUIRED_FILES = [
    "chat/templates/chat/room.html",
    "chat/templates/chat/base.html",
    "chat/static/chat/chat.js",
    "chat/static/chat/chat.css",
    "chat/migrations/0001_initial.py",
    "chat/management/commands/chat_demo.py",
    "chat/py.typed",
    "chat/assistant/replies.py",  # a subpackage: found by packages.find, not by package data
    "notifications/templates/notifications/bell.html",
    "notifications/templates/admin/notifications/send.html",
    "notifications/static/notifications/bell.js",
    "notifications/migrations/0001_initial.py",
    "realtime_kit/server.py",
]


@pytest.fixture(scope="module")
def wheel() -> Path:
    return packaging.build_wheel()


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def test_wheel_holds_templates_static_files_and_migrations_of_both_apps(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert [f for f in REQUIRED_FILES if f not in names] == []
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # Only the three packages: the demo host, tests and benchmarks stay out of a host's site.
    tops = {n.split("/")[0] for n in names if not n.startswith("django_realtime_kit-")}
    assert tops == {"chat", "notifications", "realtime_kit"}


def test_wheel_declares_ranges_not_pins(wheel: Path) -> None:
    meta = _metadata(wheel)
    assert meta["Name"] == "django-realtime-kit"
    assert meta["Version"] == "0.1.0"
    requires = meta.get_all("Requires-Dist") or []
    django = next(r for r in requires if r.lower().startswith("django") and "extra" not in r)
    assert ">=5.2" in django and "<7" in django
    assert [r for r in requires if "==" in r.split(";")[0]] == []
    assert meta["License-Expression"] == "MIT"


def test_pip_install_of_the_checkout_into_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    python = sys.executable
    venv = packaging.host_venv("packaging", python, [], wheel)
    # `pip install .` itself (a flat layout with three packages), over the cached dependencies.
    pip = [str(packaging.venv_python(venv)), "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run(
        [*pip, "--force-reinstall", str(packaging.REPO_ROOT)],
        check=True,
        capture_output=True,
        timeout=packaging.PIP_TIMEOUT_SECONDS,
    )
    # setuptools builds in the checkout: build/ and the egg-info are not ours to keep.
    shutil.rmtree(packaging.REPO_ROOT / "build", ignore_errors=True)
    shutil.rmtree(packaging.REPO_ROOT / "django_realtime_kit.egg-info", ignore_errors=True)
    probe = (
        "import chat, notifications, realtime_kit, pathlib; "
        "roots = [pathlib.Path(m.__file__).parent for m in (chat, notifications)]; "
        "print(all('site-packages' in str(r) for r in roots)); "
        "print((roots[0] / 'templates/chat/room.html').is_file(), "
        "(roots[1] / 'static/notifications/bell.js').is_file())"
    )
    # From a folder without the checkout on sys.path: the installed copy must be the one found.
    out = subprocess.run(
        [str(packaging.venv_python(venv)), "-c", probe],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split("\n")
    assert out[:2] == ["True", "True True"]


def test_editable_install_of_the_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = packaging.host_venv("packaging", sys.executable, [], wheel)
    python = str(packaging.venv_python(venv))
    try:
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(packaging.REPO_ROOT)],
            check=True,
            capture_output=True,
            timeout=packaging.PIP_TIMEOUT_SECONDS,
        )
        probe = "import chat, notifications, realtime_kit.asgi; print(chat.__file__)"
        out = subprocess.run(
            [python, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True
        ).stdout.strip()
        # The checkout's own files: edits show without a reinstall.
        assert out == str(packaging.REPO_ROOT / "chat" / "__init__.py")
    finally:
        shutil.rmtree(packaging.REPO_ROOT / "build", ignore_errors=True)
        shutil.rmtree(packaging.REPO_ROOT / "django_realtime_kit.egg-info", ignore_errors=True)
