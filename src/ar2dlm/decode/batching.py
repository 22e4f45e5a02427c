"""Continuous batching: requests join and leave a running batch between steps.

`engine.events` decodes a batch that only shrinks. A server needs rows to
join too: `Running` holds one running batch, and between two steps
`join` prefills the newcomers as a batch of their own (the engine's
`prefill`) and `merge`s that state into the running one; `leave` drops rows
(finished, or their client went away). Each `step` serves every row.

Merging needs no copy of anyone's history. Positions are explicit and the
cache is read through `cache_valid`, so the shorter of the two caches gets
holes appended at its end, which no row attends to (as after ragged
acceptance); `compact_cache` squeezes them out when they pile up:

```
running  [a a a a a . ]        merged  [a a a a a . ]   . = hole
newcomer [b b b]          ->           [b b b . . . ]
```

Greedy output of every row equals decoding it alone (the verify rule never
looks at other rows; a batch-invariant forward makes the logits bitwise the
same). Sampling draws from one generator per row (`verify.uniform`), so a
seeded request reproduces whatever else shares its batch, given the same
draft length. The rows of one `Running` share the settings that shape a
step (draft length, proposals, sampler, temperature, top-k, top-p); a
server runs one `Running` per distinct setting (`step_settings`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from .config import DecodeConfig
from .engine import Request, State, _controller, _hold_back, compact_cache, prefill, resize_draft, select_rows, step
from .interface import DecodeModel

PER_REQUEST = {"max_new_tokens": 128, "stop": (), "seed": None, "eos_token_id": None}
"""DecodeConfig fields each row keeps for itself (its Request decides when it is done); the rest shape the step."""


def step_settings(cfg: DecodeConfig) -> DecodeConfig:
    """The settings a row shares with the rest of its running batch (the per-request fields at their defaults)."""
    return dataclasses.replace(cfg, **PER_REQUEST)


def merge(a: State, b: State) -> State:
    """One state with a's rows, then b's: the shorter cache gets holes at its end; drafts are padded to the longer.

    Both states come from the same model (same layers, heads, dtype)."""
    K = max(a.draft.shape[1], b.draft.shape[1])
    for s in (a, b):
        if s.draft.shape[1] < K:
            resize_draft(s, K)
    C = max(a.cache_valid.shape[1], b.cache_valid.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_pad_slots(la.keys, C), _pad_slots(lb.keys, C)], 0)  # [b_a + b_b, heads, C, dim]
        la.values = torch.cat([_pad_slots(la.values, C), _pad_slots(lb.values, C)], 0)
        for name in ("conv_states", "recurrent_states"):  # a mixer's state after each row's last token
            if hasattr(la, name):
                setattr(la, name, [torch.cat([x, y], 0) for x, y in zip(getattr(la, name), getattr(lb, name))])
    valid = torch.cat([_pad_slots(a.cache_valid[:, None, :, None], C)[:, 0, :, 0],
                       _pad_slots(b.cache_valid[:, None, :, None], C)[:, 0, :, 0]], 0)  # [b, C]
    fields = {name: torch.cat([getattr(a, name), getattr(b, name)], 0)
              for name in ("length", "draft", "draft_logits", "n_draft", "rows")}
    return State(a.cache, valid, **fields)


def _pad_slots(x: torch.Tensor, C: int) -> torch.Tensor:
    """[b, h, c, d] -> [b, h, C, d] with zeros (holes) appended."""
    if x.shape[2] == C:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], C - x.shape[2], x.shape[3])], 2)


@dataclasses.dataclass
class Row:
    """One request in a running batch: its Request (tokens, when it is done), its RNG stream, its shown text."""

    out: Request
    generator: torch.Generator
    shown: str = ""
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def delta(self) -> str:
        """Text committed since the last call that is safe to show (held back while it may begin a stop string)."""
        text = self.out.text()
        if not self.out.finish_reason:
            text = _hold_back(text, self.out.cfg.stop)
            if text.endswith("\ufffd"):  # a character whose bytes are not all decoded yet
                return ""
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


class Running:
    """One running batch whose rows share the step settings `cfg`; rows are named by the caller's integer ids."""

    def __init__(self, lm: DecodeModel, cfg: DecodeConfig):
        self.lm, self.cfg = lm, step_settings(cfg)
        self.K = 1 if cfg.ar else cfg.draft_len
        self.adaptive = _controller(lm, self.cfg, self.K)
        if self.adaptive is not None and self.adaptive.choose() == (1, 0):  # as engine.events: AR steps only
            self.K, self.adaptive = 1, None
        self.state: State | None = None
        self.rows: dict[int, Row] = {}
        self.order: list[int] = []  # row ids in the state's row order
        self.forwards = 0  # forwards run (prefills and steps)

    def __len__(self) -> int:
        return len(self.order)

    @torch.inference_mode()
    def join(self, ids: list[int], prompts: list[list[int]], rows: list[Row]) -> dict[int, list[int]]:
        """Prefill the newcomers in one forward and add them; returns {id: tokens taken} (the first token)."""
        with self._weights(self.K):
            state, t = prefill(self.lm, prompts, self.K, self.cfg, [r.generator for r in rows])
        state.rows = torch.tensor(ids, device=state.rows.device)
        for i, row in zip(ids, rows):
            row.out.stats.prefill_time = time.perf_counter() - row.started
            self.rows[i] = row
        self.state = state if self.state is None else merge(self.state, state)
        self.order += ids
        self.forwards += 1
        return self._deliver(ids, [[x] for x in t.tolist()])

    @torch.inference_mode()
    def step(self, draft: bool = True) -> dict[int, list[int]]:
        """One forward over every row; `draft=False` makes it a plain AR step (no draft, no proposals).

        Returns {id: tokens taken}; rows that finished have left."""
        state = self.state
        if state.cache_valid.shape[1] > 2 * int(state.length.max()) + 64:
            compact_cache(state)
        if not draft or self.K == 1:
            K, n_proposals = 1, 0
        elif self.adaptive is not None:
            K, n_proposals = self.adaptive.choose()
        else:
            K, n_proposals = self.K, self.cfg.proposals
        if state.draft.shape[1] != K:
            resize_draft(state, K)
        n_before = state.n_draft.tolist() if self.adaptive is not None and K > 1 else None
        draft = state.draft
        with self._weights(K):
            r, t = step(self.lm, state, n_proposals, self.cfg, [self.rows[i].generator for i in self.order])
        self.forwards += 1
        if n_before is not None:
            self.adaptive.update(r.tolist(), n_before)
        # committed this step: the accepted drafts d_2..d_r, then t
        emitted = torch.cat([draft[:, 1:], t[:, None]], 1).scatter(1, (r - 1)[:, None], t[:, None])
        rs = r.tolist()
        for i, n in zip(self.order, rs):
            stats = self.rows[i].out.stats
            stats.accepted[n] = stats.accepted.get(n, 0) + 1
        return self._deliver(list(self.order), [e[:n] for e, n in zip(emitted.tolist(), rs)])

    @torch.inference_mode()
    def leave(self, ids) -> None:
        """Drop rows (finished, or no one is waiting for them) before the next step."""
        gone = set(ids) & set(self.order)
        if not gone:
            return
        keep = [j for j, i in enumerate(self.order) if i not in gone]
        for i in gone:
            del self.rows[i]
        self.order = [self.order[j] for j in keep]
        if not keep:
            self.state = None
            return
        select_rows(self.state, torch.tensor(keep, device=self.state.rows.device))

    def _deliver(self, ids: list[int], news: list[list[int]]) -> dict[int, list[int]]:
        taken, done = {}, []
        for i, new in zip(ids, news):
            out = self.rows[i].out
            out.stats.forwards += 1
            taken[i] = out.add(new)
            if out.finish_reason:
                out.stats.wall_time = time.perf_counter() - self.rows[i].started
                done.append(i)
        self.leave(done)
        return taken

    def _weights(self, K: int):
        # a step without slot rows runs the bare base weights: the same logits, for less
        return self.lm.base_weights() if K == 1 else contextlib.nullcontext()


def new_row(lm: DecodeModel, cfg: DecodeConfig, seed: int | None = None) -> Row:
    """A Row for a request with settings cfg; its generator is seeded with `seed` (None: cfg.seed, else random)."""
    seed = cfg.seed if seed is None else seed
    g = torch.Generator(device=lm.model.device)
    g.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    return Row(Request(lm, cfg), g)
