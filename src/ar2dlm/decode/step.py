"""The step: prefill -> step (verify + pre-draft in ONE forward) -> commit, on a batch's tensors.

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
`compact_cache` squeezes them out when they pile up. With K = 1 and no
proposals the same code is the plain AR loop.

One host read per forward: a step reads back r, the real drafts it offered and
the committed tokens in one `tolist` (`Outcome`); a prefill reads its first
tokens. What the host needs besides (the longest row, whether the cache has
holes, where the slot rows start) the state keeps on the host as it commits,
and tells the forward (`slots_from`, `holes`), so nothing else is read back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..nn import masks, predecessors
from . import tree
from .config import DecodeConfig
from .interface import DecodeModel
from .policy import choose_proposals
from .verify import Generators, draw, verify


@dataclass
class State:
    cache: DynamicCache
    cache_valid: torch.Tensor  # [b, C] bool: slot holds a committed token
    length: torch.Tensor  # [b] L: position of d_1 (= committed tokens so far)
    draft: torch.Tensor  # [b, K] d_1..d_K
    draft_logits: torch.Tensor  # [b, K, V] slot logits that drafted d_j+1 at index j (index 0 unused)
    n_draft: torch.Tensor  # [b] real draft tokens (1..K)
    lengths: list[int]  # = length, on the host
    holes: bool  # whether cache_valid may hold a False (a hole); False only when it surely does not


@dataclass
class Outcome:
    """What one step committed, on the host: per row r (tokens committed), the real drafts it offered
    (min(n_draft, K) before the step), the committed tokens d_2..d_r, t, and which sibling was accepted."""

    r: list[int]
    offered: list[int]
    tokens: list[list[int]]
    sibling: list[int] = dataclasses.field(default_factory=list)
    """Per row the accepted sibling's index (tree.py), -1 for none."""


def prefill(lm: DecodeModel, prompts: list[list[int]], K: int, cfg: DecodeConfig,
            gen: Generators) -> tuple[State, list[int]]:
    """[prompt (causal) | P_0: K slots] in one forward; returns the state and each row's first token t."""
    device = lm.model.device
    b = len(prompts)
    sizes = [len(p) for p in prompts]
    lens = torch.tensor(sizes, device=device)  # [b]
    Lp = max(sizes)
    ids = torch.tensor([p + [0] * (Lp - len(p)) for p in prompts], dtype=torch.long, device=device)
    slots = K if K > 1 else 0  # with K = 1 there is nothing to draft
    pos = torch.cat([torch.arange(Lp, device=device).expand(b, Lp),
                     lens[:, None] + torch.arange(slots, device=device)], 1)  # [b, Lp+slots]
    ids = torch.cat([ids, torch.full((b, slots), mask_id(lm), device=device)], 1)
    mask_slots = (torch.arange(Lp + slots, device=device) >= Lp).expand(b, -1)
    cache = predecessors.new_cache(lm.model)
    # logits only where they are read: each prompt's last token and the P_0 slots (the LM head over a
    # whole prompt costs as much as several decode steps); column[i] = where position i's logits land
    if getattr(lm.model.get_output_embeddings(), "lora_A", None) is not None:
        keep, column = 0, list(range(Lp + slots))  # a LoRA'd head is gated by row: all rows
    else:
        rows = sorted({n - 1 for n in sizes} | set(range(Lp, Lp + slots)))
        keep, column = torch.tensor(rows, device=device), [0] * (Lp + slots)
        for j, i in enumerate(rows):
            column[i] = j
    with predecessors.predecessors(lm.model, lambda: predecessors.prefill_predecessors(lens, Lp, slots), cache,
                                   prompt=sizes) as seq:
        logits = lm.forward(ids, clamp_pos(lm, pos), masks.prefill_mask(lens, Lp, slots), mask_slots, cache,
                            slots_from=Lp, holes=min(sizes) < Lp and slots > 0, logits_to_keep=keep)
    seq.commit(lens - 1)  # conv / delayed-value state after each prompt's last token
    last = torch.tensor([column[n - 1] for n in sizes], device=device)
    t = draw(logits[torch.arange(b, device=device), last], cfg, lm.mask_token_id, gen)  # [b]
    predecessors.crop(cache, slots)
    valid = torch.arange(Lp, device=device)[None, :] < lens[:, None]  # [b, Lp]
    if slots:
        draft_logits = logits[:, column[Lp]:column[Lp] + slots]  # [b, K, V]; P_0 slot j drafts position L+j
        n_draft = torch.full((b,), K, device=device)
    else:
        draft_logits = logits.new_zeros(b, 1, logits.shape[-1])  # index 0 is never read
        n_draft = torch.ones(b, dtype=torch.long, device=device)
    draft = next_draft(t, draft_logits, cfg, lm.mask_token_id, gen)
    state = State(cache, valid, lens.clone(), draft, draft_logits, n_draft, list(sizes), min(sizes) < Lp)
    return state, t.tolist()  # the prefill's one host read


