"""Baichuan2-7B (RoPE) and Baichuan2-13B (ALiBi) remote code (`model_type: baichuan`, `modeling_baichuan.py`).

The edits people make by hand before exporting these models to NPUs (xformers and SDPA paths off, the layer's
present holding only this step's K/V, the head's row normalization folded into its weights), as codemods, plus
what the 2023 remote code needs to load on transformers 5. The causal mask (both) and the ALiBi table (13B)
are built by `BaichuanModel.forward`, outside the layers: blocks see only the contract's additive mask, plus
ALiBi from a constant table gathered by position (`export/arch_baichuan.py` says why not folded into the mask).
"""

from functools import partial

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Patch, Rule
from surgery.export.arch import ArchSpec
from surgery.export.arch_baichuan import baichuan_block, baichuan_tables, normalize_rows
from surgery.export.engine_remote import BAICHUAN_ENGINE
from surgery.packs import ApplyOptions, Pack

from .attention_rules import EagerSdpa
from .cache_rules import PresentBeforeCacheConcat
from .common_rules import KeepElseOfFlagBranch
from .import_rules import ImportOrNone
from .load_rules import TensorsOnCpuInInit, UnwrapOneTuple


class FoldedNormHead(Rule):
    """Baichuan2's own rule: `NormHead.forward` normalizes `self.weight` (in place, on first use) before
    `linear(x, w)`; it becomes one product with `self.weight` while the exporter traces and `linear(x,
    normalize(w))` otherwise. `head_rows=normalize_rows` writes the exported table with rows already
    normalized, and normalizing is idempotent, so eager torch (checkpoint weights) and the graph agree."""

    name = "folded-norm-head"
    anchor = "`NormHead.forward` with `normalize(self.weight)` and `return ...linear(x, w)`"
    NORMALIZE = m.Call(func=m.Attribute(attr=m.Name("normalize")),
                       args=[m.Arg(m.Attribute(value=m.Name("self"), attr=m.Name("weight")))])
    LINEAR = m.Return(value=m.Call(func=m.Attribute(attr=m.Name("linear")), args=[m.Arg(), m.Arg()]))

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        if updated.name.value != "NormHead":
            return updated
        body = [self._fold(s) if m.matches(s, m.FunctionDef(name=m.Name("forward"))) else s for s in updated.body.body]
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _fold(self, forward: cst.FunctionDef) -> cst.FunctionDef:
        returns = m.findall(forward, self.LINEAR)
        if not returns or not m.findall(forward, self.NORMALIZE):
            return forward
        code = cst.Module([]).code_for_node
        linear, normalize = returns[-1].value, m.findall(forward, self.NORMALIZE)[0]
        weight = cst.parse_statement(f"weight = self.weight if torch.jit.is_tracing() else {code(normalize)}\n")
        ret = cst.parse_statement(f"return {code(linear.func)}({code(linear.args[0].value)}, weight)\n")
        weight = self.mark(weight, "rows normalized in torch; export writes them folded into the head's table")
        return forward.with_changes(body=forward.body.with_changes(body=[weight, ret]))


PATCHES = [
    Patch("xformers-off", "drop the xformers branch (its LowerTriangularMask is a built-in causal mask), keep eager",
          [partial(KeepElseOfFlagBranch, "xops")]),
    Patch("sdpa-off", "SDPA under `sdp_kernel` -> matmul, + additive mask, softmax, matmul (7B)",
          [EagerSdpa], required=False, absent_reason="this revision attends eagerly (Baichuan2-13B)"),
    Patch("present-kv", "`present = (k, v)` before the cache concat: layers return this step's K/V only",
          [partial(PresentBeforeCacheConcat, "past_key_value")]),
    Patch("norm-head", "NormHead is one product; its row normalization is folded into the exported table",
          [FoldedNormHead]),
    Patch("rotary-tables", "build RotaryEmbedding's plain-tensor tables on the CPU (transformers 5 leaves them "
                           "on the meta device)",
          [partial(TensorsOnCpuInInit, "RotaryEmbedding")], required=False,
          absent_reason="this revision has no rotary tables (Baichuan2-13B, ALiBi)"),
    Patch("accelerate", "make the unused `from accelerate import init_empty_weights` optional (the loader refuses "
                        "remote code whose imports are missing)",
          [partial(ImportOrNone, "accelerate", "its 4-bit loader")], required=False,
          absent_reason="this revision does not import accelerate"),
]

CONFIG_PATCHES = [
    Patch("checkpointing-flag", "`gradient_checkpointing = (flag,)` -> `= flag`: the 1-tuple is truthy, and "
                                "transformers 5 then enables checkpointing (embeddings require grad in eval)",
          [partial(UnwrapOneTuple, "gradient_checkpointing")], required=False,
          absent_reason="this revision stores gradient_checkpointing as a bool"),
]

# `model.layers` blocks, MHA (every head has its K/V), caches [B, H, S, D] inside and BSHD in the contract
EXPORT_SPEC = ArchSpec(
    embedding="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    rope_tables=baichuan_tables,
    call_block=baichuan_block,
    num_kv_heads=lambda c: c.num_attention_heads,
    head_dim=lambda c: c.hidden_size // c.num_attention_heads,
    head_rows=normalize_rows,
    engine=BAICHUAN_ENGINE,
)

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def config_edits(opts: ApplyOptions) -> dict[str, object]:
    # 13B builds its [heads, L, L] ALiBi table for model_max_length; a static export needs no more than SEQ.
    # 7B's rotary tables follow max_position_embeddings and recompute themselves when a call needs more.
    edits: dict[str, object] = {"model_max_length": opts.seq_length} if opts.seq_length else {}
    if opts.dtype:
        edits["torch_dtype"] = DTYPE_NAMES[opts.dtype]
    return edits


PACK = Pack(
    name="baichuan",
    version="1.0.0",
    summary="Baichuan2-7B (RoPE) / Baichuan2-13B (ALiBi) remote code",
    model_types=("baichuan",),
    architectures=("BaichuanForCausalLM",),
    files={"modeling_baichuan.py": PATCHES, "configuration_baichuan.py": CONFIG_PATCHES},
    config_edits=config_edits,
    checked_with=">=5.24,<6",  # the release the conformance test ran against
    load_only=("rotary-tables", "accelerate", "checkpointing-flag"),
    export_spec=EXPORT_SPEC,
)
