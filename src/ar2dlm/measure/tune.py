"""`ar2dlm tune MODEL`: pick draft_len, proposals and the candidate tree for this machine.

1. Forward cost: time one decode-step forward over a cached prompt for n
   token slots per row (n = K + |R| K), relative to n = 1 (AR). On a GPU the
   curve is flat up to ~100 slots; on a laptop CPU it doubles by ~20.
2. Acceptance: greedy-decode a prompt set with the longest draft and every
   proposal, and estimate a_j = P(draft j+1 accepted | drafts up to j were).
   Candidate trees: decode once more with 6 siblings at each of the first
   depths, and count, where the chain stopped at depth j, which rank of
   sibling held the AR token: h_j(m) for every width m.
3. Predict tokens per forward for each (K, |R|, tree) with the proposal
   policy's coverage and the siblings' h_j, divide by the forward cost of
   K + siblings + |R| K rows, and time the few best predictions (and the AR
   loop) on the same prompts; the fastest measured wins.
4. Write draft_len, proposals, the tree and the cost table into ar2dlm.json.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..decode import costs
from ..decode.engine import generate
from ..decode.policy import CostModel
from ..model import exactness
from ..model.lm import DiffusionLM
from ..model.settings import DiffusionConfig
from .bench import default_eos
from .tune_config import TuneConfig

SLOTS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
ATTENTION_SHAPES = ((1, 200), (1, 2000), (16, 200), (16, 2000))
"""(query rows, keys) at which `attention_cost` times one layer's attention: an AR step and a 16-row step, over a
short and a long context."""


def attention_cost(lm: DiffusionLM, shapes=ATTENTION_SHAPES, reps: int = 15, calls: int = 20) -> list[dict]:
    """Microseconds of one layer's attention with the model's heads and dtype: ar2dlm's batch-invariant attention
    (nn/invariant.py, what every decode forward runs) against the flash SDPA call it replaced (one call over the
    keys padded to 64, an additive mask): the price of exactness. Medians of interleaved rounds."""
    import torch.nn.functional as F

    from ..nn import invariant

    config = lm.model.config
    H, Hkv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // H
    dtype, g = lm.model.dtype, torch.Generator().manual_seed(0)
    rows = []
    for q, L in shapes:
        padded = L + (-L) % invariant.KEY_CHUNK
        query = torch.randn(1, H, q, d, generator=g).to(dtype)
        k, v = (torch.randn(1, Hkv, padded, d, generator=g).to(dtype) for _ in range(2))
        allowed = torch.zeros(1, 1, q, padded, dtype=torch.bool)
        allowed[..., :L - q] = True
        allowed[..., L - q:L] = torch.ones(q, q, dtype=torch.bool).tril()
        additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        stacked, stacked_mask = query.reshape(1, Hkv, H // Hkv * q, d), additive.repeat(1, 1, H // Hkv, 1)
        sdpa = lambda: F.scaled_dot_product_attention(stacked, k, v, attn_mask=stacked_mask)  # noqa: E731
        # a forward finds its mask's key order once and reuses it in every layer: so does this one
        # and reads the keys transposed, as the lean forward's cache keeps them
        mask, orders, keys_t = allowed[..., :L], {}, k[..., :L, :].transpose(2, 3).contiguous()
        ours = lambda: invariant.attention(query, k[..., :L, :], v[..., :L, :], mask, orders=orders,  # noqa: E731
                                           keys_t=keys_t)
        times: dict[str, list[float]] = {"sdpa": [], "ar2dlm": []}
        with torch.inference_mode():
            for rep in range(reps + 1):
                for name, f in (("sdpa", sdpa), ("ar2dlm", ours)):
                    t = time.perf_counter()
                    for _ in range(calls):
                        f()
                    if rep:
                        times[name].append((time.perf_counter() - t) / calls * 1e6)
        a, b = statistics.median(times["sdpa"]), statistics.median(times["ar2dlm"])
        rows.append({"rows": q, "keys": L, "sdpa_us": round(a, 1), "ar2dlm_us": round(b, 1),
                     "ratio": round(b / a, 3)})
    return rows


def format_attention(rows: list[dict], kernel: str) -> str:
    lines = [f"attention, one layer (ar2dlm: {kernel}; SDPA: the flash call it replaced), microseconds:",
             "   rows    keys      SDPA    ar2dlm   ar2dlm / SDPA"]
    lines += [f"  {r['rows']:>5}  {r['keys']:>6}  {r['sdpa_us']:>8.1f}  {r['ar2dlm_us']:>8.1f}   {r['ratio']:>13.3f}"
              for r in rows]
    return "\n".join(lines)


def forward_cost(lm: DiffusionLM, slots=SLOTS, context: int = 128, reps: int = 5, batch: int = 1,
                 machinery: bool = True) -> dict[int, float]:
    """decode/costs.measure with tune's slots and repetitions."""
    return costs.measure(lm, slots, context, reps, batch, machinery)


