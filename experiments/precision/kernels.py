"""[1, d] x W^T at float32/float16/bfloat16: contiguous, bundle slice, other orientation, float32 upcast, prompts. Usage: python kernels.py THREADS (docs/FLASH.md, Precision and compute)."""
import time, torch, sys
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 2)
def best(f, n=15):
    f(); f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)*1e3
print(torch.backends.mkldnn.is_available(), torch.backends.cpu.get_cpu_capability())
for (d,n) in [(576,1536),(4096,11008)]:
    print(f"--- d={d} n={n}")
    for dt in [torch.float16, torch.bfloat16, torch.float32]:
        B = torch.randn(n, 3*d).to(dt)
        G = B[:, :d].contiguous(); D = B[:, 2*d:].contiguous(); DT = D.t().contiguous()
        x = torch.randn(1, d).to(dt); h = torch.randn(1, n).to(dt)
        nb = n*d*B.element_size()
        r = {
         'gate dot contig F.linear': lambda: F.linear(x, G),
         'gate dot strided(bundle)': lambda: F.linear(x, B[:, :d]),
         'down notrans h@D contig': lambda: h @ D,
         'down notrans h@B[:,down]': lambda: h @ B[:, 2*d:],
         'down dot F.linear(h, DT)': lambda: F.linear(h, DT),
         'down mv(DT,h)': lambda: torch.mv(DT, h[0]),
        }
        if dt != torch.float32:
            xf = x.float()
            try:
                torch.mm(x, G.t(), out_dtype=torch.float32)
                r['mm out_dtype f32'] = lambda: torch.mm(x, G.t(), out_dtype=torch.float32)
            except Exception as e: print('out_dtype:', type(e).__name__, str(e)[:80])
            r['upcast G.float()'] = lambda: G.float()
            buf = torch.empty(min(n, 65536*4//d), d)
            def chunked():
                out = torch.empty(1, n); c = len(buf)
                for s in range(0, n, c):
                    k = min(c, n-s); buf[:k].copy_(G[s:s+k]); torch.mm(xf, buf[:k].t(), out=out[:, s:s+k])
                return out
            r['chunked upcast (256K el) + f32'] = chunked
            if dt == torch.float16:
                x2 = torch.randn(2, d).to(dt)
                r['gate dot contig T=2'] = lambda: F.linear(x2, G)
        for k,f in r.items():
            v = best(f, 5 if d>1000 and 'notrans' in k else 15)
            print(f"{str(dt)[6:]:9} {k:32} {v:8.3f} ms  {nb/v/1e6:6.1f} GB/s", flush=True)
