"""ZAYA1 (CCA attention + MoE) through the decode engine, held to HF generate: the CCA convolutions and delayed
value read each row's logical predecessors (nn/predecessors.py), so greedy decoding equals AR greedy."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS, VOCAB, make_tokenizer, train_drafter
from test_decode import N_PROMPTS, NEW, SETTINGS, drafting_end_to_end, hf_greedy, random_prompts
from transformers import AutoModelForCausalLM, ZayaConfig

from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import masks
from ar2dlm.train import objective

CONFIGS = {  # different conv kernels, heads and experts
    "cca2x2": dict(cca_time0=2, cca_time1=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4),
    "cca3x2": dict(cca_time0=3, cca_time1=2, num_attention_heads=4, num_key_value_heads=1, num_experts=3),
}


def tiny_zaya(name, seed=0, vocab=VOCAB, sharpen=8.0):
    torch.manual_seed(seed)
    c = ZayaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32,
                   router_hidden_size=16, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=None,
                   pad_token_id=0, **CONFIGS[name])
    model = AutoModelForCausalLM.from_config(c, attn_implementation="sdpa", experts_implementation="eager")
    model = model.double().eval()
    with torch.no_grad():  # sharper logits, and convolutions / delayed values that matter
        model.get_output_embeddings().weight.mul_(sharpen)
        for n, p in model.named_parameters():
            if "conv" in n or "v_proj" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model


def converted(name):
    base = tiny_zaya(name)
    model = copy.deepcopy(base)
    tok = make_tokenizer()
    mask_id = add_mask_token(model, tok)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=mask_id))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zaya_greedy_equals_hf_generate(name):
    base, lm = converted(name)
    prompts = random_prompts(N_PROMPTS, seed=1)
    expected = [hf_greedy(base, p) for p in prompts]
    assert [g.token_ids for p in prompts for g in lm.generate([p], max_new_tokens=NEW, ar=True)] == expected
    for K, R in SETTINGS:
        alone = [lm.generate([p], max_new_tokens=NEW, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert alone == expected, (K, R)
        batched = []
        for i in range(0, N_PROMPTS, 4):  # ragged batches of 4
            batched += [g.token_ids for g in lm.generate(prompts[i:i + 4], max_new_tokens=NEW, draft_len=K,
                                                         proposals=R)]
        assert batched == expected, (K, R)


def test_zaya_ar_mode_gives_base_logits():
    base, lm = converted("cca3x2")
    ids = torch.randint(2, VOCAB, (2, 11))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        got = lm.forward(ids, torch.arange(11).expand(2, -1), masks.causal_mask(11, 2))
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("offset", [0, 2])
def test_zaya_doubled_loss_equals_naive(name, offset):
    """The doubled sequence (slots reading their logical predecessors) == one plain forward per block."""
    _, lm = converted(name)
    x = torch.randint(2, VOCAB, (2, 13))
    cfg = DiffusionConfig(block_size=4, mask_token_id=lm.mask_token_id)
    batch = objective.build_batch(x, cfg, block_offset=offset, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = objective.loss(lm, batch)
        want = objective.naive_loss(lm, batch, 4, offset)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-6, atol=1e-6)  # CE in float32


def test_zaya_trained_drafter_greedy_equals_hf():
    """Trained (all weights, AR + diffusion loss) on a repeating pattern, so drafts are accepted and every
    accept branch runs with the CCA state committed after d_r."""
    lm = train_drafter(model=tiny_zaya("cca2x2"), steps=80)
    base = copy.deepcopy(lm.model)
    pattern = lm.pattern
    prompts = [(pattern * 3)[i:i + 5 + i % 4] for i in range(8)] + random_prompts(4, seed=3)
    suppress = [lm.mask_token_id]
    expected = [hf_greedy(base, p, 30, suppress) for p in prompts]
    accepted = 0
    for K, R in [(4, 1), (4, 4), (16, 3)]:
        gens = [lm.generate([p], max_new_tokens=30, draft_len=K, proposals=R)[0] for p in prompts]
        assert [g.token_ids for g in gens] == expected, (K, R)
        accepted += sum(n * c for g in gens for n, c in g.stats.accepted.items() if n > 1)
        batched = [g.token_ids for i in range(0, len(prompts), 4)
                   for g in lm.generate(prompts[i:i + 4], max_new_tokens=30, draft_len=K, proposals=R)]
        assert batched == expected, (K, R)
    assert accepted > 50  # drafts were accepted: the accept branches ran


def with_drafting_adapter(lm, scale=0.05):
    """The gated drafting adapter on `lm`, with non-zero LoRA B (so the slots differ from the base)."""
    from ar2dlm.model import adapter
    from ar2dlm.model.settings import AdapterSection

    adapter.attach(lm, AdapterSection(kind="drafting", rank=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return lm


@pytest.mark.parametrize("offset", [0, 3])
def test_zaya_drafting_loss_equals_naive(offset):
    """The gated adapter's loss (one doubled forward: slots read their own block's conv state) == one forward
    per block over [clean prefix | block slots], with the adapter on the slot rows only."""
    from ar2dlm.train.trainer import drafting_loss

    _, lm = converted("cca3x2")
    with_drafting_adapter(lm)
    cfg = DiffusionConfig(block_size=4, mask_token_id=lm.mask_token_id)
    batch = objective.build_batch(torch.randint(2, VOCAB, (2, 14)), cfg, block_offset=offset,
                                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, logits, idx = drafting_loss(lm, batch)
        _, _, want = objective.naive_loss(lm, batch, 4, offset)
        with lm.model.disable_adapter():  # the adapter does reach the slots
            _, _, bare = objective.naive_loss(lm, batch, 4, offset)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=1e-6, atol=1e-6)
    assert abs(float(want) - float(bare)) > 1e-3
    assert logits.shape[1] == idx.shape[1] == 14


def test_zaya_distill_train_drafting_adapter_end_to_end(tmp_path):
    """`ar2dlm distill`, then `ar2dlm train` with the gated drafting adapter, on a zaya checkpoint, then
    decoding from its output: greedy equals the *base* model's HF generate (the gate keeps every verified
    row on base weights), and the trained drafts get accepted."""
    drafting_end_to_end(tiny_zaya("cca2x2").float(), tmp_path)


def test_zaya_lossless_matches_ar_distribution():
    """Speculative sampling on a tiny-vocabulary zaya: the first 3 sampled tokens follow AR's exact joint."""
    from test_lossless import assert_lossless

    base = tiny_zaya("cca3x2", vocab=8, sharpen=0.25)
    model = copy.deepcopy(base)
    tok = make_tokenizer(8)
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))
    assert_lossless(base, lm, 20000)


def test_zaya_tune_forward_cost_runs():
    """tune's forward-cost timing builds a cache with the CCA state and crops it (no values asserted: speed
    lives in benchmarks)."""
    from ar2dlm.measure.tune import forward_cost

    _, lm = converted("cca2x2")
    assert set(forward_cost(lm, (1, 4, 8), context=16, reps=1)) == {1, 4, 8}
