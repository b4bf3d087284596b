"""The sandbox: wasmtime engines, our WASI subset, and one guest run under hard limits."""

from workers.sandbox._engine import engine_fingerprint
from workers.sandbox._run import Sandbox, SandboxRun
from workers.sandbox._wasi import FIXED_TIME_NS, MODULE as WASI_MODULE, provided_signatures

__all__ = ["FIXED_TIME_NS", "Sandbox", "SandboxRun", "WASI_MODULE", "engine_fingerprint", "provided_signatures"]