def step(lm: DecodeModel, state: State, n_proposals: int, cfg: DecodeConfig, gen: Generators,
         draft_len: int | None = None, shape: tuple[int, ...] = ()) -> Outcome:
    """One forward: verify the draft and pre-draft the next block; one host read (the Outcome).

    draft_len changes K for this step (adaptive drafting); the draft is cut or padded to it. shape: the
    candidate tree's siblings per depth (tree.py; () = the chain alone).
    """
    if draft_len is not None and draft_len != state.draft.shape[1]:
        resize_draft(state, draft_len)
    b, K = state.draft.shape
    device = state.draft.device
    w = cfg.mix_weight if cfg.sampler == "mix" else 0.0
    n = min(n_proposals, K) if K > 1 else 0
    R = choose_proposals(state.draft, state.draft_logits, state.n_draft, n, lm.mask_token_id, w) \
        if n else torch.zeros(b, 0, dtype=torch.long, device=device)  # [b, n]
    at = tree.depths(shape, K)
    S = len(at)
    sibs = tree.candidates(state.draft, state.draft_logits, state.n_draft, at, cfg, lm.mask_token_id, gen) \
        if S else None
    depth = torch.tensor(at, dtype=torch.long, device=device)  # [S]
    k = torch.arange(K, device=device)
    draft = state.draft
    ids = torch.cat([draft] + ([sibs.tokens] if S else []) + [torch.full((b, n * K), mask_id(lm), device=device)],
                    1)  # [b, K + S + nK]
    pos = torch.cat([state.length[:, None] + k, state.length[:, None] + depth,
                     (state.length[:, None] + R).repeat_interleave(K, 1) + k.repeat(n)], 1)
    rows = K + S  # the clean rows: the chain and the siblings; mask slots from here on
    mask_slots = (torch.arange(rows + n * K, device=device) >= rows).expand(b, -1)
    if S:
        attn = masks.tree_mask(state.cache_valid, K, depth, R)
        order = lambda: predecessors.tree_predecessors(R, K, depth)  # noqa: E731
        row = torch.arange(rows + n * K, device=device)
        # a sibling's keys are not where its token's keys are when it decodes alone: it reads them in rank order
        extra = {"compact": (row >= K) & (row < rows)}
    else:
        attn = masks.step_mask(state.cache_valid, K, R)
        order, extra = (lambda: predecessors.step_predecessors(R, K)), {}  # noqa: E731
    before = state.cache_valid.shape[1]
    with predecessors.predecessors(lm.model, order, state.cache) as seq:
        logits = lm.forward(ids, clamp_pos(lm, pos), attn, mask_slots, state.cache, slots_from=rows,
                            holes=state.holes, **extra)  # [b, K + S + nK, V]
    if S:
        sibs.logits = logits[:, K:rows]
        r, t, hit = tree.verify(cfg, logits[:, :K], draft, state.draft_logits, state.n_draft, lm.mask_token_id,
                                gen, sibs)
        last = torch.where(hit >= 0, K + hit, r - 1)  # the forward's row of the last committed token
    else:
        r, t = verify(cfg, logits[:, :K], draft, state.draft_logits, state.n_draft, lm.mask_token_id, gen)
        hit = torch.full_like(r, -1)
        last = r - 1
    seq.commit(last)  # conv / delayed-value state after the last committed token
    # committed: the accepted drafts d_2..d_r (an accepted sibling last of them), then t
    emitted = torch.cat([draft[:, 1:], t[:, None]], 1)  # [b, K]
    if S:
        at_sib = (r - 2).clamp(min=0)[:, None]
        sib = sibs.tokens.gather(1, hit.clamp(min=0)[:, None])
        emitted = emitted.scatter(1, at_sib, torch.where(hit[:, None] >= 0, sib, emitted.gather(1, at_sib)))
    emitted = emitted.scatter(1, (r - 1)[:, None], t[:, None])
    # the one host read
    read = torch.cat([r[:, None], state.n_draft.clamp(max=K)[:, None], hit[:, None], emitted], 1).tolist()
    out = Outcome([x[0] for x in read], [x[1] for x in read], [x[3:3 + x[0]] for x in read], [x[2] for x in read])
    if S and max(out.sibling) >= 0:  # an accepted sibling's keys and values to the slot its position owns
        predecessors.move_slots(state.cache, before + last, before + r - 1)
    commit(state, r, out.r, ids.shape[1])
    state.draft_logits, state.n_draft = proposal_for(logits[:, rows:], R, r, K, r - (hit >= 0).long())
    state.draft = next_draft(t, state.draft_logits, cfg, lm.mask_token_id, gen)
    return out


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


