"""What a chip adapter is, and the steps every adapter shares.

An adapter is declared once (which chips, which optimize pipeline, which toolchain, which quantizations,
what runs its output) and registered in compile/registry.py; the CLI, `convert`, `toolchain doctor`, the
help texts and the docs table are generated from there. A new chip is one module plus one registry entry
(docs/adapters.md walks through the `onnx` adapter). The shared steps live here so adapters stay thin:
`prepare` (read and check the export, claim the output, find the toolchain), `copy_host_files` (tokenizer
and host embedding table) and `finish` (record the parity table, then refuse what falls below a floor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.checks import LEVELS
from surgery.errors import SurgeryError
from surgery.manifest import Manifest
from surgery.outputs import Output, claim
from surgery.parity import Parity

QUANTIZATIONS = ("bf16", "f16", "w8bf16", "w4bf16", "w8f16", "w4f16")


@dataclass(frozen=True)
class CompileOptions:
    """What every adapter is given; each validates the fields it uses (Adapter.validate)."""

    chip: str
    quantize: str = "w4bf16"
    group_size: int = 64
    symmetric: bool = False
    num_core: int = 1
    num_device: int = 1
    jobs: int = 2
    check: str = "sample"  # none | sample | all (surgery/checks.py)
    layout: str = "runtime"  # the vendor runtime's file layout; an adapter may offer others (mnn: graphs)
    lora: str | None = None  # a PEFT adapter exported beside the base model (--lora-mode separate)


class Adapter:
    """One vendor's compiler behind the common interface. Subclasses set the class attributes and
    implement `compile`; most override `validate` only to add checks of their own."""

    name: str = ""
    chips: tuple[str, ...] = ()
    summary: str = ""
    toolchain: str | None = None  # compile/toolchains.py entry it needs; None: nothing to install
    backend: str = ""  # Manifest.backend of its output
    runtime: str | None = None  # "module:Class" of the Runtime that runs its output on this machine
    loaded_by: str = ""  # which vendor runtime loads the output on the board (README, report)
    quantizations: tuple[str, ...] = QUANTIZATIONS
    layouts: tuple[str, ...] = ("runtime",)  # output layouts it writes; the first is the default
    max_opset = 17

    def target(self, chip: str) -> str:
        """The `surgery optimize` pipeline for a chip (surgery/passes/pipelines.py)."""
        return chip

    def compiles_graphs(self, options: CompileOptions) -> bool:
        """Whether `compile` consumes the optimized graphs. An engine layout built from the patched model
        (MNN's) reads only the manifest and, for its check, the exported graphs: optimizing is wasted work."""
        return True

    def table_dtype(self, options: CompileOptions) -> str | None:
        """The dtype export should store vocabulary tables in for this compiler (None: the graphs')."""
        return None

    def validate(self, options: CompileOptions) -> None:
        if options.chip not in self.chips:
            raise SurgeryError(f"{self.name} compiles for {', '.join(self.chips)}, not {options.chip!r}")
        if options.quantize not in self.quantizations:
            raise SurgeryError(f"-q {options.quantize!r} is not a quantization {self.name} takes; choose one of "
                               f"{', '.join(self.quantizations)}")
        if options.group_size <= 0 or options.group_size & (options.group_size - 1):
            raise SurgeryError(f"-g {options.group_size} must be a power of two (32, 64, 128, ...)")
        if options.check not in LEVELS:
            raise SurgeryError(f"--check {options.check!r}: choose one of {', '.join(LEVELS)}")
        if options.layout not in self.layouts:
            raise SurgeryError(f"--layout {options.layout!r}: {self.name} writes {', '.join(self.layouts)}")
        if options.jobs < 1 or options.num_core < 1 or options.num_device < 1:
            raise SurgeryError("--jobs, --num-core and --num-device must be at least 1")
        if options.lora is not None:
            self.validate_lora(options)

    def validate_lora(self, options: CompileOptions) -> None:
        """Refuse an adapter exported beside the base model unless this adapter's runtime loads one (MNN's
        engine does, and overrides this)."""
        raise SurgeryError(f"--lora-mode separate: surgery writes a separate adapter only for MNN's LLM engine "
                           f"(-c mnn, loaded with Llm::create_lora); for {options.chip} use --lora-mode merged")

    def preflight(self, options: CompileOptions) -> None:
        """Everything that can fail before hours of work: the options, then the toolchain."""
        self.validate(options)
        if self.toolchain:
            from surgery.compile.toolchains import python_of

            python_of(self.toolchain)

    def prewarm(self, options: CompileOptions) -> None:
        """Start what `compile` will need (compiler processes) while earlier stages run; default: nothing."""

    def build_ahead(self, options: CompileOptions, work: Path) -> object | None:
        """Something with `offer(export_dir, graph)` that starts building graphs export has finished, before
        optimize and compile run (their scratch in `work`); `compile(..., ahead=)` then takes it. Default:
        None (everything is built by `compile`)."""
        return None

    def compile(self, onnx_dir: Path, out: Path, options: CompileOptions, executor: object = None) -> Manifest:
        """Compile `onnx_dir` into `out`; `executor` spreads graph builds elsewhere (compile/executors.py),
        for adapters that can."""
        raise NotImplementedError

    @staticmethod
    def local_only(executor: object, name: str) -> None:
        if executor is not None:
            raise SurgeryError(f"the {name} adapter builds on this machine only; drop --executor")

    def describe(self) -> dict:
        return {"adapter": self.name, "chips": list(self.chips), "summary": self.summary,
                "toolchain": self.toolchain, "backend": self.backend, "runtime": self.runtime,
                "loaded_by": self.loaded_by, "quantizations": list(self.quantizations)}


def prepare(adapter: Adapter, onnx_dir: Path, out: Path, options: CompileOptions
            ) -> tuple[Path, Path, Manifest, Output]:
    """Check options, toolchain and export; claim the output. Paths come back absolute (tools run in
    other working directories)."""
    onnx_dir, out = Path(onnx_dir).absolute(), Path(out).absolute()
    adapter.preflight(options)
    manifest = Manifest.read(onnx_dir)
    if manifest.backend != "onnxruntime":
        raise SurgeryError(f"{onnx_dir} holds {manifest.backend} models, not exported graphs; compile the output "
                           "of `surgery export` or `surgery optimize`")
    if manifest.opset > adapter.max_opset:
        raise SurgeryError(f"{onnx_dir} has opset {manifest.opset} graphs; {adapter.name} takes opset "
                           f"{adapter.max_opset}: run `surgery optimize {onnx_dir} --target "
                           f"{adapter.target(options.chip)}` (or export with the torchscript exporter) first")
    if adapter.compiles_graphs(options) and not manifest.graphs:
        raise SurgeryError(f"{onnx_dir} holds no graphs (it was exported for a compiler that builds from the patched "
                           "model); export it again with `surgery export`")
    owned = claim(out, "compile", {"export": onnx_dir})
    owned.add("manifest.json", *host_files(manifest))
    return onnx_dir, out, manifest, owned


def host_files(manifest: Manifest) -> list[str]:
    """Files the host side of a runtime needs beside the compiled model: tokenizer, host embedding table."""
    return [*manifest.tokenizer_files, *([manifest.embedding_file["file"]] if manifest.embedding_file else [])]


def copy_host_files(onnx_dir: Path, out: Path, manifest: Manifest) -> None:
    import shutil

    for name in host_files(manifest):
        shutil.copyfile(onnx_dir / name, out / name)


def finish(out: Path, compiled: Manifest, rows: list[Parity], floors: dict[str, float], default_floor: float,
           what: str, ignore: tuple[str, ...] = ("token", "tokens")) -> Manifest:
    """Record the parity table in the compiled manifest, then refuse an output below its floor (after
    writing, so the table is there to read)."""
    compiled.compiled.parity = [r.as_dict() for r in rows]
    compiled.write(out)
    bad = [r for r in rows if r.output not in ignore and not r.cosine >= floors.get(r.output, default_floor)]
    if bad:
        r = bad[0]
        raise SurgeryError(f"{what}: graph {r.graph} output {r.output} has cosine {r.cosine:.5f}, below "
                           f"{floors.get(r.output, default_floor)}; see {out / 'manifest.json'} for every output")
    return compiled
