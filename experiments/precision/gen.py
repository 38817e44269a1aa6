"""generate --json through llmflash.load (used while the CLI was being restructured). Usage: python gen.py MODEL MODE N [DTYPE]."""
import json, sys, time
t0 = time.monotonic()
import llmflash.api as api
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
dtype = sys.argv[4] if len(sys.argv) > 4 else "auto"
m = api.load(path, mode, memory="50%", dtype=dtype)
t1 = time.monotonic()
g = m.generate([1, 2, 3], n, ignore_eos=True)
d = g.to_dict(); d["load_s"] = t1 - t0
print(json.dumps(d))
