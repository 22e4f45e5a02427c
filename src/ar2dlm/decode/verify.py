"""Acceptance rules: greedy, lossless (speculative sampling) and mix (logit mixing).

Names follow the speculative-sampling papers: p is the AR (target)
distribution, q the drafting distribution the draft token was sampled from.

Index convention for one step with draft d_1..d_K (d_1 already committed):
p[:, j-1] is p_j, the AR distribution of the token at L+j, read at d_j;
it verifies d_{j+1} = draft[:, j], which was drafted from q[:, j].
`n_draft` [b] counts real draft tokens (d_1..d_n); later ones are padding and
are never accepted. Every function returns r [b] (committed drafts, >= 1)
and t [b] (the next token, at position L+r).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .config import DecodeConfig

Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""One generator for the whole batch, one per batch row (each row's draws from its own stream), or None."""


def process_logits(logits: torch.Tensor, cfg: DecodeConfig, mask_token_id: int | None) -> torch.Tensor:
    """Logits [..., V] -> probabilities after temperature, top-k, top-p; the mask token gets 0."""
    logits = exclude_mask_token(logits.float(), mask_token_id)
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def exclude_mask_token(logits: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """The mask token is never emitted: its logit becomes -inf."""
    if mask_token_id is None or mask_token_id >= logits.shape[-1]:
        return logits
    logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    return logits


def draft_valid(n_draft: torch.Tensor, K: int) -> torch.Tensor:
    """[b, K-1]: whether d_{j+1} (j = 1..K-1) is a real draft token."""
    return torch.arange(1, K, device=n_draft.device)[None, :] < n_draft[:, None]


def accepted_length(ok: torch.Tensor) -> torch.Tensor:
    """r = 1 + number of leading accepted drafts. ok: [b, K-1] -> [b]."""
    return 1 + ok.long().cumprod(-1).sum(-1)


def greedy(p_logits: torch.Tensor, draft: torch.Tensor, n_draft: torch.Tensor, mask_token_id: int | None):
    """Accept d_{j+1} iff it is argmax p_j; t = argmax p_r. Exactly AR greedy."""
    target, r = greedy_chain(p_logits, draft, n_draft, mask_token_id)
    t = target.gather(1, (r - 1)[:, None])[:, 0]
    return r, t


def greedy_chain(p_logits: torch.Tensor, draft: torch.Tensor, n_draft: torch.Tensor,
                 mask_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (target [b, K] = argmax p_j, r [b]): the greedy rule's accepted length."""
    target = exclude_mask_token(p_logits, mask_token_id).argmax(-1)  # [b, K]
    K = draft.shape[1]
    ok = (draft[:, 1:] == target[:, :-1]) & draft_valid(n_draft, K)  # [b, K-1]
    return target, accepted_length(ok)


def speculative(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, n_draft: torch.Tensor,
                generator: Generators):
    """Speculative sampling (Leviathan et al.; Chen et al.): output ~ p exactly.

    p, q: [b, K, V] probabilities (q[:, 0] unused). Steps:
      1. accept d_{j+1} with probability min(1, p_j(d) / q_{j+1}(d));
      2. r = 1 + leading accepts;
      3. if d_{r+1} was a real draft (rejected): t ~ norm((p_r - q_{r+1})+);
         otherwise (all accepted, or no draft there): t ~ p_r (the bonus token).
    """
    b, K, _ = p.shape
    if K == 1:  # nothing drafted (AR step): t ~ p_1
        return torch.ones(b, dtype=torch.long, device=p.device), sample(p[:, 0], generator)
    r = accept(p, q, draft, n_draft, generator)  # 1.
    p_r = p.gather(1, (r - 1)[:, None, None].expand(b, 1, p.shape[-1]))[:, 0]  # [b, V]
    q_next = q.gather(1, r.clamp(max=K - 1)[:, None, None].expand(b, 1, q.shape[-1]))[:, 0]
    rejected = (r < n_draft)[:, None]  # [b, 1]
    residual = (p_r - q_next).clamp_min(0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q exactly: rejection had probability 0
    dist = torch.where(rejected & ~empty, residual, p_r)
    t = sample(dist, generator)
    return r, t


def accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, n_draft: torch.Tensor,
           generator: Generators) -> torch.Tensor:
    """Steps 1-2 of `speculative` (K > 1): r = 1 + the leading drafts accepted with probability min(1, p / q)."""
    K = draft.shape[1]
    d = draft[:, 1:, None]  # [b, K-1, 1]
    p_d = p[:, :-1].gather(2, d)[..., 0]  # [b, K-1]
    q_d = q[:, 1:].gather(2, d)[..., 0]
    u = uniform(p_d.shape, generator, p.device, torch.float32)
    ok = (u * q_d < p_d) & draft_valid(n_draft, K)  # u < p/q without dividing by q = 0
    return accepted_length(ok)


def mix_logits(p_logits: torch.Tensor, draft_logits: torch.Tensor, n_draft: torch.Tensor, w: float) -> torch.Tensor:
    """Verification logits of the mix sampler: (1-w) AR + w diffusion where a draft exists.

    p_logits[:, j-1] (position L+j) mixes with draft_logits[:, j], the slot
    logits that drafted d_{j+1} at that position; p_K has no drafting slot and
    stays AR. w = 0 gives p_logits exactly (the lossless sampler).
    """
    if w == 0.0:
        return p_logits
    K = p_logits.shape[1]
    mixed = p_logits.clone()
    has = draft_valid(n_draft, K)[:, :, None]  # [b, K-1, 1]
    mixed[:, :-1] = torch.where(has, (1 - w) * p_logits[:, :-1] + w * draft_logits[:, 1:], p_logits[:, :-1])
    return mixed


def verify(cfg: DecodeConfig, p_logits: torch.Tensor, draft: torch.Tensor, draft_logits: torch.Tensor,
           n_draft: torch.Tensor, mask_token_id: int | None,
           generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the sampler. p_logits, draft_logits: [b, K, V]; draft: [b, K]; n_draft: [b].

    mix at temperature 0 is greedy against the mixed logits.
    """
    if cfg.sampler == "mix" and draft.shape[1] > 1:
        p_logits = mix_logits(p_logits, draft_logits, n_draft, cfg.mix_weight)
    if cfg.greedy:
        return greedy(p_logits, draft, n_draft, mask_token_id)
    p = process_logits(p_logits, cfg, mask_token_id)
    q = process_logits(draft_logits, cfg, mask_token_id) if draft.shape[1] > 1 else p[:, :0]
    return speculative(p, q, draft, n_draft, generator)


def draw(logits: torch.Tensor, cfg: DecodeConfig, mask_token_id: int | None,
         generator: Generators) -> torch.Tensor:
    """Sample (or argmax, when greedy) one token per row of logits [..., V] -> [...]."""
    if cfg.greedy:
        return exclude_mask_token(logits, mask_token_id).argmax(-1)
    return sample(process_logits(logits, cfg, mask_token_id), generator)


def sample(weights: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One index per row of weights [..., V] (non-negative, each row with some mass), drawn ∝ weights.

    Inverse CDF in float64: u ~ U[0, total), the first index whose cumulative
    weight exceeds u. A zero-weight index is never drawn (its cumulative weight
    equals its predecessor's). Over a 49k vocabulary on a CPU this costs ~0.05 ms
    a row where torch.multinomial costs ~0.75 ms. Rows go 4 at a time: a larger
    float64 buffer is a fresh mapping each call here, and its page faults cost
    more than the sampling.
    """
    flat = weights.reshape(-1, weights.shape[-1])
    u = uniform(weights.shape[:-1], generator, flat.device, torch.float64).reshape(-1, 1)
    out = [torch.zeros(0, dtype=torch.long, device=flat.device)]
    for i in range(0, flat.shape[0], 4):
        cdf = flat[i:i + 4].cumsum(-1, dtype=torch.float64)
        total = cdf[:, -1:]
        ui = torch.minimum(u[i:i + 4] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
        out.append(torch.searchsorted(cdf, ui, right=True)[:, 0])
    return torch.cat(out).reshape(weights.shape[:-1])


def uniform(shape, generator, device, dtype) -> torch.Tensor:
    """U[0, 1) of `shape` from one generator, or from a list of generators, one per batch row (shape[0]):
    then each row's draws come from its own stream alone, whatever rows share the batch (served requests)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)
