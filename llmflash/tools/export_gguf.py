"""`llmflash export-gguf MODEL OUT.gguf`: a flash-layout model written back as a llama.cpp GGUF.

Why: the peer users run today when a model does not fit is llama.cpp with its weights memory-mapped.
`bench --modes ...,llamacpp` compares flash against it on the same weights, and a synthetic 7B model
(`llmflash synth`) exists only in the flash layout, so it has to be written as a GGUF first.

What is written: llama.cpp's "llama" architecture (Llama, Mistral, SmolLM2 and the `synth` presets
of those shapes) with the weights as stored (float16, bfloat16 or float32; 1-D norm weights at
float32, as llama.cpp's own converter keeps them), q/k rows permuted into llama.cpp's RoPE order (the
inverse of what `convert` undoes when it reads a GGUF), each FFN layer reassembled from its bundles
(slot order undone, so a reordered model exports the same matrices), and the tokenizer.json as a
byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`).

What is refused, with the reason: models llama.cpp's llama architecture would compute differently
(a ReLU/FATReLU FFN: it always applies SiLU; attention or FFN biases; RoPE scalings other than
linear; OPT, Gemma 3, Qwen3 and Phi-3 decoders, which this exporter does not map), and int8/int4
models (their blocks are GGUF's Q8_0/Q4_0, but copying them out is not written yet).
Mistral's sliding window is dropped, as llama.cpp's converter drops it: identical for contexts up to
the window.

Streaming: one tensor (one FFN layer) in memory at a time; the resident file's checksum and every
layer's checksums are checked on the way. The file is written under a temporary name and renamed
when complete, so an interrupted export never leaves a GGUF that looks whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from llmflash.errors import LLMFlashError
from llmflash.format.layout import RESIDENT_FILE, FlashModelDir, sha256_file
from llmflash.format.tempfiles import remove_stale
from llmflash.models import llama

# transformers names of the resident tensors -> GGUF names (llama architecture)
_GLOBAL = {hf: gg for gg, hf in llama.GGUF_GLOBAL_TENSORS.items()}
_LAYER = {hf: gg for gg, hf in llama.GGUF_LAYER_TENSORS.items()}
_FFN_PARTS = {"gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight"}
_STORED = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_FILE_TYPE = {"float32": 0, "float16": 1, "bfloat16": 32}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_BF16


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' q/k row order -> llama.cpp's: within each head, row j and row j + head_dim/2
    become rows 2j and 2j+1 (llama.cpp rotates adjacent pairs; conversion/gguf_source undoes it)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_exportable(model: FlashModelDir) -> None:
    """Refuse, naming the reason and the model, what llama.cpp's llama architecture would not
    compute the same way."""
    c, where = model.config, model.path
    if c.family != "llama":
        raise LLMFlashError(f"export-gguf writes llama.cpp's llama architecture; {where} is a {c.model_type} "
                            "model (not supported)")
    if c.hidden_act != "silu":
        raise LLMFlashError(f"export-gguf: {where} has a {c.hidden_act} FFN and llama.cpp's llama architecture "
                            "always applies SiLU, so the GGUF would compute another model")
    if c.attention_bias or c.attention_out_bias or c.mlp_bias:
        raise LLMFlashError(f"export-gguf: {where} has attention or FFN biases, which llama.cpp's llama "
                            "architecture does not take")
    if c.rope_scaling is not None and c.rope_scaling.get("rope_type", c.rope_scaling.get("type")) != "linear":
        raise LLMFlashError(f"export-gguf: {where} uses {c.rope_scaling.get('rope_type')} RoPE scaling; "
                            "only none and linear are written")
    if model.quantized:
        raise LLMFlashError(f"export-gguf: {where} is stored {model.dtype}; only float16, bfloat16 and "
                            "float32 models are exported")


def _vocabulary(tokenizer_json: dict, vocab_size: int, where: Path) -> tuple[list[str], list[int], list[str], str]:
    """tokens (exactly vocab_size, ids without a token filled as unused), token types, merges,
    and the llama.cpp pre-tokenizer name of a byte-level BPE tokenizer.json."""
    model = tokenizer_json.get("model") or {}
    text = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in text:
        raise LLMFlashError(f"export-gguf writes byte-level BPE tokenizers only; {where} has a "
                            f"{model.get('type')} tokenizer")
    tokens: list[str | None] = [None] * vocab_size
    types = [1] * vocab_size  # NORMAL
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = token
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = 3 if added.get("special") else 4  # CONTROL, USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", 5  # UNUSED
    kept = set(tokens)
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:  # a merge into a dropped id would break llama.cpp
            merges.append(f"{a} {b}")
    # SmolLM2's pre-tokenizer (digits one by one, then GPT-2's byte-level split) is llama.cpp's
    # "smollm"; any other gets "default". bench hands llama.cpp token ids, so this only matters
    # when llama.cpp itself tokenizes text.
    digits = '"Digits"' in text and '"individual_digits": true' in text
    return tokens, types, merges, ("smollm" if digits else "default")


def export_gguf(model_path: Path | str, out: Path | str, force: bool = False, progress: bool = True,
                say: Callable[[str], None] = print) -> dict:
    """Write `model_path` (a flash-layout directory) as the GGUF `out`; returns what was written."""
    import gguf
    import torch
    from safetensors import safe_open

    model = FlashModelDir(model_path)
    check_exportable(model)
    out = Path(out)
    if out.exists() and not force:
        raise LLMFlashError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise LLMFlashError(f"cannot write {out}: {out.parent} is not a directory")
    c = model.config
    stored = model.dtype
    if sha256_file(model.resident_path) != model.files[RESIDENT_FILE]["sha256"]:
        raise LLMFlashError(f"checksum mismatch: {model.resident_path}; run `llmflash verify`")
    if c.sliding_window and c.sliding_window < c.max_position_embeddings:
        say(f"export-gguf: the sliding window ({c.sliding_window} tokens) is dropped, as llama.cpp's converter "
            "drops it: the same model for contexts up to the window")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove_stale(out.parent, f".{out.name}.")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(model.path.name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.hidden_size // c.num_heads:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    if c.rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(_FILE_TYPE[stored])
    tok_path = model.tokenizer_path
    if tok_path is None:
        raise LLMFlashError(f"export-gguf: {model.path} has no tokenizer, and llama.cpp needs a vocabulary")
    tok = json.loads(model.read_verified(model.manifest["tokenizer"]["file"], "tokenizer.file"))
    tokens, types, merges, pre = _vocabulary(tok, c.vocab_size, tok_path)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if c.bos_token_id is not None:
        writer.add_bos_token_id(int(c.bos_token_id))
    if c.eos_token_id:
        writer.add_eos_token_id(int(c.eos_token_id[0]))
    template = model.manifest["tokenizer"].get("chat_template")
    if template:
        writer.add_chat_template(template)

    # Tensor plan in llama.cpp's order; each entry knows how to produce its array when written.
    resident = safe_open(str(model.resident_path), framework="pt")
    names = set(resident.keys())

    def resident_array(hf_name: str) -> np.ndarray:
        t = resident.get_tensor(hf_name)
        # numpy has no bfloat16: its 16-bit words, written as GGUF BF16
        array = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        if array.ndim == 1:
            return array.astype(np.float32) if array.dtype != np.uint16 else _bf16_to_f32(array)
        if hf_name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, c.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, c.num_kv_heads)
        return np.ascontiguousarray(array)

    plan: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray], bool]] = []

    def add(gguf_name: str, shape: tuple[int, ...], make: Callable[[], np.ndarray], vector: bool) -> None:
        plan.append((gguf_name, shape, make, vector))

    def shape_of(hf_name: str) -> tuple[int, ...]:
        return tuple(resident.get_slice(hf_name).get_shape())

    add("token_embd.weight", shape_of("model.embed_tokens.weight"),
        lambda: resident_array("model.embed_tokens.weight"), False)
    d, n = c.hidden_size, c.intermediate_size
    layer_cache: dict[int, dict[str, np.ndarray]] = {}

    def ffn_part(layer: int, part: str) -> np.ndarray:
        if layer not in layer_cache:  # one layer's bundles at a time
            layer_cache.clear()
            rows = model.read_layer_raw(layer).view(_STORED[stored]).reshape(n, -1)
            full = np.empty_like(rows)
            full[model.layers[layer].permutation()] = rows  # slot j holds neuron order[j]
            layer_cache[layer] = {p.name: full[:, p.offset: p.offset + p.length] for p in model.bundle.parts}
        m = layer_cache[layer][part]
        return np.ascontiguousarray(m.T if part == "down" else m)

    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        for hf_suffix in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight"):
            hf_name = p + hf_suffix
            add(f"blk.{i}.{_LAYER[hf_suffix]}", shape_of(hf_name), lambda h=hf_name: resident_array(h),
                hf_suffix.endswith("norm.weight"))
        for part in ("gate", "up", "down"):
            add(f"blk.{i}.{_FFN_PARTS[part]}", (d, n) if part == "down" else (n, d),
                lambda i=i, part=part: ffn_part(i, part), False)
    add("output_norm.weight", shape_of("model.norm.weight"), lambda: resident_array("model.norm.weight"), True)
    if "lm_head.weight" in names:
        add("output.weight", shape_of("lm_head.weight"), lambda: resident_array("lm_head.weight"), False)

    item = {"float16": 2, "bfloat16": 2, "float32": 4}[stored]
    for gguf_name, shape, _, vector in plan:
        if vector:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        elif stored == "bfloat16":
            writer.add_tensor_info(gguf_name, (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8),
                                   int(np.prod(shape)) * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor_info(gguf_name, shape, np.dtype(_STORED[stored]), int(np.prod(shape)) * item)
    total = sum(int(np.prod(s)) * (4 if v else item) for _, s, _, v in plan)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="export-gguf", disable=not progress)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, shape, make, vector in plan:
            array = make()
            want = np.float32 if vector else _STORED[stored]
            if tuple(array.shape) != tuple(shape) or array.dtype != want:
                raise LLMFlashError(f"export-gguf: {gguf_name} came out {array.dtype} {array.shape} from "
                                    f"{model.path}, expected {np.dtype(want)} {shape}")
            if stored == "bfloat16" and not vector:
                array = array.view(np.uint8)
            writer.write_tensor_data(array)
            bar.update(array.nbytes)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": len(plan), "dtype": stored,
            "tokenizer_pre": pre}


def _bf16_to_f32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)
