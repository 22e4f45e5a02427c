"""The decode engine: prefill -> step (verify + pre-draft in ONE forward) -> commit.

State per batch row: the KV cache holds committed tokens (positions < L);
`draft` [b, K] is d_1..d_K where d_1 is already decided and d_2.. are guesses
at positions L+1..; `draft_logits` [b, K, V] are the slot logits that drafted
them (q). One step feeds [draft | P_r for r in R] (docs/DESIGN.md §3), verifies the
draft against the AR logits p read at the draft rows, commits d_1..d_r by
cropping the cache (never recomputing), and takes the next draft from the
proposal conditioned on the accepted prefix.

Ragged batches: rows accept different r, so after a step row i keeps r_i of
the max(r) appended cache slots; the rest become holes that `cache_valid`
masks out. Positions are explicit, so holes cost memory only, and
`compact_cache` squeezes them out when they pile up. Finished rows leave the
batch. With K = 1 and no proposals the same code is the plain AR loop.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import DynamicCache

from ..core.errors import ConfigError
from ..nn import masks, predecessors
from ..nn.vocab import embedding_rows
from . import suffix
from .config import DecodeConfig
from .interface import DecodeModel
from .policy import AdaptiveDraft, CostModel, choose_proposals
from .verify import draw, verify


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

    @property
    def tpf(self) -> float:
        """Tokens per forward pass (prefill included; AR decoding gives 1.0)."""
        return self.new_tokens / max(self.forwards, 1)

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "forwards": self.forwards, "tpf": round(self.tpf, 4),
                "accepted_hist": {str(k): v for k, v in sorted(self.accepted.items())},
                "wall_time": round(self.wall_time, 4),
                "tokens_per_s": round(self.new_tokens / self.wall_time, 3) if self.wall_time > 0 else None}


@dataclass
class Generation:
    """One prompt's result: the new tokens only, their text, and the stats."""

    token_ids: list[int]
    text: str
    stats: Stats
    finish_reason: str  # "eos" | "length" | "stop"


@dataclass
class State:
    cache: DynamicCache
    cache_valid: torch.Tensor  # [b, C] bool: slot holds a committed token
    length: torch.Tensor  # [b] L: position of d_1 (= committed tokens so far)
    draft: torch.Tensor  # [b, K] d_1..d_K
    draft_logits: torch.Tensor  # [b, K, V] slot logits that drafted d_j+1 at index j (index 0 unused)
    n_draft: torch.Tensor  # [b] real draft tokens (1..K)
    rows: torch.Tensor  # [b] which request each row is


# ---------------------------------------------------------------------------- steps
def prefill(lm: DecodeModel, prompts: list[list[int]], K: int, cfg: DecodeConfig, gen) -> tuple[State, torch.Tensor]:
    """[prompt (causal) | P_0: K slots] in one forward; returns the state and t [b]."""
    device = lm.model.device
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    Lp = int(lens.max())
    ids = torch.zeros(b, Lp, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)
    slots = K if K > 1 else 0  # with K = 1 there is nothing to draft
    pos = torch.cat([torch.arange(Lp, device=device).expand(b, Lp),
                     lens[:, None] + torch.arange(slots, device=device)], 1)  # [b, Lp+slots]
    ids = torch.cat([ids, torch.full((b, slots), _mask_id(lm), device=device)], 1)
    mask_slots = (torch.arange(Lp + slots, device=device) >= Lp).expand(b, -1)
    cache = predecessors.new_cache(lm.model)
    # logits only where they are read: each prompt's last token and the P_0 slots (the LM head over a
    # whole prompt costs as much as several decode steps); column[i] = where position i's logits land
    if getattr(lm.model.get_output_embeddings(), "lora_A", None) is not None:
        keep, column = 0, torch.arange(Lp + slots, device=device)  # a LoRA'd head is gated by row: all rows
    else:
        keep = torch.cat([lens - 1, torch.arange(Lp, Lp + slots, device=device)]).unique()  # sorted
        column = torch.zeros(Lp + slots, dtype=torch.long, device=device)
        column[keep] = torch.arange(len(keep), device=device)
    with predecessors.predecessors(lm.model, lambda: predecessors.prefill_predecessors(lens, Lp, slots), cache) as seq:
        logits = lm.forward(ids, _clamp_pos(lm, pos), masks.prefill_mask(lens, Lp, slots), mask_slots, cache,
                            logits_to_keep=keep)
    seq.commit(lens - 1)  # conv / delayed-value state after each prompt's last token
    t = draw(logits[torch.arange(b, device=device), column[lens - 1]], cfg, lm.mask_token_id, gen)  # [b]
    _crop(cache, slots)
    valid = torch.arange(Lp, device=device)[None, :] < lens[:, None]  # [b, Lp]
    if slots:
        draft_logits = logits[:, column[Lp:]]  # [b, K, V]; P_0 slot j drafts position L+j
        n_draft = torch.full((b,), K, device=device)
    else:
        draft_logits = logits.new_zeros(b, 1, logits.shape[-1])  # index 0 is never read
        n_draft = torch.ones(b, dtype=torch.long, device=device)
    draft = _next_draft(t, draft_logits, cfg, lm.mask_token_id, gen)
    state = State(cache, valid, lens.clone(), draft, draft_logits, n_draft, torch.arange(b, device=device))
    return state, t


