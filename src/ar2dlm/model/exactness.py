"""Is decoding exact on this machine? The batch-invariance property, checked here, per component, and cached.

What ar2dlm promises in bf16 / fp16 (greedy == the same-dtype AR loop, token
for token, alone or in any batch) rests on one property: every row's logits
and K/V are bitwise those of the row fed alone, whatever else shares its
forward. The forward is built for it (row tiles of a fixed size, ar2dlm's own
attention kernel, activations on whole vector blocks), but on libraries
(oneDNN's packed matmuls, ATen's reductions and elementwise kernels) whose code
paths differ from CPU to CPU. A construction that held on one CPU kind has
failed on another before. So the property is checked on the machine at hand,
in the dtype at hand, on the model at hand, in seconds:

  A. verify rows: M causal rows after a cache of C tokens (a draft being
     verified) == the M one-row forwards of the AR loop at those positions;
  B. slot rows: a step whose last rows are mask slots (the drafting adapter
     on them) == the same step with more rows after it, which no row sees;

for contexts of 30 to about 1,100 keys. Each part of the forward is compared
row by row (`COMPONENTS`: the linears, attention, norms, the adapter's rows,
the LM head) and so is the whole (`forward`: logits and the K/V written).

The verdict is cached per machine (CPU, dtype, threads, the attention kernel
in use) and model shape under `$AR2DLM_HOME/checks/`, as the cost table is.
`DiffusionLM.exactness()` consults it; loading a bf16 / fp16 model says on
stderr when it is not exact, naming the parts that failed, and every verb
that loads a model (`demo`, `bench`, `eval`, `doctor`, ...) prints its line.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.files import read_json, write_text
from ..core.home import ar2dlm_home
from ..decode import costs
from ..nn import native, predecessors
from . import costs as costs_table

COMPONENTS = ("linears", "attention", "norms", "adapter", "head", "forward")
"""What the check names: each part's rows, then the whole forward's logits and K/V."""
CONTEXTS = (30, 333, 1100)
"""Cache lengths the check runs at (cut to the model's position limit): one chunk, several, several segments."""
ROWS = 12
"""Rows of the verify step (A) and of the slot step (B, plus as many again after it)."""
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The check's result on one machine, dtype and model shape."""
    machine: str  # costs.machine_key: CPU | dtype | threads
    attention: str  # which attention ran: "ar2dlm kernel" or "reference (torch ops): <why no kernel>"
    components: dict  # component -> True (bitwise row-invariant), False, or None (not exercised by this model)
    rows_compared: int = 0

    @property
    def exact(self) -> bool:
        return all(ok is not False for ok in self.components.values()) and self.components.get("forward") is True

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.components.items() if ok is False]

    def line(self) -> str:
        parts = ", ".join(f"{name} {'ok' if ok else 'DIFFERS' if ok is False else 'n/a'}"
                          for name, ok in self.components.items())
        head = ("exact: every row bitwise equal to the row alone" if self.exact else
                f"NOT exact ({', '.join(self.failed)} differ): greedy output may differ from the AR loop")
        return f"exactness: {head} [{parts}; attention: {self.attention}] on {self.machine}"

    def as_saved(self) -> dict:
        return {"version": VERSION, **dataclasses.asdict(self)}


def attention_in_use() -> str:
    return "ar2dlm kernel" if native.available() else f"reference (torch ops): {native.reason()}"


def cache_path(lm) -> Path:
    """$AR2DLM_HOME/checks/<hash of the machine, the attention in use, the model's shape and forward>.json"""
    config = lm.model.config
    shape = {name: getattr(config, name, None) for name in (*costs_table.SHAPE, "head_dim")}
    windows = getattr(lm, "windows", None)  # sliding layers' windows change the forward (none: as before)
    ident = json.dumps([VERSION, costs.machine_key(lm.model.dtype), attention_in_use(), shape,
                        getattr(lm.settings, "adapter", None), lm.lean is not None]
                       + ([sorted(windows.items())] if windows else []), sort_keys=True)
    return ar2dlm_home() / "checks" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def cached(lm) -> Verdict | None:
    path = cache_path(lm)
    if not path.is_file():
        return None
    try:
        saved = read_json(path, "exactness check")
        if saved.get("version") != VERSION:
            return None
        saved.pop("version")
        return Verdict(**saved)
    except (ConfigError, TypeError, AttributeError):
        return None  # a damaged file is checked anew and replaced


