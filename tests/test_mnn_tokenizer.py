"""tokenizer.txt types 0 (SentencePiece `tokenizer.model`) and 1 (Qwen-v1 `qwen.tiktoken`) for MNN's LLM engine.

The judge is the engine's own tokenizer: MNN.llm (in the MNN toolchain's Python) loads tokenizer.txt from a
stub bundle (config.json, llm_config.json, empty model files: `Llm::load` builds the tokenizer first, then fails
on the model, and `tokenizer_encode`/`tokenizer_decode` still work), and its ids are compared with independent
references built from the same tiny tokenizers: a SentencePiece BPE written here from the piece table, Hugging
Face `tokenizers` BPE with the merges transformers derives from those pieces, and the `tiktoken` package.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest

from surgery.compile.mnn_tokenizer import stop_token_ids, tokenizer_text
from surgery.compile.toolchains import installed, python_of
from surgery.errors import SurgeryError

NEEDS_MNN = pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: `surgery toolchain install mnn`")
MERGED = ["▁t", "he", "▁the", "in", "▁a", "er", "ing", "▁qu", "ick", "▁quick", "ow", "▁b", "▁br", "own", "▁brown",
          "▁f", "ox", "▁fox", "▁d", "og", "▁dog", "at", "▁c", "▁cat", "ll", "▁he", "▁hell", "▁▁", "▁in", "▁ing",
          "▁q", "ck"]
CHARS = "▁etaoinshrdlcumwfgypbvkjxqz.,!?'TH你好"
SP_TEXTS = ["the quick brown fox", "hello there", "  two  spaces ", "the cat\nate it", "你好世界", "<s>the dog</s>",
            "Hi THE? x", "a<sep>b", "ingest in the inn", "Zebra~é"]
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
            r"""\s+(?!\S)|\s+""")
TT_MERGED = [b"th", b"the", b" t", b" the", b"he", b"ll", b"llo", b"hello", b" q", b"ui", b"uick", b" quick", b"ow",
             b"own", b" b", b"br", b" brown", b" f", b"ox", b" fox", b"12", b"in", b"ing", b"\n\n", b"\xe4\xbd",
             "你".encode()]
TT_TEXTS = ["hello the quick brown fox", "the fox\n\nthe", "<|im_start|>user\nhello<|im_end|>", "你好!", "thing"]
TT_DIFFER = ["uicker", "12 apples"]  # BPE: "ui" "c" "k" "e" "r" (no "uic"); Qwen's pattern splits digits singly


def sentencepiece_model(path: Path, model_type: int = 2) -> list[tuple[str, float, int]]:
    """A tiny SentencePiece BPE model (unk, bos/eos controls, 256 byte pieces, a user-defined piece, merged
    pieces with scores, single characters) written with the protobuf schema; returns its piece table."""
    from transformers.utils import sentencepiece_model_pb2_new as spm

    rows = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("<sep>", 0.0, 4)]
    rows += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    rows += [(p, -i - 0.5, 1) for i, p in enumerate(MERGED)] + [(c, -100.0 - i, 1) for i, c in enumerate(CHARS)]
    model = spm.ModelProto()
    model.trainer_spec.model_type, model.trainer_spec.byte_fallback = model_type, True
    model.normalizer_spec.name, model.normalizer_spec.add_dummy_prefix = "identity", True
    for piece, score, kind in rows:
        p = model.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    path.write_bytes(model.SerializeToString())
    return rows


def sentencepiece_reference(rows: list[tuple[str, float, int]], text: str) -> list[int]:
    """SentencePiece's BPE (bpe_model.cc) spelled out: whole-string specials first, then per segment ' ' -> U+2581
    with one in front, merge the adjacent pair whose concatenation is the best-scoring normal piece (leftmost on
    ties) until none is, unknown symbols as their bytes' <0xNN> pieces."""
    ids = {p: i for i, (p, _, _) in enumerate(rows)}
    normal = {p: s for p, s, k in rows if k == 1}
    special = [p for p, _, k in rows if k in (2, 3, 4)]

    def segment(s: str) -> list[int]:
        symbols = list("▁" + s.replace(" ", "▁"))
        while True:
            best = max(range(len(symbols) - 1), key=lambda i: (normal.get(symbols[i] + symbols[i + 1], -1e9), -i),
                       default=None)
            if best is None or symbols[best] + symbols[best + 1] not in normal:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        out: list[int] = []
        for sym in symbols:
            out += [ids[sym]] if sym in normal else [ids[f"<0x{b:02X}>"] for b in sym.encode("utf-8")]
        return out

    out, start, i = [], 0, 0
    while i < len(text):
        hit = next((t for t in special if text.startswith(t, i)), None)
        if hit is None:
            i += 1
            continue
        out += segment(text[start:i]) if i > start else []
        out.append(ids[hit])
        start = i = i + len(hit)
    return out + (segment(text[start:]) if start < len(text) else [])


