"""`llmflash serve MODEL`: an OpenAI-compatible HTTP server (docs/SERVE.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmflash.cli.options import add_run_options, load_options, positive_int
from llmflash.errors import LLMFlashError

NAME = "serve"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="serve a converted model over the OpenAI HTTP API",
                       description="Serve one model over the OpenAI HTTP API: GET /v1/models, POST "
                                   "/v1/completions, POST /v1/chat/completions (stream: true as server-sent "
                                   "events), GET /health, GET /metrics (Prometheus). Requests are queued and "
                                   "answered one at a time. Needs the [serve] extra: "
                                   "pip install 'llmflash[serve]'.")
    p.add_argument("model", type=Path, help="converted model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; the server has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the directory name)")
    p.add_argument("--max-body", default="1MiB", metavar="SIZE",
                   help="largest request body accepted, larger ones get 413 (default 1MiB)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info: one access line per request)")
    p.add_argument("--threads-torch", type=positive_int, default=None, metavar="N",
                   help="torch compute threads (default: torch's own choice)")
    add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from llmflash.server.app import create_app
    except ImportError as exc:
        raise LLMFlashError(f"serve needs the [serve] extra ({exc.name} is missing): "
                            "pip install 'llmflash[serve]'") from None
    import llmflash.api as api
    from llmflash.cli import Terminated
    from llmflash.sizes import parse_size

    if not 0 <= args.port <= 65535:
        raise LLMFlashError(f"--port must be in 0..65535, got {args.port}")
    max_body = parse_size(args.max_body, "--max-body")
    if args.threads_torch is not None:
        import torch

        torch.set_num_threads(args.threads_torch)
    model = api.load(args.model, **load_options(args))
    app = create_app(model, args.model_name, max_body_bytes=max_body)
    print(f"llmflash: serving {app.state.model_name} ({model.mode} mode, context {model.context_length}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run()  # returns after Ctrl-C or SIGTERM: finishes in-flight answers (5 s at most)
    except (KeyboardInterrupt, Terminated):  # uvicorn re-raises the signal it caught once it has stopped
        pass
    finally:
        model.close()
    print("llmflash: server stopped", file=sys.stderr)
    return 0