def verdict(lm, quiet: bool = False) -> Verdict:
    """This machine's verdict for `lm`: cached, else checked now (a few seconds; a line on stderr) and cached."""
    found = cached(lm)
    if found is not None:
        return found
    path = cache_path(lm)
    if not quiet:
        print(f"ar2dlm: checking that every row decodes as it would alone on this machine "
              f"({costs.machine_key(lm.model.dtype)}): once, cached in {path}", file=sys.stderr)
    result = check(lm)
    save(lm, result)
    return result


def save(lm, result: Verdict) -> None:
    """Cache `result` as this machine's verdict for `lm` (a failure to write is said, not raised)."""
    try:
        write_text(cache_path(lm), json.dumps(result.as_saved(), indent=1) + "\n", force=True,
                   what="exactness check")
    except (ConfigError, OSError) as e:
        print(f"ar2dlm: could not cache the exactness check ({e}); it runs again next time", file=sys.stderr)


class _Recorder:
    """Each part's output rows of one forward, in call order: [(component, rows [b, q, ...])]."""

    def __init__(self):
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.label: dict[str, str] = {}  # component -> the name it is recorded under in this forward

    def __call__(self, component: str, rows):
        if isinstance(rows, (tuple, list)):
            rows = rows[0]
        if isinstance(rows, torch.Tensor) and rows.dim() >= 2:
            self.calls.append((self.label.get(component, component), rows.detach().clone()))

    def take(self) -> list[tuple[str, torch.Tensor]]:
        calls, self.calls = self.calls, []
        return calls


def _hooks(lm, recorder: _Recorder) -> list:
    """Forward hooks that record the norms, linears and head of transformers' forward (the path of models the lean
    forward does not run; its attention is recorded by the BatchInvariant mode)."""
    head = lm.model.get_output_embeddings()
    handles = []
    for module in lm.model.modules():
        if module is head:
            component = "head"
        elif type(module).__name__.endswith("Norm"):
            component = "norms"
        elif isinstance(module, nn.Linear):
            component = "linears"
        else:
            continue
        handles.append(module.register_forward_hook(lambda _m, i, out, c=component: recorder(c, _row_major(i, out))))
    return handles


def _row_major(inputs, out):
    """A part's output with its rows on dim 1: a per-head norm over [b, heads, q, d] (Gemma 3's q/k norms read the
    heads after the transpose: its rows are dim 2, which the input's strides say) gives [b, q, heads, d]."""
    x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    if x is not None and x.dim() == 4 and out.dim() == 4 and x.stride(1) < x.stride(2):
        return out.transpose(1, 2)
    return out


class _Judge:
    """Per component: True once its rows were compared equal, False when it was the first part of a forward whose
    rows differed (later parts only inherit the difference, so they are not judged by that comparison)."""

    def __init__(self):
        self.ok: dict[str, bool | None] = {name: None for name in COMPONENTS}
        self.compared = 0

    def parts(self, a: list, b: list, a_rows: slice, b_rows: slice):
        for (name, x), (_, y) in zip(a, b):
            x, y = _rows(x, a_rows), _rows(y, b_rows)
            if x.shape != y.shape or not torch.equal(x, y):
                self.ok[name] = False
                return
            if self.ok[name] is None:
                self.ok[name] = True

    def forward(self, same: bool):
        self.ok["forward"] = same if self.ok["forward"] is None else self.ok["forward"] and same
        self.compared += 1