def tokenizers_reference(rows: list[tuple[str, float, int]]):
    """Hugging Face's view of the same model: `tokenizers` BPE with byte fallback, the merges transformers'
    `generate_merges` derives from the piece scores, Llama's legacy normalizer (prepend U+2581, spaces to it)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    vocab = {p: i for i, (p, _, _) in enumerate(rows)}
    scores = {p: s for p, s, k in rows if k == 1}
    bpe = models.BPE(vocab, generate_merges(vocab, scores), unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, _, k in rows if k in (2, 3, 4)])
    return tok


def longest_prefix_reference(ranks: list[bytes], specials: dict[str, int], text: str) -> list[int]:
    """MNN's Tiktoken::encode spelled out: whole-string specials split off, then the longest token that
    prefixes the remaining bytes, repeatedly (no pre-split, no merges)."""
    ids = {t: i for i, t in enumerate(ranks)}
    out: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            out.append(specials[part])
            continue
        data = part.encode("utf-8")
        while data:
            n = max(n for n in range(1, len(data) + 1) if data[:n] in ids)
            out.append(ids[data[:n]])
            data = data[n:]
    return out


def engine(directory: Path, text: str, texts: list[str], ids: list[int]) -> dict:
    """MNN.llm's own tokenizer on `text` (tokenizer.txt), from a stub bundle: encode of each of `texts`, decode
    of each of `ids` (None where the decoded bytes are not UTF-8, which the binding cannot return)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.txt").write_text(text, encoding="utf-8")
    (directory / "config.json").write_text(json.dumps({"llm_model": "llm.mnn", "llm_weight": "llm.mnn.weight",
                                                       "tokenizer_file": "tokenizer.txt", "thread_num": 1}))
    (directory / "llm_config.json").write_text(json.dumps({"hidden_size": 8, "layer_nums": 1}))
    for name in ("llm.mnn", "llm.mnn.weight"):
        (directory / name).write_bytes(b"")
    script = """if True:
        import json, os, sys
        out = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)  # MNN prints to fd 1
        import MNN.llm as llm
        m = llm.create(sys.argv[1]); m.load()  # tokenizer loads, then the (empty) model fails
        def dec(i):
            try:
                return m.tokenizer_decode(i)
            except UnicodeDecodeError:
                return None
        args = json.loads(sys.argv[2])
        out.write(json.dumps({"encode": [list(m.tokenizer_encode(t)) for t in args["texts"]],
                              "decode": [dec(i) for i in args["ids"]]}) + "\\n")
        out.flush(); os._exit(0)"""
    done = subprocess.run([str(python_of("mnn")), "-c", script, str(directory / "config.json"),
                           json.dumps({"texts": texts, "ids": ids})], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_sentencepiece_file_layout(tmp_path: Path):
    rows = sentencepiece_model(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "add_bos_token": True}))
    stops = stop_token_ids(tmp_path, None)
    assert stops == [2]  # eos_token's piece
    lines = tokenizer_text(tmp_path, stops, [1]).splitlines()
    assert lines[:4] == ["430 0", "4 1 1", "0 1 2 3 2 1", str(len(rows))]  # unk/control/user-defined special
    written = [line.split(" ") for line in lines[4:]]
    assert [base64.b64decode(p).decode() for p, _, _ in written] == [p for p, _, _ in rows]  # U+2581 kept
    assert [(float(s), int(k)) for _, s, k in written] == [(s, k) for _, s, k in rows]


