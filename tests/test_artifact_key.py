"""The artifact key signs the native code workers load, so no usable key may ship with the
project: a key is refused when missing, short, a placeholder or published (with a message that
says how to make one), ``scriptpool key generate`` makes one, compose generates its own into a
volume, and no file of the repository assigns a key that would be accepted."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.settings import PUBLISHED_ARTIFACT_KEYS, artifact_key_problem, check_artifact_key
from scriptpool.testing import worker_argv
from tests import guests
from tests.conftest import ROOT
from tests.test_cli import OK, USAGE, one_line

# The key docker-compose.yml shipped, put together here so that this file does not publish it
# again (the repository scan below would find it).
OLD_COMPOSE_KEY = "-".join(["change", "me", "to", "32", "random", "bytes", "0000"]).encode()
HOWTO = ("scriptpool key generate", "secrets.token_hex(32)")


def fresh_key() -> bytes:
    """A key as ``scriptpool key generate`` makes one."""
    return secrets.token_hex(32).encode()


# -- what a key must be --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (b"", "is not set"),
        (fresh_key()[:31], "is 31 bytes: a key has at least 32"),
        (b"test-artifact-key-0123456789", "is 28 bytes"),  # the tests' old key
        (OLD_COMPOSE_KEY, "is a published key"),
        (b"x" * 64, "placeholder"),
        (b"0123" * 16, "placeholder"),
        # HMAC pads short keys with NULs: the published key plus one signs exactly as it does.
        (OLD_COMPOSE_KEY + b"\0", "control characters"),
        (fresh_key()[:40] + b"\n" + fresh_key()[:8], "control characters"),
        (OLD_COMPOSE_KEY[:-1] + b"1", "placeholder"),  # one digit from the published key
    ],
)
def test_a_key_is_refused_naming_the_variable_and_how_to_make_one(key: bytes, problem: str) -> None:
    """Missing, short, published and placeholder keys are ConfigurationError naming
    SCRIPTPOOL_ARTIFACT_KEY, the problem, and both ways to make a key."""
    with pytest.raises(ConfigurationError) as caught:
        Settings(artifact_key=key).require_artifact_key()
    message = caught.value.message
    assert message.startswith("SCRIPTPOOL_ARTIFACT_KEY ") and problem in message, message
    assert all(way in message for way in HOWTO), message
    assert caught.value.detail["variable"] == "SCRIPTPOOL_ARTIFACT_KEY"


def test_the_old_compose_key_is_denylisted_by_hash() -> None:
    """The published key is 33 bytes, long enough: only its hash in the denylist refuses it."""
    assert len(OLD_COMPOSE_KEY) >= 32
    assert hashlib.sha256(OLD_COMPOSE_KEY).hexdigest() in PUBLISHED_ARTIFACT_KEYS
    assert artifact_key_problem(OLD_COMPOSE_KEY) is not None


def test_a_generated_key_is_accepted() -> None:
    """32 random bytes as hex pass every check, as they are."""
    key = fresh_key()
    assert check_artifact_key(key) == key
    assert Settings(artifact_key=key).require_artifact_key() == key


# -- SCRIPTPOOL_ARTIFACT_KEY_FILE --------------------------------------------------------------


def test_the_key_can_come_from_a_file(tmp_path: Path) -> None:
    """The file's key, whitespace around it stripped, read when needed; the settings carry the
    path, not the key, into another process."""
    key = fresh_key()
    path = tmp_path / "artifact.key"
    path.write_bytes(b"  " + key + b"\n")
    settings = Settings.from_env({"SCRIPTPOOL_ARTIFACT_KEY_FILE": str(path)})
    assert settings.artifact_key == b"" and settings.require_artifact_key() == key
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot be read"),
        (b"short\n", "is 5 bytes"),
        (OLD_COMPOSE_KEY + b"\n", "published"),
        (b"k" * 5000, "not a key file"),
    ],
)
def test_a_bad_key_file_is_refused_naming_the_file_variable(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    """A missing, unreadable, short, published or oversized key file is ConfigurationError naming
    SCRIPTPOOL_ARTIFACT_KEY_FILE and how to write a key there."""
    path = tmp_path / "artifact.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigurationError) as caught:
        Settings(artifact_key_file=str(path)).require_artifact_key()
    assert caught.value.detail["variable"] == "SCRIPTPOOL_ARTIFACT_KEY_FILE"
    assert problem in caught.value.message and "key generate --file" in caught.value.message


def test_a_key_and_a_key_file_together_are_refused(tmp_path: Path) -> None:
    """Two sources of one key is a mistake: the environment must set one."""
    path = tmp_path / "artifact.key"
    path.write_bytes(fresh_key())
    env = {"SCRIPTPOOL_ARTIFACT_KEY": fresh_key().decode(), "SCRIPTPOOL_ARTIFACT_KEY_FILE": str(path)}
    with pytest.raises(ConfigurationError, match="both set"):
        Settings.from_env(env)


# -- scriptpool key generate -------------------------------------------------------------------


def test_key_generate_prints_a_new_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    """64 hex digits, different each time, accepted as a key."""
    keys = []
    for _ in range(2):
        assert main(["key", "generate"]) == OK
        keys.append(capsys.readouterr().out.strip())
    assert all(re.fullmatch(r"[0-9a-f]{64}", key) for key in keys) and keys[0] != keys[1]
    assert check_artifact_key(keys[0].encode())


def test_key_generate_file_writes_once_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--file`` writes a key readable by its owner alone, and a second run keeps it (so every
    start of a compose stack signs with the same key)."""
    path = tmp_path / "artifact.key"
    assert main(["key", "generate", "--file", str(path)]) == OK
    first = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["key", "generate", "--file", str(path)]) == OK
    assert path.read_bytes() == first
    assert "kept the artifact key" in capsys.readouterr().out
    assert Settings(artifact_key_file=str(path)).require_artifact_key() == first.strip()


