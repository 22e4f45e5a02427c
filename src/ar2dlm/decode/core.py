"""The engine core: one running batch that requests join and leave between steps.

`Batch` owns the step loop's bookkeeping, once, for every caller: `generate`,
`stream` and `eval` (engine.py) and the server's scheduler all drive it.
Between two steps `join` prefills newcomers as a batch of their own and merges
that state into the running one (`step.merge`); `leave` drops rows (finished,
or no one waits for them). Each `step` serves every row with one forward and
one host read, and hands back what each request took.

What a step decides, it decides here: the draft length and proposals
(adaptive drafting, `policy.AdaptiveDraft`), the candidate tree's siblings
(`cfg.tree`, tree.py), model-free candidates (each
request's suffix index, `suffix.py`), the AR short-circuit (a batch whose
drafting does not pay runs plain AR steps on the bare base weights),
compaction of the cache, and finishing (EOS, a stop string, max_new_tokens:
`Request.add`).

Greedy output of every row equals decoding it alone (the verify rule never
looks at other rows; a batch-invariant forward makes the logits bitwise the
same). Sampling draws from one generator per row, so a seeded request
reproduces whatever else shares its batch, given the same draft length. The
rows of one Batch share the settings that shape a step (`step_settings`); a
server runs one Batch per distinct setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from . import suffix
from .config import DecodeConfig
from .detok import Detokenizer
from .interface import DecodeModel
from .policy import AdaptiveDraft, CostModel
from .step import State, compact_cache, merge, prefill, select_rows, step

PER_REQUEST = {"max_new_tokens": 128, "stop": (), "seed": None, "eos_token_id": None}
"""DecodeConfig fields each row keeps for itself (its Request decides when it is done); the rest shape the step."""


def step_settings(cfg: DecodeConfig) -> DecodeConfig:
    """The settings a row shares with the rest of its running batch (the per-request fields at their defaults)."""
    return dataclasses.replace(cfg, **PER_REQUEST)


def row_seed(cfg: DecodeConfig, i: int) -> int | None:
    """The seed of a request's i-th row (prompt i of a batch, or choice i of a served request). Row 0 uses
    cfg.seed itself; row i > 0 a splitmix64 hash of (seed, i), so no two rows share a random stream, also across
    requests with neighbouring seeds (None: unseeded, each row random)."""
    if cfg.seed is None or i == 0:
        return cfg.seed
    z = (cfg.seed + i * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


@dataclass
class Stats:
    """Per-request decoding statistics."""

    new_tokens: int = 0
    forwards: int = 0
    accepted: dict[int, int] = field(default_factory=dict)
    """Histogram of tokens committed per step (r, incl. the bonus/correction token)."""
    wall_time: float = 0.0
    prefill_time: float = 0.0
    """Seconds until the prefill forward (prompt + first draft) was done; wall_time - prefill_time is decoding."""
    by_kind: dict[str, list[int]] = field(default_factory=dict)
    """Steps, tokens committed and siblings accepted, by where the step's candidates came from: "model" (the
    drafter's slots, one chain), "tree" (the drafter's slots with siblings, tree.py), "suffix" (the request's own
    text, `suffix.py`; the drafter's slots may follow it), "ar" (no draft). Prefill excluded."""

    siblings: dict[int, list[int]] = field(default_factory=dict)
    """Candidate trees, by depth j: [steps whose chain stopped at depth j beside siblings, of those the steps
    that took the sibling of rank 1, of rank 2, ...] (rank = its place among the depth's siblings, most likely
    first): `ar2dlm tune` prices a tree's shape with it."""

    @property
    def tpf(self) -> float:
        """Tokens per forward pass (prefill included; AR decoding gives 1.0)."""
        return self.new_tokens / max(self.forwards, 1)

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "forwards": self.forwards, "tpf": round(self.tpf, 4),
                "accepted_hist": {str(k): v for k, v in sorted(self.accepted.items())},
                "by_kind": {k: {"steps": n, "tokens": t, "tau": round(t / n, 3),
                                **({"siblings": s} if k == "tree" else {})}
                            for k, (n, t, s) in sorted(self.by_kind.items())},
                "wall_time": round(self.wall_time, 4),
                "tokens_per_s": round(self.new_tokens / self.wall_time, 3) if self.wall_time > 0 else None}