def step(lm: DecodeModel, state: State, n_proposals: int, cfg: DecodeConfig, gen, draft_len: int | None = None):
    """One forward: verify the draft and pre-draft the next block. Returns (r [b], t [b]).

    draft_len changes K for this step (adaptive drafting); the draft is cut or padded to it.
    """
    if draft_len is not None and draft_len != state.draft.shape[1]:
        resize_draft(state, draft_len)
    b, K = state.draft.shape
    device = state.draft.device
    w = cfg.mix_weight if cfg.sampler == "mix" else 0.0
    R = choose_proposals(state.draft, state.draft_logits, state.n_draft, n_proposals, lm.mask_token_id, w) \
        if n_proposals else torch.zeros(b, 0, dtype=torch.long, device=device)  # [b, n]
    n = R.shape[1]
    k = torch.arange(K, device=device)
    ids = torch.cat([state.draft, torch.full((b, n * K), _mask_id(lm), device=device)], 1)  # [b, K+nK]
    pos = torch.cat([state.length[:, None] + k,
                     (state.length[:, None] + R).repeat_interleave(K, 1) + k.repeat(n)], 1)  # [b, K+nK]
    mask_slots = (torch.arange(K + n * K, device=device) >= K).expand(b, -1)
    attn = masks.step_mask(state.cache_valid, K, R)
    with predecessors.predecessors(lm.model, lambda: predecessors.step_predecessors(R, K), state.cache) as seq:
        logits = lm.forward(ids, _clamp_pos(lm, pos), attn, mask_slots, state.cache)  # [b, K+nK, V]
    r, t = verify(cfg, logits[:, :K], state.draft, state.draft_logits, state.n_draft, lm.mask_token_id, gen)
    seq.commit(r - 1)  # conv / delayed-value state after d_r
    commit(state, r, ids.shape[1])
    state.draft_logits, state.n_draft = _proposal_for(logits[:, K:], R, r, K)
    state.draft = _next_draft(t, state.draft_logits, cfg, lm.mask_token_id, gen)
    return r, t


def resize_draft(state: State, K: int) -> None:
    """Cut the draft to K tokens, or pad it (padding is never a real draft: n_draft stays)."""
    b, old = state.draft.shape
    if K < old:
        state.draft, state.draft_logits = state.draft[:, :K], state.draft_logits[:, :K]
        state.n_draft = state.n_draft.clamp(max=K)
        return
    vocab = state.draft_logits.shape[-1]
    state.draft = torch.cat([state.draft, state.draft.new_zeros(b, K - old)], 1)
    pad = state.draft_logits.new_zeros(b, K - state.draft_logits.shape[1], vocab)
    state.draft_logits = torch.cat([state.draft_logits, pad], 1)


def commit(state: State, r: torch.Tensor, appended: int) -> None:
    """Keep d_1..d_r of the `appended` new cache slots: crop to max(r), holes for the rest."""
    keep = int(r.max())
    _crop(state.cache, appended - keep)
    new_valid = torch.arange(keep, device=r.device)[None, :] < r[:, None]  # [b, keep]
    state.cache_valid = torch.cat([state.cache_valid, new_valid], 1)
    state.length = state.length + r


