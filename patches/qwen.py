"""Qwen-v1 remote code (Qwen-7B/1.8B/14B-Chat, `model_type: qwen`), the 2023-08..2023-12 upstream revision styles.

The edits people make by hand before exporting these models to NPUs, as codemods, plus what the
remote code needs to load on transformers 5.x. Each revision style has some patch's target missing (no SDPA
before October 2023, the attention's own rotary table only in August 2023): those report not applicable.
"""

from functools import partial

import libcst.matchers as m

from surgery.codemod import Patch
from surgery.export.arch import ArchSpec, qwen_block, qwen_rope
from surgery.export.engine_spec import QWEN_ENGINE
from surgery.packs import ApplyOptions, Pack

from .causal_mask_rules import AddAttentionMask, RegisteredCausalMask, TrilCausalMask
from .common_rules import (
    IS_NOT_NONE,
    CallFirstInMethod,
    ForceModuleConstant,
    HoistBefore,
    KeepElseOfFlagBranch,
    ReplaceMethodCall,
    ScalarDivision,
    contains,
)
from .import_rules import OptionalImport
from .rotary_rules import RotaryFromCaller

# transformers 5 builds the model on the meta device and leaves non-persistent buffers as uninitialised
# memory; it then calls `_init_weights` on exactly the modules holding them. Rebuild them there. Revisions
# before October 2023 keep logn and inv_freq as plain tensor attributes, which loading leaves on the meta
# device: those are replaced, and the rotary module (no buffer, so never passed in) is reached via its owner:
# QWenModel, or each QWenAttention in August 2023, whose causal mask buffer is `bias`.
RESTORE_BUFFERS = '''
def _surgery_refill(module, name, value):
    if name in module._buffers:
        module._buffers[name].copy_(value)
    else:
        setattr(module, name, value)


def _surgery_causal(buffer):
    n = buffer.size(-1)
    buffer.copy_(torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n))


def _surgery_restore_buffers(module):
    if isinstance(module, QWenAttention):
        n = module.logn_tensor.size(1)
        logn = [math.log(i, module.seq_length) if i > module.seq_length else 1 for i in range(1, n + 1)]
        _surgery_refill(module, "logn_tensor", torch.tensor(logn)[None, :, None, None])
        module.masked_bias.fill_(-1e4)
        if "bias" in module._buffers:
            _surgery_causal(module.bias)
            _surgery_restore_buffers(module.rotary_emb)
    elif isinstance(module, RotaryEmbedding):
        inv_freq = 1.0 / (module.base ** (torch.arange(0, module.dim, 2).float() / module.dim))
        _surgery_refill(module, "inv_freq", inv_freq)
    elif isinstance(module, QWenModel) and hasattr(module, "rotary_emb"):
        _surgery_restore_buffers(module.rotary_emb)
        if getattr(module, "registered_causal_mask", None) is not None:
            _surgery_causal(module.registered_causal_mask)
'''

# 2023-08: what replaces the attention's own table and its use, and the branch `apply_rotary_pos_emb` gains
PAIR_APPLY = """if isinstance(freqs, list):
    cos, sin = freqs
    rot_dim = cos.shape[-1]
    t_, t_pass_ = t[..., :rot_dim].float(), t[..., rot_dim:].float()
    t_ = (t_ * cos) + (_rotate_half(t_) * sin)
    return torch.cat((t_, t_pass_), dim=-1).type_as(t)
"""
PAIR_ROTATE = """if rotary_pos_emb is None:
    rotary_pos_emb = {own}
    rotary_pos_emb = [rotary_pos_emb.cos(), rotary_pos_emb.sin()]
cur_len = query.shape[1]
q_pos_emb = k_pos_emb = [t[:, -cur_len:, :, :] for t in rotary_pos_emb]
query = apply_rotary_pos_emb(query, q_pos_emb)
key = apply_rotary_pos_emb(key, k_pos_emb)
"""

PRESENT = m.If(test=m.Name("use_cache"), body=contains(m.AssignTarget(m.Name("present"))))
CACHE_CONCAT = m.If(test=m.Comparison(left=m.Name("layer_past"), comparisons=[IS_NOT_NONE]))

