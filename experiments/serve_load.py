"""Load test of `llmflash serve` (a benchmark, not a test): N clients for a bounded time on loopback.

Starts the server on 127.0.0.1 (a free port) in flash mode on the default model, runs N client
threads with the official openai client that each send chat completions back to back (alternately
streamed and not, greedy, varied prompts) until the duration is over, then checks that every request
sent was answered (200, tokens counted) and that the server's own request counter agrees, and
prints p50/p99 latency, time to first token of the streamed ones, tokens/s overall, and the
server's peak RSS against its memory budget. Run it alone (timed):

    flock /tmp/llmflash-bench.lock .venv/bin/python experiments/serve_load.py --clients 4 --duration 60

Bounded: no new request starts after --duration; the run is killed after --duration + --grace.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a mountain", "bread", "the moon", "rain", "a library", "trains", "coffee", "music",
          "a garden", "winter", "bees"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="converted model (default: the built-in SmolLM2)")
    p.add_argument("--mode", default="flash")
    p.add_argument("--memory", default="100%", help="flash budget (the default model needs at least 51%%: resident part, predictors, KV cache)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which requests start")
    p.add_argument("--grace", type=float, default=300.0, help="seconds allowed after that for the last answers")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = p.parse_args()

    import openai

    if args.model is None:
        from llmflash.defaults import default_model_dir

        args.model = default_model_dir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "llmflash", "serve", str(args.model), "--port", str(port),
                               "--mode", args.mode, "--memory", args.memory, "--log-level", "warning"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                get(base + "/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)
        name = json.loads(get(base + "/v1/models"))["data"][0]["id"]
        started = time.monotonic()
        stop_at = started + args.duration
        records: list[dict] = []
        errors: list[str] = []
        sent = [0]
        lock = threading.Lock()

        def client(i: int) -> None:
            c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=args.grace)
            n = 0
            while time.monotonic() < stop_at:
                topic = TOPICS[(i * 7 + n) % len(TOPICS)]
                messages = [{"role": "user", "content": f"Write two sentences about {topic}."}]
                stream = (i + n) % 2 == 1
                n += 1
                with lock:
                    sent[0] += 1
                t0 = time.monotonic()
                try:
                    if stream:
                        first, text, usage = None, [], None
                        for chunk in c.chat.completions.create(model=name, messages=messages,
                                                               max_tokens=args.max_tokens, temperature=0,
                                                               stream=True, stream_options={"include_usage": True}):
                            if chunk.choices and chunk.choices[0].delta.content:
                                first = first or time.monotonic()
                                text.append(chunk.choices[0].delta.content)
                            if chunk.usage is not None:
                                usage = chunk.usage
                        tokens = usage.completion_tokens
                        ttft = (first - t0) if first else None
                    else:
                        r = c.chat.completions.create(model=name, messages=messages, max_tokens=args.max_tokens,
                                                      temperature=0)
                        tokens, ttft = r.usage.completion_tokens, None
                    with lock:
                        records.append({"latency": time.monotonic() - t0, "tokens": tokens, "ttft": ttft,
                                        "stream": stream})
                except Exception as exc:  # counted, reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.duration + args.grace)
        wall = time.monotonic() - started
        hung = sum(t.is_alive() for t in threads)
        metrics = get(base + "/metrics")
        health = json.loads(get(base + "/health"))
        peak = vm_hwm(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    def series(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
        return float(m.group(1)) if m else 0.0

    latencies = [r["latency"] for r in records]
    ttfts = [r["ttft"] for r in records if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in records)
    served = series('llmflash_requests_total{endpoint="/v1/chat/completions",status="200"}')
    plan = health.get("memory_plan") or {}
    budget = plan.get("budget_bytes")
    out = {
        "model": str(args.model), "mode": args.mode, "memory": args.memory, "clients": args.clients,
        "duration_s": args.duration, "wall_s": round(wall, 2), "max_tokens": args.max_tokens,
        "sent": sent[0], "answered": len(records), "errors": len(errors), "hung_clients": hung,
        "server_200": int(served), "lost": sent[0] - len(records),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p99_s": round(percentile(ttfts, 0.99), 3),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(records) / wall, 3),
        "server_flash_bytes_read": int(series("llmflash_flash_bytes_read_total")),
        "server_peak_rss_bytes": peak, "memory_budget_bytes": budget,
        "rss_over_budget_bytes": (peak - budget) if budget else None,
        "first_errors": errors[:5],
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    ok = not errors and not hung and out["lost"] == 0 and int(served) == len(records)
    print(f"{'OK' if ok else 'FAILED'}: {len(records)}/{sent[0]} requests answered by {args.clients} clients in "
          f"{wall:.1f} s; latency p50 {out['latency_p50_s']} s, p99 {out['latency_p99_s']} s; "
          f"{out['tokens_per_s']} tokens/s; server peak RSS {peak / 2**20:.0f} MiB"
          + (f" for a budget of {budget / 2**20:.0f} MiB" if budget else ""), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