def test_key_generate_file_refuses_a_bad_key_already_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A published key in the file is reported in one line and left alone, not replaced."""
    path = tmp_path / "artifact.key"
    path.write_bytes(OLD_COMPOSE_KEY + b"\n")
    line = one_line(capsys, ["key", "generate", "--file", str(path)], USAGE)
    assert "configuration_error" in line and "published" in line and "remove the file" in line
    assert path.read_bytes() == OLD_COMPOSE_KEY + b"\n"


# -- deploys and workers refuse a bad key ---------------------------------------------------------


@pytest.mark.parametrize("key", [b"short-key-0123456789", OLD_COMPOSE_KEY])
def test_deploy_refuses_a_bad_key_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: bytes,
) -> None:
    """``deploy`` with a short or published key: one configuration_error line that says how to
    make a key, exit 2, and no module, artifact or binding written."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", fresh_key().decode())
    assert main(["ep", "define", "test"]) == OK
    capsys.readouterr()
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", key.decode())
    module = tmp_path / "echo.wasm"
    module.write_bytes(guests.ECHO)
    before = set(redis_client.keys())
    line = one_line(capsys, ["deploy", "test", "1", str(module)], USAGE)
    assert line.startswith("scriptpool: configuration_error: SCRIPTPOOL_ARTIFACT_KEY "), line
    assert "scriptpool key generate" in line
    assert set(redis_client.keys()) == before


