"""The reference runtime: exported graphs on onnxruntime, KV cache kept on the host as devices keep it.

History buffers hold SEQ slots per layer; the prefill writes slots 0..len-1, each decode step writes the
new token's K/V at its position; masks follow the manifest's conventions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from surgery.contract import decode_mask, prefill_mask
from surgery.errors import SurgeryError
from surgery.manifest import Manifest

if TYPE_CHECKING:
    from surgery.vision_input import Media


@dataclass(frozen=True)
class Sampling:
    """What the `sample_head` net takes (LLM-TPU's defaults: penalty 1.0, temperature 1.0, top-k 50, top-p
    1.0); the runtime draws one of the first `top_k` candidates with their probabilities."""

    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    penalty: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    tokens: list[int]
    prefill_ms: float
    decode_tokens_per_s: float
    steps: list[float] = field(default_factory=list)


class Runtime:
    """Generation over the block contract; subclasses say how one graph runs."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.manifest = Manifest.read(self.dir)
        self.manifest.require_numpy_dtype("surgery run")
        layers = sorted(g.layer for g in self.manifest.graphs if g.kind == "block")
        if layers != list(range(self.manifest.num_layers)):
            raise SurgeryError(f"{self.dir} holds blocks {layers}, not all {self.manifest.num_layers} layers; "
                               "export without --blocks to run it")
        block = self.manifest.graph("block_0")
        self.float = np.dtype(block.inputs[0].dtype)
        # multimodal RoPE: position_ids [3, 1, S] (temporal, height, width) instead of [1, S]
        self.mrope = len(next((t.shape for t in block.inputs if t.name == "position_ids"), [1, 1])) == 3
        table = self.manifest.embedding_file
        self.table = (np.memmap(self.dir / table["file"], dtype="<u2", mode="r", shape=tuple(table["shape"]))
                      if table else None)

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [1, S] -> [1, S, H] from the embedding graph, or from the bf16 table on disk."""
        if self.table is None:
            name = "embedding" if ids.shape[1] > 1 else "embedding_cache"
            return self.run(name, input_ids=ids.astype(np.int32))[0]
        bits = self.table[ids[0]].astype(np.uint32) << 16
        return bits.view(np.float32)[None].astype(self.float)

    def generate(self, prompt: list[int], max_new_tokens: int, eos: set[int] | None = None,
                 sampling: Sampling | None = None, media: Media | None = None) -> Generation:
        """Greedy through `greedy_head`, or (`sampling`) a draw from what `sample_head` returns. `media`
        (VL exports, surgery/vision_input.py): image embeddings replace the image-token rows of the prompt
        before the first block, and positions follow multimodal RoPE."""
        m = self.manifest
        seen, rng = list(prompt), np.random.default_rng(sampling.seed if sampling else 0)
        seq, n = m.seq_length, len(prompt)
        if not 0 < n < seq:
            raise SurgeryError(f"the prompt has {n} tokens; this export takes 1 to {seq - 1} "
                               f"(re-export with a larger --seq-length)")
        start = time.perf_counter()
        ids = np.zeros((1, seq), np.int32)
        ids[0, :n] = prompt
        hidden = self.embed(ids)
        if media is not None:
            hidden[0, media.slots] = media.embeds.astype(self.float)
        pos = self._prefill_positions(n, media)
        mask = prefill_mask(seq, n, self.float)
        k_cache, v_cache = [], []
        for i in range(m.num_layers):
            hidden, k, v = self.run(f"block_{i}", input_states=hidden, position_ids=pos, attention_mask=mask)
            k_cache.append(k)
            v_cache.append(v)
        token = self._next(hidden[:, n - 1], seen, sampling, rng)
        prefill_ms = (time.perf_counter() - start) * 1000
        tokens, steps = [token], []
        length = n + 1  # tokens so far, including the one just produced
        while len(tokens) < max_new_tokens and length <= seq and not (eos and token in eos):
            t0 = time.perf_counter()
            seen.append(token)
            p = length - 1
            hidden = self.embed(np.array([[token]], np.int32))
            dmask = decode_mask(seq, p, self.float)
            for i in range(m.num_layers):
                hidden, k, v = self.run(f"block_cache_{i}", input_states=hidden,
                                        position_ids=self._step_position(p, media), attention_mask=dmask,
                                        history_k=k_cache[i], history_v=v_cache[i])
                k_cache[i][:, p] = k[:, 0]
                v_cache[i][:, p] = v[:, 0]
            token = self._next(hidden[:, 0], seen, sampling, rng)
            tokens.append(token)
            length += 1
            steps.append(time.perf_counter() - t0)
        rate = len(steps) / sum(steps) if steps else 0.0
        return Generation(tokens, prefill_ms, rate, steps)

    def _prefill_positions(self, n: int, media: Media | None) -> np.ndarray:
        """[1, SEQ] positions 0..n-1, or [3, 1, SEQ] under multimodal RoPE (text-only: three equal rows)."""
        seq = self.manifest.seq_length
        if media is not None and self.manifest.vision is None:
            raise SurgeryError(f"{self.dir} is not a vision-language export; it cannot take an image")
        if not self.mrope:
            pos = np.zeros((1, seq), np.int32)
            pos[0, :n] = np.arange(n)
            return pos
        pos = np.zeros((3, 1, seq), np.int32)
        pos[:, 0, :n] = media.positions if media is not None and media.positions is not None else np.arange(n)
        return pos

    def _step_position(self, p: int, media: Media | None) -> np.ndarray:
        """The decode step's position: slot p, shifted by the image's delta under multimodal RoPE."""
        if not self.mrope:
            return np.array([[p]], np.int32)
        return np.full((3, 1, 1), p + (media.delta if media is not None else 0), np.int32)

    def _next(self, hidden_row: np.ndarray, seen: list[int], sampling: Sampling | None,
              rng: np.random.Generator) -> int:
        logits = self.run("lm_head", hidden_states=hidden_row)[0]
        if sampling is None:
            return int(self.run("greedy_head", m_logits=logits)[0].reshape(-1)[0])
        ids = np.zeros((1, self.manifest.seq_length), np.int32)  # the ids seen so far, zero-padded
        recent = seen[-self.manifest.seq_length:]
        ids[0, :len(recent)] = recent
        probs, tokens = self.run("sample_head", m_logits=logits, input_ids=ids,
                                 penalty=np.array([sampling.penalty], np.float32),
                                 temperature=np.array([sampling.temperature], np.float32),
                                 top_k=np.array([sampling.top_k], np.int32),
                                 top_p=np.array([sampling.top_p], np.float32))
        weights = probs.reshape(-1)[:sampling.top_k].astype(np.float64)
        pick = 0 if sampling.top_k == 1 or weights.sum() <= 0 else rng.choice(len(weights), p=weights / weights.sum())
        return int(tokens.reshape(-1)[pick])


class OnnxModel(Runtime):
    """The exported graphs on onnxruntime (CPU). `prepack=False` for one-shot parity references: weights
    stay memory-mapped instead of copied."""

    def __init__(self, directory: str | Path, prepack: bool = True) -> None:
        from surgery.onnxio import ort_session

        super().__init__(directory)
        self.sessions = {g.name: ort_session(self.dir / g.file, prepack) for g in self.manifest.graphs}

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        return self.sessions[name].run(None, feeds)


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False):
    """The tokenizer `surgery export` copied next to the graphs."""
    manifest = Manifest.read(Path(directory))
    if not manifest.tokenizer_files:
        raise SurgeryError(f"{directory} has no tokenizer files; pass --prompt-ids instead of --prompt")
    return tokenizer_from(directory, trust_remote_code)


def tokenizer_from(directory: str | Path, trust_remote_code: bool = False):
    """AutoTokenizer from a model, export or bundle directory, with a one-line error."""
    from transformers import AutoTokenizer

    if not Path(directory).is_dir():
        raise SurgeryError(f"{directory} is not a directory; pass a model or bundle directory")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"cannot load the tokenizer in {directory} ({str(exc).splitlines()[0]}); "
                           "pass --trust-remote-code if it ships its own code, or use --prompt-ids") from None


def open_runtime(directory: str | Path) -> Runtime:
    """The runtime the directory's manifest names (onnxruntime for exports, MNN for `compile --chip mnn`)."""
    from surgery.compile.registry import runtime_for

    manifest = Manifest.read(Path(directory))
    runtime = OnnxModel if manifest.backend == "onnxruntime" else runtime_for(manifest.backend)
    if runtime is None:
        raise SurgeryError(f"{directory} holds {manifest.backend} models, which run on the device; "
                           "run the exported ONNX directory on the host instead")
    return runtime(directory)


def encode_prompt(tokenizer, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Prompt ids as the model expects them: wrapped in its chat template when asked (and it has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def stop_ids(manifest: Manifest, tokenizer=None) -> set[int]:
    """Every end-of-sequence id: the model config's (one or a list) and the tokenizer's."""
    eos = manifest.eos_token_id
    ids = {eos} if isinstance(eos, int) else {i for i in (eos or []) if isinstance(i, int)}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
