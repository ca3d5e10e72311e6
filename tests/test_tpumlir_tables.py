"""compile/tpumlir_tables.py: a vocabulary table built straight into a TPU-MLIR net, whole or in parts (a
lookup cut by columns, a product by rows, as a 7B table is to keep the compiler's deploy under its memory
budget), gives on the CPU simulator exactly the rows of the table and the same logits whole or cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from surgery.compile.sophgo_graphs import PART_BYTES, SPLIT_BYTES, table_split
from surgery.compile.toolchains import installed
from surgery.compile.tpumlir import TpuMlirWorker

VOCAB, HIDDEN, SEQ = 1000, 96, 8
needs_tpu_mlir = pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run "
                                    "`surgery toolchain install sophgo` (make toolchains)")


def test_only_large_tables_are_cut_and_each_part_stays_small():
    assert table_split([151936, 896], "BF16", "gather") is None  # 0.5B: whole, as before
    assert table_split([151936, 4096], "BF16", "gather") == {"axis": "cols", "parts": 4}  # 7B: 1.2 GB
    assert table_split([151936, 4096], "BF16", "matmul") == {"axis": "rows", "parts": 4}
    assert table_split([151936, 4096], "F32", "matmul")["parts"] == 8
    for shape in ([151936, 2048], [125696, 4096], [152064, 8192]):
        split = table_split(shape, "BF16", "gather")
        assert shape[0] * shape[1] * 2 > SPLIT_BYTES
        assert shape[0] * shape[1] * 2 / split["parts"] <= PART_BYTES


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def as_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def build(worker: TpuMlirWorker, tmp: Path, kind: str, table: Path, split: dict | None) -> dict:
    """Build, deploy and simulate one table net; its output."""
    name = "embedding" if kind == "gather" else "lm_head"
    work = tmp / f"{kind}-{split['parts'] if split else 1}"
    work.mkdir()
    request = {"kind": kind, "weight_type": "BF16", "input": "x", "output": "y",
               "in_shape": [1, SEQ] if kind == "gather" else [1, HIDDEN],
               "out_shape": [1, SEQ, HIDDEN] if kind == "gather" else [1, VOCAB],
               # the table sits behind 64 bytes of something else, as in a shared external-data file
               "table": {"file": str(table), "offset": 64, "dtype": "bfloat16", "shape": [VOCAB, HIDDEN]},
               **({"split": split} if split else {})}
    worker.call("table", "table", work / "log", workdir=work, name=name, npz=work / "t.npz", **request)
    flags = ["--quantize", "BF16", "--quant_input", *(["--quant_output"] if kind == "gather" else []),
             "--chip", "bm1684x"]
    worker.call("deploy", "deploy", work / "log", workdir=work,
                args=["--mlir", str(work / f"{name}.mlir"), *flags, "--model", str(work / f"{name}.bmodel")])
    worker.call("simulate", "simulate", work / "log", bmodel=str(work / f"{name}.bmodel"), net=name,
                inputs=str(tmp / f"{kind}.npz"), outputs=str(work / "out.npz"))
    with np.load(work / "t.npz") as npz:
        names = sorted(npz.files)
    return {"out": next(iter(np.load(work / "out.npz").values())), "parts": names}


@needs_tpu_mlir
def test_tables_whole_and_cut_give_the_table(tmp_path: Path):
    rng = np.random.default_rng(0)
    table = bf16(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32) * 0.05)
    path = tmp_path / "table.bin"
    path.write_bytes(b"\x7f" * 64 + table.tobytes())
    ids = rng.integers(0, VOCAB, (1, SEQ)).astype(np.int32)
    ids[0, :3] = [0, VOCAB - 1, HIDDEN // 3]  # both ends of the table
    x = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    np.savez(tmp_path / "gather.npz", x=ids)
    np.savez(tmp_path / "matmul.npz", x=x)
    worker = TpuMlirWorker()
    try:
        rows = {parts: build(worker, tmp_path, "gather", path, {"axis": "cols", "parts": parts} if parts else None)
                for parts in (0, 3)}
        logits = {parts: build(worker, tmp_path, "matmul", path, {"axis": "rows", "parts": parts} if parts else None)
                  for parts in (0, 3)}
    finally:
        worker.close()
    assert rows[0]["parts"] == ["table"] and rows[3]["parts"] == ["table0", "table1", "table2"]
    for got in rows.values():  # a lookup is exact: the table's own rows
        np.testing.assert_array_equal(got["out"].reshape(1, SEQ, HIDDEN), as_float(table[ids[0]])[None])
    reference = as_float(table) @ as_float(bf16(x))[0]
    for got in logits.values():
        out = got["out"].reshape(-1)
        assert np.corrcoef(out, reference)[0, 1] > 0.9999
        assert int(out.argmax()) == int(reference.argmax())
    np.testing.assert_array_equal(logits[3]["out"], logits[0]["out"])  # cut by rows: the same logits