PATCHES = [
    Patch("sdpa-off", "SUPPORT_TORCH2 = False: torch 2 SDPA does not export to static ONNX",
          [partial(ForceModuleConstant, "SUPPORT_TORCH2", "False")], required=False,
          absent_reason="this revision predates SDPA support (no SUPPORT_TORCH2 flag)"),
    Patch("sdpa-branch", "drop the SDPA branch in attention, keep the eager `_attn` path",
          [partial(KeepElseOfFlagBranch, "SUPPORT_TORCH2")], required=False,
          absent_reason="this revision has no SDPA branch"),
    Patch("full-divisor", "`attn_weights / torch.full([], s)` -> `/ s`: the 0-d full breaks shape inference",
          [ScalarDivision], required=False,
          absent_reason="this revision already divides by a plain scalar"),
    Patch("causal-mask", "remove the built-in causal mask; only the additive attention_mask input masks",
          [RegisteredCausalMask, TrilCausalMask]),
    Patch("attention-mask", "add the additive attention_mask in an `_attn` that never reads it",
          [AddAttentionMask], required=False,
          absent_reason="`_attn` already adds attention_mask in this revision"),
    Patch("rotary-input", "each attention takes this step's [cos, sin] rows from its block's caller (2023-08)",
          [partial(RotaryFromCaller, "rotary_pos_emb", "rotary_emb", "apply_rotary_pos_emb", "attn", PAIR_ROTATE,
                   PAIR_APPLY)], required=False,
          absent_reason="QWenModel builds the rotary table and passes it to every block in this revision"),
    Patch("present-kv", "take `present = (key, value)` before the cache concat: blocks return this step's K/V",
          [partial(HoistBefore, PRESENT, CACHE_CONCAT, name="hoist-present",
                   anchor="`if use_cache: present = ...` after `if layer_past is not None:` in one block",
                   note="present holds only this step's K/V")]),
    Patch("stream-generator", "make the transformers_stream_generator import optional (loader refuses it)",
          [partial(OptionalImport, "transformers_stream_generator")], required=False,
          absent_reason="this revision does not import transformers_stream_generator"),
    Patch("head-mask", "replace `self.get_head_mask(...)` (removed in transformers 5)",
          [partial(ReplaceMethodCall, "get_head_mask", "([None] * {1} if {0} is None else {0})",
                   note="get_head_mask was removed in transformers 5")], required=False,
          absent_reason="this revision does not call get_head_mask"),
    Patch("restore-buffers", "rebuild non-persistent buffers that transformers 5 leaves uninitialised",
          [partial(CallFirstInMethod, "QWenPreTrainedModel", "_init_weights", RESTORE_BUFFERS,
                   "_surgery_restore_buffers(module)",
                   note="transformers 5 leaves non-persistent buffers uninitialised")]),
]

# the remote code's own layout: `transformer.h` blocks, MHA (as many K/V heads as heads), `kv_channels`
EXPORT_SPEC = ArchSpec(
    embedding="transformer.wte",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    rope_tables=qwen_rope,
    call_block=qwen_block,
    num_kv_heads=lambda c: c.num_attention_heads,
    head_dim=lambda c: c.kv_channels,
    engine=QWEN_ENGINE,
)


def config_edits(opts: ApplyOptions) -> dict[str, object]:
    # logn scaling and dynamic NTK are identities up to the trained length; in a static decode graph the
    # history is padded to SEQ, so the key length alone would switch them on and skew every query.
    edits: dict[str, object] = {"use_flash_attn": False, "use_logn_attn": False, "use_dynamic_ntk": False}
    if opts.seq_length:
        edits |= {"seq_length": opts.seq_length, "max_position_embeddings": opts.seq_length}
    if opts.dtype:
        edits |= {flag: opts.dtype == flag for flag in ("bf16", "fp16", "fp32")}
    return edits


PACK = Pack(
    name="qwen",
    version="1.0.0",
    summary="Qwen-v1 remote code (Qwen-7B/1.8B/14B-Chat), 2023-08 to 2023-12 revisions",
    model_types=("qwen",),
    architectures=("QWenLMHeadModel",),
    files={"modeling_qwen.py": PATCHES},
    config_edits=config_edits,
    checked_with=">=5.0,<6",
    load_only=("stream-generator", "head-mask", "restore-buffers"),
    export_spec=EXPORT_SPEC,
)
