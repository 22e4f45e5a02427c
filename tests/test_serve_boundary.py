"""`ar2dlm serve` at its edges: a shutdown whose grace period a step outlasts, the pages of an allow-listed origin,
and the start-up errors found before the model loads (a real server process on the loopback, as in
test_serve.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
from conftest import refusal, run_cli
from test_serve import Server, model_dir  # noqa: F401 -- model_dir: test_serve's fixture, the same tiny model

SLOW_STEP = """
import sys, time
import ar2dlm.decode.core as core
step = core.Batch.step
def slow(self, *args, **kwargs):  # every decode step takes 3 s more: longer than the grace period
    time.sleep(3)
    return step(self, *args, **kwargs)
core.Batch.step = slow
from ar2dlm.cli import main
sys.exit(main())
"""


def test_a_shutdown_whose_grace_a_step_outlasts_answers_everyone_and_exits_0_in_time(model_dir, tmp_path):
    """SIGTERM while every step takes longer than --grace: /health says draining (the socket stays open), a new
    request gets a JSON 503, the open stream ends with an error event and [DONE], the whole answer is a JSON 503,
    and the process exits 0 within the grace (plus the interpreter's own exit), with no traceback or abort.
    The same server lets the pages of --allowed-origins call it (CORS), answers an --allowed-hosts name, and caps
    draft_len at the model's block size by default."""
    program = tmp_path / "slow_serve.py"
    program.write_text(SLOW_STEP)
    s = Server(model_dir, tmp_path, "--grace", 1.5, "--allowed-origins", "http://localhost:3000",
               "--allowed-hosts", "box.test", program=(str(program),))
    url, body = s.url + "/v1/completions", {"prompt": "w5 w6", "max_tokens": 50, "ignore_eos": True}
    page = {"Origin": "http://localhost:3000"}
    r = httpx.options(url, headers=page | {"Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert httpx.get(s.url + "/v1/models", headers=page | {"Host": "box.test"}).status_code == 200
    assert httpx.get(s.url + "/v1/models", headers={"Origin": "http://localhost:3001"}).status_code == 403
    r = httpx.post(url, json=body | {"draft_len": 5})  # by default, a draft is at most the converted block (4)
    assert r.status_code == 422 and "limit of 4 (its --max-draft-len)" in r.json()["error"]["message"]

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            async def streamed():
                events = []
                async with client.stream("POST", url, json=body | {"stream": True}) as r:
                    events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                return r.status_code, events

            tasks = [asyncio.create_task(streamed()), asyncio.create_task(client.post(url, json=body))]
            deadline = time.monotonic() + 30
            while s.metrics()["ar2dlm_running_batch_size"] < 2:
                assert time.monotonic() < deadline, s.metrics()
                await asyncio.sleep(0.05)
            s.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            health = await client.get(s.url + "/health")
            refused = await client.post(url, json=body)
            (status, events), whole = await asyncio.gather(*tasks)
            rc = await asyncio.to_thread(s.proc.wait, 30)
            return health, refused, status, events, whole, rc, time.monotonic() - signalled

    health, refused, status, events, whole, rc, seconds = asyncio.run(run())
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    assert status == 200 and events[-1] == "data: [DONE]", events
    assert json.loads(events[-2][6:])["error"]["type"] == "service_unavailable", events
    assert whole.status_code == 503 and "grace period" in whole.json()["error"]["message"]
    log = s.log.read_text()
    assert rc == 0 and seconds < 1.5 + 3, (seconds, log)  # the interpreter's exit takes about a second here
    assert "Traceback" not in log and "terminate called" not in log and "outlasted the grace" in log, log


def test_bind_problems_are_said_before_the_model_loads(capsys, monkeypatch):
    """An unresolvable --host, one that is not this machine's, a port taken: each its own message, found before
    the model loads (no-such-model would fail there); and an API key no header can match is refused."""
    for host in ("no-such-host.invalid", "192.0.2.1"):  # 192.0.2.1: TEST-NET-1, no machine's own address
        rc, _, err, seen = run_cli(["serve", "no-such-model", "--host", host, "--port", 0], capsys)
        message = refusal(err, "serve", seen)
        assert rc == 2 and seen[0].field == "host" and host in message, message
        assert ("resolve" if "invalid" in host else "not an address of this machine") in message, message
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, err, seen = run_cli(["serve", "no-such-model", "--port", port], capsys)
    message = refusal(err, "serve", seen)
    assert rc == 2 and seen[0].field == "port" and "already in use" in message and str(port) in message, message
    for key in ("        ", "\t" * 9, " x" * 5):
        monkeypatch.setenv("AR2DLM_API_KEY", key)
        rc, _, err, seen = run_cli(["serve", "no-such-model", "--port", 0], capsys)
        assert rc == 2 and seen[0].field == "api_key" and "$AR2DLM_API_KEY" in refusal(err, "serve", seen)
