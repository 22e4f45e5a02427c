"""`TuneConfig`: the settings of `ar2dlm tune` (its flags map 1:1 onto the fields)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.validation import check, check_types
from ..decode.config import MAX_DRAFT_LEN
from .bench_config import BENCH_SETS


@dataclass(frozen=True)
class TuneConfig:
    """`ar2dlm tune` settings."""

    sets: tuple[str, ...] = BENCH_SETS
    """Prompt sets: code, prose, chat, or JSONL prompt files."""
    n_prompts: int = 3
    """Prompts per set."""
    max_draft_len: int = 16
    """Longest draft length K tried, 2..64."""
    max_new_tokens: int = 64
    """New tokens per prompt."""
    grid: bool = False
    """Also time every draft length x proposals of a grid on the same prompts and report how close the choice
    is to the fastest (slow: minutes per setting on a CPU)."""
    dry_run: bool = False
    """Print the choice; do not write it into ar2dlm.json."""

    def __post_init__(self):
        check_types(self)
        check(len(self.sets) > 0, "sets must name at least one prompt set", "sets")
        check(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}", "n_prompts")
        check(2 <= self.max_draft_len <= MAX_DRAFT_LEN,
              f"max_draft_len must be in 2..{MAX_DRAFT_LEN} (1 = plain AR, nothing to tune), got {self.max_draft_len}",
              "max_draft_len")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "max_new_tokens")
