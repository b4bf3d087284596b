"""The module store: a module's bytes under their content address beside its signed AOT
artifact for this engine, and loading a stored module to run (deserializing the verified artifact,
or compiling the bytes as a deploy does, remembering for a while what a compile refused).

A mixin of :class:`Registry` (``registry/_registry.py``), which holds the Redis client, settings,
keys and sandbox it uses.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import cast

import redis
import wasmtime

from scriptpool.config import Keys, Settings, get_logger
from scriptpool.config.errors import ArtifactRejected, InvalidModule, ModuleTooLarge, ScriptNotFound
from scriptpool.engine import Sandbox
from scriptpool.registry import _artifact
from scriptpool.registry._bounded_compile import compile_bounded
from scriptpool.registry._rewrite import linkable
from scriptpool.registry._structure_reader import read_structure

log = get_logger("registry")

# A module a worker failed to compile (over a cap or a bound, or invalid) is not tried again for
# this long: each job that names it gets the same error at once instead of another compile.
# Not forever: a compile that ran out of time on a loaded machine gets another chance.
REFUSED_TTL_S = 60.0
_REFUSED_ENTRIES = 256


class ModuleStore:
    """The module store methods of :class:`Registry`."""

    _redis: redis.Redis
    _settings: Settings
    _keys: Keys
    _sandbox: Sandbox
    _fingerprint: str
    # (sha256, stack bytes) -> (the error its compile gave, when to try again)
    _refused: OrderedDict[tuple[str, int], tuple[InvalidModule, float]]
    _refused_lock: threading.Lock

    @property
    def fingerprint(self) -> str:
        """The engine fingerprint artifacts are compiled for."""
        return self._fingerprint

    def module_size(self, sha256: str) -> int:
        """Size in bytes of a stored module (0 if it is missing)."""
        return int(self._redis.strlen(self._keys.module(sha256)))

    def has_module(self, sha256: str) -> bool:
        """Whether the registry stores the module with this content address."""
        return bool(self._redis.exists(self._keys.module(sha256)))

    def remove_module(self, sha256: str) -> None:
        """Delete a module's bytes and its artifact for this engine. Only for a module nothing
        binds: a binding that still names it would fall back to ``script_not_found``."""
        self._redis.delete(self._keys.module(sha256), self._keys.artifact(self._fingerprint, sha256))

    def module_bytes(self, sha256: str) -> bytes:
        """Source bytes of a module, checked against their content address."""
        raw = cast("bytes | None", self._redis.get(self._keys.module(sha256)))
        if raw is None:
            raise ScriptNotFound(f"module {sha256} is missing from the registry", sha256=sha256)
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise ArtifactRejected(f"stored bytes of module {sha256} do not match their hash", sha256=sha256)
        return bytes(raw)

    def verified_artifact(self, sha256: str) -> bytes | None:
        """The AOT artifact of a module for our engine, or None if missing.

        Raises :class:`ArtifactRejected` if it is present but its signature does not verify.
        """
        signed = cast("bytes | None", self._redis.get(self._keys.artifact(self._fingerprint, sha256)))
        if signed is None:
            return None
        key = self._settings.require_artifact_key()
        return _artifact.verify(key, self._fingerprint, sha256, signed)

    def _store_module(self, wasm: bytes, artifact: bytes) -> str:
        sha = hashlib.sha256(wasm).hexdigest()
        key = self._settings.require_artifact_key()
        signed = _artifact.sign(key, self._fingerprint, sha, artifact)
        # Bytes and artifact land before any binding names them, so a reader that sees a new
        # binding always finds both; an interrupted deploy leaves only unreferenced blobs.
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.module(sha), wasm)
            pipe.set(self._keys.artifact(self._fingerprint, sha), signed)
            pipe.execute()
        return sha

    def load_module(
        self, sha256: str, stack_bytes: int, *, max_bytes: int | None = None
    ) -> tuple[wasmtime.Module, str, int]:
        """Load a module for running: deserialize its verified artifact, compiling only when the
        artifact is missing or rejected (see :meth:`compile_module`).

        Returns the module, ``"deserialized"`` or ``"compiled"``, and its artifact size, which
        approximates the code and metadata the module pins in memory.
        """
        try:
            artifact = self.verified_artifact(sha256)
        except ArtifactRejected:
            log.error("security_artifact_rejected", sha256=sha256, fingerprint=self._fingerprint)
            artifact = None
        if artifact is not None:
            return self._sandbox.deserialize(artifact, stack_bytes), "deserialized", len(artifact)
        module, size = self._compile_stored(sha256, stack_bytes, max_bytes)
        return module, "compiled", size

    def compile_module(
        self, sha256: str, stack_bytes: int, *, max_bytes: int | None = None
    ) -> wasmtime.Module:
        """Compile a stored module from its hash-checked bytes, with the deploy's rewrite, so it
        is the module its artifact was compiled from (no artifact key needed: a replay uses it).

        As a deploy compiles: a module larger than ``max_bytes`` (by default the provider size
        limit, the largest anything is installed at) is :class:`ModuleTooLarge` before it is
        read, then the structural caps and the bounded compile apply; what they refuse is
        refused again at once for :data:`REFUSED_TTL_S`.
        """
        return self._compile_stored(sha256, stack_bytes, max_bytes)[0]

    def _compile_stored(
        self, sha256: str, stack_bytes: int, max_bytes: int | None
    ) -> tuple[wasmtime.Module, int]:
        key = (sha256, stack_bytes)
        with self._refused_lock:
            refused = self._refused.get(key)
        if refused is not None and refused[1] > time.monotonic():
            error = refused[0]
            raise type(error)(error.message, **error.detail, repeated=True)
        limit = max_bytes if max_bytes is not None else self._settings.provider_max_bytes
        size = self.module_size(sha256)
        if size > limit:  # asked before the bytes are fetched: a planted giant costs nothing
            raise ModuleTooLarge(
                f"module {sha256} is {size} bytes; the limit is {limit}",
                size=size,
                limit=limit,
                sha256=sha256,
            )
        wasm = linkable(self.module_bytes(sha256))
        started = time.monotonic()
        try:
            read_structure(wasm)
            compiled = compile_bounded(wasm, stack_bytes)
        except InvalidModule as exc:
            exc.detail.setdefault("sha256", sha256)
            log.warning(
                "module_refused_on_compile", sha256=sha256, code=exc.code, error=exc.message,
                seconds=round(time.monotonic() - started, 3),
            )  # fmt: skip
            with self._refused_lock:
                self._refused[key] = (exc, time.monotonic() + REFUSED_TTL_S)
                self._refused.move_to_end(key)
                while len(self._refused) > _REFUSED_ENTRIES:
                    self._refused.popitem(last=False)
            raise
        log.info(
            "module_compiled", sha256=sha256, bytes=len(wasm), seconds=round(compiled.seconds, 3),
            peak_rss_bytes=compiled.peak_rss_bytes,
        )  # fmt: skip
        # Fresh from our own compile child, as at deploy (registry/_compile.py).
        return self._sandbox.deserialize(compiled.artifact, stack_bytes), len(compiled.artifact)
