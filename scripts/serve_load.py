"""Throughput and latency of a running `ar2dlm serve`, by concurrency (and against the same server with --ar).

At each concurrency c, c clients each send streamed greedy requests back to back (each request generates
exactly --max-tokens tokens: ignore_eos) until --requests requests have finished. Reported per level:
aggregate generated tokens/s (all tokens / wall time of the level), time to first token p50 / p95, and the
per-request tokens/s median. With --ar-url (a second server started with `ar2dlm serve MODEL --ar`), the
same levels run against it and the ratio drafting / AR is printed per level; the issue's targets are
c8 / c1 >= 3 (batching), drafting / AR >= 1.2 at c = 1 and >= 1.0 at c = 4 and 8.

Run it on a quiet machine, one server at a time (start the AR server after the first is stopped, or pass
--model to have the script start and stop each server itself):

    python scripts/serve_load.py --model smollm2-135m --dtype auto --levels 1,4,8,16 --requests 32 --ar
    python scripts/serve_load.py --url http://127.0.0.1:8000 --ar-url http://127.0.0.1:8001

The last stdout line is JSON. Needs httpx (the serve extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "Explain in a few sentences why the sky is blue.",
           "List five uses of a paperclip.",
           "Write a short story about a robot learning to paint.",
           "What are the main differences between TCP and UDP?",
           "Summarise the plot of Romeo and Juliet in one paragraph.",
           "Write a haiku about autumn rain.",
           "Give three tips for writing readable code."]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed request: time to first token, tokens, seconds."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if first is None and (choice.get("text") or choice.get("delta", {}).get("content")):
                    first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": first if first is not None else time.perf_counter() - start, "tokens": tokens,
            "seconds": time.perf_counter() - start}


async def level(base: str, c: int, n_requests: int, args) -> dict:
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    todo = list(range(n_requests))
    results = []

    def body(i: int) -> dict:
        prompt = args.prompt_list[i % len(args.prompt_list)]
        b = {"max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}}
        b.update({"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt})
        return b

    async with httpx.AsyncClient(timeout=600, headers=args.headers) as client:
        await one(client, base + path, body(0))  # warm-up, not counted

        async def worker():
            while todo:
                results.append(await one(client, base + path, body(todo.pop())))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": c, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1000 * percentile([r["ttft"] for r in results], 50), 1),
            "ttft_p95_ms": round(1000 * percentile([r["ttft"] for r in results], 95), 1),
            "request_tok_s_median": round(statistics.median(r["tokens"] / r["seconds"] for r in results), 2)}


def measure(base: str, args) -> list[dict]:
    rows = []
    for c in args.level_list:
        row = asyncio.run(level(base, c, max(args.requests, c), args))
        print(f"  c={c:3d}  {row['tok_s']:9.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:8.1f} ms  "
              f"p95 {row['ttft_p95_ms']:8.1f} ms  ({row['requests']} requests, {row['wall_s']} s)", flush=True)
        rows.append(row)
    return rows


class Started:
    """`ar2dlm serve MODEL --port 0 ...` for the length of a with-block."""

    def __init__(self, args, *flags):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "ar2dlm", "serve", args.model, "--port", "0", "--dtype", args.dtype,
               "--max-batch", str(max(args.level_list)), *args.serve_args, *flags]
        print("$ " + " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            text = open(self.log.name).read()
            if m := re.search(r"listening on (http://\S+)", text):
                return m.group(1)
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {text}")
            time.sleep(0.5)
        raise SystemExit("the server did not start in 10 minutes")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        os.unlink(self.log.name)


IN_PROCESS = """
import json, sys, time
from ar2dlm.model.lm import DiffusionLM
args = json.loads(sys.argv[1])
lm = DiffusionLM.from_pretrained(args["model"], dtype=args["dtype"], allow_ar=args["ar"])
settings = dict(max_new_tokens=args["max_tokens"], eos_token_id=(), chat=args["chat"], ar=True if args["ar"] else None)
prompts = [args["prompts"][i % len(args["prompts"])] for i in range(args["requests"])]
lm.generate(prompts[:1], **settings)  # warm-up, not counted
start, tokens = time.perf_counter(), 0
for p in prompts:
    tokens += len(lm.generate([p], **settings)[0].token_ids)
