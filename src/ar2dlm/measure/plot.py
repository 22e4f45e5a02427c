"""`ar2dlm plot RUN_DIR`: PNG curves of a run's metrics.jsonl (needs matplotlib: ar2dlm[plot])."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.errors import ConfigError
from ..train.data import iter_jsonl


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: is {run_dir} a training run folder?")
    train, evals = [], []
    for _, rec in iter_jsonl(path):
        if isinstance(rec, dict):
            (evals if "est_tpf" in rec else train).append(rec)
    train = [r for r in train if _number(r.get("step")) and any(_number(r.get(k)) for k in LOSSES)]
    evals = [r for r in evals if all(_number(r.get(k)) for k in EVAL_KEYS)]
    if not train and not evals:  # a blank PNG would look like a success
        raise ConfigError(f"{path} holds no numeric training record (step with {' / '.join(LOSSES)}) and no "
                          f"evaluation record: nothing to plot; is it a training run's metrics.jsonl?")
    return train, evals


LOSSES = ("loss", "ar_loss", "diff_loss")
EVAL_KEYS = ("elapsed", "tokens", "est_tpf", "eval_ar_loss", "eval_diff_loss")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png and eval.png into run_dir; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("ar2dlm plot needs matplotlib: pip install 'ar2dlm[plot]'") from e
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    out = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in LOSSES:
            pts = [(r["step"], r[key]) for r in train if _number(r.get(key))]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.set_title(f"training loss: {run_dir.name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=110)
        out.append(run_dir / "loss.png")
        plt.close(fig)
    if evals:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        minutes = [r["elapsed"] / 60 for r in evals]
        a1.plot(minutes, [r["est_tpf"] for r in evals], marker="o")
        a1.set_xlabel("training minutes")
        a1.set_ylabel("estimated TPF (held-out)")
        a1.set_title("estimated tokens per forward")
        for key in ("eval_ar_loss", "eval_diff_loss"):
            a2.plot([r["tokens"] for r in evals], [r[key] for r in evals], marker="o", label=key)
        a2.set_xlabel("clean training tokens")
        a2.set_ylabel("held-out cross-entropy")
        a2.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "eval.png", dpi=110)
        out.append(run_dir / "eval.png")
        plt.close(fig)
    return out
