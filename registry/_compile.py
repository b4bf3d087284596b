"""The one path from module bytes to a runnable, checked module: what a deploy does before it
stores anything, and what a local run (``scriptpool run --local``) and a replay against a fixed
module (``replay --module``) do without a registry. One path, so a module that runs locally
runs the same in the pool."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import wasmtime

from config import Limits, check_provider
from engine import Resolution, Sandbox, check_memory_io_provider, codec_for
from registry._rewrite import linkable
from registry._validate import check_entry, check_imports, check_memory_export, check_size

# The providers a module may link: import-module name -> (compiled provider, its sha256).
Providers = Mapping[str, tuple[wasmtime.Module, str]]


@dataclass(frozen=True, slots=True)
class CompiledScript:
    """A module checked as a deploy checks it, compiled for running."""

    module: wasmtime.Module
    sha256: str
    codec: str
    export: str
    # The providers it links, pinned as a deployment pins them: (name, sha256), and compiled.
    providers: tuple[tuple[str, str], ...]
    provider_modules: dict[str, wasmtime.Module]
    resolution: Resolution


def compile_script(
    sandbox: Sandbox,
    wasm: bytes,
    limits: Limits,
    export: str,
    providers: Callable[[wasmtime.Module], Providers],
) -> CompiledScript:
    """Check and compile ``wasm`` as a script: its size, imports (against the providers that
    ``providers(module)`` offers for its imports), its ABI's linking rules, its entry export and
    memory. An untrampolined Wasm API module gets the deploy's one rewrite first."""
    check_size(wasm, limits.module_bytes)
    module = sandbox.compile(wasm, limits.stack_bytes)
    codec = codec_for([imp.module for imp in module.imports])
    linked = linkable(wasm)  # an untrampolined Wasm API module imports its memory instead
    if linked is not wasm:
        module = sandbox.compile(linked, limits.stack_bytes)
    installed = providers(module)
    resolution = check_imports(module, {n: m for n, (m, _) in installed.items()})
    if resolution.memory_io is not None:  # installed before memory I/O was checked, maybe
        check_memory_io_provider(resolution.memory_io, installed[resolution.memory_io][0])
    used = tuple((name, installed[name][1]) for name in resolution.providers)
    check_entry(module, export)
    check_memory_export(module)
    return CompiledScript(
        module=module,
        sha256=hashlib.sha256(wasm).hexdigest(),
        codec=codec,
        export=export,
        providers=used,
        provider_modules={name: installed[name][0] for name in resolution.providers},
        resolution=resolution,
    )


def compile_provider(
    sandbox: Sandbox, name: str, wasm: bytes, max_bytes: int, stack_bytes: int
) -> wasmtime.Module:
    """Check and compile a provider module as installing it does: its name, size, imports (our
    WASI subset only) and memory, and a memory-I/O provider's exports."""
    check_provider(name)
    check_size(wasm, max_bytes, "provider")
    module = sandbox.compile(wasm, stack_bytes)
    check_imports(module, {})  # providers import only our WASI subset
    check_memory_export(module)
    check_memory_io_provider(name, module)  # ... and memory-I/O providers nothing at all
    return module
