"""`ar2dlm bench MODEL`: decoding speed, measured in one process against same-stack baselines.

Every configuration decodes the same prompts; runs are interleaved (run 1 of
every configuration, then run 2, ...) so a busy moment of the machine hits
all of them alike; one untimed warm-up run of every configuration comes first. Reported per prompt set and batch
size: tokens per forward (TPF), mean accepted length and its histogram, each
candidate kind's share of the steps and its tau (tokens a step of that kind
committed: the drafter's slots, the request's own text, or none),
tokens/s (median of the runs) and the ratio to the same-stack AR loop (same
model, same KV cache, one token per forward). Baselines: HF `generate`
(greedy), the same with transformers' own attention and linear modules
(`hf_generate_stock`: what runs without ar2dlm's fast paths; see kernels.py
and attention.py; for a bf16 or fp16 model also `hf_generate_stock_fp32`, the
same on the weights in float32: the base as HF loads it by default, what a
user starts from) and HF assisted generation with
prompt lookup (batch 1). For the mix sampler, drift from AR: the AR model's
mean NLL of the tokens it generated (vs the lossless sampler's, which are AR
samples) and, at temperature 0, the share of prompts whose output equals AR
greedy. With a reference model (`--reference`, e.g. the base an ungated
conversion started from), how far the model's own greedy output moved from
the reference's: the share of prompts with equal output, the mean length of
the common prefix, and the reference's mean NLL of both outputs.

The last line of stdout is one JSON document with everything.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.files import PACKAGE_DIR
from ..decode.engine import eos_ids, generate
from ..model.lm import DiffusionLM
from ..train.data import read_prompt_file
from ..train.prompts import load_prompts
from .bench_config import tree_shape

PROMPT_SETS = {"code": "code", "prose": "prose", "chat": "chat"}  # name -> prompts.py source
PLOT_FILES = ("speedup_vs_mix_weight.png", "tpf_vs_draft_len.png", "accepted_hist.png")  # what `plots` writes


@dataclass
class Spec:
    """One configuration to time."""

    name: str
    kind: str  # ar | hf | hf_pld | ar2dlm
    settings: dict = field(default_factory=dict)


def specs_for(lm: DiffusionLM, draft_lens, proposals, mix_weights, samplers, hf: bool = True,
              temperature: float = 0.7, trees=()) -> list[Spec]:
    """The configurations to time. `default` is the model's own default settings (what generate, demo and the
    API run with no flags); lossless and mix sample at `temperature`, against the AR loop sampling at it."""
    unknown = sorted(set(samplers) - {"greedy", "lossless", "adaptive"})
    if unknown:
        raise ConfigError(f"unknown bench sampler(s) {unknown}: choose from greedy, lossless, adaptive "
                          f"(mix is set with --mix-weights)")
    sampling = {"temperature": temperature}
    # default: the model's settings, drafts from the model and from the request itself (candidates=both);
    # the two candidate kinds alone beside it
    out = [Spec("ar", "ar", {"ar": True}), Spec("default", "ar2dlm", {}),
           Spec("default_diffusion_only", "ar2dlm", {"candidates": "diffusion"}),
           Spec("default_suffix_only", "ar2dlm", {"candidates": "suffix"})]
    if "lossless" in samplers or mix_weights:
        out += [Spec("ar_sample", "ar", {"ar": True, "sampler": "lossless", **sampling}),
                Spec("default_lossless", "ar2dlm", {"sampler": "lossless", **sampling})]
    if hf:
        # HF generate once more on the plain modules: what the user runs without ar2dlm (DiffusionLM.plain)
        out += [Spec("hf_generate", "hf"), Spec("hf_generate_stock", "hf", {"stock_kernels": True}),
                Spec("hf_prompt_lookup", "hf_pld")]
        if lm.model.dtype != torch.float32:
            out.append(Spec("hf_generate_stock_fp32", "hf", {"stock_kernels": True, "float32": True}))
    for K in draft_lens:
        for n in proposals:
            if n > K:
                continue
            base = {"draft_len": K, "proposals": n, "adaptive": False}
            tag = f"K{K}_R{n}"
            if "greedy" in samplers:
                out.append(Spec(f"greedy_{tag}", "ar2dlm", {**base, "sampler": "greedy"}))
                for tree in trees:  # the same chain with siblings beside it (candidates=diffusion: the model's own)
                    shape = tree_shape(tree)[:K - 1]
                    if any(shape):
                        out.append(Spec(f"greedy_{tag}_T{tree}", "ar2dlm",
                                        {**base, "sampler": "greedy", "tree": shape}))
            if "lossless" in samplers:
                out.append(Spec(f"lossless_{tag}", "ar2dlm", {**base, "sampler": "lossless", **sampling}))
            if "adaptive" in samplers:  # greedy with adaptive draft length (up to K, down to AR steps)
                out.append(Spec(f"adaptive_{tag}", "ar2dlm", {**base, "sampler": "greedy", "adaptive": True}))
            for w in mix_weights:
                out.append(Spec(f"mix{w:g}_{tag}", "ar2dlm", {**base, "sampler": "mix", "mix_weight": w, **sampling}))
    return out


def load_prompt_set(lm: DiffusionLM, name: str, n: int) -> list[list[int]]:
    """The first n bench prompts of a named set, or of a JSONL prompts file (name = its path)."""
    if n < 1:
        raise ConfigError(f"n_prompts must be >= 1, got {n}")
    path = Path(name)
    if path.exists() or path.suffix == ".jsonl":  # a file of prompts, whatever its suffix
        records = read_prompt_file(path)[:n]
        where = str(path)
    elif name in PROMPT_SETS:
        records, where = load_prompts(PROMPT_SETS[name], "bench")[:n], f"prompt set {name!r}"
    else:
        raise ConfigError(f"unknown prompt set {name!r}: choose from {', '.join(PROMPT_SETS)}, or give the path of "
                          f"a JSONL prompts file (no file {name} exists)")
    if any(r["chat"] for r in records) and not getattr(lm.tokenizer, "chat_template", None):
        raise ConfigError(f"{where} holds chat prompts, and the model's tokenizer has no chat template: "
                          f"leave {name} out")
    return [lm.encode([r["prompt"]], chat=r["chat"])[0] for r in records]


def _hf_generate(lm: DiffusionLM, prompts, batch_size, max_new_tokens, eos, lookup: bool):
    """HF generate (greedy) on the same weights; left-padded batches. Returns (token lists, seconds)."""
    model = lm.model
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    outs = []
    start = time.perf_counter()
    with torch.inference_mode(), lm.base_weights():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            L = max(map(len, chunk))
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk])
            att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
            kwargs = {"prompt_lookup_num_tokens": 10} if lookup else {}
            bad = [[lm.mask_token_id]] if lm.mask_token_id is not None else None
            gen = model.generate(input_ids=ids, attention_mask=att, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos or None, pad_token_id=pad, bad_words_ids=bad, **kwargs)
            for row in gen[:, L:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                outs.append(row[:cut])
    return outs, time.perf_counter() - start


@contextlib.contextmanager
def float32_weights(model: torch.nn.Module):
    """The model's floating weights and buffers in float32 inside; after, the very tensors it had, bit for bit."""
    saved = [(t, t.data) for t in itertools.chain(model.parameters(), model.buffers())
             if t.is_floating_point() and t.dtype != torch.float32]
    try:
        for t, data in saved:
            t.data = data.float()
        yield
    finally:
        for t, data in saved:
            t.data = data


