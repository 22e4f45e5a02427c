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

from ..core import files
from ..core.errors import ConfigError
from ..model.bundled import is_bundled, resolve_base
from ..model.lm import DiffusionLM
from .config import TrainConfig
from .data import expand_paths
from .run import Run

MAY_CHANGE_ON_RESUME = ("schedule", "checkpoint", "eval")
"""Sections a resumed run may change: how many steps and the learning-rate schedule over them, how often it saves,
how often and on how many rows it logs. Every other setting (model, data, objective, adapter, optim, seed, stage)
defines what the checkpoint is, so a change of one is refused, naming it (README: "Resuming")."""


def check_run_dir(run_dir: Path, resume: bool, cfg: TrainConfig | None = None) -> None:
    """Before any loading: run_dir is a directory (or new), and resume matches what it holds (with `cfg`: the
    settings of the run it continues, `check_resume`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory; choose another run_dir", field="run_dir")
    if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir / 'checkpoints'} is a file, not a directory; choose another run_dir",
                          field="run_dir")
    found = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if resume and found is None:
        raise ConfigError(f"resume=True but {run_dir / 'checkpoints'} holds no checkpoint to resume from: check "
                          f"run_dir ({run_dir}), or drop resume=True to start a new run")
    if not resume and found is not None:
        raise ConfigError(f"{run_dir} already has checkpoints: pass resume=True to continue, or use a new run_dir")
    if cfg is not None:
        check_run_outputs(run_dir, cfg)
    if resume and cfg is not None:
        check_resume(run_dir, cfg)


def check_run_outputs(run_dir: Path, cfg: TrainConfig) -> None:
    """What a run writes is none of what it reads: run_dir is not (inside) the model or a data file, and the
    folders it replaces (checkpoints/, final/) do not hold one."""
    model = resolve_base(cfg.model.path) if is_bundled(cfg.model.path) else Path(cfg.model.path).expanduser()
    inputs = [model, *expand_paths(cfg.data.train), *expand_paths(cfg.data.heldout)]
    files.check_not_input(run_dir, inputs, "run_dir", replaces=False, field="run_dir")
    for sub in ("checkpoints", "final"):
        files.check_not_input(run_dir / sub, inputs, "run_dir", field="run_dir")


def check_resume(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that change what the run is (compared with its own config.yaml)."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"resume=True: {saved_file} (the settings the run was started with) is missing, so the "
                          f"checkpoints of {run_dir} cannot be checked against this config; start a new run_dir",
                          field="run_dir")
    saved, given = _flat(TrainConfig.from_yaml(saved_file).to_dict()), _flat(cfg.to_dict())
    for name in sorted(set(saved) | set(given)):
        if name == "run_dir" or name.split(".")[0] in MAY_CHANGE_ON_RESUME or saved.get(name) == given.get(name):
            continue
        raise ConfigError(f"resume=True: {name} is {given.get(name)!r}, but the run in {run_dir} was started with "
                          f"{name} {saved.get(name)!r} ({saved_file}); its checkpoints hold that run. Only "
                          f"{', '.join(s + '.*' for s in MAY_CHANGE_ON_RESUME)} may change on resume: restore "
                          f"{name}, or start a new run_dir", field=name)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    wrong = [f"{n} {tuple(w.shape)} vs {tuple(params[n].shape) if n in params else 'none'}" for n, w in weights.items()
             if n not in params or params[n].shape != w.shape][:3]
    if wrong:
        raise ConfigError(f"checkpoint {path} does not match this config (in the checkpoint vs the model: "
                          f"{'; '.join(wrong)}); resume with the settings the run was started with")
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
