"""float16 FFN over cached bundle rows (strided, chunked float32 down) and prompt products. Usage: python cache_rows_and_prompts.py THREADS."""
import time, torch, sys
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
def best(f, n=12):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)*1e3
dt = torch.float16
for (d, cap, nu) in [(576, 800, 700), (4096, 3000, 2600)]:
    print(f"--- d={d} cap={cap} n_used={nu}")
    B = torch.randn(cap, 3*d).to(dt); rows = B[:nu]
    GU = torch.randn(cap, 2*d).to(dt); DT = torch.randn(d, cap).to(dt)
    x = torch.randn(1, d); xh = x.half(); h = torch.randn(1, nu); hh = h.half()
    buf = torch.empty(512, d)
    def down_upcast():
        out = torch.zeros(1, d)
        for s in range(0, nu, 512):
            k = min(512, nu - s); buf[:k].copy_(rows[s:s+k, 2*d:]); out.addmm_(h[:, s:s+k], buf[:k])
        return out
    r = {
     'gate strided F.linear': lambda: F.linear(xh, rows[:, :d]),
     'gate+up as one strided [n,2d]->bmm': lambda: torch.matmul(rows[:, :2*d].unflatten(1, (2, d)), xh[0]),
     'gate contig GU[:n,:d] (lda 2d)': lambda: F.linear(xh, GU[:nu, :d]),
     'down notrans bundle': lambda: hh @ rows[:, 2*d:],
     'down upcast chunks fp32': down_upcast,
     'down DT[:, :n] F.linear': lambda: F.linear(hh, DT[:, :nu]),
     'fp32 gate (ref, upcast rows)': lambda: F.linear(x, rows[:, :d].float()),
    }
    for k, f in r.items():
        n = 3 if ('notrans' in k and d > 1000) else 12
        print(f"{k:36} {best(f, n):8.3f} ms", flush=True)
print("--- prefill T=64, W [11008, 4096] / [1536, 576]")
for (n, d) in [(1536, 576), (11008, 4096)]:
    W = torch.randn(n, d).half(); X = torch.randn(64, d)
    Wb = W.bfloat16()
    buf = torch.empty(1024, d)
    def chunk():
        out = torch.empty(64, n)
        for s in range(0, n, 1024):
            k = min(1024, n - s); buf[:k].copy_(W[s:s+k]); torch.mm(X, buf[:k].t(), out=out[:, s:s+k])
        return out
    print(f"n={n} fp16 gemm T=64 {best(lambda: F.linear(X.half(), W), 3):8.2f} ms; bf16 gemm {best(lambda: F.linear(X.bfloat16(), Wb), 3):8.2f} ms; chunked upcast fp32 {best(chunk, 3):8.2f} ms; fp32 {best(lambda: F.linear(X, W.float()), 3):8.2f}")