def run_once(lm: DiffusionLM, spec: Spec, prompts, batch_size: int, max_new_tokens: int, seed: int, eos) -> dict:
    if spec.kind in ("hf", "hf_pld"):
        if spec.kind == "hf_pld" and batch_size > 1:
            return {}
        with (lm.plain() if spec.settings.get("stock_kernels") else contextlib.nullcontext(),
              float32_weights(lm.model) if spec.settings.get("float32") else contextlib.nullcontext()):
            toks, seconds = _hf_generate(lm, prompts, batch_size, max_new_tokens, eos, spec.kind == "hf_pld")
        return {"tokens": toks, "seconds": seconds, "new": sum(map(len, toks))}
    cfg = lm.decode_config(max_new_tokens=max_new_tokens, seed=seed, eos_token_id=tuple(eos), **spec.settings)
    toks, forwards, hist, steps, kinds = [], 0, {}, 0, {}
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        for g in generate(lm, prompts[i:i + batch_size], cfg):
            toks.append(g.token_ids)
            forwards += g.stats.forwards
            for r, c in g.stats.accepted.items():
                hist[r] = hist.get(r, 0) + c
                steps += c
            for kind, counts in g.stats.by_kind.items():
                kinds[kind] = [a + b for a, b in zip(kinds.get(kind, [0, 0, 0]), counts)]
    seconds = time.perf_counter() - start
    new = sum(map(len, toks))
    return {"tokens": toks, "seconds": seconds, "new": new, "forwards": forwards, "hist": hist, "kinds": kinds}


