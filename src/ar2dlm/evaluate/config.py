"""`EvalConfig`: the settings of `ar2dlm eval` (its flags map 1:1 onto the fields), and the setting names."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import ConfigError
from ..core.validation import check, check_types
from . import tasks
from .sandbox import SandboxLimits

SAMPLED = ("ar-sample", "lossless")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run. The CLI flags of `ar2dlm eval` have the same names."""

    task: str = field(default="humaneval", metadata={"choices": tasks.TASKS})
    """humaneval (code, run in the sandbox) | ifeval (instruction following, checked by rules)."""
    form: str = field(default="instruct", metadata={"choices": tasks.FORMS})
    """instruct (chat template, code block extracted) | raw (the bare prompt, completion continues it)."""
    settings: tuple[str, ...] = ("ar", "greedy")
    """Decoding settings: ar, greedy, ar-sample, lossless, mix:W (see `ar2dlm eval --help`)."""
    frontier: bool = False
    """Sweep ar, ar-sample, greedy, lossless and mix:W for each --mix-weights (replaces --settings); table, PNG,
    JSON. The sampled settings' speed is also given against ar-sample (vs sample)."""
    mix_weights: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    """Mix weights of the frontier sweep."""
    limit: int | None = None
    """Only the first N problems (None = all)."""
    n_samples: int = 1
    """Answers per problem for the sampled settings (ar-sample, lossless, mix:W)."""
    k: tuple[int, ...] = (1,)
    """pass@k reported for the sampled settings; each k must be <= n_samples."""
    temperature: float = 0.8
    """Temperature of the sampled settings."""
    max_new_tokens: int = 512
    """Longest answer in tokens."""
    draft_len: int | None = None
    """K of the drafting settings (None = the checkpoint's default)."""
    proposals: int | None = None
    """|R| of the drafting settings (None = the checkpoint's default)."""
    batch_size: int = 4
    """Problems decoded together."""
    workers: int = 2
    """Sandbox processes running at once."""
    timeout: float = 10.0
    """Wall-clock seconds a sandboxed program may run."""
    memory_mb: int = 1024
    """Memory limit of a sandboxed program (MiB)."""
    unsandboxed: bool = False
    """Run model-written code even where this machine has no OS isolation (no working bubblewrap): it then runs as
    you, on your files, guarded only by rlimits and an audit hook. Without it such a run is refused."""
    seed: int = 0
    """Seed of the sampled settings (sample j of a chunk uses seed + j, offset by the chunk)."""

    def __post_init__(self):
        check_types(self)
        check(self.task in tasks.TASKS, f"task must be one of {', '.join(tasks.TASKS)}, got {self.task!r}", "task")
        check(self.form in tasks.FORMS, f"form must be one of {', '.join(tasks.FORMS)}, got {self.form!r}", "form")
        check(self.task != "ifeval" or self.form == "instruct",
              "task ifeval has only the instruct form (chat prompts): drop --form raw", "form")
        for s in self.settings:
            try:
                parse_setting(s)
            except ConfigError as e:
                raise ConfigError(str(e), field="settings") from None
        check(len(set(self.settings)) == len(self.settings), f"settings repeat a name: {','.join(self.settings)}",
              "settings")
        check(self.frontier or len(self.settings) > 0, "settings is empty: name at least one (e.g. ar,greedy)",
              "settings")
        check(all(0.0 <= w <= 1.0 for w in self.mix_weights), f"mix_weights must be in [0, 1], got {self.mix_weights}",
              "mix_weights")
        check(self.limit is None or self.limit >= 1, f"limit must be >= 1 (the first N problems), got {self.limit}",
              "limit")
        check(self.n_samples >= 1, f"n_samples must be >= 1, got {self.n_samples}", "n_samples")
        check(len(self.k) > 0 and all(1 <= k <= self.n_samples for k in self.k),
              f"every k of pass@k must be in 1..n_samples ({self.n_samples}), got {','.join(map(str, self.k))}: "
              f"raise --n-samples or lower --k", "k")
        check(self.temperature > 0, f"temperature of the sampled settings must be > 0, got {self.temperature}",
              "temperature")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "max_new_tokens")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}", "batch_size")
        check(self.workers >= 1, f"workers must be >= 1, got {self.workers}", "workers")
        self.sandbox_limits()

    def sandbox_limits(self) -> SandboxLimits:
        """The limits each HumanEval program runs under."""
        return SandboxLimits(timeout=self.timeout, memory_mb=self.memory_mb, unsandboxed=self.unsandboxed)

    @property
    def all_settings(self) -> tuple[str, ...]:
        if self.frontier:
            return ("ar", "ar-sample", "greedy", "lossless", *(f"mix:{w:g}" for w in self.mix_weights))
        return self.settings

    def identity(self, model: str) -> dict:
        """What makes two runs' results comparable (a resume must match it)."""
        return {"model": model, "task": self.task, "form": self.form, "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens, "draft_len": self.draft_len, "proposals": self.proposals,
                "seed": self.seed}


def parse_setting(name: str) -> tuple[str, float]:
    """'mix:0.5' -> ('mix', 0.5); others -> (name, 0.0)."""
    if name.startswith("mix:"):
        try:
            w = float(name[4:])
        except ValueError:
            raise ConfigError(f"setting {name!r}: the mix weight must be a number, as in mix:0.5") from None
        if not 0.0 <= w <= 1.0:
            raise ConfigError(f"setting {name!r}: the mix weight must be in [0, 1]")
        return "mix", w
    if name not in ("ar", "greedy", *SAMPLED):
        raise ConfigError(f"unknown setting {name!r}: use ar, greedy, ar-sample, lossless or mix:W")
    return name, 0.0