@NEEDS_MNN
def test_sentencepiece_engine_encodes_as_sentencepiece(tmp_path: Path):
    """The engine's ids equal SentencePiece's BPE and Hugging Face's tokenizer of the same pieces; its decode
    gives each piece with U+2581 as a space and byte pieces as their byte."""
    rows = sentencepiece_model(tmp_path / "tokenizer.model")
    want = [sentencepiece_reference(rows, t) for t in SP_TEXTS]
    hf = tokenizers_reference(rows)
    assert [hf.encode(t).ids for t in SP_TEXTS] == want
    ids = {p: i for i, (p, _, _) in enumerate(rows)}
    probe = [ids[p] for p in ("▁the", "ing", "▁", "你", "<s>", "<0x41>", "<0x0A>", "▁▁", "<0xE4>")]
    got = engine(tmp_path / "engine", tokenizer_text(tmp_path, [2]), SP_TEXTS, probe)
    assert got["encode"] == want
    # MNN's decode replaces only the first U+2581 of a piece (Sentencepiece::decode): "▁▁" gives " ▁"; a lone
    # non-ASCII byte piece is not UTF-8 on its own
    assert got["decode"] == [" the", "ing", " ", "你", "<s>", "A", "\n", " ▁", None]


@NEEDS_MNN
def test_tiktoken_engine_encodes_as_tiktoken(tmp_path: Path):
    """The engine's ids are the longest-prefix tokens (its algorithm); those equal tiktoken's (same ranks, Qwen-v1's
    pattern and special tokens) where the longest prefix token is also BPE's choice and stays inside one of the
    pattern's pieces, and differ where it is not (MNN's behaviour, documented in docs/mnn-llm.md)."""
    import tiktoken

    ranks = [bytes([b]) for b in range(256)] + TT_MERGED
    (tmp_path / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                    for i, t in enumerate(ranks)))
    specials = {"<|endoftext|>": len(ranks), "<|im_start|>": len(ranks) + 1, "<|im_end|>": len(ranks) + 2}
    enc = tiktoken.Encoding("tiny-qwen", pat_str=QWEN_PAT, mergeable_ranks={t: i for i, t in enumerate(ranks)},
                            special_tokens=specials)
    text = tokenizer_text(tmp_path, [len(ranks)])
    lines = text.splitlines()
    assert lines[0] == "430 1" and lines[1] == "208 2 0" and lines[3] == str(len(ranks) + 208)
    assert lines[2].split()[208:] == [str(len(ranks)), str(len(ranks) + 2)]  # eod, then <|im_end|>
    texts = [*TT_TEXTS, *TT_DIFFER]
    got = engine(tmp_path / "engine", text, texts, [ranks.index(b" quick"), len(ranks) + 1, 10, len(ranks) - 1])
    assert got["encode"] == [longest_prefix_reference(ranks, specials, t) for t in texts]
    assert got["encode"][:len(TT_TEXTS)] == [enc.encode(t, allowed_special="all") for t in TT_TEXTS]
    assert got["encode"][len(TT_TEXTS):] == [[ranks.index(b"uick"), *b"er"], [ranks.index(b"12"), *b" apples"]]
    assert [enc.encode(t) for t in TT_DIFFER] == [[ranks.index(b"ui"), *b"cker"], [*b"12", *b" apples"]]
    assert got["decode"] == [" quick", "<|im_start|>", "\n", "你"]


