"""Reading a module's structure (:class:`Structure`) from its bytes in one bounded pass: the
sections in their order, each read by its own rules; the code section by the instruction decoder
(``registry/_code_reader.py``).

A deploy (and a worker that must compile on the job path) reads the module here first. Bytes that
are not a well-formed module give :class:`InvalidModule` (``malformed module: ... at byte N``);
one over a cap (:class:`Caps`) gives :class:`ModuleTooComplex`; the compiler names anything
subtler (types that do not match, say) later.
"""

from __future__ import annotations

from collections.abc import Callable

from scriptpool.config.errors import InvalidModule
from scriptpool.registry._byte_reader import Malformed, too_complex
from scriptpool.registry._code_reader import CodeReader
from scriptpool.registry._structure import (
    CAPS,
    FUNC_KIND,
    GLOBAL_KIND,
    MEMORY_KIND,
    TABLE_KIND,
    TAG_KIND,
    Caps,
    Export,
    FuncSig,
    Import,
    Limits,
    Structure,
)

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
_PACKED = frozenset({0x78, 0x77})  # i8, i16 (GC struct and array fields only)


def read_structure(wasm: bytes, caps: Caps = CAPS) -> Structure:
    """Read ``wasm`` in one bounded pass. Raises :class:`InvalidModule` for bytes that are not a
    well-formed module and :class:`ModuleTooComplex` for one over a cap in ``caps``."""
    try:
        return _StructureReader(wasm, caps).module()
    except Malformed as exc:
        raise InvalidModule(f"malformed module: {exc} at byte {exc.at}", offset=exc.at) from None


class _StructureReader(CodeReader):
    """Reads a module section by section into its :class:`Structure`."""

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
                raise too_complex("sections", sections, self.caps.sections)
            start, self.end = self.at, self.at + size
            if section != CUSTOM:
                rank = _ORDER.get(section)
                if rank is None:
                    raise Malformed(f"unknown section id {section}", start - 1)
                if rank <= last:
                    raise Malformed(f"{_SECTION_NAMES[section]} section out of order or repeated", start)
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
                raise too_complex("types", len(self.types), caps.types)

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
            raise Malformed(f"unknown type form 0x{form:02x}", self.at - 1)

    def value_types(self) -> tuple[str, ...]:
        n = self.count("parameters or results", self.caps.type_arity)
        return tuple(self.value_type() for _ in range(n))

    def field_type(self) -> None:
        if self.at < self.end and self.data[self.at] in _PACKED:
            self.at += 1
        else:
            self.value_type()
        if self.byte() > 1:
            raise Malformed("unknown mutability", self.at - 1)

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
                raise Malformed(f"unknown import kind {kind}", self.at - 1)
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
                raise Malformed(f"unknown export kind {kind}", self.at - 1)
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
