"""The sandbox: wasmtime engines, our WASI subset, and one guest run under hard limits."""

from engine._engine import engine_fingerprint
from engine._run import Sandbox, SandboxRun
from engine._wasi import FIXED_TIME_NS, provided_signatures
from engine._wasi import MODULE as WASI_MODULE

__all__ = [
    "FIXED_TIME_NS",
    "WASI_MODULE",
    "Sandbox",
    "SandboxRun",
    "engine_fingerprint",
    "provided_signatures",
]
