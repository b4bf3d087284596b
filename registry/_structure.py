"""What a module is made of, read from its bytes before anything compiles it.

A deploy (and a worker that must compile on the job path) reads the module here first: its
imports and exports, its section and item counts, and for every function its locals, body
size, control-flow nesting and loops. Each count is held to a cap (:class:`Caps`) far above
what real modules measure, so that a module built to make the compiler work for minutes
(78,000 nested loops in 234 KB, say) is refused in milliseconds with :class:`ModuleTooComplex`,
before a compiler ever sees it. Whatever stays under the caps still compiles in a child process
bounded in time and memory (``registry/_bounded_compile.py``): the caps are the cheap first
line, not the only one.

The reader trusts nothing in the bytes: every length and count is checked against the bytes
that remain before it is used, nothing is allocated in proportion to a declared count, and the
work is one pass over the bytes. Bytes that are not a well-formed module give
:class:`InvalidModule` (``malformed module: ... at byte N``); the compiler names anything
subtler (types that do not match, say) later.

It knows the instructions of every proposal the sandbox's engine accepts (SIMD and relaxed SIMD,
bulk memory, reference types, tail calls, typed function references, GC, exception handling
with ``try_table``, multi-memory, 64-bit memories, extended constants, wide arithmetic). An
instruction it does not know is refused as malformed: the engine would refuse it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wasmtime

from scriptpool.config.errors import InvalidModule, ModuleTooComplex

_MAGIC = b"\0asm"
_CORE_VERSION = b"\x01\0\0\0"

CUSTOM, TYPE, IMPORT, FUNCTION, TABLE, MEMORY, GLOBAL, EXPORT, START, ELEMENT, CODE, DATA = range(12)
DATACOUNT, TAG = 12, 13
# The order known sections must come in (each at most once); custom sections go anywhere.
_ORDER = {
    TYPE: 1,
    IMPORT: 2,
    FUNCTION: 3,
    TABLE: 4,
    MEMORY: 5,
    TAG: 6,
    GLOBAL: 7,
    EXPORT: 8,
    START: 9,
    ELEMENT: 10,
    DATACOUNT: 11,
    CODE: 12,
    DATA: 13,
}
_SECTION_NAMES = {
    TYPE: "type",
    IMPORT: "import",
    FUNCTION: "function",
    TABLE: "table",
    MEMORY: "memory",
    GLOBAL: "global",
    EXPORT: "export",
    START: "start",
    ELEMENT: "element",
    CODE: "code",
    DATA: "data",
    DATACOUNT: "data count",
    TAG: "tag",
}
FUNC_KIND, TABLE_KIND, MEMORY_KIND, GLOBAL_KIND, TAG_KIND = range(5)
_KIND_NAMES = ("func", "table", "memory", "global", "tag")


@dataclass(frozen=True, slots=True)
class Caps:
    """The most of each thing a module may hold. The defaults (:data:`CAPS`) are far above
    what real modules measure (README, "Module structure and compile bounds"): they refuse what
    only a module made to exhaust the compiler has."""

    sections: int = 1_000  # custom sections included
    types: int = 20_000
    type_arity: int = 1_000  # parameters or results of a function type, fields of a struct
    imports: int = 1_000
    functions: int = 50_000  # defined in the module (imported ones count as imports)
    tables: int = 100
    memories: int = 100
    globals: int = 50_000
    exports: int = 50_000
    elements: int = 50_000  # element segments
    data: int = 50_000  # data segments
    tags: int = 10_000
    locals: int = 10_000  # per function, declared (parameters not included)
    body_bytes: int = 1 << 20  # per function
    nesting: int = 2_000  # control frames open at once in a function (block, loop, if, try_table)
    loops: int = 1_000  # loops in one function
    branches: int = 20_000  # br, br_if, br_table, if, br_on_* in one function
    branch_targets: int = 50_000  # labels of one br_table


CAPS = Caps()


@dataclass(frozen=True, slots=True)
class FuncSig:
    """A function type: its parameter and result types as wasmtime spells them (``i32``, ...;
    a reference type other than ``funcref`` and ``externref`` as ``ref``)."""

    params: tuple[str, ...]
    results: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of a memory or table."""

    minimum: int
    maximum: int | None
    is_64: bool = False


