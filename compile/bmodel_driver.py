"""Runs a combined LLM bmodel the way LLM-TPU's runtime does, on TPU-MLIR's runtime library (`pyruntime_bm`,
the CPU-simulator build in the wheel). Imported by tpumlir_worker.py inside the sophgo toolchain
environment (Python 3.10; `surgery` is not importable there).

The contract it follows is the runtime's, not ours: nets found by name (`embedding`, `embedding_cache`,
`lm_head`, optional `greedy_head` / `sample_head`, `block_i` / `block_cache_i`), layers counted from the
nets, SEQ read from the embedding net, the prompt zero-padded and masked, and the KV history kept in each
`block_cache_i`'s own input buffers (inputs 3 and 4), written row by row at the token's position. Sampling
draws one of the first `top_k` candidates of `sample_head` with its probabilities.

Vision-language bmodels hold the tower as one more net, `vision`, which is no layer (LLM-TPU's Qwen2-VL runtime,
`models/Qwen2_VL/python_demo/chat.cpp`, calls its tower `vit` and counts it out of the layers the same way). As
there, the tower's output rows are copied over the embedding output at the image tokens before `block_0`
(`forward_vit`'s d2d at `vit_offset`), and blocks whose `position_ids` input has three rows take multimodal-RoPE
positions: the prompt's (temporal, height, width) triple per token at prefill, slot p + delta in all three at
decode, computed on the host as LLM-TPU's Python pipeline computes them (surgery/vision_input.py).
"""

import time

import numpy as np

MASK = -10000.0


