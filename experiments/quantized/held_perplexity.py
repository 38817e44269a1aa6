"""Perplexity through the engine as it holds the weights (quantized products on torch's packed int4
kernel, bfloat16 activations) against the float32 route `llmflash eval` uses, on the same windows.

Run: python experiments/quantized/held_perplexity.py MODEL TEXT [TOKENS]   (default 4096 tokens)
"""

import math
import sys

import torch

from llmflash.runtime.engine import Engine
from llmflash.tools.text import text_windows


def perplexity(path: str, text: str, tokens: int, dtype: torch.dtype | None) -> tuple[float, int]:
    engine = Engine(path, dtype)
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in text_windows(engine.dir, engine.tokenizer, text, tokens, 512):
            logits = engine.model.forward(torch.tensor(ids), engine.model.new_cache(len(ids)))
            logp = torch.log_softmax(logits[:-1].float(), -1)
            nll -= float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
            n += len(ids) - 1
    return math.exp(nll / n), n


def main() -> None:
    path, text = sys.argv[1], sys.argv[2]
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    for name, dtype in (("held", None), ("float32", torch.float32)):
        ppl, n = perplexity(path, text, tokens, dtype)
        print(f"{path} {name}: perplexity {ppl:.4f} over {n} predicted tokens", flush=True)


if __name__ == "__main__":
    main()
