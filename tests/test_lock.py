"""The development and CI environment is the one uv.lock describes: the lock agrees with
pyproject.toml, the venv the tests run in holds the locked versions, and the Docker image's
requirements are the lock's. The wheel itself keeps ranges, bounded above where the code leans on a
library's internals. (``make venv`` installs uv into ``.uv/`` and the venv from the lock.)"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

UV = ROOT / ".uv" / "bin" / "uv"
LOCK = ROOT / "uv.lock"
IMAGE_REQUIREMENTS = ROOT / "deploy" / "requirements.txt"
# What mypy's verdict and the pool's behaviour depend on most: a change to any of them has broken
# `make test` on a fresh clone before (redis 8.2 made three `type: ignore` comments unused).
KEY_PACKAGES = ("redis", "celery", "kombu", "wasmtime", "mypy", "ruff")
# The libraries whose internals the code uses: their next release may break it, so the wheel's
# range stops before it.
BOUNDED_ABOVE = ("celery", "kombu", "redis", "wasmtime")


def _uv(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the project's uv, offline (nothing here may need the network), against this venv."""
    if not UV.is_file():
        pytest.fail(f"{UV.relative_to(ROOT)} is missing: `make venv` installs it")
    env = {
        **os.environ,
        "UV_OFFLINE": "1",
        "UV_PYTHON": sys.executable,
        "UV_PROJECT_ENVIRONMENT": sys.prefix,
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [str(UV), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def _locked_versions() -> dict[str, str]:
    with LOCK.open("rb") as file:
        return {package["name"]: package["version"] for package in tomllib.load(file)["package"]}


def _requirements(text: str) -> list[str]:
    """The requirement lines of an exported file, without the header that names the command."""
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return lines


def test_the_lock_agrees_with_pyproject() -> None:
    """uv.lock was made from pyproject.toml as it is now: a dependency changed in one but not the
    other fails here (offline: a lock that still satisfies pyproject needs no index)."""
    assert LOCK.is_file(), "uv.lock is missing: `make lock` makes it"
    result = _uv("lock", "--check")
    assert result.returncode == 0, (
        "uv.lock does not match pyproject.toml; run `make lock` (or `.uv/bin/uv lock` to change only "
        f"what the edit needs):\n{result.stdout}{result.stderr}"
    )


def test_the_venv_holds_exactly_the_locked_packages() -> None:
    """The venv the tests run in is uv.lock with the test extra, for this interpreter: nothing
    missing, nothing else, nothing at another version (the project itself aside: its editable
    install is not a locked package)."""
    result = _uv(
        "export",
        "--frozen",
        "--extra",
        "test",
        "--no-emit-project",
        "--no-hashes",
        "--no-annotate",
        "--no-header",
    )
    assert result.returncode == 0, result.stderr
    wanted = {}
    for line in result.stdout.splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                (pin,) = requirement.specifier
                wanted[canonicalize_name(requirement.name)] = pin.version
    site_packages = sysconfig.get_paths()["purelib"]
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions(path=[site_packages])
    }
    installed.pop("scriptpool", None)
    assert installed == wanted, "the venv is not uv.lock's: `make venv` makes it so"


@pytest.mark.parametrize("name", KEY_PACKAGES)
def test_a_key_package_runs_at_its_locked_version(name: str) -> None:
    """Read from the running interpreter itself, not from uv's view of the venv."""
    assert metadata.version(name) == _locked_versions()[name]


def test_the_image_requirements_are_the_locks_runtime_part() -> None:
    """The Dockerfile installs deploy/requirements.txt with --require-hashes: it must be what
    `make lock` exports from uv.lock now (the runtime dependencies and the otel extra, with
    hashes)."""
    result = _uv("export", "--frozen", "--no-dev", "--no-emit-project", "--extra", "otel")
    assert result.returncode == 0, result.stderr
    exported = _requirements(result.stdout)
    pins = [line for line in exported if line and not line[0].isspace()]
    assert pins and all(line.endswith("\\") for line in pins), "every pin continues with its hashes"
    assert _requirements(IMAGE_REQUIREMENTS.read_text()) == exported, (
        "deploy/requirements.txt is not uv.lock's export: `make lock` rewrites it"
    )


def test_the_wheel_keeps_ranges_bounded_where_internals_are_used() -> None:
    """A user's pip resolves ranges, never the lock's pins; the ranges of the libraries whose
    internals the code uses end before their next release line, and the locked version is in each."""
    parsed = [Requirement(text) for text in _pyproject()["project"]["dependencies"]]
    requirements = {requirement.name: requirement for requirement in parsed}
    locked = _locked_versions()
    for name, requirement in requirements.items():
        assert not any(spec.operator in ("==", "===") for spec in requirement.specifier), requirement
        assert requirement.specifier.contains(locked[name]), (requirement, locked[name])
    for name in BOUNDED_ABOVE:
        assert any(spec.operator == "<" for spec in requirements[name].specifier), requirements[name]