def acceptance(lm: DiffusionLM, prompts: list[list[int]], max_len: int, max_new_tokens: int, eos) -> list[float]:
    """a_j, j = 1..max_len-1, from greedy decoding with every proposal (censored at the first rejection)."""
    acc, seen = [0.0] * (max_len - 1), [0] * (max_len - 1)
    for g in generate(lm, prompts, lm.decode_config(draft_len=max_len, proposals=max_len, sampler="greedy",
                                                     max_new_tokens=max_new_tokens, eos_token_id=tuple(eos))):
        for r, count in g.stats.accepted.items():
            for j in range(min(r, max_len - 1)):  # drafts 2..r accepted; r+1 rejected if it existed
                if j < r - 1:
                    acc[j] += count
                    seen[j] += count
                elif r < max_len:
                    seen[j] += count
    return [acc[j] / seen[j] if seen[j] else 0.0 for j in range(max_len - 1)]


def predicted_tpf(a: list[float], K: int, n: int) -> float:
    """Expected tokens per step with draft length K and n proposals.

    P(r) = a_1..a_{r-1} (1 - a_r) for r < K, a_1..a_{K-1} for r = K. The
    policy pre-drafts the n most likely r; when r is not among them, the next
    draft comes from the largest r' < r that is (K - (r - r') tokens), or is
    just [t]. The steady state is the expected length of the step after one
    drawn from P(r): enough to rank settings before timing the best ones.
    """
    def expected(k):
        e, run = 1.0, 1.0
        for j in range(k - 1):
            run *= a[j]
            e += run
        return e

    p = []
    run = 1.0
    for r in range(1, K + 1):
        p.append(run * ((1 - a[r - 1]) if r < K else 1.0))
        if r < K:
            run *= a[r - 1]
    chosen = sorted(sorted(range(1, K + 1), key=lambda r: -p[r - 1])[:n])
    # tokens of the next step: the full draft if r was pre-drafted, a shorter one (or none) if not
    return sum(p[r - 1] * (expected(K - (r - max(x for x in chosen if x <= r)))
                           if any(x <= r for x in chosen) else 1.0) for r in range(1, K + 1))


TREE_WIDTH = 6
"""Siblings per depth while tune measures how often each rank of sibling is taken."""
TREE_SHAPES = ((), (1,), (2,), (3,), (4,), (6,), (2, 1), (3, 1), (4, 2), (6, 2), (3, 2, 1), (4, 2, 1), (6, 3, 2))
"""Candidate trees tune prices (siblings per depth; a shape deeper than K - 1 is cut)."""


