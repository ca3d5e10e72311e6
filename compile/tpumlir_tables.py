"""The `table` op of the TPU-MLIR worker (compile/tpumlir_worker.py), in the `sophgo` toolchain environment:
a vocabulary-table lookup (`gather`) or product (`matmul`) written as top MLIR straight from the table, on one
shared weight file per table and float type, so `model_tool --combine` stores the table once (as
`llm_convert` does) and the ONNX route's copies of the table never exist.
"""

import os


def _table_npz(r):
    """The shared weight file of a table, written once: BF16/F16 bit patterns or float32."""
    import numpy as np

    if os.path.exists(r["npz"]):
        return
    t = r["table"]
    stored = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[t["dtype"]]
    rows = np.memmap(t["file"], dtype=stored, mode="r", offset=t.get("offset", 0), shape=tuple(t["shape"]))
    same = (t["dtype"], r["weight_type"]) in (("bfloat16", "BF16"), ("float16", "F16"))
    out = np.empty(rows.shape, np.uint16 if r["weight_type"] in ("BF16", "F16") else np.float32)
    for start in range(0, rows.shape[0], 8192):
        if same:  # already the compiler's type: the bits as they are
            out[start:start + 8192] = rows[start:start + 8192]
            continue
        chunk = np.asarray(rows[start:start + 8192])
        if t["dtype"] == "bfloat16":
            chunk = (chunk.astype(np.uint32) << 16).view(np.float32)
        chunk = chunk.astype(np.float32)
        if r["weight_type"] == "BF16":  # round to nearest even, as torch does
            bits = chunk.view(np.uint32)
            chunk = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        elif r["weight_type"] == "F16":
            chunk = chunk.astype(np.float16).view(np.uint16)
        out[start:start + len(chunk)] = chunk
    tmp = f"{r['npz']}.{os.getpid()}.tmp.npz"  # two workers may build the same table at once
    np.savez(tmp, table=out)
    os.replace(tmp, r["npz"])


def op_table(tools, r):
    import mlir.dialects.top as top
    from mlir.ir import Location
    from tpu_mlir.python.transform.MLIRImporter import MLIRImporter, Platform

    _table_npz(r)
    vocab, hidden = r["table"]["shape"]
    types = ["INT32"] if r["kind"] == "gather" else ["F32"]
    mi = MLIRImporter([r["in_shape"]], [r["out_shape"]], r["name"], Platform.LLM, input_types=types,
                      weight_file=r["npz"])

    def loc(name):
        return Location.fused([Location.name(name)], context=mi.ctx)

    x = mi.create_input_op(loc(r["input"]), 0)
    weight = mi.create_weight_op("table", [vocab, hidden], r["weight_type"])
    if r["kind"] == "gather":
        y = top.GatherOp(mi.get_tensor_type(r["out_shape"]), weight, x, axis=0, loc=loc(r["output"]),
                         ip=mi.insert_point).output
    else:
        y = top.MatMulOp(mi.get_tensor_type([vocab, 1]), weight, x, mi.none_op, do_relu=False, right_transpose=True,
                         loc=loc(r["output"] + "_matmul"), ip=mi.insert_point).output
        y = top.ReshapeOp(mi.get_tensor_type(r["out_shape"]), y, loc=loc(r["output"]), ip=mi.insert_point).output
    mi.create_return_op([y])
    with open(f"{r['name']}.mlir", "w") as fh:
        fh.write(mi.print_module())
