"""The `onnx` adapter: the optimized graphs themselves, copied into a bundle and checked on onnxruntime.

For people who want only the graphs (to feed a compiler we have no adapter for, or onnxruntime on a
board), and the worked example of docs/adapters.md: an adapter is its declaration plus `compile`, which
uses the shared steps of compile/base.py.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from surgery.checks import check_graph, sampled
from surgery.compile.base import Adapter, CompileOptions, copy_host_files, finish, prepare
from surgery.manifest import Compiled, Manifest
from surgery.onnxio import run_once


class OnnxAdapter(Adapter):
    name = "onnx"
    chips = ("onnx",)
    summary = "the optimized ONNX graphs themselves, for any onnxruntime or another compiler"
    backend = "onnxruntime"
    runtime = "surgery.runtime:OnnxModel"
    loaded_by = "onnxruntime (`surgery run`), or any tool that reads ONNX"
    quantizations = ("fp32", "bf16", "f16", "w8bf16", "w4bf16", "w8f16", "w4f16")  # graphs stay as exported
    max_opset = 23

    def target(self, chip: str) -> str:
        return "generic"

    def compile(self, onnx_dir: Path, out: Path, options: CompileOptions, executor: object = None) -> Manifest:
        self.local_only(executor, self.name)
        onnx_dir, out, manifest, owned = prepare(self, onnx_dir, out, options)
        files = sorted({name for g in manifest.graphs for name in (g.file, g.data_file) if name})
        owned.add(*files)
        for name in files:
            shutil.copyfile(onnx_dir / name, out / name)
        copy_host_files(onnx_dir, out, manifest)
        compiled = replace(manifest)
        compiled.compiled = Compiled(adapter=self.name, chip="onnx", options=vars(options), toolchain={},
                                     files=files, check=options.check)
        compiled.write(out)

        def run(graph, feeds):
            return run_once(out / graph.file, feeds)

        rows = [row for g in sampled(manifest, options.check) for row in check_graph(onnx_dir, g,
                                                                                     manifest.vocab_size, run)]
        return finish(out, compiled, rows, {}, 0.99999, "the copied graphs")


ADAPTER = OnnxAdapter()
