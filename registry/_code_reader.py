"""The instruction decoder: function bodies read instruction by instruction, frames, loops and
branches counted against the caps as they open, immediates skipped.

It knows the instructions of every proposal the sandbox's engine accepts (SIMD and relaxed SIMD,
bulk memory, reference types, tail calls, typed function references, GC, exception handling
with ``try_table``, multi-memory, 64-bit memories, extended constants, wide arithmetic). An
instruction it does not know is refused as malformed: the engine would refuse it too.
"""

from __future__ import annotations

from scriptpool.registry._byte_reader import (
    REF,
    REF_NULL,
    REF_SHORTHANDS,
    VALTYPE_NAMES,
    ByteReader,
    Malformed,
    too_complex,
)

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


class CodeReader(ByteReader):
    """Reads the code section and constant expressions (see the module's docstring)."""

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
                raise too_complex("bytes in one function body", size, caps.body_bytes, where)
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
                raise too_complex("locals in one function", total, caps.locals, where)
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
                    raise too_complex("branches in one function", branches, caps.branches, self.where)
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
                        raise too_complex("nested blocks in one function", depth, caps.nesting, self.where)
                if op == _LOOP:
                    loops += 1
                    if loops > caps.loops:
                        raise too_complex("loops in one function", loops, caps.loops, self.where)
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
                raise too_complex("branches in one function", branches, caps.branches, self.where)
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
        if b == _EMPTY_BLOCK or b in VALTYPE_NAMES or b in REF_SHORTHANDS:
            return
        if b in (REF_NULL, REF):
            self.heap_type()
        elif b & 0x80:
            self.at -= 1
            self.leb(33)  # a type index of more than one byte
        elif b >= 0x40:
            raise Malformed(f"unknown block type 0x{b:02x}", self.at - 1)

    def catches(self) -> None:
        for _ in range(self.count("catch clauses", self.caps.branch_targets, 2)):
            clause = self.byte()
            if clause > 3:
                raise Malformed(f"unknown catch clause {clause}", self.at - 1)
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
