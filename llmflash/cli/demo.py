"""`llmflash demo`: the main job. Converts the built-in SmolLM2-135M-Instruct once, answers a
prompt in flash mode with it, then compares flash with the baselines in separate processes on a
synthetic model of the paper's kind (OPT shapes, random weights) whose FFN selections replay the
paper's published OPT-6.7B activation statistics (docs/SYNTHETIC.md)."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from llmflash.cli.generate import add_prompt_options, print_generation
from llmflash.cli.options import add_run_options, add_sampling_options, load_options

NAME = "demo"
DEFAULT_PROMPT = "What is the capital of France, and why is it famous?"
COMPARE_PROFILE = "paper-opt-6.7b"  # llmflash/tools/trace.py PROFILES
COMPARE_PREDICTOR = "lowrank:128"   # the paper's predictor kind, charged to the budget
COMPARE_TRACE_TOKENS = 256
COMPARE_PROMPT_TOKENS = 8


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="the main job: answer with the built-in SmolLM2-135M-Instruct in flash mode, "
                                  "then compare flash with the baselines on a synthetic OPT model with "
                                  "replayed activations")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--models-dir", type=Path, default=None,
                   help="where converted and synthetic models are cached (default $LLMFLASH_HOME/models "
                        "or ~/.cache/llmflash/models)")
    p.add_argument("--compare", choices=("synthetic", "default", "none"), default="synthetic",
                   help="what the comparison runs on: a synthetic model of --compare-shape with activations "
                        "replayed from the paper's OPT-6.7B statistics (default), the default model itself, "
                        "or nothing")
    p.add_argument("--compare-shape", default="opt-1.3b", metavar="PRESET|CONFIG.json",
                   help="shape of the synthetic model: a `llmflash synth` preset (default opt-1.3b) or a "
                        "Hugging Face config.json")
    p.add_argument("--bench-tokens", type=int, default=16,
                   help="tokens per mode in the comparison (0 skips it)")
    p.add_argument("--bench-max-seconds", type=float, default=60.0, metavar="S",
                   help="each mode of the comparison stops after the token during which S seconds of its "
                        "process have passed (reported as cut; default 60)")
    add_prompt_options(p, prompt=False)
    add_sampling_options(p)
    add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object, no comparison")
    p.add_argument("--stats", action="store_true", help="print the per-token I/O / memory / compute table")
    # a short context: the demo prompt and answer take ~110 tokens, and the KV cache is charged to --memory
    p.set_defaults(func=run, ids=None, mode="flash", context=256)


def _log(*a, **k) -> None:
    print(*a, **k, file=sys.stderr)


def _tokenizer_of(model: Path):
    """The tokenizer of a converted model (the default one), for the synthetic model."""
    from llmflash.format.layout import FlashModelDir
    from llmflash.tools.synth import TokenizerSpec

    d = FlashModelDir(model)
    entry = d.manifest.get("tokenizer") or {}
    if not entry.get("file"):
        return None
    return TokenizerSpec((model / entry["file"]).read_text(), entry.get("chat_template"),
                         entry.get("bos_token"), entry.get("eos_token"))


def synthetic_model(models_dir: Path, shape: str, tokenizer_from: Path | None) -> tuple[Path, str]:
    """The cached synthetic model of a preset or a config.json (written once, float16)."""
    from llmflash.errors import LLMFlashError
    from llmflash.format.layout import FlashModelDir
    from llmflash.tools.synth import PRESETS, synth

    config = None
    if shape in PRESETS:
        label, name = shape, f"synthetic-{shape}-float16"
    else:
        config = Path(shape)
        if not config.is_file():
            raise LLMFlashError(f"--compare-shape {shape}: neither a synth preset ({', '.join(PRESETS)}) "
                                "nor a config.json file")
        digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12]
        label, name = config.name, f"synthetic-config-{digest}-float16"
    target = models_dir / name
    if (target / "manifest.json").exists():
        try:
            FlashModelDir(target)
            return target, label
        except LLMFlashError as exc:
            _log(f"rewriting {target}: {exc}")
    models_dir.mkdir(parents=True, exist_ok=True)
    _log(f"writing synthetic {label} (random weights, float16) to {target} (once) ...")
    tok = _tokenizer_of(tokenizer_from) if tokenizer_from is not None else None
    synth(None if config else shape, target, dtype="float16", seed=0, config_path=config,
          force=target.exists(), progress=True, tokenizer=tok)
    return target, label


def replay_trace(models_dir: Path, model: Path) -> Path:
    """The cached trace of the paper's OPT-6.7B profile for the synthetic model's shape."""
    from llmflash.errors import LLMFlashError
    from llmflash.format.layout import FlashModelDir
    from llmflash.format.trace_file import Trace
    from llmflash.tools.trace import synthesise

    path = models_dir / "traces" / f"{model.name}-{COMPARE_PROFILE}.npz"
    cfg = FlashModelDir(model).config
    if path.exists():
        try:
            t = Trace.load(path)
            if (t.layers, t.neurons) == (cfg.num_layers, cfg.intermediate_size):
                return path
        except LLMFlashError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    _log(f"synthesising a {COMPARE_TRACE_TOKENS}-token trace of the {COMPARE_PROFILE} profile for "
         f"{model.name} (once) ...")
    synthesise(COMPARE_PROFILE, model, tokens=COMPARE_TRACE_TOKENS, seed=0, out=path)
    return path


def _ratio_notes(result: dict) -> list[str]:
    """One line on flash_tokens_equal_dense, and what the ratios say, taken from the result itself."""
    r, modes = result["ratios"], result["modes"]
    lines = []
    faster = [k.split("/")[1] for k, v in r.items() if isinstance(v, float) and v >= 1.0]
    slower = [k.split("/")[1] for k, v in r.items() if isinstance(v, float) and v < 1.0]
    if faster or slower:
        lines.append("flash is " + "; ".join(
            part for part in (f"faster than {', '.join(faster)}" if faster else "",
                              f"slower than {', '.join(slower)}" if slower else "") if part)
                     + " in tokens/s (ratios above).")
    f, n = modes.get("flash", {}), modes.get("naive", {})
    if f.get("bytes_read_per_token") and n.get("bytes_read_per_token"):
        lines.append(f"flash reads {f['bytes_read_per_token'] / 2**20:.1f} MiB per token from flash, naive "
                     f"{n['bytes_read_per_token'] / 2**20:.1f} MiB "
                     f"({n['bytes_read_per_token'] / f['bytes_read_per_token']:.0f}x less).")
    if "flash_tokens_equal_dense" in r:
        lines.append("flash_tokens_equal_dense: whether flash generated the same token ids as dense; "
                     + ("with trace selection flash computes a different (sparse) FFN than dense (only the "
                        "replayed neurons), so its tokens are not expected to equal dense's."
                        if str(result.get("sparsity", "")).startswith("trace:") else
                        "only an exact selection (--sparsity exact on a ReLU model) guarantees it; a "
                        "predicted or magnitude selection computes a sparser FFN than dense."))
    return lines


def compare_synthetic(args: argparse.Namespace, models_dir: Path, default_model: Path | None) -> int:
    from llmflash.tools import bench

    model, label = synthetic_model(models_dir, args.compare_shape, default_model)
    trace = replay_trace(models_dir, model)
    _log(f"\ncomparing flash with the baselines on synthetic {label} at {args.memory} ({args.bench_tokens} "
         f"tokens each, at most ~{args.bench_max_seconds:g} s per mode, one process per mode, page cache "
         "dropped) ...")
    result = bench.bench(model, memory=args.memory, window=args.window, tokens=args.bench_tokens,
                         prompt_tokens=COMPARE_PROMPT_TOKENS, sparsity=f"trace:{trace.resolve()}",
                         dtype=args.dtype, max_seconds=args.bench_max_seconds,
                         predictor_cost=COMPARE_PREDICTOR, context=args.context, progress=_log)
    from llmflash.format.layout import FlashModelDir

    sizes = FlashModelDir(model).weights_nbytes()
    print(f"\nCOMPARISON ON A SYNTHETIC MODEL: synthetic weights ({label} shapes, random float16 values, "
          f"{(sizes['resident'] + sizes['ffn']) / 1e9:.2f} GB), activations replayed from the paper's "
          f"published OPT-6.7B statistics ({COMPARE_PROFILE}: 10.3 % of the FFN selected per token, a "
          "window of 5 holds 24 %), text meaningless. The predictor's memory and time are charged "
          f"({COMPARE_PREDICTOR}); reads, cache, FFN and budget are real.")
    print(bench.table(result))
    for line in _ratio_notes(result):
        print(line)
    return 0


def compare_default(args: argparse.Namespace, path: Path) -> int:
    from llmflash.tools import bench

    _log(f"\ncomparing flash with the baselines on {path.name} at {args.memory} ({args.bench_tokens} "
         "tokens each, one process per mode, page cache dropped) ...")
    result = bench.bench(path, memory=args.memory, window=args.window, tokens=args.bench_tokens,
                         prompt_tokens=32, sparsity=args.sparsity or "auto", dtype=args.dtype,
                         density=args.density, max_seconds=args.bench_max_seconds, context=args.context,
                         progress=_log)
    print(bench.table(result))
    for line in _ratio_notes(result):
        print(line)
    return 0


def run(args: argparse.Namespace) -> int:
    import llmflash.api as api
    from llmflash.defaults import calibrate_default_model, default_model_dir, llmflash_home

    path = default_model_dir(args.models_dir)
    print(f"model: {path}", file=sys.stderr)
    if args.mode == "flash" and args.sparsity in (None, "auto", "predictor"):
        calibrate_default_model(path, log=_log)
    model = api.load(path, **load_options(args))
    print(f"prompt: {args.prompt}  [mode {args.mode}, memory {args.memory}, window {args.window}, "
          f"selector {model.engine.ffn.summary().get('selector', 'none')}]", file=sys.stderr)
    status = print_generation(model, args.prompt, args)
    model.close()
    del model
    if status or args.bench_tokens <= 0 or args.json or args.compare == "none":
        return status
    if args.compare == "default":
        return compare_default(args, path)
    return compare_synthetic(args, args.models_dir or llmflash_home() / "models", path)
