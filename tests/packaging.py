"""The distribution as a host installs it: a built wheel, and fresh venvs to install it into.

Building a wheel takes seconds and a venv with every dependency a minute, so both are cached
under ``.venv-hosts/`` (gitignored): the wheel by a hash of the sources it packages, a venv by
its Python, its extra requirements and the distribution's dependency ranges. The wheel is
reinstalled into a cached venv on every run (``--no-deps``: the code under test is always the
checkout's). Delete ``.venv-hosts/`` to start from nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".venv-hosts"
# What the wheel is built from: a change to any of these is a new wheel.
PACKAGED = ("chat", "notifications", "realtime_kit", "pyproject.toml", "LICENSE", "README.md")
PIP_TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class Interpreter:
    """A Python of the host matrix: pyenv's newest ``3.X.*``, else the ``python3.X`` on PATH."""

    version: str  # "3.12"

    def path(self) -> str:
        # pyenv's shims exist for every installed version but fail unless it is selected, so
        # each candidate is asked for its version before it is used.
        versions = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
        pyenv = sorted(versions.glob(f"{self.version}.*/bin/python"))
        on_path = shutil.which(f"python{self.version}")
        for candidate in [*(str(p) for p in reversed(pyenv)), *([on_path] if on_path else [])]:
            if self._is_version(candidate):
                return candidate
        message = f"Python {self.version} is not installed (pyenv install {self.version})."
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} CI=true: a missing matrix Python is a failure.")
        pytest.skip(message)

    def _is_version(self, python: str) -> bool:
        probe = "import sys; print('%d.%d' % sys.version_info[:2])"
        result = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=30, check=False
        )
        return result.returncode == 0 and result.stdout.strip() == self.version


def _run(args: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_SECONDS,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr}")
    return result.stdout


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for name in PACKAGED:
        root = REPO_ROOT / name
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO_ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_wheel() -> Path:
    """The checkout's wheel (``pip wheel --no-deps .``), rebuilt when a packaged file changed."""
    target = CACHE_DIR / "wheels" / _sources_hash()
    wheels = sorted(target.glob("django_realtime_kit-*.whl"))
    if wheels:
        return wheels[-1]
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp), str(REPO_ROOT)])
    # setuptools leaves build/ and the egg-info in the checkout; they are not ours to keep.
    shutil.rmtree(REPO_ROOT / "build", ignore_errors=True)
    shutil.rmtree(REPO_ROOT / "django_realtime_kit.egg-info", ignore_errors=True)
    tmp.rename(target)
    return sorted(target.glob("django_realtime_kit-*.whl"))[-1]


def dependency_ranges() -> list[str]:
    """``[project] dependencies`` of pyproject.toml."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def host_venv(name: str, python: str, requirements: list[str], wheel: Path) -> Path:
    """A venv of ``python`` with ``requirements`` and the wheel installed (cached, see above)."""
    key = hashlib.sha256(
        "\n".join(
            [_run([python, "--version"]).strip(), *requirements, *dependency_ranges()]
        ).encode()
    ).hexdigest()[:12]
    venv = CACHE_DIR / f"{name}-{key}"
    pip = [str(venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        _run([python, "-m", "venv", str(venv)])
        # The first install resolves the wheel's own ranges (with the row's constraints).
        _run([*pip, *requirements, str(wheel)])
        (venv / ".ready").touch()
    _run([*pip, "--no-deps", "--force-reinstall", str(wheel)])
    return venv