def commit(state: State, r: torch.Tensor, rs: list[int], appended: int) -> None:
    """Keep d_1..d_r of the `appended` new cache slots: crop to max(r), holes for the rest. rs: r on the host."""
    keep = max(rs)
    predecessors.crop(state.cache, appended - keep)
    new_valid = torch.arange(keep, device=r.device)[None, :] < r[:, None]  # [b, keep]
    state.cache_valid = torch.cat([state.cache_valid, new_valid], 1)
    state.length = state.length + r
    state.lengths = [n + ri for n, ri in zip(state.lengths, rs)]
    state.holes = state.holes or min(rs) < keep


def proposal_for(block_logits: torch.Tensor, R: torch.Tensor, r: torch.Tensor, K: int,
                 chain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next draft's logits from the proposal P_r' with r' = max{R <= chain} -> ([b, K, V], n_draft [b]).

    P_r' slot s sits at position L + r' + s; the new draft d'_{m+1} sits at
    L + r + m, i.e. slot r - r' + m. With r' = r the whole proposal is used;
    with r' < r only its last K - (r - r') slots; with no r' <= r the next
    draft is just [t]. chain: the drafts of the chain accepted (r, unless a
    sibling was: then r - 1; a proposal conditioned on the rejected d_r
    does not fit).
    """
    chain = r if chain is None else chain
    b = r.shape[0]
    n = R.shape[1]
    if n == 0:
        return block_logits.new_zeros(b, K, block_logits.shape[-1]), torch.ones(b, dtype=torch.long, device=r.device)
    vocab = block_logits.shape[-1]
    blocks = block_logits.view(b, n, K, vocab)
    idx = (R <= chain[:, None]).sum(1) - 1  # [b] index of r' in R, -1 = none
    has = idx >= 0
    idx = idx.clamp(min=0)
    shift = (r - R.gather(1, idx[:, None])[:, 0]).clamp(min=0)  # [b] r - r' (0 where there is no r')
    chosen = blocks[torch.arange(b, device=r.device), idx]  # [b, K, V]
    slot = (shift[:, None] + torch.arange(K, device=r.device)).clamp(max=K - 1)  # [b, K]
    draft_logits = chosen.gather(1, slot[:, :, None].expand(b, K, vocab))
    n_draft = torch.where(has, K - shift, torch.ones_like(shift))
    return draft_logits, n_draft


def next_draft(t: torch.Tensor, draft_logits: torch.Tensor, cfg: DecodeConfig, mask_token_id: int | None,
               gen: Generators) -> torch.Tensor:
    """[t, tokens drawn from draft_logits slots 1..] -> [b, K]."""
    if draft_logits.shape[1] <= 1:
        return t[:, None]
    return torch.cat([t[:, None], draw(draft_logits[:, 1:], cfg, mask_token_id, gen)], 1)


def compact_cache(state: State) -> None:
    """Squeeze holes out of the cache: each row's valid slots move to the front."""
    keep = max(state.lengths)  # every committed token holds a slot
    order = torch.sort((~state.cache_valid).to(torch.int8), dim=1, stable=True).indices[:, :keep]  # [b, keep]
    for layer in state.cache.layers:
        if not hasattr(layer, "keys"):  # a conv-only layer (LFM2's) holds a state per row, no slots
            continue
        idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, idx)
        idx = order[:, None, :, None].expand(-1, layer.values.shape[1], -1, layer.values.shape[-1])
        layer.values = layer.values.gather(2, idx)
    state.cache_valid = torch.arange(keep, device=order.device)[None, :] < state.length[:, None]
    state.holes = min(state.lengths) < keep


