"""MiniCPM-2B / MiniCPM 1-2 remote code (`model_type: minicpm`, `modeling_minicpm.py`, early 2024 revisions
written on transformers 4.36's Llama).

Llama layers with muP scales. The residual scale (`scale_depth / sqrt(num_hidden_layers)`) is inside each
decoder layer, so it is exported with the block unchanged; the embedding scale (`scale_emb`) and the head's
divisor (`hidden_size / dim_model_base`) are applied by the model outside the layers, where the block
contract cuts it, so `EXPORT_SPEC` declares them and the embedding and lm_head graphs apply them. The
codemods: eager attention, cos/sin given to each layer, the Cache-object update turned into a tuple concat
returning this step's K/V; plus what the code needs to load on transformers 5.
"""

from __future__ import annotations

from functools import partial

from surgery.codemod import Patch
from surgery.export.arch import ArchSpec
from surgery.export.engine_remote import MINICPM_ENGINE
from surgery.packs import ApplyOptions, Pack

from .attention_rules import EagerAttentionClass
from .cache_rules import CacheObjectToTuple
from .common_rules import CallFirstInMethod
from .import_rules import ImportWithFallback
from .llama_remote_rules import RotaryFromKwargs, tuple_cache_block

# transformers.modeling_attn_mask_utils is gone in transformers 5; the model only needs the causal helper
MASK_HELPER = '''
def _prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length):
    # additive [b, 1, q, past + q]: the dtype minimum where a query may not see a key (later or padding)
    bsz, q_len = input_shape
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    total = q_len + past_key_values_length
    queries = torch.arange(q_len, device=device)[:, None] + past_key_values_length
    later = torch.arange(total, device=device)[None, :] > queries
    blocked = later[None, None].expand(bsz, 1, q_len, total)
    if attention_mask is not None:
        blocked = blocked | (attention_mask[:, None, None, :total] == 0)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
'''

# transformers 5 builds the model on the meta device and leaves non-persistent buffers (the rotary inv_freq
# and cos/sin tables) as uninitialised memory, then calls `_init_weights` on the modules holding them
RESTORE_BUFFERS = '''
def _surgery_restore_buffers(module):
    if isinstance(module, MiniCPMRotaryEmbedding):
        inv_freq = 1.0 / (module.base ** (torch.arange(0, module.dim, 2).float() / module.dim))
        module.register_buffer("inv_freq", inv_freq, persistent=False)
        module._set_cos_sin_cache(module.max_position_embeddings, inv_freq.device, torch.float32)
'''

PATCHES = [
    Patch("mask-utils", "define the 4-D causal mask helper where transformers 5 no longer has it",
          [partial(ImportWithFallback, "transformers.modeling_attn_mask_utils", MASK_HELPER)], required=False,
          absent_reason="this revision does not import transformers.modeling_attn_mask_utils"),
    Patch("eager-attention", "layers always build MiniCPMAttention (no SDPA/flash class)",
          [partial(EagerAttentionClass, "MINICPM_ATTENTION_CLASSES", "MiniCPMAttention")]),
    Patch("rotary-input", "each attention takes this step's cos/sin rows from the caller (kwargs)",
          [RotaryFromKwargs]),
    Patch("present-kv", "the Cache-object update becomes a concat with (k, v) history; layers return this "
                        "step's K/V", [CacheObjectToTuple]),
    Patch("restore-buffers", "rebuild the rotary buffers that transformers 5 leaves uninitialised",
          [partial(CallFirstInMethod, "MiniCPMPreTrainedModel", "_init_weights", RESTORE_BUFFERS,
                   "_surgery_restore_buffers(module)",
                   note="transformers 5 leaves non-persistent buffers uninitialised")]),
]


def minicpm_rope(model, seq: int):
    """The first layer's own rotary module (all layers build the same one), [seq, head_dim] each."""
    import torch

    rotary = model.model.layers[0].self_attn.rotary_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), seq_len=seq)
    return cos[:seq].detach().clone(), sin[:seq].detach().clone()


EXPORT_SPEC = ArchSpec(
    embedding="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    rope_tables=minicpm_rope,
    call_block=tuple_cache_block,
    num_kv_heads=lambda c: c.num_key_value_heads,
    head_dim=lambda c: c.hidden_size // c.num_attention_heads,
    embedding_scale=lambda c: c.scale_emb,
    head_divisor=lambda c: c.hidden_size / c.dim_model_base,
    engine=MINICPM_ENGINE,
)

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def config_edits(opts: ApplyOptions) -> dict[str, object]:
    return {"torch_dtype": DTYPE_NAMES[opts.dtype]} if opts.dtype else {}


PACK = Pack(
    name="minicpm",
    version="1.0.0",
    summary="MiniCPM-2B / MiniCPM 1-2 remote code (early 2024, Cache-object revisions)",
    model_types=("minicpm",),
    architectures=("MiniCPMForCausalLM",),
    files={"modeling_minicpm.py": PATCHES},
    config_edits=config_edits,
    checked_with=">=5.24,<6",  # the release it was run against
    load_only=("mask-utils", "restore-buffers"),
    export_spec=EXPORT_SPEC,
)
