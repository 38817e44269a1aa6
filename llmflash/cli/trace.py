"""`llmflash trace record|synth|stats`: activation traces to replay with `--sparsity trace:PATH`."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmflash.cli.options import density_type, positive_int

NAME = "trace"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="record a model's active FFN neurons on text, or synthesise them for "
                                  "another model's shape (replayed by --sparsity trace:PATH)")
    verbs = p.add_subparsers(dest="trace_command", required=True, metavar="record|synth|stats")
    r = verbs.add_parser("record", help="per layer and token, the active neurons of MODEL on text")
    r.add_argument("model", type=Path, help="converted model directory")
    r.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    r.add_argument("--tokens", type=positive_int, default=1024, help="tokens of text (default 1024)")
    r.add_argument("--density", type=density_type, default=0.5,
                   help="SiLU models: share kept per token by |silu(gate)*up| (default 0.5); "
                        "ReLU/FATReLU models record the exact non-zeros")
    r.add_argument("--out", type=Path, required=True, help="trace file to write (.npz)")
    r.set_defaults(func=run)
    s = verbs.add_parser("synth", help="sets for MODEL's shape with the statistics of a trace or a "
                                       "published profile")
    s.add_argument("--profile", required=True,
                   help="a recorded trace (.npz) or a named profile: paper-opt-6.7b, paper-falcon-7b")
    s.add_argument("--like", required=True, help="target: a converted model directory or a synth preset")
    s.add_argument("--tokens", type=positive_int, default=1024, help="tokens to synthesise (default 1024)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True, help="trace file to write (.npz)")
    s.set_defaults(func=run)
    t = verbs.add_parser("stats", help="per-layer active fraction, window unions k=1..8, hot-neuron shares")
    t.add_argument("trace", type=Path)
    t.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from llmflash.format.trace_file import Trace
    from llmflash.tools import trace as tr

    if args.trace_command == "record":
        trace = tr.record(args.model, args.text, tokens=args.tokens, density=args.density, out=args.out)
    elif args.trace_command == "synth":
        trace = tr.synthesise(args.profile, args.like, tokens=args.tokens, seed=args.seed, out=args.out)
    else:
        trace = Trace.load(args.trace)
    stats = tr.trace_stats(trace)
    if args.trace_command == "stats" and args.json:
        print(json.dumps({"meta": trace.meta, "layers": stats}))
        return 0
    mean = {"active": sum(s["active"] for s in stats) / len(stats),
            "union": [sum(s["union"][k] for s in stats) / len(stats) for k in range(len(stats[0]["union"]))],
            "hot_share": [sum(s["hot_share"][k] for s in stats) / len(stats) for k in range(len(tr.HOT_SHARES))]}
    where = f"wrote {args.out}" if args.trace_command != "stats" else str(args.trace)
    print(f"{where}: {trace.meta.get('kind')} trace, {trace.layers} layers x {trace.neurons} neurons x "
          f"{trace.tokens} tokens ({trace.bits.nbytes / 2**20:.1f} MiB packed)")
    print(f"mean over layers: active {100 * mean['active']:.2f}% per token; window k=1..8 holds "
          + " ".join(f"{100 * u:.1f}" for u in mean["union"]) + " %; a window of k=1..7 loads per token "
          + " ".join(f"{100 * (mean['union'][k] - mean['union'][k - 1]):.2f}" for k in range(1, len(mean["union"])))
          + " %")
    print("hottest " + ", ".join(f"{100 * q:g}%" for q in tr.HOT_SHARES) + " of neurons hold "
          + ", ".join(f"{100 * h:.1f}%" for h in mean["hot_share"]) + " of activations")
    return 0
