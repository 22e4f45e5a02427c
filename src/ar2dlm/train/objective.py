"""The TiDAR training objective: masking schemes and the one loss (docs/DESIGN.md §2).

A clean row x of S tokens becomes [x_0..x_{S-1} | slots m_0..m_{S-1}] with
positions [0..S-1, 0..S-1] and `masks.training_mask`. Clean logits are
shifted (c_i predicts x_{i+1}); slot logits are not (m_i predicts x_i).
Loss = (alpha L_AR + L_diff) / (1 + alpha), each a mean token cross-entropy; L_diff may weight a slot by its
place i in its block, slot_decay**i (`slot_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..model.lm import DiffusionLM
from ..model.settings import DiffusionConfig
from ..nn import masks, predecessors

IGNORE = -100


@dataclass
class TrainingBatch:
    """One doubled batch; every tensor is [b, 2S] except the mask [b, 2S, 2S]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_slots: torch.Tensor
    labels: torch.Tensor
    masked: torch.Tensor  # [b, S] which slots carry the mask token
    predecessors: torch.Tensor | None = None  # [b, 2S] each row's previous token (nn/predecessors.py), for CCA-like layers
    slot_place: torch.Tensor | None = None  # [b, S] each slot's index in its block (0 = the first drafted token)

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(*(getattr(self, f.name).to(device) if getattr(self, f.name) is not None else None
                               for f in fields(self)))


def masked_slots(scheme: str, doc_shape: tuple[int, int], block_size: int, block_offset, beta: float,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Which slots of the drafting half are masked -> bool [b, S].

    full: every slot (TiDAR; one-step drafting sees no clean token in its block).
    uniform / position_dependent (Efficient-DLM): per block draw t ~ U(0, 1) and
    mask k = round(t B) slots (at least 1) chosen by Gumbel-top-k over weights
    w_i(t) = exp(beta (1 - t) i) (i = index in the block; beta = 0 for uniform),
    so later slots are masked more when t is small.
    """
    b, S = doc_shape
    if scheme == "full":
        return torch.ones(b, S, dtype=torch.bool, device=device)
    block = masks.block_ids(S, block_size, block_offset, device).expand(b, S)  # [b, S]
    first = block[:, :1]
    local_block = block - first  # 0-based block index per row
    n_blocks = int(local_block.max()) + 1
    t = torch.rand(b, n_blocks, generator=generator, device=device).gather(1, local_block)  # [b, S]
    offset = torch.as_tensor(block_offset, device=device).reshape(-1, 1)
    i = (torch.arange(S, device=device)[None, :] + offset) % block_size  # index within the block
    slope = 0.0 if scheme == "uniform" else beta
    u = torch.rand(b, S, generator=generator, device=device).clamp_min(1e-20)
    score = slope * (1 - t) * i - torch.log(-torch.log(u))  # log w_i + Gumbel noise
    # rank of each slot inside its block by descending score
    order = torch.sort(-score, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(local_block.gather(1, order), dim=1, stable=True).indices)
    sorted_block = local_block.gather(1, order)
    rank_sorted = torch.arange(S, device=device)[None, :] - torch.searchsorted(sorted_block, sorted_block)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    block_len = torch.zeros(b, n_blocks, dtype=torch.long, device=device).scatter_add_(
        1, local_block, torch.ones_like(local_block)).gather(1, local_block)
    k = torch.round(t * block_len).long().clamp(min=1)
    return rank < k


def build_batch(input_ids: torch.Tensor, cfg: DiffusionConfig, doc_ids: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, block_offset: torch.Tensor | int = 0,
                generator: torch.Generator | None = None) -> TrainingBatch:
    """Doubled TiDAR batch from clean rows input_ids [b, S].

    doc_ids [b, S]: packed documents (attention and labels never cross them).
    loss_mask [b, S]: tokens that may be predicted (SFT: response tokens only).
    block_offset: int or [b], where blocks start (a random offset per row).
    """
    b, S = input_ids.shape
    device = input_ids.device
    if doc_ids is None:
        doc_ids = torch.zeros(b, S, dtype=torch.long, device=device)
    if loss_mask is None:
        loss_mask = torch.ones(b, S, dtype=torch.bool, device=device)
    masked = masked_slots(cfg.masking, (b, S), cfg.block_size, block_offset, cfg.beta, generator, device)
    slots = torch.where(masked, torch.full_like(input_ids, cfg.mask_token_id), input_ids)

    ar_labels = torch.full_like(input_ids, IGNORE)
    follows = (doc_ids[:, 1:] == doc_ids[:, :-1]) & loss_mask[:, 1:]
    ar_labels[:, :-1] = torch.where(follows, input_ids[:, 1:], IGNORE)
    diff_labels = torch.where(masked & loss_mask, input_ids, IGNORE)

    pos = torch.arange(S, device=device).expand(b, S)
    return TrainingBatch(
        input_ids=torch.cat([input_ids, slots], 1),
        position_ids=torch.cat([pos, pos], 1),
        attention_mask=masks.training_mask(S, cfg.block_size, doc_ids, block_offset),
        mask_slots=(torch.arange(2 * S, device=device) >= S).expand(b, 2 * S),
        labels=torch.cat([ar_labels, diff_labels], 1),
        masked=masked,
        predecessors=predecessors.training_predecessors(S, cfg.block_size, doc_ids, block_offset),
        slot_place=(pos + torch.as_tensor(block_offset, device=device).reshape(-1, 1)) % cfg.block_size,
    )


def mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over the labels that are not IGNORE (0, with a gradient, when there are none)."""
    if (labels != IGNORE).sum() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)


