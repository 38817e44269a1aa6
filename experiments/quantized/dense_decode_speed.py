"""Dense decode speed of a converted model at its stored precision (issue 12: int4 vs float16).

usage: python experiments/quantized/dense_decode_speed.py MODEL [THREADS]

Engine(MODEL) as stored (--dtype auto), an 8-token prompt, then 24 single-token steps; prints the
median wall and CPU milliseconds per step. Run it under `flock /tmp/llmflash-bench.lock`.
"""
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
from llmflash.runtime.engine import Engine  # noqa: E402

e = Engine(sys.argv[1])
ids = [1, 5, 9, 33, 70, 100, 7, 12]
cache = e.model.new_cache(64)
with torch.inference_mode():
    e.model.forward(torch.tensor(ids), cache)
    wall, cpu = [], []
    for t in range(24):
        w0, c0 = time.perf_counter(), time.process_time()
        e.model.forward(torch.tensor([ids[t % 8]]), cache)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
wall.sort()
cpu.sort()
print(f"{sys.argv[1]} threads {torch.get_num_threads()}: median wall {1000 * wall[12]:.1f} ms, "
      f"cpu {1000 * cpu[12]:.1f} ms, min wall {1000 * wall[0]:.1f} ms")