@dataclass(frozen=True, slots=True)
class Import:
    """One import: its names, kind, and type (a :class:`FuncSig` for a function with a function
    type, :class:`Limits` for a memory or table, the value type for a global, else None)."""

    module: str
    name: str
    kind: int
    desc: FuncSig | Limits | str | None

    @property
    def type(self) -> Any:
        """The import's type as wasmtime describes it, so the deploy's import checks
        (``registry/_validate.py``, ``engine/_link.py``) run on it as on a compiled module."""
        return _wasmtime_type(self.kind, self.desc)


@dataclass(frozen=True, slots=True)
class Export:
    """One export: its name, kind, and type as for :class:`Import`."""

    name: str
    kind: int
    desc: FuncSig | Limits | str | None

    @property
    def type(self) -> Any:
        """The export's type as wasmtime describes it (see :attr:`Import.type`)."""
        return _wasmtime_type(self.kind, self.desc)


@dataclass(frozen=True, slots=True)
class Structure:
    """What a module is made of: its imports and exports, and the measures the caps hold."""

    size: int
    imports: tuple[Import, ...]
    exports: tuple[Export, ...]
    sections: int
    types: int
    functions: int
    globals: int
    data: int
    elements: int
    max_locals: int
    max_body_bytes: int
    max_nesting: int
    max_loops: int
    max_branches: int
    max_branch_targets: int
    instructions: int

    def measures(self) -> dict[str, int]:
        """The measures the caps hold, by cap name (for reports and the README's figures)."""
        return {
            "bytes": self.size,
            "sections": self.sections,
            "types": self.types,
            "imports": len(self.imports),
            "functions": self.functions,
            "globals": self.globals,
            "exports": len(self.exports),
            "data": self.data,
            "elements": self.elements,
            "locals": self.max_locals,
            "body_bytes": self.max_body_bytes,
            "nesting": self.max_nesting,
            "loops": self.max_loops,
            "branches": self.max_branches,
            "branch_targets": self.max_branch_targets,
            "instructions": self.instructions,
        }


class _Malformed(Exception):
    """Bytes that are not a well-formed module; ``at`` is where the reader stood."""

    def __init__(self, message: str, at: int) -> None:
        super().__init__(message)
        self.at = at


def read_structure(wasm: bytes, caps: Caps = CAPS) -> Structure:
    """Read ``wasm`` in one bounded pass. Raises :class:`InvalidModule` for bytes that are not a
    well-formed module and :class:`ModuleTooComplex` for one over a cap in ``caps``."""
    try:
        return _Reader(wasm, caps).module()
    except _Malformed as exc:
        raise InvalidModule(f"malformed module: {exc} at byte {exc.at}", offset=exc.at) from None


def _too_complex(what: str, value: int, cap: int, where: str = "") -> ModuleTooComplex:
    place = f" ({where})" if where else ""
    return ModuleTooComplex(
        f"module has {value:,} {what}{place}; the cap is {cap:,}", measure=what, value=value, cap=cap
    )


# Value types that are one byte: numbers, v128, and the reference shorthands.
_VALTYPE_NAMES = {
    0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref", 0x6F: "externref",
}  # fmt: skip
_REF_SHORTHANDS = frozenset(range(0x69, 0x75)) | {0x6F, 0x70}  # exnref .. nullref, and the two above
_REF_NULL, _REF = 0x63, 0x64
_PACKED = frozenset({0x78, 0x77})  # i8, i16 (GC struct and array fields only)
_EMPTY_BLOCK = 0x40

# Immediates of the one-byte opcodes. Control instructions that open or close a frame, and those
# with irregular immediates, are handled by the decoder itself.
_NONE, _LEB, _LEB2, _MEMARG, _F32, _F64, _BLOCK, _END, _ELSE = range(9)
_BR_TABLE, _SELECT_T, _TRY_TABLE, _PREFIX, _BRANCH = range(9, 14)
_UNKNOWN = -1
_OPCODES = [_UNKNOWN] * 256
for _op in (0x00, 0x01, 0x0A, 0x0F, 0x1A, 0x1B, 0xD1, 0xD3, 0xD4, *range(0x45, 0xC5)):
    _OPCODES[_op] = _NONE
for _op in (0x08, 0x10, 0x12, 0x14, 0x15, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x3F, 0x40):
    _OPCODES[_op] = _LEB
for _op in (0x41, 0x42, 0xD0, 0xD2):
    _OPCODES[_op] = _LEB  # constants, a heap type (one s33), a function index
