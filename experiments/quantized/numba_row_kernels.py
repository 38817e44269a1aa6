"""Issue 12: one token's FFN over quantized rows (flash decode's path) through the compiled
kernels (runtime/quant_kernels.py, numba) against the dequantizing torch route
(runtime/quant_ffn.quant_rows_ffn with the kernels switched off), at a 7B layer's shape.

usage: python experiments/quantized/numba_row_kernels.py

1690 rows (OPT-6.7B's selection per layer on the paper's trace) of hidden size 4096, scattered
neuron ids among 16384, OPT (up | down | bias) and Llama (gate | up | down) bundles, int4 and
int4m; prints the median milliseconds of each route and their largest relative difference (two
threads). Run it under `flock /tmp/llmflash-bench.lock`.
"""
import time

import numpy as np
import torch

from llmflash.format import quantized as Q
from llmflash.format.layout import bundle_layout_for
from llmflash.models.config import ModelConfig
from llmflash.runtime import quant_kernels
from llmflash.runtime.quant_ffn import quant_rows_ffn

torch.set_num_threads(2)
S, K, N = 1690, 4096, 16384


def median_ms(f, n=40):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1000


for family in ("opt", "llama"):
    for kind in ("int4", "int4m"):
        c = ModelConfig(family=family, model_type=family, vocab_size=16, hidden_size=K, intermediate_size=N,
                        num_layers=1, num_heads=32, num_kv_heads=32, head_dim=K // 32, max_position_embeddings=32,
                        hidden_act="relu", mlp_bias=family == "opt")
        codec = Q.BundleCodec(bundle_layout_for(c, kind), K)
        rng = np.random.default_rng(0)
        rows = [Q.quantize_rows(rng.standard_normal((S, K)).astype(np.float32) * 0.05, kind)
                for _ in range(2 if family == "llama" else 1)]
        codes = rng.integers(0, 16, (S, K)).astype(np.int8) - Q.CODE_OFFSET[kind]
        biases = [rng.standard_normal(S).astype(np.float32) * 0.01] if family == "opt" else []
        raw = torch.from_numpy(Q.bundle_bytes_np(rows[0] if family == "llama" else None, rows[-1], codes, biases, kind))
        ids = torch.from_numpy(rng.choice(N, S, replace=False))
        scales = torch.rand(N // 32, K).t() * 0.01  # held as FlashModelDir holds them
        mins = (torch.rand(N // 32, K).t() - 0.5) * 0.01 if kind == "int4m" else None
        x = torch.randn(1, K)

        def run():
            return quant_rows_ffn(x, raw, ids, codec, scales, "relu", 0.0, mins)

        quant_kernels.warm(kind)
        got, compiled = run(), median_ms(run)
        quant_kernels.ENABLED = False
        want, torch_route = run(), median_ms(run)
        quant_kernels.ENABLED = True
        diff = float((got - want).abs().max() / want.abs().max())
        print(f"{family:5s} {kind:5s}  kernels {compiled:6.2f} ms  torch route {torch_route:6.2f} ms  "
              f"({torch_route / compiled:.1f}x)  rel diff {diff:.1e}")