@NEEDS_MNN
def test_chatglm_tokens_defined_in_code(tmp_path: Path):
    """ChatGLM3's [gMASK], sop and role tokens follow the pieces (tokenization_chatglm.py); [gMASK] sop is the
    prefix unless the chat template spells it; both are whole-string specials for the engine."""
    rows = sentencepiece_model(tmp_path / "tokenizer.model")
    n = len(rows)
    config = {"tokenizer_class": "ChatGLMTokenizer", "eos_token": "</s>", "additional_special_tokens": ["<|user|>"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert stop_token_ids(tmp_path, [2, n + 6]) == [2, n + 6]  # </s> and <|user|> (generation_config's)
    text = tokenizer_text(tmp_path, [2])
    lines = text.splitlines()
    assert lines[1] == "13 1 2" and lines[2].split()[-2:] == [str(n + 1), str(n + 3)]  # prefix [gMASK] sop
    assert lines[3] == str(n + 9)
    got = engine(tmp_path / "engine", text, ["the dog", "<|user|>\n hi"], [n + 3, n + 6])
    rows += [(name, 0.0, 4) for name in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                                          "<|assistant|>", "<|observation|>")]
    assert got["encode"] == [[n + 1, n + 3, *sentencepiece_reference(rows, t)] for t in ("the dog", "<|user|>\n hi")]
    assert got["decode"] == ["sop", "<|user|>"]
    config["chat_template"] = "[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>\n {{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_text(tmp_path, [2]).splitlines()[1] == "13 1 0"  # the template spells the prefix


def test_choice_between_tokenizer_files(tmp_path: Path):
    """Byte-level tokenizer.json -> type 3; a Metaspace tokenizer.json beside tokenizer.model -> type 0 from the
    model; a Metaspace tokenizer.json alone -> one line."""
    from surgery.fixtures.tokenizer import write_tokenizer

    write_tokenizer(tmp_path)
    sentencepiece_model(tmp_path / "tokenizer.model")
    assert tokenizer_text(tmp_path, []).startswith("430 3\n")
    metaspace = tokenizers_reference(sentencepiece_model(tmp_path / "tokenizer.model"))
    metaspace.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_text(tmp_path, []).startswith("430 0\n")
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(SurgeryError, match="BPE tokenizer that is not byte-level BPE and no tokenizer.model"):
        tokenizer_text(tmp_path, [])


def test_bad_tokenizer_files_give_one_line(tmp_path: Path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff garbage")
    with pytest.raises(SurgeryError, match="is not a SentencePiece model"):
        tokenizer_text(tmp_path, [])
    sentencepiece_model(tmp_path / "tokenizer.model", model_type=1)
    with pytest.raises(SurgeryError, match="unigram SentencePiece model"):
        tokenizer_text(tmp_path, [])
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "qwen.tiktoken").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(SurgeryError, match="without gaps"):
        tokenizer_text(tmp_path, [])
    (tmp_path / "qwen.tiktoken").write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(SurgeryError, match="line 2 is not"):
        tokenizer_text(tmp_path, [])
    (tmp_path / "qwen.tiktoken").unlink()
    with pytest.raises(SurgeryError, match="none of which"):
        tokenizer_text(tmp_path, [])
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(SurgeryError, match="is not a JSON tokenizer"):
        tokenizer_text(tmp_path, [])


def test_compile_writes_the_type_the_files_give(tmp_path: Path):
    """compile/mnn_llm.write_tokenizer (what `-c mnn` calls) on copied SentencePiece files: type 0, the manifest's
    BOS as the prefix when tokenizer_config.json adds one, its EOS and the eos_token's piece as stops."""
    from types import SimpleNamespace

    from surgery.compile.mnn_llm import TOKENIZER, write_tokenizer

    sentencepiece_model(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "add_bos_token": True}))
    write_tokenizer(tmp_path, SimpleNamespace(bos_token_id=1, eos_token_id=[2, 3]))
    assert (tmp_path / TOKENIZER).read_text().splitlines()[:3] == ["430 0", "4 2 1", "0 1 2 3 2 3 1"]
