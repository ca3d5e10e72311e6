"""The block contract as torch modules: each wraps a piece of the patched model with static I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgery.export.arch import ArchSpec


class Embedding(torch.nn.Module):
    """input_ids int32 [1, S] -> [1, S, H], times the family's embedding scale when it has one."""

    def __init__(self, wte: torch.nn.Module, scale: float | None = None) -> None:
        super().__init__()
        self.wte, self.scale = wte, scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.wte(input_ids)
        return rows if self.scale is None else rows * self.scale


class _Block(torch.nn.Module):
    def __init__(self, spec: ArchSpec, block: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor,
                 sections: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.spec, self.block, self.sections = spec, block, sections
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # embedding() becomes a plain Gather, which takes int32 indices (GatherND would need int64)
        if self.sections is None:
            return F.embedding(position_ids, self.cos), F.embedding(position_ids, self.sin)
        return self._mrope(position_ids, self.cos), self._mrope(position_ids, self.sin)

    def _mrope(self, position_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Multimodal RoPE: position_ids [3, 1, S]; frequency section i (the sections repeat for the second
        half of the head) takes its rows from component i % 3, as the model's rotary module composes them."""
        rows = [F.embedding(position_ids[c], table) for c in range(3)]  # each [1, S, D]
        parts, start = [], 0
        for i, width in enumerate(self.sections * 2):
            parts.append(rows[i % 3][..., start:start + width])
            start += width
        return torch.cat(parts, dim=-1)


class Prefill(_Block):
    """input_states [1,SEQ,H], position_ids int32 [1,SEQ], attention_mask [1,1,SEQ,SEQ]
    -> hidden_states, past_k, past_v [1,SEQ,kv_heads,head_dim]."""

    def forward(self, input_states, position_ids, attention_mask):
        cos, sin = self.rope(position_ids)
        return self.spec.call_block(self.block, input_states, cos, sin, attention_mask, None)


class Decode(_Block):
    """input_states [1,1,H], position_ids [1,1], attention_mask [1,1,1,SEQ+1], history_k/v [1,SEQ,kv,hd]
    -> hidden_states, past_k, past_v [1,1,kv,hd] (this token only)."""

    def forward(self, input_states, position_ids, attention_mask, history_k, history_v):
        cos, sin = self.rope(position_ids)
        return self.spec.call_block(self.block, input_states, cos, sin, attention_mask, (history_k, history_v))


class LmHead(torch.nn.Module):
    """hidden_states [1, H] -> logits [1, vocab] (final norm, the family's divisor if any, head)."""

    def __init__(self, norm: torch.nn.Module, head: torch.nn.Module, divisor: float | None = None) -> None:
        super().__init__()
        self.norm, self.head, self.divisor = norm, head, divisor

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden_states)
        return self.head(hidden if self.divisor is None else hidden / self.divisor)


class GreedyHead(torch.nn.Module):
    """logits [1, vocab] -> token int64 [1, 1] (the first of the largest). ArgMax rather than TopK(1): TPU-MLIR
    compiles TopK into a dynamic net whose bytes depend on the compiler process's history (not reproducible),
    ArgMax into a static one."""

    def forward(self, m_logits: torch.Tensor) -> torch.Tensor:
        return torch.argmax(m_logits.float(), dim=-1, keepdim=True)


class SampleHead(torch.nn.Module):
    """The sampling net LLM-TPU's runtime looks up by the name `sample_head`, with its input order:
    m_logits [1,V], input_ids int32 [1,N] (the ids seen so far; the runtime may pass fewer than SEQ, so the
    compiler builds it dynamic), penalty, temperature [1], top_k int32 [1], top_p [1]
    -> probs [1, CANDIDATES], tokens [1, CANDIDATES].

    Repetition penalty on the ids seen, the CANDIDATES most likely tokens, those past `top_k` dropped,
    temperature, then top-p keeping at least `min_keep`; the runtime draws one of the first top_k tokens with
    the probabilities. The min-keep rule is a float multiplier on the cumulative probability, not a boolean
    Or: TPU-MLIR 1.30.2's model_transform fails on an Or with a constant operand ("operand ... not found").
    """

    CANDIDATES = 50

    def __init__(self, min_keep: int = 5) -> None:
        super().__init__()
        self.register_buffer("after_min_keep", (torch.arange(self.CANDIDATES)[None] >= min_keep).float(),
                             persistent=False)
        self.register_buffer("rank", torch.arange(self.CANDIDATES)[None], persistent=False)

    def forward(self, m_logits, input_ids, penalty, temperature, top_k, top_p):
        logits = m_logits.float()
        ids = input_ids.long()
        seen = torch.gather(logits, 1, ids)
        logits = logits.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
        top, tokens = torch.topk(logits, self.CANDIDATES)
        top = torch.where(self.rank < top_k, top / temperature, torch.full_like(top, -1000.0))
        keep = top.softmax(dim=1).cumsum(dim=1) * self.after_min_keep < top_p
        probs = torch.where(keep, top, torch.full_like(top, -1000.0)).softmax(dim=1)
        return probs, tokens.int()