def _proposal_for(block_logits: torch.Tensor, R: torch.Tensor, r: torch.Tensor, K: int):
    """Next draft's logits from the proposal P_r' with r' = max{R <= r} -> ([b, K, V], n_draft [b]).

    P_r' slot s sits at position L + r' + s; the new draft d'_{m+1} sits at
    L + r + m, i.e. slot r - r' + m. With r' = r the whole proposal is used;
    with r' < r only its last K - (r - r') slots; with no r' <= r the next
    draft is just [t].
    """
    b = r.shape[0]
    n = R.shape[1]
    if n == 0:
        return block_logits.new_zeros(b, K, block_logits.shape[-1]), torch.ones(b, dtype=torch.long, device=r.device)
    vocab = block_logits.shape[-1]
    blocks = block_logits.view(b, n, K, vocab)
    idx = (R <= r[:, None]).sum(1) - 1  # [b] index of r' in R, -1 = none
    has = idx >= 0
    idx = idx.clamp(min=0)
    shift = (r - R.gather(1, idx[:, None])[:, 0]).clamp(min=0)  # [b] r - r' (0 where there is no r')
    chosen = blocks[torch.arange(b, device=r.device), idx]  # [b, K, V]
    slot = (shift[:, None] + torch.arange(K, device=r.device)).clamp(max=K - 1)  # [b, K]
    draft_logits = chosen.gather(1, slot[:, :, None].expand(b, K, vocab))
    n_draft = torch.where(has, K - shift, torch.ones_like(shift))
    return draft_logits, n_draft


def _next_draft(t, draft_logits, cfg, mask_token_id, gen) -> torch.Tensor:
    """[t, tokens drawn from draft_logits slots 1..] -> [b, K]."""
    if draft_logits.shape[1] <= 1:
        return t[:, None]
    return torch.cat([t[:, None], draw(draft_logits[:, 1:], cfg, mask_token_id, gen)], 1)


def _controller(lm: DecodeModel, cfg: DecodeConfig, K: int) -> AdaptiveDraft | None:
    if not cfg.adaptive or K == 1:
        return None
    return AdaptiveDraft(K, cfg.proposals, CostModel(lm.cost_table()))


def compact_cache(state: State) -> None:
    """Squeeze holes out of the cache: each row's valid slots move to the front."""
    counts = state.cache_valid.sum(1)  # [b]
    keep = int(counts.max())
    order = torch.sort((~state.cache_valid).to(torch.int8), dim=1, stable=True).indices[:, :keep]  # [b, keep]
    for layer in state.cache.layers:
        idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, idx)
        idx = order[:, None, :, None].expand(-1, layer.values.shape[1], -1, layer.values.shape[-1])
        layer.values = layer.values.gather(2, idx)
    state.cache_valid = torch.arange(keep, device=counts.device)[None, :] < counts[:, None]


def select_rows(state: State, keep: torch.Tensor) -> None:
    """Drop finished rows (keep: indices of the rows that go on)."""
    predecessors.select_rows(state.cache, keep)
    for name in ("cache_valid", "length", "draft", "draft_logits", "n_draft", "rows"):
        setattr(state, name, getattr(state, name)[keep])


