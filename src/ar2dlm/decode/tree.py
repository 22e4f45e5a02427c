r"""Candidate trees: more than one guess where the drafter is least sure, verified in the same forward.

The chain d_1..d_K is the drafter's one guess per position. A sibling is another candidate for position L+j
(where d_{j+1} sits), drawn from the same slot distribution q that drafted d_{j+1}: its next most likely tokens
(greedy) or further draws without replacement (the samplers). Each sibling is one more row of the step, a
leaf whose parent is d_j (`nn.masks.tree_mask`). The tree's shape is `shape[j-1]` = m_j siblings at depth j.

```
depth      1     2     3            K = 4, shape = (2, 1)
chain  d1 -> d2 -> d3 -> d4
         \-> a
         \-> b
               \-> c
```

Verification walks the chain as before; where it stops at depth j (d_{j+1} rejected), the siblings at depth j
are tried in order. An accepted sibling commits one token more (r = j + 1) and the next token comes from its
own AR row. The rules keep each sampler exact:

- greedy: a sibling is accepted iff it is argmax p_j (at most one is: they are distinct and differ from d_{j+1}).
- lossless / mix: sequential rejection without replacement (SpecTr / recursive speculative decoding). d_{j+1}
  ~ q, sibling i ~ q_i = q without d_{j+1} and the siblings before it. Stage 0 verifies d_{j+1} against p_j as
  the chain always does; after a rejection the target is the residual p' = norm((p' - q_i)+), which is zero on
  every token rejected so far, and sibling i is accepted with probability min(1, p'(s_i) / q_i(s_i)). If every
  sibling is rejected, t ~ the last residual. Each stage is one speculative-sampling step (exact for any draft
  distribution its sample came from), so the token at L+j is distributed as p_j.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from .config import DecodeConfig
from .verify import Generators, accept, exclude_mask_token, greedy_chain, mix_logits, process_logits, sample, uniform


@dataclass
class Siblings:
    """A step's siblings: tokens, valid [b, S]; at: each one's depth; q [b, S, V]: the distribution each was
    drawn from (None when greedy); logits [b, S, V]: their rows' AR logits, once the step has run."""

    tokens: torch.Tensor
    valid: torch.Tensor
    at: list[int]
    q: torch.Tensor | None
    logits: torch.Tensor | None = None


def depths(shape: tuple[int, ...], K: int) -> list[int]:
    """Each sibling's depth j (1..K-1), in row order: shape[j-1] siblings at depth j."""
    return [j for j in range(1, K) for _ in range(shape[j - 1] if j - 1 < len(shape) else 0)]


def rows(shape: tuple[int, ...], K: int) -> int:
    """Sibling rows of a step with draft length K."""
    return len(depths(shape, K))


def candidates(draft: torch.Tensor, draft_logits: torch.Tensor, n_draft: torch.Tensor, at: list[int],
               cfg: DecodeConfig, mask_token_id: int | None, gen: Generators) -> Siblings:
    """The siblings at depths `at`, drawn from the slots that drafted the chain (module docstring).

    A sibling is valid where the chain has a real draft at its position (depth < n_draft) and the slot gave it
    some probability (a suffix candidate's point mass leaves no other token).
    """
    b, K = draft.shape
    device = draft.device
    S = len(at)
    tokens = torch.zeros(b, S, dtype=torch.long, device=device)
    valid = torch.zeros(b, S, dtype=torch.bool, device=device)
    qs = None if cfg.greedy else draft_logits.new_zeros(b, S, draft_logits.shape[-1], dtype=torch.float32)
    i = 0
    for j in sorted(set(at)):
        m = at.count(j)
        real = (j < n_draft)[:, None]  # [b, 1]
        if cfg.greedy:
            logits = exclude_mask_token(draft_logits[:, j].float(), mask_token_id)
            logits = logits.scatter(1, draft[:, j:j + 1], float("-inf"))  # d_{j+1} is the chain's
            top = logits.topk(m, dim=-1)
            tokens[:, i:i + m] = top.indices
            valid[:, i:i + m] = real & torch.isfinite(top.values)
        else:
            q = process_logits(draft_logits[:, j], cfg, mask_token_id).scatter(1, draft[:, j:j + 1], 0.0)
            for k in range(m):
                left = q.sum(-1, keepdim=True) > 0  # [b, 1]
                s = sample(torch.where(left, q, torch.ones_like(q)), gen)
                tokens[:, i + k] = s
                valid[:, i + k] = real[:, 0] & left[:, 0]
                qs[:, i + k] = q / q.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
                q = q.scatter(1, s[:, None], 0.0)
        i += m
    return Siblings(tokens, valid, at, qs)