def sibling_rates(lm: DiffusionLM, prompts: list[list[int]], max_len: int, max_new_tokens: int, eos,
                  depths: int = 3) -> list[list[float]]:
    """h[j-1][m] = P(one of the m most likely siblings at depth j is taken | the chain stopped at depth j), m =
    0..TREE_WIDTH, from greedy decoding with TREE_WIDTH siblings at each of the first `depths` depths."""
    depths = min(depths, max_len - 1)
    stops = [[0] * (1 + TREE_WIDTH) for _ in range(depths)]
    cfg = lm.decode_config(draft_len=max_len, proposals=max_len, sampler="greedy", candidates="diffusion",
                           tree=(TREE_WIDTH,) * depths, max_new_tokens=max_new_tokens, eos_token_id=tuple(eos))
    for g in generate(lm, prompts, cfg):
        for j, seen in g.stats.siblings.items():
            for i, v in enumerate(seen):
                stops[j - 1][i] += v
    rates = []
    for seen in stops:
        hits, total = 0, max(seen[0], 1)
        cum = [0.0]
        for v in seen[1:]:
            hits += v
            cum.append(hits / total)
        rates.append(cum)
    return rates


def tree_gain(a: list[float], h: list[list[float]], K: int, shape: tuple[int, ...]) -> float:
    """Expected tokens a tree adds to a step of draft length K: where the chain stops at depth j (probability
    a_1..a_{j-1} (1 - a_j)), a sibling is taken with probability h_j(m_j)."""
    gain, run = 0.0, 1.0
    for j in range(1, K):
        m = shape[j - 1] if j - 1 < len(shape) else 0
        if m and j - 1 < len(h):
            gain += run * (1 - a[j - 1]) * h[j - 1][min(m, len(h[j - 1]) - 1)]
        run *= a[j - 1]
    return gain


def tune(lm: DiffusionLM, prompts: list[list[int]], max_len: int = 16, max_new_tokens: int = 64, top: int = 3,
         grid_k=(2, 3, 4, 6, 8, 12, 16), grid_n=(1, 2, 3, 4, 5), log=print, trees=TREE_SHAPES) -> dict:
    TuneConfig(max_draft_len=max_len, max_new_tokens=max_new_tokens)  # before minutes of timing
    if not prompts:
        raise ConfigError("prompts is empty: tune needs at least one prompt")
    eos = default_eos(lm)
    log("tune: measuring forward cost by token slots ...", file=sys.stderr)
    slots = [s for s in SLOTS if s <= max_len * (1 + max(grid_n))]
    with torch.inference_mode():
        cost_table = forward_cost(lm, slots)
        base_table = forward_cost(lm, slots, machinery=False)
    cost = CostModel(cost_table)
    log("tune: timing attention (ar2dlm's batch-invariant kernel against SDPA) ...", file=sys.stderr)
    attention = attention_cost(lm)
    log("tune: measuring acceptance ...", file=sys.stderr)
    a = acceptance(lm, prompts, max_len, max_new_tokens, eos)
    h = []
    if any(trees) and max_len > 1:
        log("tune: measuring how often candidate siblings are taken ...", file=sys.stderr)
        h = sibling_rates(lm, prompts, max_len, max_new_tokens, eos)
    preds = []
    for K in grid_k:
        if K > max_len:
            continue
        for n in grid_n:
            if n > K:
                continue
            chain = predicted_tpf(a, K, n)
            for shape in sorted({tuple(t[:K - 1]) for t in trees}):
                if any(shape) and not h:
                    continue
                shape = shape if any(shape) else ()
                tpf = chain + tree_gain(a, h, K, shape)
                rows = K + sum(shape) + n * K
                preds.append({"draft_len": K, "proposals": n, "tree": list(shape), "predicted_tpf": round(tpf, 3),
                              "predicted_speedup": round(tpf / cost(rows), 3)})
    preds.sort(key=lambda x: -x["predicted_speedup"])
    candidates = preds[:top]
    log(f"tune: timing the {len(candidates)} best predictions and the AR loop ...", file=sys.stderr)
    # adaptive drafting (up to the best prediction's K, down to plain AR steps) is a candidate too: where
    # drafting does not pay on this machine it falls back to AR steps, so the default cannot lose much
    top_k = candidates[0]
    candidates.append({"draft_len": top_k["draft_len"], "proposals": top_k["proposals"], "tree": top_k["tree"],
                       "adaptive": True})
    settings = [{"draft_len": c["draft_len"], "proposals": c["proposals"], "tree": tuple(c["tree"]),
                 "adaptive": c.get("adaptive", False)} for c in candidates]
    measured, engine = measure(lm, prompts, [{"ar": True}] + settings, max_new_tokens, eos, engine_cost=True)
    ar_speed = measured[0]
    for c, speed, eng in zip(candidates, measured[1:], engine[1:]):
        c["measured_tokens_per_s"] = round(speed, 2)
        c["measured_speedup"] = round(speed / ar_speed, 3)
        c["engine_cost"] = eng
    best = max(candidates, key=lambda c: c["measured_tokens_per_s"])
    return {"acceptance": [round(x, 4) for x in a], "sibling_rates": [[round(x, 4) for x in r] for r in h],
            "forward_cost": cost_table, "base_forward_cost": base_table,
            "machine_key": costs.machine_key(lm.model.dtype),
            "attention_cost": attention, "attention_kernel": exactness.attention_in_use(),
            "predictions": preds, "candidates": candidates, "best": best, "ar_tokens_per_s": round(ar_speed, 2),
            "ar_engine_cost": engine[0]}


