"""One token through a resident matrix: torch's packed int4 kernel (BlockMatrix, how
--resident-dtype int8/int4/int4m matrices are held) against the float16 kernel (llmflash.compute)
and against the numba row kernel the flash FFN uses (quant_kernels.rows_dot), which reads the
stored blocks directly. Shapes of a 7B model: an attention projection, a fused q|k|v, a head.

Run: python experiments/quantized/resident_kernel_speed.py   (two threads, median of 30 calls)
"""

import time

import numpy as np
import torch

from llmflash.compute import linear
from llmflash.format.quantized import BLOCK_BYTES, CODE_OFFSET, HEAD_BYTES, quantize_rows
from llmflash.runtime import quant_kernels
from llmflash.runtime.quant_ffn import BlockMatrix

torch.set_num_threads(2)


def median_ms(f, n: int = 30) -> float:
    f()
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    rows_dot = quant_kernels._kernels()[0]
    print(f"{'shape':>12} {'route':>22} {'ms':>8} {'MB held':>8}")
    for n, k in ((4096, 4096), (12288, 4096), (32000, 4096)):
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        w16 = w.half()
        print(f"{n}x{k:>6} {'float16 kernel':>22} {median_ms(lambda: linear(x, w16)):8.2f} {w16.numel() * 2 / 1e6:8.1f}")
        for kind in ("int8", "int4", "int4m"):
            raw = torch.from_numpy(quantize_rows(w.numpy(), kind))
            bm = BlockMatrix.from_blocks(raw, kind, k)
            print(f"{n}x{k:>6} {kind + ' packed int4 kernel':>22} {median_ms(lambda: bm(x)):8.2f} {bm.nbytes / 1e6:8.1f}")
            if kind in quant_kernels.KINDS:
                r = raw.numpy()
                xv = x[0].numpy()
                xs = xv.reshape(-1, 32).sum(1)
                out = np.empty(n, np.float32)
                call = lambda: rows_dot(xv, xs, r, 0, BLOCK_BYTES[kind], HEAD_BYTES[kind], CODE_OFFSET[kind], out)  # noqa: E731
                print(f"{n}x{k:>6} {kind + ' numba rows_dot':>22} {median_ms(call):8.2f} {r.nbytes / 1e6:8.1f}")


if __name__ == "__main__":
    main()
