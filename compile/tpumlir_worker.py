"""A long-lived TPU-MLIR worker. Runs inside the `sophgo` toolchain environment (Python 3.10 + tpu_mlir 1.30.2;
`surgery` is not importable there), one per job slot, so the compiler's 7-8 s of imports are paid once per
worker instead of twice per graph.

    python tpumlir_worker.py        # requests on stdin, one JSON object per line; answers the same way

Ops (every path absolute; each job runs in its own working directory, its output appended to `log`):
  transform  {workdir, log, name, onnx, shapes}        ONNX -> top MLIR, lean: no onnxsim, QAT-check reload
                                                        or `_opt.onnx` re-save; external weights mapped
  table      {workdir, log, name, kind, table, npz, weight_type, in_shape, out_shape}
                                                        a table lookup (`gather`) or product (`matmul`) ->
                                                        top MLIR on a shared weight file (as llm_convert),
                                                        so `model_tool --combine` stores the table once
  deploy     {workdir, log, args}                       model_deploy with its command-line arguments
  simulate   {log, bmodel, net, inputs, outputs}        one net on the CPU simulator (.npz in and out)
"""

import ast
import contextlib
import gc
import json
import os
import sys
import traceback

CHANNEL = None  # our answers; fd 1 is pointed at the current job's log


def _lift_parser(module):
    """The CLI's argparse parser, which tpu_mlir builds inside `if __name__ == '__main__'` (same defaults)."""
    tree = ast.parse(open(module.__file__).read())
    main = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.dump(n.test)][-1]
    body = []
    for stmt in main.body:
        text = ast.dump(stmt)
        if "parse_args" in text or "parse_known_args" in text:
            break
        if "logger.info" not in ast.unparse(stmt):
            body.append(stmt)
    scope = dict(vars(module))
    exec(compile(ast.Module(body=body, type_ignores=[]), module.__file__, "exec"), scope)
    return scope["parser"]


def _skip_tokenizer_converters():
    """TPU-MLIR's ONNX front end imports onnxruntime_extensions for its custom-op decorators, whose package
    imports its tokenizer converters (`cvt`), which import transformers, torch._dynamo and scikit-learn: 3 of
    the worker's 5 s of start-up, for code no compile reaches. The converters' module is replaced by one
    that says so if anything ever calls it."""
    import types

    def unavailable(*args, **kwargs):
        raise RuntimeError("onnxruntime_extensions.cvt is not loaded in surgery's TPU-MLIR worker")

    stub = types.ModuleType("onnxruntime_extensions.cvt")
    stub.gen_processing_models = unavailable
    sys.modules.setdefault("onnxruntime_extensions.cvt", stub)


class Tools:
    """TPU-MLIR's modules, imported once, with the lean ONNX loader installed."""

    def __init__(self):
        _skip_tokenizer_converters()
        import tpu_mlir

        tools = os.path.join(os.path.dirname(tpu_mlir.__file__), "python", "tools")
        sys.path.insert(0, tools)
        import model_deploy
        import model_transform
        from tpu_mlir.python.utils import auto_remove
        from transform import OnnxConverter

        self.transform_mod, self.deploy_mod, self.auto_remove = model_transform, model_deploy, auto_remove
        self.transform_parser = _lift_parser(model_transform)
        self.deploy_parser = _lift_parser(model_deploy)
        OnnxConverter.OnnxConverter.load_onnx_model = lean_load_onnx_model
        self.models = {}  # the simulator's one loaded bmodel: {path: (model, nets)}
        import mlir.dialects.top  # noqa: F401  (what the ops import lazily, before the freeze below)
        import pyruntime_bm  # noqa: F401
        from tpu_mlir.python.transform import MLIRImporter  # noqa: F401

        # the collection after each job (job()) would walk the ~470k objects of these imports every time:
        # 0.3-0.5 s a job, 13 s of a 0.5B conversion's 25 s compile stage. Frozen, it walks only the job's own.
        gc.collect()
        gc.freeze()


def _external_array(tensor, base):
    """An external initializer as a read-only memory map (float32 stays a map; other dtypes are converted)."""
    import numpy as np
    from onnx import TensorProto

    info = {e.key: e.value for e in tensor.external_data}
    dtypes = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: np.uint16,
              TensorProto.INT32: np.int32, TensorProto.INT64: np.int64}
    array = np.memmap(os.path.join(base, info["location"]), dtype=dtypes[tensor.data_type], mode="r",
                      offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))
    if tensor.data_type == TensorProto.BFLOAT16:
        return (np.asarray(array).astype(np.uint32) << 16).view(np.float32)
    return array if tensor.data_type == TensorProto.FLOAT else np.asarray(array).astype(np.float32)


