"""`llmflash synth`: a model in the flash layout with a real architecture's shapes and random weights.

No 7B checkpoint can be downloaded here, yet the runtime must be measured at the size it exists
for. A synthetic model has exactly the tensors, shapes, bundle sizes and file layout that
`llmflash convert` writes for the real model (it goes through the same writer: manifest,
checksums, 4096-aligned layer regions, temporary directory renamed when complete), so the reader,
memory planner, caches and compute do the same work on it. Only the values are random, so its
text is meaningless (the manifest says `"synthetic"` and the engine says so once when loading).

Presets are the published Hugging Face config.json values of the models, mapped by the normal
config mapping; `--config FILE` takes any config of a supported architecture.

Weights. Each tensor (each FFN layer's bundles) has its own random stream, PCG64 seeded from
(seed, tensor name), drawn in row chunks of a few MiB, so peak memory is one chunk whatever the
model size and the bytes do not depend on the chunk size. Values are built directly in the storage
dtype from random bits: a random sign and mantissa under a fixed exponent, i.e. i.i.d. symmetric
values whose magnitude is uniform in [a, 2a) (std a*sqrt(7/3), a a power of two). That is about 20x
faster than torch.randn plus a cast, which lets synthesis run at the speed of writing the file.
Scales keep every layer's hidden state finite and of order one: embeddings and inputs of each
projection get std 1/sqrt(fan_in); output projections (attention out, FFN down) are scaled so each
residual branch adds about 1/(2 * layers) of variance (the down std is computed from the
activation's second moment). Sparsity like the real models where the architecture allows it:
OPT's fc1 bias is set so that 3.3% of neurons fire per token (the paper's figure for OPT-6.7B);
a FATReLU model's FFN-input norm weight is set so that 10% of gate values exceed the threshold
(ProSparse: about 90% zeros). A plain gated ReLU without biases fires about half its neurons;
SiLU has no zeros.

Tokenizer: the default model's (SmolLM2, 49152 tokens). For a smaller vocabulary (Llama, Mistral:
32000) the tokenizer is cut to the first ids and the merges that build only those ids, so every
text still encodes to ids < vocab_size; for a larger one (OPT: 50272) the extra ids are added as
placeholder tokens that decode to the text `<synth_ID>` and that no text encodes to.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

from llmflash.models import ModelConfig, config_from_hf
from llmflash.conversion.source import TokenizerSpec
from llmflash.conversion.writer import check_destination, write_model_dir
from llmflash.errors import LLMFlashError
from llmflash.format import quantized
from llmflash.format.layout import DTYPES, FlashModelDir, bundle_layout_for, down_block_of, down_block_tensors
from llmflash.format.schema import expected_resident_shapes
from llmflash.models import resident_tensor_names

CHUNK_BYTES = 16 << 20  # rows generated (and held) at a time
# std of uniformly random codes: int8 any byte (-128..127), int4 any nibble minus 8 (-8..7)
QUANT_CODE_STD = {"int8": math.sqrt((256 ** 2 - 1) / 12), "int4": math.sqrt((16 ** 2 - 1) / 12),
                  "int4m": math.sqrt((16 ** 2 - 1) / 12)}
# int4m's minimum per unit of scale that centres uniform random codes 0..15 on zero
INT4M_MIN_PER_SCALE = -7.5
OPT_ACTIVE = 0.033  # share of OPT FFN neurons firing per token (the paper, OPT-6.7B)
FATRELU_ACTIVE = 0.10  # ProSparse: about 90% of neurons are zero

# Published config.json values (Hugging Face hub), trimmed to what the config mapping reads.
_OPT = {"model_type": "opt", "activation_function": "relu", "num_attention_heads": 32,
        "max_position_embeddings": 2048, "vocab_size": 50272, "do_layer_norm_before": True,
        "enable_bias": True, "layer_norm_elementwise_affine": True, "bos_token_id": 2,
        "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16"}
_LLAMA2 = {"model_type": "llama", "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": None,
           "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "float16"}
PRESETS: dict[str, dict] = {
    "opt-1.3b": {**_OPT, "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24,
                 "word_embed_proj_dim": 2048},
    "opt-6.7b": {**_OPT, "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
                 "word_embed_proj_dim": 4096},
    "llama-2-7b": dict(_LLAMA2),
    # Published with model_type "sparsellama" (SparseLLM/prosparse-llama-2-7b): Llama-2-7B's
    # shapes with hidden_act "fatrelu" and hidden_act_param 0.01; mapped here as the llama it is.
    "prosparse-llama-2-7b": {**_LLAMA2, "hidden_act": "fatrelu", "hidden_act_param": 0.01,
                             "torch_dtype": "bfloat16"},
    "mistral-7b": {**_LLAMA2, "model_type": "mistral", "intermediate_size": 14336,
                   "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                   "sliding_window": 4096, "torch_dtype": "bfloat16"},
}


# -- random values built from bits in the storage dtype -----------------------------------------
class _Bits:
    """Random values of one storage dtype: sign and mantissa random, exponent fixed."""

    def __init__(self, dtype: str):
        if dtype == "float32":
            self.uint, self.mant_bits, self.exp_bias, self.sign = np.uint32, 23, 127, 1 << 31
        elif dtype == "bfloat16":
            self.uint, self.mant_bits, self.exp_bias, self.sign = np.uint16, 7, 127, 1 << 15
        else:
            self.uint, self.mant_bits, self.exp_bias, self.sign = np.uint16, 10, 15, 1 << 15
        self.dtype = dtype
        self.keep = self.uint(self.sign | ((1 << self.mant_bits) - 1))

    @staticmethod
    def exponent(std: float) -> int:
        """The power of two a whose values (|x| uniform in [a, 2a)) have std closest to `std`."""
        return int(round(math.log2(std / math.sqrt(7 / 3))))

    @classmethod
    def actual_std(cls, std: float) -> float:
        return 2.0 ** cls.exponent(std) * math.sqrt(7 / 3)

    def raw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n random words; the draws consumed depend only on n, not on how a tensor is chunked."""
        return _random_words(rng, n, self.uint)

    def shape(self, bits: np.ndarray, std: float) -> np.ndarray:
        """Turn random words into values of about `std`, in place."""
        np.bitwise_and(bits, self.keep, out=bits)
        np.bitwise_or(bits, self.uint((self.exponent(std) + self.exp_bias) << self.mant_bits), out=bits)
        return bits

    def constant(self, value: float) -> int:
        f32 = np.array(value, dtype=np.float32)
        if self.dtype == "float32":
            return int(f32.view(np.uint32))
        if self.dtype == "bfloat16":
            return int(f32.view(np.uint32) >> 16)
        return int(np.array(value, dtype=np.float16).view(np.uint16))


