"""`tokenizer.txt` for MNN's LLM engine, written from a byte-level BPE `tokenizer.json`.

The engine reads a text file (transformers/llm/engine/src/tokenizer/tokenizer.cpp, `createTokenizer`,
`Tokenizer::load_special`, `HuggingfaceTokenizer::load_vocab`): a header `430 <type>`; a line
`n_special n_stop n_prefix`; one line with those ids; then, for type 3 (HUGGINGFACE, byte-level BPE),
`n_vocab n_merges`, one token per line in id order, one merge `a b` per line in rank order. Its encoder
splits text with GPT-2's pattern and maps bytes with GPT-2's byte-to-unicode table, so only byte-level BPE
tokenizers are written; others get a one-line error naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError

MAGIC = 430
HUGGINGFACE = 3  # tokenizer.hpp: SENTENCEPIECE 0, TIKTOKEN 1, BERT 2, HUGGINGFACE 3, PIPELINE 4


def _is_byte_level(tok: dict) -> bool:
    def kinds(part: dict | None) -> set[str]:
        if not part:
            return set()
        return {part.get("type", "")} | {k for p in part.get("pretokenizers", []) for k in kinds(p)}

    return tok.get("model", {}).get("type") == "BPE" and "ByteLevel" in kinds(tok.get("pre_tokenizer"))


def tokenizer_text(directory: Path, stop_ids: list[int], prefix_ids: list[int] = ()) -> str:
    """The engine's type-3 tokenizer file for the `tokenizer.json` in `directory`."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise SurgeryError(f"MNN's engine needs tokenizer.txt, written from tokenizer.json, which {directory} "
                           "does not have")
    tok = json.loads(path.read_text(encoding="utf-8"))
    if not _is_byte_level(tok):
        raise SurgeryError("MNN's engine layout writes tokenizer.txt for byte-level BPE tokenizers only (type 3); "
                           f"{path} is another kind")
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab |= added
    size = max(vocab.values()) + 1
    by_id = [""] * size  # ids nothing names stay empty lines (never produced by the encoder)
    for token, i in vocab.items():
        if "\n" in token or "\r" in token:
            raise SurgeryError(f"token {i} contains a line break, which tokenizer.txt cannot hold")
        by_id[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    special = sorted(t["id"] for t in tok.get("added_tokens", []) if t.get("special"))
    lines = [f"{MAGIC} {HUGGINGFACE}", f"{len(special)} {len(stop_ids)} {len(prefix_ids)}",
             " ".join(str(i) for i in [*special, *stop_ids, *prefix_ids]), f"{size} {len(merges)}", *by_id, *merges]
    return "\n".join(lines) + "\n"


def stop_token_ids(directory: Path, eos: int | list[int] | None) -> list[int]:
    """The model's EOS ids, and the tokenizer's `eos_token` (chat models stop on it, e.g. <|im_end|>)."""
    ids = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    config, tok = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if config.is_file() and tok.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        name = name.get("content") if isinstance(name, dict) else name
        added = {t["content"]: t["id"] for t in json.loads(tok.read_text(encoding="utf-8")).get("added_tokens", [])}
        if name in added and added[name] not in ids:
            ids.append(added[name])
    return ids
