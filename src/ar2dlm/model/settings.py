"""A converted checkpoint's settings (`DiffusionConfig`, saved as `ar2dlm.json`) and the adapter's shape."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..core.files import read_json, write_text
from ..core.hardware import DTYPE_NAMES
from ..core.validation import build, check, check_types, finite
from ..decode.config import MAX_DRAFT_LEN, MAX_SIBLINGS

MASKING_SCHEMES = ("full", "uniform", "position_dependent")
SETTINGS_FILE = "ar2dlm.json"
ADAPTER_KINDS = ("drafting", "lora", "full")
DTYPES = DTYPE_NAMES


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion settings of a converted checkpoint (saved as `ar2dlm.json`)."""

    block_size: int = 16
    """Tokens drafted per block (K at decode time by default)."""
    mask_token_id: int = -1
    """Vocabulary id of the mask token `<|mask|>` that fills drafting slots."""
    mask_token: str = "<|mask|>"
    """Text of the mask token."""
    loss_weight: float = 1.0
    """alpha in (alpha * L_AR + L_diff) / (1 + alpha)."""
    masking: str = "full"
    """Which slots of the drafting half are masked in training: full | uniform | position_dependent."""
    half_life_ratio: float = 0.1
    """lambda of position-dependent masking: beta = ln2 / (lambda * block_size)."""
    base_model: str = ""
    """Where the converted model came from (path or bundled name)."""
    draft_len: int = 0
    """Default draft length K for decoding (0 = block_size)."""
    proposals: int = 0
    """Default number of proposals |R| per forward (0 = min(3, draft_len))."""
    adapter: str = ""
    """"" (weights are complete) | drafting (gated LoRA in this folder, applied on mask slots only) | lora."""
    forward_cost: dict = field(default_factory=dict)
    """Cost of a forward by token slots per row, relative to 1 slot, as `ar2dlm tune` measured it, with the
    machine it holds for: {"machine": "<cpu> | <dtype> | <n> threads", "slots": {...}}. Used only on that
    machine; elsewhere the model measures its own at first use (decode/costs.py). {} = none."""
    dtype: str = "auto"
    """The dtype this checkpoint decodes in when a load asks for `auto` (the default): auto (bfloat16 where the
    hardware computes it natively, else float32) | float32 | bfloat16 | float16. $AR2DLM_DTYPE overrides it."""
    tree: tuple[int, ...] = ()
    """Default candidate tree (siblings per depth, decode/tree.py) for requests that fix no drafting setting;
    `ar2dlm tune` sets it when it measures fastest. () = one chain."""
    adaptive: bool = False
    """Decode with adaptive drafting by default (per step, down to plain AR steps where drafting does not pay
    on this machine) when a request fixes no draft_len or proposals; `ar2dlm tune` sets it when it measures
    fastest."""

    def __post_init__(self):
        check_types(self)
        check(self.adapter in ("", "drafting", "lora"), f"adapter must be '', drafting or lora, got {self.adapter!r}",
              "adapter")
        check(1 <= self.block_size <= MAX_DRAFT_LEN,
              f"block_size must be in 1..{MAX_DRAFT_LEN}, got {self.block_size}", "block_size")
        check(self.loss_weight >= 0 and finite(self.loss_weight), f"loss_weight must be >= 0, got {self.loss_weight}",
              "loss_weight")
        check(self.masking in MASKING_SCHEMES,
              f"masking must be one of {', '.join(MASKING_SCHEMES)}, got {self.masking!r}", "masking")
        check(self.half_life_ratio > 0 and finite(self.half_life_ratio),
              f"half_life_ratio must be > 0, got {self.half_life_ratio}", "half_life_ratio")
        check(0 <= self.draft_len <= MAX_DRAFT_LEN,
              f"draft_len must be in 0..{MAX_DRAFT_LEN} (0 = block_size), got {self.draft_len}", "draft_len")
        K = self.draft_len or self.block_size
        check(0 <= self.proposals <= K, f"proposals must be in 0..{K} (the draft length; 0 = min(3, draft length)), "
                                        f"got {self.proposals}", "proposals")
        check(all(0 <= m <= MAX_SIBLINGS for m in self.tree) and len(self.tree) < K,
              f"tree must list 0..{MAX_SIBLINGS} siblings for at most {K - 1} depths (the draft length - 1), got "
              f"{list(self.tree)}", "tree")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", "dtype")
        check(self.mask_token.strip() == self.mask_token and self.mask_token != "",
              f"mask_token must be a non-empty text without surrounding whitespace, got {self.mask_token!r}",
              "mask_token")

    def decode_defaults(self) -> tuple[int, int]:
        """(K, |R|) a request decodes with unless it says otherwise: draft_len or block_size, and proposals or
        min(3, K)."""
        K = self.draft_len or self.block_size
        return K, self.proposals or min(3, K)

    @property
    def beta(self) -> float:
        """Slope of position-dependent masking weights w_i(t) = exp(beta (1 - t) i)."""
        return math.log(2) / (self.half_life_ratio * self.block_size)

    def save(self, directory: str | Path) -> None:
        """Write `directory/ar2dlm.json` (atomically: a reader never sees half a file)."""
        write_text(Path(directory) / SETTINGS_FILE, json.dumps(dataclasses.asdict(self), indent=2) + "\n",
                   force=True, what="settings file")

    @classmethod
    def load(cls, directory: str | Path) -> "DiffusionConfig":
        path = Path(directory) / SETTINGS_FILE
        raw = read_json(path, "settings file", "; re-run `ar2dlm convert`")
        check(isinstance(raw, dict), f"{path} must hold a JSON object of settings; re-run `ar2dlm convert`")
        check("mask_token_id" in raw, f"{path} has no mask_token_id (the vocabulary id of the mask token); "
                                      f"re-run `ar2dlm convert`", "mask_token_id")
        settings = build(cls, raw, str(path))
        check(settings.mask_token_id >= 0, f"{path}: mask_token_id must be >= 0, got {settings.mask_token_id}",
              "mask_token_id")
        return settings


