"""Cost of llmflash's integrity checks on a converted model (figures in docs/INTEGRITY.md).

usage: python experiments/integrity_cost.py MODEL_DIR [BUNDLES_PER_TOKEN]

Prints one JSON object: opening the model (manifest checksum + schema), sha256 and xxh3 of every
layer (the first whole read of each layer), and the per-token cost of flash's per-bundle check
for BUNDLES_PER_TOKEN random bundles a token (default 3930, what the relufied SmolLM2 reads at a
50% budget), in process CPU time (best of 3; wall time on a shared machine is mostly other
processes' time), against zlib.crc32 for comparison. Run it under `flock /tmp/llmflash-bench.lock`.
"""

import hashlib
import json
import sys
import time
import zlib

import numpy as np

from llmflash.format.integrity import BundleChecks, bundle_digests
from llmflash.format.layout import FlashModelDir


def main() -> None:
    d = FlashModelDir(sys.argv[1])
    per_token = int(sys.argv[2]) if len(sys.argv) > 2 else 3930
    raw = (d.path / d.ffn_path.name).read_bytes()  # in DRAM: only hashing is timed
    arr = np.frombuffer(raw, dtype=np.uint8)
    layers = [arr[r.offset:r.offset + r.nbytes] for r in d.layers]
    t0 = time.process_time()
    for x in layers:
        hashlib.sha256(x).hexdigest()
    sha = time.process_time() - t0
    t0 = time.process_time()
    for x in layers:
        bundle_digests(x.reshape(-1, d.bundle.nbytes))
    xx = time.process_time() - t0
    t0 = time.perf_counter()
    FlashModelDir(sys.argv[1])
    open_s = time.perf_counter() - t0

    checks = BundleChecks.load(d)
    rng = np.random.default_rng(0)
    per_layer = max(1, per_token // len(d.layers))
    calls = []
    for _ in range(32):
        for layer, x in enumerate(layers):
            slots = np.sort(rng.choice(d.layers[layer].neurons, per_layer, replace=False))
            calls.append((layer, slots, np.ascontiguousarray(x.reshape(-1, d.bundle.nbytes)[slots])))
    best_xx = best_crc = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for layer, slots, rows in calls:
            checks.verify(layer, slots, rows)
        best_xx = min(best_xx, time.process_time() - t0)
        t0 = time.process_time()
        for _, _, rows in calls:
            for row in rows:
                zlib.crc32(row)
        best_crc = min(best_crc, time.process_time() - t0)
    mb = sum(r.nbytes for r in d.layers) / 1e6
    print(json.dumps({
        "ffn_MB": round(mb, 1), "bundles": sum(r.neurons for r in d.layers), "bundle_bytes": d.bundle.nbytes,
        "open_model_ms": round(open_s * 1e3, 2),
        "sha256_all_layers_s": round(sha, 3), "xxh3_all_bundles_s": round(xx, 3),
        "bundles_per_token": per_layer * len(d.layers),
        "xxh3_check_ms_per_token": round(best_xx / 32 * 1e3, 2),
        "crc32_check_ms_per_token": round(best_crc / 32 * 1e3, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
