"""`ar2dlm demo [MODEL]`: stream a few answers and measure each against the AR loop.

One chat, one code and one prose request, asked through the chat template
(an instruct model answers requests; a raw HumanEval stub or a Shakespeare
fragment makes a 135M model loop), and never used in training. For each: the ar2dlm answer is streamed, then the same prompt is decoded
with the same-stack AR loop (same model, same KV cache, one token per
forward) and both are timed in this run; the line under the text gives tokens
per forward (TPF), both speeds, the speedup and whether the text equals AR's.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from ..decode.engine import Request, generate, stream
from ..model.lm import DiffusionLM

DEMO_PROMPTS = (  # (label, text): asked as a user message of the chat template
    ("chat", "Why does ice float on water?"),
    ("code", "Write a Python function that returns the n-th Fibonacci number, with a docstring."),
    ("prose", "Describe a walk through a forest in autumn in a short paragraph."),
)


def demo_prompts() -> list[tuple[str, str, bool]]:
    """(label, text, chat) of each demo prompt."""
    return [(label, text, True) for label, text in DEMO_PROMPTS]


def _timed_stream(lm: DiffusionLM, ids, cfg, write) -> tuple[Request, float]:
    out = Request(lm, cfg)
    t = time.perf_counter()
    for piece in stream(lm, ids, cfg, out):
        write(piece)
    return out, time.perf_counter() - t


def run_demo(lm: DiffusionLM, prompts=None, max_new_tokens: int = 96, out=sys.stdout, **settings) -> list[dict]:
    prompts = prompts if prompts is not None else demo_prompts()
    cfg = lm.decode_config(max_new_tokens=max_new_tokens, **settings)
    ar_cfg = lm.decode_config(max_new_tokens=max_new_tokens, ar=True)
    # warm-up: the first forwards of a process are slow (allocator, kernel selection)
    warm = lm.encode("Hello")
    for c in (cfg, ar_cfg):
        generate(lm, warm, dataclasses.replace(c, max_new_tokens=8))
    rows = []
    mode = f"{cfg.sampler} K={cfg.draft_len} |R|={cfg.proposals}" + (" adaptive" if cfg.adaptive else "")
    for label, text, chat in prompts:
        ids = lm.encode([text], chat=chat)[0]
        shown = text if len(text) < 300 else text[:300] + " ..."
        print(f"\n=== {label} ===\n{shown}\n--- ar2dlm ({mode}) ---", file=out, flush=True)
        req, wall = _timed_stream(lm, ids, cfg, lambda s: (out.write(s), out.flush()))
        ar_req, ar_wall = _timed_stream(lm, ids, ar_cfg, lambda s: None)
        n, ar_n = len(req.tokens), len(ar_req.tokens)
        row = {"prompt": label, "tokens": n, "forwards": req.stats.forwards, "tpf": round(req.stats.tpf, 3),
               "tokens_per_s": round(n / wall, 2), "ar_tokens_per_s": round(ar_n / ar_wall, 2),
               "same_as_ar": req.tokens == ar_req.tokens}
        row["speedup"] = round(row["tokens_per_s"] / row["ar_tokens_per_s"], 3)
        rows.append(row)
        same = "yes" if row["same_as_ar"] else "no"
        print(f"\n[{label}] {n} tokens in {req.stats.forwards} forwards: TPF {row['tpf']:.2f} | "
              f"{row['tokens_per_s']:.1f} tok/s vs AR loop {row['ar_tokens_per_s']:.1f} tok/s -> "
              f"{row['speedup']:.2f}x | same text as AR: {same}", file=out, flush=True)
    return rows
