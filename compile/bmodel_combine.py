"""Combining per-graph bmodels into one without holding them: the bytes `model_tool --combine` writes, in
bounded memory.

`model_tool --combine` (TPU-MLIR 1.30.2) copies every net's flatbuffer into a new model and appends each
binary it references (weights, commands) to one in-memory buffer, reusing an earlier binary with the same
bytes. That buffer grows by doubling, so the tool holds about 1.8x the combined bmodel: 5.3 GB at Qwen-7B x
4 layers, about 9 GB at 32, and it is the last step of every Sophgo compile.

Here the tool still builds the flatbuffer (every rule about nets, stages, cascades, neuron sizes and kernel
modules stays its own), but on *stand-ins*: copies of the inputs whose binaries are replaced by 40-byte
tokens (the binary's size and sha256; the tool pads each binary to 4 KiB, so a token takes one block).
Equal binaries give equal tokens, so the tool deduplicates the stand-ins exactly as it would the real
bytes, and its output is the real output with every binary shrunk to its token. Reading the tokens back in
order gives each binary's real offset (the same 4 KiB padding applied to real sizes); the Binary structs in the
flatbuffer are patched in place (fixed-size structs: the flatbuffer keeps its length), and the binaries are
copied file to file behind it. The result equals `model_tool --combine`'s bytes apart from its create-time
stamp (tests/test_bmodel_combine.py), and the memory is the flatbuffers plus a copy buffer.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from surgery.compile.bmodel_fbs import Binary, binary_slots
from surgery.compile.logged import run_logged
from surgery.compile.toolchains import bin_env
from surgery.errors import SurgeryError

HEADER = struct.Struct("<IIIQ44x")  # magic, header size, flatbuffers size, binary size, reserved (packed)
MAGIC = 0xFF55AAEE
TOKEN = struct.Struct("<Q32s")  # a binary's size and sha256: what stands in for it
ALIGN = 4096  # the tool starts every binary on a 4 KiB boundary, zero-padded (TPU-MLIR 1.30.2)
CHUNK = 16 << 20
AGAIN = "delete it and compile again (it is rebuilt)"  # the inputs are our cache's nets


@dataclass(frozen=True)
class Source:
    """Where a binary's bytes are: which input file and at what offset in it."""

    path: Path
    offset: int
    size: int


def read_bmodel(path: Path) -> tuple[int, bytearray]:
    """(offset of the binary section, flatbuffer) of a bmodel, after checking its header against its length."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER.size)
        if len(head) < HEADER.size:
            raise SurgeryError(f"{path} is not a bmodel (shorter than its header)")
        magic, header_size, fb_size, bin_size = HEADER.unpack(head)
        if magic != MAGIC or header_size < HEADER.size:
            raise SurgeryError(f"{path} is not a bmodel (magic {magic:#x}); {AGAIN}")
        if header_size + fb_size + bin_size > os.fstat(fh.fileno()).st_size:
            raise SurgeryError(f"{path} is truncated: its header promises more bytes than the file has; {AGAIN}")
        fh.seek(header_size)
        return header_size + fb_size, bytearray(fh.read(fb_size))


def chunks(path: Path, offset: int, size: int) -> Iterator[bytes]:
    """`size` bytes of `path` from `offset`, CHUNK at a time."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = size
        while left:
            block = fh.read(min(CHUNK, left))
            if not block:
                raise SurgeryError(f"{path} ends inside one of its binaries (changed while combined?); {AGAIN}")
            yield block
            left -= len(block)


def digest(path: Path, offset: int, size: int) -> bytes:
    h = hashlib.sha256()
    for block in chunks(path, offset, size):
        h.update(block)
    return h.digest()


def write_bmodel(path: Path, fb: bytes, binary: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, HEADER.size, len(fb), len(binary)))
        fh.write(fb)
        fh.write(binary)