def measure(lm: DiffusionLM, prompts, settings: list[dict], max_new_tokens: int, eos, runs: int = 3,
            engine_cost: bool = False):
    """Median tokens/s of each setting over interleaved runs (after a warm-up).

    engine_cost=True also returns, per setting, the engine's own work per step (everything outside the model
    forward: verification, proposal choice, cache crop, bookkeeping) in units of one AR forward.
    """
    speeds = [[] for _ in settings]
    inside = [[0.0, 0.0, 0] for _ in settings]  # [time in forwards, total time, forwards]
    forward, clock = lm.forward, {"t": 0.0, "n": 0}

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            clock["t"] += time.perf_counter() - t
            clock["n"] += 1

    previous = vars(lm).get("forward")
    lm.forward = timed
    try:
        for run in range(runs + 1):
            for i, s in enumerate(settings):
                cfg = lm.decode_config(max_new_tokens=max_new_tokens, eos_token_id=tuple(eos), **s)
                clock["t"], clock["n"] = 0.0, 0
                t = time.perf_counter()
                new = sum(len(g.token_ids) for p in prompts for g in generate(lm, [p], cfg))
                total = time.perf_counter() - t
                if run:
                    speeds[i].append(new / total)
                    inside[i][0] += clock["t"]
                    inside[i][1] += total
                    inside[i][2] += clock["n"]
    finally:
        if previous is None:
            del lm.forward  # the class method is back
        else:
            lm.forward = previous
    medians = [statistics.median(s) for s in speeds]
    if not engine_cost:
        return medians
    ar_forward = inside[0][0] / max(inside[0][2], 1)  # settings[0] is the AR loop
    return medians, [round((tot - fwd) / max(n, 1) / ar_forward, 4) for fwd, tot, n in inside]


