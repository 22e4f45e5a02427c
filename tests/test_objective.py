"""The training objective against a naive per-block computation, and a gradient step."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.train import objective


def tiny_lm(arch="llama", dtype=torch.float64, **cfg):
    model = tiny_model(arch, 0, dtype)
    tok = make_tokenizer()
    mask_id = add_mask_token(model, tok)
    return DiffusionLM(model, tok, DiffusionConfig(mask_token_id=mask_id, **{"block_size": 4, **cfg}))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2_moe"])
@pytest.mark.parametrize("masking", ["full", "uniform", "position_dependent"])
@pytest.mark.parametrize("offset", [0, 3])
def test_doubled_loss_equals_per_block_loss(arch, masking, offset):
    lm = tiny_lm(arch, masking=masking)
    x = torch.randint(2, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    batch = objective.build_batch(x, lm.settings, block_offset=offset, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = objective.loss(lm, batch, alpha=0.5)
        naive = objective.naive_loss(lm, batch, 4, offset, alpha=0.5)
    for a, b in zip(fast, naive):
        torch.testing.assert_close(a, b)


def test_labels_layout():
    lm = tiny_lm()
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    b = objective.build_batch(x, lm.settings, doc_ids=doc)
    ar, diff = b.labels[0, :6].tolist(), b.labels[0, 6:].tolist()
    assert ar == [6, 7, -100, 9, 10, -100]  # shifted, never across the document boundary
    assert diff == [5, 6, 7, 8, 9, 10]  # unshifted
    assert (b.input_ids[0, 6:] == lm.mask_token_id).all()
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5] * 2
    assert b.mask_slots[0].tolist() == [False] * 6 + [True] * 6


def test_sft_loss_mask_removes_prompt_tokens_from_both_losses():
    lm = tiny_lm()
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    response = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    b = objective.build_batch(x, lm.settings, loss_mask=response)
    kept_ar = [t for t in b.labels[0, :8].tolist() if t != -100]
    kept_diff = [t for t in b.labels[0, 8:].tolist() if t != -100]
    assert kept_ar == [9, 10, 11, 12] and kept_diff == [9, 10, 11, 12]
    # and changing a prompt-only target leaves the loss unchanged
    with torch.no_grad():
        l1 = objective.loss(lm, b)[0]
        b.labels[0, :3] = -100
        l2 = objective.loss(lm, b)[0]
    torch.testing.assert_close(l1, l2)


def test_partial_masking_leaves_clean_tokens_unlabelled():
    lm = tiny_lm(masking="uniform")
    x = torch.randint(2, 96, (4, 16))
    b = objective.build_batch(x, lm.settings, generator=torch.Generator().manual_seed(0))
    slots, labels = b.input_ids[:, 16:], b.labels[:, 16:]
    assert ((slots == lm.mask_token_id) == b.masked).all()
    assert ((labels != -100) == b.masked).all()
    assert (slots[~b.masked] == x[~b.masked]).all()
    assert 0 < b.masked.float().mean() < 1


def test_position_dependent_masks_later_slots_more():
    cfg = DiffusionConfig(block_size=8, mask_token_id=3, masking="position_dependent")
    m = objective.masked_slots("position_dependent", (4000, 8), 8, 0, cfg.beta, torch.Generator().manual_seed(0))
    rate = m.float().mean(0)
    assert (rate[1:] > rate[:-1]).all(), rate
    u = objective.masked_slots("uniform", (4000, 8), 8, 0, cfg.beta, torch.Generator().manual_seed(0))
    assert (u.float().mean(0) - u.float().mean()).abs().max() < 0.03  # uniform: no position preference


def test_gradient_steps_lower_both_losses():
    lm = tiny_lm(dtype=torch.float32)
    x = torch.randint(2, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = objective.build_batch(x, lm.settings)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-2)
    lm.model.train()
    before = [p.detach().clone() for p in lm.model.parameters()]
    _, ar0, diff0 = objective.loss(lm, batch)
    for _ in range(10):
        loss, _, _ = objective.loss(lm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, ar1, diff1 = objective.loss(lm, batch)
    assert ar1 < ar0 and diff1 < diff0
    changed = [not torch.equal(a, p) for a, p in zip(before, lm.model.parameters())]
    assert all(changed)
