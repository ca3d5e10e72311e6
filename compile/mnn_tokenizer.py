"""`tokenizer.txt` for MNN's LLM engine: which of its text formats a checkpoint's tokenizer files give.

The engine reads a text file (transformers/llm/engine/src/tokenizer/tokenizer.cpp, `createTokenizer`,
`Tokenizer::load_special`): a header `430 <type>`; a line `n_special n_stop n_prefix`; one line with those ids
(special ids are matched as whole strings, their decoded text, before the rest is encoded; stop ids end
generation; prefix ids go in front of every encoding, e.g. a BOS); then the type's own vocabulary:

- type 3 (HUGGINGFACE, here): `n_vocab n_merges`, one token per line in id order, one merge `a b` per line in
  rank order (`HuggingfaceTokenizer::load_vocab`). Its encoder splits text with GPT-2's pattern and maps bytes
  with GPT-2's byte-to-unicode table, so only byte-level BPE `tokenizer.json` files are written this way.
- type 0 (SENTENCEPIECE) from `tokenizer.model`: compile/mnn_tokenizer_sp.py.
- type 1 (TIKTOKEN) from Qwen-v1's `qwen.tiktoken`: compile/mnn_tokenizer_tiktoken.py.

Chosen in that order: a byte-level BPE `tokenizer.json` is the model's own tokenizer exactly; a checkpoint
that ships `tokenizer.model` beside another kind of `tokenizer.json` (a Metaspace/SentencePiece-BPE one, as
Llama-2 has) gets type 0 from the model, which is what llmexport's text export does with it too (its
newer default, the binary type 4 `.mtok` built from tokenizer.json's whole pipeline, is not written here).
A non-byte-level `tokenizer.json` alone is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.compile.mnn_tokenizer_sp import piece_id, sentencepiece_text
from surgery.compile.mnn_tokenizer_tiktoken import tiktoken_text
from surgery.errors import SurgeryError

MAGIC = 430
HUGGINGFACE = 3  # tokenizer.hpp: SENTENCEPIECE 0, TIKTOKEN 1, BERT 2, HUGGINGFACE 3, PIPELINE 4


def _is_byte_level(tok: dict) -> bool:
    def kinds(part: dict | None) -> set[str]:
        if not part:
            return set()
        return {part.get("type", "")} | {k for p in part.get("pretokenizers", []) for k in kinds(p)}

    return tok.get("model", {}).get("type") == "BPE" and "ByteLevel" in kinds(tok.get("pre_tokenizer"))


def header(kind: int, special: list[int], stop: list[int], prefix: list[int]) -> str:
    """The lines every type starts with: magic and type, the three counts, the ids."""
    return "\n".join([f"{MAGIC} {kind}", f"{len(special)} {len(stop)} {len(prefix)}",
                      " ".join(str(i) for i in [*special, *stop, *prefix])])


def tokenizer_text(directory: Path, stop_ids: list[int], prefix_ids: list[int] = ()) -> str:
    """The engine's tokenizer file for the tokenizer files in `directory` (see the module docstring for which)."""
    path, prefix_ids = directory / "tokenizer.json", list(prefix_ids)
    try:
        tok = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path} is not a JSON tokenizer ({e}); copy it again from the checkpoint") from None
    if tok is not None and _is_byte_level(tok):
        return _huggingface_text(tok, stop_ids, prefix_ids)
    if (directory / "tokenizer.model").is_file():
        return sentencepiece_text(directory, stop_ids, prefix_ids, header)
    if (directory / "qwen.tiktoken").is_file():
        return tiktoken_text(directory, stop_ids, prefix_ids, header)
    if tok is not None:
        kind = tok.get("model", {}).get("type", "unknown")
        raise SurgeryError(f"{path} is a {kind} tokenizer that is not byte-level BPE and no tokenizer.model is "
                           "beside it; MNN's engine layout writes tokenizer.txt from a byte-level BPE "
                           "tokenizer.json, a SentencePiece tokenizer.model or qwen.tiktoken (llmexport would "
                           "write its binary tokenizer.mtok, which surgery does not)")
    raise SurgeryError(f"MNN's engine needs tokenizer.txt, written from tokenizer.json, tokenizer.model or "
                       f"qwen.tiktoken, none of which {directory} has")


def _huggingface_text(tok: dict, stop_ids: list[int], prefix_ids: list[int]) -> str:
    """Type 3 from a byte-level BPE tokenizer.json: its vocabulary by id and its merges by rank."""
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
    lines = [header(HUGGINGFACE, special, stop_ids, prefix_ids), f"{size} {len(merges)}", *by_id, *merges]
    return "\n".join(lines) + "\n"


def stop_token_ids(directory: Path, eos: int | list[int] | None) -> list[int]:
    """The model's EOS ids, and the tokenizer's `eos_token` (chat models stop on it, e.g. <|im_end|>)."""
    ids = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    config, tok = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if not config.is_file():
        return ids
    name = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    name = name.get("content") if isinstance(name, dict) else name
    found = None
    if tok.is_file() and _is_byte_level(data := json.loads(tok.read_text(encoding="utf-8"))):
        found = {t["content"]: t["id"] for t in data.get("added_tokens", [])}.get(name)
    elif (directory / "tokenizer.model").is_file():  # the piece the type-0 file is written from
        found = piece_id(directory, name)
    if found is not None and found not in ids:
        ids.append(found)
    return ids
