"""The in-process engine: look up, load (hot, deserialized or compiled), run, decode, report."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonschema
import wasmtime

from config import (
    ErrorInfo,
    Execution,
    ExecutionReport,
    ExtensionPoint,
    Limits,
    Settings,
    check_ep,
    check_input_size,
    check_shop_id,
    encode_input,
)
from config.errors import ExecutionError, InvalidInput, InvalidOutput, ScriptpoolError
from engine import CODEC_MSGPACK, Sandbox, SandboxRun
from registry import compile_validator
from workers._cache import ByteLRU, CacheStats
from workers._codec import from_msgpack, json_value, to_msgpack

if TYPE_CHECKING:
    from registry import Deployment, Registry


@dataclass(frozen=True, slots=True)
class _EpRuntime:
    """An extension point prepared for the hot path: limits merged, schemas compiled once."""

    limits: Limits
    input_validator: Any
    output_validator: Any
    input_validation_rate: float


@dataclass(frozen=True, slots=True)
class _Loaded:
    deployment: Deployment
    ep: _EpRuntime
    module: wasmtime.Module
    providers: dict[str, wasmtime.Module]
    source: str


class Executor:
    """Runs deployed scripts in this process. Thread-safe; keep one per process.

    Hot state: compiled modules in a byte-bounded LRU, bindings and extension points in dicts
    that :meth:`invalidate` clears (and that expire after ``binding_cache_ttl_s`` as a backstop).
    """

    def __init__(
        self,
        registry: Registry,
        sandbox: Sandbox,
        settings: Settings,
        *,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self._registry = registry
        self._sandbox = sandbox
        self._settings = settings
        self._sample = sample
        self._modules: ByteLRU[wasmtime.Module] = ByteLRU(settings.module_cache_bytes)
        self._bindings: dict[tuple[str, str], tuple[Deployment, float]] = {}
        self._eps = registry.extension_point_reader(self._prepare_ep)
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------------------------
    def execute(self, ep: str, shop_id: str | int, payload: Any) -> Execution:
        """Run the script bound to (``ep``, ``shop_id``) on ``payload`` (JSON value or bytes)."""
        started = time.perf_counter()
        loaded: _Loaded | None = None
        lookup_ms: float | None = None
        input_bytes = 0
        run: SandboxRun | None = None
        decode_ms = 0.0
        try:
            loaded = self._lookup(check_ep(ep), check_shop_id(shop_id))
            lookup_ms = _ms(time.perf_counter() - started)
            stdin = self._prepare_input(payload, loaded.ep, loaded.deployment.codec)
            input_bytes = len(stdin)
            run = self._sandbox.run(
                loaded.module,
                stdin,
                loaded.ep.limits,
                export=loaded.deployment.export,
                providers=loaded.providers,
            )
            if run.error is not None:
                raise run.error
            decode_started = time.perf_counter()
            try:
                output = _decode_output(run.stdout, loaded.ep.output_validator, loaded.deployment.codec)
            finally:
                decode_ms = _ms(time.perf_counter() - decode_started)
        except ScriptpoolError as exc:
            if lookup_ms is None:
                lookup_ms = _ms(time.perf_counter() - started)
            report = _report(loaded, lookup_ms, input_bytes, run, decode_ms)
            return Execution(False, None, ErrorInfo.from_exception(exc), report)
        return Execution(True, output, None, _report(loaded, lookup_ms, input_bytes, run, decode_ms))

    def invalidate(self, ep: str | None = None, shop_id: str | None = None) -> None:
        """Forget cached bindings (of one pair, one EP, or all) and EP definitions."""
        with self._lock:
            if ep is None:
                self._bindings.clear()
                self._eps.invalidate()
            elif shop_id is None:
                self._eps.invalidate(ep)
                for key in [k for k in self._bindings if k[0] == ep]:
                    del self._bindings[key]
            else:
                self._bindings.pop((ep, shop_id), None)

    def cache_stats(self) -> CacheStats:
        """Counters of the compiled-module cache."""
        return self._modules.stats()

    # -- lookup --------------------------------------------------------------------------------
    def _lookup(self, ep_name: str, shop_id: str) -> _Loaded:
        now = time.monotonic()
        ep = self._eps.get(ep_name)
        cached = self._bindings.get((ep_name, shop_id))
        if cached is not None and cached[1] > now:
            deployment = cached[0]
        else:
            deployment = self._registry.binding(ep_name, shop_id)
            with self._lock:
                self._bindings[(ep_name, shop_id)] = (deployment, now + self._settings.binding_cache_ttl_s)
        module, source = self._module(deployment.sha256, ep.limits.stack_bytes)
        # Provider versions are pinned in the deployment, so the hot path never asks Redis.
        providers = {name: self._module(sha, ep.limits.stack_bytes)[0] for name, sha in deployment.providers}
        return _Loaded(deployment, ep, module, providers, source)

    def _prepare_ep(self, ep: ExtensionPoint) -> _EpRuntime:
        rate = ep.input_validation_rate
        return _EpRuntime(
            limits=ep.limits(self._settings.limits),
            input_validator=compile_validator(ep.input_schema),
            output_validator=compile_validator(ep.output_schema),
            input_validation_rate=self._settings.input_validation_rate if rate is None else rate,
        )

    def _module(self, sha256: str, stack_bytes: int) -> tuple[wasmtime.Module, str]:
        key = (sha256, stack_bytes)
        module = self._modules.get(key)
        if module is not None:
            return module, "hot"
        module, source, size = self._registry.load_module(sha256, stack_bytes)
        self._modules.put(key, module, size)
        return module, source

    # -- input and output ----------------------------------------------------------------------
    def _prepare_input(self, payload: Any, ep: _EpRuntime, codec: str) -> bytes:
        value: Any = _UNSET
        if codec == CODEC_MSGPACK:
            value = json_value(payload)
            stdin = to_msgpack(value)
        else:
            stdin = encode_input(payload)
        check_input_size(stdin, ep.limits)
        # Validation only sharpens error messages for script authors, so it is sampled.
        if ep.input_validator is not None and self._sample() < ep.input_validation_rate:
            if value is _UNSET:
                value = payload if not isinstance(payload, (bytes, bytearray, memoryview)) else _loads(stdin)
            _validate(ep.input_validator, value, InvalidInput, "input")
        return stdin


_UNSET = object()


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise InvalidInput(f"input is not JSON: {exc}") from None


def _decode_output(stdout: bytes, validator: Any, codec: str) -> Any:
    if codec == CODEC_MSGPACK:
        output = from_msgpack(stdout)
    else:
        try:
            text = stdout.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidOutput(f"output is not UTF-8: {exc.reason} at byte {exc.start}") from None
        try:
            output = json.loads(text)
        except ValueError as exc:
            raise InvalidOutput(f"output is not JSON: {exc}") from None
    if validator is not None:
        _validate(validator, output, InvalidOutput, "output")
    return output


def _validate(validator: Any, value: Any, error: type[ExecutionError], what: str) -> None:
    failure = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if failure is not None:
        path = "/".join(str(p) for p in failure.absolute_path) or "(root)"
        raise error(f"{what} fails its schema at {path}: {failure.message}", path=path)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


def _report(
    loaded: _Loaded | None, lookup_ms: float, input_bytes: int, run: SandboxRun | None, decode_ms: float
) -> ExecutionReport:
    """The report of whatever stages ran; the fields of stages that did not run keep defaults."""
    if loaded is None:
        return ExecutionReport(lookup_ms=lookup_ms)
    deployment = loaded.deployment
    if run is None:
        return ExecutionReport(
            input_bytes=input_bytes,
            lookup_ms=lookup_ms,
            module_source=loaded.source,
            sha256=deployment.sha256,
            version=deployment.version,
            codec=deployment.codec,
        )
    return ExecutionReport(
        instructions=run.instructions,
        peak_memory_bytes=run.peak_memory_bytes,
        input_bytes=input_bytes,
        output_bytes=len(run.stdout),
        logs=run.logs,
        lookup_ms=lookup_ms,
        instantiate_ms=_ms(run.instantiate_s),
        run_ms=_ms(run.run_s),
        decode_ms=decode_ms,
        module_source=loaded.source,
        sha256=deployment.sha256,
        version=deployment.version,
        codec=deployment.codec,
    )
