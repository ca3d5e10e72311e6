"""The `table` op of the TPU-MLIR worker (compile/tpumlir_worker.py), in the `sophgo` toolchain environment:
a vocabulary-table lookup (`gather`) or product (`matmul`) written as top MLIR straight from the table, on one
shared weight file per table and float type, so `model_tool --combine` stores the table once (as
`llm_convert` does) and the ONNX route's copies of the table never exist.

A large table (a 7B model's: 1.2 GB in bf16) goes to the compiler in parts (`split` in the request, decided
by compile/sophgo_graphs.table_split): TPU-MLIR's codegen holds about three copies of the weights plus one
more of the largest tensor (5.0 GB for one whole 7B table, 3.8 GB for four quarters; eight gain nothing more). A
lookup splits the table's columns (each part gathered by the same ids, then concatenated), a product its
rows (each part's logits concatenated): both exact, and neither does arithmetic on the ids, which the
compiler's float modes would round.
"""

import os
import zipfile


def parts_of(shape, split):
    """(name, row slice, column slice) of each part of a [vocab, hidden] table."""
    vocab, hidden = shape
    count = split["parts"] if split else 1
    if count == 1:
        return [("table", slice(0, vocab), slice(0, hidden))]
    extent = hidden if split["axis"] == "cols" else vocab
    edges = [k * extent // count for k in range(count + 1)]
    cuts = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    if split["axis"] == "cols":
        return [(f"table{k}", slice(0, vocab), c) for k, c in enumerate(cuts)]
    return [(f"table{k}", c, slice(0, hidden)) for k, c in enumerate(cuts)]


def _convert(chunk, dtype, weight_type):
    """Rows of the table as the compiler's weight type: BF16/F16 bit patterns or float32."""
    import numpy as np

    if (dtype, weight_type) in (("bfloat16", "BF16"), ("float16", "F16")):
        return chunk  # already the compiler's type: the bits as they are
    if dtype == "bfloat16":
        chunk = (chunk.astype(np.uint32) << 16).view(np.float32)
    chunk = chunk.astype(np.float32)
    if weight_type == "BF16":  # round to nearest even, as torch does
        bits = chunk.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    if weight_type == "F16":
        return chunk.astype(np.float16).view(np.uint16)
    return chunk


def _table_npz(r):
    """The shared weight file of a table, written once, streamed a block of rows at a time: the table is read
    with plain file reads (mapped pages would count against the worker until it exits) and never held
    whole, so the worker stays at its own size while it writes a 7B table."""
    import numpy as np

    if os.path.exists(r["npz"]):
        return
    t = r["table"]
    stored = np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[t["dtype"]])
    out = np.dtype(np.uint16 if r["weight_type"] in ("BF16", "F16") else np.float32)
    hidden = t["shape"][1]
    tmp = f"{r['npz']}.{os.getpid()}.tmp"  # two workers may build the same table at once
    step = max(1, (64 << 20) // (hidden * stored.itemsize))
    with open(t["file"], "rb") as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, rows, cols in parts_of(t["shape"], r.get("split")):
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_1_0(
                    fh, {"descr": np.lib.format.dtype_to_descr(out), "fortran_order": False, "shape": shape})
                for start in range(rows.start, rows.stop, step):
                    count = min(step, rows.stop - start)
                    chunk = _read(src, t.get("offset", 0), start, count, hidden, stored)
                    fh.write(np.ascontiguousarray(_convert(chunk[:, cols], t["dtype"], r["weight_type"])).tobytes())
    os.replace(tmp, r["npz"])


def _read(src, offset, start, count, hidden, stored):
    import numpy as np

    src.seek(offset + start * hidden * stored.itemsize)
    return np.fromfile(src, stored, count * hidden).reshape(count, hidden)


def op_table(tools, r):
    import mlir.dialects.top as top
    from mlir.ir import Location
    from tpu_mlir.python.transform.MLIRImporter import MLIRImporter, Platform

    _table_npz(r)
    types = ["INT32"] if r["kind"] == "gather" else ["F32"]
    mi = MLIRImporter([r["in_shape"]], [r["out_shape"]], r["name"], Platform.LLM, input_types=types,
                      weight_file=r["npz"])

    def loc(name):
        return Location.fused([Location.name(name)], context=mi.ctx)

    x = mi.create_input_op(loc(r["input"]), 0)
    parts = parts_of(r["table"]["shape"], r.get("split"))
    ys = []
    for name, rows, cols in parts:
        n, width = rows.stop - rows.start, cols.stop - cols.start
        weight = mi.create_weight_op(name, [n, width], r["weight_type"])
        last = r["output"] if len(parts) == 1 else f"{r['output']}_{name}"
        if r["kind"] == "gather":
            shape = [*r["out_shape"][:-1], width]
            ys.append(top.GatherOp(mi.get_tensor_type(shape), weight, x, axis=0, loc=loc(last),
                                   ip=mi.insert_point).output)
        else:
            ys.append(top.MatMulOp(mi.get_tensor_type([n, 1]), weight, x, mi.none_op, do_relu=False,
                                   right_transpose=True, loc=loc(last + "_matmul"), ip=mi.insert_point).output)
    if r["kind"] == "gather":
        y = ys[0] if len(ys) == 1 else top.ConcatOp(mi.get_tensor_type(r["out_shape"]), ys,
                                                    axis=len(r["out_shape"]) - 1, loc=loc(r["output"]),
                                                    ip=mi.insert_point).output
    else:
        vocab = r["table"]["shape"][0]
        y = ys[0] if len(ys) == 1 else top.ConcatOp(mi.get_tensor_type([vocab, 1]), ys, axis=0,
                                                    loc=loc(r["output"] + "_logits"), ip=mi.insert_point).output
        y = top.ReshapeOp(mi.get_tensor_type(r["out_shape"]), y, loc=loc(r["output"]), ip=mi.insert_point).output
    mi.create_return_op([y])
    with open(f"{r['name']}.mlir", "w") as fh:
        fh.write(mi.print_module())
