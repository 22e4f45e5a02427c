"""Evaluation during training: held-out losses, AR agreement and the TPF greedy verification would reach.

`heldout_metrics` runs every `eval.every_steps` steps and at the end of a run
(its records in metrics.jsonl carry `est_tpf`); it reads the held-out rows in
the training layout (one forward each, full masking), so it needs no decoding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..decode.verify import exclude_mask_token
from . import objective
from .run import Run


def estimated_tpf(slot_logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor,
                  block_size: int, mask_token_id: int | None = None) -> tuple[float, int]:
    """Mean accepted length under greedy verification, from one training-layout forward (offset 0).

    On held-out self-distilled rows the tokens are the AR head's own greedy
    path, so a slot whose argmax equals the token would be accepted. Per block
    fully inside one document's targets: 1 (its first token is the AR's own)
    + the number of leading slots 2..B that match. Returns (mean, blocks).
    """
    b, S = tokens.shape
    n = S // block_size * block_size
    hit = exclude_mask_token(slot_logits[:, :n].float(), mask_token_id).argmax(-1) == tokens[:, :n]  # [b, n]
    hit = hit.view(b, -1, block_size)
    accepted = 1 + hit[..., 1:].long().cumprod(-1).sum(-1)  # [b, n/B]
    docs = doc_ids[:, :n].view(b, -1, block_size)
    ok = loss_mask[:, :n].view(b, -1, block_size).all(-1) & (docs == docs[..., :1]).all(-1)
    count = int(ok.sum())
    return (float(accepted[ok].float().mean()) if count else float("nan")), count


@torch.no_grad()
def heldout_metrics(run: Run) -> dict[str, float]:
    """Held-out AR loss, diffusion loss (full masking), estimated TPF, AR greedy agreement with the data.

    On self-distilled data `ar_agreement` is the share of target tokens the
    AR head still predicts (1.0 for the drafting adapter, by construction).
    """
    lm, rows, cfg = run.lm, run.heldout_rows, run.cfg
    if len(rows) == 0:
        return {}
    wrapped, lm.wrapped = lm.wrapped, None  # no collectives: processes may evaluate alone
    lm.model.eval()
    full = dataclasses.replace(lm.settings, masking="full")
    ar_sum = diff_sum = 0.0
    ar_n = diff_n = 0
    tpf_sum, blocks, agree, agree_n = 0.0, 0, 0, 0
    n = min(len(rows), cfg.eval.max_rows)
    device = run.accelerator.device
    for start in range(0, n, cfg.optim.batch_size):
        sl = slice(start, min(n, start + cfg.optim.batch_size))
        toks, docs, lmask = rows.tokens[sl], rows.doc_ids[sl], rows.loss_mask[sl]
        batch = objective.build_batch(toks, full, docs, lmask, 0).to(device)
        S = toks.shape[1]
        # fp32 like the decoder: bf16 would flip some argmaxes of the AR path the data holds
        logits = lm.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mask_slots).float()
        lab = batch.labels
        ar_keep, diff_keep = lab[:, :S] != objective.IGNORE, lab[:, S:] != objective.IGNORE
        ar_sum += float(F.cross_entropy(logits[:, :S][ar_keep], lab[:, :S][ar_keep], reduction="sum"))
        diff_sum += float(F.cross_entropy(logits[:, S:][diff_keep], lab[:, S:][diff_keep], reduction="sum"))
        ar_n, diff_n = ar_n + int(ar_keep.sum()), diff_n + int(diff_keep.sum())
        agree += int((logits[:, :S].argmax(-1) == lab[:, :S])[ar_keep].sum())
        agree_n += int(ar_keep.sum())
        tpf, count = estimated_tpf(logits[:, S:], toks.to(device), lmask.to(device), docs.to(device),
                                   cfg.objective.block_size, lm.mask_token_id)
        if count:
            tpf_sum, blocks = tpf_sum + tpf * count, blocks + count
    lm.model.train()
    lm.wrapped = wrapped
    return {"eval_ar_loss": ar_sum / max(ar_n, 1), "eval_diff_loss": diff_sum / max(diff_n, 1),
            "est_tpf": tpf_sum / blocks if blocks else float("nan"), "eval_blocks": blocks,
            "ar_agreement": agree / max(agree_n, 1)}
