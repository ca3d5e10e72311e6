"""Axera adapter (AX650 / AX630C through Pulsar2): a complete build kit, and the build itself where
`pulsar2` is on PATH (it ships only in Axera's Docker image, so usually it is not).

The kit holds, per graph: an ONNX file with the Axera runtime's I/O names and layouts, a `pulsar2 build`
JSON config (the documented BuildConfig fields), and Numpy calibration archives captured from real
activations of the exported graphs during greedy generation; plus the embedding as a raw bf16 table
(rounded to nearest even) and `build.sh` with the exact command lines.
"""

from __future__ import annotations

import io
import shlex
import shutil
import tarfile
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgery.compile.base import Adapter, CompileOptions, prepare
from surgery.compile.logged import run_logged
from surgery.fsutil import atomic_write_json, atomic_write_text
from surgery.manifest import Compiled, GraphSpec, Manifest
from surgery.onnxio import (
    data_file,
    load_structure,
    rename_locations,
    save_graph,
    seal,
    table_of,
    unseal,
    write_bf16_rows,
)
from surgery.outputs import Output
from surgery.runtime import OnnxModel

CHIPS = {"ax650": ("AX650", "NPU3"), "ax630c": ("AX620E", "NPU2")}
# our block contract -> the Axera LLM runtime's per-layer names
BLOCK_IO = {"input_states": "input", "position_ids": "indices", "attention_mask": "mask", "history_k": "K_cache",
            "history_v": "V_cache", "hidden_states": "output", "past_k": "K_cache_out", "past_v": "V_cache_out"}
POST_IO = {"hidden_states": "input", "m_logits": "output"}  # lm_head: the runtime's `post` model
KINDS = ("block", "block_cache", "lm_head")


@dataclass(frozen=True)
class AxeraOptions:
    chip: str = "ax650"
    calibration_prompts: int = 4
    calibration_tokens: int = 8
    weight_type: str = "S8"  # S8 weights, U16 activations: what the LLM builds use
    calibration_images: tuple[str, ...] = ()  # VL models: images for the vision graph (none: synthesized)
    vision_samples: int = 8  # how many images to synthesize when none are given


