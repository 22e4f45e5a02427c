"""What a decode-step forward costs on this machine, by token slots per row: measured here, never assumed.

Adaptive drafting (policy.AdaptiveDraft) weighs the tokens a draft is
expected to commit against the cost of the wider forward, relative to an AR
step. That cost belongs to one machine, one dtype and one thread count: on
an AMD EPYC an 8-row fp32 step costs 1.3-1.8 AR steps, a bf16 one about 1.0;
on an Intel Xeon with AMX the numbers differ again. So a table carries the
machine it was measured on (`machine_key`), and a table from elsewhere is
never applied: the model measures its own (`measure`, a second or two) and
keeps it (model/costs.py).

Table format (`forward_cost` in ar2dlm.json, and the cache files):
{"machine": "<cpu> | <dtype> | <n> threads", "slots": {"1": 1.0, "2": ..., ...}}.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from ..core.hardware import cpu_model
from ..nn import masks, predecessors
from .interface import DecodeModel

SLOTS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32)
"""Token slots per row a first-use measurement times (K + |R| K of the settings adaptive drafting tries)."""


def machine_key(dtype: torch.dtype, threads: int | None = None) -> str:
    """'Intel(R) Xeon(R) Processor | bfloat16 | 2 threads': what a cost table is valid for."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{cpu_model()} | {str(dtype).removeprefix('torch.')} | {threads} threads"


def table_for(saved: dict | None, key: str) -> dict[int, float] | None:
    """The slots table of a saved `forward_cost` when it was measured on `key`; None otherwise (a table of
    another machine, or of the old format, which named no machine)."""
    if not isinstance(saved, dict) or saved.get("machine") != key or not isinstance(saved.get("slots"), dict):
        return None
    try:
        return {int(n): float(c) for n, c in saved["slots"].items()}
    except (TypeError, ValueError):
        return None


def as_saved(table: dict[int, float], key: str) -> dict:
    return {"machine": key, "slots": {str(n): round(float(c), 4) for n, c in sorted(table.items())}}


@torch.inference_mode()
def measure(lm: DecodeModel, slots=SLOTS, context: int = 128, reps: int = 3, batch: int = 1,
            machinery: bool = True) -> dict[int, float]:
    """Median wall time of a step forward with n slots over a cached context, relative to a 1-token AR forward.

    machinery=True: as a decode step runs it (rows after the first are mask slots: the drafting adapter runs
    on them). False: the bare base forward of the same rows (the adapter off), to price the machinery.
    Rounds go over every n in turn, so a busy moment of the machine hits all of them alike.
    """
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    device = lm.model.device
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)
    cache = predecessors.new_cache(lm.model)  # timing only: a mixer's rows may read their tensor neighbours here
    lm.forward(ids, torch.arange(context, device=device).expand(batch, -1), masks.causal_mask(context, batch).to(device),
               None, cache)
    samples: dict[int, list[float]] = {n: [] for n in slots}
    for rep in range(reps + 1):
        for n in slots:
            step_ids = torch.randint(0, vocab, (batch, n), generator=g).to(device)
            mask = torch.ones(batch, n, context + n, dtype=torch.bool, device=device)
            gate = (torch.arange(n, device=device) >= 1).expand(batch, -1) if n > 1 and machinery else None
            with contextlib.nullcontext() if n > 1 and machinery else lm.base_weights():
                t = time.perf_counter()
                lm.forward(step_ids, context + torch.arange(n, device=device).expand(batch, -1), mask, gate, cache)
                if rep:
                    samples[n].append(time.perf_counter() - t)
            predecessors.crop(cache, n)
    one = statistics.median(samples[1])
    return {n: round(statistics.median(samples[n]) / one, 4) for n in slots}
