"""`TrainConfig`: everything a training run needs, in sections; `recipes/*.yaml` are serialized TrainConfigs.

`ar2dlm train --config R.yaml --section.field VALUE` overrides any field from the command line.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from ..core.files import read_text, write_text
from ..core.validation import build, check, check_types, plain
from ..decode.config import DecodeConfig
from ..model.settings import AdapterSection, DiffusionConfig

DATA_FORMATS = ("auto", "text", "jsonl", "parquet", "datasets", "distilled")


@dataclass(frozen=True)
class ModelSection:
    path: str = "smollm2-135m"
    """Converted checkpoint, or a base (HF dir / bundled name) converted on the fly with objective.block_size."""
    precision: str = "bf16"
    """bf16 (autocast; ~1.5x faster on CPUs with avx512_bf16) or fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    rope_theta: float = 0.0
    """Context extension: new RoPE base written into the saved config (0 = keep)."""
    rope_scaling_factor: float = 0.0
    """Context extension: linear RoPE scaling factor written into the saved config (0 = none)."""
    max_position_embeddings: int = 0
    """Context extension: new context length written into the saved config (0 = keep)."""

    def __post_init__(self):
        check_types(self)
        check(self.precision in ("bf16", "fp32"), f"model.precision must be bf16 or fp32, got {self.precision!r}",
              "precision")
        for name in ("rope_theta", "rope_scaling_factor", "max_position_embeddings"):
            check(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)}", name)


@dataclass(frozen=True)
class DataSection:
    train: tuple[str, ...] = ()
    """Files, folders or globs: .txt/.md (text), .jsonl, .parquet, datasets folders, distilled.jsonl."""
    format: str = "auto"
    """auto (by extension / folder contents) | text | jsonl | parquet | datasets | distilled."""
    field: str = "text"
    """JSONL / Parquet / datasets column holding the text."""
    chat: bool = False
    """SFT: rows hold chat `messages`; loss only on assistant tokens (both halves)."""
    seq_len: int = 512
    """Clean tokens per packed row (S); the model sees 2S."""
    heldout_fraction: float = 0.02
    """Share of documents held out for evaluation."""
    heldout: tuple[str, ...] = ()
    """Explicit held-out sources (overrides heldout_fraction)."""
    max_docs: int = 0
    """Use at most this many documents (0 = all)."""

    def __post_init__(self):
        check_types(self)
        check(self.format in DATA_FORMATS, f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}",
              "format")
        check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}", "seq_len")
        check(0 <= self.heldout_fraction < 1, f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}",
              "heldout_fraction")


@dataclass(frozen=True)
class ObjectiveSection:
    block_size: int = 16
    """B: tokens per drafted block."""
    masking: str = "full"
    """full (TiDAR) | uniform | position_dependent (Efficient-DLM)."""
    half_life_ratio: float = 0.1
    """lambda of position-dependent masking."""
    loss_weight: float = 1.0
    """alpha of the AR loss (ungated kinds only; the drafting adapter leaves the AR path untouched)."""
    random_offset: bool = True
    """Start blocks at a random offset per row (inference blocks start anywhere)."""
    slot_decay: float = 1.0
    """Diffusion loss weight slot_decay**i of the slot at index i of its block (1 = every slot alike; < 1 favours
    the first drafted tokens, the ones every accepted run of tokens starts with)."""

    def __post_init__(self):
        check_types(self)
        check(0 < self.slot_decay <= 1, f"objective.slot_decay must be in (0, 1], got {self.slot_decay}",
              "slot_decay")
        DiffusionConfig(block_size=self.block_size, masking=self.masking, half_life_ratio=self.half_life_ratio,
                        loss_weight=self.loss_weight)


@dataclass(frozen=True)
class OptimSection:
    lr: float = 5e-4
    """Peak learning rate (LoRA / all weights)."""
    mask_row_lr: float = 1e-3
    """Learning rate of the mask token's embedding row."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    batch_size: int = 4
    """Rows per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""

    def __post_init__(self):
        check_types(self)
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}", "lr")
        check(self.mask_row_lr >= 0, f"optim.mask_row_lr must be >= 0, got {self.mask_row_lr}", "mask_row_lr")
        check(self.batch_size >= 1, f"optim.batch_size must be >= 1, got {self.batch_size}", "batch_size")
        check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}", "grad_accum")
        check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}", "grad_clip")