@dataclass(frozen=True)
class ConvertConfig:
    """`ar2dlm convert` settings: the mask token and the diffusion settings written into `ar2dlm.json`."""

    block_size: int = 16
    """Tokens per drafted block, 1..64 and below the model's context."""
    mask_token: str = "<|mask|>"
    """Text of the mask token to add."""
    reuse_token: bool = False
    """Use an existing (reserved, unused) token named by mask_token instead of adding one."""
    masking: str = field(default="full", metadata={"choices": MASKING_SCHEMES})
    """Training masking scheme: full | uniform | position_dependent."""
    loss_weight: float = 1.0
    """alpha of the AR loss."""

    def __post_init__(self):
        check_types(self)
        self.diffusion()  # the settings ar2dlm.json will hold fail now, before any weights load

    def diffusion(self, **settings) -> DiffusionConfig:
        """The checkpoint's DiffusionConfig with these settings (and `settings`, e.g. mask_token_id)."""
        return DiffusionConfig(block_size=self.block_size, mask_token=self.mask_token, masking=self.masking,
                               loss_weight=self.loss_weight, **settings)


@dataclass(frozen=True)
class LoadConfig:
    """How a verb loads its model."""

    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    """Weights and activations. auto: $AR2DLM_DTYPE if set, else the checkpoint's `dtype` (ar2dlm.json), else
    bfloat16 where the CPU has AVX512-BF16 or AMX (or on a GPU with bf16), else float32. In bfloat16 / float16
    the forward is batch-invariant, so greedy output equals the AR loop in that dtype token for token; in
    float32 it equals HF generate of the base."""

    def __post_init__(self):
        check_types(self)
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", "dtype")


@dataclass(frozen=True)
class AdapterSection:
    """What training adapts (the `adapter:` section of a recipe); the model's adapter module builds it."""

    kind: str = "drafting"
    """drafting (LoRA on mask-slot rows only: AR path exact) | lora (ungated) | full (all weights)."""
    rank: int = 64
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha (scale alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout (ungated kind only)."""
    targets: tuple[str, ...] = ("all-linear",)
    """Module names to adapt, or all-linear."""
    mask_row: bool = True
    """Train the mask token's embedding row."""
    init: str = ""
    """Start from a trained adapter of the same kind and shape instead of a fresh one: a folder holding
    adapter_model.safetensors (an exported drafter, a run's final/) or a bundled name (its shipped drafter);
    "" = fresh. A larger data budget continues the drafter it already has."""

    def __post_init__(self):
        check_types(self)
        check(self.kind in ADAPTER_KINDS, f"adapter.kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}",
              "kind")
        check(self.rank >= 1, f"adapter.rank must be >= 1, got {self.rank}", "rank")
        check(0 <= self.dropout < 1, f"adapter.dropout must be in [0, 1), got {self.dropout}", "dropout")
        check(self.kind != "drafting" or self.dropout == 0, "adapter.dropout must be 0 for the drafting adapter",
              "dropout")