for _op in (0x0C, 0x0D, 0xD5, 0xD6):
    _OPCODES[_op] = _BRANCH  # br, br_if, br_on_null, br_on_non_null: a label
for _op in (0x11, 0x13):
    _OPCODES[_op] = _LEB2  # call_indirect, return_call_indirect: type and table
for _op in range(0x28, 0x3F):
    _OPCODES[_op] = _MEMARG
_OPCODES[0x43], _OPCODES[0x44] = _F32, _F64
_OPCODES[0x02] = _OPCODES[0x03] = _OPCODES[0x04] = _BLOCK
_OPCODES[0x05], _OPCODES[0x0B], _OPCODES[0x0E] = _ELSE, _END, _BR_TABLE
_OPCODES[0x1C], _OPCODES[0x1F] = _SELECT_T, _TRY_TABLE
_OPCODES[0xFB] = _OPCODES[0xFC] = _OPCODES[0xFD] = _PREFIX
_LOOP, _IF = 0x03, 0x04
_BR_ON_CAST = frozenset({24, 25})

# 0xFC: saturating truncations, bulk memory and tables, wide arithmetic: sub-opcode -> LEBs after it.
_FC_LEBS = {**dict.fromkeys(range(8), 0), 8: 2, 9: 1, 10: 2, 11: 1, 12: 2, 13: 1, 14: 2, 15: 1, 16: 1, 17: 1}
_FC_LEBS.update(dict.fromkeys(range(19, 23), 0))
# 0xFD (SIMD and relaxed SIMD): sub-opcodes with immediates; the others up to 0x113 have none.
_FD_MEMARG = frozenset({*range(0x00, 0x0C), 0x5C, 0x5D})
_FD_MEMARG_LANE = frozenset(range(0x54, 0x5C))
_FD_BYTES16 = frozenset({0x0C, 0x0D})
_FD_LANE = frozenset(range(0x15, 0x23))
_FD_LAST = 0x113
# 0xFB (GC): sub-opcode -> its immediates, "l" a LEB (an index or a heap type), "c" a br_on_cast.
_FB = {
    0: "l", 1: "l", 2: "ll", 3: "ll", 4: "ll", 5: "ll", 6: "l", 7: "l", 8: "ll", 9: "ll", 10: "ll",
    11: "l", 12: "l", 13: "l", 14: "l", 15: "", 16: "l", 17: "ll", 18: "ll", 19: "ll",
    20: "l", 21: "l", 22: "l", 23: "l", 24: "c", 25: "c", 26: "", 27: "", 28: "", 29: "", 30: "",
}  # fmt: skip


_PER_FUNCTION = ("locals", "body_bytes", "nesting", "loops", "branches", "branch_targets")


