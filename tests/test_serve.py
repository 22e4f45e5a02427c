"""`ar2dlm serve` as a client sees it: a real server process on the loopback, driven by the openai client and
httpx (a tiny random model served in bfloat16, whose batch-invariant forward makes greedy output bitwise that
of decoding each request alone)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import make_tokenizer, save_base

from ar2dlm import convert
from ar2dlm.model.lm import DiffusionLM

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = save_base("llama", root / "base")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    return str(convert(base, root / "converted", block_size=4))


@pytest.fixture(scope="module")
def solo(model_dir):
    """Greedy text of one request decoded alone, in-process, in the server's dtype."""
    lm = DiffusionLM.from_pretrained(model_dir, dtype="bfloat16")

    def decode(prompt: str, max_tokens: int, chat: bool = False, **settings) -> str:
        return lm.generate([prompt], chat=chat, max_new_tokens=max_tokens, **settings)[0].text
    return decode


class Server:
    """`ar2dlm serve MODEL --port 0 ...` as a subprocess; its log goes to a file (a full pipe would block it)."""

    def __init__(self, model_dir, tmp_path, *flags, program: tuple = ("-m", "ar2dlm")):
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, *program, "serve", model_dir, "--port", "0",
                                          "--dtype", "bfloat16", *map(str, flags)], stdout=log, stderr=log,
                                         env={**os.environ, "AR2DLM_API_KEY": ""})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "listening on http://" in text:
                self.url = text.split("listening on ")[1].split()[0]
                return
            assert self.proc.poll() is None, text
            time.sleep(0.2)
        raise AssertionError(f"the server did not start: {self.log.read_text()}")

    def metrics(self) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log"), "--max-batch", 12, "--draft-max-batch", 4,
               "--max-request-bytes", 4096, "--upload-timeout", 1, "--max-prompt-tokens", 600,
               "--max-draft-len", 8, "--max-proposals", 8)
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log.read_text()


