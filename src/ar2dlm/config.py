"""Settings as frozen dataclasses: one documented field each, validated on creation.

`DiffusionConfig` is what a converted checkpoint stores in `ar2dlm.json`;
`DecodeConfig` is one request's decoding settings (the CLI flags map 1:1 onto
its fields). Validation errors name the field and say what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MASKING_SCHEMES = ("full", "uniform", "position_dependent")
SAMPLERS = ("greedy", "lossless", "mix")
SETTINGS_FILE = "ar2dlm.json"


class ConfigError(ValueError):
    """A setting has a value a user must change; the message names it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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

    def __post_init__(self):
        _check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _check(self.loss_weight >= 0, f"loss_weight must be >= 0, got {self.loss_weight}")
        _check(self.masking in MASKING_SCHEMES,
               f"masking must be one of {', '.join(MASKING_SCHEMES)}, got {self.masking!r}")
        _check(self.half_life_ratio > 0, f"half_life_ratio must be > 0, got {self.half_life_ratio}")
        _check(self.draft_len >= 0, f"draft_len must be >= 0, got {self.draft_len}")
        _check(self.proposals >= 0, f"proposals must be >= 0, got {self.proposals}")

    @property
    def beta(self) -> float:
        """Slope of position-dependent masking weights w_i(t) = exp(beta (1 - t) i)."""
        return math.log(2) / (self.half_life_ratio * self.block_size)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / SETTINGS_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "DiffusionConfig":
        path = Path(directory) / SETTINGS_FILE
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-run `ar2dlm convert`") from e
        _check(isinstance(raw, dict), f"{path} must hold a JSON object of settings; re-run `ar2dlm convert`")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        _check(not unknown, f"{path}: unknown settings {unknown}")
        for name, value in raw.items():
            want = type(getattr(cls(), name))
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            _check(ok and not (want is not bool and isinstance(value, bool)),
                   f"{path}: setting {name!r} must be a {want.__name__}, got {value!r}")
        try:
            return cls(**raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


@dataclass(frozen=True)
class DecodeConfig:
    """One request's decoding settings. The CLI flags have the same names."""

    max_new_tokens: int = 128
    """Stop after this many new tokens."""
    draft_len: int = 16
    """K: tokens per draft, 1..64 (1 = no drafting, plain AR steps)."""
    proposals: int = 3
    """|R|: proposals pre-drafted per forward, 1..draft_len (full TiDAR: draft_len)."""
    sampler: str = "greedy"
    """greedy (== AR greedy) | lossless (speculative sampling, == AR distribution) | mix (logit mixing)."""
    mix_weight: float = 0.0
    """w of the mix sampler: verify against softmax((1-w) AR + w diffusion logits); 0 = lossless."""
    temperature: float = 1.0
    """Softmax temperature for lossless / mix (ignored by greedy)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set with cumulative probability >= top_p (1 = off)."""
    seed: int | None = None
    """Seed of the sampling generator (None = nondeterministic)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one (it is cut from `text`)."""
    eos_token_id: tuple[int, ...] | None = None
    """End-of-sequence ids (None = the model's generation config; () = never stop on EOS)."""
    ar: bool = False
    """Plain autoregressive decoding on the same model and cache (one token per forward)."""
    adaptive: bool = False
    """Reserved for adaptive drafting (shorter drafts when acceptance is low)."""

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(1 <= self.draft_len <= 64, f"draft_len must be in 1..64, got {self.draft_len}")
        _check(1 <= self.proposals <= self.draft_len,
               f"proposals must be in 1..draft_len ({self.draft_len}), got {self.proposals}")
        _check(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _check(0.0 <= self.mix_weight <= 1.0, f"mix_weight must be in [0, 1], got {self.mix_weight}")
        _check(self.mix_weight == 0.0 or self.sampler == "mix",
               f"mix_weight={self.mix_weight} only applies to --sampler mix (got sampler {self.sampler!r})")
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax whatever the sampler; greedy is exact AR greedy."""
        return self.sampler == "greedy" or self.temperature == 0.0
