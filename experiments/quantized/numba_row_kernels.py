"""Issue 12 probe: the FFN over quantized rows (flash's decode path) with numba kernels against
the torch path that ships (runtime/quant_ffn.quant_rows_ffn), at SmolLM2's and a 7B shape.

usage: pip install numba; python experiments/quantized/numba_row_kernels.py

Not part of llmflash (numba is not a dependency): it measures what a compiled row kernel would
gain. Per kind (int4 = Q4_0, int4m = Q4_1) and shape (S selected rows of hidden size K, ReLU
gate|up|down bundles, random down scales), it prints the relative difference of the two results
and the median milliseconds of each (two threads). Run it under `flock /tmp/llmflash-bench.lock`.
"""
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from llmflash.format import quantized as Q
from llmflash.format.layout import bundle_layout_for
from llmflash.models.config import ModelConfig
from llmflash.runtime.quant_ffn import quant_rows_ffn

torch.set_num_threads(2)
numba.set_num_threads(2)


@njit(parallel=True, cache=True, fastmath=True)
def rows_dot(x, raw, start, bb, hb, off, d, m, xs, out):
    """out[n] = row n of a gate/up part (blocks from byte `start`) . x; d, m: block scales, minimums."""
    S = raw.shape[0]
    nb = d.shape[1]
    for n in prange(S):
        acc = np.float32(0.0)
        for b in range(nb):
            base = start + b * bb + hb
            s = np.float32(0.0)
            for i in range(16):
                byte = raw[n, base + i]
                s += x[32 * b + i] * np.float32((byte & 15) - off) + x[32 * b + 16 + i] * np.float32((byte >> 4) - off)
            acc += d[n, b] * s
            if m.shape[0] > 0:
                acc += m[n, b] * xs[b]
        out[n] = acc


@njit(parallel=True, cache=True, fastmath=True)
def down_acc(a, raw, start, off, groups, s, m, parts, y):
    """y += sum_n a[n] * down column n (codes from byte `start`, scales s[group, h], minimums m)."""
    S = raw.shape[0]
    K = y.shape[0]
    nchunk = K // 32
    per = (nchunk + parts - 1) // parts
    for p in prange(parts):
        c0 = p * per
        c1 = min(nchunk, c0 + per)
        for n in range(S):
            an = a[n]
            if an == 0:
                continue
            g = groups[n]
            for c in range(c0, c1):
                base = start + c * 16
                for i in range(16):
                    byte = raw[n, base + i]
                    h0 = 32 * c + i
                    y[h0] += an * s[g, h0] * np.float32((byte & 15) - off)
                    y[h0 + 16] += an * s[g, h0 + 16] * np.float32((byte >> 4) - off)
                if m.shape[0] > 0:
                    for j in range(32):
                        y[32 * c + j] += an * m[g, 32 * c + j]


def median_ms(f, n=30):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1000


for kind in ("int4", "int4m"):
    for S, K, N in ((180, 576, 1536), (1690, 4096, 16384)):
        c = ModelConfig(family="llama", model_type="llama", vocab_size=16, hidden_size=K, intermediate_size=N,
                        num_layers=1, num_heads=4, num_kv_heads=4, head_dim=K // 4, max_position_embeddings=32,
                        hidden_act="relu")
        codec = Q.BundleCodec(bundle_layout_for(c, kind), K)
        rng = np.random.default_rng(0)
        gate = Q.quantize_rows(rng.standard_normal((S, K)).astype(np.float32) * 0.05, kind)
        up = Q.quantize_rows(rng.standard_normal((S, K)).astype(np.float32) * 0.05, kind)
        dcodes = rng.integers(0, 16, (S, K)).astype(np.int8) - Q.CODE_OFFSET[kind]
        raw = torch.from_numpy(Q.bundle_bytes_np(gate, up, dcodes, [], kind))
        ids = torch.from_numpy(np.sort(rng.choice(N, S, replace=False)))
        scales = torch.rand(K, N // 32) * 0.01
        mins = (torch.rand(K, N // 32) - 0.5) * 0.01 if kind == "int4m" else None
        x = torch.randn(1, K)
        ref = quant_rows_ffn(x, raw, ids, codec, scales, "relu", 0.0, mins)
        rnp = raw.numpy()
        s_g = scales.t().contiguous().numpy()
        m_g = mins.t().contiguous().numpy() if mins is not None else np.zeros((0, 0), np.float32)
        groups = (ids // 32).numpy()
        bb, hb, off = Q.BLOCK_BYTES[kind], Q.HEAD_BYTES[kind], Q.CODE_OFFSET[kind]

        def compiled():
            xv = x[0].numpy()
            xs = xv.reshape(-1, 32).sum(1)
            outs = []
            for name in ("gate", "up"):
                sp = codec.spans[name]
                blk = rnp[:, sp].reshape(S, K // 32, bb)
                d = np.ascontiguousarray(blk[..., :2]).view(np.float16).reshape(S, K // 32).astype(np.float32)
                mm = (np.ascontiguousarray(blk[..., 2:4]).view(np.float16).reshape(S, K // 32).astype(np.float32)
                      if kind == "int4m" else np.zeros((0, 0), np.float32))
                o = np.empty(S, np.float32)
                rows_dot(xv, rnp, sp.start, bb, hb, off, d, mm, xs, o)
                outs.append(o)
            h = np.maximum(outs[0], 0) * outs[1]
            y = np.zeros(K, np.float32)
            down_acc(h.astype(np.float32), rnp, codec.spans["down"].start, off, groups, s_g, m_g, 2, y)
            return torch.from_numpy(y)[None]

        got = compiled()
        print(f"{kind:6s} S={S:5d} K={K:5d}  rel diff {float((got - ref).abs().max() / ref.abs().max()):.1e}  "
              f"torch {median_ms(lambda: quant_rows_ffn(x, raw, ids, codec, scales, 'relu', 0.0, mins)):7.2f} ms  "
              f"numba {median_ms(compiled):7.2f} ms")