def _random_words(rng: np.random.Generator, n: int, dtype) -> np.ndarray:
    """n random values of unsigned integer `dtype`, from whole 64-bit draws of `rng`."""
    return rng.bit_generator.random_raw(-(-n * np.dtype(dtype).itemsize // 8)).view(dtype)[:n]


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


# -- shapes and scales ---------------------------------------------------------------------------
def resident_shapes(config: ModelConfig) -> list[tuple[str, tuple]]:
    """(HF name, shape) of every resident tensor in file order, as a checkpoint of this config has
    them: the shapes the manifest check expects, and (hidden,) for the norms it leaves open."""
    expected = expected_resident_shapes(config)
    return [(name, expected.get(name, (config.hidden_size,))) for name in resident_tensor_names(config)]


def _second_moment(act: str, threshold: float, mean: float, std: float) -> float:
    """E[act(g)^2] for g ~ N(mean, std^2), by quadrature."""
    g = np.linspace(mean - 10 * std, mean + 10 * std, 20001)
    pdf = np.exp(-0.5 * ((g - mean) / std) ** 2)
    pdf /= pdf.sum()
    if act == "silu":
        a = g / (1 + np.exp(-g))
    elif act == "fatrelu":
        a = np.where(g > threshold, g, 0.0)
    else:
        a = np.maximum(g, 0.0)
    return float((a * a * pdf).sum())


class Scales:
    """Std (or constant value) of every tensor and bundle part, chosen from the config."""

    def __init__(self, config: ModelConfig):
        c = self.config = config
        d, L, N = c.hidden_size, c.num_layers, c.intermediate_size
        self.branch = 1.0 / (2 * L)  # variance each residual branch adds
        self.ffn_norm = 1.0  # weight of the norm in front of the FFN
        self.up_bias = 0.0
        std_in = _Bits.actual_std(1 / math.sqrt(d))  # gate / up / fc1 rows
        pre = math.sqrt(d) * std_in  # std of a neuron's pre-activation on a unit-RMS input
        if c.family == "opt" and c.hidden_act in ("relu", "fatrelu"):
            z = NormalDist().inv_cdf(1 - OPT_ACTIVE)
            self.up_bias = c.act_threshold - z * pre
            h2 = _second_moment(c.hidden_act, c.act_threshold, self.up_bias, pre)
        elif c.family == "opt":
            h2 = _second_moment(c.hidden_act, c.act_threshold, 0.0, pre)
        else:
            if c.hidden_act == "fatrelu" and c.act_threshold > 0:
                target = c.act_threshold / NormalDist().inv_cdf(1 - FATRELU_ACTIVE)
                self.ffn_norm = target / pre
            gate = pre * self.ffn_norm
            h2 = _second_moment(c.hidden_act, c.act_threshold, 0.0, gate) * gate ** 2
        self.down = math.sqrt(self.branch / (N * h2))

    def resident(self, name: str, shape: tuple) -> tuple[str, float]:
        """("const", value) or ("random", std) for a resident tensor."""
        c = self.config
        if len(shape) == 1:
            ffn_norm = (name.endswith("post_attention_layernorm.weight")
                        or (c.family == "opt" and name.endswith("final_layer_norm.weight")
                            and ".layers." in name))
            if name.endswith(".bias"):
                return "const", 0.0
            return "const", self.ffn_norm if ffn_norm else 1.0
        std = 1 / math.sqrt(shape[1])
        if name.endswith(("o_proj.weight", "out_proj.weight")):
            std *= math.sqrt(self.branch)
        return "random", std

    def part(self, name: str) -> tuple[str, float]:
        if name == "down":
            return "random", self.down
        if name in ("gate", "up"):
            return "random", 1 / math.sqrt(self.config.hidden_size)
        return "const", self.up_bias if name == "up_bias" else 0.0


# -- tokenizer -----------------------------------------------------------------------------------
def default_tokenizer() -> TokenizerSpec:
    """SmolLM2's tokenizer: from a converted default model if there is one, else from its GGUF."""
    from llmflash.defaults import llmflash_home

    for model in sorted((llmflash_home() / "models").glob("smollm2-135m-instruct-*")):
        try:
            d = FlashModelDir(model)
        except LLMFlashError:
            continue
        entry = d.manifest.get("tokenizer") or {}
        if entry.get("file"):
            return TokenizerSpec((model / entry["file"]).read_text(), entry.get("chat_template"),
                                 entry.get("bos_token"), entry.get("eos_token"))
    # Parsing the GGUF takes seconds: keep what it gives beside the converted models.
    cached = llmflash_home() / "tokenizers" / "smollm2-135m-instruct.json"
    try:
        entry = json.loads(cached.read_text())
        return TokenizerSpec(entry["tokenizer_json"], entry["chat_template"], entry["bos_token"],
                             entry["eos_token"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from llmflash.conversion.gguf_source import GGUFSource
    from llmflash.defaults import default_gguf

    spec = GGUFSource(default_gguf()).tokenizer()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"tokenizer_json": spec.tokenizer_json, "chat_template": spec.chat_template,
                                   "bos_token": spec.bos_token, "eos_token": spec.eos_token}))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home: parse again next time
    return spec


def fit_tokenizer(spec: TokenizerSpec, vocab_size: int) -> TokenizerSpec:
    """The tokenizer with exactly `vocab_size` ids (see the module docstring)."""
    tok = json.loads(spec.tokenizer_json)
    model = tok["model"]
    if model.get("type") != "BPE":
        raise LLMFlashError(f"synth needs a BPE tokenizer, got {model.get('type')}")
    size = max([*model["vocab"].values(), *(t["id"] for t in tok.get("added_tokens", []))]) + 1
    if vocab_size < size:
        vocab = {t: i for t, i in model["vocab"].items() if i < vocab_size}
        merges = []
        for m in model["merges"]:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a in vocab and b in vocab and a + b in vocab:
                merges.append(m)
        model["vocab"], model["merges"] = vocab, merges
        tok["added_tokens"] = [t for t in tok.get("added_tokens", []) if t["id"] < vocab_size]
    else:
        for i in range(size, vocab_size):
            model["vocab"][f"<synth_{i}>"] = i
    return TokenizerSpec(json.dumps(tok, ensure_ascii=False), spec.chat_template,
                         spec.bos_token, spec.eos_token)


# -- writing -------------------------------------------------------------------------------------
def _rows_per_chunk(row_bytes: int) -> int:
    return max(4, CHUNK_BYTES // max(row_bytes, 1) // 4 * 4)  # a multiple of 4 (see _Bits.raw)


def resolve_shape(shape: str | None, config_path: Path | None) -> tuple[str, dict]:
    """(label, HF config dict) from a preset name or a config.json file."""
    if config_path is not None:
        try:
            hf = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LLMFlashError(f"cannot read config {config_path}: {exc}") from None
        if not isinstance(hf, dict):
            raise LLMFlashError(f"{config_path} is not a config.json object")
        return str(Path(config_path).resolve()), hf
    if shape not in PRESETS:
        raise LLMFlashError(f"unknown synth shape {shape!r}; presets: {', '.join(PRESETS)} "
                            "(or --config config.json)")
    return shape, dict(PRESETS[shape])


def synth(shape: str | None, dst: Path | str, dtype: str = "float16", seed: int = 0,
          config_path: Path | None = None, force: bool = False, progress: bool = True,
          tokenizer: TokenizerSpec | None = None, resident_dtype: str | None = None) -> FlashModelDir:
    """Write a synthetic model of a preset (or a config.json) at DST in the flash layout.
    resident_dtype: an int8/int4/int4m model's resident matrices (default float16; a block format:
    random codes whose block scale gives each matrix its std, as the bundles)."""
    if dtype not in DTYPES and not quantized.is_quantized(dtype):
        raise LLMFlashError(f"unsupported --dtype {dtype!r}; choose one of "
                            f"{sorted(DTYPES) + list(quantized.KINDS)}")
    dst = Path(dst)
    check_destination(dst, force)
    label, hf = resolve_shape(shape, config_path)
    config = config_from_hf(hf, where=str(config_path) if config_path else f"preset {shape}")
    scales = Scales(config)
    quant = quantized.is_quantized(dtype)
    bits = _Bits(resident_dtype if resident_dtype in DTYPES else "float16" if quant else dtype)
    resident = resident_shapes(config)

    layout = bundle_layout_for(config, dtype)  # refuses int8/int4 sizes that are not whole blocks
    if quant:
        resident = resident + down_block_tensors(config, dtype)

    def resident_chunks(name: str, tshape: tuple, tdtype: torch.dtype):
        if name.startswith("ffn.layers."):  # quantized down scales (minimums): one value, codes are random
            d = scales.down / QUANT_CODE_STD[dtype]
            yield np.full(tshape, INT4M_MIN_PER_SCALE * d if down_block_of(name)[1] else d, dtype=np.float16)
            return
        kind, value = scales.resident(name, tshape)
        if len(tshape) == 1:
            yield np.full(tshape, value if kind == "const" else 0.0, dtype=np.float32)
            return
        rng = _stream(seed, name)
        cols = int(tshape[1])
        if tdtype == torch.uint8:  # the resident block format (write_model_dir's resident_storage)
            yield from _random_blocks(rng, tshape, resident_dtype, value)
            return
        step = _rows_per_chunk(cols * bits.uint(0).itemsize)
        for start in range(0, tshape[0], step):
            rows = min(step, tshape[0] - start)
            yield bits.shape(bits.raw(rng, rows * cols), value)

    parts = [(slice(p.offset, p.offset + p.length), *scales.part(p.name)) for p in layout.parts]

    def quant_layer_chunks(layer: int):
        """int8/int4/int4m bundles: random codes, one block scale per part giving the part's std
        (int4m: the minimum centring the codes on zero), float32 biases (the same statistics as the
        float bundles)."""
        rng = _stream(seed, f"ffn.{layer}")
        codec = quantized.BundleCodec(layout, config.hidden_size)
        n, width = config.intermediate_size, codec.nbytes
        step = _rows_per_chunk(width)
        for start in range(0, n, step):
            rows = min(step, n - start)
            block = _random_words(rng, rows * width, np.uint8).reshape(rows, width)
            for p in layout.parts:
                kind, value = scales.part(p.name)
                span = codec.spans[p.name]
                if p.name in ("gate", "up"):
                    _set_block_heads(block[:, span].reshape(rows, -1, quantized.BLOCK_BYTES[dtype]), dtype, value)
                elif p.name != "down":  # biases
                    block[:, span] = np.array([value if kind == "const" else 0.0], dtype=np.float32).view(np.uint8)
            yield block

    def layer_chunks(layer: int):
        rng = _stream(seed, f"ffn.{layer}")
        n, width = config.intermediate_size, layout.elements
        step = _rows_per_chunk(layout.nbytes)
        for start in range(0, n, step):
            rows = min(step, n - start)
            block = bits.raw(rng, rows * width).reshape(rows, width)
            for cols, kind, value in parts:
                if kind == "const":
                    block[:, cols] = bits.constant(value)
                else:
                    bits.shape(block[:, cols], value)
            yield block

    spec = fit_tokenizer(tokenizer or default_tokenizer(), config.vocab_size)
    extra = {"synthetic": {"preset": label, "seed": seed, "hf_config": hf,
                           "note": "random weights: generated text is meaningless"}}
    return write_model_dir(dst, config, dtype, resident, resident_chunks,
                           quant_layer_chunks if quant else layer_chunks, spec,
                           {"path": f"synthetic:{label}", "kind": "synthetic"}, extra,
                           progress=progress, desc=f"synth {Path(label).name}", resident_dtype=resident_dtype)


def _random_blocks(rng: np.random.Generator, shape: tuple, kind: str, std: float):
    """Rows of random `kind` blocks for a [rows, k] matrix of standard deviation `std` (_set_block_heads)."""
    rows_total, k = int(shape[0]), int(shape[1])
    width = quantized.row_bytes(kind, k)
    step = _rows_per_chunk(width)
    for start in range(0, rows_total, step):
        rows = min(step, rows_total - start)
        block = _random_words(rng, rows * width, np.uint8)
        _set_block_heads(block.reshape(rows, -1, quantized.BLOCK_BYTES[kind]), kind, std)
        yield block.reshape(rows, width)


def _set_block_heads(blocks: np.ndarray, kind: str, std: float) -> None:
    """Give random codes (uint8 [..., blocks, block bytes], in place) the statistics of weights of
    standard deviation `std`: every block's scale std / (the codes' std), int4m's minimum centring
    the codes on zero."""
    code_std = QUANT_CODE_STD[kind]
    blocks[..., :2] = np.array([std / code_std], dtype=np.float16).view(np.uint8)
    if quantized.has_mins(kind):
        blocks[..., 2:4] = np.array([INT4M_MIN_PER_SCALE * std / code_std], dtype=np.float16).view(np.uint8)