@pytest.mark.parametrize("key", [b"short-key-0123456789", OLD_COMPOSE_KEY])
def test_workers_refuse_a_bad_key_before_consuming(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, capsys: pytest.CaptureFixture[str], key: bytes
) -> None:
    """``scriptpool worker`` and the plain Celery worker it runs both refuse to start with a
    short or published key: exit 2 and one line naming the variable."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", key.decode())
    line = one_line(capsys, ["worker", "--shards", "0"], USAGE)
    assert "configuration_error: SCRIPTPOOL_ARTIFACT_KEY" in line
    settings = Settings(redis_url=redis_url, artifact_key=key)
    celery = subprocess.run(
        worker_argv(settings, [0], name="badkey@test", loglevel="INFO", events=False),
        env={**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert celery.returncode == USAGE, celery.stderr[-2000:]
    lines = celery.stderr.strip().splitlines()
    assert lines == [lines[0]] and "configuration_error: SCRIPTPOOL_ARTIFACT_KEY" in lines[0], lines


# -- the repository ships no usable key --------------------------------------------------------


def repository_files() -> list[Path]:
    """Every file of the checkout that git tracks or would (untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


# A literal assigned to the key: `SCRIPTPOOL_ARTIFACT_KEY=...` (shell, Dockerfile), `...: value`
# (YAML, a dict), `artifact_key=b"..."` and `ARTIFACT_KEY = "..."` (Python). The key file's
# variable (`SCRIPTPOOL_ARTIFACT_KEY_FILE`) names a path, not a key, and does not match.
# A bytes prefix only before a quote: a bare key may itself begin with "b".
_ASSIGNED = re.compile(
    rb"""(?:ARTIFACT_KEY|artifact_key)["'\]]*\s*[:=]\s*(?:b(?=["']))?["']?([^\s"'$`(),]+)"""
)
_TOKEN = re.compile(rb"[A-Za-z0-9_\-+/.~]{32,}|[^\s\"'`]{32,}")


def published_keys_in(data: bytes) -> list[bytes]:
    """Tokens of ``data`` whose SHA-256 is a denylisted key's."""
    return [t for t in _TOKEN.findall(data) if hashlib.sha256(t).hexdigest() in PUBLISHED_ARTIFACT_KEYS]


def usable_keys_assigned_in(data: bytes) -> list[bytes]:
    """Literals assigned to an artifact key in ``data`` that would be accepted as one."""
    return [value for value in _ASSIGNED.findall(data) if artifact_key_problem(value) is None]


def test_the_scans_find_what_they_look_for() -> None:
    """The old compose line is found by both scans' rules; a generated key assigned in a YAML
    file or in Python is found as usable; a variable or a call is not a literal."""
    key = b"b" + fresh_key()[1:]  # a key that begins like a bytes literal is still seen whole
    old_compose = b"x-env:\n  SCRIPTPOOL_ARTIFACT_KEY: " + OLD_COMPOSE_KEY + b"\n"
    assert published_keys_in(old_compose) == [OLD_COMPOSE_KEY]
    assert usable_keys_assigned_in(b"  SCRIPTPOOL_ARTIFACT_KEY: " + key + b"\n") == [key]
    assert usable_keys_assigned_in(b'Settings(artifact_key=b"' + key + b'")') == [key]
    assert usable_keys_assigned_in(b'env["SCRIPTPOOL_ARTIFACT_KEY"] = "' + key + b'"') == [key]
    assert usable_keys_assigned_in(b"export SCRIPTPOOL_ARTIFACT_KEY=" + key) == [key]
    assert usable_keys_assigned_in(b"SCRIPTPOOL_ARTIFACT_KEY=$(scriptpool key generate)") == []
    assert usable_keys_assigned_in(b"SCRIPTPOOL_ARTIFACT_KEY_FILE: /var/lib/scriptpool/keys/a.key") == []


def test_no_file_of_the_repository_holds_a_usable_or_published_key() -> None:
    """Compose, deploy/, the Dockerfile, .ci/, the README, tests and scripts: no literal that
    would be accepted as a key is assigned to one, and no denylisted key appears at all."""
    found = []
    for path in repository_files():
        data = path.read_bytes()
        if len(data) > 4 * 2**20 or b"\0" in data[:8192]:
            continue  # a binary or generated blob (a lock file, a module), no configuration
        where = path.relative_to(ROOT)
        found += [(str(where), "usable", key) for key in usable_keys_assigned_in(data)]
        found += [(str(where), "published", key) for key in published_keys_in(data)]
    assert found == []


def test_compose_generates_its_key_into_a_volume() -> None:
    """Compose names the key file on a volume that a one-shot ``key generate --file`` fills, and
    every service that needs the key waits for it and mounts it read-only."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    keygen = services["keygen"]
    key_file = keygen["command"][keygen["command"].index("--file") + 1]
    assert keygen["command"][:2] == ["key", "generate"] and keygen["network_mode"] == "none"
    volume = keygen["volumes"][0].split(":")
    assert volume[0] in compose["volumes"] and key_file.startswith(volume[1] + "/")
    users = [
        name
        for name, svc in services.items()
        if "SCRIPTPOOL_ARTIFACT_KEY_FILE" in (svc.get("environment") or {})
    ]
    assert sorted(users) == ["demo", "worker-0", "worker-1"]
    for name in users:
        service = services[name]
        assert service["environment"]["SCRIPTPOOL_ARTIFACT_KEY_FILE"] == key_file
        assert "SCRIPTPOOL_ARTIFACT_KEY" not in service["environment"]
        assert f"{volume[0]}:{volume[1]}:ro" in service["volumes"]
        assert service["depends_on"]["keygen"] == {"condition": "service_completed_successfully"}


def test_install_check_uses_a_generated_key() -> None:
    """The install check takes its key from the installed ``scriptpool key generate``."""
    text = (ROOT / ".ci" / "install-check").read_text()
    assert "SCRIPTPOOL_ARTIFACT_KEY=$(scriptpool key generate)" in text


def test_python_one_liner_in_the_message_makes_a_usable_key() -> None:
    """The one-liner the error message gives, run as printed, makes a key that is accepted."""
    made = subprocess.run(
        [sys.executable, "-c", "import secrets; print(secrets.token_hex(32))"],
        capture_output=True,
        check=True,
    ).stdout.strip()
    assert check_artifact_key(made) == made
