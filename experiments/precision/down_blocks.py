"""The transposed down projection in one piece against contiguous column blocks (float16). Usage: python down_blocks.py THREADS."""
import time, torch, sys
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
def best(f, n=7):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)*1e3
for (d, n) in [(4096, 16384), (4096, 11008), (576, 1536)]:
    DT = torch.randn(d, n).half(); h = torch.randn(1, n).half(); W = torch.randn(n, d).half(); x = torch.randn(1, d).half()
    res = [f"d={d} n={n}: up-form {best(lambda: F.linear(x, W)):.2f} ms, down_t {best(lambda: F.linear(h, DT)):.2f}"]
    for blk in (2048, 4096, 8192):
        if blk >= n: continue
        nb = (n + blk - 1) // blk
        blocks = [DT[:, i*blk:(i+1)*blk].contiguous() for i in range(nb)]
        def run():
            y = F.linear(h[:, :blk], blocks[0]).float()
            for i in range(1, nb): y += F.linear(h[:, i*blk:(i+1)*blk], blocks[i])
            return y
        res.append(f"blk{blk} {best(run):.2f}")
    print(", ".join(res), flush=True)