def verify(cfg: DecodeConfig, p_logits: torch.Tensor, draft: torch.Tensor, draft_logits: torch.Tensor,
           n_draft: torch.Tensor, mask_token_id: int | None, gen: Generators,
           siblings: Siblings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`verify.verify` with siblings (siblings.logits set) -> (r, t, hit [b]: the accepted sibling or -1)."""
    if cfg.sampler == "mix":
        p_logits = mix_logits(p_logits, draft_logits, n_draft, cfg.mix_weight)
    at = torch.tensor(siblings.at, device=draft.device)
    if cfg.greedy:
        target, r = greedy_chain(p_logits, draft, n_draft, mask_token_id)
        return greedy(target, r, siblings.logits, siblings.tokens, siblings.valid, at, mask_token_id)
    p = process_logits(p_logits, cfg, mask_token_id)
    q = process_logits(draft_logits, cfg, mask_token_id)
    r = accept(p, q, draft, n_draft, gen)
    p_sib = process_logits(siblings.logits, cfg, mask_token_id)
    return speculative(p, q, draft, n_draft, r, p_sib, siblings.tokens, siblings.valid, siblings.q, siblings.at,
                       gen)


def greedy(target: torch.Tensor, r: torch.Tensor, sib_logits: torch.Tensor, tokens: torch.Tensor,
           valid: torch.Tensor, at: torch.Tensor, mask_token_id: int | None):
    """After the chain's greedy verification (target [b, K] = argmax p_j, r [b]): the sibling at depth r that is
    target_r, if any -> (r, t, hit [b]: the sibling's index or -1)."""
    want = target.gather(1, (r - 1)[:, None])  # [b, 1]: the token the AR loop puts at L + r
    match = valid & (at[None, :] == r[:, None]) & (tokens == want)  # [b, S]
    hit = torch.where(match.any(1), match.long().argmax(1), torch.full_like(r, -1))
    bonus = exclude_mask_token(sib_logits, mask_token_id).argmax(-1)  # [b, S]
    t = torch.where(hit >= 0, bonus.gather(1, hit.clamp(min=0)[:, None])[:, 0], want[:, 0])
    return r + (hit >= 0).long(), t, hit


def speculative(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, n_draft: torch.Tensor, r: torch.Tensor,
                p_sib: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, q_sib: torch.Tensor,
                at: list[int], generator: Generators):
    """Sequential rejection over the siblings at depth r where the chain stopped on a rejection (module
    docstring). p, q: [b, K, V] as `verify.speculative` takes them; p_sib: [b, S, V] each sibling row's AR
    distribution (its bonus); q_sib: [b, S, V] the distribution each sibling was drawn from.
    -> (r, t, hit [b] or -1), t drawn once per row."""
    b, K, V = p.shape
    S = len(at)
    u = uniform((b, S), generator, p.device, torch.float32)
    ar = torch.arange(b, device=p.device)
    p_r = p[ar, r - 1]  # [b, V]
    q_next = q[ar, r.clamp(max=K - 1)]
    rejected = r < n_draft  # d_{r+1} was real and was rejected
    res = _residual(p_r, q_next)
    hit = torch.full_like(r, -1)
    for i, j in enumerate(at):
        live = rejected & (r == j) & valid[:, i] & (hit < 0)  # [b]
        p_s = res.gather(1, tokens[:, i:i + 1])[:, 0]
        q_s = q_sib[:, i].gather(1, tokens[:, i:i + 1])[:, 0]
        take = live & (u[:, i] * q_s < p_s)
        hit = torch.where(take, torch.full_like(hit, i), hit)
        res = torch.where((live & ~take)[:, None], _residual(res, q_sib[:, i]), res)
    bonus = p_sib[ar, hit.clamp(min=0)]
    dist = torch.where((hit >= 0)[:, None], bonus, torch.where(rejected[:, None], res, p_r))
    return r + (hit >= 0).long(), sample(dist, generator), hit


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm((p - q)+); p itself where that is empty (p == q: the rejection had probability 0)."""
    res = (p - q).clamp_min(0)
    total = res.sum(-1, keepdim=True)
    return torch.where(total > 0, res / total.clamp_min(torch.finfo(res.dtype).tiny), p)