@torch.inference_mode()
def nll_of(lm: DiffusionLM, prompts, outputs) -> float:
    """Mean NLL (nats/token) the AR model assigns to generated tokens, teacher-forced."""
    total, n = 0.0, 0
    model = lm.model
    with lm.base_weights():
        for p, o in zip(prompts, outputs):
            if not o:
                continue
            ids = torch.tensor([p + o])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
            if lm.mask_token_id is not None and lm.mask_token_id < logp.shape[-1]:
                logp = torch.log_softmax(logp.index_fill(-1, torch.tensor([lm.mask_token_id]), float("-inf")), -1)
            total -= float(logp.gather(1, torch.tensor(o)[:, None]).sum())
            n += len(o)
    return total / max(n, 1)


def bench(lm: DiffusionLM, sets: list[str], n_prompts: int, batch_sizes: list[int], runs: int, max_new_tokens: int,
          draft_lens: list[int], proposals: list[int], mix_weights: list[float], samplers: list[str],
          seed: int = 0, hf: bool = True, reference: DiffusionLM | None = None, log=print,
          prompt_sets: dict | None = None, temperature: float = 0.7, trees=()) -> dict:
    """prompt_sets: {name: token-id prompts} already loaded (else each set loads here, before any timing)."""
    eos = default_eos(lm)
    specs = specs_for(lm, draft_lens, proposals, mix_weights, samplers, hf, temperature, trees)
    if not any(s.kind == "ar2dlm" for s in specs):
        raise ConfigError(f"no ar2dlm configuration to time: every proposal count {list(proposals)} exceeds every "
                          f"draft length {list(draft_lens)}, or samplers and mix_weights are empty")
    prompt_sets = prompt_sets or {name: load_prompt_set(lm, name, n_prompts) for name in sets}
    report = {"model": str(getattr(lm, "name", "")), "max_new_tokens": max_new_tokens, "runs": runs,
              "threads": torch.get_num_threads(), "results": []}
    first = True
    for name in sets:
        prompts = prompt_sets[name]
        for bs in batch_sizes:
            per = {s.name: [] for s in specs}
            # run 0 warms the process up (allocator, kernel caches): once, on the first prompt set
            for run in range(0 if first else 1, runs + 1):
                order = specs[run % len(specs):] + specs[:run % len(specs)]  # rotate: no fixed position bias
                for spec in order:
                    res = run_once(lm, spec, prompts, bs, max_new_tokens, seed, eos)
                    if res and run > 0:
                        per[spec.name].append(res)
                log(f"bench {name} batch {bs}: run {run}/{runs} done", file=sys.stderr)
            first = False
            report["results"] += summarize(lm, name, bs, prompts, specs, per, max_new_tokens, seed, eos)
            if reference is not None and bs == batch_sizes[0]:
                report.setdefault("reference", []).append(
                    reference_drift(reference, name, prompts, per["ar"][0]["tokens"], max_new_tokens, eos))
    return report


def source_prompt(lm: DiffusionLM, length: int) -> list[int]:
    """A prompt of exactly `length` tokens: this package's own source files, in a fixed order."""
    root = PACKAGE_DIR
    text = "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))
    ids = lm.tokenizer(text[:length * 16], add_special_tokens=False, verbose=False)["input_ids"]  # ample
    if len(ids) < length:
        raise ConfigError(f"prompt length {length} exceeds the {len(ids)} tokens of ar2dlm's source it is cut from")
    return ids[:length]


def context_scaling(lm: DiffusionLM, lengths: list[int], max_new_tokens: int, runs: int, log=print) -> list[dict]:
    """Decode-only speed (prefill excluded) at each prompt length: the model's default settings vs the AR loop.

    The prompt is ar2dlm's own source cut to the length; runs alternate between the two after a warm-up;
    median tokens/s of the tokens committed after the prefill.
    """
    rows = []
    for length in lengths:
        prompt = source_prompt(lm, length)
        cfgs = {"ar": lm.decode_config(ar=True, max_new_tokens=max_new_tokens, eos_token_id=()),
                "default": lm.decode_config(max_new_tokens=max_new_tokens, eos_token_id=())}
        speeds = {k: [] for k in cfgs}
        tpf = None
        for run in range(runs + 1):
            for name, cfg in cfgs.items():
                [g] = generate(lm, [prompt], cfg)
                decode = g.stats.wall_time - g.stats.prefill_time
                if run:
                    speeds[name].append((g.stats.new_tokens - 1) / decode)  # the first token came from the prefill
                if name == "default":
                    tpf = round((g.stats.new_tokens - 1) / max(g.stats.forwards - 1, 1), 3)
            log(f"bench context {length}: run {run}/{runs} done", file=sys.stderr)
        ar, ours = statistics.median(speeds["ar"]), statistics.median(speeds["default"])
        rows.append({"prompt_tokens": length, "decode_tpf": tpf, "ar_tokens_per_s": round(ar, 2),
                     "default_tokens_per_s": round(ours, 2), "speedup_vs_ar": round(ours / ar, 3)})
    return rows