@torch.inference_mode()
def check(lm, contexts=CONTEXTS, rows: int = ROWS, seed: int = 0) -> Verdict:
    """Run scenarios A and B (module docstring) on `lm` and compare every part row by row."""
    config = lm.model.config
    limit = getattr(config, "max_position_embeddings", None) or 4096
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    mask_id = lm.settings.mask_token_id if lm.settings is not None else None
    g = torch.Generator().manual_seed(seed)
    judge, recorder = _Judge(), _Recorder()
    handles = _hooks(lm, recorder) if lm.lean is None else []
    lm.probe = recorder  # transformers' forward: BatchInvariant reports attention; the lean forward: every part
    if lm.lean is not None:
        lm.lean.probe = recorder
    try:
        for context in sorted({min(c, limit - 2 * rows - 1) for c in contexts if c > 0}):
            cache = _prefill(lm, torch.randint(0, vocab, (1, context), generator=g))
            recorder.take()
            # A. verify rows: M causal rows == the M one-row forwards of the AR loop
            step = torch.randint(0, vocab, (1, rows), generator=g)
            many, one = copy.deepcopy(cache), copy.deepcopy(cache)
            allowed = torch.cat([torch.ones(rows, context, dtype=torch.bool),
                                 torch.ones(rows, rows, dtype=torch.bool).tril()], 1)[None]
            logits = _forward(lm, step, context, allowed, many)
            multi = recorder.take()
            for j in range(rows):
                single = _forward(lm, step[:, j:j + 1], context + j,
                                  torch.ones(1, 1, context + j + 1, dtype=torch.bool), one)
                judge.parts(multi, recorder.take(), slice(j, j + 1), slice(0, 1))
                judge.forward(torch.equal(logits[0, j], single[0, 0]))
            judge.forward(_same_kv(many, one, context, context + rows))
            # B. slot rows (the adapter on them) == the same rows with more rows after them that they do not see
            n_slots = rows // 2
            ids = torch.randint(0, vocab, (1, 2 * rows), generator=g)
            if mask_id is not None:
                ids[:, rows - n_slots:] = mask_id
            sees = torch.ones(2 * rows, 2 * rows, dtype=torch.bool).tril()
            sees[rows - n_slots:rows, rows - n_slots:rows] = True  # a block: the slots see each other
            sees[:rows, rows:] = False
            slots = torch.zeros(1, 2 * rows, dtype=torch.bool)
            slots[:, rows - n_slots:] = True
            prefix_seen = torch.ones(2 * rows, context, dtype=torch.bool)
            results = []
            recorder.label = {"linears": "adapter"} if lm.settings is not None and lm.settings.adapter else {}
            for n in (rows, 2 * rows):
                part = copy.deepcopy(cache)
                out = _forward(lm, ids[:, :n], context, torch.cat([prefix_seen[:n], sees[:n, :n]], 1)[None], part,
                               slots[:, :n])
                results.append((out, part, recorder.take()))
            recorder.label = {}
            (a_out, a_cache, a_calls), (b_out, b_cache, b_calls) = results
            judge.parts(a_calls, b_calls, slice(0, rows), slice(0, rows))
            judge.forward(torch.equal(a_out[0], b_out[0, :rows]) and _same_kv(a_cache, b_cache, context, context + rows))
    finally:
        for h in handles:
            h.remove()
        lm.probe = None
        if lm.lean is not None:
            lm.lean.probe = None
    return Verdict(costs.machine_key(lm.model.dtype), attention_in_use(), judge.ok, judge.compared)


def _rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """Some rows of a part's output: [b, q, ...] on dim 1; a [b q, n] one (a router's input flattened, b = 1) on
    dim 0."""
    return t[rows] if t.dim() == 2 else t[:, rows]


def _forward(lm, ids, start, allowed, cache, slots=None):
    """One forward as the engine runs it: a layer that reads its neighbours or carries a state (nn/predecessors.py)
    reads each row after the one before it, and the state after the last row is committed."""
    b, n = ids.shape
    pos = torch.arange(n)[None] + start
    order = lambda: torch.arange(-1, n - 1).expand(b, n)  # noqa: E731
    with predecessors.predecessors(lm.model, order, cache) as seq:
        out = lm.forward(ids, pos, allowed, slots, past_key_values=cache)
    seq.commit(torch.full((b,), n - 1))
    return out


def _prefill(lm, prefix: torch.Tensor):
    cache = predecessors.new_cache(lm.model)
    L = prefix.shape[1]
    _forward(lm, prefix, 0, torch.ones(L, L, dtype=torch.bool).tril()[None], cache)
    return cache


def _same_kv(a, b, lo: int, hi: int) -> bool:
    for x, y in zip(a.layers, b.layers):
        for name in ("keys", "values"):
            s, t = getattr(x, name, None), getattr(y, name, None)
            if isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor):
                if not torch.equal(s[..., lo:hi, :], t[..., lo:hi, :]):
                    return False
    return True
