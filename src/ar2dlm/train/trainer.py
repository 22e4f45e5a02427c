"""The one training loop: TiDAR objective, accelerate (CPU, DDP, FSDP, DeepSpeed), exact resume.

    ar2dlm train --config recipes/smollm2-135m-cpu.yaml [--optim.lr 1e-4 ...]
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m ar2dlm train --config ...

Reading order: `setup` (model, adapter, data, optimiser) -> `train` (the
loop) -> `micro_batch` / `drafting_loss` (one forward). Beside it:
`heldout.py` (evaluation during training) and `checkpoints.py` (resume, the
final model).

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
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from ..core.errors import ConfigError
from ..model import adapter as adapters
from ..model.bundled import resolve_base
from ..model.checkpoint import base_model_name
from ..model.convert import add_mask_token, load_base
from ..model.lm import DiffusionLM
from ..model.settings import SETTINGS_FILE, DiffusionConfig
from ..nn import predecessors
from . import data as data_mod
from . import objective
from .checkpoints import check_run_dir, latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from .config import TrainConfig
from .heldout import heldout_metrics
from .run import Run


# ---------------------------------------------------------------------------- setup
def model_to_train(cfg: TrainConfig) -> DiffusionLM:
    """The converted model to train (a base is converted in memory), with the objective's settings.

    A converted checkpoint loads through `DiffusionLM.from_pretrained`, a base
    through `convert.load_base`: both read their files through `checkpoint`.
    """
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
    lm = model_to_train(cfg)
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


# ---------------------------------------------------------------------------- forward
def drafting_loss(lm: DiffusionLM, batch: objective.TrainingBatch, select: bool = True, slot_decay: float = 1.0):
    """Gated adapter: the clean half only fills the KV cache (base weights, no grad, no logits);
    the slot half attends to it. Returns (diff_loss, slot_logits [b, T, V], slot indices [b, T]).
    slot_decay weights the slot at index i of its block by slot_decay**i (`objective.slot_weights`).

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
    weights = objective.slot_weights(batch.slot_place, slot_decay)  # [b, S] or None
    if predecessors.has_mixers(lm.model):
        with predecessors.predecessors(lm.model, batch.predecessors):
            logits = lm.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots,
                                logits_to_keep=S)
        idx = torch.arange(S, device=logits.device).expand(logits.shape[0], S)
        return objective.weighted_ce(logits, batch.labels[:, S:], weights), logits, idx
    cache = DynamicCache()
    with torch.no_grad(), _adapter_off(lm):
        lm.forward(batch.input_ids[:, :S], batch.position_ids[:, :S], batch.attention_mask[:, :S, :S],
                   batch.mask_slots[:, :S], cache, logits_to_keep=1)
    ids, pos, mask, labels = (batch.input_ids[:, S:], batch.position_ids[:, S:], batch.attention_mask[:, S:],
                              batch.labels[:, S:])
    idx = torch.arange(S, device=ids.device).expand(ids.shape[0], S)
    if select:
        ids, pos, mask, labels, idx = _select_slots(ids, pos, mask, labels, S)
    logits = lm.forward(ids, pos, mask, torch.ones_like(ids, dtype=torch.bool), cache,
                        cache_positions=batch.position_ids[:, :S])  # what a sliding layer's window is measured by
    return objective.weighted_ce(logits, labels, None if weights is None else weights.gather(1, idx)), logits, idx


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


def _adapter_off(lm: DiffusionLM):
    """peft's disable_adapter() when there is one (the clean rows run base weights either way)."""
    return lm.model.disable_adapter() if hasattr(lm.model, "disable_adapter") else contextlib.nullcontext()


def micro_batch(run: Run, batch: objective.TrainingBatch) -> dict[str, torch.Tensor]:
    """Loss of one micro-batch: diffusion only for the drafting adapter, (alpha AR + diff)/(1+alpha) else."""
    cfg, lm = run.cfg, run.lm
    batch = batch.to(run.accelerator.device)
    with _autocast(run):
        if cfg.adapter.kind == "drafting":
            diff, _, _ = drafting_loss(lm, batch, slot_decay=cfg.objective.slot_decay)
            return {"loss": diff, "diff_loss": diff}
        loss, ar, diff = objective.loss(lm, batch, cfg.objective.loss_weight, cfg.objective.slot_decay)
        return {"loss": loss, "ar_loss": ar, "diff_loss": diff}


def _autocast(run: Run):
    return torch.autocast(device_type=run.accelerator.device.type, dtype=torch.bfloat16,
                          enabled=run.cfg.model.precision == "bf16")


# ---------------------------------------------------------------------------- the loop
class _Stop:
    """SIGINT / SIGTERM ask for a clean stop: the loop saves a checkpoint, then the signal goes on to the handler
    that was there before (the CLI's: exit 130 / 143; else Python's: KeyboardInterrupt, or termination).
    A signal the process was started ignoring (`nohup`, a shell's `&` ignores SIGINT) stays ignored: catching it
    would stop the run, and the ignored signal raised again after the checkpoint would let it exit 0, as if done."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(s) is not signal.SIG_IGN}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def train(cfg: TrainConfig, resume: bool = False) -> Run:
    from tqdm import tqdm

    check_run_dir(Path(cfg.run_dir), resume, cfg)
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
        _append(acc, metrics, {"step": 0, "tokens": 0, "elapsed": 0.0, **heldout_metrics(run)})
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
                                       **heldout_metrics(run)})
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
        signal.raise_signal(stop.signum)  # the run was interrupted, not done: `train && merge` must stop
        return run
    if acc.is_main_process:
        if latest_checkpoint(run.run_dir) is None or not latest_checkpoint(run.run_dir).name.endswith(
                f"{run.step:08d}"):
            save_checkpoint(run)
        if not (cfg.eval.every_steps and run.step % cfg.eval.every_steps == 0):
            _append(acc, metrics, {"step": run.step, "tokens": run.tokens, "elapsed": round(run.elapsed, 2),
                                   **heldout_metrics(run)})
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
