"""InternLM2 / InternLM2.5 chat remote code (`model_type: internlm2`, `modeling_internlm2.py`), the tuple-cache
revisions (early 2024, what internlm2-chat-7b/20b and many fine-tunes ship).

The hand edits people make before exporting InternLM2 to NPUs (cos/sin given to each layer, this step's K/V
returned), as codemods, plus what the remote code needs to load on transformers 5. What needs no codemod:
the attention already adds the additive mask it is given and builds none (the model builds the causal mask,
outside the exported blocks); flash attention is a class chosen by `config.attn_implementation`, set to
`eager` below; the packed grouped `wqkv` is split inside the block, so the export needs no weight reshuffle.
"""

from __future__ import annotations

from functools import partial

from surgery.codemod import Patch
from surgery.export.arch import ArchSpec
from surgery.export.engine_remote import INTERNLM2_ENGINE
from surgery.packs import ApplyOptions, Pack

from .cache_rules import PresentBeforeCacheConcat
from .common_rules import CallFirstInMethod
from .llama_remote_rules import RotaryFromKwargs, tuple_cache_block

# transformers 5 builds the model on the meta device and leaves non-persistent buffers (the rotary inv_freq
# and cos/sin tables) as uninitialised memory, then calls `_init_weights` on the modules holding them
RESTORE_BUFFERS = '''
def _surgery_restore_buffers(module):
    if isinstance(module, InternLM2RotaryEmbedding):
        inv_freq = 1.0 / (module.base ** (torch.arange(0, module.dim, 2).float() / module.dim))
        module.register_buffer("inv_freq", inv_freq, persistent=False)
        module._set_cos_sin_cache(module.max_position_embeddings, inv_freq.device, torch.get_default_dtype())
'''

PATCHES = [
    Patch("rotary-input", "each attention takes this step's cos/sin rows from the caller (kwargs), built once "
                          "for SEQ <= max_position_embeddings, where dynamic NTK is an identity",
          [RotaryFromKwargs]),
    Patch("present-kv", "take `present = (key, value)` before the cache concat: layers return this step's K/V",
          [partial(PresentBeforeCacheConcat, "past_key_value")]),
    Patch("restore-buffers", "rebuild the rotary buffers that transformers 5 leaves uninitialised",
          [partial(CallFirstInMethod, "InternLM2PreTrainedModel", "_init_weights", RESTORE_BUFFERS,
                   "_surgery_restore_buffers(module)",
                   note="transformers 5 leaves non-persistent buffers uninitialised")]),
]


def internlm2_rope(model, seq: int):
    """The first layer's own rotary module (all layers build the same one), [seq, head_dim] each. For seq
    <= max_position_embeddings (check_seq_length holds it) a dynamic NTK module returns its unscaled table."""
    import torch

    rotary = model.model.layers[0].attention.rotary_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), seq_len=seq)
    return cos[:seq].detach().clone(), sin[:seq].detach().clone()


EXPORT_SPEC = ArchSpec(
    embedding="model.tok_embeddings",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="output",
    rope_tables=internlm2_rope,
    call_block=tuple_cache_block,
    num_kv_heads=lambda c: c.num_key_value_heads,
    head_dim=lambda c: c.hidden_size // c.num_attention_heads,
    engine=INTERNLM2_ENGINE,
)

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def config_edits(opts: ApplyOptions) -> dict[str, object]:
    # eager attention: the flash_attention_2 class needs flash_attn (CUDA) and is not traceable to ONNX.
    # rope_scaling stays: the rotary tables are built for SEQ positions, at most max_position_embeddings, where
    # dynamic NTK changes nothing; after `rotary-input` no key length reaches the module.
    edits: dict[str, object] = {"attn_implementation": "eager"}
    if opts.dtype:
        edits["torch_dtype"] = DTYPE_NAMES[opts.dtype]
    return edits


PACK = Pack(
    name="internlm2",
    version="1.0.0",
    summary="InternLM2 / InternLM2.5 chat remote code (tuple-cache revisions, early 2024)",
    model_types=("internlm2",),
    architectures=("InternLM2ForCausalLM",),
    files={"modeling_internlm2.py": PATCHES},
    config_edits=config_edits,
    checked_with=">=5.24,<6",  # the release it was run against
    load_only=("restore-buffers",),
    export_spec=EXPORT_SPEC,
)