class _Reader:
    """One pass over a module's bytes. ``at`` only moves forward, and every read is checked
    against ``end`` (the end of the section or body being read)."""

    def __init__(self, data: bytes, caps: Caps) -> None:
        self.data = data
        self.caps = caps
        self.at = 0
        self.end = len(data)
        self.types: list[FuncSig | None] = []  # by type index: None for a non-function type
        self.func_types: list[int] = []  # by function index (imports first)
        self.memories: list[Limits] = []
        self.tables: list[Limits] = []
        self.globals: list[str] = []
        self.imports: list[Import] = []
        self.exports: list[tuple[str, int, int]] = []
        self.defined = 0
        self.counts = {"sections": 0, "globals": 0, "data": 0, "elements": 0}
        self.max = dict.fromkeys(_PER_FUNCTION, 0)  # the largest of each over the functions
        self.instructions = 0
        self.bodies = 0
        self.where = ""  # the function being read, for the caps' messages

    # -- primitives ------------------------------------------------------------------------------
    def fail(self, message: str) -> _Malformed:
        return _Malformed(message, self.at)

    def byte(self) -> int:
        if self.at >= self.end:
            raise self.fail("unexpected end")
        value = self.data[self.at]
        self.at += 1
        return value

    def leb(self, bits: int = 32) -> int:
        """An unsigned LEB128 of at most ``bits`` bits (a signed one reads as its raw bits,
        which is all the reader needs of constants)."""
        data, at, end = self.data, self.at, self.end
        result = shift = 0
        while True:
            if at >= end:
                self.at = at
                raise self.fail("unexpected end in a LEB128 number")
            b = data[at]
            at += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                self.at = at
                return result
            shift += 7
            if shift >= bits:
                self.at = at
                raise self.fail("LEB128 number too long")

    def count(self, what: str, cap: int, per_item: int = 1) -> int:
        """A vector's length, refused when the bytes left cannot hold that many items of at
        least ``per_item`` bytes (a lie), then when it is over ``cap``."""
        at = self.at
        n = self.leb()
        if n * per_item > self.end - self.at:
            self.at = at
            raise self.fail(f"{n:,} {what} declared in {self.end - self.at:,} bytes")
        if n > cap:
            raise _too_complex(what, n, cap)
        return n

    def skip(self, n: int) -> None:
        if n > self.end - self.at:
            raise self.fail("unexpected end")
        self.at += n

    def name(self) -> str:
        n = self.leb()
        if n > self.end - self.at:
            raise self.fail("name runs past its section")
        raw = self.data[self.at : self.at + n]
        self.at += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("name is not UTF-8") from None

    def heap_type(self) -> None:
        self.leb(33)

    def value_type(self) -> str:
        b = self.byte()
        if b in (_REF_NULL, _REF):
            self.heap_type()
            return "ref"
        if b in _VALTYPE_NAMES:
            return _VALTYPE_NAMES[b]
        if b in _REF_SHORTHANDS:
            return "ref"
        raise _Malformed(f"unknown value type 0x{b:02x}", self.at - 1)

    def limits(self, memory: bool) -> Limits:
        flags = self.byte()
        if flags & ~0x0F or (not memory and flags & 0x0A):
            raise _Malformed(f"unknown limits flags 0x{flags:02x}", self.at - 1)
        is_64 = bool(flags & 0x04)
        bits = 64 if is_64 else 32
        minimum = self.leb(bits)
        maximum = self.leb(bits) if flags & 0x01 else None
        if flags & 0x08:
            self.leb()  # a custom page size (log2); the engine says whether it may be used
        return Limits(minimum, maximum, is_64)

    # -- the module ------------------------------------------------------------------------------
    def module(self) -> Structure:
        data = self.data
        if data[:4] != _MAGIC:
            raise self.fail("not a WebAssembly binary (bad magic number)")
        if data[4:8] != _CORE_VERSION:
            self.at = 4
            raise self.fail("not a core WebAssembly module version 1 (a component, or another version)")
        self.at = 8
        last = 0
        sections = 0
        while self.at < len(data):
            self.end = len(data)
            section = self.byte()
            size = self.leb()
            if size > len(data) - self.at:
                raise self.fail(f"section of {size:,} bytes runs past the end of the module")
            sections += 1
            if sections > self.caps.sections:
                raise _too_complex("sections", sections, self.caps.sections)
            start, self.end = self.at, self.at + size
            if section != CUSTOM:
                rank = _ORDER.get(section)
                if rank is None:
                    raise _Malformed(f"unknown section id {section}", start - 1)
                if rank <= last:
                    raise _Malformed(f"{_SECTION_NAMES[section]} section out of order or repeated", start)
                last = rank
            self.section(section)
            if self.at != self.end:
                raise self.fail(f"{_SECTION_NAMES.get(section, 'custom')} section has trailing bytes")
        if self.bodies != self.defined:
            raise self.fail(f"{self.defined:,} functions declared but {self.bodies:,} bodies")
        self.counts["sections"] = sections
        return Structure(
            size=len(data),
            imports=tuple(self.imports),
            exports=tuple(self.export_items()),
            sections=sections,
            types=len(self.types),
            functions=self.defined,
            globals=self.counts["globals"],
            data=self.counts["data"],
            elements=self.counts["elements"],
            max_locals=self.max["locals"],
            max_body_bytes=self.max["body_bytes"],
            max_nesting=self.max["nesting"],
            max_loops=self.max["loops"],
            max_branches=self.max["branches"],
            max_branch_targets=self.max["branch_targets"],
            instructions=self.instructions,
        )

    def section(self, section: int) -> None:
        readers: dict[int, Callable[[], None]] = {
            CUSTOM: self.custom,
            TYPE: self.type_section,
            IMPORT: self.import_section,
            FUNCTION: self.function_section,
            TABLE: self.table_section,
            MEMORY: self.memory_section,
            GLOBAL: self.counted("globals", self.caps.globals, 2),
            EXPORT: self.export_section,
            START: self.start_section,
            ELEMENT: self.counted("elements", self.caps.elements, 1),
            CODE: self.code_section,
            DATA: self.counted("data", self.caps.data, 1),
            DATACOUNT: self.start_section,
            TAG: self.tag_section,
        }
        readers[section]()

    def custom(self) -> None:
        self.name()
        self.at = self.end  # its contents are not ours to read

    def counted(self, what: str, cap: int, per_item: int) -> Callable[[], None]:
        """A section whose items the caps only count (their contents are the engine's to check)."""

        def read() -> None:
            self.counts[what] = self.count(what, cap, per_item)
            self.at = self.end

        return read

    def start_section(self) -> None:
        self.leb()

    def type_section(self) -> None:
        caps = self.caps
        for _ in range(self.count("types", caps.types)):
            if self.at < self.end and self.data[self.at] == 0x4E:  # a recursion group
                self.at += 1
                for _ in range(self.count("types", caps.types)):
                    self.sub_type()
            else:
                self.sub_type()
            if len(self.types) > caps.types:
                raise _too_complex("types", len(self.types), caps.types)

    def sub_type(self) -> None:
        form = self.byte()
        if form in (0x50, 0x4F):  # sub, sub final: supertypes, then the composite type
            for _ in range(self.count("supertypes", self.caps.type_arity)):
                self.leb()
            form = self.byte()
        if form == 0x60:
            params = self.value_types()
            results = self.value_types()
            self.types.append(FuncSig(params, results))
        elif form == 0x5F:  # struct
            for _ in range(self.count("struct fields", self.caps.type_arity, 2)):
                self.field_type()
            self.types.append(None)
        elif form == 0x5E:  # array
            self.field_type()
            self.types.append(None)
        else:
            raise _Malformed(f"unknown type form 0x{form:02x}", self.at - 1)

    def value_types(self) -> tuple[str, ...]:
        n = self.count("parameters or results", self.caps.type_arity)
        return tuple(self.value_type() for _ in range(n))

    def field_type(self) -> None:
        if self.at < self.end and self.data[self.at] in _PACKED:
            self.at += 1
        else:
            self.value_type()
        if self.byte() > 1:
            raise _Malformed("unknown mutability", self.at - 1)

    def import_section(self) -> None:
        for _ in range(self.count("imports", self.caps.imports, 4)):
            module, name = self.name(), self.name()
            kind = self.byte()
            desc: FuncSig | Limits | str | None = None
            if kind == FUNC_KIND:
                index = self.leb()
                desc = self.types[index] if index < len(self.types) else None
                self.func_types.append(index)
            elif kind == TABLE_KIND:
                self.value_type()
                desc = self.limits(memory=False)
                self.tables.append(desc)
            elif kind == MEMORY_KIND:
                desc = self.limits(memory=True)
                self.memories.append(desc)
            elif kind == GLOBAL_KIND:
                desc = self.value_type()
                self.byte()
                self.globals.append(desc)
            elif kind == TAG_KIND:
                self.byte()
                self.leb()
            else:
                raise _Malformed(f"unknown import kind {kind}", self.at - 1)
            self.imports.append(Import(module, name, kind, desc))

    def function_section(self) -> None:
        self.defined = self.count("functions", self.caps.functions)
        for _ in range(self.defined):
            self.func_types.append(self.leb())

    def table_section(self) -> None:
        for _ in range(self.count("tables", self.caps.tables, 2)):
            if self.at + 1 < self.end and self.data[self.at] == 0x40 and self.data[self.at + 1] == 0:
                self.at += 2  # a table with an initialiser: type, limits, then a constant expression
                self.value_type()
                self.tables.append(self.limits(memory=False))
                self.const_expr()
            else:
                self.value_type()
                self.tables.append(self.limits(memory=False))

    def memory_section(self) -> None:
        for _ in range(self.count("memories", self.caps.memories, 2)):
            self.memories.append(self.limits(memory=True))

    def tag_section(self) -> None:
        for _ in range(self.count("tags", self.caps.tags, 2)):
            self.byte()
            self.leb()

    def export_section(self) -> None:
        for _ in range(self.count("exports", self.caps.exports, 3)):
            name = self.name()
            kind = self.byte()
            if kind > TAG_KIND:
                raise _Malformed(f"unknown export kind {kind}", self.at - 1)
            self.exports.append((name, kind, self.leb()))

    def export_items(self) -> list[Export]:
        """The exports with their types, where the module declares them (an index out of range
        keeps no type: the compiler refuses such a module)."""
        items = []
        for name, kind, index in self.exports:
            desc: FuncSig | Limits | str | None = None
            if kind == FUNC_KIND and index < len(self.func_types):
                type_index = self.func_types[index]
                desc = self.types[type_index] if type_index < len(self.types) else None
            elif kind == MEMORY_KIND and index < len(self.memories):
                desc = self.memories[index]
            elif kind == TABLE_KIND and index < len(self.tables):
                desc = self.tables[index]
            items.append(Export(name, kind, desc))
        return items

    def const_expr(self) -> None:
        """Skip a constant expression (a table initialiser) up to its ``end``."""
        if self.instructions_until_end(const=True) != -1:
            raise self.fail("constant expression not closed")

    # -- code ------------------------------------------------------------------------------------
    def code_section(self) -> None:
        caps = self.caps
        n = self.count("function bodies", caps.functions, 2)
        section_end = self.end
        for _ in range(n):
            self.end = section_end
            size = self.leb()
            if size > section_end - self.at:
                raise self.fail(f"function body of {size:,} bytes runs past its section")
            where = f"function {len(self.func_types) - self.defined + self.bodies}"
            if size > caps.body_bytes:
                raise _too_complex("bytes in one function body", size, caps.body_bytes, where)
            self.max["body_bytes"] = max(self.max["body_bytes"], size)
            self.end = self.at + size
            self.body(where)
            if self.at != self.end:
                raise self.fail("function body has bytes after its end")
            self.bodies += 1
        self.end = section_end

    def body(self, where: str) -> None:
        caps = self.caps
        total = 0
        for _ in range(self.count("local declarations", caps.locals, 2)):
            n = self.leb()
            self.value_type()
            total += n
            if total > caps.locals:
                raise _too_complex("locals in one function", total, caps.locals, where)
        self.max["locals"] = max(self.max["locals"], total)
        self.where = where
        if self.instructions_until_end(const=False) != -1:
            raise self.fail("function body not closed")

    def instructions_until_end(self, *, const: bool) -> int:
        """Decode instructions until the ``end`` that closes the frame they start in (or, for a
        function body, until the bytes end); return the depth there: -1 when that ``end`` was
        read. Counts frames, loops and instructions against the caps."""
        data, end, caps = self.data, self.end, self.caps
        opcodes = _OPCODES
        depth = loops = deepest = instructions = branches = 0
        at = self.at
        while at < end:
            op = data[at]
            at += 1
            instructions += 1
            kind = opcodes[op]
            if kind == _NONE:
                continue
            if kind == _BRANCH:
                branches += 1
                if branches > caps.branches:
                    raise _too_complex("branches in one function", branches, caps.branches, self.where)
                kind = _LEB
            if kind == _LEB:
                # Most immediates are one byte: skip it without a call.
                if at < end and not data[at] & 0x80:
                    at += 1
                    continue
                self.at = at
                self.leb(64)
                at = self.at
                continue
            self.at = at
            if kind == _END:
                depth -= 1
                if depth < 0:
                    break
            elif kind in (_BLOCK, _TRY_TABLE):
                self.block_type()
                if kind == _TRY_TABLE:
                    self.catches()
                depth += 1
                if depth > deepest:
                    deepest = depth
                    if depth > caps.nesting:
                        raise _too_complex("nested blocks in one function", depth, caps.nesting, self.where)
                if op == _LOOP:
                    loops += 1
                    if loops > caps.loops:
                        raise _too_complex("loops in one function", loops, caps.loops, self.where)
                elif op == _IF:
                    branches += 1
            elif kind == _MEMARG:
                self.memarg()
            elif kind == _LEB2:
                self.leb()
                self.leb()
            elif kind == _F32:
                self.skip(4)
            elif kind == _F64:
                self.skip(8)
            elif kind == _ELSE:
                pass
            elif kind == _BR_TABLE:
                branches += 1
                targets = self.count("labels in one br_table", caps.branch_targets)
                self.max["branch_targets"] = max(self.max["branch_targets"], targets)
                for _ in range(targets + 1):
                    self.leb()
            elif kind == _SELECT_T:
                for _ in range(self.count("select types", caps.type_arity)):
                    self.value_type()
            elif kind == _PREFIX:
                branches += self.prefixed(op)
            else:
                self.at = at - 1
                raise self.fail(f"unknown instruction 0x{op:02x}")
            if branches > caps.branches:
                raise _too_complex("branches in one function", branches, caps.branches, self.where)
            at = self.at
        self.at = at
        self.instructions += instructions
        if not const:
            self.max["nesting"] = max(self.max["nesting"], deepest)
            self.max["loops"] = max(self.max["loops"], loops)
            self.max["branches"] = max(self.max["branches"], branches)
        return depth

    def block_type(self) -> None:
        b = self.byte()
        if b == _EMPTY_BLOCK or b in _VALTYPE_NAMES or b in _REF_SHORTHANDS:
            return
        if b in (_REF_NULL, _REF):
            self.heap_type()
        elif b & 0x80:
            self.at -= 1
            self.leb(33)  # a type index of more than one byte
        elif b >= 0x40:
            raise _Malformed(f"unknown block type 0x{b:02x}", self.at - 1)

    def catches(self) -> None:
        for _ in range(self.count("catch clauses", self.caps.branch_targets, 2)):
            clause = self.byte()
            if clause > 3:
                raise _Malformed(f"unknown catch clause {clause}", self.at - 1)
            if clause < 2:
                self.leb()  # the tag
            self.leb()  # the label

    def memarg(self) -> None:
        flags = self.leb()
        if flags & 0x40:
            self.leb()  # a memory index (multi-memory)
        self.leb(64)

    def prefixed(self, prefix: int) -> int:
        """Read a prefixed instruction's immediates; 1 if it branches (``br_on_cast``), else 0."""
        sub = self.leb()
        if prefix == 0xFC:
            lebs = _FC_LEBS.get(sub)
            if lebs is None:
                raise self.fail(f"unknown instruction 0xfc {sub}")
            for _ in range(lebs):
                self.leb()
        elif prefix == 0xFD:
            if sub in _FD_MEMARG:
                self.memarg()
            elif sub in _FD_MEMARG_LANE:
                self.memarg()
                self.skip(1)
            elif sub in _FD_BYTES16:
                self.skip(16)
            elif sub in _FD_LANE:
                self.skip(1)
            elif sub > _FD_LAST:
                raise self.fail(f"unknown instruction 0xfd {sub}")
        else:
            immediates = _FB.get(sub)
            if immediates is None:
                raise self.fail(f"unknown instruction 0xfb {sub}")
            for immediate in immediates:
                if immediate == "c":  # br_on_cast(_fail): flags, label, two heap types
                    self.byte()
                    self.leb()
                    self.heap_type()
                    self.heap_type()
                else:
                    self.leb(33)
            return int(sub in _BR_ON_CAST)
        return 0


