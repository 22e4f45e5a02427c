"""`BenchConfig`: the settings of `ar2dlm bench` (its flags map 1:1 onto the fields)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from ..core.validation import check, check_types, finite
from ..decode.config import MAX_DRAFT_LEN, MAX_SIBLINGS, MIN_TEMPERATURE, SEED_RANGE

BENCH_SETS = ("code", "prose", "chat")
BENCH_SAMPLERS = ("greedy", "lossless", "adaptive")


@dataclass(frozen=True)
class BenchConfig:
    """`ar2dlm bench` settings. A field left None takes its preset (quick or full, from the model's K and |R|)."""

    quick: bool = False
    """A small preset (a few minutes on 2 CPU cores)."""
    sets: tuple[str, ...] = BENCH_SETS
    """Prompt sets: code, prose, chat, or JSONL prompt files."""
    n_prompts: int | None = None
    """Prompts per set (preset: 2 quick, 10 full)."""
    batch_sizes: tuple[int, ...] | None = None
    """Batch sizes, e.g. 1,4 (preset: 1 quick, 1,4 full)."""
    runs: int | None = None
    """Timed runs per configuration (median), after one warm-up (preset: 2 quick, 3 full)."""
    max_new_tokens: int | None = None
    """New tokens per prompt (preset: 40 quick, 128 full)."""
    draft_lens: tuple[int, ...] | None = None
    """Draft lengths K, each 1..64, e.g. 4,8,16 (preset: the model's K; full adds 4 and 8)."""
    proposals: tuple[int, ...] | None = None
    """Proposal counts |R|, e.g. 1,3; each at most the largest draft length (preset: the model's |R|; full adds 1)."""
    mix_weights: tuple[float, ...] | None = None
    """Mix sampler weights in [0, 1], e.g. 0.25,0.5,1; empty = none (preset: 0.5,1 quick, 0.25,0.5,0.75,1 full)."""
    trees: tuple[str, ...] | None = None
    """Candidate trees timed beside each greedy chain: siblings per depth joined by '-', e.g. 3,2-1 (decode/tree.py;
    empty = none; preset: 3)."""
    samplers: tuple[str, ...] = BENCH_SAMPLERS
    """greedy, lossless, adaptive (adaptive = greedy with adaptive draft length)."""
    hf: bool = True
    """Also time the HF generate baselines."""
    seed: int = 0
    """Seed of the sampling samplers, 0..2**64-1."""
    temperature: float = 0.7
    """Temperature of the lossless and mix rows and of the AR loop sampling at it (ar_sample) they are compared
    with."""
    prompt_lengths: tuple[int, ...] = ()
    """Also time decode-only speed (prefill excluded) at these prompt lengths in tokens, e.g. 100,1000,3000:
    the model's default settings vs the AR loop, on prompts cut from ar2dlm's own source."""

    def __post_init__(self):
        check_types(self)
        check(len(self.sets) > 0, "sets must name at least one prompt set", "sets")
        check(finite(self.temperature) and self.temperature >= MIN_TEMPERATURE,
              f"temperature must be a finite number >= {MIN_TEMPERATURE:g}, got {self.temperature}", "temperature")
        check(all(n >= 2 for n in self.prompt_lengths), f"prompt_lengths must each be >= 2, got {self.prompt_lengths}",
              "prompt_lengths")
        check(self.n_prompts is None or self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}",
              "n_prompts")
        check(self.batch_sizes is None or (self.batch_sizes and all(b >= 1 for b in self.batch_sizes)),
              f"batch_sizes must be one or more integers >= 1, got {self.batch_sizes}", "batch_sizes")
        check(self.runs is None or self.runs >= 1, f"runs must be >= 1, got {self.runs}", "runs")
        check(self.max_new_tokens is None or self.max_new_tokens >= 1,
              f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "max_new_tokens")
        check(self.draft_lens is None or (self.draft_lens and all(1 <= k <= MAX_DRAFT_LEN for k in self.draft_lens)),
              f"draft_lens must be one or more integers in 1..{MAX_DRAFT_LEN}, got {self.draft_lens}", "draft_lens")
        check(self.proposals is None or (self.proposals and all(n >= 1 for n in self.proposals)),
              f"proposals must be one or more integers >= 1, got {self.proposals}", "proposals")
        if self.draft_lens and self.proposals:
            check(max(self.proposals) <= max(self.draft_lens),
                  f"proposals {max(self.proposals)} exceeds every draft length "
                  f"({', '.join(map(str, self.draft_lens))}): "
                  f"a draft of K tokens has at most K proposals", "proposals")
        check(self.mix_weights is None or all(0.0 <= w <= 1.0 for w in self.mix_weights),
              f"mix_weights must each be in [0, 1], got {self.mix_weights}", "mix_weights")
        check(self.trees is None or all(tree_shape(t) is not None for t in self.trees),
              f"trees must each be siblings per depth joined by '-' (0..{MAX_SIBLINGS} each), e.g. 3 or 2-1, got "
              f"{self.trees}", "trees")
        unknown = sorted(set(self.samplers) - set(BENCH_SAMPLERS))
        check(not unknown, f"unknown bench sampler(s) {unknown}: choose from {', '.join(BENCH_SAMPLERS)} "
                           f"(the mix sampler is timed for each of mix_weights)", "samplers")
        check(len(self.samplers) > 0 or bool(self.mix_weights),
              "samplers and mix_weights are both empty: nothing to time against the AR loop", "samplers")
        check(SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], f"seed must be in 0..2**64-1, got {self.seed}", "seed")

    def resolved(self, draft_len: int, proposals: int) -> "BenchConfig":
        """Every None replaced by its preset; draft_len / proposals are the model's defaults."""
        q = self.quick
        draft_lens = self.draft_lens or ((draft_len,) if q else tuple(sorted({4, 8, draft_len})))
        proposals = min(proposals, max(draft_lens))  # a preset never asks for more proposals than draft tokens
        preset = {
            "n_prompts": 2 if q else 10, "batch_sizes": (1,) if q else (1, 4), "runs": 2 if q else 3,
            "max_new_tokens": 40 if q else 128, "draft_lens": draft_lens,
            "proposals": (proposals,) if q else tuple(sorted({1, proposals})),
            "mix_weights": (0.5, 1.0) if q else (0.25, 0.5, 0.75, 1.0), "trees": ("3",),
        }
        return dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})


def tree_shape(text: str) -> tuple[int, ...] | None:
    """'2-1' -> (2, 1): siblings per depth; None if it is not that."""
    try:
        shape = tuple(int(x) for x in text.split("-"))
    except ValueError:
        return None
    return shape if shape and all(0 <= m <= MAX_SIBLINGS for m in shape) else None


def without_chat(cfg, has_chat_template: bool, model: str, explicit: bool):
    """cfg (a BenchConfig or TuneConfig) for a model: the chat prompt set needs a chat template; named by the user
    -> an error now, by default -> dropped with a note."""
    if "chat" not in cfg.sets or has_chat_template:
        return cfg
    check(not explicit, f"prompt set 'chat' needs a chat template, and {model}'s tokenizer has none: drop chat from "
                        f"sets", "sets")
    print(f"{model} has no chat template: skipping the chat prompt set", file=sys.stderr)
    return dataclasses.replace(cfg, sets=tuple(s for s in cfg.sets if s != "chat"))
