"""ChatGLM2-6B, ChatGLM3-6B and CodeGeeX2-6B remote code (`model_type: chatglm`, `modeling_chatglm.py`).

The edits people make by hand before exporting these models to NPUs (SDPA off, an additive mask instead of
the boolean one and the mask the attention builds itself, the cache returned per step), as codemods, plus
what the 2023 remote code needs to load on transformers 5. The export side reads the model sequence-first
with tuple caches and a half-head rotary cache; `EXPORT_SPEC` says so.
"""

from collections.abc import Mapping
from functools import partial

from surgery.codemod import Patch
from surgery.errors import SurgeryError
from surgery.export.arch import ArchSpec, chatglm_block, chatglm_rope
from surgery.export.engine_remote import CHATGLM_ENGINE
from surgery.manifest import MASK_VALUE
from surgery.packs import ApplyOptions, Pack

from .cache_rules import PresentBeforeCacheConcat
from .causal_mask_rules import AdditiveMask, BoolMaskToAdditive, DropMaskBuilder, UnguardCall
from .common_rules import KeepElseOfFlagBranch
from .load_rules import CallLastInMethod, GuardConfigRead

PATCHES = [
    Patch("sdpa-off", "drop the torch 2 SDPA branch of CoreAttention, keep the eager matmul/softmax path",
          [partial(KeepElseOfFlagBranch, "pytorch_major_version")]),
    Patch("causal-mask", "remove the causal mask CoreAttention builds when given none; the mask input masks",
          [DropMaskBuilder]),
    Patch("additive-mask", "`masked_fill(attention_mask, -inf)` -> `+ attention_mask`: the mask input is additive",
          [AdditiveMask]),
    Patch("masks-additive", "get_masks returns the additive mask the patched attention adds",
          [partial(BoolMaskToAdditive, "get_masks", repr(MASK_VALUE))]),
    Patch("masks-always", "ChatGLMModel.forward always builds its mask (the attention no longer builds one)",
          [partial(UnguardCall, "get_masks")]),
    Patch("present-kv", "keep this step's K/V before the cache concat: blocks return only the new K/V",
          [partial(PresentBeforeCacheConcat, "kv_cache", store_note="return this step's K/V")]),
    Patch("max-length", "`config.max_length` -> getattr(...): transformers 5 configs have no generation fields",
          [partial(GuardConfigRead, "config", "max_length", "None")], required=False,
          absent_reason="this revision does not read config.max_length"),
    Patch("post-init", "call `self.post_init()` at the end of ChatGLMForConditionalGeneration.__init__ "
                       "(transformers 5 needs it to load)",
          [partial(CallLastInMethod, "ChatGLMForConditionalGeneration", "__init__", "self.post_init()",
                   note="transformers 5 finishes loading in post_init")], required=False,
          absent_reason="this revision already calls post_init"),
]

# `transformer.encoder.layers` blocks, sequence-first; K/V have `multi_query_group_num` heads with MQA
EXPORT_SPEC = ArchSpec(
    embedding="transformer.embedding.word_embeddings",  # not `transformer.embedding`: it transposes to [S, B, H]
    layers="transformer.encoder.layers",
    final_norm="transformer.encoder.final_layernorm",
    lm_head="transformer.output_layer",
    rope_tables=chatglm_rope,
    call_block=chatglm_block,
    num_kv_heads=lambda c: c.multi_query_group_num if c.multi_query_attention else c.num_attention_heads,
    head_dim=lambda c: c.kv_channels,
    engine=CHATGLM_ENGINE,
)

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_config(config: Mapping[str, object]) -> None:
    """Refuse what this pack cannot make static: a P-tuning v2 checkpoint (its learned per-layer prefix K/V
    would have to precede every history), and ChatGLM-6B v1, which shares the model_type."""
    if config.get("pre_seq_len") is not None:
        raise SurgeryError(f"pack chatglm: config.json sets pre_seq_len={config['pre_seq_len']} (a P-tuning v2 "
                           "prefix), which the block contract cannot carry; export the base model (pre_seq_len "
                           "null), or fine-tune with LoRA and merge it into the weights")
    if "position_encoding_2d" in config or "multi_query_group_num" not in config:
        raise SurgeryError("pack chatglm handles ChatGLM2/ChatGLM3/CodeGeeX2 (config.json with "
                           "multi_query_group_num); this looks like ChatGLM-6B v1, which no pack handles yet")


def config_edits(opts: ApplyOptions) -> dict[str, object]:
    # the rotary cache is built for `seq_length` positions; a static export needs no more than SEQ
    edits: dict[str, object] = {"seq_length": opts.seq_length} if opts.seq_length else {}
    if opts.dtype:
        edits["torch_dtype"] = DTYPE_NAMES[opts.dtype]
    return edits


PACK = Pack(
    name="chatglm",
    version="1.0.0",
    summary="ChatGLM2-6B / ChatGLM3-6B / CodeGeeX2-6B remote code (2023 revisions)",
    model_types=("chatglm",),
    architectures=("ChatGLMForConditionalGeneration",),
    files={"modeling_chatglm.py": PATCHES},
    config_edits=config_edits,
    checked_with=">=5.24,<6",  # the release it was run against; 5.0-5.23 differ in how they finish a load
    load_only=("max-length", "post-init"),
    export_spec=EXPORT_SPEC,
    check_config=check_config,
)
