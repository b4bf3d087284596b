"""The primitives of the one pass over a module's bytes: bytes, LEB128 numbers, vector lengths,
names, value types and limits, each read checked against the bytes that remain; and the
reader's state, which the code reader (``registry/_code_reader.py``) and the section reader
(``registry/_structure_reader.py``) build on.

The reader trusts nothing in the bytes: every length and count is checked against the bytes
that remain before it is used, and nothing is allocated in proportion to a declared count.
"""

from __future__ import annotations

from scriptpool.config.errors import ModuleTooComplex
from scriptpool.registry._structure import Caps, FuncSig, Import, Limits


class Malformed(Exception):
    """Bytes that are not a well-formed module; ``at`` is where the reader stood."""

    def __init__(self, message: str, at: int) -> None:
        super().__init__(message)
        self.at = at


def too_complex(what: str, value: int, cap: int, where: str = "") -> ModuleTooComplex:
    """The error of a module with ``value`` of ``what`` (in ``where``), over its ``cap``."""
    place = f" ({where})" if where else ""
    return ModuleTooComplex(
        f"module has {value:,} {what}{place}; the cap is {cap:,}", measure=what, value=value, cap=cap
    )


# Value types that are one byte: numbers, v128, and the reference shorthands.
VALTYPE_NAMES = {
    0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref", 0x6F: "externref",
}  # fmt: skip
REF_SHORTHANDS = frozenset(range(0x69, 0x75)) | {0x6F, 0x70}  # exnref .. nullref, and the two above
REF_NULL, REF = 0x63, 0x64

_PER_FUNCTION = ("locals", "body_bytes", "nesting", "loops", "branches", "branch_targets")


class ByteReader:
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
    def fail(self, message: str) -> Malformed:
        return Malformed(message, self.at)

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
            raise too_complex(what, n, cap)
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
        if b in (REF_NULL, REF):
            self.heap_type()
            return "ref"
        if b in VALTYPE_NAMES:
            return VALTYPE_NAMES[b]
        if b in REF_SHORTHANDS:
            return "ref"
        raise Malformed(f"unknown value type 0x{b:02x}", self.at - 1)

    def limits(self, memory: bool) -> Limits:
        flags = self.byte()
        if flags & ~0x0F or (not memory and flags & 0x0A):
            raise Malformed(f"unknown limits flags 0x{flags:02x}", self.at - 1)
        is_64 = bool(flags & 0x04)
        bits = 64 if is_64 else 32
        minimum = self.leb(bits)
        maximum = self.leb(bits) if flags & 0x01 else None
        if flags & 0x08:
            self.leb()  # a custom page size (log2); the engine says whether it may be used
        return Limits(minimum, maximum, is_64)
