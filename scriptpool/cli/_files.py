"""Reading what users hand the CLI: modules (.wasm, or .wat text) and JSON documents.

Every read is bounded: at most the limit plus one byte is read, so ``/dev/zero`` or a huge file
is refused as too large instead of filling memory.
"""

from __future__ import annotations

import json
import re
import sys
from typing import IO, Any

from scriptpool.config.errors import InvalidArgument, InvalidModule, ModuleTooLarge, ScriptpoolError

# A .wat text is read up to this many times the module limit (text is bulkier than the
# binary); the assembled module is then held to the limit itself.
WAT_TEXT_FACTOR = 8
# JSON schemas are small; anything bigger is a mistake.
SCHEMA_LIMIT = 1 << 20
_WAT_POSITION = re.compile(r"-->\s*\S*?:(\d+):(\d+)")


def read_bounded(path: str, limit: int, too_large: type[ScriptpoolError], what: str) -> bytes:
    """The bytes of ``path`` (``-`` is stdin), or ``too_large`` if there are more than ``limit``."""
    try:
        if path == "-":
            data = _read_at_most(sys.stdin.buffer, limit)
        else:
            with open(path, "rb") as stream:
                data = _read_at_most(stream, limit)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise too_large(f"{what} {path} is larger than {limit:,} bytes", limit=limit)
    return data


def _read_at_most(stream: IO[bytes], limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit + 1
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_module(path: str, limit: int, what: str = "module") -> bytes:
    """Module bytes from a .wasm file, or assembled from a .wat text file, at most ``limit`` bytes.

    A module that is not one, whether its text does not parse, its types do not check or its
    file is empty, is :class:`InvalidModule` (exit 1) like every other refusal of a module."""
    if not path.endswith(".wat"):
        wasm = read_bounded(path, limit, ModuleTooLarge, what)
        if not wasm:
            raise InvalidModule(f"{what} {path} is empty (0 bytes): give a .wasm module or .wat text")
        return wasm
    text = read_bounded(path, limit * WAT_TEXT_FACTOR, ModuleTooLarge, f"{what} text")
    if not text.strip():
        raise InvalidModule(f"{what} text {path} is empty: the smallest module is (module)")
    return assemble(path, text)


def assemble(path: str, text: bytes) -> bytes:
    """WAT text to a module; a syntax error names the line and column when wasmtime gives them."""
    import wasmtime

    try:
        return bytes(wasmtime.wat2wasm(text.decode("utf-8", errors="replace")))
    except wasmtime.WasmtimeError as exc:
        message = str(exc).strip()
        first = message.splitlines()[0] if message else "syntax error"
        where = _WAT_POSITION.search(message)
        place = f"{path}:{where.group(1)}:{where.group(2)}" if where else path
        raise InvalidModule(f"{place}: not valid WAT: {first}") from None


def read_json(path: str, limit: int, too_large: type[ScriptpoolError], what: str) -> Any:
    """The JSON document in ``path`` (``-`` is stdin), read with :func:`read_bounded`."""
    raw = read_bounded(path, limit, too_large, what)
    source = "stdin" if path == "-" else path
    if not raw.strip():
        hint = ": pipe a JSON document in, or use --input FILE" if path == "-" else ""
        raise InvalidArgument(f"{source} is empty{hint}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{source} is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"{source} is nested too deeply") from None
