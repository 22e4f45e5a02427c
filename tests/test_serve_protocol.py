"""The server's layers without a model: the HTTP side imports no torch, the protocol models read requests as
strictly as OpenAI's schema, and the routes follow a job through any engine (a stub here, on a real uvicorn)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from ar2dlm.serve.config import ServeConfig
from ar2dlm.serve.metrics import Metrics
from ar2dlm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, refusal

SRC = Path(__file__).resolve().parents[1] / "src"
HTTP_LAYERS = ["ar2dlm.serve.app", "ar2dlm.serve.protocol", "ar2dlm.serve.serving"]


def test_no_torch_above_the_engine_client():
    """The routes, the protocol models and the serving code reach the engine only through the client: no import
    of theirs, direct or not, at module level or in a function, leads to torch or to the engine's packages."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("ar2dlm", include_external_packages=True)
    for module in HTTP_LAYERS:
        below = {m for m in graph.find_upstream_modules(module)
                 if m.split(".")[0] in ("torch", "transformers") or m.startswith(("ar2dlm.decode", "ar2dlm.model",
                                                                                "ar2dlm.nn", "ar2dlm.serve.client"))}
        assert not below, f"{module} reaches {sorted(below)}"
    assert "ar2dlm.decode.core" in graph.find_upstream_modules("ar2dlm.serve.client")  # the client is the boundary
    # and at run time, with torch made unimportable (and the package's own __init__, which loads the model API,
    # skipped): the HTTP layers import
    code = ("import sys, types; sys.modules['torch'] = None; pkg = types.ModuleType('ar2dlm'); "
            f"pkg.__path__ = [{str(SRC / 'ar2dlm')!r}]; sys.modules['ar2dlm'] = pkg; "
            f"import {', '.join(HTTP_LAYERS)}; app = ar2dlm.serve.app.create_app(None, "
            "ar2dlm.serve.config.ServeConfig(), 'm'); print(len(app.openapi()['paths']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and int(out.stdout) >= 6, out.stderr


def _refused(model, raw: str) -> APIError:
    with pytest.raises((ValidationError, APIError)) as e:
        model.model_validate_json(raw)
    return refusal(e.value) if isinstance(e.value, ValidationError) else e.value


@pytest.mark.parametrize("raw, status, param, words", [
    ('{"prompt": "w5", "temperature": true}', 422, "temperature", "number"),  # a bool is not a number
    ('{"prompt": "w5", "max_tokens": true}', 422, "max_tokens", "integer"),
    ('{"prompt": "w5", "max_tokens": 4.0}', 422, "max_tokens", "integer"),
    ('{"prompt": "w5", "stream": 1}', 422, "stream", "true or false"),  # a number is not a bool
    ('{"prompt": "w5", "ignore_eos": "yes"}', 422, "ignore_eos", "true or false"),
    ('{"prompt": "w5", "top_p": NaN}', 422, "top_p", "finite"),
    ('{"prompt": "w5", "draft_len": "4"}', 422, "draft_len", "integer"),
    ('{"prompt": [5, true]}', 422, "prompt[1]", "integer"),
    ('{"prompt": 5}', 422, "prompt", "a string, a list of token ids"),
    ('{"prompt": "w5", "stop": ["a", 5]}', 422, "stop[1]", "string"),
    ('{"prompt": "w5", "n": 0}', 422, "n", ">= 1"),
    ('{"prompt": "w5", "temprature": 0.5}', 422, "temprature", "unknown field"),
    ('{"prompt": "w5", "stream": true, "stream_options": {"include_usage": true, "x": 1}}', 422,
     "stream_options.x", "unknown field"),
    ('{"prompt": "w5", "stream_options": {"include_usage": true}}', 422, "stream_options", "stream: true"),
    ('{"prompt": "w5", "logprobs": 0}', 422, "logprobs", "not supported"),
    ('{"prompt": "w5", "echo": true}', 422, "echo", "not supported"),
    ('{"prompt": "w5", "frequency_penalty": 0.5}', 422, "frequency_penalty", "not supported"),
    ('{"prompt": "\\ud800"}', 400, None, "surrogate"),  # JSON allows the escape; it is no character
    ('{"pr\\udc00ompt": "w5"}', 400, None, "surrogate"),
    ('[1, 2]', 400, None, "JSON object"),
    ('{"prompt": "w5"', 400, None, "not valid JSON"),
    ('{}', 422, "prompt", "required"),
])
def test_completion_requests_are_read_strictly(raw, status, param, words):
    e = _refused(CompletionRequest, raw)
    assert (e.status, e.param) == (status, param) and words in str(e), (str(e), e.param)


@pytest.mark.parametrize("raw, param, words", [
    ('{"messages": []}', "messages", "at least 1"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role", "'user'"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content[0].type", "'text'"),
    ('{"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}', "messages[0].tool_call_id",
     "unknown field"),
    ('{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}', "logprobs", "not supported"),
    ('{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}', "top_logprobs", "not supported"),
    ('{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}',
     "response_format.type", "not supported"),
    ('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "tools", "not supported"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "max_completion_tokens": 5}',
     "max_completion_tokens", "give one"),
])
def test_chat_requests_are_read_strictly(raw, param, words):
    e = _refused(ChatCompletionRequest, raw)
    assert e.status == 422 and e.param == param and words in str(e), (str(e), e.param)


def test_what_requests_ask_for():
    r = ChatCompletionRequest.model_validate_json(
        '{"messages": [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},'
        '{"role": "user", "content": "c", "name": "u1"}], "response_format": {"type": "text"}, "logprobs": false,'
        '"max_completion_tokens": 7, "temperature": 0.5, "seed": 3, "stop": "w9", "user": "me", "n": 2}')
    assert r.prompts() == [[{"role": "system", "content": "ab"}, {"role": "user", "content": "c", "name": "u1"}]]
    s = r.settings()
    assert (r.max_tokens, s["sampler"], s["seed"], s["stop"], s["temperature"]) == (7, "lossless", 3, ("w9",), 0.5)
    c = CompletionRequest.model_validate_json('{"prompt": [[5, 6], [7]], "ignore_eos": true}')
    assert c.prompts() == [[5, 6], [7]] and c.settings()["eos_token_id"] == () and c.settings()["sampler"] == "greedy"
    assert CompletionRequest.model_validate_json('{"prompt": [5, 6]}').prompts() == [[5, 6]]


# ---------------------------------------------------------------------------- the routes over a stub engine
class Stub:
    """An engine whose jobs never finish: what the routes do while a whole answer is awaited."""

    def __init__(self):
        self.metrics, self.health = Metrics(), "ok"
        self.cancelled = threading.Event()

    def start(self):
        pass

    async def stop(self):
        pass

    async def submit(self, request):
        return object()

    async def result(self, job):
        await asyncio.Event().wait()

    def cancel(self, job):
        self.cancelled.set()


@pytest.fixture
def stub_server():
    import uvicorn

    from ar2dlm.serve.app import create_app

    stub = Stub()
    server = uvicorn.Server(uvicorn.Config(create_app(stub, ServeConfig(), "m"), host="127.0.0.1", port=0,
                                           http="h11", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield stub, server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(10)


def test_a_client_that_leaves_a_whole_answer_frees_it_at_once(stub_server):
    """Not by polling: the close is seen as it happens (ASGI's http.disconnect), and the job is cancelled."""
    stub, port = stub_server
    body = b'{"prompt": "w5"}'
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)  # the request waits for its answer
        assert not stub.cancelled.is_set()
        closed = time.monotonic()
    assert stub.cancelled.wait(5)
    assert time.monotonic() - closed < 0.2
    deadline = time.monotonic() + 5
    while 'status="cancelled"' not in stub.metrics.render():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(stub_server):
    stub, port = stub_server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while 'status="cancelled"' not in stub.metrics.render():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert 'status="500"' not in stub.metrics.render()
