"""The sandbox: wasmtime engines, our WASI subset, and one guest run under hard limits."""

from scriptpool.engine._abi import (
    CODEC_JSON,
    CODEC_MSGPACK,
    GUEST_MEMORY_MODULE,
    GUEST_MEMORY_NAME,
    codec_for,
    is_memory_io_provider,
    needs_glue,
)
from scriptpool.engine._engine import compile_engine, engine_fingerprint, engine_stack_bytes
from scriptpool.engine._link import Resolution, check_memory_io_provider, resolve
from scriptpool.engine._profile import GuestProfiler, interval_for
from scriptpool.engine._run import Sandbox, SandboxRun
from scriptpool.engine._wasi import FIXED_TIME_NS, provided_signatures
from scriptpool.engine._wasi import MODULE as WASI_MODULE

__all__ = [
    "CODEC_JSON",
    "CODEC_MSGPACK",
    "FIXED_TIME_NS",
    "GUEST_MEMORY_MODULE",
    "GUEST_MEMORY_NAME",
    "WASI_MODULE",
    "GuestProfiler",
    "Resolution",
    "Sandbox",
    "SandboxRun",
    "check_memory_io_provider",
    "codec_for",
    "compile_engine",
    "engine_fingerprint",
    "engine_stack_bytes",
    "interval_for",
    "is_memory_io_provider",
    "needs_glue",
    "provided_signatures",
    "resolve",
]