# ---------------------------------------------------------------------------- loop
def events(lm: DecodeModel, prompts: list[list[int]], cfg: DecodeConfig,
           outs: list["Request"]) -> Iterator[tuple[int, list[int]]]:
    """Decode every prompt, yielding (request, tokens) as tokens are committed; results land in `outs`."""
    check_request(lm, prompts, cfg)
    K = 1 if cfg.ar else cfg.draft_len
    adaptive = _controller(lm, cfg, K)
    if adaptive is not None and adaptive.choose() == (1, 0):
        # drafting does not pay at the controller's prior, and steps without drafts observe nothing that
        # could change that: every step would be an AR step, so run the AR loop itself (no slot rows)
        K, adaptive = 1, None
    n_proposals = 0 if K == 1 or cfg.candidates == "suffix" else cfg.proposals
    lookup = None  # a suffix index per request: model-free candidates (suffix.py)
    if K > 1 and cfg.candidates != "diffusion" and cfg.sampler != "mix":
        lookup = [suffix.SuffixIndex(p, exclude=lm.mask_token_id) for p in prompts]
    draft_len = K
    gen = torch.Generator(device=lm.model.device)
    gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ()).item()))
    start = time.perf_counter()
    with torch.inference_mode(), (lm.base_weights() if K == 1 else contextlib.nullcontext()):
        state, t = prefill(lm, prompts, K, cfg, gen)
        for out in outs:
            out.stats.prefill_time = time.perf_counter() - start
        news = [[x] for x in t.tolist()]
        matched = _look_up(state, lookup, news)
        while True:
            done = []
            for i, (row, new) in enumerate(zip(state.rows.tolist(), news)):
                out = outs[row]
                out.stats.forwards += 1
                if taken := out.add(new):
                    yield row, taken
                if out.finish_reason:
                    out.stats.wall_time = time.perf_counter() - start
                    done.append(i)
            if done:
                keep = [i for i in range(len(news)) if i not in done]
                if not keep:
                    return
                select_rows(state, torch.tensor(keep, device=state.rows.device))
                matched = [matched[i] for i in keep]
            if state.cache_valid.shape[1] > 2 * int(state.length.max()) + 64:
                compact_cache(state)
            # every row drafts from its own text this step: verify those drafts alone (no slot rows, about the
            # cost of an AR step); the model drafts again where the text stops repeating
            copying = lookup is not None and all(matched)
            n_step = 0 if copying or cfg.candidates == "suffix" else n_proposals
            if adaptive is not None:
                draft_len, n_step = adaptive.choose()
                if copying:
                    draft_len, n_step = max(draft_len, min(1 + max(matched), K)), 0
                n_step = 0 if cfg.candidates == "suffix" else n_step
                n_before = state.n_draft.clamp(max=draft_len).tolist()
            draft = state.draft[:, :draft_len] if adaptive is not None else state.draft
            # an adaptive AR step has no slot rows: the bare base weights give the same logits, for less
            with lm.base_weights() if adaptive is not None and draft_len == 1 else contextlib.nullcontext():
                r, t = step(lm, state, n_step, cfg, gen, draft_len if adaptive is not None else None)
            if adaptive is not None and not copying:  # it learns how the model's drafts fare
                model_rows = [i for i, m in enumerate(matched or [0] * len(n_before)) if not m]
                adaptive.update([r.tolist()[i] for i in model_rows], [n_before[i] for i in model_rows])
            # committed this step: the accepted drafts d_2..d_r, then t
            emitted = torch.cat([draft[:, 1:], t[:, None]], 1).scatter(1, (r - 1)[:, None], t[:, None])
            news = [e[:n] for e, n in zip(emitted.tolist(), r.tolist())]
            matched = _look_up(state, lookup, news)
            for row, n in zip(state.rows.tolist(), r.tolist()):
                outs[row].stats.accepted[n] = outs[row].stats.accepted.get(n, 0) + 1


def _look_up(state: State, lookup: list | None, news: list[list[int]]) -> list[int]:
    """Add each row's committed tokens to its request's suffix index; where the tail continues a match, that
    continuation becomes the row's next draft (suffix.apply). Returns each row's continuation length."""
    if lookup is None:
        return [0] * len(news)
    K = state.draft.shape[1]
    found = []
    for row, new in zip(state.rows.tolist(), news):
        lookup[row].extend(new)
        found.append(lookup[row].propose(K - 1))
    if any(found):
        suffix.apply(state.draft, state.draft_logits, state.n_draft, found)
    return [len(f) for f in found]


def generate(lm: DecodeModel, prompts: list[list[int]], cfg: DecodeConfig) -> list[Generation]:
    """Decode a batch; one Generation per prompt, in order."""
    outs = [Request(lm, cfg) for _ in prompts]
    for _ in events(lm, prompts, cfg, outs):
        pass
    return [o.result() for o in outs]


