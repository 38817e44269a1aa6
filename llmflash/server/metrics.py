"""/metrics in Prometheus text format (prometheus_client, one registry per app).

Series (docs/SERVE.md):
  llmflash_requests_total{endpoint,status}        HTTP requests answered, by route and status code
  llmflash_request_seconds{endpoint}              generation requests' latency (histogram)
  llmflash_prompt_tokens_total                    prompt tokens of finished generations
  llmflash_completion_tokens_total                generated tokens
  llmflash_generations_cancelled_total            generations stopped because the client left
  llmflash_last_tokens_per_second                 decode tokens/s of the last generation
  llmflash_flash_bytes_read_total                 FFN bytes read from flash by generations
  llmflash_process_bytes_read                     bytes this process has read from storage since load
  llmflash_last_neurons_loaded_per_token          mean neurons read into the cache per decode token
  llmflash_neuron_cache_hit_ratio                 share of selected neurons found in the cache (last
                                                  generation; NaN where the stats do not count selections)
  llmflash_queue_depth                            requests waiting for the engine or running on it
"""

from __future__ import annotations

import math

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}


class Metrics:
    def __init__(self, model):
        disable_created_metrics()  # no *_created series: counters are read as plain totals
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmflash_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("llmflash_request_seconds", "latency of generation requests", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, math.inf),
                                 registry=r)
        self.prompt_tokens = Counter("llmflash_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.completion_tokens = Counter("llmflash_completion_tokens", "generated tokens", registry=r)
        self.cancelled = Counter("llmflash_generations_cancelled", "generations stopped because the client left",
                                 registry=r)
        self.tokens_per_s = Gauge("llmflash_last_tokens_per_second", "decode tokens/s of the last generation",
                                  registry=r)
        self.flash_bytes = Counter("llmflash_flash_bytes_read", "FFN bytes read from flash by generations",
                                   registry=r)
        self.process_bytes = Gauge("llmflash_process_bytes_read",
                                   "bytes this process has read from storage since the model was loaded",
                                   registry=r)
        self.neurons_loaded = Gauge("llmflash_last_neurons_loaded_per_token",
                                    "mean neurons read into the neuron cache per decode token (last generation)",
                                    registry=r)
        self.hit_ratio = Gauge("llmflash_neuron_cache_hit_ratio",
                               "share of selected neurons already in the cache (last generation; NaN when not "
                               "counted)", registry=r)
        self.hit_ratio.set(math.nan)
        self.queue_depth = Gauge("llmflash_queue_depth", "requests waiting for the engine or running on it",
                                 registry=r)
        info = Gauge("llmflash_model_info", "the served model", ["path", "mode"], registry=r)
        info.labels(path=str(model.path), mode=model.mode).set(1)

    def request_done(self, endpoint: str, seconds: float) -> None:
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def generation_done(self, generation, cancelled: bool) -> None:
        """Called by the worker thread after each generation (prometheus_client is thread-safe)."""
        self.prompt_tokens.inc(len(generation.prompt_ids))
        self.completion_tokens.inc(len(generation.token_ids))
        if cancelled:
            self.cancelled.inc()
        tps = generation.timing.get("tokens_per_s")
        if tps is not None:
            self.tokens_per_s.set(tps)
        stats = generation.stats or {}
        self.flash_bytes.inc(int(stats.get("ffn_bytes_read", 0)))
        if "bytes_read" in stats:
            self.process_bytes.set(stats["bytes_read"])
        loaded = stats.get("neurons_loaded") or []
        self.neurons_loaded.set(sum(loaded) / len(loaded) if loaded else 0)
        selected = stats.get("neurons_selected")
        if selected:
            missed = sum(loaded) + sum(stats.get("streamed_neurons") or [])
            self.hit_ratio.set(max(0.0, 1 - missed / max(sum(selected), 1)))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware: llmflash_requests_total by endpoint and the status code actually sent."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models/{model}" if path.startswith("/v1/models/")
                                                   else "other")
        status = {"code": 500}

        async def record(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
