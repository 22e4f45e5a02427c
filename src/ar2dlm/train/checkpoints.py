"""A run's files: checkpoints to resume from, and the final model.

    run_dir/config.yaml                 the run's settings
    run_dir/checkpoints/step-N/         trainable.safetensors, state.pt (optimiser, scheduler, RNG), progress.json
    run_dir/final/                      an adapter folder (drafting / lora) or a converted checkpoint (full)

A checkpoint is written to a temporary folder and renamed, so an interrupted
save never leaves a half-written step-N behind.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import ConfigError
from ..model.lm import DiffusionLM
from .config import TrainConfig
from .run import Run


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Before any loading: run_dir is a directory (or new), and resume matches what it holds."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory; choose another run_dir")
    if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir / 'checkpoints'} is a file, not a directory; choose another run_dir")
    found = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if resume and found is None:
        raise ConfigError(f"resume=True but {run_dir / 'checkpoints'} holds no checkpoint to resume from: check "
                          f"run_dir ({run_dir}), or drop resume=True to start a new run")
    if not resume and found is not None:
        raise ConfigError(f"{run_dir} already has checkpoints: pass resume=True to continue, or use a new run_dir")


def trainable_state(lm: DiffusionLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in lm.model.named_parameters() if p.requires_grad}


def save_checkpoint(run: Run) -> Path | None:
    """Atomic: write checkpoints/.tmp-step-N, then rename to checkpoints/step-N; keep the last k."""
    if not run.accelerator.is_main_process:
        return None
    root = run.run_dir / "checkpoints"
    final = root / f"step-{run.step:08d}"
    tmp = root / f".tmp-step-{run.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(run.lm), tmp / "trainable.safetensors")
    torch.save({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": run.step, "tokens": run.tokens,
                                                   "elapsed": run.elapsed}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-run.cfg.checkpoint.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(run: Run, path: Path) -> None:
    try:
        weights = load_file(path / "trainable.safetensors")
        state = torch.load(path / "state.pt", weights_only=False)
        progress = json.loads((path / "progress.json").read_text())
    except (OSError, RuntimeError, json.JSONDecodeError, Exception) as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an earlier one") from e
    params = dict(run.lm.model.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(weights))
    if missing:
        raise ConfigError(f"checkpoint {path} does not match this config (missing {missing[:3]}...)")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    run.step, run.tokens, run.elapsed = progress["step"], progress["tokens"], progress["elapsed"]


def save_final(run: Run) -> Path:
    """run_dir/final: an adapter folder (drafting / lora) or a full converted checkpoint (full)."""
    out = run.run_dir / "final"
    tmp = run.run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    lm, cfg = run.lm, run.cfg
    settings = lm.settings
    if cfg.adapter.kind == "full":
        lm.model.save_pretrained(tmp)
    else:  # the mask row travels as a trainable-token delta; the base embedding is rebuilt on load
        lm.model.save_pretrained(tmp, save_embedding_layers=False)
    lm.tokenizer.save_pretrained(tmp)
    if cfg.adapter.kind != "full" and extended(cfg):  # the changed base config travels with the adapter
        base = lm.model.get_base_model()
        base.save_pretrained(tmp / "base")
        lm.tokenizer.save_pretrained(tmp / "base")
        settings = dataclasses.replace(settings, base_model="base")
    settings.save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def extended(cfg: TrainConfig) -> bool:
    m = cfg.model
    return bool(m.rope_theta or m.rope_scaling_factor or m.max_position_embeddings)
