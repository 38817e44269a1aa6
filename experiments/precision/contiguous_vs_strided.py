"""float16/bfloat16 matrix-vector speed, contiguous against bundle slices, and a copy bandwidth. Usage: python contiguous_vs_strided.py THREADS."""
import time, torch, sys
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
def best(f, n=15):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)*1e3
for dt in (torch.float16, torch.bfloat16):
  for (n, d) in [(2600, 4096), (11008, 4096), (700, 576), (1536,576), (49152, 576)]:
    W = torch.randn(n, d).to(dt); B = torch.randn(n, 3*d).to(dt); x = torch.randn(1, d).to(dt)
    a = best(lambda: F.linear(x, W)); b = best(lambda: F.linear(x, B[:, :d])); c = best(lambda: torch.mv(W, x[0]))
    print(f"{dt} n={n} d={d}: contig {a:.3f} ms ({n*d*2/a/1e6:.1f} GB/s)  strided {b:.3f} ms ({n*d*2/b/1e6:.1f} GB/s) mv {c:.3f}", flush=True)
a = torch.empty(50_000_000).fill_(1); b = torch.empty_like(a)
t = best(lambda: b.copy_(a), 8); print(f"copy 200MB: {2*a.numel()*4/t/1e6:.1f} GB/s")
