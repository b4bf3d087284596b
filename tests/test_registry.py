"""The deploy stage: validation, content addressing, signed artifacts, atomic bind, rollback."""

from __future__ import annotations

import hashlib
import secrets
import threading

import pytest
import redis

from scriptpool.config import Settings
from scriptpool.config.errors import (
    ForbiddenImport,
    InvalidArgument,
    InvalidModule,
    ModuleTooLarge,
    NothingToRollBack,
    UnknownExtensionPoint,
)
from scriptpool.engine import Sandbox, engine_fingerprint
from scriptpool.registry import Deployment, Registry
from scriptpool.runtime import Executor
from tests import guests
from tests.logs import captured_events


def test_invalid_module_bytes_are_refused(registry: Registry) -> None:
    """Garbage bytes fail deploy with invalid_module, and nothing is bound."""
    with pytest.raises(InvalidModule) as info:
        registry.deploy("test", "s", b"\0asm\x01\0\0\0garbage")
    assert info.value.code == "invalid_module"
    with pytest.raises(InvalidModule):
        registry.deploy("test", "s", b"MZ not wasm at all")
    assert registry.history("test", "s") == []


def test_oversized_module_is_refused(registry: Registry) -> None:
    """A module over 256 kB fails with module_too_large (an invalid_module)."""
    big = guests.wasm(
        f'(module (memory (export "memory") 5) (data (i32.const 0) "{"a" * 300_000}")'
        '(func (export "_start")))'
    )
    with pytest.raises(ModuleTooLarge) as info:
        registry.deploy("test", "s", big)
    assert info.value.code == "module_too_large"
    assert isinstance(info.value, InvalidModule)


@pytest.mark.parametrize(
    "module",
    [guests.FORBIDDEN_ENV_IMPORT, guests.WRONG_SIGNATURE_IMPORT],
    ids=["env-import", "wrong-signature"],
)
def test_forbidden_imports_are_refused(registry: Registry, module: bytes) -> None:
    """Imports outside our WASI subset and installed providers fail with forbidden_import."""
    with pytest.raises(ForbiddenImport) as info:
        registry.deploy("test", "s", module)
    assert info.value.code == "forbidden_import"


def test_missing_entry_export_is_refused(registry: Registry) -> None:
    """Deploying with an export the module lacks fails; a present custom export works."""
    module = guests.wasm('(module (memory (export "memory") 1) (func (export "run")))')
    with pytest.raises(InvalidModule):
        registry.deploy("test", "s", module)
    assert registry.deploy("test", "s", module, export="run").export == "run"


def test_unknown_extension_point_and_bad_names(registry: Registry) -> None:
    """Deploys name a defined EP and a sane shop id."""
    with pytest.raises(UnknownExtensionPoint):
        registry.deploy("nope", "s", guests.ECHO)
    for shop in ("", "a b", "x" * 500, None):
        with pytest.raises(InvalidArgument):
            registry.deploy("test", shop, guests.ECHO)  # type: ignore[arg-type]


def test_module_is_content_addressed_and_artifact_signed(
    registry: Registry, redis_client: redis.Redis, settings: Settings
) -> None:
    """Bytes are stored under their sha256; the artifact under the engine fingerprint."""
    deployment = registry.deploy("test", "s", guests.ECHO)
    sha = hashlib.sha256(guests.ECHO).hexdigest()
    assert deployment.sha256 == sha
    assert redis_client.get(settings.keys.module(sha)) == guests.ECHO
    assert redis_client.exists(settings.keys.artifact(engine_fingerprint(), sha))


def test_rollback_restores_previous_version(registry: Registry, executor: Executor) -> None:
    """deploy v1, deploy v2, rollback: v1 serves again; a further rollback has nothing left."""
    v1 = registry.deploy("test", "s", guests.writes(b'{"v":1}'))
    v2 = registry.deploy("test", "s", guests.writes(b'{"v":2}'))
    assert (v1.version, v2.version) == (1, 2)
    assert executor.execute("test", "s", {}).output == {"v": 2}
    restored = registry.rollback("test", "s")
    assert restored.sha256 == v1.sha256
    executor.invalidate("test", "s")
    assert executor.execute("test", "s", {}).output == {"v": 1}
    with pytest.raises(NothingToRollBack):
        registry.rollback("test", "s")


