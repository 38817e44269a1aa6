"""Import from a llama.cpp GGUF file (architectures "llama", "gemma3", "qwen3", "phi3").

A GGUF carries the config, the tokenizer and the (usually quantized) weights in one file, under
llama.cpp's names and layouts. This module presents it as a `ModelSource`: transformers-named
tensors, dequantized to float32 in transformers' orientation, a config.json-style dict and a
`tokenizers` tokenizer.json, so the flash-layout writer never learns the weights came from a GGUF.

Parsing and dequantization are the `gguf` package's (llama.cpp's own Python reader); this module
only maps names, undoes llama.cpp's q/k row permutation and rebuilds the tokenizer. It needs only
gguf, numpy, torch and tokenizers at run time (transformers is the reference in the tests only).

"llama" files go through the code below (config keys, Llama 3 rope_freqs, q/k permutation). Other
architectures are described by their module in llmflash/models/ (`from_gguf(source)` builds the
config.json dict from the metadata, GGUF_LAYER_TENSORS / GGUF_GLOBAL_TENSORS map the names,
`gguf_tensor_fix` undoes a storage convention such as Gemma's 1 + weight norms, and
GGUF_CONFIG_TENSORS lists tensors that are config, not weights); fused tensors (Phi-3's attn_qkv
and gate|up ffn_up) are kept fused here and split by the writer (convert/fused.py).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmflash.conversion.source import TokenizerSpec
from llmflash.errors import LLMFlashError
from llmflash.models import BY_GGUF_ARCHITECTURE, llama

# GGUF tensors that are not weights of the transformers model: llama.cpp derives them from the
# config (Llama 3.x rope frequency factors, rebuilt into rope_scaling by _llama3_rope_scaling).
_CONFIG_TENSORS = {"rope_freqs.weight"}

# Tensor types this importer reads. Q8_0, Q4_0 and Q4_1 are kept block for block by `convert
# --dtype int8|int4|int4m` (format/quantized.py); the others are dequantized by gguf and, for a
# quantized conversion, requantized to the nearest of int8/int4/int4m (NEAREST_KIND), which convert says.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# The llmflash block format a GGUF type maps to: never fewer bits than the file had below 5
# (Q5/Q6 -> int8: requantizing 5-6 bits to 4 would lose more than the file's own rounding). Q4_K
# is made of 32-weight sub-blocks with a scale and a minimum each, as Q4_1 (int4m) is, so its values
# stay nearly where they were; Q2_K and Q3_K (16-weight sub-blocks) go to int4m too, the finer grid.
NEAREST_KIND = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4m", "Q2_K": "int4m", "Q3_K": "int4m",
                "Q4_K": "int4m", "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8"}

def _reverse_llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, giving transformers' row order back.

    llama.cpp's convert_hf_to_gguf.py stores q and k with the rows of each head interleaved
    (row 2j = HF row j, row 2j+1 = HF row j + head_dim/2) so that its RoPE rotates adjacent pairs;
    transformers rotates the two halves of each head. The inverse is: view the rows as
    [n_head, head_dim/2, 2], swap the last two axes. n_head is the number of heads the tensor has
    rows for: num_attention_heads for q, num_key_value_heads for k.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def open_gguf(path: Path):
    """gguf.GGUFReader over `path`, with its file map seen as a plain ndarray (plain_view_reader)."""
    return plain_view_reader()(path)


@functools.cache
def plain_view_reader() -> type:
    """A gguf.GGUFReader subclass whose `data` (the file's memmap) is held as a plain ndarray view.

    The reader slices `data` once per metadata value, and each np.memmap slice runs memmap's
    `__array_finalize__`: a 262k-token vocabulary (Gemma 3) took 23 s to open. A plain ndarray view
    of the same map reads the same bytes (the map stays alive as its base) and opened that file in
    7 s. Only the reader's public `data` attribute is changed, so a gguf release that no longer
    assigns a memmap there gets the stock behaviour.
    """
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value) -> None:
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainViewReader


class GGUFSource:
    """A GGUF file of architecture "llama", seen through the `ModelSource` interface.

    The file is memory-mapped by gguf.GGUFReader; the constructor reads only metadata and tensor
    headers and checks them (architecture, truncation, every expected tensor present with the shape
    the config implies), so a bad file fails here with a message naming it, not midway through a
    conversion.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LLMFlashError(f"GGUF file not found: {self.path}")
        try:
            import gguf

            self._gguf = gguf
            self._reader = open_gguf(self.path)
        except Exception as exc:  # the reader raises ValueError, IndexError, OSError... on bad bytes
            raise LLMFlashError(
                f"cannot read GGUF file {self.path} (not a GGUF file, or truncated or corrupt): {exc}"
            ) from None
        self._check_sizes()
        for t in self._reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise LLMFlashError(
                    f"unsupported GGUF tensor type {t.tensor_type.name} for tensor {t.name} in {self.path}; "
                    f"llmflash reads {', '.join(SUPPORTED_TYPES)}")
        arch = self._meta("general.architecture", None)
        self._module = BY_GGUF_ARCHITECTURE.get(arch) if isinstance(arch, str) else None
        if self._module is None:
            raise LLMFlashError(
                f"unsupported GGUF architecture {arch!r} in {self.path}: supported are "
                f"{', '.join(repr(a) for a in sorted(BY_GGUF_ARCHITECTURE))}"
            )
        self.arch = arch
        if int(self._meta(f"{arch}.expert_count", 0) or 0) > 0:
            raise LLMFlashError(
                f"mixture-of-experts {arch} GGUF ({arch}.expert_count="
                f"{self._meta(f'{arch}.expert_count')}) is not supported: {self.path}"
            )
        self._by_gguf_name = {t.name: t for t in self._reader.tensors}
        self._generic = hasattr(self._module, "from_gguf")
        if self._generic:
            self._config = self._module.from_gguf(self)
            self._hf_to_gguf = self._map_module_tensor_names()
        else:
            self._config = self._build_config()
            self._hf_to_gguf = self._map_tensor_names()

    # ------------------------------------------------ what architecture modules read (from_gguf)

    def meta(self, key: str, *default: Any) -> Any:
        """A metadata value (plain Python); without a default, a missing key is an error."""
        return self._meta(key, *default)

    def meta_int(self, key: str, *default: Any) -> Any:
        """An integer hyperparameter (a per-layer array must be uniform); without a default, a
        missing key is an error."""
        return self._meta_int(key, *default)

    def has_tensor(self, name: str) -> bool:
        return name in self._by_gguf_name

    def read_raw(self, name: str) -> np.ndarray:
        """A GGUF tensor dequantized to float32 as stored (no renaming, no transform)."""
        t = self._by_gguf_name[name]
        return np.asarray(self._gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            self._gguf_shape(name))

    def vocab_size(self) -> int:
        """Rows of the embedding matrix (the model's vocabulary), else the tokenizer's size."""
        if "token_embd.weight" in self._by_gguf_name:
            return int(self._by_gguf_name["token_embd.weight"].shape[-1])
        field = self._reader.fields.get("tokenizer.ggml.tokens")
        if field is not None:
            return len(field.data)
        raise LLMFlashError(f"cannot tell the vocabulary size of {self.path}")

    def special_token_ids(self) -> dict:
        """bos/eos/pad ids as config.json keys, from tokenizer.ggml.*_token_id."""
        out = {}
        for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
            value = self._meta_int(f"tokenizer.ggml.{key}", None)
            if value is not None:
                out[name] = value
        return out

    def token_id(self, text: str) -> int | None:
        """The id of a token spelled `text` in the GGUF vocabulary, if any."""
        tokens = self._meta("tokenizer.ggml.tokens", None) or []
        try:
            return tokens.index(text)
        except ValueError:
            return None

    def rope_scaling(self, arch: str) -> dict | None:
        """Linear rope scaling from {arch}.rope.scaling.type/factor (Gemma 3 4B+), or None."""
        kind = self._meta(f"{arch}.rope.scaling.type", None)
        factor = self._meta(f"{arch}.rope.scaling.factor", None)
        if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
            return None
        if kind != "linear" or factor is None:
            raise LLMFlashError(f"unsupported rope scaling {kind!r} (factor {factor}) in {self.path}")
        return {"rope_type": "linear", "factor": float(factor)}

    def _map_module_tensor_names(self) -> dict[str, str]:
        """HF name -> GGUF name from the architecture module's tables; presence and the shapes the
        config fixes are checked, and a GGUF tensor with no place is refused."""
        m, cfg = self._module, self._config
        hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
        wanted: list[tuple[str, str]] = []
        for gguf_name, hf_name in m.GGUF_GLOBAL_TENSORS.items():
            if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            wanted.append((hf_name, gguf_name))
        for i in range(cfg["num_hidden_layers"]):
            for suffix, hf_suffix in m.GGUF_LAYER_TENSORS.items():
                wanted.append((f"model.layers.{i}.{hf_suffix}", f"blk.{i}.{suffix}"))
        mapping: dict[str, str] = {}
        for hf_name, gguf_name in wanted:
            if gguf_name not in self._by_gguf_name:
                raise LLMFlashError(f"tensor {gguf_name} ({hf_name}) missing in {self.path}")
            shape = self._gguf_shape(gguf_name)
            expect_cols = None if hf_name.endswith(("o_proj.weight", "down_proj.weight")) else hidden
            if hf_name in ("model.embed_tokens.weight", "lm_head.weight") and shape != (vocab, hidden):
                raise LLMFlashError(
                    f"tensor {gguf_name} has shape {shape}, the config implies {(vocab, hidden)}: {self.path}")
            if len(shape) == 2 and expect_cols is not None and shape[1] != expect_cols:
                raise LLMFlashError(
                    f"tensor {gguf_name} has {shape[1]} columns, hidden_size is {hidden}: {self.path}")
            if len(shape) == 1 and "norm" in hf_name and "q_norm" not in hf_name and "k_norm" not in hf_name \
                    and shape != (hidden,):
                raise LLMFlashError(f"tensor {gguf_name} has shape {shape}, expected ({hidden},): {self.path}")
            mapping[hf_name] = gguf_name
        config_tensors = set(getattr(m, "GGUF_CONFIG_TENSORS", ()))
        extra = sorted(set(self._by_gguf_name) - set(mapping.values()) - config_tensors)
        if extra:
            raise LLMFlashError(
                f"{len(extra)} unsupported tensors in {self.path}, e.g. {extra[0]} "
                f"(a variant of {self.arch} this importer does not know)"
            )
        return mapping

    # ----------------------------------------------------------------- metadata

    _MISSING = object()

    def _meta(self, key: str, default: Any = _MISSING) -> Any:
        """One metadata value as a plain Python value (str, int, float, bool or list)."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise LLMFlashError(f"GGUF metadata key {key!r} missing in {self.path}")
            return default
        try:
            value = field.contents()
        except Exception as exc:
            raise LLMFlashError(f"GGUF metadata key {key!r} unreadable in {self.path}: {exc}") from None
        if isinstance(value, np.generic):
            value = value.item()
        return value

    def _meta_int(self, key: str, default: Any = _MISSING) -> Any:
        """An integer hyperparameter; a per-layer array must be uniform (Llama has one value)."""
        value = self._meta(key, default)
        if isinstance(value, list):
            if not value or len(set(value)) != 1:
                raise LLMFlashError(
                    f"per-layer values for {key!r} ({value[:8]}...) are not supported: {self.path}"
                )
            value = value[0]
        return value if value is None else int(value)

    def _check_sizes(self) -> None:
        """Refuse a file shorter than its tensor table says (a truncated download).

        GGUFReader memory-maps the file and may build views that run past its end without
        complaint; reading one would then fail with an unhelpful error or a short array.
        """
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise LLMFlashError(
                    f"truncated GGUF file {self.path}: tensor {t.name} needs bytes up to {end}, "
                    f"file has {size}"
                )

    def _build_config(self) -> dict:
        """The transformers LlamaConfig fields, from llama.cpp's metadata keys."""
        hidden = self._meta_int("llama.embedding_length")
        heads = self._meta_int("llama.attention.head_count")
        kv_heads = self._meta_int("llama.attention.head_count_kv", heads)
        head_dim = self._meta_int("llama.attention.key_length", None)
        if head_dim is None:
            head_dim = self._meta_int("llama.rope.dimension_count", None)
        if head_dim is None:
            head_dim = hidden // heads
        value_dim = self._meta_int("llama.attention.value_length", head_dim)
        if value_dim != head_dim:
            raise LLMFlashError(
                f"key length {head_dim} != value length {value_dim} is not a Llama model: {self.path}"
            )
        rope_dims = self._meta_int("llama.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise LLMFlashError(
                f"partial rotary embedding (rope.dimension_count {rope_dims} of head_dim "
                f"{head_dim}) is not supported: {self.path}"
            )
        if heads % kv_heads:
            raise LLMFlashError(f"{heads} attention heads not divisible by {kv_heads} kv heads: {self.path}")
        vocab = self._meta_int("llama.vocab_size", None)
        if vocab is None:
            field = self._reader.fields.get("tokenizer.ggml.tokens")
            if field is not None:
                vocab = len(field.data)
            elif "token_embd.weight" in self._by_gguf_name:
                vocab = int(self._by_gguf_name["token_embd.weight"].shape[-1])
            else:
                raise LLMFlashError(f"cannot tell the vocabulary size of {self.path}")
        rope_theta = float(self._meta("llama.rope.freq_base", 10000.0))
        config: dict[str, Any] = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self._meta_int("llama.feed_forward_length"),
            "num_hidden_layers": self._meta_int("llama.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": float(self._meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(head_dim, rope_theta),
            "max_position_embeddings": self._meta_int("llama.context_length", 2048),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self._by_gguf_name,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
            value = self._meta_int(f"tokenizer.ggml.{key}", None)
            if value is not None:
                config[name] = value
        return config

    def _rope_scaling(self, head_dim: int, rope_theta: float) -> dict | None:
        """rope_scaling from llama.rope.scaling.* keys, or from a Llama 3.x rope_freqs tensor."""
        kind = self._meta("llama.rope.scaling.type", None)
        factor = self._meta("llama.rope.scaling.factor", None)
        if kind is None and self._meta("llama.rope.scale_linear", None) is not None:
            kind, factor = "linear", self._meta("llama.rope.scale_linear")  # older files
        if "rope_freqs.weight" in self._by_gguf_name:
            if kind not in (None, "none"):
                raise LLMFlashError(
                    f"both rope_freqs and rope scaling type {kind!r} in {self.path}: not supported"
                )
            return self._llama3_rope_scaling(head_dim, rope_theta)
        if kind in (None, "none"):
            return None
        if factor is None:
            raise LLMFlashError(f"rope scaling type {kind!r} without a factor in {self.path}")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
            original = self._meta("llama.rope.scaling.original_context_length", None)
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            for key, hf_key in (("attn_factor", "attention_factor"),
                                ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                value = self._meta(f"llama.rope.scaling.{key}", None)
                if value is not None:
                    scaling[hf_key] = float(value)
            return scaling
        raise LLMFlashError(f"unsupported rope scaling type {kind!r} in {self.path}")

    def _llama3_rope_scaling(self, head_dim: int, rope_theta: float) -> dict:
        """Recover Llama 3.x's rope_scaling from the per-frequency factors llama.cpp stores.

        llama.cpp keeps no llama3 rope_scaling keys: its converter evaluates the formula into a
        rope_freqs tensor. We find the (factor, low/high_freq_factor, original context) that
        reproduces that tensor, trying the values Meta's releases use, and refuse the file rather
        than guess when none fits: wrong rope frequencies change every position's output.
        """
        t = self._by_gguf_name["rope_freqs.weight"]
        stored = self._gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        if stored.shape[0] != head_dim // 2:
            raise LLMFlashError(
                f"rope_freqs has {stored.shape[0]} entries, expected {head_dim // 2}: {self.path}"
            )
        freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        factor = float(stored.max())
        for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
            for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
                expected = []
                for freq in freqs.astype(np.float64):
                    wavelen = 2 * math.pi / freq
                    if wavelen < original / high:
                        expected.append(1.0)
                    elif wavelen > original / low:
                        expected.append(factor)
                    else:
                        smooth = (original / wavelen - low) / (high - low)
                        expected.append(1 / ((1 - smooth) / factor + smooth))
                if np.allclose(stored, expected, rtol=1e-4, atol=1e-5):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
        raise LLMFlashError(
            f"rope_freqs tensor in {self.path} matches no llama3 rope scaling we recognise"
        )

    def _map_tensor_names(self) -> dict[str, str]:
        """HF name -> GGUF name for every model tensor, checking presence and shapes.

        A GGUF tensor we have no place for (attention biases, MoE experts...) means a variant we
        would silently mis-convert, so it is refused rather than dropped.
        """
        cfg = self._config
        hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
        kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
        ffn, vocab = cfg["intermediate_size"], cfg["vocab_size"]
        layer_shapes = {
            "attn_q.weight": (q_rows, hidden), "attn_k.weight": (kv_rows, hidden),
            "attn_v.weight": (kv_rows, hidden), "attn_output.weight": (hidden, q_rows),
            "ffn_gate.weight": (ffn, hidden), "ffn_up.weight": (ffn, hidden),
            "ffn_down.weight": (hidden, ffn), "attn_norm.weight": (hidden,),
            "ffn_norm.weight": (hidden,),
        }
        wanted: list[tuple[str, str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", "token_embd.weight", (vocab, hidden))
        ]
        for i in range(layers):
            for suffix, hf_suffix in llama.GGUF_LAYER_TENSORS.items():
                wanted.append((f"model.layers.{i}.{hf_suffix}", f"blk.{i}.{suffix}", layer_shapes[suffix]))
        wanted.append(("model.norm.weight", "output_norm.weight", (hidden,)))
        if not cfg["tie_word_embeddings"]:
            wanted.append(("lm_head.weight", "output.weight", (vocab, hidden)))
        mapping: dict[str, str] = {}
        for hf_name, gguf_name, shape in wanted:
            tensor = self._by_gguf_name.get(gguf_name)
            if tensor is None:
                raise LLMFlashError(f"tensor {gguf_name} ({hf_name}) missing in {self.path}")
            actual = self._gguf_shape(gguf_name)
            if actual != shape:
                raise LLMFlashError(
                    f"tensor {gguf_name} has shape {actual}, the config implies {shape}: {self.path}"
                )
            mapping[hf_name] = gguf_name
        extra = sorted(set(self._by_gguf_name) - set(mapping.values()) - _CONFIG_TENSORS)
        if extra:
            raise LLMFlashError(
                f"{len(extra)} unsupported tensors in {self.path}, e.g. {extra[0]} "
                "(biases and mixture-of-experts llama variants are not supported)"
            )
        return mapping

    def _gguf_shape(self, gguf_name: str) -> tuple[int, ...]:
        """Shape in numpy/torch order: GGUF lists dimensions innermost first ([in, out])."""
        return tuple(int(d) for d in reversed(self._by_gguf_name[gguf_name].shape))

    # --------------------------------------------------------------- interface

    def hf_config(self) -> dict:
        """A transformers config.json dict for LlamaForCausalLM (a fresh copy each call)."""
        return json.loads(json.dumps(self._config))

    def tensor_names(self) -> list[str]:
        """HF names in transformers' module order: embeddings, layers 0..n-1, norm, lm_head."""
        return list(self._hf_to_gguf)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """HF-orientation shape from the tensor header, without dequantizing anything."""
        return self._gguf_shape(self._gguf_name(name))

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor dequantized to float32, in HF orientation and (for q/k) HF row order.

        Only this tensor's bytes are touched: the reader's arrays are views into the memory map.
        """
        gguf_name = self._gguf_name(name)
        tensor = self._by_gguf_name[gguf_name]
        try:
            array = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:  # unsupported quant type, or bytes that do not fit the shape
            raise LLMFlashError(
                f"cannot dequantize {gguf_name} ({tensor.tensor_type.name}) in {self.path}: {exc}"
            ) from None
        array = np.asarray(array, dtype=np.float32)
        if np.shares_memory(array, tensor.data) or not array.flags.writeable:
            array = array.copy()  # never hand out a view of the read-only memory map
        out = torch.from_numpy(array).reshape(self._gguf_shape(gguf_name))
        if self._generic:  # no q/k permutation outside "llama": llama.cpp rotates them NeoX-style
            fix = getattr(self._module, "gguf_tensor_fix", None)
            return (out if fix is None else fix(name, out)).contiguous()
        if gguf_name.endswith(".attn_q.weight"):
            out = _reverse_llama_permute(out, self._config["num_attention_heads"])
        elif gguf_name.endswith(".attn_k.weight"):
            out = _reverse_llama_permute(out, self._config["num_key_value_heads"])
        return out.contiguous()

    def tensor_type(self, name: str) -> str:
        """GGUF type name of an HF-named tensor (e.g. "Q4_0"), without reading it."""
        return self._by_gguf_name[self._gguf_name(name)].tensor_type.name

    def read_blocks(self, name: str) -> np.ndarray:
        """A Q8_0 / Q4_0 / Q4_1 tensor's bytes as stored, uint8 [rows, row bytes] in HF orientation
        (rows of GGUF blocks along the innermost axis, which is HF's input axis) and HF row order
        (llama's q/k rows put back as read_tensor does: a row of blocks moves as a row of weights):
        nothing re-rounded. Matrices only: what gguf_tensor_fix changes are norm vectors."""
        gguf_name = self._gguf_name(name)
        t = self._by_gguf_name[gguf_name]
        shape = self._gguf_shape(gguf_name)
        rows = int(np.prod(shape[:-1]))
        out = np.array(t.data, dtype=np.uint8, copy=True).reshape(rows, -1)
        if not self._generic and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = self._config["num_attention_heads" if gguf_name.endswith("q.weight") else "num_key_value_heads"]
            out = np.ascontiguousarray(_reverse_llama_permute(torch.from_numpy(out), heads).numpy())
        return out

    def _gguf_name(self, name: str) -> str:
        gguf_name = self._hf_to_gguf.get(name)
        if gguf_name is None:
            raise LLMFlashError(f"tensor {name} not found in {self.path}")
        return gguf_name

    # --------------------------------------------------------------- tokenizer

    def tokenizer(self) -> TokenizerSpec:
        """A `tokenizers` tokenizer.json rebuilt from the GGUF's tokenizer.ggml.* metadata
        (byte-level BPE or SentencePiece: llmflash/conversion/gguf_tokenizer.py)."""
        from llmflash.conversion.gguf_tokenizer import tokenizer_spec

        spec = tokenizer_spec(lambda key: self._meta(key, None), self.arch, self.path)
        if spec.chat_template is None:  # e.g. Gemma-3-270M's GGUF carries none: the family's own
            spec.chat_template = getattr(self._module, "CHAT_TEMPLATE", None)
        return spec
