"""The OpenAI-compatible HTTP server: one model per process, requests served one at a time.

Stack: Starlette (routing, requests, responses) on uvicorn, pydantic for the request schema,
prometheus_client for /metrics. Why Starlette rather than FastAPI (docs/SERVE.md): every error must
be OpenAI's JSON shape with our status codes, the body size is limited before parsing and streams
must stop the engine the moment a client goes away; FastAPI's automatic validation and response
models would all have to be overridden for that, so the layer below it is used directly.

Concurrency: the engine is not thread-safe and holds one KV cache, so generations run one at a time
on a single worker thread; an asyncio.Lock orders the waiting requests (FIFO) and the event loop
never blocks on the model. The worker pushes text pieces into an asyncio.Queue through
call_soon_threadsafe. Each job carries a threading.Event: set when its client disconnects, the
worker closes the Model.stream iterator after the token in progress, which ends the decode loop,
and the lock passes to the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmflash.errors import LLMFlashError
from llmflash.server import openai_schema as schema
from llmflash.server.metrics import CountRequests, Metrics
from llmflash.server.openai_schema import APIError, Job

log = logging.getLogger("llmflash.server")

DEFAULT_MAX_BODY = 1 << 20  # bytes of request body accepted (413 beyond)


class Runner:
    """The model behind a lock: one generation at a time on one worker thread."""

    def __init__(self, model, metrics: Metrics):
        self.model = model
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="llmflash-generate")
        self.lock = asyncio.Lock()
        self.depth = 0  # requests waiting for the engine or on it
        self.active: set[threading.Event] = set()
        metrics.queue_depth.set_function(lambda: self.depth)

    async def run(self, job: Job, cancel: threading.Event) -> AsyncIterator[tuple[str, object]]:
        """Events ("piece", str), then ("done", Generation) or ("error", exception).

        The caller sets `cancel` when its client goes away (and in any case when it stops
        listening); the engine is freed after the token in progress."""
        self.depth += 1
        try:
            await self.lock.acquire()  # FIFO; cancelled here if the client leaves while queued
        except BaseException:
            self.depth -= 1
            raise
        if cancel.is_set():
            self.depth -= 1
            self.lock.release()
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed (server shutting down)
                pass

        self.active.add(cancel)
        try:
            future = loop.run_in_executor(self.executor, self._produce, job, cancel, put)
        except BaseException:
            self.active.discard(cancel)
            self.depth -= 1
            self.lock.release()
            raise

        def finished(_) -> None:  # the worker thread is done with the model: next request
            self.active.discard(cancel)
            self.depth -= 1
            self.lock.release()

        future.add_done_callback(finished)
        while True:
            kind, value = await queue.get()
            yield kind, value
            if kind != "piece":
                return

    def _produce(self, job: Job, cancel: threading.Event, put) -> None:
        """Worker thread: stream pieces until the end, a stop string, or cancel."""
        model = self.model
        try:
            pieces = model.stream(job.ids, job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                                  seed=job.seed, stop=job.stop)
            try:
                for piece in pieces:
                    if cancel.is_set():
                        break
                    put(("piece", piece))
                    if cancel.is_set():
                        break
            finally:
                pieces.close()  # ends the decode loop at once
            generation = model.last
            self.metrics.generation_done(generation, cancelled=cancel.is_set())
            put(("done", generation))
        except LLMFlashError as exc:
            put(("error", APIError(400, str(exc), code="invalid_value")))
        except Exception as exc:  # a bug: answered as a 500 JSON error, the server keeps serving
            log.exception("generation failed")
            put(("error", APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                   code="internal_error")))

    def shutdown(self) -> None:
        for cancel in list(self.active):
            cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise APIError(400, "invalid Content-Length header", code="invalid_header") from None
        if too_big:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class SSEResponse:
    """Server-sent events from an async iterator of data strings, then `data: [DONE]`.

    A listener for http.disconnect runs beside the sender, as Starlette's StreamingResponse does
    for ASGI < 2.4, but here on every server version; either side ending (the client leaving, a
    failed send, the end of the events) sets `cancel`, so the engine stops at once."""

    raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]

    def __init__(self, events: AsyncIterator[str], cancel: threading.Event):
        self.events = events
        self.cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        sender = asyncio.ensure_future(pump())
        listener = asyncio.ensure_future(listen())
        try:
            done, _ = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                sender.result()  # re-raise a failed send
        except OSError:
            pass  # the client went away while we sent
        finally:
            self.cancel.set()
            for task in (sender, listener):
                task.cancel()
            await asyncio.gather(sender, listener, return_exceptions=True)
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()


def create_app(model, model_name: str | None = None, *, max_body_bytes: int = DEFAULT_MAX_BODY) -> Starlette:
    """The ASGI app serving `model` (an llmflash.api.Model) under `model_name` (default: its
    directory name)."""
    name = model_name or model.path.name
    created = int(time.time())
    metrics = Metrics(model)
    runner: Runner | None = None
    context = model.context_length

    def get_runner() -> Runner:
        nonlocal runner
        if runner is None:  # created inside the running loop (the lock binds to it)
            runner = Runner(model, metrics)
        return runner

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise APIError(404, f"the model '{requested}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "llmflash",
                "llmflash": {"path": str(model.path), "mode": model.mode, "context_length": context}}

    async def encode(fn, *args) -> list[int]:
        try:
            ids = await asyncio.to_thread(fn, *args)
        except LLMFlashError as exc:
            raise APIError(400, str(exc), param="prompt", code="invalid_value") from None
        return ids

    def check_prompt(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
        if len(ids) >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{len(ids)} tokens (at least one must be left to generate)", param=param,
                           code="context_length_exceeded")
        vocab = model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary of {vocab}", param=param,
                           code="invalid_value")

    async def completions(request: Request) -> Response:
        req = schema.parse(schema.CompletionRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        temperature, top_p, seed, stop = schema.sampling(req)
        schema.check_max_tokens(req.max_tokens, "max_tokens", context)
        prompt = schema.completion_prompt(req)
        if isinstance(prompt, str):
            ids = await encode(model.encode, prompt, False)  # raw text: no chat template
        else:
            ids = prompt
        check_prompt(ids, "prompt")
        job = Job(ids, req.max_tokens or 16, temperature, top_p, seed, stop, bool(req.stream),
                  bool(req.stream_options and req.stream_options.include_usage))
        return await answer(request, job, "text_completion", f"cmpl-{uuid.uuid4().hex}")

    async def chat_completions(request: Request) -> Response:
        req = schema.parse(schema.ChatRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        temperature, top_p, seed, stop = schema.sampling(req)
        schema.check_max_tokens(req.max_tokens, "max_tokens", context)
        schema.check_max_tokens(req.max_completion_tokens, "max_completion_tokens", context)
        messages = schema.chat_messages(req)
        if model.tokenizer is None or not model.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages",
                           code="unsupported_value")
        ids = await encode(model.encode_messages, messages)
        check_prompt(ids, "messages")
        limit = req.max_completion_tokens or req.max_tokens or (context - len(ids))
        job = Job(ids, limit, temperature, top_p, seed, stop, bool(req.stream),
                  bool(req.stream_options and req.stream_options.include_usage))
        return await answer(request, job, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}")

    def usage(generation) -> dict:
        prompt, completion = len(generation.prompt_ids), len(generation.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def answer(request: Request, job: Job, kind: str, rid: str) -> Response:
        cancel = threading.Event()
        stamp = int(time.time())
        chat = kind == "chat.completion"
        started = time.monotonic()
        events = get_runner().run(job, cancel)
        if job.stream:
            return SSEResponse(sse(events, job, rid, stamp, chat, started), cancel)
        watcher = asyncio.ensure_future(watch_disconnect(request, cancel))
        text, generation = [], None
        try:
            async for event, value in events:
                if event == "piece":
                    text.append(value)
                elif event == "error":
                    raise value
                else:
                    generation = value
        finally:
            cancel.set()
            watcher.cancel()
            await events.aclose()
        metrics.request_done("/v1/chat/completions" if chat else "/v1/completions", time.monotonic() - started)
        if generation is None:  # client gone while queued
            return Response(status_code=499)
        body_text = "".join(text)
        choice = {"index": 0, "finish_reason": schema.finish_reason(generation.finish_reason), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": body_text}
        else:
            choice["text"] = body_text
        return JSONResponse({"id": rid, "object": kind, "created": stamp, "model": name, "choices": [choice],
                             "usage": usage(generation), "system_fingerprint": None})

    async def sse(events, job: Job, rid: str, stamp: int, chat: bool, started: float) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra) -> str:
            return json.dumps({"id": rid, "object": kind, "created": stamp, "model": name,
                               "system_fingerprint": None, "choices": choices, **extra})

        def choice(text: str, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        first = True
        try:
            async for event, value in events:
                if event == "piece":
                    yield chunk([choice(value, None, first)])
                    first = False
                elif event == "error":
                    yield json.dumps(value.body())
                    return
                else:
                    if first and chat:
                        yield chunk([choice("", None, True)])
                    yield chunk([choice("", schema.finish_reason(value.finish_reason))])
                    if job.include_usage:
                        yield chunk([], usage=usage(value))
                    metrics.request_done("/v1/chat/completions" if chat else "/v1/completions",
                                         time.monotonic() - started)
        finally:
            await events.aclose()

    async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
        while not cancel.is_set():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        check_model(request.path_params["model"])
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        depth = runner.depth if runner is not None else 0
        body = {"status": "ok", "model": name, "mode": model.mode, "queue_depth": depth}
        plan = model.stats.get("memory_plan")  # after the first generation in flash/hybrid mode
        if plan is not None:
            body["memory_plan"] = plan
        return JSONResponse(body)

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                           str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                     code="internal_error").body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if runner is not None:
            runner.shutdown()

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                       Exception: server_error},
                    middleware=[Middleware(CountRequests, metrics=metrics)], lifespan=lifespan)
    app.state.model_name = name
    app.state.metrics = metrics
    return app
