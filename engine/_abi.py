"""The Shopify Functions ABIs: which codec and which I/O a module speaks, read from its imports,
and the glue that links an untrampolined Wasm API module to its provider.

The facts follow Shopify's function-runner (``src/engine.rs``, ``src/io.rs``,
``src/validated_module.rs``) and shopify-function-wasm-api (``trampoline/``):

- **Codec.** A module whose imports name ``shopify_function_vN`` (any N), or
  ``shopify_functions_javy_vN`` with N >= 2, reads and writes MessagePack; every other module JSON.
- **Memory-I/O providers** are ``shopify_function_vN`` with N >= 2 and ``shopify_functions_javy_vN``
  with N >= 3. They import nothing and export ``memory``, ``initialize(len) -> ptr`` and
  ``finalize() -> ptr``; the host writes the input into the provider's memory and reads the output
  and logs from it. Every other provider is linked as it is and the module talks WASI.
- **The Wasm API.** A module built with the Wasm API crates imports ``shopify_function_*`` functions
  from ``shopify_function_vN``. Shopify's build renames the numeric ones to the provider's
  ``_shopify_function_*`` exports and replaces the ones taking a string (ptr, len) in the module's
  memory with glue that copies between the module's memory and the provider's. We link such a
  module ourselves: numeric functions straight to the provider's exports, string functions to a
  small generated glue module (:func:`glue_wat`) that does the same copies, with results checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CODEC_JSON = "json"
CODEC_MSGPACK = "msgpack"

# The rewritten memory import of an untrampolined Wasm API module (see registry's rewrite): not a
# valid provider name, so it never collides with one.
GUEST_MEMORY_MODULE = "scriptpool:guest"
GUEST_MEMORY_NAME = "memory"
# The glue module's export of the guest memory (beside the provider's exports, under its name:
# no provider exports a name with a colon).
GLUE_MEMORY_EXPORT = "scriptpool:guest-memory"

_VERSIONED = re.compile(r"(shopify_function_v|shopify_functions_javy_v)(\d+)")


def _version(name: str, prefix: str) -> int | None:
    """N when ``name`` is ``prefix`` followed by a plain decimal version, else None."""
    match = _VERSIONED.fullmatch(name)
    if match is None or match.group(1) != prefix:
        return None
    return int(match.group(2))


def codec_for(import_modules: list[str]) -> str:
    """The codec a module with these import-module names speaks."""
    for name in import_modules:
        if name.startswith("shopify_function_v"):
            return CODEC_MSGPACK
        javy = _version(name, "shopify_functions_javy_v")
        if javy is not None and javy >= 2:
            return CODEC_MSGPACK
    return CODEC_JSON


def is_memory_io_provider(name: str) -> bool:
    """Whether the provider of this import-module name speaks memory I/O (initialize/finalize)."""
    api = _version(name, "shopify_function_v")
    if api is not None:
        return api >= 2
    javy = _version(name, "shopify_functions_javy_v")
    return javy is not None and javy >= 3


def wasm_api_version(name: str) -> int | None:
    """The Wasm API version of a ``shopify_function_vN`` import-module name (None for others,
    and for ``shopify_function_v0.0.1``, whose context-based API we do not link ourselves)."""
    return _version(name, "shopify_function_v")


# -- the Wasm API a guest imports ------------------------------------------------------------------
#
# (params, results) in Wasm value types. These are the no-context signatures: v2, and the v1 that
# Shopify's trampoline 1.x links. The context-based v0.0.1 API (every call taking a context first)
# is not linked by us; its modules must be trampolined.

Signature = tuple[tuple[str, ...], tuple[str, ...]]

# Functions that take and return only numbers: linked straight to the provider's ``_``-prefixed
# export, with nothing in between (the type is checked against that export's, so these
# signatures document v2; v1's context_new and output_finalize have no v2 counterpart).
API_NUMERIC: dict[str, Signature] = {
    "shopify_function_context_new": ((), ("i32",)),  # v1 only
    "shopify_function_output_finalize": ((), ("i32",)),  # v1 only
    "shopify_function_input_get": ((), ("i64",)),
    "shopify_function_input_get_val_len": (("i64",), ("i32",)),
    "shopify_function_input_get_at_index": (("i64", "i32"), ("i64",)),
    "shopify_function_input_get_interned_obj_prop": (("i64", "i32"), ("i64",)),
    "shopify_function_input_get_obj_key_at_index": (("i64", "i32"), ("i64",)),
    "shopify_function_output_new_bool": (("i32",), ("i32",)),
    "shopify_function_output_new_null": ((), ("i32",)),
    "shopify_function_output_new_i32": (("i32",), ("i32",)),
    "shopify_function_output_new_f64": (("f64",), ("i32",)),
    "shopify_function_output_new_interned_utf8_str": (("i32",), ("i32",)),
    "shopify_function_output_new_object": (("i32",), ("i32",)),
    "shopify_function_output_finish_object": ((), ("i32",)),
    "shopify_function_output_new_array": (("i32",), ("i32",)),
    "shopify_function_output_finish_array": ((), ("i32",)),
}

# Functions that take a string (ptr, len) in the guest's memory: each is an export of the glue
# module, which copies across the two memories around the provider's function(s) named here.
API_STRING: dict[str, Signature] = {
    "shopify_function_input_read_utf8_str": (("i32", "i32", "i32"), ()),
    "shopify_function_input_get_obj_prop": (("i64", "i32", "i32"), ("i64",)),
    "shopify_function_output_new_utf8_str": (("i32", "i32"), ("i32",)),
    "shopify_function_intern_utf8_str": (("i32", "i32"), ("i32",)),
    "shopify_function_log_new_utf8_str": (("i32", "i32"), ()),
}

# What the provider exports for the glue: name -> signature.
PROVIDER_RAW: dict[str, Signature] = {
    "_shopify_function_alloc": (("i32",), ("i32",)),  # v2: size -> ptr (align 1)
    "shopify_function_realloc": (("i32", "i32", "i32", "i32"), ("i32",)),  # v1: (0, 0, 1, size)
    "_shopify_function_input_get_utf8_str_addr": (("i32",), ("i32",)),
    "_shopify_function_input_get_obj_prop": (("i64", "i32", "i32"), ("i64",)),
    "_shopify_function_output_new_utf8_str": (("i32",), ("i64",)),  # (status << 32) | ptr
    "_shopify_function_intern_utf8_str": (("i32",), ("i64",)),  # (id << 32) | ptr
    "_shopify_function_log_new_utf8_str": (("i32",), ("i32",)),  # -> [src_off, p1, l1, p2, l2]
}


def needs_glue(module: str, name: str) -> bool:
    """Whether the import ``module.name`` is a string function of the Wasm API, which we link
    through the glue module (so the guest's memory must become an import)."""
    version = wasm_api_version(module)
    return version is not None and version >= 1 and name in API_STRING


def allocator(version: int) -> str:
    """The provider export the glue allocates with: v1's realloc, v2's alloc."""
    return "shopify_function_realloc" if version == 1 else "_shopify_function_alloc"


def glue_needs(function: str, version: int) -> tuple[str, ...]:
    """The provider exports the glue of ``function`` calls (besides the provider's memory)."""
    return {
        "shopify_function_input_read_utf8_str": ("_shopify_function_input_get_utf8_str_addr",),
        "shopify_function_input_get_obj_prop": (allocator(version), "_shopify_function_input_get_obj_prop"),
        "shopify_function_output_new_utf8_str": ("_shopify_function_output_new_utf8_str",),
        "shopify_function_intern_utf8_str": ("_shopify_function_intern_utf8_str",),
        "shopify_function_log_new_utf8_str": ("_shopify_function_log_new_utf8_str",),
    }[function]


# NaN-boxed read error (tag 15) with code 3, ReadError: what get_obj_prop answers when the
# provider could not give it room for the key.
_READ_ERROR = 0x7FFFC00000000000 | 3

# The glue of each string function, in the guest-facing signature. memory 0 is the provider's, 1
# the guest's (`memory.copy dst src`). Unlike the trampoline's glue, a failed write copies nothing
# (the trampoline copies `len` bytes to provider address 0), and a zero address is never used.
_GLUE = {
    "shopify_function_input_read_utf8_str": """
  (func (export "shopify_function_input_read_utf8_str") (param $src i32) (param $out i32) (param $len i32)
    (local $addr i32)
    (local.set $addr (call $_shopify_function_input_get_utf8_str_addr (local.get $src)))
    (if (local.get $addr)
      (then (memory.copy $guest $provider (local.get $out) (local.get $addr) (local.get $len)))))""",
    "shopify_function_input_get_obj_prop": """
  (func (export "shopify_function_input_get_obj_prop")
    (param $scope i64) (param $ptr i32) (param $len i32) (result i64)
    (local $dst i32)
    (local.set $dst ALLOC)
    (if (i32.eqz (local.get $dst)) (then (return (i64.const READ_ERROR))))
    (memory.copy $provider $guest (local.get $dst) (local.get $ptr) (local.get $len))
    (call $_shopify_function_input_get_obj_prop (local.get $scope) (local.get $dst) (local.get $len)))""",
    "shopify_function_output_new_utf8_str": """
  (func (export "shopify_function_output_new_utf8_str") (param $ptr i32) (param $len i32) (result i32)
    (local $r i64) (local $status i32)
    (local.set $r (call $_shopify_function_output_new_utf8_str (local.get $len)))
    (local.set $status (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 32))))
    (if (i32.eqz (local.get $status))
      (then (memory.copy $provider $guest
              (i32.wrap_i64 (local.get $r)) (local.get $ptr) (local.get $len))))
    (local.get $status))""",
    "shopify_function_intern_utf8_str": """
  (func (export "shopify_function_intern_utf8_str") (param $ptr i32) (param $len i32) (result i32)
    (local $r i64)
    (local.set $r (call $_shopify_function_intern_utf8_str (local.get $len)))
    (if (i32.wrap_i64 (local.get $r))
      (then (memory.copy $provider $guest
              (i32.wrap_i64 (local.get $r)) (local.get $ptr) (local.get $len))))
    (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 32))))""",
    # The provider keeps the tail of a long message in a ring: [src_off, p1, l1, p2, l2].
    "shopify_function_log_new_utf8_str": """
  (func (export "shopify_function_log_new_utf8_str") (param $ptr i32) (param $len i32)
    (local $ra i32) (local $l1 i32) (local $l2 i32)
    (local.set $ra (call $_shopify_function_log_new_utf8_str (local.get $len)))
    (local.set $ptr (i32.add (local.get $ptr) (i32.load $provider (local.get $ra))))
    (local.set $l1 (i32.load $provider offset=8 (local.get $ra)))
    (local.set $l2 (i32.load $provider offset=16 (local.get $ra)))
    (if (local.get $l1)
      (then (memory.copy $provider $guest
              (i32.load $provider offset=4 (local.get $ra)) (local.get $ptr) (local.get $l1))))
    (if (local.get $l2)
      (then (memory.copy $provider $guest
              (i32.load $provider offset=12 (local.get $ra))
              (i32.add (local.get $ptr) (local.get $l1)) (local.get $l2)))))""",
}

_ALLOC = {
    1: "(call $shopify_function_realloc (i32.const 0) (i32.const 0) (i32.const 1) (local.get $len))",
    2: "(call $_shopify_function_alloc (local.get $len))",
}


@dataclass(frozen=True, slots=True)
class MemoryLimits:
    """A linear memory's limits in 64 KiB pages."""

    minimum: int
    maximum: int | None


def glue_wat(
    provider: str,
    version: int,
    functions: tuple[str, ...],
    aliases: tuple[tuple[str, str, Signature], ...],
    memory: MemoryLimits | None,
) -> str:
    """The glue module of an untrampolined Wasm API module, linked under the provider's name
    beside the provider itself (so the module's imports all resolve by name).

    - ``functions``, string functions of the Wasm API ``version``: exported with the signature
      the guest imports, copying between the guest's memory and the provider's;
    - ``aliases``, (guest name, provider export, signature) of numeric functions: the provider's
      export itself, re-exported under the guest's name (an imported function exported again is
      the same function: no call in between);
    - ``memory``, the guest's memory limits: the glue defines that memory (exported as
      :data:`GLUE_MEMORY_EXPORT`) and the rewritten guest imports it.
    """
    lines = ["(module"]
    if functions:
        lines.append(f'  (import "{provider}" "memory" (memory $provider 0))')
    needed = sorted({raw for f in functions for raw in glue_needs(f, version)})
    imported = [(raw, PROVIDER_RAW[raw]) for raw in needed]
    imported += [(target, sig) for _, target, sig in aliases if target not in needed]
    for name, (params, results) in dict(imported).items():
        lines.append(
            f'  (import "{provider}" "{name}" (func ${name} (param {" ".join(params)})'
            f" (result {' '.join(results)})))"
        )
    for guest_name, target, _ in aliases:
        lines.append(f'  (export "{guest_name}" (func ${target}))')
    if functions:
        if memory is None:
            raise ValueError("string functions need the guest's memory")
        maximum = "" if memory.maximum is None else f" {memory.maximum}"
        lines.append(f'  (memory $guest (export "{GLUE_MEMORY_EXPORT}") {memory.minimum}{maximum})')
    lines += [
        _GLUE[f].replace("ALLOC", _ALLOC[1 if version == 1 else 2]).replace("READ_ERROR", str(_READ_ERROR))
        for f in functions
    ]
    lines.append(")")
    return "\n".join(lines)
