"""The one training loop: TiDAR objective, accelerate (CPU, DDP, FSDP, DeepSpeed), exact resume.

    ar2dlm train --config recipes/smollm2-135m-cpu.yaml [--optim.lr 1e-4 ...]
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m ar2dlm train --config ...

Reading order: `setup` (model, adapter, data, optimiser) -> `train` (the
loop) -> `micro_batch` / `drafting_loss` (one forward) -> `evaluate` ->
`save_checkpoint` / `load_checkpoint`.

Determinism: global row k of the run (k = step * rows_per_step + ...) is row
perm_e[k mod N] of epoch e = k div N, and its block offset and masking come
from a generator seeded by (seed, k). So the rows a step sees, and how they
are masked, depend only on the step; resuming needs the step, the weights,
the optimiser, the scheduler and nothing else; and 2 processes x 1
micro-batch see the rows of 1 process x 2 micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from ..model import adapter as adapters
from . import data as data_mod
from ..nn import predecessors as mixing
from . import objective
from ..core.errors import ConfigError
from ..model.settings import SETTINGS_FILE, DiffusionConfig
from .config import TrainConfig
from ..model.lm import DiffusionLM


# ---------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Run:
    cfg: TrainConfig
    lm: DiffusionLM
    train_rows: data_mod.Rows
    heldout_rows: data_mod.Rows
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    accelerator: object
    run_dir: Path
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def load_model(cfg: TrainConfig) -> DiffusionLM:
    """The converted model to train (a base is converted in memory), with the objective's settings.

    A converted checkpoint loads through `DiffusionLM.from_pretrained`, a base
    through `convert.load_base`: both read their files through `checkpoint`.
    """
    from ..model.bundled import resolve_base
    from ..model.checkpoint import base_model_name
    from ..model.convert import add_mask_token, load_base

    path = resolve_base(cfg.model.path)
    if (path / SETTINGS_FILE).exists():
        lm = DiffusionLM.from_pretrained(path)
        if lm.settings.adapter:
            raise ConfigError(f"model.path {path} is an adapter folder; train from its base, or merge it first")
    else:
        model, tok = load_base(cfg.model.path, dtype=torch.float32)
        lm = DiffusionLM(model, tok, DiffusionConfig(mask_token_id=add_mask_token(model, tok)))
    o = cfg.objective
    lm.settings = dataclasses.replace(lm.settings, block_size=o.block_size, masking=o.masking,
                                      half_life_ratio=o.half_life_ratio, loss_weight=o.loss_weight,
                                      base_model=base_model_name(cfg.model.path))
    extend_context(lm.model, cfg)
    lm.model.float()
    return lm


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


def extend_context(model, cfg: TrainConfig) -> bool:
    """Write new RoPE base / scaling / context length into the config and rebuild the rotary tables."""
    m = cfg.model
    if not (m.rope_theta or m.rope_scaling_factor or m.max_position_embeddings):
        return False
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope and (m.rope_theta or m.rope_scaling_factor):
        raise ConfigError(f"model.rope_theta / rope_scaling_factor: {config.model_type} has no rotary embeddings")
    if m.rope_theta:
        rope["rope_theta"] = m.rope_theta
    if m.rope_scaling_factor:
        rope.update(rope_type="linear", factor=m.rope_scaling_factor)
    if rope:
        config.rope_parameters = rope
    if m.max_position_embeddings:
        config.max_position_embeddings = m.max_position_embeddings
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=config))
    return True


def setup(cfg: TrainConfig) -> Run:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)  # adapter init
    lm = load_model(cfg)
    if cfg.model.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable()
    adapters.attach(lm, cfg.adapter)
    with accelerator.main_process_first():
        train_rows, heldout_rows = data_mod.load(cfg.data, lm.tokenizer)
    groups = adapters.trainable_groups(lm.model, cfg.adapter, cfg.optim.lr, cfg.optim.mask_row_lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    lm.model.train()
    if accelerator.num_processes > 1:  # DDP / FSDP / DeepSpeed wrap the model (and shard the optimiser)
        lm.wrapped, optimizer = accelerator.prepare(lm.model, optimizer)
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(run_dir / "config.yaml")
    return Run(cfg, lm, train_rows, heldout_rows, optimizer, scheduler, accelerator, run_dir)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to min_lr_ratio."""
    s = cfg.schedule
    warm = max(1, round(s.warmup_fraction * s.max_steps)) if s.warmup_fraction > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, s.max_steps - warm)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------- batches
def rows_for(run: Run, step: int, micro: int) -> list[int]:
    """Global row numbers of (step, micro-batch) on this process (see module docstring)."""
    cfg, acc = run.cfg, run.accelerator
    B, A, W = cfg.optim.batch_size, cfg.optim.grad_accum, acc.num_processes
    first = step * B * A * W + (micro * W + acc.process_index) * B
    return list(range(first, first + B))