def select_rows(state: State, keep: list[int]) -> None:
    """Keep only these rows, in this order (finished rows leave); the holes flag stays as it was."""
    index = torch.tensor(keep, device=state.draft.device)
    predecessors.select_rows(state.cache, index)
    for name in ("cache_valid", "length", "draft", "draft_logits", "n_draft"):
        setattr(state, name, getattr(state, name)[index])
    state.lengths = [state.lengths[i] for i in keep]


def merge(a: State, b: State) -> State:
    """One state with a's rows, then b's: the shorter cache gets holes at its end; drafts are padded to the longer.

    Both states come from the same model (same layers, heads, dtype). Merging needs no copy of anyone's history:
    positions are explicit and the cache is read through `cache_valid`, so the shorter of the two caches gets
    holes appended at its end, which no row attends to (as after ragged acceptance):

    ```
    running  [a a a a a . ]        merged  [a a a a a . ]   . = hole
    newcomer [b b b]          ->           [b b b . . . ]
    ```
    """
    K = max(a.draft.shape[1], b.draft.shape[1])
    for s in (a, b):
        if s.draft.shape[1] < K:
            resize_draft(s, K)
    C = max(a.cache_valid.shape[1], b.cache_valid.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):
        if hasattr(la, "keys"):  # a conv-only layer (LFM2's) has none
            la.keys = torch.cat([_pad_slots(la.keys, C), _pad_slots(lb.keys, C)], 0)  # [b_a + b_b, heads, C, dim]
            la.values = torch.cat([_pad_slots(la.values, C), _pad_slots(lb.values, C)], 0)
        for name in ("conv_states", "recurrent_states"):  # a mixer's state after each row's last token
            if hasattr(la, name):
                setattr(la, name, [torch.cat([x, y], 0) for x, y in zip(getattr(la, name), getattr(lb, name))])
    valid = torch.cat([_pad_slots(a.cache_valid[:, None, :, None], C)[:, 0, :, 0],
                       _pad_slots(b.cache_valid[:, None, :, None], C)[:, 0, :, 0]], 0)  # [b, C]
    fields = {name: torch.cat([getattr(a, name), getattr(b, name)], 0)
              for name in ("length", "draft", "draft_logits", "n_draft")}
    holes = a.holes or b.holes or a.cache_valid.shape[1] != b.cache_valid.shape[1]
    return State(a.cache, valid, **fields, lengths=a.lengths + b.lengths, holes=holes)


def _pad_slots(x: torch.Tensor, C: int) -> torch.Tensor:
    """[b, h, c, d] -> [b, h, C, d] with zeros (holes) appended."""
    if x.shape[2] == C:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], C - x.shape[2], x.shape[3])], 2)


def mask_id(lm: DecodeModel) -> int:
    return lm.mask_token_id if lm.mask_token_id is not None else 0


def clamp_pos(lm: DecodeModel, pos: torch.Tensor) -> torch.Tensor:
    """Slots past the context only draft tokens beyond max_new_tokens; keep their positions legal."""
    ctx = lm.context_len
    return pos if ctx is None else pos.clamp(max=ctx - 1)
