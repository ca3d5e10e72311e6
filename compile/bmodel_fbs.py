"""Where the binaries are in a bmodel's flatbuffer: the position of every `Binary` struct (start, size into
the binary section), found by walking the tables that can lead to one.

The paths are TPU-MLIR's bmodel.fbs (include/tpu_mlir/Builder/BM168x/bmodel.fbs in the 1.30.2 wheel), kept
as data here: table -> {field id: (kind, target)}. Only fields on a path to a `Binary` are listed; a table
or field the schema adds later without one changes nothing. The walk reads offsets with bounds checks, so
a damaged flatbuffer is a clear error, not a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from surgery.errors import SurgeryError

Binary = struct.Struct("<QQ")  # start, size

BIN, BINS, TABLE, TABLES = "binary", "binaries", "table", "tables"
SCHEMA: dict[str, dict[int, tuple[str, str | None]]] = {
    "Model": {4: (TABLES, "Net"), 6: (TABLE, "KernelModule"), 8: (TABLE, "CpuopModule"), 10: (BIN, None)},
    "Net": {3: (TABLES, "NetParameter")},
    "NetParameter": {4: (TABLE, "CoeffMem"), 8: (TABLES, "CmdGroup"), 9: (BIN, None), 11: (BIN, None),
                     12: (TABLES, "SubNet"), 15: (BIN, None), 19: (BIN, None)},
    "CoeffMem": {2: (BIN, None)},
    "CmdGroup": {2: (BIN, None), 3: (BIN, None)},
    "SubNet": {1: (TABLES, "CmdGroup"), 2: (TABLES, "CpuParam"), 14: (TABLES, "CoreCommands")},
    "CpuParam": {1: (BIN, None), 2: (TABLES, "CpuConst")},
    "CpuConst": {1: (BIN, None)},
    "CoreCommands": {0: (TABLES, "CmdGroup"), 1: (BINS, None), 2: (BINS, None), 3: (BINS, None)},
    "KernelModule": {1: (BIN, None)},
    "CpuopModule": {1: (BIN, None)},
}


@dataclass(frozen=True)
class Slot:
    """A Binary struct at `pos` in the flatbuffer; `in_vector`: an element of a [Binary] vector."""

    pos: int
    in_vector: bool


class Reader:
    """Bounds-checked little-endian reads from a flatbuffer."""

    def __init__(self, buf: bytes | bytearray) -> None:
        self.buf = buf

    def read(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise SurgeryError(f"bmodel flatbuffer is damaged: a read at {pos} runs past its {len(self.buf)} "
                               "bytes; delete the bmodel and compile again")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def field(self, table: int, field_id: int) -> int | None:
        """Position of a table's field, or None when the field is absent."""
        vtable = table - self.read("<i", table)
        vsize = self.read("<H", vtable)
        entry = 4 + 2 * field_id
        if entry + 2 > vsize:
            return None
        offset = self.read("<H", vtable + entry)
        return table + offset if offset else None

    def deref(self, pos: int) -> int:
        return pos + self.read("<I", pos)

    def vector(self, pos: int, stride: int) -> list[int]:
        """Element positions of the vector the offset at `pos` points to."""
        start = self.deref(pos)
        count = self.read("<I", start)
        if start + 4 + count * stride > len(self.buf):
            raise SurgeryError(f"bmodel flatbuffer is damaged: a vector of {count} runs past its end; "
                               "delete the bmodel and compile again")
        return [start + 4 + i * stride for i in range(count)]


def binary_slots(buf: bytes | bytearray) -> list[Slot]:
    """Every Binary struct in a bmodel flatbuffer, in the order the schema walk meets them."""
    reader, slots = Reader(buf), []

    def walk(table: int, name: str, depth: int) -> None:
        if depth > 16:
            raise SurgeryError("bmodel flatbuffer is damaged: its tables nest deeper than the schema allows")
        for field_id, (kind, target) in SCHEMA[name].items():
            pos = reader.field(table, field_id)
            if pos is None:
                continue
            if kind == BIN:
                reader.read("<16s", pos)  # in bounds
                slots.append(Slot(pos, False))
            elif kind == BINS:
                slots.extend(Slot(p, True) for p in reader.vector(pos, Binary.size))
            elif kind == TABLE:
                walk(reader.deref(pos), target, depth + 1)
            else:
                for element in reader.vector(pos, 4):
                    walk(reader.deref(element), target, depth + 1)

    walk(reader.deref(0), "Model", 0)
    # a table can be reached twice (a stage's cmd_group and its sub-net's are often one table): once each
    return list({slot.pos: slot for slot in slots}.values())