def slot_weights(slot_place: torch.Tensor, decay: float) -> torch.Tensor | None:
    """The diffusion loss weight of each slot: decay**i for the slot at index i of its block (None when decay is 1).

    Greedy verification reaches slot i only when slots 0..i-1 were accepted, so a slot late in the block is worth
    less to the tokens per forward than the first; decay < 1 spends the adapter's capacity where acceptance starts.
    """
    return None if decay == 1.0 else torch.pow(torch.as_tensor(decay, dtype=torch.float32), slot_place.float())


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """`mean_ce` with a weight per label ([b, T] like labels): sum w CE / sum w over the labels that are not
    IGNORE (the plain mean when weights is None)."""
    if weights is None:
        return mean_ce(logits, labels)
    keep = labels != IGNORE
    if not keep.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    w = weights.to(ce.device)[keep]
    return (w * ce).sum() / w.sum()


def tidar_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
               slot_weight: torch.Tensor | None = None):
    """(loss, ar_loss, diff_loss) from logits [b, 2S, V] and labels [b, 2S]; slot_weight [b, S] (`slot_weights`)."""
    S = labels.shape[1] // 2
    ar = mean_ce(logits[:, :S], labels[:, :S])
    diff = weighted_ce(logits[:, S:], labels[:, S:], slot_weight)
    return (alpha * ar + diff) / (1 + alpha), ar, diff


def loss(lm: DiffusionLM, batch: TrainingBatch, alpha: float = 1.0, slot_decay: float = 1.0):
    """One forward of the doubled batch through `lm` (a DiffusionLM) -> (loss, ar_loss, diff_loss)."""
    with predecessors.predecessors(lm.model, batch.predecessors):
        logits = lm.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots)
    return tidar_loss(logits, batch.labels, alpha, slot_weights(batch.slot_place, slot_decay))


def naive_loss(lm: DiffusionLM, batch: TrainingBatch, block_size: int, block_offset: int = 0, alpha: float = 1.0):
    """Reference for `loss` on single-document rows: one forward per block.

    AR: one causal forward of the clean row. Diffusion: for each block, a
    forward of [clean prefix before the block (causal) | the block's slots]
    where the slots see the prefix and each other.
    """
    b, S2 = batch.input_ids.shape
    S = S2 // 2
    ar_sum, ar_n, diff_sum, diff_n = 0.0, 0, 0.0, 0
    for row in range(b):
        clean = batch.input_ids[row, :S]
        pos = torch.arange(S)
        logits = lm.forward(clean[None], pos[None], masks.causal_mask(S), torch.zeros(1, S, dtype=torch.bool))[0]
        lab = batch.labels[row, :S]
        keep = lab != IGNORE
        ar_sum = ar_sum + F.cross_entropy(logits[keep].float(), lab[keep], reduction="sum")
        ar_n += int(keep.sum())
        blocks = masks.block_ids(S, block_size, block_offset)[0]
        for blk in blocks.unique().tolist():
            idx = (blocks == blk).nonzero()[:, 0]
            start, n = int(idx[0]), len(idx)
            ids = torch.cat([clean[:start], batch.input_ids[row, S + idx]])
            p = torch.cat([torch.arange(start), idx])
            m = torch.zeros(start + n, start + n, dtype=torch.bool)
            m[:start, :start] = masks.causal_mask(start)[0]
            m[start:, :] = True
            slot_rows = torch.arange(start + n) >= start
            out = lm.forward(ids[None], p[None], m[None], slot_rows[None])[0, start:]
            lab = batch.labels[row, S + idx]
            keep = lab != IGNORE
            diff_sum = diff_sum + F.cross_entropy(out[keep].float(), lab[keep], reduction="sum")
            diff_n += int(keep.sum())
    ar, diff = ar_sum / max(ar_n, 1), diff_sum / max(diff_n, 1)
    return (alpha * ar + diff) / (1 + alpha), ar, diff
