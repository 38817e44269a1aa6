"""`llmflash serve` against the official openai client, on the real SmolLM2 default model.

The server runs as a real process on 127.0.0.1 (a free port); greedy answers are compared with
`llmflash generate --json` on the same prompt.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
CHAT = "Name three colours."
COUNTING = "1, 2, 3, 4, 5, 6, 7,"  # greedy continues counting for a long time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "llmflash", "serve", str(model_dir), "--port", str(port),
                             "--model-name", "smol", "--log-level", "warning", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_dir):
    proc, base = start_server(smollm2_dir, "--context", "2048")  # room for the 1500-token stream below
    yield base
    stop_server(proc)
    assert proc.returncode == 0, proc.stdout.read()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def generate_json(model_dir: Path, prompt: str, n: int, *flags: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "llmflash", "generate", str(model_dir), prompt,
                          "--max-new-tokens", str(n), "--json", *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def reference(smollm2_dir) -> dict:
    """`llmflash generate` on the same prompts: plain text (completions) and chat template (chat)."""
    return {"completion": generate_json(smollm2_dir, PROMPT, 16, "--no-chat-template"),
            "chat": generate_json(smollm2_dir, CHAT, 16)}


def raw(base: str, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict | str]:
    """One HTTP request without any client-side checks; the JSON body when there is one."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def metric(base: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smol"]
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "smol"


