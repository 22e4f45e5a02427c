"""Decoding a list of prompts: `generate` and `stream` drive the engine core (core.Batch) to the end.

`events` is the loop: one Batch, every prompt joins it at once, and it steps
until every row has left, yielding each row's committed tokens as they come.
The step itself (prefill, verify + pre-draft in one forward, commit) is in
step.py; what a batch decides per step (drafting, candidates, finishing) is in
core.py. The server's scheduler drives the same Batch, with rows that join
and leave between steps.
"""

from __future__ import annotations

import time
from typing import Iterator

from ..core.errors import ConfigError
from ..nn.vocab import embedding_rows
from .config import DecodeConfig
from .core import Batch, Generation, Request, Stats, eos_ids, row_seed
from .interface import DecodeModel

__all__ = ["Generation", "Request", "Stats", "check_request", "eos_ids", "events", "generate", "stream"]


def events(lm: DecodeModel, prompts: list[list[int]], cfg: DecodeConfig,
           outs: list[Request]) -> Iterator[tuple[int, list[int]]]:
    """Decode every prompt, yielding (request index, tokens taken) as tokens are committed; results land in `outs`
    (one Request per prompt, each sampling from its own generator: `generate` seeds prompt i with cfg.seed + i)."""
    check_request(lm, prompts, cfg)
    for out, p in zip(outs, prompts):
        out.prompt = p
    index = {id(o): i for i, o in enumerate(outs)}
    batch = Batch(lm, cfg)
    start = time.perf_counter()
    for out in outs:
        out.started = start
    taken = batch.join(list(outs))
    while True:
        for out, tokens in taken:
            if tokens:
                yield index[id(out)], tokens
        if not len(batch):
            return
        taken = batch.step()


def generate(lm: DecodeModel, prompts: list[list[int]], cfg: DecodeConfig) -> list[Generation]:
    """Decode a batch; one Generation per prompt, in order."""
    outs = [Request(lm, cfg, seed=row_seed(cfg, i)) for i in range(len(prompts))]
    for _ in events(lm, prompts, cfg, outs):
        pass
    return [o.result() for o in outs]


def stream(lm: DecodeModel, prompt: list[int], cfg: DecodeConfig, out: Request | None = None) -> Iterator[str]:
    """Yield text deltas as tokens are committed (one prompt). Pass `out` to read the stats after."""
    out = out or Request(lm, cfg)
    for _ in events(lm, [prompt], cfg, [out]):
        if text := out.delta():
            yield text
    if text := out.delta():
        yield text


def check_request(lm: DecodeModel, prompts: list[list[int]], cfg: DecodeConfig) -> None:
    """Errors a user can fix, before any compute."""
    if not cfg.ar and lm.mask_token_id is None:
        raise ConfigError("this model has no mask token (not converted): use ar=True, or `ar2dlm convert` it",
                          field="ar")
    if any(cfg.tree) and not cfg.ar and getattr(lm, "windows", None):
        raise ConfigError("candidate trees (tree=...) are not exact on sliding-window layers yet: a sibling reads its "
                          "keys in rank order, a window starts its keys elsewhere; drop tree", field="tree")
    if len(prompts) == 0:
        raise ConfigError("prompts is empty: give at least one prompt")
    ctx = lm.context_len
    vocab = embedding_rows(lm.model)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty: give at least one token")
        if ctx is not None and len(p) >= ctx:
            raise ConfigError(f"prompt {i} has {len(p)} tokens, as many as the model's context of {ctx} tokens or "
                              f"more: shorten it to at most {ctx - 1} tokens")
        if ctx is not None and len(p) + cfg.max_new_tokens > ctx:
            raise ConfigError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={cfg.max_new_tokens} that "
                              f"exceeds the model's context of {ctx} tokens: shorten the prompt or lower "
                              f"max_new_tokens to at most {ctx - len(p)}", field="max_new_tokens")
        if max(p) >= vocab or min(p) < 0:
            raise ConfigError(f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1})")