def stream(lm: DecodeModel, prompt: list[int], cfg: DecodeConfig, out: "Request | None" = None) -> Iterator[str]:
    """Yield text deltas as tokens are committed (one prompt). Pass `out` to read the stats after."""
    out = out or Request(lm, cfg)
    shown = ""
    for _row, _tokens in events(lm, [prompt], cfg, [out]):
        text = _hold_back(out.text(), cfg.stop) if not out.finish_reason else out.text()
        if not text.endswith("\ufffd") and len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = out.text()
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]


class Request:
    """Accumulates one request's committed tokens and decides when it is finished."""

    def __init__(self, lm: DecodeModel, cfg: DecodeConfig):
        self.lm, self.cfg, self.eos = lm, cfg, set(eos_ids(lm, cfg))
        self.tokens: list[int] = []
        self.stats = Stats()
        self.finish_reason = ""

    def add(self, new: list[int]) -> list[int]:
        """Append committed tokens up to EOS / max_new_tokens / a stop string; returns those taken."""
        taken = []
        for tok in new:
            taken.append(tok)
            self.tokens.append(tok)
            if tok in self.eos:
                self.finish_reason = "eos"
            elif self.cfg.stop and self.text() != self._decoded:
                self.finish_reason = "stop"  # the token that completed a stop string is the last one
            elif len(self.tokens) >= self.cfg.max_new_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                break
        self.stats.new_tokens = len(self.tokens)
        return taken

    @property
    def _decoded(self) -> str:
        return self.lm.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def text(self) -> str:
        return _cut_stop(self.lm.tokenizer.decode(self.tokens, skip_special_tokens=True), self.cfg.stop)

    def result(self) -> Generation:
        return Generation(self.tokens, self.text(), self.stats, self.finish_reason)


# ---------------------------------------------------------------------------- helpers
def check_request(lm: DecodeModel, prompts: list[list[int]], cfg: DecodeConfig) -> None:
    """Errors a user can fix, before any compute."""
    if not cfg.ar and lm.mask_token_id is None:
        raise ConfigError("this model has no mask token (not converted): use ar=True, or `ar2dlm convert` it",
                          field="ar")
    if len(prompts) == 0:
        raise ConfigError("prompts is empty: give at least one prompt")
    ctx = lm.context_len
    window = getattr(lm.model.config, "sliding_window", None)
    vocab = embedding_rows(lm.model)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty: give at least one token")
        if window and len(p) + cfg.max_new_tokens > window:
            # our masks are full attention; past the window they would not match the model's own
            raise ConfigError(f"prompt {i}: {len(p)} tokens + max_new_tokens={cfg.max_new_tokens} exceed the "
                              f"model's sliding attention window ({window}); ar2dlm decodes within the window only",
                              field="max_new_tokens")
        if ctx is not None and len(p) >= ctx:
            raise ConfigError(f"prompt {i} has {len(p)} tokens, as many as the model's context of {ctx} tokens or "
                              f"more: shorten it to at most {ctx - 1} tokens")
        if ctx is not None and len(p) + cfg.max_new_tokens > ctx:
            raise ConfigError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={cfg.max_new_tokens} that "
                              f"exceeds the model's context of {ctx} tokens: shorten the prompt or lower "
                              f"max_new_tokens to at most {ctx - len(p)}", field="max_new_tokens")
        if max(p) >= vocab or min(p) < 0:
            raise ConfigError(f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1})")


def eos_ids(lm: DecodeModel, cfg: DecodeConfig) -> list[int]:
    if cfg.eos_token_id is not None:
        return list(cfg.eos_token_id)
    eos = getattr(lm.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _mask_id(lm: DecodeModel) -> int:
    return lm.mask_token_id if lm.mask_token_id is not None else 0


def _clamp_pos(lm: DecodeModel, pos: torch.Tensor) -> torch.Tensor:
    """Slots past the context only draft tokens beyond max_new_tokens; keep their positions legal."""
    ctx = lm.context_len
    return pos if ctx is None else pos.clamp(max=ctx - 1)


def _crop(cache: DynamicCache, n: int) -> None:
    """Drop the last n cache slots (crop(-n); crop(0) would mean 'drop nothing' only for n > 0)."""
    predecessors.crop(cache, n)


def _hold_back(text: str, stops) -> str:
    """Text safe to show while decoding goes on: without a tail that could begin a stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return text[:-n]
    return text


def _cut_stop(text: str, stops) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]
