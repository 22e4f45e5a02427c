"""Drafting policy: which acceptance lengths to pre-draft, and (adaptive) how long to draft.

Both are choices, not correctness: any draft length and any proposal set give
the same greedy tokens; they only change how many tokens a forward commits
and what the forward costs.
"""

from __future__ import annotations

import torch

from .verify import draft_valid, exclude_mask_token

_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def choose_proposals(draft: torch.Tensor, draft_logits: torch.Tensor, n_draft: torch.Tensor, n: int,
                     mask_token_id, mix_weight: float = 0.0) -> torch.Tensor:
    """The n most likely acceptance lengths r from the draft confidences -> [b, n], sorted.

    c_j = q(d_{j+1}) is the chance the draft survives position j; with
    independent positions P(r) = c_1 .. c_{r-1} (1 - c_r), c_K = 0. The mix
    sampler verifies against p' ∝ p^(1-w) q^w, so a draft survives it more
    often: c_j^(1-w) (all of them at w = 1, where p' = q).
    """
    b, K = draft.shape
    if n >= K:
        return torch.arange(1, K + 1, device=draft.device).expand(b, K)
    q = torch.softmax(exclude_mask_token(draft_logits[:, 1:].float(), mask_token_id), -1)
    c = q.gather(2, draft[:, 1:, None])[..., 0].pow(1.0 - mix_weight) * draft_valid(n_draft, K)  # [b, K-1]
    ones = torch.ones(b, 1, device=c.device)
    p_r = torch.cat([ones, c.cumprod(-1)], 1) * torch.cat([1 - c, ones], 1)  # [b, K]
    return (p_r.topk(n, dim=-1).indices + 1).sort(-1).values


class CostModel:
    """Relative cost of a forward with n token slots per row (1 slot = 1.0).

    From `ar2dlm tune` measurements ({n: cost}, interpolated linearly), or a
    default: a CPU-like 4.5% more per extra slot.
    """

    def __init__(self, table: dict[int, float] | None = None):
        self.points = sorted((int(k), float(v)) for k, v in (table or {}).items())

    def __call__(self, n: int) -> float:
        if len(self.points) < 2:
            return 1.0 + 0.045 * (n - 1)
        xs = [p[0] for p in self.points]
        if n <= xs[0]:
            return self.points[0][1]
        for (x0, y0), (x1, y1) in zip(self.points, self.points[1:]):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = self.points[-2:]
        return y1 + (y1 - y0) / (x1 - x0) * (n - x1)


class AdaptiveDraft:
    """Picks (draft_len, proposals) per step to maximise expected tokens per unit of forward cost.

    Keeps a_j = P(d_{j+1} accepted | the drafts before it were), an
    exponential average over the accept/reject outcomes observed at each
    position (pooled over the batch). Expected tokens of a step with draft
    length K: 1 + sum_{j<K} a_1..a_j. With a candidate tree (`shape`: m_j
    siblings at depth j, tree.py) a step also has sum_{j<K} m_j sibling rows,
    and where the chain stops at depth j one of them is accepted with
    probability h_j (observed the same way): + sum_j a_1..a_{j-1} (1 - a_j) h_j.
    When drafting does not pay, K = 1 (plain AR steps); unobserved positions
    drift back to the prior, so drafting is tried again later and resumes when
    acceptance returns.
    """

    def __init__(self, max_len: int, proposals: int, cost: CostModel, prior: float = 0.5, decay: float = 0.7,
                 drift: float = 0.02, margin: float = 1.1, shape: tuple[int, ...] = (), sibling_prior: float = 0.25):
        self.max_len, self.proposals, self.cost, self.margin = max_len, proposals, cost, margin
        self.prior, self.decay, self.drift = prior, decay, drift
        self.a = [prior] * max(max_len - 1, 0)
        self.shape = tuple(shape) + (0,) * max(max_len - 1 - len(shape), 0)
        self.sibling_prior = sibling_prior
        self.h = [sibling_prior] * max(max_len - 1, 0)

    def choose(self) -> tuple[int, int]:
        # a drafting step must beat an AR step by `margin`: the table prices the forward, not the engine's own
        # work per drafting step (verification, proposals, bookkeeping; `ar2dlm tune` measures it at ~0.05-0.1)
        best, best_score = (1, 0), self.margin / self.cost(1)
        for K in _LADDER:
            if K < 2 or K > self.max_len:
                continue
            expected, run = 1.0, 1.0
            for j in range(K - 1):
                if self.shape[j]:
                    expected += run * (1 - self.a[j]) * self.h[j]
                run *= self.a[j]
                expected += run
            n = min(self.proposals, K)
            score = expected / self.cost(K + sum(self.shape[:K - 1]) + n * K)
            if score > best_score:
                best, best_score = (K, n), score
        return best

    def update(self, r: list[int], n_draft: list[int], sibling: list[int] | None = None) -> None:
        """Observe one step: drafts d_2..d_r accepted, d_{r+1} rejected if it was real (r counts an accepted
        sibling, sibling[i] >= 0: the chain itself stopped one earlier, and where it stopped a sibling row was
        accepted or not)."""
        seen = [[] for _ in self.a]
        tried = [[] for _ in self.h]
        for i, (ri, ni) in enumerate(zip(r, n_draft)):
            hit = sibling is not None and sibling[i] >= 0
            ri -= hit
            for j in range(min(ri, ni) - 1):
                seen[j].append(1.0)
            if ri < ni:
                seen[ri - 1].append(0.0)
                if ri - 1 < len(self.shape) and self.shape[ri - 1]:
                    tried[ri - 1].append(float(hit))
        self._observe(self.a, seen, self.prior)
        self._observe(self.h, tried, self.sibling_prior)

    def _observe(self, rates: list[float], outcomes: list[list[float]], prior: float) -> None:
        for j, obs in enumerate(outcomes):
            if obs:
                rates[j] = self.decay * rates[j] + (1 - self.decay) * sum(obs) / len(obs)
            else:
                rates[j] += self.drift * (prior - rates[j])