def test_openai_client_streaming_and_not_on_both_endpoints(server, model_dir, solo):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [model_dir]
    expected = solo("w5 w6 w7", 12)
    c = client.completions.create(model=model_dir, prompt="w5 w6 w7", max_tokens=12)
    assert c.choices[0].text == expected and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.prompt_tokens == 3 and c.usage.completion_tokens >= 1
    c = client.completions.create(model=model_dir, prompt=["w5 w6 w7", "w8"], max_tokens=12, n=2)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3] and c.usage.prompt_tokens == 4
    assert [ch.text for ch in c.choices] == [expected] * 2 + [solo("w8", 12)] * 2
    pieces = client.completions.create(model=model_dir, prompt="w5 w6 w7", max_tokens=12, stream=True,
                                       extra_body={"draft_len": 2, "proposals": 1})
    assert "".join(p.choices[0].text for p in pieces) == expected
    messages = [{"role": "user", "content": "w9 w10"}]
    expected = solo("w9 w10", 10, chat=True)
    r = client.chat.completions.create(model=model_dir, messages=messages, max_tokens=10)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model_dir, messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage.completion_tokens >= 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="w5", max_tokens=2)
    stop = " " + solo("w5 w6 w7", 12).split()[4]  # a stop string in the middle of the text
    expected = solo("w5 w6 w7", 12, stop=(stop,))
    c = client.completions.create(model=model_dir, prompt="w5 w6 w7", max_tokens=12, stop=[stop])
    assert c.choices[0].text == expected and c.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model=model_dir, prompt="w5 w6 w7", max_tokens=12, stop=stop,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected and pieces[-1].choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_style_errors_and_never_a_500(server, model_dir):
    url = server.url + "/v1/completions"
    cases = [(b"{not json", 400), (b"[1, 2]", 400), (b"[" * 4000, 400),
             (json.dumps({"prompt": "w5 " * 2000}).encode(), 413),  # a body over --max-request-bytes
             (json.dumps({"prompt": "w5 " * 300}).encode(), 413),  # longer than the model's context
             (json.dumps({"prompt": "w5", "max_tokens": 300}).encode(), 413),  # past the context (256)
             (json.dumps({"prompt": "w5", "max_tokens": 10**9}).encode(), 422),  # past --max-output-tokens
             (json.dumps({"prompt": "w5", "temperature": -1}).encode(), 422),
             (json.dumps({"prompt": "w5", "draft_len": "4"}).encode(), 422),
             (json.dumps({"prompt": "w5", "sampler": "greedy", "top_p": 0.5}).encode(), 422),
             (json.dumps({"prompt": [5, 10**6]}).encode(), 422), (json.dumps({"prompt": ""}).encode(), 422),
             (json.dumps({"prompt": "w5", "frequency_penalty": 1.0}).encode(), 422),
             (json.dumps({"prompt": "w5", "n": 1000}).encode(), 422),
             (json.dumps({"prompt": "w5", "x": 1}).encode(), 422),
             (json.dumps({"prompt": "w5", "model": "gpt-4"}).encode(), 404)]
    for body, status in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:60], r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", r.text
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages[0].role"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/models/gpt-4").status_code == 404
    m = server.metrics()
    assert m['ar2dlm_requests_total{status="422"}'] >= 8 and 'ar2dlm_requests_total{status="500"}' not in m
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def _raw(server, head: bytes, parts: list[bytes]) -> tuple[int, dict]:
    """Send `head` and then `parts` on a raw socket, read the answer before the body is complete: (status, body)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        for part in parts:
            s.sendall(part)
            time.sleep(0.01)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
            answer += s.recv(65536)
        for part in parts[:4]:  # still sending after the answer: the server reads and drops it, no reset
            s.sendall(part)
    status = int(answer.split(b" ")[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def test_a_body_over_the_limit_gets_413_while_the_client_is_still_sending(server, solo):
    post = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    status, body = _raw(server, post + b"Content-Length: 8000000\r\n\r\n", [b'{"prompt": "'] + [b"w5 " * 300] * 4)
    assert status == 413 and "8000000 bytes" in body["error"]["message"], body
    chunk = b"w5 " * 300
    status, body = _raw(server, post + b"Transfer-Encoding: chunked\r\n\r\n",  # no length: counted as it comes
                        [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8)
    assert status == 413 and "longer than 4096 bytes" in body["error"]["message"], body
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "w5 w6 w7", "max_tokens": 6})
    assert r.json()["choices"][0]["text"] == solo("w5 w6 w7", 6)


def test_a_request_over_the_servers_limits_is_refused_naming_the_field_and_the_limit(server, model_dir, solo):
    """Drafting width, max_tokens, prompt tokens (x n), stop strings: a 4xx that names the field and the limit,
    through the openai client too; a request at the limits does not hold a small one hostage."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    url = server.url + "/v1/completions"
    for body, status, param, limit in [
            ({"draft_len": 64, "proposals": 64}, 422, "draft_len", "8 (its --max-draft-len)"),
            ({"draft_len": 4, "proposals": 9}, 422, "proposals", "8 (its --max-proposals)"),
            ({"max_tokens": 5000}, 422, "max_tokens", "4096 (its --max-output-tokens)"),
            ({"prompt": list(range(5, 95)) * 7}, 413, "prompt", "600 per request"),  # token ids: before tokenizing
            ({"prompt": " ".join(f"w{i}" for i in range(5, 95)) * 2, "n": 4}, 413, "prompt", "600 per request"),
            ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "at most 4")]:
        r = httpx.post(url, json={"prompt": "w5", **body})
        error = r.json()["error"]
        assert (r.status_code, error["param"]) == (status, param) and limit in error["message"], (body, error)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "w5"}],
                                       max_completion_tokens=10**6)
    assert e.value.body["param"] == "max_completion_tokens" and "4096" in e.value.body["message"]

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            wide = asyncio.create_task(c.post(url, json={"prompt": "w5 w6", "max_tokens": 250, "ignore_eos": True,
                                                         "draft_len": 4, "proposals": 4, "adaptive": False}))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            small = await c.post(url, json={"prompt": "w7 w8", "max_tokens": 2})
            return small, time.monotonic() - start, await wide
    small, seconds, wide = asyncio.run(run())
    assert small.json()["choices"][0]["text"] == solo("w7 w8", 2) and wide.status_code == 200
    assert seconds < 5, seconds


