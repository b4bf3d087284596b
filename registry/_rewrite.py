"""The one deploy-time rewrite: an untrampolined Wasm API module's memory definition becomes an
import, so the glue module that copies strings between it and the provider can reach it.

Only the import and memory sections change. The memory keeps index 0 (there are no imported
memories before it, and a memory import does not shift function or global indices), its limits
and its exports; code, data segments and every other section are copied byte for byte. The
rewrite is a pure function of the bytes, so a worker that has to compile a module again (no
artifact for its engine) gets the same module the deploy compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

from scriptpool.config.errors import InvalidModule
from scriptpool.engine import GUEST_MEMORY_MODULE, GUEST_MEMORY_NAME, needs_glue

_HEADER = b"\0asm\x01\0\0\0"
_IMPORT_SECTION, _MEMORY_SECTION = 2, 5
_FUNC, _TABLE, _MEMORY, _GLOBAL, _TAG = 0, 1, 2, 3, 4


class _Malformed(Exception):
    pass


@dataclass(slots=True)
class _Reader:
    data: bytes
    at: int
    end: int

    def byte(self) -> int:
        if self.at >= self.end:
            raise _Malformed("unexpected end")
        value = self.data[self.at]
        self.at += 1
        return value

    def leb(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result
            if shift > 70:
                raise _Malformed("overlong LEB128")

    def name(self) -> str:
        length = self.leb()
        if self.at + length > self.end:
            raise _Malformed("name past the end")
        raw = self.data[self.at : self.at + length]
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def limits(self) -> tuple[int, int]:
        """Skip a limits record; return where it started and ended."""
        start = self.at
        flags = self.byte()
        self.leb()
        if flags & 1:
            self.leb()
        return start, self.at

    def value_type(self) -> None:
        if self.byte() in (0x63, 0x64):  # (ref null? heaptype): a signed LEB follows
            self.leb()


def _leb(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _name(text: str) -> bytes:
    raw = text.encode()
    return _leb(len(raw)) + raw


def _sections(wasm: bytes) -> list[tuple[int, int, int]]:
    """(id, payload start, payload end) of every section."""
    if not wasm.startswith(_HEADER):
        raise _Malformed("not a core module")
    reader = _Reader(wasm, len(_HEADER), len(wasm))
    found = []
    while reader.at < reader.end:
        section = reader.byte()
        size = reader.leb()
        start = reader.at
        if start + size > len(wasm):
            raise _Malformed("section past the end")
        found.append((section, start, start + size))
        reader.at = start + size
    return found


def _imports(wasm: bytes, start: int, end: int) -> tuple[list[tuple[str, str, int]], int]:
    """The (module, name, kind) of each import, and where the entries start."""
    reader = _Reader(wasm, start, end)
    count = reader.leb()
    entries_at = reader.at
    found = []
    for _ in range(count):
        module, name, kind = reader.name(), reader.name(), reader.byte()
        if kind in (_FUNC,):
            reader.leb()
        elif kind == _TABLE:
            reader.value_type()
            reader.limits()
        elif kind == _MEMORY:
            reader.limits()
        elif kind == _GLOBAL:
            reader.value_type()
            reader.byte()
        elif kind == _TAG:
            reader.byte()
            reader.leb()
        else:
            raise _Malformed(f"import kind {kind}")
        found.append((module, name, kind))
    return found, entries_at


def needs_guest_memory(wasm: bytes) -> bool:
    """Whether ``wasm`` imports a string function of the Wasm API (untrampolined) and still
    defines its memory, i.e. whether :func:`linkable` rewrites it."""
    try:
        for section, start, end in _sections(wasm):
            if section == _IMPORT_SECTION:
                imports, _ = _imports(wasm, start, end)
                if any(m == GUEST_MEMORY_MODULE for m, _, _ in imports):
                    return False
                return any(kind == _FUNC and needs_glue(m, n) for m, n, kind in imports)
    except _Malformed:
        return False  # wasmtime says what is wrong with it
    return False


def linkable(wasm: bytes) -> bytes:
    """``wasm`` as it is linked: with its memory turned into an import of the guest memory when
    it is an untrampolined Wasm API module that uses string functions, otherwise unchanged."""
    if not needs_guest_memory(wasm):
        return wasm
    try:
        return _import_memory(wasm)
    except _Malformed as exc:
        raise InvalidModule(f"module cannot be linked to the Wasm API: {exc}") from None


def _import_memory(wasm: bytes) -> bytes:
    sections = _sections(wasm)
    imports_at = next((s for s in sections if s[0] == _IMPORT_SECTION), None)
    memories_at = [s for s in sections if s[0] == _MEMORY_SECTION]
    if imports_at is None:
        raise _Malformed("no import section")
    imports, entries_at = _imports(wasm, imports_at[1], imports_at[2])
    if any(kind == _MEMORY for _, _, kind in imports) or len(memories_at) != 1:
        raise _Malformed("the Wasm API's string functions need a module that defines its one memory")
    reader = _Reader(wasm, memories_at[0][1], memories_at[0][2])
    if reader.leb() != 1:
        raise _Malformed("the Wasm API's string functions need a module that defines exactly one memory")
    limit_start, limit_end = reader.limits()
    if reader.at != reader.end:
        raise _Malformed("trailing bytes in the memory section")
    memory_import = (
        _name(GUEST_MEMORY_MODULE) + _name(GUEST_MEMORY_NAME) + bytes([_MEMORY]) + wasm[limit_start:limit_end]
    )
    payload = _leb(len(imports) + 1) + wasm[entries_at : imports_at[2]] + memory_import
    out = bytearray(_HEADER)
    cursor = len(_HEADER)
    for section, _, end in sections:
        header_start = cursor
        cursor = end
        if section == _MEMORY_SECTION:
            continue  # its one memory is now the import
        if section == _IMPORT_SECTION:
            out += bytes([_IMPORT_SECTION]) + _leb(len(payload)) + payload
            continue
        out += wasm[header_start:end]
    return bytes(out)