def test_completion_matches_generate(client, reference):
    ref = reference["completion"]
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == ref["text"]
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref["finish_reason"]]
    assert r.usage.prompt_tokens == len(ref["prompt_ids"])
    assert r.usage.completion_tokens == len(ref["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_matches_generate(client, reference):
    ref = reference["chat"]
    messages = [{"role": "user", "content": CHAT}]
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref["text"]
    assert r.usage.prompt_tokens == len(ref["prompt_ids"])
    assert r.usage.completion_tokens == len(ref["token_ids"])
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_sequences_across_tokens(client, reference):
    text = reference["completion"]["text"]
    stop = text[4:9]  # a stop string that need not align with token boundaries
    assert stop and text.find(stop) == 4
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == text[:4]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:4]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_eight_concurrent_clients(server, client):
    prompts = [f"{name} is a" for name in ("Paris", "London", "A cat", "Water", "The sun", "Music", "Python",
                                            "A tree")]
    expected = [client.completions.create(model="smol", prompt=p, max_tokens=6, temperature=0).choices[0].text
                for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
            if i % 2:
                chunks = c.completions.create(model="smol", prompt=prompts[i], max_tokens=6, temperature=0,
                                              stream=True)
                results[i] = "".join(ch.choices[0].text for ch in chunks)
            else:
                results[i] = c.completions.create(model="smol", prompt=prompts[i], max_tokens=6,
                                                  temperature=0).choices[0].text
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert [results[i] for i in range(8)] == expected
    # the engine is released just after a streamed answer's last chunk has gone out: the gauge may
    # lag the client by a moment (seen once on a fresh clone), so it is polled, not read once
    deadline = time.monotonic() + 10
    while metric(server, "llmflash_queue_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "llmflash_queue_depth") == 0


KILLED_CLIENT = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0)
for chunk in c.completions.create(model="smol", prompt=sys.argv[2], max_tokens=1500, temperature=0, stream=True):
    print("chunk", flush=True)
"""


def test_client_killed_mid_stream_frees_the_engine(server, client):
    before = metric(server, "llmflash_completion_tokens_total")
    cancelled = metric(server, "llmflash_generations_cancelled_total")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server, COUNTING], stdout=subprocess.PIPE,
                            text=True)
    for _ in range(3):  # the stream is flowing
        assert proc.stdout.readline() == "chunk\n"
    proc.kill()
    proc.wait()
    # served only once the killed stream let go of the engine (it would hold it for 1500 tokens)
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    assert metric(server, "llmflash_generations_cancelled_total") == cancelled + 1
    killed_tokens = metric(server, "llmflash_completion_tokens_total") - before - 4
    assert 3 <= killed_tokens < 1000


def test_bad_requests_get_openai_errors(server, client):
    big = json.dumps({"model": "smol", "prompt": "x" * (2 << 20)}).encode()
    cases = [
        ("POST", "/v1/completions", b"{not json", 400, None),
        ("POST", "/v1/completions", b"[1, 2]", 400, None),
        ("POST", "/v1/completions", b'{"model": "smol"}', 422, "prompt"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": "5"}', 422, "max_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": "hot"}', 422, "temperature"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "stream": "yes"}', 422, "stream"),
        ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 422, "messages"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 422,
         "messages.0.role"),
        ("POST", "/v1/completions", b'{"model": "gpt-4", "prompt": "hi"}', 404, "model"),
        ("GET", "/v1/models/gpt-4", None, 404, "model"),
        ("POST", "/v1/completions", json.dumps({"prompt": [1] * 9000}).encode(), 400, "prompt"),
        ("POST", "/v1/completions", json.dumps({"prompt": "word " * 9000}).encode(), 400, "prompt"),
        ("POST", "/v1/chat/completions",
         json.dumps({"messages": [{"role": "user", "content": "word " * 9000}]}).encode(), 400, "messages"),
        ("POST", "/v1/completions", b'{"prompt": [999999]}', 400, "prompt"),
        ("POST", "/v1/completions", b'{"prompt": ""}', 400, "prompt"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 100000000}', 400, "max_tokens"),
        ("POST", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}', 400,
         "max_completion_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "n": 2}', 400, "n"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": 5}', 400, "temperature"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "top_p": 1.5}', 400, "top_p"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "seed": -1}', 400, "seed"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
        ("POST", "/v1/completions", b'{"prompt": ["a", "b"]}', 400, "prompt"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "logprobs": 3}', 400, "logprobs"),
        ("POST", "/v1/completions", big, 413, None),
        ("POST", "/v1/nothing", b"{}", 404, None),
        ("GET", "/v1/completions", None, 405, None),
    ]
    for method, path, body, status, param in cases:
        got, data = raw(server, method, path, body)
        assert got == status, (path, body[:80] if body else None, got, data)
        assert isinstance(data, dict) and set(data["error"]) == {"message", "type", "param", "code"}, data
        assert data["error"]["message"]
        if param is not None:
            assert data["error"]["param"] == param, data
    # a body sent in chunks, without Content-Length, is cut at the limit too
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                 headers={"content-type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    # the official client raises the matching exception classes
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smol", prompt="hi", max_tokens=2, n=2)
    # and the server still serves
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": CHAT}], max_tokens=3,
                                       temperature=0)
    assert r.usage.completion_tokens == 3
    assert metric(server, "llmflash_requests_total", '{endpoint="/v1/completions",status="413"}') >= 1
    assert metric(server, "llmflash_requests_total", '{endpoint="/v1/completions",status="422"}') >= 4
    assert metric(server, "llmflash_requests_total", '{endpoint="/v1/chat/completions",status="200"}') >= 1


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model="smol", prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_flash_mode_metrics(smollm2_dir):
    """A server in flash mode reports the bytes its generations read from flash."""
    proc, base = start_server(smollm2_dir, "--mode", "flash", "--memory", "100%")
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        r = c.completions.create(model="smol", prompt=PROMPT, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        assert metric(base, "llmflash_flash_bytes_read_total") > 0
        assert metric(base, "llmflash_last_neurons_loaded_per_token") > 0
        hit = metric(base, "llmflash_neuron_cache_hit_ratio")  # NaN would fail both bounds
        assert 0.0 <= hit < 1.0, hit  # some selected neurons had to be loaded, so not all were hits
        assert metric(base, "llmflash_completion_tokens_total") == 4
    finally:
        stop_server(proc)