def make_batch(run: Run, global_rows: list[int]) -> tuple[objective.TrainingBatch, torch.Tensor]:
    """Doubled TiDAR batch for these global rows (deterministic per row); also the loss mask [b, S]."""
    cfg, rows = run.cfg, run.train_rows
    N = len(rows)
    parts, loss_masks = [], []
    for k in global_rows:
        epoch, i = divmod(k, N)
        r = int(_epoch_order(cfg.seed, epoch, N)[i])
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * k + 1)
        B = cfg.objective.block_size
        offset = int(torch.randint(0, B, (1,), generator=g)) if cfg.objective.random_offset else 0
        parts.append(objective.build_batch(rows.tokens[r:r + 1], run.lm.settings, rows.doc_ids[r:r + 1],
                                           rows.loss_mask[r:r + 1], offset, g))
        loss_masks.append(rows.loss_mask[r:r + 1])
    return _cat(parts), torch.cat(loss_masks)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The row order of one epoch (drawn once, not once per row)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _cat(parts: list[objective.TrainingBatch]) -> objective.TrainingBatch:
    return objective.TrainingBatch(*(torch.cat([getattr(p, f.name) for p in parts])
                                     for f in dataclasses.fields(objective.TrainingBatch)))


def _to(batch: objective.TrainingBatch, device) -> objective.TrainingBatch:
    return objective.TrainingBatch(*(getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)))


# ---------------------------------------------------------------------------- forward
def drafting_loss(lm: DiffusionLM, batch: objective.TrainingBatch, select: bool = True):
    """Gated adapter: the clean half only fills the KV cache (base weights, no grad, no logits);
    the slot half attends to it. Returns (diff_loss, slot_logits [b, T, V], slot indices [b, T]).

    select=True runs only the slots a target slot can see (its own block):
    slots over prompt tokens without targets cost nothing, and the loss is
    exactly that of running every slot.

    Models whose layers read earlier rows (ZAYA1's CCA, `nn/predecessors.py`) run the
    doubled sequence in one forward instead: the first slot of each block
    reads the conv state after its own clean predecessor, which a cache
    filled by the whole clean half no longer holds. The gate keeps the clean
    rows on base weights there too, so the loss is the same function.
    """
    S = batch.input_ids.shape[1] // 2
    if mixing.has_mixers(lm.model):
        with mixing.predecessors(lm.model, batch.predecessors):
            logits = lm.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots,
                                logits_to_keep=S)
        idx = torch.arange(S, device=logits.device).expand(logits.shape[0], S)
        return objective._mean_ce(logits, batch.labels[:, S:]), logits, idx
    cache = DynamicCache()
    with torch.no_grad(), _adapter_off(lm):
        lm.forward(batch.input_ids[:, :S], batch.position_ids[:, :S], batch.attention_mask[:, :S, :S],
                   batch.mask_slots[:, :S], cache, logits_to_keep=1)
    ids, pos, mask, labels = (batch.input_ids[:, S:], batch.position_ids[:, S:], batch.attention_mask[:, S:],
                              batch.labels[:, S:])
    idx = torch.arange(S, device=ids.device).expand(ids.shape[0], S)
    if select:
        ids, pos, mask, labels, idx = _select_slots(ids, pos, mask, labels, S)
    logits = lm.forward(ids, pos, mask, torch.ones_like(ids, dtype=torch.bool), cache)
    return objective._mean_ce(logits, labels), logits, idx


def _select_slots(ids, pos, mask, labels, S):
    """Keep target slots and the slots they attend to; pad rows to the longest with inert slots.

    ids, pos, labels: [b, S]; mask: [b, S, 2S] (slot rows over clean | slot keys).
    Returns the same over T kept slots (mask [b, T, S + T]) and their indices [b, T].
    """
    target = labels != objective.IGNORE  # [b, S]
    keep = target | (target[:, :, None] & mask[:, :, S:]).any(1)  # [b, S]
    T = max(int(keep.sum(1).max()), 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :T]  # kept first, in order
    real = keep.gather(1, order)  # [b, T]; False = padding
    g = lambda x: x.gather(1, order)  # noqa: E731
    rows = mask.gather(1, order[:, :, None].expand(-1, -1, mask.shape[2]))  # [b, T, 2S]
    slot_cols = rows[:, :, S:].gather(2, order[:, None, :].expand(-1, T, -1)) & real[:, None, :]  # [b, T, T]
    slot_cols |= torch.eye(T, dtype=torch.bool, device=ids.device) & ~real[:, :, None]  # padding sees itself
    new_mask = torch.cat([rows[:, :, :S] & real[:, :, None], slot_cols], 2)
    new_labels = torch.where(real, g(labels), objective.IGNORE)
    return g(ids), g(pos), new_mask, new_labels, order


