"""CPU time of one token's matrix products alone (float16 model, one thread). Usage: python products_only.py MODEL."""
import sys, time, torch
torch.set_num_threads(1)
from llmflash.runtime.engine import Engine
from llmflash.compute import linear, linear_split
e = Engine(sys.argv[1])
mats = [w for n, w in e.weights.items() if w.dim() == 2 and "embed_positions" not in n]
packed = e.ffn.packed
def one_token():
    for w in mats:
        linear(torch.randn(1, w.shape[1]), w)
    for gu, b, blocks in packed:
        linear(torch.randn(1, gu.shape[1]), gu, b)
        linear_split(torch.randn(1, sum(x.shape[1] for x in blocks)), blocks)
one_token()
ts = []
for _ in range(10):
    c = time.process_time(); one_token(); ts.append(time.process_time() - c)
print(f"{sys.argv[1]}: matrix products alone, one token, 1 thread: cpu min {min(ts)*1000:.1f} ms median {sorted(ts)[5]*1000:.1f} ms ({len(mats) + 2*len(packed)} products)")
