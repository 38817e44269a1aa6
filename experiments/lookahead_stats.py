"""How good is flash mode's lookahead guess on a real model? (docs/FLASH.md, "Overlap")

usage: python experiments/lookahead_stats.py MODEL [--memory 50%] [--tokens 48] [--context 256]

Runs flash mode (lookahead on) over the bench prompt and, at every decode step and layer l >= 1,
compares the guess for layer l (layer l's selector applied to layer l-1's FFN input) with layer
l's own selection: recall (share of the selection guessed), ratio (guess size / selection size),
and for the guessed neurons that the selection did not want (false positives) and those it did,
the share already in layer l's cache when the guess was made (those are never read). The last
figure is what `trace_selector.LOOKAHEAD_FP_CACHED` states for replayed runs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--memory", default="50%")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()

    import llmflash
    from llmflash.tools.bench import BENCH_TEXT

    m = llmflash.load(args.model, mode="flash", memory=args.memory, context=args.context)
    ffn = m.engine.ffn
    selector = ffn.selector
    guesses: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rows: list[tuple[float, float, float, float]] = []
    original_lookahead, original_select = selector.lookahead, selector.select

    def lookahead(layer, x):
        ids = original_lookahead(layer, x)
        guesses[layer] = (ids, ffn.caches[layer].neuron_row[ids] >= 0)
        return ids

    def select(layer, x):
        sel = original_select(layer, x)
        if x.shape[0] == 1 and layer in guesses:
            ids, cached = guesses.pop(layer)
            chosen = sel.ids()
            want = np.isin(ids, chosen)
            fp, tp = ~want, want
            rows.append((want.sum() / max(len(chosen), 1), len(ids) / max(len(chosen), 1),
                         cached[fp].mean() if fp.any() else np.nan, cached[tp].mean() if tp.any() else np.nan))
        return sel

    selector.lookahead, selector.select = lookahead, select
    ids = m.engine.tokenizer.encode(BENCH_TEXT * 2)[:64]
    m.engine.generate(ids, args.tokens, stop_at_eos=False)
    a = np.array(rows, dtype=float)
    print(json.dumps({"model": args.model, "memory": args.memory, "decode_tokens": args.tokens - 1,
                      "layer_steps": len(rows), "recall": float(np.nanmean(a[:, 0])),
                      "ratio": float(np.nanmean(a[:, 1])),
                      "false_positives_already_cached": float(np.nanmean(a[:, 2])),
                      "true_positives_already_cached": float(np.nanmean(a[:, 3]))}, indent=1))


if __name__ == "__main__":
    main()
