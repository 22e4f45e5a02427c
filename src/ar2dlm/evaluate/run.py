"""`ar2dlm eval`: task quality of decoding settings, with their speed, in one resumable run.

A *setting* is one way to decode (names used on the command line and in the results):
  ar          the same-stack AR loop, greedy (one token per forward) — the reference
  greedy      ar2dlm greedy (== AR greedy, token for token)
  ar-sample   the AR loop sampling at --temperature (n samples per problem)
  lossless    speculative sampling at --temperature (== the AR distribution; n samples)
  mix:W       logit mixing with weight W at --temperature (n samples)

The run walks the problems in chunks of --batch-size and decodes each chunk with every setting in
turn (interleaved, so a change in machine load hits all settings alike). Answers are scored as they
arrive: code in sandboxed processes (sandbox.py: an OS boundary), rule-checked answers in-process. Every
scored answer is appended to OUT/results.jsonl at once; a rerun skips what is there (resume).

Scores per setting: greedy settings give pass@1 (the fraction passed); sampled ones give pass@k for
each k <= n by the unbiased estimator of Chen et al. (2021). Each score has a 95% confidence interval
(normal approximation over problems). Beside it: TPF (tokens per forward, prefill included), τ (mean
tokens committed per decode step), tokens/s of decoding (scoring excluded) and the speedup over the
`ar` setting measured in the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core import files
from ..core.errors import ConfigError
from ..decode.engine import generate
from ..model.lm import DiffusionLM
from . import tasks
from .config import EvalConfig, parse_setting
from .sandbox import SandboxLimits, require_isolation, run_program


def samples_of(setting: str, cfg: EvalConfig) -> int:
    return 1 if setting in ("ar", "greedy") else cfg.n_samples


def decode_settings(setting: str, cfg: EvalConfig) -> dict:
    """DecodeConfig overrides of a setting."""
    kind, w = parse_setting(setting)
    drafting = {"draft_len": cfg.draft_len, "proposals": cfg.proposals}
    if kind == "ar":
        return {"ar": True}
    if kind == "greedy":
        return {"sampler": "greedy", **drafting}
    if kind == "ar-sample":
        return {"ar": True, "sampler": "lossless", "temperature": cfg.temperature}
    if kind == "lossless":
        return {"sampler": "lossless", "temperature": cfg.temperature, **drafting}
    return {"sampler": "mix", "mix_weight": w, "temperature": cfg.temperature, **drafting}


# ---------------------------------------------------------------------------- scores
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c of n samples correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation; 0 for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))


def tau(hists) -> float:
    """Mean tokens committed per decode step, over accepted-length histograms {r: steps}."""
    steps = sum(v for h in hists for v in h.values())
    return sum(int(r) * v for h in hists for r, v in h.items()) / steps if steps else 1.0


def summarize(records: list[dict], cfg: EvalConfig, settings) -> dict:
    """Per setting: scores with CIs, TPF, τ, tokens/s and speedup over `ar` (when it ran)."""
    out = {}
    for s in settings:
        rows = [r for r in records if r["setting"] == s]
        if not rows:
            continue
        by_problem: dict[str, list[dict]] = {}
        for r in rows:
            by_problem.setdefault(r["problem"], []).append(r)
        n = samples_of(s, cfg)
        complete = {p: rs for p, rs in by_problem.items() if len(rs) >= n}
        scores = {}
        ks = (1,) if n == 1 else cfg.k
        for k in ks:
            mean, ci = mean_ci([pass_at_k(len(rs), sum(r["passed"] for r in rs), k) for rs in complete.values()])
            scores[f"pass@{k}"] = {"score": mean, "ci95": ci}
        if cfg.task == "ifeval":
            mean, ci = mean_ci([c for r in rows for c in r["checks"]])
            scores["instruction_level"] = {"score": mean, "ci95": ci}
        tokens = sum(r["new_tokens"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        out[s] = {"problems": len(complete), "answers": len(rows), "samples_per_problem": n, "scores": scores,
                  "tpf": tokens / max(sum(r["forwards"] for r in rows), 1),
                  "tau": tau([r["accepted"] for r in rows]), "tokens_per_s": tokens / seconds if seconds else None,
                  "new_tokens": tokens, "decode_seconds": seconds}
    if "ar" in out and out["ar"]["tokens_per_s"]:
        for s in out.values():
            s["speedup"] = s["tokens_per_s"] / out["ar"]["tokens_per_s"] if s["tokens_per_s"] else None
    if "ar-sample" in out and out["ar-sample"]["tokens_per_s"]:  # the sampled settings' own baseline
        for name, s in out.items():
            if parse_setting(name)[0] in ("ar-sample", "lossless", "mix") and s["tokens_per_s"]:
                s["speedup_vs_ar_sample"] = s["tokens_per_s"] / out["ar-sample"]["tokens_per_s"]
    return out


def table(summary: dict) -> str:
    head = (f"{'setting':<10} {'problems':>8} {'score':>16} {'TPF':>6} {'tau':>6} {'tok/s':>8} {'speedup':>8} "
            f"{'vs sample':>9} {'decode s':>9}")
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        key = next(iter(s["scores"]))
        sc = s["scores"][key]
        speed = f"{s['speedup']:.2f}x" if s.get("speedup") else "-"
        tps = f"{s['tokens_per_s']:.1f}" if s["tokens_per_s"] else "-"
        vs = f"{s['speedup_vs_ar_sample']:.2f}x" if s.get("speedup_vs_ar_sample") else "-"
        lines.append(f"{name:<10} {s['problems']:>8} {key + ' ' + format(sc['score'], '.3f'):>10}±{sc['ci95']:.3f} "
                     f"{s['tpf']:>6.2f} {s['tau']:>6.2f} {tps:>8} {speed:>8} {vs:>9} {s['decode_seconds']:>9.0f}")
    return "\n".join(lines)


def plot_frontier(summary: dict, path: Path, title: str) -> Path:
    """Speedup over AR (x) against the score (y, with its 95% CI), one labelled point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, s in summary.items():
        key = next(iter(s["scores"]))
        x, y, e = s.get("speedup") or 0.0, s["scores"][key]["score"], s["scores"][key]["ci95"]
        ax.errorbar([x], [y], yerr=[[y - max(0.0, y - e)], [min(1.0, y + e) - y]], fmt="o", capsize=3)  # in [0, 1]
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("speedup over the AR loop (same run)")
    ax.set_ylabel(f"score ({next(iter(next(iter(summary.values()))['scores']))})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the run
def score_answer(problem: tasks.Problem, answer: str, cfg: EvalConfig, limits: SandboxLimits) -> dict:
    if cfg.task == "humaneval":
        o = run_program(tasks.humaneval_program(problem, answer, cfg.form), limits)
        return {"passed": o.passed, "status": o.status, "detail": o.detail[-300:]}
    checks = tasks.ifeval_checks(problem, answer)
    return {"passed": all(checks), "checks": checks}


def read_results(path: Path) -> list[dict]:
    """Records of an earlier run; a last line cut short by an interruption is cut off the file (it is redone)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def check_resume(out: Path, identity: dict, force: bool) -> None:
    """Refuse to mix results of runs that are not comparable; --force starts over."""
    cfg_path, results = out / "config.json", out / "results.jsonl"
    if force:
        for p in (cfg_path, results):
            p.unlink(missing_ok=True)
    if cfg_path.exists():
        before = json.loads(cfg_path.read_text())
        if before != identity:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {v!r}" for k, v in identity.items() if before.get(k) != v)
            raise ConfigError(f"{out} holds results of another evaluation ({diff}): choose another --out, or add "
                              f"--force to start over")
    elif results.exists():
        raise ConfigError(f"{results} exists without its config.json: choose another --out, or --force")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(identity, indent=1))


def evaluate(lm: DiffusionLM, cfg: EvalConfig, out: Path, model_name: str, force: bool = False, progress: bool = True,
             log=print) -> dict:
    """Run (or resume) the evaluation; returns the summary also written to OUT/summary.json."""
    from tqdm import tqdm

    settings = cfg.all_settings
    if cfg.frontier:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--frontier draws a PNG and needs matplotlib: pip install 'ar2dlm[plot]'")
    if cfg.task == "humaneval":  # model-written code runs: refuse before decoding when nothing would contain it
        require_isolation(cfg.unsandboxed)
    problems = tasks.load_problems(cfg.task, cfg.form)[:cfg.limit]
    chat = any(p.chat for p in problems)
    if chat and not getattr(lm.tokenizer, "chat_template", None):
        raise ConfigError(f"the {cfg.form} form of {cfg.task} needs a chat template, and {model_name}'s tokenizer "
                          f"has none" + (": use --form raw" if cfg.task == "humaneval" else ""))
    stops = tasks.stops_for(cfg.task, cfg.form)
    decode = {s: lm.decode_config(max_new_tokens=cfg.max_new_tokens, stop=stops, **decode_settings(s, cfg))
              for s in settings}  # every setting is validated before anything is decoded
    identity = cfg.identity(model_name)
    files.check_not_input(out, [lm.source], "output folder", replaces=False)  # its files go into OUT
    check_resume(out, identity, force)
    results = out / "results.jsonl"
    records = read_results(results)
    done = {(r["setting"], r["problem"], r["sample"]) for r in records}
    ids = lm.encode([p.prompt for p in problems], chat=chat)
    total = sum(len(problems) * samples_of(s, cfg) for s in settings)
    limits = cfg.sandbox_limits()
    lock = threading.Lock()
    bar = tqdm(total=total, initial=len(done & {(s, p.id, j) for s in settings for p in problems
                                                  for j in range(samples_of(s, cfg))}),
               desc=f"{cfg.task} ({cfg.form})", unit="answer", disable=not progress, dynamic_ncols=True)

    def finish(record: dict, problem: tasks.Problem, answer: str):
        record.update(score_answer(problem, answer, cfg, limits))
        with lock, open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
            records.append(record)
            bar.update(1)

    # one short warm-up decode per kind (AR loop, drafting): the first chunk's timings carry no one-off costs
    for ar in dict.fromkeys(decode[s].ar for s in settings):
        first = next(s for s in settings if decode[s].ar == ar)
        generate(lm, [ids[0][:64]], dataclasses.replace(decode[first], max_new_tokens=8))
    start = time.perf_counter()
    pool = ThreadPoolExecutor(cfg.workers)
    try:
        futures = []
        for c0 in range(0, len(problems), cfg.batch_size):
            chunk = list(range(c0, min(c0 + cfg.batch_size, len(problems))))
            for s in settings:
                for j in range(samples_of(s, cfg)):
                    todo = [i for i in chunk if (s, problems[i].id, j) not in done]
                    if not todo:
                        continue
                    dc = decode[s]
                    if not dc.greedy:
                        dc = dataclasses.replace(dc, seed=_seed(cfg.seed, s, j, c0))
                    t0 = time.perf_counter()
                    gens = generate(lm, [ids[i] for i in todo], dc)
                    seconds = time.perf_counter() - t0
                    for i, g in zip(todo, gens):
                        record = {"setting": s, "problem": problems[i].id, "sample": j, "form": cfg.form,
                                  "answer": g.text, "finish_reason": g.finish_reason,
                                  "new_tokens": g.stats.new_tokens, "forwards": g.stats.forwards,
                                  "accepted": {str(k): v for k, v in g.stats.accepted.items()},
                                  "seconds": seconds / len(todo)}
                        futures.append(pool.submit(finish, record, problems[i], g.text))
            for f in futures:  # surface a scorer's exception now, not at the end
                if f.done():
                    f.result()
        for f in futures:
            f.result()
    except BaseException:  # Ctrl-C: answers already scored are in results.jsonl; the rest is redone on resume
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    pool.shutdown()
    bar.close()
    summary = {"task": cfg.task, "form": cfg.form, "model": model_name, "problems": len(problems),
               "identity": identity, "wall_seconds": time.perf_counter() - start,
               "settings": summarize(records, cfg, settings)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.frontier:
        summary["png"] = str(plot_frontier(summary["settings"], out / "frontier.png",
                                           f"{model_name} · {cfg.task} ({cfg.form}) · {len(problems)} problems"))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _seed(seed: int, setting: str, sample: int, chunk: int) -> int:
    """A seed per (setting, sample, chunk), independent of run order: a chunk redone whole after an interruption
    draws what it would have drawn in one run (a chunk redone in part decodes a smaller batch, so may not)."""
    h = hashlib.sha256(f"{seed}/{setting}/{sample}/{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1