def axera_io(model: onnx.ModelProto, kv_width: int, rename: dict[str, str],
             weights: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Rename I/O to the Axera runtime's names; drop the batch axis ([N, H], [kv_len, kv_heads*head_dim]).
    Inputs named in `weights` (sealed external weights) are left as they are."""
    graph = gs.import_onnx(model)

    def boundary(tensor: gs.Variable, new_shape: list[int], is_input: bool) -> gs.Variable:
        name = rename.get(tensor.name, tensor.name)
        # the runtime feeds positions as uint32 (ax-llm: `indices`); our graphs gather with int32
        dtype = np.uint32 if name == "indices" else tensor.dtype
        outer = gs.Variable(name, dtype=dtype, shape=new_shape)
        tensor.name = f"{tensor.name}_contract"
        old_shape = np.array(tensor.shape, np.int64)
        src, dst = (outer, tensor) if is_input else (tensor, outer)
        target = old_shape if is_input else np.array(new_shape, np.int64)
        if dtype is np.uint32:
            reshaped = gs.Variable(f"{name}_reshaped", dtype=np.uint32, shape=list(tensor.shape))
            graph.nodes.append(gs.Node("Reshape", f"{name}_layout", inputs=[src, gs.Constant(f"{name}_shape", target)],
                                       outputs=[reshaped]))
            graph.nodes.append(gs.Node("Cast", f"{name}_int32", attrs={"to": onnx.TensorProto.INT32},
                                       inputs=[reshaped], outputs=[dst]))
            return outer
        graph.nodes.append(gs.Node("Reshape", f"{outer.name}_layout", inputs=[
            src, gs.Constant(f"{outer.name}_shape", target)], outputs=[dst]))
        return outer

    def axera_shape(t: gs.Variable) -> list[int]:
        shape = list(t.shape)
        if t.name in ("history_k", "history_v", "past_k", "past_v"):
            return [shape[1], kv_width]
        if t.name == "attention_mask":
            return shape[2:]
        if t.name == "position_ids" and len(shape) == 3:  # multimodal RoPE [3, 1, S]: three rows of S
            return [shape[0], shape[2]]
        return shape[1:] if len(shape) > 1 else shape

    graph.inputs = [t if t.name in weights else boundary(t, axera_shape(t), True) for t in graph.inputs]
    graph.outputs = [boundary(t, axera_shape(t), False) for t in graph.outputs]
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


class Recorder(OnnxModel):
    """The reference runtime, keeping every input it feeds each graph (calibration data)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.seen: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        self.seen[name].append({k: v.copy() for k, v in feeds.items()})
        return super().run(name, **feeds)


def capture(onnx_dir: Path, options: AxeraOptions) -> dict[str, list[dict[str, np.ndarray]]]:
    """Real activations: greedy generation from a few prompts through the exported graphs."""
    recorder = Recorder(onnx_dir)
    m = recorder.manifest
    rng = np.random.default_rng(0)
    for _ in range(options.calibration_prompts):
        n = int(rng.integers(4, max(5, min(m.seq_length // 2, 24))))
        recorder.generate(rng.integers(0, m.vocab_size, n).tolist(), options.calibration_tokens)
    return recorder.seen


def kit_graph(onnx_dir: Path, graph: GraphSpec, dst: Path, kv_width: int, rename: dict[str, str]) -> onnx.ModelProto:
    """The graph in the runtime's names, written into the kit with its own copy of its external weights
    (the kit goes into Pulsar2's container on its own; a copy, not a link, as newer onnx refuses links)."""
    model = load_structure(onnx_dir / graph.file)
    sealed = seal(model)
    model = axera_io(model, kv_width, rename, frozenset(sealed.tensors))
    unseal(model, sealed)
    if graph.data_file:
        shutil.copyfile(onnx_dir / graph.data_file, data_file(dst))
        rename_locations(model, {graph.data_file: data_file(dst).name})
    save_graph(model, dst)
    return model


def write_calibration(path: Path, samples: list[np.ndarray]) -> None:
    """A tar of .npy files, one per sample (Pulsar2's `Numpy` calibration format)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for i, sample in enumerate(samples):
            buf = io.BytesIO()
            np.save(buf, sample)
            info = tarfile.TarInfo(f"{i:04d}.npy")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    tmp.replace(path)


# ax-llm's sampling settings file (src/post_config.json in AXERA-TECH/ax-llm); greedy unless edited
POST_CONFIG = {"enable_temperature": False, "temperature": 0.9, "enable_repetition_penalty": False,
               "repetition_penalty": 1.2, "penalty_window": 20, "enable_top_p_sampling": False, "top_p": 0.8,
               "enable_top_k_sampling": False, "top_k": 10}


def kit_name(manifest: Manifest, graph: GraphSpec) -> str:
    """ax-llm names a layer's model `<type>_p<prefill>_l<i>_together.axmodel` and the head `<type>_post`; the
    kit keeps the runtime's stem and says which half of the layer each graph is."""
    if graph.kind == "lm_head":
        return f"{manifest.model_type}_post"
    half = "prefill" if graph.kind == "block" else "decode"
    return f"{manifest.model_type}_p{manifest.seq_length}_l{graph.layer}_{half}"


def runtime_config(manifest: Manifest, embedding: str) -> dict:
    """The `config.json` ax-llm's runner reads beside the models (LLMAttrType keys)."""
    return {
        # one file per layer holding its decode and prefill IO groups: what `pulsar2 llm_build` writes; the
        # kit builds each half on its own (docs/axera.md says what is left to merge them)
        "template_filename_axmodel": f"axmodel/{manifest.model_type}_p{manifest.seq_length}_l%d_together.axmodel",
        "axmodel_num": manifest.num_layers,
        "filename_post_axmodel": f"axmodel/{manifest.model_type}_post.axmodel",
        "filename_tokens_embed": embedding,
        "tokens_embed_num": manifest.vocab_size,
        "tokens_embed_size": manifest.hidden_size,
        "use_mmap_load_embed": True,
        "tokenizer_type": "http",
        "url_tokenizer_model": "http://127.0.0.1:12345",  # `surgery tokenizer serve <bundle> --port 12345`
        "post_config_path": "post_config.json",
    }


def build_config(name: str, hardware: str, npu_mode: str, calib: dict[str, str], samples: int) -> dict:
    """Pulsar2's build config for one graph: U16 activations, MinMax calibration from `calib`'s Numpy tars."""
    return {
        "input": f"onnx/{name}.onnx",
        "output_dir": f"build/{name}",
        "output_name": f"{name}.axmodel",
        "model_type": "ONNX",
        "target_hardware": hardware,
        "npu_mode": npu_mode,
        "quant": {
            "input_configs": [{"tensor_name": tensor, "calibration_dataset": path, "calibration_format": "Numpy",
                               "calibration_size": samples} for tensor, path in calib.items()],
            "layer_configs": [{"start_tensor_names": ["DEFAULT"], "end_tensor_names": ["DEFAULT"],
                               "data_type": "U16"}],
            "calibration_method": "MinMax",
            "precision_analysis": False,
        },
        "input_processors": [{"tensor_name": tensor, "src_dtype": "FP32"} for tensor in calib],
        "compiler": {"check": 0},
    }


class AxeraAdapter(Adapter):
    name = "axera"
    chips = tuple(CHIPS)
    summary = "Axera AX650 / AX630C through Pulsar2: a build kit (Pulsar2 runs in Axera's Docker image)"
    backend = "axmodel"
    loaded_by = "AXERA-TECH/ax-llm on the board, after build.sh ran `pulsar2 build` in Axera's container"

    def compile(self, onnx_dir: Path, out: Path, options: CompileOptions, executor: object = None,
                calibration: AxeraOptions | None = None) -> Manifest:
        self.local_only(executor, self.name)
        onnx_dir, out, manifest, owned = prepare(self, onnx_dir, out, options)
        return build_kit(onnx_dir, out, manifest, owned, calibration or AxeraOptions(chip=options.chip))


def build_kit(onnx_dir: Path, out: Path, manifest: Manifest, owned: Output, options: AxeraOptions) -> Manifest:
    owned.add("onnx/", "calib/", "configs/", "build/", "axmodel/", "logs/", "build.sh",
              f"{manifest.model_type}.embed_tokens.bf16.bin")
    for sub in ("onnx", "calib", "configs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    seen = capture(onnx_dir, options)
    kv_width = manifest.num_kv_heads * manifest.head_dim
    commands, graphs = [], []
    for graph in (g for g in manifest.graphs if g.kind in KINDS):
        name = kit_name(manifest, graph)
        rename = POST_IO if graph.kind == "lm_head" else BLOCK_IO
        model = kit_graph(onnx_dir, graph, out / "onnx" / f"{name}.onnx", kv_width, rename)
        calib = {}
        for t in graph.inputs:
            axera_name = rename.get(t.name, t.name)
            shape = [d.dim_value for d in next(i for i in model.graph.input if i.name == axera_name)
                     .type.tensor_type.shape.dim]
            dtype = np.float32 if t.dtype.startswith("float") else np.uint32 if axera_name == "indices" else t.dtype
            samples = [feeds[t.name].reshape(shape).astype(dtype) for feeds in seen[graph.name]]
            path = f"calib/{name}.{axera_name}.tar"
            write_calibration(out / path, samples)
            calib[axera_name] = path
        config = build_config(name, *CHIPS[options.chip], calib, len(seen[graph.name]))
        atomic_write_json(out / "configs" / f"{name}.json", config)
        commands.append(["pulsar2", "build", "--input", config["input"], "--output_dir", config["output_dir"],
                         "--config", f"configs/{name}.json", "--target_hardware", config["target_hardware"]])
        graphs.append({"graph": graph.name, "name": name, "samples": len(seen[graph.name]),
                       "inputs": [rename.get(t.name, t.name) for t in graph.inputs],
                       "outputs": [rename.get(t.name, t.name) for t in graph.outputs]})
    if manifest.vision is not None:  # VL: the tower's build, calibrated from images (compile/axera_vision.py)
        from surgery.compile.axera_vision import vision_kit

        command, entry = vision_kit(onnx_dir, out, manifest, *CHIPS[options.chip], options.calibration_images,
                                    options.vision_samples, write_calibration)
        commands.append(command)
        graphs.append(entry)
    embedding = out / f"{manifest.model_type}.embed_tokens.bf16.bin"
    if manifest.embedding_file:
        shutil.copyfile(onnx_dir / manifest.embedding_file["file"], embedding)
    else:
        write_bf16_rows(table_of(onnx_dir / "embedding.onnx"), embedding)
    script = "#!/usr/bin/env bash\n# Pulsar2 builds for every graph (written by `surgery compile --chip " \
             f"{options.chip}`).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + \
             "".join(shlex.join(c) + "\n" for c in commands) + \
             "# where config.json looks for them\nmkdir -p axmodel\ncp build/*/*.axmodel axmodel/\n"
    atomic_write_text(out / "build.sh", script)
    (out / "build.sh").chmod(0o755)
    for file in manifest.tokenizer_files:
        shutil.copyfile(onnx_dir / file, out / file)
    owned.add("config.json", "post_config.json")
    atomic_write_json(out / "config.json", runtime_config(manifest, embedding.name))
    atomic_write_json(out / "post_config.json", POST_CONFIG)
    kit = replace(manifest, backend="axmodel")
    kit.compiled = Compiled(
        adapter="axera", chip=options.chip, options=vars(options), toolchain={}, check="none",
        files=["build.sh", "config.json", "post_config.json", "onnx/", "configs/", "calib/", embedding.name],
        details={"target_hardware": CHIPS[options.chip][0], "npu_mode": CHIPS[options.chip][1], "graphs": graphs,
                 "embedding": {"file": embedding.name, "dtype": "bfloat16", "rounding": "nearest-even",
                               "shape": [manifest.vocab_size, manifest.hidden_size]},
                 "io": {"blocks": BLOCK_IO, "post": POST_IO}, "build_script": "build.sh", "built": False})
    if shutil.which("pulsar2"):
        for command, graph in zip(commands, graphs, strict=True):
            built = out / f"build/{graph['name']}/{graph['name']}.axmodel"
            run_logged(command, out / "logs" / f"{graph['name']}.log", f"pulsar2 build of graph {graph['graph']}",
                       cwd=out, expect=built)
            (out / "axmodel").mkdir(exist_ok=True)
            shutil.copyfile(built, out / "axmodel" / built.name)
        kit.compiled.details["built"] = True
    kit.write(out)
    return kit


ADAPTER = AxeraAdapter()