def test_only_this_machines_names_and_pages_reach_the_server(server):
    """DNS rebinding (a page's own name for 127.0.0.1 in Host) and cross-origin pages (Origin) get a JSON 403,
    on every path; IP addresses, localhost and the server's own pages (/docs) pass."""
    port = server.url.rsplit(":", 1)[1]
    body = {"prompt": "w5", "max_tokens": 2}
    for headers in ({"Host": f"evil.example:{port}"}, {"Host": "evil.example."}, {"Host": "127.0.0.1@evil.example"},
                    {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
                    {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://localhost:3000"}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
            r = httpx.request(method, server.url + path, json=body, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed"), \
                (headers, path, r.text)
    for headers in ({"Host": f"localhost:{port}"}, {"Host": "LOCALHOST."}, {"Host": f"[::1]:{port}"},
                    {"Host": "10.1.2.3"}, {"Origin": server.url}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    r = httpx.options(server.url + "/v1/completions", headers={"Origin": "http://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_a_client_that_leaves_or_stalls_while_uploading_is_no_server_error(server):
    """A body cut short (by a close, a half-close, a cut chunk) counts as cancelled; a head or a body that does not
    arrive within --upload-timeout gets a JSON 408 and its connection closed; no traceback (the fixture checks the
    log)."""
    before = server.metrics()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    cut = [(head + b"Content-Length: 100\r\n\r\n{\"prompt\": ", "close"),
           (head + b"Content-Length: 100\r\n\r\n{\"prompt\": ", "half-close"),
           (head + b"Transfer-Encoding: chunked\r\n\r\n20\r\n{\"prompt\": ", "close")]
    for sent, how in cut:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(sent)
            time.sleep(0.05)
            if how == "half-close":
                s.shutdown(socket.SHUT_WR)
                assert s.recv(1000) == b""  # no answer: no one is there to read it

    def stall(sent: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(sent)
            start, answer = time.monotonic(), b""
            while not answer.endswith(b"}}"):
                if sent.endswith(b"\r\n\r\n"):
                    s.sendall(b"1\r\n \r\n")
                    time.sleep(0.2)
                    s.settimeout(0.01)
                with contextlib.suppress(TimeoutError):
                    answer += s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower(), answer
            assert 0.9 < time.monotonic() - start < 3 and b"--upload-timeout" in answer, answer
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""  # closed: a slow client holds no connection

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(stall, [head + b"Content-Length: 100\r\n\r\n{\"prompt\": ",  # stalls in its body
                              head + b"Transfer-Encoding: chunked\r\n\r\n",  # a chunk now and then, never the end
                              head, b""]))  # stalls in its headers, or sends nothing at all
    deadline = time.monotonic() + 5
    while server.metrics().get('ar2dlm_requests_total{status="cancelled"}', 0) < \
            before.get('ar2dlm_requests_total{status="cancelled"}', 0) + 3:
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.05)
    after = server.metrics()
    assert after['ar2dlm_requests_total{status="408"}'] == before.get('ar2dlm_requests_total{status="408"}', 0) + 2
    assert 'ar2dlm_requests_total{status="500"}' not in after


def test_every_malformed_request_gets_its_4xx_and_the_server_keeps_serving(server, model_dir, solo):
    url, as_json = server.url + "/v1/completions", {"content-type": "application/json"}
    cases = [(b'{"prompt": "w5 \xff\xfe"}', as_json, 400, None),  # not UTF-8
             (b'{"prompt": "w5 \\ud800"}', as_json, 400, None),  # a lone surrogate, in a value
             (b'{"\\udfff": 1, "prompt": "w5"}', as_json, 400, None),  # in a key
             (b'{"prompt": "w5", "temperature": true}', as_json, 422, "temperature"),  # a bool is no number
             (b'{"prompt": "w5", "stream": 1}', as_json, 422, "stream"),  # a number is no bool
             (b'{"prompt": "w5", "top_p": NaN}', as_json, 422, "top_p"),
             (b'{"prompt": "w5", "stream_options": {"include_usage": true}}', as_json, 422, "stream_options"),
             (b'{"prompt": "w5", "stream": true, "stream_options": {"usage": true}}', as_json, 422,
              "stream_options.usage"),
             (b'{"prompt": "w5", "logprobs": 1}', as_json, 422, "logprobs"),
             (b'{"prompt": "w5"}', {"content-type": "text/plain"}, 415, None),  # a browser's "simple" request
             (b'{"prompt": "w5"}', {}, 415, None)]
    for body, headers, status, param in cases:
        r = httpx.post(url, content=body, headers=headers)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (body, r.text)
    r = httpx.post(url, json={"prompt": "w5", "proposals": 6})  # over the checkpoint's draft_len: says where from
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "proposals" and "ar2dlm.json" in error["message"], error
    assert model_dir not in r.text and "/tmp" not in r.text  # but not where the server keeps its files
    assert httpx.head(server.url + "/health").status_code == 200
    assert "swagger" in httpx.get(server.url + "/docs").text.lower()
    shapes = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "CompletionChunk", "ErrorResponse"} <= set(shapes)
    assert 'ar2dlm_requests_total{status="500"}' not in server.metrics()
    r = httpx.post(url, json={"prompt": "w5 w6", "max_tokens": 5})
    assert r.json()["choices"][0]["text"] == solo("w5 w6", 5)


def test_openai_fields_are_honoured_or_refused_by_name(server, model_dir, solo):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "w9 w10"}]
    sampled = dict(model=model_dir, prompt="w11 w12", max_tokens=12, temperature=1.0, seed=7)
    two = [c.text for c in client.completions.create(n=2, **sampled).choices]
    assert two == [c.text for c in client.completions.create(n=2, **sampled).choices]  # seed: reproduced
    assert two[0] == client.completions.create(**sampled).choices[0].text  # choice 0 draws from seed itself
    assert two[1] != two[0]  # choice 1 from a stream of its own (as generate's row 1)
    r = client.chat.completions.create(model=model_dir, messages=messages, max_tokens=6, user="u-1",
                                       response_format={"type": "text"}, logprobs=False)
    assert r.choices[0].message.content == solo("w9 w10", 6, chat=True)
    for fields, param in [(dict(logprobs=True), "logprobs"), (dict(top_logprobs=2), "top_logprobs"),
                          (dict(response_format={"type": "json_object"}), "response_format.type"),
                          (dict(stream_options={"include_usage": True}), "stream_options"),
                          (dict(presence_penalty=1.0), "presence_penalty"),
                          (dict(extra_body={"reasoning": "high"}), "reasoning")]:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(model=model_dir, messages=messages, max_tokens=6, **fields)
        assert e.value.body["param"] == param, e.value.body


def test_a_disconnect_mid_stream_frees_its_row(server):
    before = server.metrics()
    body = {"prompt": "w7 w8", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metrics()["ar2dlm_running_batch_size"] == 1
    deadline = time.monotonic() + 10
    while server.metrics()["ar2dlm_running_batch_size"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = server.metrics()
    assert after['ar2dlm_requests_total{status="cancelled"}'] == before.get(
        'ar2dlm_requests_total{status="cancelled"}', 0) + 1
    assert after["ar2dlm_generation_tokens_total"] - before["ar2dlm_generation_tokens_total"] < 250
    # a client that leaves a whole answer frees it too: test_serve_protocol.py (a stub engine whose jobs never end;
    # the tiny model here answers 250 tokens faster than a client could leave)


async def _stream(client, url, body) -> tuple[str, str | None, bool]:
    """(text, last finish_reason, whether [DONE] came) of one streamed request."""
    text, finish, done = "", None, False
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            for choice in json.loads(line[6:])["choices"]:
                text += choice.get("text") or choice.get("delta", {}).get("content") or ""
                finish = choice["finish_reason"] or finish
    return text, finish, done


def test_load_32_streams_with_bad_requests_interleaved(server, solo):
    """32 concurrent streams (completions and chat, greedy and seeded sampling), malformed requests between them:
    every stream completes, every greedy text equals decoding alone, seeded ones reproduce, the server stays up."""
    rng = random.Random(0)
    jobs = []
    for i in range(32):
        prompt = " ".join(f"w{rng.randint(2, 90)}" for _ in range(rng.randint(2, 10)))
        chat, n = i % 3 == 0, rng.randint(4, 40)
        body = {"max_tokens": n, "stream": True}
        if i % 8 == 5:  # seeded sampling: the same request four times among the others
            prompt, chat, n = "w11 w12 w13", False, 30
            body.update(max_tokens=n, temperature=1.0, seed=42)
        body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
        jobs.append((prompt, chat, n, body))
    seeded_alone = httpx.post(server.url + "/v1/completions", json={**jobs[5][3], "stream": False}, timeout=60)
    seeded_alone = seeded_alone.json()["choices"][0]["text"]
    bad = [b"{", json.dumps({"prompt": "w5", "top_k": -1}).encode(), json.dumps({"messages": []}).encode(),
           json.dumps({"prompt": "w5", "model": "other"}).encode(),
           json.dumps({"prompt": "w5", "draft_len": 64, "proposals": 64, "max_tokens": 250}).encode()]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(prompt, chat, n, body):
                url = server.url + ("/v1/chat/completions" if chat else "/v1/completions")
                return await _stream(client, url, body)

            async def malformed(body):
                r = await client.post(server.url + "/v1/completions", content=body,
                                      headers={"content-type": "application/json"})
                return r.status_code

            tasks = []
            for i, job in enumerate(jobs):
                tasks.append(asyncio.create_task(one(*job)))
                if i % 2:
                    tasks.append(asyncio.create_task(malformed(bad[i // 2 % len(bad)])))
                await asyncio.sleep(rng.random() * 0.02)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    streams = [r for r in results if isinstance(r, tuple)]
    statuses = [r for r in results if isinstance(r, int)]
    assert len(streams) == 32 and all(done and finish in ("stop", "length") for _, finish, done in streams)
    assert sorted(set(statuses)) == [400, 404, 422]
    for (prompt, chat, n, body), (text, _, _) in zip(jobs, streams):
        assert text == (seeded_alone if "seed" in body else solo(prompt, n, chat)), body
    m = server.metrics()
    assert 'ar2dlm_requests_total{status="500"}' not in m and m["ar2dlm_running_batch_size"] == 0
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key_and_a_full_queue(model_dir, tmp_path):
    s = Server(model_dir, tmp_path, "--max-batch", 1, "--max-queue", 1, "--api-key", KEY)
    try:
        url, auth = s.url + "/v1/completions", {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(url, json={"prompt": "w5"}).status_code == 401
        r = httpx.post(url, json={"prompt": "w5"}, headers={"Authorization": "Bearer wrong-key-123"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers=auth).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        long = {"prompt": "w5 w6", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60, headers=auth) as client, client.stream("POST", url, json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")  # running: the one row is taken

            async def burst():  # at once: one waits in the queue, the others find it full (whenever the long
                async with httpx.AsyncClient(timeout=60, headers=auth) as c:  # one ends: it may be fast)
                    return await asyncio.gather(*(c.post(url, json={"prompt": "w5", "max_tokens": 2})
                                                  for _ in range(4)))
            answers = asyncio.run(burst())
        assert sorted(r.status_code for r in answers)[0] == 200 and {r.status_code for r in answers} == {200, 429}
        full = next(r for r in answers if r.status_code == 429)
        assert int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["type"] == "rate_limit_error"
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(model_dir, tmp_path):
    s = Server(model_dir, tmp_path, "--max-batch", 4)
    url = s.url + "/v1/completions"

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [{"prompt": f"w{5 + i} w9", "max_tokens": 60, "ignore_eos": True, "stream": True}
                      for i in range(6)]  # 4 running, 2 queued
            tasks = [asyncio.create_task(_stream(client, url, b)) for b in bodies]
            deadline = time.monotonic() + 30
            while s.metrics()["ar2dlm_running_batch_size"] < 4:
                assert time.monotonic() < deadline, s.metrics()
                await asyncio.sleep(0.02)
            s.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:
                refused = (await client.post(url, json={"prompt": "w5"})).status_code
            except httpx.TransportError:
                refused = "connection refused"
            return await asyncio.gather(*tasks), refused

    streams, refused = asyncio.run(run())
    assert refused in (503, "connection refused")
    assert all(done and finish == "length" and len(text.split()) == 60 for text, finish, done in streams)
    assert s.proc.wait(60) == 0
    assert "serve: stopped" in s.log.read_text()


def test_serve_settings_fail_before_the_model_loads(capsys, base_dirs):
    from conftest import refusal, run_cli

    rc, _, err, seen = run_cli(["serve", "no-such-model", "--max-batch", "0"], capsys)
    assert rc == 2 and refusal(err, "serve", seen).field == "max_batch"
    for key in (" padded-key ", "key with spaces", "clé-secrète-1"):  # no Authorization header could match it
        rc, _, err, seen = run_cli(["serve", "no-such-model", "--api-key", key], capsys)
        assert rc == 2 and refusal(err, "serve", seen).field == "api_key"
    rc, _, err, seen = run_cli(["serve", base_dirs["llama"]], capsys)  # not converted: say --ar
    assert rc == 2 and "--ar" in refusal(err, "serve", seen)


def test_serve_resolves_its_dtype_as_every_verb_does(capsys, base_dirs, monkeypatch):
    """$AR2DLM_DTYPE (and a checkpoint's own dtype) decide `auto` for the server as for generate: with
    AR2DLM_DTYPE=float32 the server loads float32, so its answers equal the library's in the same environment."""
    from conftest import run_cli

    from ar2dlm.serve import main

    monkeypatch.setenv("AR2DLM_DTYPE", "float32")
    loaded, real = [], DiffusionLM.from_pretrained

    def from_pretrained(path, dtype="auto", **kwargs):
        loaded.append(real(path, dtype=dtype, **kwargs).model.dtype)
        raise SystemExit(0)  # the model is what this test checks; no server is started

    monkeypatch.setattr(main.DiffusionLM, "from_pretrained", staticmethod(from_pretrained))
    rc, _, _, _ = run_cli(["serve", base_dirs["llama"], "--ar", "--port", 0], capsys)
    assert loaded == [__import__("torch").float32]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident memory from /proc")
def test_resident_memory_is_flat_over_1000_requests(model_dir, tmp_path):
    """1,000 streamed requests at concurrency 16 (with cancelled and malformed ones among them): the server's
    resident memory after them is within 10% of what it was after the first 100 (a warm server)."""
    s = Server(model_dir, tmp_path, "--max-batch", 16)
    rng = random.Random(1)

    async def batch(n):
        async with httpx.AsyncClient(timeout=120) as client:
            sem = asyncio.Semaphore(16)

            async def one(i):
                async with sem:
                    body = {"prompt": " ".join(f"w{rng.randint(2, 90)}" for _ in range(rng.randint(2, 30))),
                            "max_tokens": rng.randint(1, 48), "stream": i % 2 == 0}
                    if i % 10 == 3:
                        body["temperature"] = "bad"
                    if i % 10 == 7:  # gone after the first event
                        async with client.stream("POST", s.url + "/v1/completions", json=body | {"stream": True}) \
                                as r:
                            async for _ in r.aiter_lines():
                                break
                        return
                    await client.post(s.url + "/v1/completions", json=body)
            await asyncio.gather(*(one(i) for i in range(n)))
    try:
        asyncio.run(batch(100))
        warm = _rss_kib(s.proc.pid)
        asyncio.run(batch(900))
        after = _rss_kib(s.proc.pid)
        print(f"resident memory: {warm / 1024:.1f} MiB after 100 requests, {after / 1024:.1f} MiB after 1000")
        assert abs(after - warm) <= 0.10 * warm, (warm, after)
        assert 'ar2dlm_requests_total{status="500"}' not in s.metrics()
    finally:
        assert s.stop() == 0


KINDS = {"drafts and proposals": dict(draft_len=4, proposals=2, adaptive=False, candidates="diffusion"),
         "suffix candidates": dict(draft_len=4, proposals=1, adaptive=False, candidates="both"),
         "adaptive": dict(draft_len=8, proposals=1, adaptive=True), "defaults": {}}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_server_answers_as_generate_and_stream_with_every_candidate_kind(server, model_dir, solo, kind):
    """Greedy and seeded lossless, streamed and whole: the server's text is generate's (the prompt repeats
    itself, so suffix candidates have something to copy). Greedy requests run beside each other and beside a
    request of other settings; a seeded one alone (adaptive drafting and the suffix shortcut pool their choices
    over a batch, which changes the drafts a seeded row verifies, not its distribution)."""
    prompt = "w5 w6 w7 w8 w5 w6 w7 w8 w5 w6"
    for sampling in ({}, dict(sampler="lossless", temperature=0.8, seed=3)):
        settings = KINDS[kind] | sampling
        expected = solo(prompt, 16, **settings)
        body = {"prompt": prompt, "max_tokens": 16, **settings}

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                async def whole():
                    r = await client.post(server.url + "/v1/completions", json=body)
                    return r.json()["choices"][0]["text"]

                async def streamed():
                    text = ""
                    async with client.stream("POST", server.url + "/v1/completions",
                                             json=body | {"stream": True}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                text += json.loads(line[6:])["choices"][0]["text"]
                    return text

                if sampling:
                    return [await whole(), await streamed()]
                other = client.post(server.url + "/v1/completions", json={"prompt": "w30 w31", "max_tokens": 20,
                                                                          "draft_len": 2})
                return (await asyncio.gather(whole(), streamed(), other))[:2]
        assert asyncio.run(run()) == [expected, expected], (kind, sampling)


@pytest.mark.parametrize("delay", [0.5, 2.5])
def test_a_signal_while_the_server_starts_stops_it_with_exit_0(model_dir, delay):
    """While the command still imports torch (the first seconds) or loads the model: exit 0, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "ar2dlm", "serve", model_dir, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AR2DLM_API_KEY": ""})
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "stopped before it was up" in err or "serve: stopped" in err, err