print(json.dumps({"tokens": tokens, "tok_s": round(tokens / (time.perf_counter() - start), 2)}))
"""
"""The same requests one at a time through `DiffusionLM.generate` in a process of its own (what the server's
concurrency-1 figure is held against)."""


def in_process(args, ar: bool) -> dict:
    spec = {"model": args.model, "dtype": args.dtype, "ar": ar, "max_tokens": args.max_tokens, "chat": args.chat,
            "prompts": args.prompt_list,
            "requests": args.requests}
    cmd = [sys.executable, "-c", IN_PROCESS, json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one with --model)")
    p.add_argument("--ar-url", help="a running server started with --ar, to compare against")
    p.add_argument("--model", help="start `ar2dlm serve MODEL` (and with --ar a second one with --ar) here")
    p.add_argument("--ar", action="store_true", help="with --model: also measure the same model served with --ar")
    p.add_argument("--dtype", default="auto", help="with --model: the server's --dtype (default auto)")
    p.add_argument("--serve-args", default="", help="with --model: more `ar2dlm serve` flags, one string")
    p.add_argument("--levels", default="1,4,8,16", help="concurrency levels (default 1,4,8,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--prompts", help="JSONL file: {\"prompt\": ...} per line (default: eight built-in prompts)")
    p.add_argument("--api-key", default=os.environ.get("AR2DLM_API_KEY"), help="bearer key, if the server has one")
    p.add_argument("--in-process", action="store_true",
                   help="with --model: also run the same requests one at a time through generate in a process of "
                        "its own, and print the server's concurrency-1 tok/s against it (target >= 0.9)")
    args = p.parse_args()
    if not args.url and not args.model:
        p.error("give --url (a running server) or --model (the script starts the server)")
    args.level_list = [int(x) for x in args.levels.split(",")]
    args.serve_args = args.serve_args.split()
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    args.prompt_list = PROMPTS if not args.prompts else [
        (lambda r: r["prompt"] if isinstance(r, dict) else r)(json.loads(line))
        for line in open(args.prompts) if line.strip()]
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("headers", "api_key", "prompt_list")}}
    runs = [("drafting", args.url, ()), ("ar", args.ar_url, ("--ar",) if args.ar else None)]
    for name, url, flags in runs:
        if url:
            print(f"{name}: {url}", flush=True)
            report[name] = measure(url, args)
        elif args.model and flags is not None:
            with Started(args, *flags) as started:
                print(f"{name}: {started}", flush=True)
                report[name] = measure(started, args)
    if args.in_process and args.model:
        for name in ("drafting", "ar"):
            if name in report and report[name][0]["concurrency"] == 1:
                report[f"in_process_{name}"] = got = in_process(args, name == "ar")
                ratio = round(report[name][0]["tok_s"] / got["tok_s"], 3)
                report[f"server_over_in_process_{name}"] = ratio
                print(f"{name}: in-process generate {got['tok_s']} tok/s; the server at c=1 / in-process = {ratio}x "
                      f"(target >= 0.9)", flush=True)
    if "drafting" in report and len(report["drafting"]) > 1:
        by_c = {r["concurrency"]: r["tok_s"] for r in report["drafting"]}
        if 1 in by_c and 8 in by_c:
            report["batching_c8_over_c1"] = round(by_c[8] / by_c[1], 3)
            print(f"batching: c=8 / c=1 = {report['batching_c8_over_c1']}x (target >= 3)")
    if "drafting" in report and "ar" in report:
        report["drafting_over_ar"] = {r["concurrency"]: round(r["tok_s"] / a["tok_s"], 3)
                                      for r, a in zip(report["drafting"], report["ar"])}
        print("drafting / AR by concurrency:", report["drafting_over_ar"], "(targets: >= 1.2 at 1, >= 1.0 at 4, 8)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