@dataclass(frozen=True)
class ScheduleSection:
    max_steps: int = 1000
    """Optimiser steps."""
    warmup_fraction: float = 0.01
    """Linear warm-up over this share of max_steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio (the floor)."""

    def __post_init__(self):
        check_types(self)
        check(self.max_steps >= 1, f"schedule.max_steps must be >= 1, got {self.max_steps}", "max_steps")
        check(0 <= self.warmup_fraction < 1, f"schedule.warmup_fraction must be in [0, 1), got {self.warmup_fraction}",
              "warmup_fraction")
        check(0 <= self.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
              "min_lr_ratio")


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 100
    """Save a checkpoint every N steps (and on SIGINT/SIGTERM and at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted)."""
    every_minutes: float = 10.0
    """Also save when this many minutes passed since the last save (0 = off)."""

    def __post_init__(self):
        check_types(self)
        check(self.every_steps >= 1, f"checkpoint.every_steps must be >= 1, got {self.every_steps}", "every_steps")
        check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}", "keep_last")


@dataclass(frozen=True)
class EvalSection:
    every_steps: int = 100
    """Evaluate held-out losses and estimated TPF every N steps (0 = only at the end)."""
    max_rows: int = 32
    """Held-out rows per evaluation."""
    log_every: int = 10
    """Append a training record to metrics.jsonl every N steps."""

    def __post_init__(self):
        check_types(self)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `recipes/*.yaml` are serialized TrainConfigs."""

    run_dir: str = "runs/default"
    """Output folder: checkpoints/, final/, metrics.jsonl, config.yaml."""
    stage: str = "midtrain"
    """midtrain | context_extension | sft | distill (a label; the sections define the behaviour)."""
    seed: int = 0
    """Seed of weights init (adapters), data order, masking and offsets."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        check_types(self)
        check(self.stage in ("midtrain", "context_extension", "sft", "distill"),
              f"stage must be midtrain, context_extension, sft or distill, got {self.stage!r}", "stage")

    # -------------------------------------------------------------- YAML + CLI
    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "TrainConfig":
        return build(cls, raw, where)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        import yaml

        try:
            raw = yaml.safe_load(read_text(path, "config file"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
        check(raw is not None, f"recipe {path} is empty: a recipe is a YAML mapping of sections (model, data, "
                               f"objective, adapter, ...) such as recipes/*.yaml")
        check(isinstance(raw, dict), f"{path}: expected a mapping of sections")
        merged = copy.deepcopy(raw)
        try:
            apply_overrides(merged, overrides)
            return cls.from_dict(merged, str(path))
        except ConfigError as e:
            if not overrides:
                raise
            try:  # which is to blame, the file or the command line?
                cls.from_dict(raw, str(path))
            except ConfigError:
                raise e from None
            try:
                cls.from_dict(merged, "command line")
                blame = str(e)
            except ConfigError as e2:
                blame = str(e2)
            raise ConfigError(f"{blame} (from the command-line overrides {' '.join(map(str, overrides))}; "
                              f"{path} itself is fine)", field=e.field) from e

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False), force=True, what="config file")


def apply_overrides(raw: dict, overrides) -> None:
    """`--section.field value` pairs (strings) into the raw dict; values parsed as YAML scalars."""
    import yaml

    items = list(overrides)
    check(len(items) % 2 == 0, f"overrides come in pairs --section.field VALUE, got {items}")
    for key, value in zip(items[::2], items[1::2]):
        check(key.startswith("--"), f"expected --section.field, got {key!r}")
        parts = key[2:].replace("-", "_").split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            check(isinstance(node, dict), f"{key}: {part} is not a section", ".".join(parts))
        node[parts[-1]] = yaml.safe_load(value)


@dataclass(frozen=True)
class DistillConfig:
    """`ar2dlm distill` settings: how the teacher (the AR model) continues each prompt."""

    max_new_tokens: int = 128
    """New tokens per continuation."""
    batch_size: int = 8
    """Prompts decoded together."""
    sampler: str = field(default="greedy", metadata={"choices": ("greedy", "lossless")})
    """greedy continuations, or sampled ones (lossless = the AR distribution)."""
    temperature: float = 1.0
    """Temperature of the lossless sampler."""
    seed: int = 0
    """Seed of the sampling, 0..2**64-1."""
    limit: int | None = None
    """Only the first N prompts (None = all)."""

    def __post_init__(self):
        check_types(self)
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}", "batch_size")
        check(self.limit is None or self.limit >= 1, f"limit must be >= 1 (the first N prompts) or None, got "
                                                     f"{self.limit}", "limit")
        check(self.sampler in ("greedy", "lossless"), f"sampler must be greedy or lossless, got {self.sampler!r}",
              "sampler")
        DecodeConfig(**self.decoding())  # the decoding limits (max_new_tokens, temperature, seed) fail now

    def decoding(self) -> dict:
        """The teacher's decoding of each prompt (DecodeConfig keywords): AR steps with these settings."""
        return dict(ar=True, max_new_tokens=self.max_new_tokens, sampler=self.sampler, temperature=self.temperature,
                    seed=self.seed)
