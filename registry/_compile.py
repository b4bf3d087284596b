"""The one path from module bytes to a runnable, checked module: what a deploy does before it
stores anything, and what a local run (``scriptpool run --local``) and a replay against a fixed
module (``replay --module``) do without a registry. One path, so a module that runs locally
runs the same in the pool.

Everything that can be checked without compiling is checked first, on the module's structure
(``registry/_structure.py``): its size and caps, its imports against our WASI subset and the
installed providers, its entry export and memory. Only then does it compile, in a child process
bounded in time and memory (``registry/_bounded_compile.py``); the checks run once more on what
wasmtime compiled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import wasmtime

from scriptpool.config import Limits, check_provider
from scriptpool.engine import Resolution, Sandbox, check_memory_io_provider, codec_for
from scriptpool.registry._bounded_compile import compile_bounded
from scriptpool.registry._rewrite import linkable
from scriptpool.registry._structure import Structure
from scriptpool.registry._structure_reader import read_structure
from scriptpool.registry._validate import (
    ModuleShape,
    check_entry,
    check_imports,
    check_memory_export,
    check_provider_shape,
    check_size,
)

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
    artifact: bytes  # the serialized module, as the bounded compile made it
    structure: Structure


def compile_script(
    sandbox: Sandbox,
    wasm: bytes,
    limits: Limits,
    export: str,
    providers: Callable[[ModuleShape], Providers],
) -> CompiledScript:
    """Check and compile ``wasm`` as a script: its size, structure, imports (against the
    providers that ``providers(module)`` offers for its imports), its ABI's linking rules, its
    entry export and memory, all before compiling it. An untrampolined Wasm API module gets the
    deploy's one rewrite first."""
    check_size(wasm, limits.module_bytes)
    structure = read_structure(wasm)  # malformed or over a cap: nothing more is done
    linked = linkable(wasm)  # an untrampolined Wasm API module imports its memory instead
    if linked is not wasm:
        structure = read_structure(linked)
    codec = codec_for([imp.module for imp in structure.imports])
    installed = providers(structure)
    available = {n: m for n, (m, _) in installed.items()}
    resolution = _check_script(structure, available, installed, export)
    compiled = compile_bounded(linked, limits.stack_bytes)
    # Made from these bytes by our own compile child and read from its pipe, never stored: the
    # one artifact deserialize takes without a signature.
    module = sandbox.deserialize(compiled.artifact, limits.stack_bytes)
    # Once more on what wasmtime compiled: the reader and the compiler must agree.
    resolution = _check_script(module, available, installed, export)
    return CompiledScript(
        module=module,
        sha256=hashlib.sha256(wasm).hexdigest(),
        codec=codec,
        export=export,
        providers=tuple((name, installed[name][1]) for name in resolution.providers),
        provider_modules={name: installed[name][0] for name in resolution.providers},
        resolution=resolution,
        artifact=compiled.artifact,
        structure=structure,
    )


def _check_script(
    module: ModuleShape, available: Mapping[str, wasmtime.Module], installed: Providers, export: str
) -> Resolution:
    resolution = check_imports(module, available)
    if resolution.memory_io is not None:  # installed before memory I/O was checked, maybe
        check_memory_io_provider(resolution.memory_io, installed[resolution.memory_io][0])
    check_entry(module, export)
    check_memory_export(module)
    return resolution


@dataclass(frozen=True, slots=True)
class CompiledProvider:
    """A provider module checked as installing it checks it, compiled for running."""

    module: wasmtime.Module
    artifact: bytes
    structure: Structure


def compile_provider(
    sandbox: Sandbox, name: str, wasm: bytes, max_bytes: int, stack_bytes: int
) -> wasmtime.Module:
    """Check and compile a provider module as installing it does: its name, size, structure,
    imports (our WASI subset only) and memory, and a memory-I/O provider's exports."""
    return check_and_compile_provider(sandbox, name, wasm, max_bytes, stack_bytes).module


def check_and_compile_provider(
    sandbox: Sandbox, name: str, wasm: bytes, max_bytes: int, stack_bytes: int
) -> CompiledProvider:
    """:func:`compile_provider`, with the artifact the bounded compile made."""
    check_provider(name)
    check_size(wasm, max_bytes, "provider")
    structure = read_structure(wasm)
    _check_provider(name, structure)
    compiled = compile_bounded(wasm, stack_bytes)
    module = sandbox.deserialize(compiled.artifact, stack_bytes)
    _check_provider(name, module)
    return CompiledProvider(module, compiled.artifact, structure)


def _check_provider(name: str, module: ModuleShape) -> None:
    check_imports(module, {})  # providers import only our WASI subset
    check_memory_export(module)
    check_provider_shape(name, module)  # ... and memory-I/O providers nothing at all