def reference_drift(ref: DiffusionLM, name: str, prompts, tokens, max_new_tokens: int, eos) -> dict:
    """How far greedy `tokens` (one list per prompt) are from the reference model's own greedy output."""
    cfg = ref.decode_config(ar=True, max_new_tokens=max_new_tokens, eos_token_id=tuple(eos))
    own = [g.token_ids for g in generate(ref, prompts, cfg)]

    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    nll, nll_own = nll_of(ref, prompts, tokens), nll_of(ref, prompts, own)
    return {"prompt_set": name, "reference": str(getattr(ref, "name", "")),
            "exact_match": round(sum(a == b for a, b in zip(tokens, own)) / len(prompts), 3),
            "mean_common_prefix": round(sum(prefix(a, b) for a, b in zip(tokens, own)) / len(prompts), 1),
            "reference_nll": round(nll, 4), "reference_nll_own": round(nll_own, 4),
            "reference_nll_drift": round(nll - nll_own, 4)}


def summarize(lm: DiffusionLM, name, bs, prompts, specs, per, max_new_tokens, seed, eos) -> list[dict]:
    rows = []
    ar_runs = per["ar"]
    ar_speed = statistics.median(r["new"] / r["seconds"] for r in ar_runs)
    ar_tokens = ar_runs[0]["tokens"]
    sample_speed = statistics.median(r["new"] / r["seconds"] for r in per["ar_sample"]) if per.get("ar_sample") else None
    # what a user starts from: HF generate of the base in float32 on the stock modules (a bf16 / fp16 model only)
    fp32 = per.get("hf_generate_stock_fp32")
    fp32_speed = statistics.median(r["new"] / r["seconds"] for r in fp32) if fp32 else None
    lossless_nll = None
    for spec in specs:
        runs = per[spec.name]
        if not runs:
            continue
        speed = statistics.median(r["new"] / r["seconds"] for r in runs)
        row = {"prompt_set": name, "batch_size": bs, "config": spec.name, "kind": spec.kind, **spec.settings,
               "tokens_per_s": round(speed, 2), "speedup_vs_ar": round(speed / ar_speed, 3),
               **({"speedup_vs_ar_sample": round(speed / sample_speed, 3)}
                  if sample_speed and spec.settings.get("sampler") in ("lossless", "mix") else {}),
               **({"speedup_vs_hf_stock_fp32": round(speed / fp32_speed, 3)} if fp32_speed else {}),
               "new_tokens": runs[0]["new"]}
        if "forwards" in runs[0]:
            hist = runs[0]["hist"]
            steps = sum(hist.values())
            row["tpf"] = round(runs[0]["new"] / max(runs[0]["forwards"], 1), 3)
            row["mean_accepted"] = round(sum(r * c for r, c in hist.items()) / max(steps, 1), 3)
            row["accepted_hist"] = {str(k): v for k, v in sorted(hist.items())}
            # each lever's share: steps whose draft came from the drafter, the request's text, or none (AR), and
            # the tokens a step of that kind committed (tau; at batch 1 also its TPF)
            # (for trees also how many steps took a sibling)
            row["by_kind"] = {k: {"steps": n, "share": round(n / max(steps, 1), 3), "tau": round(t / max(n, 1), 3),
                                  **({"siblings": sib} if k == "tree" else {})}
                              for k, (n, t, sib) in sorted(runs[0]["kinds"].items())}
        if spec.kind == "ar2dlm" and lm.decode_config(**spec.settings).greedy:
            row["equals_ar"] = runs[0]["tokens"] == ar_tokens
        if spec.settings.get("sampler") in ("lossless", "mix"):
            row["nll"] = round(nll_of(lm, prompts, runs[0]["tokens"]), 4)
            if spec.settings["sampler"] == "lossless" and lossless_nll is None:
                lossless_nll = row["nll"]
        if spec.settings.get("sampler") == "mix":
            cfg = lm.decode_config(max_new_tokens=max_new_tokens, eos_token_id=tuple(eos),
                                   **{**spec.settings, "temperature": 0.0})
            greedy_mix = [g.token_ids for g in generate(lm, prompts, cfg)]
            row["greedy_exact_match"] = round(sum(a == b for a, b in zip(greedy_mix, ar_tokens)) / len(prompts), 3)
        rows.append(row)
    for row in rows:
        if "nll" in row and lossless_nll is not None:
            row["nll_vs_lossless"] = round(row["nll"] - lossless_nll, 4)
    return rows


