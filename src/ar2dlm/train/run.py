"""`Run`: the state of one training run, shared by the loop (trainer.py), its checkpoints and its evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..model.lm import DiffusionLM
from .config import TrainConfig
from .data import Rows


@dataclasses.dataclass
class Run:
    cfg: TrainConfig
    lm: DiffusionLM
    train_rows: Rows
    heldout_rows: Rows
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    accelerator: object
    run_dir: Path
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