class Driver:
    def __init__(self, bmodel):
        import pyruntime_bm
        from tpu_mlir.python.utils.lowering import bf16_to_fp32, lowering

        self.lowering, self.bf16_to_fp32 = lowering, bf16_to_fp32
        self.model = pyruntime_bm.Model(bmodel, 0, "")
        names = set(self.model.networks)
        self.nets = {name: self.model.Net(name) for name in names}
        heads = [h for h in ("greedy_head", "sample_head", "vision") if h in names]
        self.layers = (len(names) - 3 - len(heads)) // 2
        missing = [n for i in range(self.layers) for n in (f"block_{i}", f"block_cache_{i}") if n not in names]
        if missing or not {"embedding", "embedding_cache", "lm_head"} <= names:
            raise ValueError(f"not an LLM bmodel in the runtime's layout: missing {missing or 'embedding/lm_head'}")
        self.seq = self.nets["embedding"].inputs[0].data.shape[-1]
        self.mrope = len(self.nets["block_0"].inputs[1].data.shape) == 3  # position_ids [3, 1, SEQ]

    def _set(self, tensor, value):
        value = np.asarray(value)
        tensor.data.reshape(-1)[:value.size] = self.lowering(
            value, pdtype=tensor.dtype, pshape=value.shape, pzero_point=tensor.qzero_point,
            pscale=tensor.qscale).ravel()
        return list(value.shape)

    def _out(self, tensor, shape):
        data = self.bf16_to_fp32(tensor.data) if tensor.dtype == "bf16" else np.array(tensor.data)
        return np.asarray(data, dtype=np.float32 if tensor.dtype in ("bf16", "f16", "f32") else None
                          ).reshape(-1)[:int(np.prod(shape))].reshape(shape)

    def run(self, name, feeds, keep=()):
        """Run net `name`; inputs whose index is in `keep` are left as their buffers hold them."""
        net = self.nets[name]
        shapes = [list(t.data.shape) if i in keep else self._set(t, feeds[i]) for i, t in enumerate(net.inputs)]
        return [self._out(t, s) for t, s in zip(net.outputs, net.forward_dynamic(shapes), strict=True)]

    def _write_row(self, tensor, row, value):
        """Write one position of a [1, SEQ, kv, hd] history buffer in place (the runtime's d2d at an offset)."""
        buffer = tensor.data.reshape(tensor.data.shape[0], tensor.data.shape[1], -1)
        flat = np.asarray(value, np.float32).reshape(-1)
        buffer[0, row] = self.lowering(flat, pdtype=tensor.dtype, pshape=flat.shape, pzero_point=tensor.qzero_point,
                                       pscale=tensor.qscale).ravel()

    def _next(self, logits, seen, sampling, rng):
        if sampling is None:
            if "greedy_head" in self.nets:
                return int(self.run("greedy_head", [logits])[0].reshape(-1)[0])
            return int(np.argmax(logits))
        ids = np.zeros((1, self.seq), np.int32)  # the ids seen so far, as the runtime's visited buffer
        recent = seen[-self.seq:]
        ids[0, :len(recent)] = recent
        probs, tokens = self.run("sample_head", [logits, ids, np.array([sampling["penalty"]], np.float32),
                                                 np.array([sampling["temperature"]], np.float32),
                                                 np.array([sampling["top_k"]], np.int32),
                                                 np.array([sampling["top_p"]], np.float32)])
        k = int(sampling["top_k"])
        weights = probs.reshape(-1)[:k].astype(np.float64)
        choice = 0 if k == 1 or weights.sum() <= 0 else rng.choice(k, p=weights / weights.sum())
        return int(tokens.reshape(-1)[choice])

    def _positions(self, n, media):
        """Prefill positions: [1, SEQ] 0..n-1, or [3, 1, SEQ] (the media's triples, else three equal rows)."""
        if not self.mrope:
            if media is not None and media.get("positions") is not None:
                raise ValueError("this bmodel's blocks take one position row; the media brings three")
            pos = np.zeros((1, self.seq), np.int32)
            pos[0, :n] = np.arange(n)
            return pos
        pos = np.zeros((3, 1, self.seq), np.int32)
        given = None if media is None else media.get("positions")
        pos[:, 0, :n] = np.arange(n) if given is None else given
        return pos

    def _step_position(self, p, delta):
        if not self.mrope:
            return np.array([[p]], np.int32)
        return np.full((3, 1, 1), p + delta, np.int32)

    def generate(self, prompt, max_new, eos=(), sampling=None, seed=0, media=None):
        """`media` (VL bmodels): {"embeds" [tokens, hidden], "slots" (prompt indices of the image tokens),
        "positions" [3, n] or None, "delta"}; the embeddings are the bmodel's own `vision` net's output."""
        seq, n, rng = self.seq, len(prompt), np.random.default_rng(seed)
        if not 0 < n < seq:
            raise ValueError(f"the prompt has {n} tokens; this bmodel takes 1 to {seq - 1}")
        start = time.perf_counter()
        ids = np.zeros((1, seq), np.int32)
        ids[0, :n] = prompt
        hidden = self.run("embedding", [ids])[0]
        if media is not None:  # LLM-TPU's VL runtime: the vision output copied over the image tokens' rows
            hidden[0, np.asarray(media["slots"])] = media["embeds"]
        pos = self._positions(n, media)
        delta = int(media.get("delta", 0)) if media is not None else 0
        rows = np.arange(seq)
        mask = np.where((rows[None, :] <= rows[:, None]) & (rows[:, None] < n), 0.0, MASK)[None, None]
        for i in range(self.layers):
            hidden, k, v = self.run(f"block_{i}", [hidden, pos, mask.astype(np.float32)])
            cache = self.nets[f"block_cache_{i}"]
            for slot in (3, 4):
                cache.inputs[slot].data[...] = 0
            for row in range(n):  # only the prompt's rows are kept, as the runtime's d2d copies
                self._write_row(cache.inputs[3], row, k[0, row])
                self._write_row(cache.inputs[4], row, v[0, row])
        seen = list(prompt)
        token = self._next(self.run("lm_head", [hidden[:, n - 1]])[0], seen, sampling, rng)
        prefill_ms = (time.perf_counter() - start) * 1000
        tokens, steps, length = [token], [], n + 1
        while len(tokens) < max_new and length <= seq and token not in eos:
            t0 = time.perf_counter()
            seen.append(token)
            p = length - 1
            hidden = self.run("embedding_cache", [np.array([[token]], np.int32)])[0]
            slots = np.arange(seq + 1)
            dmask = np.where((slots < p) | (slots == seq), 0.0, MASK)[None, None, None].astype(np.float32)
            for i in range(self.layers):
                cache = self.nets[f"block_cache_{i}"]
                hidden, k, v = self.run(f"block_cache_{i}", [hidden, self._step_position(p, delta), dmask],
                                        keep=(3, 4))
                self._write_row(cache.inputs[3], p, k[0, 0])
                self._write_row(cache.inputs[4], p, v[0, 0])
            token = self._next(self.run("lm_head", [hidden[:, 0]])[0], seen, sampling, rng)
            tokens.append(token)
            length += 1
            steps.append(time.perf_counter() - t0)
        return {"tokens": tokens, "prefill_ms": prefill_ms,
                "decode_tokens_per_s": len(steps) / sum(steps) if steps else 0.0}
