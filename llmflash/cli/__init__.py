"""`llmflash` command line: one entry point, one subcommand per job.

Every user-facing failure is an LLMFlashError, printed as one line without a traceback
(exit code 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llmflash import __version__
from llmflash.errors import LLMFlashError

DEFAULT_PROMPT = "What is the capital of France, and why is it famous?"


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face directory or GGUF file into the flash layout")
    p.add_argument("src", type=Path, help="Hugging Face model directory or .gguf file")
    p.add_argument("dst", type=Path, help="output directory (the flash layout)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the weights (default float16)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from llmflash.convert.writer import convert

    model = convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet)
    sizes = model.weights_nbytes()
    print(f"wrote {model.path}: {model.config.model_type}, {model.config.num_layers} layers, "
          f"resident {sizes['resident'] / 2**20:.1f} MiB, FFN bundles {sizes['ffn'] / 2**20:.1f} MiB "
          f"({model.bundle.nbytes} bytes per neuron)")
    return 0


def _add_generate_args(p: argparse.ArgumentParser, prompt: bool = True) -> None:
    if prompt:
        p.add_argument("prompt", nargs="?", default=None, help="prompt text")
        p.add_argument("--ids", default=None,
                       help="comma-separated prompt token ids instead of text (models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (default float32)")
    _add_mode_args(p)
    p.add_argument("--stats", action="store_true",
                   help="print the per-token I/O / memory / compute table at the end")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence (benchmarks)")


def _add_mode_args(p: argparse.ArgumentParser, mode: bool = True) -> None:
    from llmflash.runtime.modes import MODES, SPARSITY

    if mode:
        p.add_argument("--mode", default="dense", choices=MODES,
                       help="dense (all in DRAM, default), flash (ours), naive, hybrid, mmap")
    p.add_argument("--memory", default="50%",
                   help="memory budget for flash/hybrid: a share of the stored model (50%%) or a size (300MiB)")
    p.add_argument("--window", type=int, default=5, help="tokens whose neurons stay cached (flash)")
    p.add_argument("--sparsity", default=None, choices=SPARSITY,
                   help="which FFN neurons to compute: none (all), oracle (the truly active ones; "
                        "ReLU models or calibrated thresholds), predictor (trained predictors). "
                        "Default: none for dense mode, predictor for flash")
    p.add_argument("--sparsity-budget", type=float, default=None,
                   help="predictor: use the thresholds that selected this share of neurons (0.1..0.9) "
                        "on calibration text instead of the trained decision thresholds")
    p.add_argument("--threads", type=int, default=32, help="reads in flight (flash, naive, hybrid)")
    p.add_argument("--reader", default="auto", choices=("auto", "aio", "threads"),
                   help="how reads are kept in flight: kernel AIO or a thread pool calling preadv "
                        "(auto: AIO for O_DIRECT files where the kernel allows it)")
    p.add_argument("--pin", type=float, default=0.0,
                   help="flash: share of each layer's hottest neurons kept pinned in the cache "
                        "(e.g. 0.03; needs `llmflash reorder`)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a converted model")
    p.add_argument("model", type=Path, help="converted model directory")
    _add_generate_args(p)
    p.set_defaults(func=cmd_generate)


def _prompt_ids(engine, args: argparse.Namespace) -> list[int]:
    if args.ids is not None:
        if args.prompt is not None:
            raise LLMFlashError("give either a prompt or --ids, not both")
        try:
            return [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise LLMFlashError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    if args.prompt is None:
        raise LLMFlashError("no prompt given")
    tok = engine.require_tokenizer()
    return tok.encode_chat(args.prompt) if args.chat else tok.encode(args.prompt)


def run_generation(engine, prompt_ids: list[int], args: argparse.Namespace) -> int:
    from llmflash.runtime.tokenizer import StreamDecoder

    stream = None
    if not args.json and engine.tokenizer is not None:
        decoder = StreamDecoder(engine.tokenizer)

        def stream(token: int) -> None:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    result = engine.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, on_token=stream,
                             stop_at_eos=not args.ignore_eos)
    timing = result.timing()
    if args.json:
        from llmflash.runtime.engine import peak_rss_bytes

        out = {"prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
               "finish_reason": result.finish_reason, "mode": args.mode, "timing": timing,
               "stats": result.stats,
               "peak_rss_bytes": peak_rss_bytes()}
        print(json.dumps(out))
    else:
        if engine.tokenizer is None:
            print(" ".join(map(str, result.token_ids)))
        else:
            print()
        tps = timing["tokens_per_s"]
        print(f"[{len(result.prompt_ids)} prompt tokens, prefill {timing['prefill_s'] * 1000:.0f} ms; "
              f"{len(result.token_ids)} generated, "
              f"{'n/a' if tps is None else f'{tps:.1f}'} tokens/s decode; stop: {result.finish_reason}]",
              file=sys.stderr)
        if args.stats:
            from llmflash.cli.report import stats_table

            print(stats_table(result.stats, args.mode), file=sys.stderr)
    return 0


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def make_engine(model: Path, args: argparse.Namespace):
    from llmflash.runtime.modes import RunOptions, ffn_factory
    from llmflash.runtime.engine import Engine

    sparsity = args.sparsity or ("predictor" if args.mode == "flash" else "none")
    if args.mode == "dense" and sparsity != "none":
        # sparse execution in DRAM: the FFN computed over the selected neurons only
        from llmflash.runtime.sparse_ffn import sparse_ffn_factory

        return Engine(model, dtype=_dtype(args.dtype),
                      ffn=sparse_ffn_factory(sparsity, budget=args.sparsity_budget))
    options = RunOptions(mode=args.mode, memory=args.memory, window=args.window,
                         sparsity=sparsity, threads=args.threads, pin=args.pin,
                         sparsity_budget=args.sparsity_budget, reader=args.reader)
    return Engine(model, dtype=_dtype(args.dtype), ffn=ffn_factory(options))


def cmd_generate(args: argparse.Namespace) -> int:
    engine = make_engine(args.model, args)
    return run_generation(engine, _prompt_ids(engine, args), args)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every file of a converted model against its checksums")
    p.add_argument("model", type=Path)
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from llmflash.format.layout import FlashModelDir

    model = FlashModelDir(args.model)
    problems = model.verify(progress=sys.stderr.isatty())
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    print(f"ok: {len(model.files)} files and {len(model.layers)} FFN layers match {model.path / 'manifest.json'}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: convert the built-in SmolLM2-135M-Instruct once, "
                                    "answer in flash mode at a 50%% budget, compare with the baselines")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--models-dir", type=Path, default=None,
                   help="where converted models are cached (default $LLMFLASH_HOME/models or ~/.cache/llmflash/models)")
    p.add_argument("--bench-tokens", type=int, default=16,
                   help="tokens per mode in the comparison (0 skips it)")
    _add_generate_args(p, prompt=False)
    p.set_defaults(func=cmd_demo, chat=True, ids=None, mode="flash", sparsity="oracle")


def cmd_demo(args: argparse.Namespace) -> int:
    """SmolLM2 is not a ReLU model and ships no predictors, so the demo selects neurons with the
    magnitude oracle (top half by |silu(gate)·up| per token); `llmflash calibrate` trains real
    predictors, and a relufied model makes the selection exact."""
    from llmflash.defaults import default_model_dir

    model = default_model_dir(args.models_dir)
    print(f"model: {model}", file=sys.stderr)
    engine = make_engine(model, args)
    print(f"prompt: {args.prompt}  [mode {args.mode}, memory {args.memory}, window {args.window}, "
          f"sparsity {args.sparsity}]", file=sys.stderr)
    status = run_generation(engine, engine.require_tokenizer().encode_chat(args.prompt), args)
    del engine
    if status or args.bench_tokens <= 0 or args.json:
        return status
    from llmflash.tools import bench

    print(f"\ncomparing flash with the baselines at {args.memory} ({args.bench_tokens} tokens each, "
          "one process per mode, page cache dropped) ...", file=sys.stderr)
    result = bench.bench(model, memory=args.memory, window=args.window, tokens=args.bench_tokens,
                         prompt_tokens=32, sparsity=args.sparsity, dtype=args.dtype,
                         progress=lambda msg: print(msg, file=sys.stderr))
    print(bench.table(result))
    if model_is_dense_silu(model):
        print("note: SmolLM2 is a SiLU model with no exact zeros, so the oracle selects half of each "
              "token's neurons; at a 50% budget most of them do not fit the cache and are streamed "
              "from flash every token as scattered reads, which lose to naive's sequential reads "
              "(the break-even on this disk is about half the neurons, see STORAGE.md). Flash pays "
              "on sparse models: on a ReLU model (e.g. one from `llmflash relufy`) a token needs "
              "about a tenth of the FFN; figures in docs/FLASH.md.")
    return 0


def model_is_dense_silu(model: Path) -> bool:
    from llmflash.format.layout import FlashModelDir

    return FlashModelDir(model).config.hidden_act == "silu"


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="flash against naive, hybrid, mmap and dense, one process each")
    p.add_argument("model", type=Path, help="converted model directory")
    _add_mode_args(p, mode=False)
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per mode")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--modes", default="flash,naive,hybrid,mmap,dense",
                   help="comma-separated modes to run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-limit", action="store_true", help="do not run modes under a cgroup memory limit")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="stacked latency-split bars (PNG)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from llmflash.tools import bench

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    result = bench.bench(args.model, memory=args.memory, window=args.window, tokens=args.tokens,
                         prompt_tokens=args.prompt_tokens, sparsity=args.sparsity or "predictor",
                         modes=modes,
                         dtype=args.dtype, limit_memory=not args.no_limit, pin=args.pin,
                         threads=args.threads, reader=args.reader,
                         sparsity_budget=args.sparsity_budget,
                         progress=lambda msg: print(msg, file=sys.stderr))
    print(bench.table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        bench.plot(result, args.plot)
    return 0


def _add_reorder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reorder", help="co-activation layout: rewrite the FFN bundles so neurons "
                                       "that fire together are adjacent on flash; record hot neurons")
    p.add_argument("model", type=Path)
    p.add_argument("--text", type=Path, required=True, help="calibration text (not your eval text)")
    p.add_argument("--tokens", type=int, default=4096)
    p.set_defaults(func=cmd_reorder)


def cmd_reorder(args: argparse.Namespace) -> int:
    from llmflash.tools.reorder import reorder

    model = reorder(args.model, args.text, args.tokens)
    print(f"reordered {len(model.layers)} layers of {model.path}; bundles now in {model.ffn_path.name}")
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe-disk", help="measure random-read throughput and save the device profile")
    from llmflash.tools import probe_disk as probe

    probe.add_arguments(p)
    p.set_defaults(func=probe.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmflash", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmflash {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_convert, _add_generate, _add_verify, _add_bench, _add_reorder,
                _add_probe):
        add(sub)
    from llmflash.cli.sparsity import register

    register(sub)  # calibrate, train-predictors, eval, relufy
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LLMFlashError as exc:
        print(f"llmflash: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmflash: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