def _adapter_off(lm):
    """peft's disable_adapter() when there is one (the clean rows run base weights either way)."""
    return lm.model.disable_adapter() if hasattr(lm.model, "disable_adapter") else contextlib.nullcontext()


def micro_batch(run: Run, batch: objective.TrainingBatch) -> dict[str, torch.Tensor]:
    """Loss of one micro-batch: diffusion only for the drafting adapter, (alpha AR + diff)/(1+alpha) else."""
    cfg, lm = run.cfg, run.lm
    batch = _to(batch, run.accelerator.device)
    with _autocast(run):
        if cfg.adapter.kind == "drafting":
            diff, _, _ = drafting_loss(lm, batch)
            return {"loss": diff, "diff_loss": diff}
        loss, ar, diff = objective.loss(lm, batch, cfg.objective.loss_weight)
        return {"loss": loss, "ar_loss": ar, "diff_loss": diff}


def _autocast(run: Run):
    return torch.autocast(device_type=run.accelerator.device.type, dtype=torch.bfloat16,
                          enabled=run.cfg.model.precision == "bf16")


# ---------------------------------------------------------------------------- evaluation
def estimated_tpf(slot_logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor,
                  block_size: int, mask_token_id: int | None = None) -> tuple[float, int]:
    """Mean accepted length under greedy verification, from one training-layout forward (offset 0).

    On held-out self-distilled rows the tokens are the AR head's own greedy
    path, so a slot whose argmax equals the token would be accepted. Per block
    fully inside one document's targets: 1 (its first token is the AR's own)
    + the number of leading slots 2..B that match. Returns (mean, blocks).
    """
    from ..decode.verify import exclude_mask_token

    b, S = tokens.shape
    n = S // block_size * block_size
    hit = exclude_mask_token(slot_logits[:, :n].float(), mask_token_id).argmax(-1) == tokens[:, :n]  # [b, n]
    hit = hit.view(b, -1, block_size)
    accepted = 1 + hit[..., 1:].long().cumprod(-1).sum(-1)  # [b, n/B]
    docs = doc_ids[:, :n].view(b, -1, block_size)
    ok = loss_mask[:, :n].view(b, -1, block_size).all(-1) & (docs == docs[..., :1]).all(-1)
    count = int(ok.sum())
    return (float(accepted[ok].float().mean()) if count else float("nan")), count


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Held-out AR loss, diffusion loss (full masking), estimated TPF, AR greedy agreement with the data.

    On self-distilled data `ar_agreement` is the share of target tokens the
    AR head still predicts (1.0 for the drafting adapter, by construction).
    """
    lm, rows, cfg = run.lm, run.heldout_rows, run.cfg
    if len(rows) == 0:
        return {}
    wrapped, lm.wrapped = lm.wrapped, None  # no collectives: processes may evaluate alone
    lm.model.eval()
    full = dataclasses.replace(lm.settings, masking="full")
    ar_sum = diff_sum = 0.0
    ar_n = diff_n = 0
    tpf_sum, blocks, agree, agree_n = 0.0, 0, 0, 0
    n = min(len(rows), cfg.eval.max_rows)
    device = run.accelerator.device
    for start in range(0, n, cfg.optim.batch_size):
        sl = slice(start, min(n, start + cfg.optim.batch_size))
        toks, docs, lmask = rows.tokens[sl], rows.doc_ids[sl], rows.loss_mask[sl]
        batch = _to(objective.build_batch(toks, full, docs, lmask, 0), device)
        S = toks.shape[1]
        # fp32 like the decoder: bf16 would flip some argmaxes of the AR path the data holds
        logits = lm.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots).float()
        lab = batch.labels
        ar_keep, diff_keep = lab[:, :S] != -100, lab[:, S:] != -100
        ar_sum += float(F.cross_entropy(logits[:, :S][ar_keep], lab[:, :S][ar_keep], reduction="sum"))
        diff_sum += float(F.cross_entropy(logits[:, S:][diff_keep], lab[:, S:][diff_keep], reduction="sum"))
        ar_n, diff_n = ar_n + int(ar_keep.sum()), diff_n + int(diff_keep.sum())
        agree += int((logits[:, :S].argmax(-1) == lab[:, :S])[ar_keep].sum())
        agree_n += int(ar_keep.sum())
        tpf, count = estimated_tpf(logits[:, S:], toks.to(device), lmask.to(device), docs.to(device),
                                   cfg.objective.block_size, lm.mask_token_id)
        if count:
            tpf_sum, blocks = tpf_sum + tpf * count, blocks + count
    lm.model.train()
    lm.wrapped = wrapped
    return {"eval_ar_loss": ar_sum / max(ar_n, 1), "eval_diff_loss": diff_sum / max(diff_n, 1),
            "est_tpf": tpf_sum / blocks if blocks else float("nan"), "eval_blocks": blocks,
            "ar_agreement": agree / max(agree_n, 1)}


# ---------------------------------------------------------------------------- checkpoints
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


# ---------------------------------------------------------------------------- the loop
class _Stop:
    """SIGINT / SIGTERM ask for a clean stop: the loop saves a checkpoint and exits."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def train(cfg: TrainConfig, resume: bool = False) -> Run:
    from tqdm import tqdm

    check_run_dir(Path(cfg.run_dir), resume)
    run = setup(cfg)
    acc = run.accelerator
    if resume:
        ckpt = latest_checkpoint(run.run_dir)
        load_checkpoint(run, ckpt)
        acc.print(f"resumed from {ckpt} (step {run.step})")
    metrics = run.run_dir / "metrics.jsonl"
    stop = _Stop()
    S, B = cfg.data.seq_len, cfg.optim.batch_size
    tokens_per_step = S * B * cfg.optim.grad_accum * acc.num_processes
    bar = tqdm(total=cfg.schedule.max_steps, initial=run.step, desc=f"train[{cfg.adapter.kind}]",
               disable=not acc.is_main_process, dynamic_ncols=True)
    last_save, t0 = time.time(), time.time() - run.elapsed
    if run.step == 0 and cfg.eval.every_steps:  # the curve starts at the untrained drafter
        _append(acc, metrics, {"step": 0, "tokens": 0, "elapsed": 0.0, **evaluate(run)})
    try:
        while run.step < cfg.schedule.max_steps and not stop.requested:
            logs = {}
            for micro in range(cfg.optim.grad_accum):
                batch, _ = make_batch(run, rows_for(run, run.step, micro))
                sync = micro == cfg.optim.grad_accum - 1
                ctx = acc.no_sync(lm_module(run)) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
                with ctx:
                    out = micro_batch(run, batch)
                    acc.backward(out["loss"] / cfg.optim.grad_accum)
                for k, v in out.items():
                    logs[k] = logs.get(k, 0.0) + float(v.detach()) / cfg.optim.grad_accum
            if cfg.optim.grad_clip > 0:
                params = [p for p in lm_module(run).parameters() if p.requires_grad]
                logs["grad_norm"] = float(acc.clip_grad_norm_(params, cfg.optim.grad_clip))
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.tokens += tokens_per_step
            run.elapsed = time.time() - t0
            logs = {k: _mean_across(acc, v) for k, v in logs.items()}
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{run.tokens / max(run.elapsed, 1e-9):.0f}")
            record = {"step": run.step, "tokens": run.tokens, "elapsed": round(run.elapsed, 2),
                      "lr": run.scheduler.get_last_lr()[0], **{k: round(v, 5) for k, v in logs.items()}}
            if run.step % max(cfg.eval.log_every, 1) == 0 or run.step == 1:
                _append(acc, metrics, record)
            if cfg.eval.every_steps and run.step % cfg.eval.every_steps == 0:
                _append(acc, metrics, {"step": run.step, "tokens": run.tokens, "elapsed": round(run.elapsed, 2),
                                       **evaluate(run)})
            minutes = cfg.checkpoint.every_minutes
            if run.step % cfg.checkpoint.every_steps == 0 or (minutes and time.time() - last_save > 60 * minutes):
                save_checkpoint(run)
                last_save = time.time()
    finally:
        stop.restore()
        bar.close()
    acc.wait_for_everyone()
    run.lm.wrapped = None
    if stop.requested:
        save_checkpoint(run)
        acc.print(f"\nstopped at step {run.step}: checkpoint saved; continue with resume (ar2dlm train --resume)")
        return run
    if acc.is_main_process:
        if latest_checkpoint(run.run_dir) is None or not latest_checkpoint(run.run_dir).name.endswith(
                f"{run.step:08d}"):
            save_checkpoint(run)
        if not (cfg.eval.every_steps and run.step % cfg.eval.every_steps == 0):
            _append(acc, metrics, {"step": run.step, "tokens": run.tokens, "elapsed": round(run.elapsed, 2),
                                   **evaluate(run)})
        out = save_final(run)
        acc.print(f"done: {run.step} steps, {run.tokens} tokens, {run.elapsed / 60:.1f} min -> {out}")
    return run


def lm_module(run: Run):
    return run.lm.wrapped or run.lm.model


def _mean_across(acc, value: float) -> float:
    if acc.num_processes == 1:
        return value
    t = torch.tensor(value, device=acc.device)
    return float(acc.reduce(t, reduction="mean"))


def _append(acc, path: Path, record: dict) -> None:
    if acc.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def main_train(config: str, overrides: list[str], resume: bool) -> int:
    cfg = TrainConfig.from_yaml(config, overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg, resume=resume)
    return 0


if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1], sys.argv[2:], False))
