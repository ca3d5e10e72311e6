"""Runs inside the MNN toolchain environment (numpy + MNN only; surgery is not importable there).

    python mnn_worker.py convert <MNNConvert arguments...>   # the converter, without MNN's telemetry
    python mnn_worker.py serve                               # run .mnn graphs for requests on stdin
    python mnn_worker.py generate <config.json> <ids> <n> [<stop ids>]   # greedy on MNN.llm, JSON out
    python mnn_worker.py encode <config.json> <text>         # the engine's tokenizer (tokenizer.txt), JSON out

MNN's Python converter entry point imports a telemetry module that pip-installs a package at import time;
calling the compiled `_tools.mnnconvert` directly never loads it. `serve` speaks length-prefixed frames:
a JSON header, then `.npy` payloads; it answers the same way.
"""

import io
import json
import struct
import sys


def read_frame(stream):
    size = stream.read(4)
    if len(size) < 4:
        return None
    (n,) = struct.unpack("<I", size)
    return stream.read(n)


def write_frame(stream, payload):
    stream.write(struct.pack("<I", len(payload)))
    stream.write(payload)


def serve():
    import os

    # MNN's C++ side prints to file descriptor 1: keep that for logs on stderr, frames on a private copy
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import MNN
    import MNN.expr as F
    import numpy as np

    modules = {}
    stdin = sys.stdin.buffer
    while (header := read_frame(stdin)) is not None:
        request = json.loads(header)
        try:
            if request["op"] == "load":
                modules[request["name"]] = (MNN.nn.load_module_from_file(
                    request["path"], request["inputs"], request["outputs"]), request["inputs"])
                write_frame(stdout, json.dumps({"ok": True, "count": 0}).encode())
            else:
                module, names = modules[request["name"]]
                arrays = [np.load(io.BytesIO(read_frame(stdin))) for _ in names]
                inputs = [F.const(a, list(a.shape), F.NCHW, F.int if a.dtype.kind in "iu" else F.float)
                          for a in arrays]
                outputs = [np.array(o.read(), copy=True).reshape(o.shape) for o in module.forward(inputs)]
                write_frame(stdout, json.dumps({"ok": True, "count": len(outputs)}).encode())
                for array in outputs:
                    buf = io.BytesIO()
                    np.save(buf, array)
                    write_frame(stdout, buf.getvalue())
        except Exception as exc:  # report, keep serving
            write_frame(stdout, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        stdout.flush()


def convert(args):
    """The converter's return value says nothing (True even for a missing file); the caller checks that
    the output model exists."""
    import _tools

    _tools.mnnconvert(["mnnconvert", *args])
    return 0


def generate(config, ids, n, stops="", lora=""):
    """Greedy decoding on MNN's own LLM engine: `forward` takes token ids (the engine embeds them, keeps the
    KV cache) and returns the last position's logits. Prints one JSON line: tokens, the prefill logits,
    timings. Exits with os._exit: MNN.llm's objects crash the interpreter's teardown (a segfault after
    the work is done). `lora`: an adapter's model (relative to the config's directory) run over the loaded
    base by `Llm::create_lora`, which the binding's C object exposes (its wrapper's `apply_lora` calls a
    method 3.6.1 does not have)."""
    import os
    import time

    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the engine prints to fd 1
    import MNN.llm as llm
    import numpy as np

    model = base = llm.create(config)
    model.load()
    if lora:  # a load failure leaves a null engine that crashes on first use: check the file first
        if not os.path.isfile(os.path.join(os.path.dirname(config), lora)):
            raise SystemExit(f"{lora} is not beside {config}")
        model = llm.Llm(base._c_obj.create_lora(lora))  # `base` stays alive: the adapter runs on its weights
    start = time.perf_counter()
    logits = np.array(model.forward([int(i) for i in ids.split(",")]).read(), dtype=np.float32).reshape(-1)
    first, tokens, steps, stop = logits.tolist(), [], [], {int(i) for i in stops.split(",") if i}
    prefill_ms = (time.perf_counter() - start) * 1000
    while True:
        tokens.append(int(logits.argmax()))
        if len(tokens) == int(n) or tokens[-1] in stop:
            break
        t0 = time.perf_counter()
        logits = np.array(model.forward([tokens[-1]]).read(), dtype=np.float32).reshape(-1)
        steps.append(time.perf_counter() - t0)
    stdout.write(json.dumps({"tokens": tokens, "logits": first, "prefill_ms": prefill_ms, "steps": steps}) + "\n")
    stdout.flush()
    os._exit(0)


def encode(config, text):
    """Token ids from the engine's own tokenizer (what it feeds the model for a prompt), as one JSON line."""
    import os

    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import MNN.llm as llm

    model = llm.create(config)
    model.load()
    stdout.write(json.dumps({"ids": [int(i) for i in model.tokenizer_encode(text)]}) + "\n")
    stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "generate":
        generate(*sys.argv[2:7])
    elif sys.argv[1] == "encode":
        encode(*sys.argv[2:4])
    else:
        sys.exit(convert(sys.argv[2:]))