def test_tampered_artifact_is_never_deserialized(
    registry: Registry,
    redis_client: redis.Redis,
    settings: Settings,
    sandbox: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flipped byte in the stored artifact: no deserialize, a recompile, a security event."""
    deployment = registry.deploy("test", "s", guests.ECHO)
    key = settings.keys.artifact(engine_fingerprint(), deployment.sha256)
    signed = bytearray(redis_client.get(key))  # type: ignore[arg-type]
    signed[-100] ^= 0xFF
    redis_client.set(key, bytes(signed))

    calls: list[bytes] = []
    real = sandbox.deserialize
    monkeypatch.setattr(sandbox, "deserialize", lambda art, stack: calls.append(art) or real(art, stack))
    executor = Executor(registry, sandbox, settings)
    with captured_events() as logs:
        result = executor.execute("test", "s", {"x": 1})
    assert result.output == {"x": 1}
    assert result.report.module_source == "compiled"
    # Only the artifact the bounded compile just made was loaded, never the stored one.
    assert len(calls) == 1 and calls[0] != bytes(signed[32:])
    assert any(e["event"] == "security_artifact_rejected" for e in logs)


def test_after_a_wasmtime_upgrade_the_worker_compiles_from_source(
    redis_client: redis.Redis, settings: Settings, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wasmtime version is part of the engine fingerprint, so artifacts deployed by the
    previous wasmtime are not looked at: the worker compiles the stored bytes (the bounded
    compile), runs them, and serves the next run from its cache."""
    current = engine_fingerprint()
    monkeypatch.setattr("scriptpool.engine._engine.wasmtime_version", lambda: "50.0.1")
    previous = engine_fingerprint()
    old = Registry(redis_client, settings, sandbox)
    old.define_extension_point("upgraded")
    deployment = old.deploy("upgraded", "s", guests.ECHO)
    monkeypatch.undo()
    assert previous != current
    assert redis_client.exists(settings.keys.artifact(previous, deployment.sha256))
    assert not redis_client.exists(settings.keys.artifact(current, deployment.sha256))

    executor = Executor(Registry(redis_client, settings, sandbox), sandbox, settings)
    with captured_events() as logs:
        first = executor.execute("upgraded", "s", {"x": 1})
        second = executor.execute("upgraded", "s", {"x": 2})
    assert (first.output, first.report.module_source) == ({"x": 1}, "compiled")
    assert (second.output, second.report.module_source) == ({"x": 2}, "hot")
    assert [e["sha256"] for e in logs if e["event"] == "module_compiled"] == [deployment.sha256]


def test_artifact_signed_with_a_foreign_key_is_refused(
    registry: Registry, redis_client: redis.Redis, settings: Settings, sandbox: Sandbox
) -> None:
    """An artifact a registry with another key wrote is rejected by this one."""
    foreign = Registry(redis_client, settings.replace(artifact_key=secrets.token_hex(32).encode()), sandbox)
    foreign.deploy("test", "s", guests.ECHO)
    executor = Executor(registry, sandbox, settings)
    with captured_events() as logs:
        result = executor.execute("test", "s", {"y": 2})
    assert result.output == {"y": 2}
    assert result.report.module_source == "compiled"
    assert any(e["event"] == "security_artifact_rejected" for e in logs)


def test_cold_start_deserializes_and_never_compiles(
    registry: Registry, sandbox: Sandbox, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh worker process loads a deployed module from its artifact, without compiling."""
    registry.deploy("test", "s", guests.ECHO)
    monkeypatch.setattr(sandbox, "compile", lambda *a: pytest.fail("compiled on the cold path"))
    result = Executor(registry, sandbox, settings).execute("test", "s", {"z": 3})
    assert result.output == {"z": 3}
    assert result.report.module_source == "deserialized"


def test_readers_never_see_a_partial_deploy(
    registry: Registry, redis_client: redis.Redis, settings: Settings
) -> None:
    """While deploys alternate two modules, every read is a whole binding of one of them."""
    modules = {
        hashlib.sha256(m).hexdigest(): m for m in (guests.writes(b'{"v":1}'), guests.writes(b'{"v":2}'))
    }
    registry.deploy("test", "s", next(iter(modules.values())))
    stop = threading.Event()
    seen: list[Deployment] = []
    errors: list[BaseException] = []

    def reader() -> None:
        client = redis.Redis.from_url(settings.redis_url)
        while not stop.is_set():
            try:
                fields = client.hgetall(settings.keys.binding("test", "s"))  # every app, one read
                deployment = Deployment.from_json(fields[b"default"])
                assert deployment.sha256 in modules
                assert client.exists(settings.keys.module(deployment.sha256))
                seen.append(deployment)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(60):
        registry.deploy("test", "s", list(modules.values())[i % 2])
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert len(seen) > 10
    assert len({d.version for d in seen}) > 5  # the readers really overlapped the deploys
    assert registry.binding("test", "s").version == 61


def test_provider_linked_module_runs(registry: Registry, executor: Executor) -> None:
    """A module importing a whole provider by name is linked to it at instantiation."""
    with pytest.raises(ForbiddenImport):
        registry.deploy("test", "s", guests.provider_user("answers_v1", "answer"))
    registry.add_provider("answers_v1", guests.PROVIDER)
    deployment = registry.deploy("test", "s", guests.provider_user("answers_v1", "answer"))
    assert [name for name, _ in deployment.providers] == ["answers_v1"]
    result = executor.execute("test", "s", {})
    assert result.ok, result.error
    assert result.output == 42


def test_provider_version_is_pinned_at_deploy(
    registry: Registry, sandbox: Sandbox, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs use the provider hash recorded at deploy: no provider lookup on the execution path."""
    registry.add_provider("answers_v1", guests.PROVIDER)
    registry.deploy("test", "s", guests.provider_user("answers_v1", "answer"))
    monkeypatch.setattr(registry, "provider", lambda name: pytest.fail("provider looked up at run time"))
    result = Executor(registry, sandbox, settings).execute("test", "s", {})
    assert result.output == 42


def test_provider_that_traps_is_a_runtime_error(registry: Registry, executor: Executor) -> None:
    """A trap inside the provider surfaces as runtime_error with its trap code."""
    registry.add_provider("answers_v1", guests.PROVIDER)
    registry.deploy("test", "s", guests.provider_user("answers_v1", "boom"))
    result = executor.execute("test", "s", {})
    assert result.error is not None and result.error.code == "runtime_error"
    assert result.error.detail["trap_code"] == "unreachable"


def test_provider_must_export_what_is_imported(registry: Registry) -> None:
    """Importing a name the provider lacks is a forbidden import."""
    registry.add_provider("answers_v1", guests.PROVIDER)
    with pytest.raises(ForbiddenImport):
        registry.deploy("test", "s", guests.provider_user("answers_v1", "missing"))