def _wasmtime_type(kind: int, desc: FuncSig | Limits | str | None) -> Any:
    """wasmtime's type for an import or export read here; None where wasmtime-py has none
    (a tag, a GC reference type): nothing the sandbox provides has such a type."""
    if kind == FUNC_KIND and isinstance(desc, FuncSig):
        params = [_VALTYPES.get(p) for p in desc.params]
        results = [_VALTYPES.get(r) for r in desc.results]
        if any(t is None for t in (*params, *results)):
            return None
        return wasmtime.FuncType([t() for t in params if t], [t() for t in results if t])
    if kind == MEMORY_KIND and isinstance(desc, Limits):
        return wasmtime.MemoryType(wasmtime.Limits(desc.minimum, desc.maximum), is_64=desc.is_64)
    if kind == TABLE_KIND and isinstance(desc, Limits):
        return wasmtime.TableType(wasmtime.ValType.funcref(), wasmtime.Limits(desc.minimum, desc.maximum))
    if kind == GLOBAL_KIND and isinstance(desc, str) and desc in _VALTYPES:
        return wasmtime.GlobalType(_VALTYPES[desc](), False)
    return None


_VALTYPES: dict[str, Callable[[], wasmtime.ValType]] = {
    "i32": wasmtime.ValType.i32,
    "i64": wasmtime.ValType.i64,
    "f32": wasmtime.ValType.f32,
    "f64": wasmtime.ValType.f64,
    "funcref": wasmtime.ValType.funcref,
    "externref": wasmtime.ValType.externref,
}


def kind_name(kind: int) -> str:
    """``func``, ``table``, ``memory``, ``global`` or ``tag``."""
    return _KIND_NAMES[kind]
