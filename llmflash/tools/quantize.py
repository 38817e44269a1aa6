"""GPTQ into GGUF's block formats: `llmflash convert SRC DST --dtype int4 --gptq TEXT`.

Round-to-nearest Q4_0 (ggml's rule, what `convert --dtype int4` does by default) costs SmolLM2-135M
+15 % perplexity; GPTQ (Frantar et al. 2022) chooses the same kind of blocks (one float16 scale per
32 weights, codes 0..15, w = d * (q - 8)) so that the layer's *outputs* on calibration text stay
close: within each row, columns are quantized in order and each one's rounding error is pushed
onto the columns not yet quantized through the inverse of H = E[x x^T] of the layer's inputs. A
block's scale (int4m: and minimum) is taken (ggml's rule) from the weights as updated when the
block is reached. The result is ordinary int8/int4/int4m bundles: nothing at run time changes.

Inputs: gate/up rows see the FFN input x (H [hidden, hidden]); the down projection sees the
intermediate activations h = act(gate x) * up x (H [intermediate, intermediate]), captured by
running the float model densely over the calibration windows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from llmflash.format import quantized as Q
from llmflash.format.layout import FlashModelDir, down_block_of, down_block_tensors
from llmflash.models.base import FFNProvider
from llmflash.runtime.ffn import BundleSlices, ffn_intermediate
from llmflash.tools.gptq import damped_inverse_cholesky


class _Moments(FFNProvider):
    """Dense float FFN that accumulates E[x x^T] of its inputs and of its intermediate activations."""

    def __init__(self, model_dir: FlashModelDir):
        c = model_dir.config
        self.slices = BundleSlices(model_dir.bundle)
        self.act, self.threshold = c.hidden_act, c.act_threshold
        self.rows = []
        for layer in range(c.num_layers):
            perm = model_dir.layers[layer].permutation()
            self.rows.append(model_dir.read_layer_bundles(layer)[np.argsort(perm)].float())  # neuron order
        self.hx = [torch.zeros(c.hidden_size, c.hidden_size, dtype=torch.float64) for _ in range(c.num_layers)]
        self.hh = [torch.zeros(c.intermediate_size, c.intermediate_size, dtype=torch.float64)
                   for _ in range(c.num_layers)]
        self.count = 0

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows[layer]
        h = ffn_intermediate(x, rows, self.slices, self.act, self.threshold)
        self.hx[layer] += (x.t() @ x).double()
        self.hh[layer] += (h.t() @ h).double()
        if layer == 0:
            self.count += x.shape[0]
        return h @ rows[:, self.slices.down]


def gptq_blocks(W: torch.Tensor, H: torch.Tensor, kind: str, damp: float = 0.01) -> np.ndarray:
    """W [N, K] (float) against inputs of second moment H [K, K] -> uint8 [N, row_bytes] blocks."""
    W = W.float().clone()
    N, K = W.shape
    H = H.double().clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = damped_inverse_cholesky(H, damp)
    B = Q.BLOCK
    codes = torch.zeros(N, K, dtype=torch.int8)
    scales = torch.zeros(N, K // B, dtype=torch.float16)
    mins = torch.zeros(N, K // B, dtype=torch.float16)
    for g in range(K // B):
        i0, i1 = g * B, (g + 1) * B
        Wb = W[:, i0:i1].clone()
        m = torch.zeros(N)
        if kind == "int4":  # ggml's Q4_0 scale: the weight of largest magnitude / -8
            imax = Wb.abs().argmax(1, keepdim=True)
            d = (Wb.gather(1, imax) / -8).reshape(-1)
        elif kind == "int4m":  # ggml's Q4_1: minimum, and (max - min) / 15
            low = Wb.amin(1)
            m = low.to(torch.float16).float()
            d = (Wb.amax(1) - low) / 15
        else:  # Q8_0: max |w| / 127
            d = Wb.abs().amax(1) / 127
        d = d.to(torch.float16).float()
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        lo, hi = {"int4": (-8, 7), "int4m": (0, 15), "int8": (-127, 127)}[kind]
        Eb = torch.zeros_like(Wb)
        Hb = Hinv[i0:i1, i0:i1]
        for j in range(B):
            w = Wb[:, j]
            q = torch.clamp(torch.round((w - m) * inv), lo, hi)
            codes[:, i0 + j] = q.to(torch.int8)
            err = (w - (q * d + m)) / Hb[j, j]
            Wb[:, j + 1:] -= err[:, None] * Hb[j, j + 1:][None, :]
            Eb[:, j] = err
        scales[:, g] = d.to(torch.float16)
        mins[:, g] = m.to(torch.float16)
        W[:, i1:] -= Eb @ Hinv[i0:i1, i1:]
    return Q.blocks_np(scales.numpy(), codes.numpy(), kind, mins.numpy())


def gptq_convert(float_dir: Path | str, dst: Path | str, kind: str, text: Path | str, tokens: int = 4096,
                 window: int = 512, force: bool = False, progress: bool = True,
                 resident_dtype: str | None = None):
    """Write DST (int8/int4) from a float conversion FLOAT_DIR, the FFN quantized by GPTQ against
    the model's own activations on `tokens` tokens of `text`."""
    from llmflash.conversion.writer import _tensor_bytes, write_model_dir
    from llmflash.conversion.source import TokenizerSpec
    from llmflash.runtime.engine import Engine
    from llmflash.tools.text import text_windows

    src = FlashModelDir(float_dir)
    c = src.config
    Q.check_width(c.hidden_size, "hidden_size")
    Q.check_width(c.intermediate_size, "intermediate_size")
    moments = _Moments(src)
    engine = Engine(src.path, torch.float32, ffn=lambda d, dt: moments)
    windows = text_windows(src, engine.tokenizer, text, tokens, window)
    with torch.inference_mode():
        for ids in windows:
            engine.model.forward(torch.tensor(ids), engine.model.new_cache(len(ids)))
    print(f"gptq: {moments.count} calibration tokens in {len(windows)} windows from {text}", file=sys.stderr)
    weights = src.load_resident(None)
    del engine
    codec_layout = [p.name for p in src.bundle.parts]
    sl = BundleSlices(src.bundle)
    per_layer: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def down(layer: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        if layer not in per_layer:
            w_down = moments.rows[layer][:, sl.down].t().contiguous()  # [hidden, n]
            per_layer[layer] = Q.down_split(gptq_blocks(w_down, moments.hh[layer], kind), kind,
                                            c.intermediate_size)
        return per_layer[layer]

    resident = [(n, tuple(t.shape)) for n, t in weights.items()]
    resident += down_block_tensors(c, kind)

    def resident_chunks(name: str, shape: tuple, tdtype: torch.dtype):
        if name.startswith("ffn.layers."):
            layer, is_mins = down_block_of(name)
            scales, mins, _ = down(layer)
            yield np.ascontiguousarray(mins if is_mins else scales)
            return
        if tdtype == torch.uint8:  # a resident matrix in blocks (--resident-dtype int8/int4/int4m)
            yield Q.quantize_rows(weights[name].float().numpy(), resident_dtype)
            return
        yield _tensor_bytes(weights[name].to(tdtype))

    def layer_chunks(layer: int):
        rows = moments.rows[layer]
        gate = gptq_blocks(rows[:, sl.gate], moments.hx[layer], kind) if sl.gate is not None else None
        up = gptq_blocks(rows[:, sl.up], moments.hx[layer], kind)
        biases = [rows[:, s].reshape(-1).numpy() for s in (sl.gate_bias, sl.up_bias) if s is not None]
        out = [Q.bundle_bytes_np(gate, up, down(layer)[2], biases, kind)]
        per_layer.pop(layer, None)
        moments.hh[layer] = moments.hx[layer] = None
        return out

    tok = src.manifest.get("tokenizer") or {}
    spec = TokenizerSpec(src.tokenizer_path.read_text() if src.tokenizer_path else None,
                         tok.get("chat_template"), tok.get("bos_token"), tok.get("eos_token"))
    del codec_layout
    extra = {"quantization": {"format": Q.GGUF_TYPE[kind], "block": Q.BLOCK, "method": "gptq",
                              "calibration": {"text": str(Path(text).resolve()), "tokens": moments.count},
                              "kept_tensors": 0, "requantized": {}}}
    from llmflash.conversion.writer import check_destination

    check_destination(Path(dst), force)
    return write_model_dir(dst, c, kind, resident, resident_chunks, layer_chunks, spec,
                           src.manifest.get("source", {}), extra=extra, progress=progress,
                           desc=f"gptq {kind}", resident_dtype=resident_dtype)
