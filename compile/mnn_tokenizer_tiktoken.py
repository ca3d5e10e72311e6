"""`tokenizer.txt` type 1 (TIKTOKEN) for MNN's LLM engine, written from Qwen-v1's `qwen.tiktoken`.

`qwen.tiktoken` holds one `<base64 bytes> <rank>` per line; Qwen-v1's `tokenization_qwen.py` gives the ranks as
ids and puts its special tokens right after them: <|endoftext|>, <|im_start|>, <|im_end|>, then
<|extra_0|> .. <|extra_204|> (151643.. for Qwen-7B).

What the engine reads after the shared header (`Tiktoken::load_vocab`, tokenizer.cpp; the same code at tag 3.6.1,
the wheel, and at 4d40bdb): a line `n`, then `n` lines of base64 token bytes, the line's index being the id (ranks
must therefore run 0..n-1 without gaps). llmexport writes the ranks in order, then the special tokens.

How it encodes (`Tiktoken::encode`, `Trie::find`): after the special tokens are split off (whole-string match
of the special list), the longest token that prefixes the rest of the bytes is taken, again and again. That is
not tiktoken's algorithm (a regex pre-split, then byte-pair merges by rank): on text where BPE does not end on
the longest prefix token, or where a token spans two of the regex's pieces, the engine's ids differ from the
model's own tokenizer. That is the engine's behaviour for every tiktoken model llmexport converts; the file is
the same either way. Decoding an id gives its bytes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path

from surgery.errors import SurgeryError

Header = Callable[[int, list[int], list[int], list[int]], str]  # kind, special, stop, prefix -> header lines

TIKTOKEN = 1
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
QWEN_STOP = ("<|endoftext|>", "<|im_end|>")  # llmexport: eos_token_id (eod) and im_end_id


def load_ranks(path: Path) -> list[bytes]:
    """Token bytes by rank from a `.tiktoken` file, or one line saying what is wrong with it."""
    by_rank: dict[int, bytes] = {}
    for n, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            by_rank[int(rank)] = base64.b64decode(token, validate=True)
        except (ValueError, binascii.Error):
            raise SurgeryError(f"{path} line {n} is not `<base64 token> <rank>`; copy the file again from the "
                               "checkpoint") from None
    if not by_rank or sorted(by_rank) != list(range(len(by_rank))):
        raise SurgeryError(f"{path}: ranks do not run 0..{len(by_rank) - 1} without gaps, which MNN's engine needs "
                           "(it numbers tokens by line)")
    if b"" in by_rank.values():
        raise SurgeryError(f"{path} holds an empty token, which would match everywhere in MNN's engine")
    return [by_rank[i] for i in range(len(by_rank))]


def special_ids(ranks: list[bytes]) -> dict[str, int]:
    """Qwen-v1's special tokens and their ids (right after the ranks, in tokenization_qwen.py's order)."""
    return {name: len(ranks) + i for i, name in enumerate(QWEN_SPECIAL)}


def tiktoken_text(directory: Path, stop_ids: list[int], prefix_ids: list[int], header: Header) -> str:
    """The engine's type-1 file for `directory/qwen.tiktoken`; `header` formats the shared header lines."""
    ranks = load_ranks(directory / "qwen.tiktoken")
    special = special_ids(ranks)
    stops = [*stop_ids, *(special[s] for s in QWEN_STOP if special[s] not in stop_ids)]
    tokens = [*ranks, *(name.encode("utf-8") for name in special)]
    lines = [header(TIKTOKEN, list(special.values()), stops, prefix_ids), str(len(tokens)),
             *(base64.b64encode(t).decode("ascii") for t in tokens)]
    return "\n".join(lines) + "\n"
