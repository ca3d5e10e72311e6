"""`tokenizer.txt` type 0 (SENTENCEPIECE) for MNN's LLM engine, written from a SentencePiece `tokenizer.model`.

What the engine reads after the shared header (`Sentencepiece::load_vocab`, tokenizer.cpp; the same code at tag
3.6.1, the wheel, and at 4d40bdb): a line `n`, then `n` lines `<base64 piece> <score> <type>`, the line's index
being the id. `type` is SentencePiece's own enum (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte). Only normal pieces take part in merges; the others are looked up whole (`reserved_id_map_`).

How it encodes (`Sentencepiece::encode`, `bpe_encode`): every ' ' becomes U+2581 and one U+2581 is put in front
(no other normalization), the text is split into UTF-8 characters, and adjacent symbols merge, best score first
(leftmost on ties), whenever their concatenation is a normal piece: SentencePiece's BPE algorithm
(`bpe_model.cc`), whatever the model's trainer type says. A symbol that is not a piece becomes its bytes'
`<0xNN>` pieces (byte fallback is always on). Decoding an id gives its piece with the first U+2581 turned into a
space (`Llm::tokenizer_decode` turns a `<0xNN>` piece into its byte).

So pieces are written as the model stores them, U+2581 and all. MNN's own `llmexport` replaces U+2581 by ' ' in
the pieces it writes; since the engine started normalizing spaces to U+2581 itself (3.2.4) such a file no longer
matches any piece that starts a word, so we do not copy that step. Unigram models are refused: the engine would
run BPE merges over a unigram vocabulary. Control, unknown and (longer than one character) user-defined pieces
and the tokenizer's added tokens go in the special list, which the engine matches as whole strings before
encoding (as Hugging Face's tokenizers do for special tokens, and SentencePiece does for user-defined pieces;
each part between them gets its own U+2581 in front from the engine).

Where the engine departs from a model's own SentencePiece settings it is the engine's behaviour, not the file's:
no NFKC or other normalization rule, no whitespace collapsing, a U+2581 in front even when the model says
`add_dummy_prefix: false`, byte fallback even when the model has none (then each byte maps to the unknown id),
and unused pieces are never merged into (SentencePiece merges into them, then splits them back).

The model is parsed with the SentencePiece protobuf schema transformers ships (the `sentencepiece` package is
not needed).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

from surgery.errors import SurgeryError

Header = Callable[[int, list[int], list[int], list[int]], str]  # kind, special, stop, prefix -> header lines

SENTENCEPIECE = 0
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.ModelType
CHATGLM_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def load_model(path: Path):
    """The `ModelProto` in `path`, or one line saying the file is not a SentencePiece model."""
    from google.protobuf.message import DecodeError
    from transformers.utils import sentencepiece_model_pb2_new as spm

    model = spm.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise SurgeryError(f"{path} is not a SentencePiece model (protobuf: {e}); copy it again from the "
                           "checkpoint") from None
    if not model.pieces:
        raise SurgeryError(f"{path} holds no SentencePiece pieces; copy it again from the checkpoint")
    return model


def _config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def added_tokens(directory: Path, n_pieces: int) -> dict[int, str]:
    """Tokens the Hugging Face tokenizer has beside the model's pieces, by id: `added_tokens_decoder` of
    tokenizer_config.json, and ChatGLM2/3's, which its tokenization_chatglm.py numbers right after the pieces
    in code (the last four only in ChatGLM3, whose tokenizer_config.json names them)."""
    config = _config(directory)
    decoder = config.get("added_tokens_decoder") or {}
    added = {int(i): t["content"] for i, t in decoder.items() if isinstance(t, dict) and t.get("content")}
    if config.get("tokenizer_class") == "ChatGLMTokenizer":
        glm3 = "<|user|>" in json.dumps(config)
        names = [*CHATGLM_SPECIAL, *(CHATGLM3_ROLES if glm3 else ())]
        added |= {n_pieces + i: name for i, name in enumerate(names) if n_pieces + i not in added}
    return added


def chatglm_prefix(directory: Path, added: dict[int, str]) -> list[int]:
    """[gMASK] sop, which ChatGLM2/3's tokenizer puts in front of every prompt (`get_prefix_tokens`), unless its
    chat template already spells them (the engine puts the prefix in front of the templated prompt)."""
    config = _config(directory)
    if config.get("tokenizer_class") != "ChatGLMTokenizer" or "[gMASK]" in (config.get("chat_template") or ""):
        return []
    ids = {t: i for i, t in added.items()}
    return [ids["[gMASK]"], ids["sop"]]


def extra_special_ids(directory: Path) -> list[int]:
    """Ids chat code puts in prompts that the text cannot spell otherwise (Baichuan2's user/assistant tokens in
    generation_config.json), special for the engine as llmexport makes them."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    config = json.loads(path.read_text(encoding="utf-8"))
    return [config[k] for k in ("user_token_id", "assistant_token_id") if isinstance(config.get(k), int)]


def sentencepiece_text(directory: Path, stop_ids: list[int], prefix_ids: list[int], header: Header) -> str:
    """The engine's type-0 file for `directory/tokenizer.model`; `header` formats the shared header lines."""
    path = directory / "tokenizer.model"
    model = load_model(path)
    if model.trainer_spec.model_type != BPE:  # unset reads as UNIGRAM, SentencePiece's default
        kind = "unigram" if model.trainer_spec.model_type == 1 else "word/char"
        raise SurgeryError(f"{path} is a {kind} SentencePiece model; MNN's engine encodes type-0 tokenizers "
                           "with BPE merges only, so it would tokenize this model wrongly")
    rows = [(p.piece, p.score, p.type or NORMAL) for p in model.pieces]
    added = added_tokens(directory, len(rows))
    prefix_ids = prefix_ids or chatglm_prefix(directory, added)
    extra = {i: t for i, t in added.items() if i >= len(rows)}
    if extra:  # ids past the model: whole-match pieces, gaps as empty control pieces (matched by nothing)
        rows += [("", 0.0, CONTROL)] * (max(extra) + 1 - len(rows))
        for i, token in extra.items():
            rows[i] = (token, 0.0, USER_DEFINED)
    # single characters need no whole-string match (the engine looks every leftover symbol up among them too),
    # and a special splits the text, each part getting its own leading U+2581
    special = [i for i, (piece, _, kind) in enumerate(rows)
               if kind in (CONTROL, UNKNOWN) and piece or kind == USER_DEFINED and len(piece) > 1]
    special += [i for i in [*added, *extra_special_ids(directory)] if i not in special]
    lines = [header(SENTENCEPIECE, special, stop_ids, prefix_ids), str(len(rows))]
    for piece, score, kind in rows:
        lines.append(f"{base64.b64encode(piece.encode('utf-8')).decode('ascii')} {score!r} {kind}")
    return "\n".join(lines) + "\n"


def piece_id(directory: Path, name: str | None) -> int | None:
    """The id of the piece (or added token) spelled `name`, e.g. the eos_token of tokenizer_config.json."""
    if not name:
        return None
    pieces = load_model(directory / "tokenizer.model").pieces
    added = {t: i for i, t in added_tokens(directory, len(pieces)).items()}
    if name in added:
        return added[name]
    return next((i for i, p in enumerate(pieces) if p.piece == name), None)
