"""Settings as frozen dataclasses: one documented field each, validated on creation.

`DiffusionConfig` is what a converted checkpoint stores in `ar2dlm.json`;
`DecodeConfig` is one request's decoding settings (the CLI flags map 1:1 onto
its fields). Validation errors name the field and say what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MASKING_SCHEMES = ("full", "uniform", "position_dependent")
SAMPLERS = ("greedy", "lossless", "mix")
SETTINGS_FILE = "ar2dlm.json"
MAX_DRAFT_LEN = 64
"""The longest block / draft: a step feeds K (1 + |R|) rows, so longer drafts only cost."""
MIN_TEMPERATURE = 1e-3
"""Smaller temperatures overflow the scaled logits; 0 means greedy (argmax)."""
SEED_RANGE = (0, 2**64 - 1)


class ConfigError(ValueError):
    """A setting has a value a user must change; the message names it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_types(obj) -> None:
    """Each field holds a value of its annotated type (int is not bool; a float field takes an int)."""
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        _check(_is_a(value, hint), f"{f.name} must be {_type_words(hint)}, got {value!r}")


def _is_a(value, hint) -> bool:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(_is_a(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def _type_words(hint) -> str:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is tuple:
        return f"a tuple of {_type_words(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "True or False"}.get(hint, str(hint))


def _finite(x) -> bool:
    return math.isfinite(x)


def field_docs(cls) -> dict[str, str]:
    """{field: its docstring} of a dataclass (the string literal under each field): help texts, one source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


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
    """Measured cost of a forward by token slots per row, relative to 1 slot (`ar2dlm tune`); {} = default."""
    adaptive: bool = False
    """Decode with adaptive drafting by default (per step, down to plain AR steps where drafting does not pay
    on this machine) when a request fixes no draft_len or proposals; `ar2dlm tune` sets it when it measures
    fastest."""

    def __post_init__(self):
        _check_types(self)
        _check(self.adapter in ("", "drafting", "lora"), f"adapter must be '', drafting or lora, got {self.adapter!r}")
        _check(1 <= self.block_size <= MAX_DRAFT_LEN,
               f"block_size must be in 1..{MAX_DRAFT_LEN}, got {self.block_size}")
        _check(self.loss_weight >= 0 and _finite(self.loss_weight), f"loss_weight must be >= 0, got {self.loss_weight}")
        _check(self.masking in MASKING_SCHEMES,
               f"masking must be one of {', '.join(MASKING_SCHEMES)}, got {self.masking!r}")
        _check(self.half_life_ratio > 0 and _finite(self.half_life_ratio),
               f"half_life_ratio must be > 0, got {self.half_life_ratio}")
        _check(0 <= self.draft_len <= MAX_DRAFT_LEN,
               f"draft_len must be in 0..{MAX_DRAFT_LEN} (0 = block_size), got {self.draft_len}")
        K = self.draft_len or self.block_size
        _check(0 <= self.proposals <= K, f"proposals must be in 0..{K} (the draft length; 0 = min(3, draft length)), "
                                         f"got {self.proposals}")
        _check(self.mask_token.strip() == self.mask_token and self.mask_token != "",
               f"mask_token must be a non-empty text without surrounding whitespace, got {self.mask_token!r}")

    @property
    def beta(self) -> float:
        """Slope of position-dependent masking weights w_i(t) = exp(beta (1 - t) i)."""
        return math.log(2) / (self.half_life_ratio * self.block_size)

    def save(self, directory: str | Path) -> None:
        """Write `directory/ar2dlm.json` (atomically: a reader never sees half a file)."""
        from .files import write_text

        write_text(Path(directory) / SETTINGS_FILE, json.dumps(dataclasses.asdict(self), indent=2) + "\n",
                   force=True, what="settings file")

    @classmethod
    def load(cls, directory: str | Path) -> "DiffusionConfig":
        from .files import read_json

        path = Path(directory) / SETTINGS_FILE
        raw = read_json(path, "settings file", "; re-run `ar2dlm convert`")
        _check(isinstance(raw, dict), f"{path} must hold a JSON object of settings; re-run `ar2dlm convert`")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        _check(not unknown, f"{path}: unknown settings {unknown}")
        _check("mask_token_id" in raw, f"{path} has no mask_token_id (the vocabulary id of the mask token); "
                                       f"re-run `ar2dlm convert`")
        for name, value in raw.items():
            want = type(getattr(cls(), name))
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            _check(ok and not (want is not bool and isinstance(value, bool)),
                   f"{path}: setting {name!r} must be a {want.__name__}, got {value!r}")
        _check(raw["mask_token_id"] >= 0, f"{path}: mask_token_id must be >= 0, got {raw['mask_token_id']}")
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
    """Softmax temperature for lossless / mix (0 = greedy; the greedy sampler takes no other value)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off; lossless / mix only)."""
    top_p: float = 1.0
    """Keep the smallest set with cumulative probability >= top_p (1 = off; lossless / mix only)."""
    seed: int | None = None
    """Seed of the sampling generator, 0..2**64-1 (None = nondeterministic; greedy draws nothing)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one (it is cut from `text`)."""
    eos_token_id: tuple[int, ...] | None = None
    """End-of-sequence ids (None = the model's generation config; () = never stop on EOS)."""
    ar: bool = False
    """Plain autoregressive decoding on the same model and cache (one token per forward)."""
    adaptive: bool = False
    """Adaptive drafting: per step, the draft length (up to draft_len, down to plain AR steps) with the best
    expected tokens per unit of forward cost, from the acceptance seen so far."""

    def __post_init__(self):
        _check_types(self)
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(1 <= self.draft_len <= MAX_DRAFT_LEN, f"draft_len must be in 1..{MAX_DRAFT_LEN}, got {self.draft_len}")
        _check(1 <= self.proposals <= self.draft_len,
               f"proposals must be in 1..draft_len ({self.draft_len}), got {self.proposals}")
        _check(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _check(0.0 <= self.mix_weight <= 1.0, f"mix_weight must be in [0, 1], got {self.mix_weight}")
        _check(self.temperature == 0.0 or (MIN_TEMPERATURE <= self.temperature and _finite(self.temperature)),
               f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
               f"seed must be in {SEED_RANGE[0]}..2**64-1, got {self.seed}")
        _check(all(s for s in self.stop), "stop strings must be non-empty strings")
        # a setting the chosen decoding would ignore is refused, never dropped in silence
        _check(self.mix_weight == 0.0 or (self.sampler == "mix" and not self.ar),
               f"mix_weight={self.mix_weight} only applies to sampler='mix' with drafting "
               f"(got sampler={self.sampler!r}{', ar=True' if self.ar else ''})")
        if self.sampler == "greedy":
            ignored = [f"{name}={getattr(self, name)}" for name, off in (("temperature", 1.0), ("top_k", 0),
                                                                           ("top_p", 1.0))
                       if getattr(self, name) != off and not (name == "temperature" and self.temperature == 0.0)]
            _check(not ignored, f"{', '.join(ignored)} only appl{'ies' if len(ignored) == 1 else 'y'} to "
                                f"sampler='lossless' or 'mix'; the greedy sampler takes the argmax")
        _check(not (self.ar and self.adaptive), "adaptive=True chooses the draft length; ar=True decodes one token "
                                                "per forward without drafts: choose one")

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax whatever the sampler; greedy is exact AR greedy."""
        return self.sampler == "greedy" or self.temperature == 0.0


# ============================================================================ training
ADAPTER_KINDS = ("drafting", "lora", "full")
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
        _check(self.precision in ("bf16", "fp32"), f"model.precision must be bf16 or fp32, got {self.precision!r}")
        _check(self.rope_theta >= 0 and self.rope_scaling_factor >= 0 and self.max_position_embeddings >= 0,
               "model.rope_theta, model.rope_scaling_factor and model.max_position_embeddings must be >= 0")


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
        _check(self.format in DATA_FORMATS, f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _check(0 <= self.heldout_fraction < 1, f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


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

    def __post_init__(self):
        DiffusionConfig(block_size=self.block_size, masking=self.masking, half_life_ratio=self.half_life_ratio,
                        loss_weight=self.loss_weight)


@dataclass(frozen=True)
class AdapterSection:
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

    def __post_init__(self):
        _check(self.kind in ADAPTER_KINDS, f"adapter.kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}")
        _check(self.rank >= 1, f"adapter.rank must be >= 1, got {self.rank}")
        _check(0 <= self.dropout < 1, f"adapter.dropout must be in [0, 1), got {self.dropout}")
        _check(self.kind != "drafting" or self.dropout == 0, "adapter.dropout must be 0 for the drafting adapter")


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
        _check(self.lr > 0 and self.mask_row_lr >= 0, "optim.lr must be > 0 and optim.mask_row_lr >= 0")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "optim.batch_size and optim.grad_accum must be >= 1")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class ScheduleSection:
    max_steps: int = 1000
    """Optimiser steps."""
    warmup_fraction: float = 0.01
    """Linear warm-up over this share of max_steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio (the floor)."""

    def __post_init__(self):
        _check(self.max_steps >= 1, f"schedule.max_steps must be >= 1, got {self.max_steps}")
        _check(0 <= self.warmup_fraction < 1, "schedule.warmup_fraction must be in [0, 1)")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]")


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 100
    """Save a checkpoint every N steps (and on SIGINT/SIGTERM and at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted)."""
    every_minutes: float = 10.0
    """Also save when this many minutes passed since the last save (0 = off)."""

    def __post_init__(self):
        _check(self.every_steps >= 1 and self.keep_last >= 1, "checkpoint.every_steps and keep_last must be >= 1")


@dataclass(frozen=True)
class EvalSection:
    every_steps: int = 100
    """Evaluate held-out losses and estimated TPF every N steps (0 = only at the end)."""
    max_rows: int = 32
    """Held-out rows per evaluation."""
    log_every: int = 10
    """Append a training record to metrics.jsonl every N steps."""


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
        _check(self.stage in ("midtrain", "context_extension", "sft", "distill"),
               f"stage must be midtrain, context_extension, sft or distill, got {self.stage!r}")

    # -------------------------------------------------------------- YAML + CLI
    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "TrainConfig":
        return _build(cls, raw, where)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        import yaml

        from .files import read_text

        try:
            raw = yaml.safe_load(read_text(path, "config file")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
        _check(isinstance(raw, dict), f"{path}: expected a mapping of sections")
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
                              f"{path} itself is fine)") from e

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        from .files import write_text

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False), force=True, what="config file")


def apply_overrides(raw: dict, overrides) -> None:
    """`--section.field value` pairs (strings) into the raw dict; values parsed as YAML scalars."""
    import yaml

    items = list(overrides)
    _check(len(items) % 2 == 0, f"overrides come in pairs --section.field VALUE, got {items}")
    for key, value in zip(items[::2], items[1::2]):
        _check(key.startswith("--"), f"expected --section.field, got {key!r}")
        parts = key[2:].replace("-", "_").split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"{key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)


def _plain(x):
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _build(cls, raw, where: str, section: str = ""):
    """cls from a raw mapping; `where` names the source (a file, "command line"), `section` the nesting."""
    at = f"{where}: {section}" if section else where
    _check(isinstance(raw, dict), f"{at}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    _check(not unknown, f"{at}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    hints = __import__("typing").get_type_hints(cls)
    for name, value in raw.items():
        hint = hints[name]
        label = f"{where}: {section}.{name}" if section else f"{where}: {name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, where, f"{section}.{name}" if section else name)
        else:
            kwargs[name] = _coerce(value, hint, label)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    except TypeError as e:
        raise ConfigError(f"{at}: {e}") from e


def _coerce(value, hint, label):
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        _check(isinstance(value, list), f"{label} must be a list, got {value!r}")
        return tuple(value)
    if hint is bool:
        _check(isinstance(value, bool), f"{label} must be true or false, got {value!r}")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{label} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{label} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        _check(isinstance(value, str), f"{label} must be a string, got {value!r}")
        return value
    return value


# ============================================================================ measuring
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
        _check_types(self)
        _check(len(self.sets) > 0, "sets must name at least one prompt set")
        _check(math.isfinite(self.temperature) and self.temperature >= 1e-3,
               f"temperature must be a finite number >= 0.001, got {self.temperature}")
        _check(all(n >= 2 for n in self.prompt_lengths), f"prompt_lengths must each be >= 2, got {self.prompt_lengths}")
        _check(self.n_prompts is None or self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        _check(self.batch_sizes is None or (self.batch_sizes and all(b >= 1 for b in self.batch_sizes)),
               f"batch_sizes must be one or more integers >= 1, got {self.batch_sizes}")
        _check(self.runs is None or self.runs >= 1, f"runs must be >= 1, got {self.runs}")
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1,
               f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.draft_lens is None or (self.draft_lens and all(1 <= k <= MAX_DRAFT_LEN for k in self.draft_lens)),
               f"draft_lens must be one or more integers in 1..{MAX_DRAFT_LEN}, got {self.draft_lens}")
        _check(self.proposals is None or (self.proposals and all(n >= 1 for n in self.proposals)),
               f"proposals must be one or more integers >= 1, got {self.proposals}")
        if self.draft_lens and self.proposals:
            _check(max(self.proposals) <= max(self.draft_lens),
                   f"proposals {max(self.proposals)} exceeds every draft length "
                   f"({', '.join(map(str, self.draft_lens))}): "
                   f"a draft of K tokens has at most K proposals")
        _check(self.mix_weights is None or all(0.0 <= w <= 1.0 for w in self.mix_weights),
               f"mix_weights must each be in [0, 1], got {self.mix_weights}")
        unknown = sorted(set(self.samplers) - set(BENCH_SAMPLERS))
        _check(not unknown, f"unknown bench sampler(s) {unknown}: choose from {', '.join(BENCH_SAMPLERS)} "
                            f"(the mix sampler is timed for each of mix_weights)")
        _check(len(self.samplers) > 0 or bool(self.mix_weights),
               "samplers and mix_weights are both empty: nothing to time against the AR loop")
        _check(SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], f"seed must be in 0..2**64-1, got {self.seed}")

    def resolved(self, draft_len: int, proposals: int) -> "BenchConfig":
        """Every None replaced by its preset; draft_len / proposals are the model's defaults."""
        q = self.quick
        draft_lens = self.draft_lens or ((draft_len,) if q else tuple(sorted({4, 8, draft_len})))
        proposals = min(proposals, max(draft_lens))  # a preset never asks for more proposals than draft tokens
        preset = {
            "n_prompts": 2 if q else 10, "batch_sizes": (1,) if q else (1, 4), "runs": 2 if q else 3,
            "max_new_tokens": 40 if q else 128, "draft_lens": draft_lens,
            "proposals": (proposals,) if q else tuple(sorted({1, proposals})),
            "mix_weights": (0.5, 1.0) if q else (0.25, 0.5, 0.75, 1.0),
        }
        return dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})


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
        _check_types(self)
        _check(len(self.sets) > 0, "sets must name at least one prompt set")
        _check(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        _check(2 <= self.max_draft_len <= MAX_DRAFT_LEN,
               f"max_draft_len must be in 2..{MAX_DRAFT_LEN} (1 = plain AR, nothing to tune), "
               f"got {self.max_draft_len}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