def lean_load_onnx_model(self, onnx_file, input_shapes, output_names, static_shape=True, dump_final_opt=True):
    """OnnxConverter.load_onnx_model without the full in-memory load and the `_opt.onnx` re-save."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper
    from transform.OnnxOpt import onnx_opt

    model = onnx.load(onnx_file, load_external_data=False)
    base = os.path.dirname(os.path.abspath(onnx_file))
    external = {t.name: t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    for t in external.values():  # onnx_opt's numpy_helper.to_array() resolves from the cwd (the job's workdir)
        for entry in t.external_data:  # and strips a leading "/" or "..": link the file in under a plain name
            if entry.key == "location":
                target, link = os.path.join(base, entry.value), os.path.basename(entry.value)
                if os.path.realpath(link) != os.path.realpath(target):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(link)
                    os.symlink(target, link)
                entry.value = link
    self.model = model
    if output_names:
        self.select_output(output_names)
    self.input_names = self.get_input_names(self.model)
    self.num_input = len(self.input_names)
    self.dynamic_input_names_auto_assign()
    if not self.dynamic_shape_input_names:
        self.input_shape_assign(input_shapes)
        if static_shape:
            self.model_simplify()
    else:
        self.model_simplify(input_shapes)
        if not self.do_onnx_sim:  # model_simplify assigns the shapes only after onnxsim, which we skip
            self.input_shape_assign(input_shapes)
    self.input_shapes = self.get_input_shapes(self.model)
    self.input_types = self.get_input_types(self.model)
    self.output_types = self.get_output_types(self.model)
    for tensor in self.model.graph.initializer:
        data = _external_array(tensor, os.getcwd()) if tensor.name in external else \
            numpy_helper.to_array(tensor).astype(np.float32)
        self.addWeight(tensor.name, data)
    self.get_output_name(self.model.graph)
    if self.dynamic:
        self.get_dynamic_op_shape(self.model)
    self.onnx_file = onnx_file
    if static_shape:
        self.model, self.node_name_mapping = onnx_opt(self.model, False)


@contextlib.contextmanager
def job(tools, workdir, log):
    """Run in `workdir` with fds 1 and 2 (ours and the compiler's subprocesses') appended to `log`."""
    old = os.getcwd()
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2), os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved_fd in ((1, saved[0]), (2, saved[1])):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
        os.chdir(old)
        tools.auto_remove.g_auto_remove_files.clear()  # a global list TPU-MLIR never clears
        gc.collect()


def op_transform(tools, r):
    shapes = json.dumps(r["shapes"]).replace(" ", "")
    args, unknown = tools.transform_parser.parse_known_args(
        ["--model_name", r["name"], "--model_def", r["onnx"], "--input_shapes", shapes, "--mlir", f"{r['name']}.mlir",
         *r.get("extra", [])])
    args.do_onnx_sim = False
    tool = tools.transform_mod.get_model_transform(args)
    tool.model_transform(args.mlir, args.add_postprocess, args.patterns_count, args.pruning, args.log_level)
    tool.file_recorder.dump()
    tool.cleanup()
    del tool


def op_deploy(tools, r):
    args = tools.deploy_parser.parse_args(r["args"])
    tool = tools.deploy_mod.DeployTool(args)
    tool.lowering()
    tool.build_model()
    tool.cleanup()
    del tool


def op_simulate(tools, r):
    import numpy as np
    import pyruntime_bm
    from tpu_mlir.python.utils.lowering import bf16_to_fp32, lowering

    if r["bmodel"] not in tools.models or not isinstance(tools.models[r["bmodel"]][1], dict) \
            or hasattr(tools.models[r["bmodel"]][0], "generate"):
        # a Model freed after another was loaded corrupts the new one's results: drop it first
        tools.models.clear()
        gc.collect()
        model = pyruntime_bm.Model(r["bmodel"], 0, "")
        tools.models[r["bmodel"]] = (model, {})
    model, nets = tools.models[r["bmodel"]]
    net = nets.setdefault(r["net"], model.Net(r["net"]))
    feeds = dict(np.load(r["inputs"]))
    shapes = []
    for t in net.inputs:
        x = feeds[t.name]
        t.data.reshape(-1)[:x.size] = lowering(x, pdtype=t.dtype, pshape=x.shape, pzero_point=t.qzero_point,
                                               pscale=t.qscale).ravel()
        shapes.append(list(x.shape))
    outs = {}
    for t, shape in zip(net.outputs, net.forward_dynamic(shapes), strict=True):
        data = bf16_to_fp32(t.data) if t.dtype == "bf16" else np.array(t.data, dtype=np.float32)
        outs[t.name] = data.reshape(-1)[:int(np.prod(shape))].reshape(shape)
    np.savez(r["outputs"], **outs)


def op_generate(tools, r):
    """Generation through a whole combined bmodel, as LLM-TPU's runtime drives it (bmodel_driver.py)."""
    import numpy as np
    from bmodel_driver import Driver

    if r["bmodel"] not in tools.models or not hasattr(tools.models[r["bmodel"]][0], "generate"):
        tools.models.clear()  # one loaded bmodel at a time (see op_simulate), a Driver rather than a bare Model
        gc.collect()
        tools.models[r["bmodel"]] = (Driver(r["bmodel"]), {})
    driver = tools.models[r["bmodel"]][0]
    media = dict(np.load(r["media"])) if r.get("media") else None  # VL: the vision net's rows and positions
    result = driver.generate(r["prompt"], r["max_new_tokens"], set(r.get("eos", [])), r.get("sampling"),
                             r.get("seed", 0), media)
    with open(r["result"], "w") as fh:
        json.dump(result, fh)


def op_table(tools, r):
    from tpumlir_tables import op_table as build

    build(tools, r)


OPS = {"transform": op_transform, "table": op_table, "deploy": op_deploy, "simulate": op_simulate,
       "generate": op_generate}


def main():
    global CHANNEL
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bmodel_driver.py, tpumlir_tables.py
    CHANNEL = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints go to stderr, never into our answers
    tools = Tools()
    CHANNEL.write(json.dumps({"ok": True, "ready": True}) + "\n")
    CHANNEL.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            with job(tools, request.get("workdir"), request["log"]):
                OPS[request["op"]](tools, request)
            answer = {"ok": True}
        except BaseException as exc:  # report and keep serving; the log has the compiler's output
            with open(request["log"], "a") as fh:
                fh.write(traceback.format_exc())
            answer = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        CHANNEL.write(json.dumps(answer) + "\n")
        CHANNEL.flush()


if __name__ == "__main__":
    main()