def grid_search(lm: DiffusionLM, prompts, choice: dict, grid_k=(2, 3, 4, 6, 8), grid_n=(1, 2, 3),
                max_new_tokens: int = 64, runs: int = 2, log=print) -> dict:
    """Time every (K, |R|) of the grid and the AR loop on the same prompts (interleaved runs after a warm-up);
    report where `choice` (tune's pick) lands against the fastest."""
    grid = [{"draft_len": K, "proposals": n} for K in grid_k for n in grid_n if n <= K]
    if not any(g == {"draft_len": choice["draft_len"], "proposals": choice["proposals"]} for g in grid):
        grid.append({"draft_len": choice["draft_len"], "proposals": choice["proposals"]})
    log(f"tune --grid: timing {len(grid)} settings and the AR loop ...", file=sys.stderr)
    speeds = measure(lm, prompts, [{"ar": True}] + grid, max_new_tokens, default_eos(lm), runs=runs)
    ar, rows = speeds[0], []
    for g, v in zip(grid, speeds[1:]):
        rows.append({**g, "tokens_per_s": round(v, 2), "speedup": round(v / ar, 3)})
    best = max(rows, key=lambda r: r["tokens_per_s"])
    chosen = next(r for r in rows if (r["draft_len"], r["proposals"]) == (choice["draft_len"], choice["proposals"]))
    return {"grid": rows, "best": best, "chosen": chosen, "ar_tokens_per_s": round(ar, 2),
            "chosen_vs_best": round(chosen["tokens_per_s"] / best["tokens_per_s"], 3)}


def write_defaults(model_dir: str | Path, result: dict) -> None:
    settings = DiffusionConfig.load(model_dir)
    best = result["best"]
    settings = dataclasses.replace(settings, draft_len=best["draft_len"], proposals=best["proposals"],
                                   adaptive=bool(best.get("adaptive", False)), tree=tuple(best.get("tree", ())),
                                   forward_cost=costs.as_saved(result["forward_cost"], result["machine_key"]))
    settings.save(model_dir)


def format_tune(result: dict) -> str:
    """The forward-cost table and the candidates of `tune`, as `ar2dlm tune` prints them."""
    lines = ["forward cost by token slots, in AR forwards (1 slot = one AR step):",
             "  slots   decode step (adapter on slots)   bare base forward   drafting machinery"]
    for n, c in result["forward_cost"].items():
        b = result["base_forward_cost"][n]
        lines.append(f"  {n:>5}   {c:>30.3f}   {b:>17.3f}   {c - b:>+18.3f}")
    lines.append(f"engine work outside the forward, per step in AR forwards: AR loop {result['ar_engine_cost']:+.3f}")
    if result.get("attention_cost"):
        lines.append(format_attention(result["attention_cost"], result.get("attention_kernel", "")))
    for j, rates in enumerate(result.get("sibling_rates", []), 1):
        lines.append(f"depth {j}: where the chain stops, the m most likely siblings hold the AR token "
                     + ", ".join(f"m={m}: {x:.2f}" for m, x in enumerate(rates) if m))
    for c in result["candidates"]:
        mode = (" tree=" + ",".join(map(str, c["tree"])) if c.get("tree") else "") + (
            " adaptive" if c.get("adaptive") else "")
        pred = (f"predicted TPF {c['predicted_tpf']:.2f}, predicted speedup {c['predicted_speedup']:.2f}x, "
                if "predicted_tpf" in c else "")
        lines.append(f"K={c['draft_len']:>2} |R|={c['proposals']}{mode}: {pred}measured {c['measured_speedup']:.2f}x "
                     f"({c['measured_tokens_per_s']:.1f} tok/s vs AR {result['ar_tokens_per_s']:.1f}); engine work "
                     f"{c['engine_cost']:+.3f} AR forwards per step")
    return "\n".join(lines)


def format_grid(gs: dict, best: dict) -> str:
    """The grid search of `tune --grid`, and how close tune's choice came to its best."""
    lines = [f"grid K={r['draft_len']:>2} |R|={r['proposals']}: {r['tokens_per_s']:.1f} tok/s, {r['speedup']:.2f}x AR"
             for r in gs["grid"]]
    lines.append(f"tune's choice K={best['draft_len']} |R|={best['proposals']}: {gs['chosen']['tokens_per_s']:.1f} "
                 f"tok/s = {gs['chosen_vs_best']:.2f} of the grid's best (K={gs['best']['draft_len']} "
                 f"|R|={gs['best']['proposals']}, {gs['best']['tokens_per_s']:.1f} tok/s; AR {gs['ar_tokens_per_s']:.1f})")
    return "\n".join(lines)