def default_eos(lm: DiffusionLM) -> list[int]:
    """The EOS ids decoding stops at by default (the checkpoint's generation config, else the tokenizer's)."""
    return eos_ids(lm, lm.decode_config(ar=True))


def table(report: dict) -> str:
    cols = ["prompt_set", "batch_size", "config", "tpf", "mean_accepted", "tokens_per_s", "speedup_vs_ar",
            "speedup_vs_ar_sample", "speedup_vs_hf_stock_fp32", "equals_ar", "nll_vs_lossless", "greedy_exact_match",
            "tau_x_share_by_kind"]
    lines = [" | ".join(cols)]
    for r in report["results"]:
        kinds = " ".join(f"{k}:{v['tau']}x{v['share']}" for k, v in r.get("by_kind", {}).items())
        lines.append(" | ".join([*(str(r.get(c, "")) for c in cols[:-1]), kinds]))
    width = [max(len(l.split(" | ")[i]) for l in lines) for i in range(len(cols))]
    out = []
    for j, l in enumerate(lines):
        cells = l.split(" | ")
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, width)))
        if j == 0:
            out.append("  ".join("-" * w for w in width))
    if report.get("context_scaling"):
        out.append("decode-only speed by prompt length (default settings vs the AR loop; prefill excluded):")
        for r in report["context_scaling"]:
            out.append(f"  {r['prompt_tokens']:>6} tokens: AR {r['ar_tokens_per_s']:.1f} tok/s, default "
                       f"{r['default_tokens_per_s']:.1f} tok/s (TPF {r['decode_tpf']}) -> {r['speedup_vs_ar']:.2f}x")
    for r in report.get("reference", []):
        out.append(f"vs reference {r['reference']} ({r['prompt_set']}, AR greedy): exact match {r['exact_match']}, "
                   f"common prefix {r['mean_common_prefix']} tokens, reference NLL {r['reference_nll']} "
                   f"vs its own output's {r['reference_nll_own']} ({r['reference_nll_drift']:+} nats/token)")
    return "\n".join(out)


def _legend(ax, **kwargs) -> None:
    """A legend when the axes have labelled lines (a run without mix or greedy rows has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_k(rows, name):
    """The draft length whose mix results are plotted: the first greedy configuration's."""
    return next((r["draft_len"] for r in rows if r["prompt_set"] == name and "draft_len" in r), None)


def plots(report: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["results"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax2 = ax.twinx()
    for name in sorted({r["prompt_set"] for r in rows}):
        mix = sorted(((r["mix_weight"], r) for r in rows if r["prompt_set"] == name and r.get("sampler") == "mix"
                      and r["batch_size"] == 1 and r["draft_len"] == rows_k(rows, name)), key=lambda x: x[0])
        if mix:
            ws = [w for w, _ in mix]
            ax.plot(ws, [r["speedup_vs_ar"] for _, r in mix], marker="o", label=f"{name} speedup")
            ax2.plot(ws, [r.get("nll_vs_lossless", 0) for _, r in mix], ls="--", marker="x", label=f"{name} drift")
    ax.set_xlabel("mix weight w")
    ax.set_ylabel("speedup vs AR loop")
    ax2.set_ylabel("NLL drift vs lossless (nats/token)")
    _legend(ax, loc="upper left")
    _legend(ax2, loc="lower right")
    paths.append(_save(fig, out_dir / "speedup_vs_mix_weight.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({r["prompt_set"] for r in rows}):
        best = {}
        for r in rows:
            if r["prompt_set"] == name and r.get("sampler") == "greedy" and r["batch_size"] == 1:
                best[r["draft_len"]] = max(best.get(r["draft_len"], 0), r["tpf"])
        pts = sorted(best.items())
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("draft length K")
    ax.set_ylabel("tokens per forward (greedy)")
    _legend(ax)
    paths.append(_save(fig, out_dir / "tpf_vs_draft_len.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({r["prompt_set"] for r in rows}):
        greedy = [r for r in rows if r["prompt_set"] == name and r.get("sampler") == "greedy" and r["batch_size"] == 1]
        if greedy:
            h = greedy[0]["accepted_hist"]
            total = sum(h.values())
            ks = sorted(int(k) for k in h)
            ax.plot(ks, [h[str(k)] / total for k in ks], marker="o", label=f"{name} ({greedy[0]['config']})")
    ax.set_xlabel("tokens committed per step (r)")
    ax.set_ylabel("share of steps")
    _legend(ax)
    paths.append(_save(fig, out_dir / "accepted_hist.png"))
    return paths