class Request:
    """One request's row: its prompt, settings, random stream, committed tokens, text, and when it is done.

    Its text is decoded incrementally (`Detokenizer`): each committed token once, stop strings looked for in
    the tail that can still match them.
    """

    def __init__(self, lm: DecodeModel, cfg: DecodeConfig, prompt: list[int] | None = None, seed: int | None = None):
        self.lm, self.cfg, self.prompt = lm, cfg, prompt
        self.eos = set(eos_ids(lm, cfg))
        self.tokens: list[int] = []
        self.stats = Stats()
        self.finish_reason = ""
        self.started = time.perf_counter()
        self.detok = Detokenizer(lm.tokenizer, tuple(cfg.stop))
        seed = cfg.seed if seed is None else seed
        self.generator = torch.Generator(device=lm.model.device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        self.lookup: suffix.SuffixIndex | None = None  # model-free candidates, when the batch uses them
        self.matched = 0  # tokens the suffix index continues the text with, for the next draft

    def add(self, new: list[int]) -> list[int]:
        """Append committed tokens up to EOS / max_new_tokens / a stop string; returns those taken."""
        taken = []
        for tok in new:
            taken.append(tok)
            self.tokens.append(tok)
            self.detok.add([tok])
            if tok in self.eos:
                self.finish_reason = "eos"
            elif self.detok.stopped:
                self.finish_reason = "stop"  # the token that completed a stop string is the last one
            elif len(self.tokens) >= self.cfg.max_new_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                self.detok.finish()
                break
        self.stats.new_tokens = len(self.tokens)
        return taken

    def text(self) -> str:
        """The text so far, cut before a stop string."""
        return self.detok.text

    def delta(self) -> str:
        """Text committed since the last call that is safe to show (held back while it may begin a stop string
        or ends inside a character); everything left once the request is done."""
        return self.detok.delta()

    def result(self) -> "Generation":
        return Generation(self.tokens, self.text(), self.stats, self.finish_reason)


@dataclass
class Generation:
    """One prompt's result: the new tokens only, their text, and the stats."""

    token_ids: list[int]
    text: str
    stats: Stats
    finish_reason: str  # "eos" | "length" | "stop"


class Batch:
    """One running batch whose rows share the step settings `cfg`. Rows are `Request`s, in the state's order."""

    def __init__(self, lm: DecodeModel, cfg: DecodeConfig):
        self.lm, self.cfg = lm, step_settings(cfg)
        self.K = 1 if cfg.ar else cfg.draft_len
        self.adaptive = None
        if cfg.adaptive and self.K > 1:
            self.adaptive = AdaptiveDraft(self.K, cfg.proposals, CostModel(lm.cost_table()), shape=cfg.tree)
            if self.adaptive.choose() == (1, 0):
                # drafting does not pay at the controller's prior, and steps without drafts observe nothing that
                # could change that: every step would be an AR step, so run the AR loop itself (no slot rows)
                self.K, self.adaptive = 1, None
        self.suffix = self.K > 1 and cfg.candidates != "diffusion" and cfg.sampler != "mix"
        self.proposals = 0 if self.K == 1 or cfg.candidates == "suffix" else cfg.proposals
        self.state: State | None = None
        self.rows: list[Request] = []
        self.forwards = 0  # forwards run (prefills and steps)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def join(self, requests: list[Request]) -> list[tuple[Request, list[int]]]:
        """Prefill the newcomers in one forward and add them; returns (request, tokens taken: the first one)."""
        prompts = [r.prompt for r in requests]
        with self._weights(self.K):
            state, t = prefill(self.lm, prompts, self.K, self.cfg, [r.generator for r in requests])
        now = time.perf_counter()
        for r in requests:
            r.stats.prefill_time = now - r.started
            if self.suffix:
                r.lookup = suffix.SuffixIndex(r.prompt, exclude=self.lm.mask_token_id)
        self.state = state if self.state is None else merge(self.state, state)
        self.rows += requests
        self.forwards += 1
        return self._deliver(requests, [[x] for x in t], len(self.rows) - len(requests))

    @torch.inference_mode()
    def step(self, draft: bool = True) -> list[tuple[Request, list[int]]]:
        """One forward over every row; `draft=False` makes it a plain AR step (no draft, no proposals).

        Returns (request, tokens taken) per row; rows that finished have left."""
        state = self.state
        if state.cache_valid.shape[1] > 2 * max(state.lengths) + 64:
            compact_cache(state)
        # every row drafts from its own text this step: verify those drafts alone (no slot rows, about the
        # cost of an AR step); the model drafts again where the text stops repeating
        copying = self.suffix and all(r.matched for r in self.rows)
        if not draft or self.K == 1:
            K, n = 1, 0
        elif self.adaptive is not None:
            K, n = self.adaptive.choose()
            n = 0 if self.cfg.candidates == "suffix" else n
            if copying:
                K, n = max(K, min(1 + max(r.matched for r in self.rows), self.K)), 0
        else:
            K, n = self.K, (0 if copying else self.proposals)
        # an AR step has no slot rows: the bare base weights give the same logits, for less
        shape = self.cfg.tree if K > 1 and not copying else ()  # a copied draft has no other candidates
        with self._weights(K):
            out = step(self.lm, state, n, self.cfg, [r.generator for r in self.rows], K, shape)
        self.forwards += 1
        if self.adaptive is not None and K > 1 and not copying:  # it learns how the model's drafts fare
            model = [i for i, r in enumerate(self.rows) if not r.matched]
            self.adaptive.update([out.r[i] for i in model], [out.offered[i] for i in model],
                                 [out.sibling[i] for i in model])
        tree = any(shape[:K - 1])
        kinds = ["ar" if K == 1 else "suffix" if r.matched else "tree" if tree else "model" for r in self.rows]
        for r, n_taken in zip(self.rows, out.r):
            r.stats.accepted[n_taken] = r.stats.accepted.get(n_taken, 0) + 1
        taken = self._deliver(list(self.rows), out.tokens, 0)
        first = {j: sum(shape[:j - 1]) for j in range(1, K)}  # the row index of depth j's first sibling
        for (r, got), kind, sibling, n_r, offered in zip(taken, kinds, out.sibling, out.r, out.offered):
            counts = r.stats.by_kind.setdefault(kind, [0, 0, 0])
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + len(got), counts[2] + (sibling >= 0)
            depth = n_r - (sibling >= 0)  # where the chain stopped
            if kind == "tree" and depth < offered and depth - 1 < len(shape) and shape[depth - 1]:
                seen = r.stats.siblings.setdefault(depth, [0] * (1 + shape[depth - 1]))
                seen += [0] * (1 + shape[depth - 1] - len(seen))
                seen[0] += 1
                if sibling >= 0:
                    seen[1 + sibling - first[depth]] += 1
        return taken

    @torch.inference_mode()
    def leave(self, requests) -> None:
        """Drop rows (finished, or no one is waiting for them) before the next step."""
        gone = {id(r) for r in requests}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.state = None
            return
        select_rows(self.state, keep)

    def _deliver(self, requests: list[Request], news: list[list[int]], first: int) -> list[tuple[Request, list[int]]]:
        """Hand each row its committed tokens; the suffix indexes take them and propose the next drafts; finished
        rows leave. `first`: the state row of requests[0]."""
        now = time.perf_counter()
        taken = []
        for r, new in zip(requests, news):
            r.stats.forwards += 1
            taken.append((r, r.add(new)))
            if r.finish_reason:
                r.stats.wall_time = now - r.started
        if self.suffix:
            self._look_up(requests, news, first)
        self.leave([r for r in requests if r.finish_reason])
        return taken

    def _look_up(self, requests: list[Request], news: list[list[int]], first: int) -> None:
        """Each row's suffix index takes its committed tokens; where the tail continues a match, that continuation
        becomes the row's next draft (suffix.apply)."""
        K = self.state.draft.shape[1]
        found = [[] for _ in range(first)] if first else []
        for r, new in zip(requests, news):
            r.lookup.extend(new)
            cont = r.lookup.propose(K - 1)
            r.matched = len(cont)
            found.append(cont)
        if any(found):
            suffix.apply(self.state.draft, self.state.draft_logits, self.state.n_draft, found)

    def _weights(self, K: int):
        return self.lm.base_weights() if K == 1 else contextlib.nullcontext()


def eos_ids(lm: DecodeModel, cfg: DecodeConfig) -> list[int]:
    if cfg.eos_token_id is not None:
        return list(cfg.eos_token_id)
    eos = getattr(lm.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
