"""Dense decode per token (CPU and wall time), bytes touched and the copy-bandwidth floor. Usage: python dense_decode.py MODEL THREADS STEPS."""
import sys, time, statistics, torch
torch.set_num_threads(int(sys.argv[2]))
from llmflash.runtime.engine import Engine, peak_rss_bytes
from llmflash.tools.bench import copy_bandwidth, dense_bytes_per_token
bw = copy_bandwidth()
t0 = time.perf_counter(); e = Engine(sys.argv[1]); load = time.perf_counter() - t0
cache = e.model.new_cache(32)
with torch.inference_mode():
    e.model.forward(torch.tensor([1]), cache)
    cpu, wall = [], []
    for i in range(int(sys.argv[3])):
        c0 = time.process_time(); w0 = time.perf_counter()
        e.model.forward(torch.tensor([5 + i]), cache)
        cpu.append(time.process_time() - c0); wall.append(time.perf_counter() - w0)
b = dense_bytes_per_token(e.dir, "auto")
print(f"{sys.argv[1]} threads {torch.get_num_threads()} load {load:.1f} s; decode cpu {[round(x,3) for x in cpu]} wall {[round(x,3) for x in wall]}; bytes/token {b/1e9:.2f} GB; copy bw {bw['copy_Bps']/1e9:.1f} GB/s -> floor {b/bw['copy_Bps']*1000:.0f} ms; peak RSS {peak_rss_bytes()/2**30:.2f} GiB")