def stand_in(path: Path, out: Path, sources: dict[bytes, Source]) -> None:
    """Write `path` with each binary replaced by its token; record where each token's real bytes are."""
    base, fb = read_bmodel(path)
    tokens: dict[bytes, int] = {}
    hashed: dict[tuple[int, int], bytes] = {}  # a region several slots point at is read once
    section = bytearray()
    for slot in binary_slots(fb):
        start, size = Binary.unpack_from(fb, slot.pos)
        if size == 0:
            continue  # read as nothing, whatever its start: left as it is
        if (start, size) not in hashed:
            hashed[start, size] = TOKEN.pack(size, digest(path, base + start, size))
        token = hashed[start, size]
        sources.setdefault(token, Source(path, base + start, size))
        if token not in tokens:
            tokens[token] = len(section)
            section += token.ljust(ALIGN, b"\0")
        Binary.pack_into(fb, slot.pos, tokens[token], TOKEN.size)
    write_bmodel(out, fb, bytes(section))


def real_layout(section: bytes, sources: dict[bytes, Source]) -> tuple[dict[int, int], dict[int, Source]]:
    """From the stand-in output's binary section (tokens, in the order the tool laid them out): the real
    offset of every token boundary, and the source of the token at each offset."""
    if len(section) % ALIGN:
        raise SurgeryError(f"model_tool --combine laid out the stand-ins in a way this combine does not know: "
                           f"its binary section is not whole {ALIGN}-byte blocks")
    offsets, placed, real = {}, {}, 0
    for at in range(0, len(section), ALIGN):
        token = section[at:at + TOKEN.size]
        if token not in sources or any(section[at + TOKEN.size:at + ALIGN]):
            raise SurgeryError(f"model_tool --combine wrote a binary at {at} that none of the stand-ins holds")
        offsets[at], placed[at] = real, sources[token]
        real += aligned(sources[token].size)
    offsets[len(section)] = real
    return offsets, placed


def aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class HashingWriter:
    """A file written and hashed at once: the combined bmodel's sha256 without reading its GBs back."""

    def __init__(self, fh) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha.update(data)


def combine(inputs: list[Path], out: Path, work: Path) -> str:
    """Combine `inputs` into `out` as `model_tool --combine` would, holding only flatbuffers in memory;
    return the sha256 of what was written. `work` holds the stand-ins and the tool's log."""
    work.mkdir(parents=True, exist_ok=True)
    sources: dict[bytes, Source] = {}
    stand_ins = []
    for i, path in enumerate(inputs):
        stand_ins.append(work / f"{i:03d}.bmodel")
        stand_in(Path(path), stand_ins[-1], sources)
    skeleton = work / "combined.bmodel"
    skeleton.unlink(missing_ok=True)
    run_logged(["model_tool", "--combine", *map(str, stand_ins), "-o", str(skeleton)], work / "combine.log",
               "model_tool --combine", cwd=work, env=bin_env("sophgo"), expect=skeleton)
    base, fb = read_bmodel(skeleton)
    with open(skeleton, "rb") as fh:
        fh.seek(base)
        section = fh.read()
    offsets, placed = real_layout(section, sources)
    for slot in binary_slots(fb):
        start, size = Binary.unpack_from(fb, slot.pos)
        if size == 0 and slot.in_vector:
            continue  # the tool skips empty binaries in vectors: their start is the input's, left as it is
        if start not in (placed if size else offsets) or size not in (0, TOKEN.size):
            raise SurgeryError(f"model_tool --combine points a binary at {start}+{size}, between stand-ins; "
                               "this TPU-MLIR version's bmodel layout is not one this combine knows")
        Binary.pack_into(fb, slot.pos, offsets[start], placed[start].size if size else 0)
    with open(out, "wb") as raw:
        fh = HashingWriter(raw)
        fh.write(HEADER.pack(MAGIC, HEADER.size, len(fb), offsets[len(section)]))
        fh.write(fb)
        for at in range(0, len(section), ALIGN):
            for block in chunks(placed[at].path, placed[at].offset, placed[at].size):
                fh.write(block)
            fh.write(bytes(aligned(placed[at].size) - placed[at].size))
    for path in [*stand_ins, skeleton]:
        path.unlink(missing_ok=True)
    return fh.sha.hexdigest()
