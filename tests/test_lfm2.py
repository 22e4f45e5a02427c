"""LFM2 (short convolutions beside attention) through the decode engine, held to HF generate: each row's
convolution reads its logical predecessors (nn/predecessors.py), and a step commits the conv state after d_r, so
greedy decoding equals AR greedy."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS, VOCAB, make_tokenizer, train_drafter
from test_decode import drafting_end_to_end, hf_greedy, random_prompts
from transformers import AutoModelForCausalLM, Lfm2Config

from ar2dlm.model.architectures import check_architecture
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import masks
from ar2dlm.train import objective

CONFIGS = {  # convolution lengths (conv_L_cache) and layer orders
    "L3": dict(conv_L_cache=3, layer_types=["conv", "full_attention", "conv"]),
    "L4": dict(conv_L_cache=4, layer_types=["full_attention", "conv", "conv"]),
}
SETTINGS = [(2, 1), (4, 1), (4, 3), (8, 1), (8, 3)]  # (K, |R|)
NEW = 24


def tiny_lfm2(name="L3", seed=0, vocab=VOCAB, dtype=torch.float64, sharpen=8.0):
    torch.manual_seed(seed)
    c = Lfm2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=None,
                   pad_token_id=0, **CONFIGS[name])
    model = AutoModelForCausalLM.from_config(c, attn_implementation="sdpa").to(dtype).eval()
    with torch.no_grad():  # sharper logits, and convolutions that matter
        model.get_output_embeddings().weight.mul_(sharpen)
        for n, p in model.named_parameters():
            if "conv" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model


def converted(name="L3", **kw):
    base = tiny_lfm2(name, **kw)
    model = copy.deepcopy(base)
    tok = make_tokenizer(base.config.vocab_size)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lfm2_greedy_equals_hf_generate(name):
    check_architecture(tiny_lfm2(name).config)  # accepted: its short convolutions are hooked
    base, lm = converted(name)
    prompts = random_prompts(12, seed=1)
    expected = [hf_greedy(base, p) for p in prompts]
    assert [g.token_ids for p in prompts for g in lm.generate([p], max_new_tokens=NEW, ar=True)] == expected
    for K, R in SETTINGS:
        alone = [lm.generate([p], max_new_tokens=NEW, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert alone == expected, (K, R)
        batched = [g.token_ids for i in range(0, len(prompts), 4)
                   for g in lm.generate(prompts[i:i + 4], max_new_tokens=NEW, draft_len=K, proposals=R)]
        assert batched == expected, (K, R)


def test_lfm2_ar_mode_gives_base_logits():
    base, lm = converted("L4")
    ids = torch.randint(2, VOCAB, (2, 11))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        got = lm.forward(ids, torch.arange(11).expand(2, -1), masks.causal_mask(11, 2))
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("offset", [0, 2])
def test_lfm2_doubled_loss_equals_naive(name, offset):
    """The doubled sequence (slots reading their logical predecessors) == one plain forward per block."""
    _, lm = converted(name)
    x = torch.randint(2, VOCAB, (2, 13))
    batch = objective.build_batch(x, lm.settings, block_offset=offset, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = objective.loss(lm, batch)
        want = objective.naive_loss(lm, batch, 4, offset)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-6, atol=1e-6)  # CE in float32


@pytest.mark.parametrize("offset", [0, 3])
def test_lfm2_drafting_loss_equals_naive(offset):
    """The gated adapter's loss (one doubled forward: slots read their own block's conv state) == one forward per
    block, the adapter on the slot rows only."""
    from test_zaya import with_drafting_adapter

    from ar2dlm.train.trainer import drafting_loss

    _, lm = converted("L3")
    with_drafting_adapter(lm)
    batch = objective.build_batch(torch.randint(2, VOCAB, (2, 14)), lm.settings, block_offset=offset,
                                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _, _ = drafting_loss(lm, batch)
        _, _, want = objective.naive_loss(lm, batch, 4, offset)
        with lm.model.disable_adapter():  # the adapter does reach the slots
            _, _, bare = objective.naive_loss(lm, batch, 4, offset)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=1e-6, atol=1e-6)
    assert abs(float(want) - float(bare)) > 1e-3


def test_lfm2_trained_drafter_greedy_equals_hf():
    """Trained on a repeating pattern, so drafts are accepted and the conv state is committed after every d_r."""
    lm = train_drafter(model=tiny_lfm2("L3"), steps=80)
    base = copy.deepcopy(lm.model)
    pattern = lm.pattern
    prompts = [(pattern * 3)[i:i + 5 + i % 4] for i in range(8)] + random_prompts(4, seed=3)
    suppress = [lm.mask_token_id]
    expected = [hf_greedy(base, p, 30, suppress) for p in prompts]
    accepted = 0
    for K, R in [(4, 1), (4, 3), (8, 3)]:
        gens = [lm.generate([p], max_new_tokens=30, draft_len=K, proposals=R)[0] for p in prompts]
        assert [g.token_ids for g in gens] == expected, (K, R)
        accepted += sum(n * c for g in gens for n, c in g.stats.accepted.items() if n > 1)
        batched = [g.token_ids for i in range(0, len(prompts), 4)
                   for g in lm.generate(prompts[i:i + 4], max_new_tokens=30, draft_len=K, proposals=R)]
        assert batched == expected, (K, R)
    assert accepted > 50  # drafts were accepted: the accept branches ran


def test_lfm2_lossless_matches_ar_distribution():
    """Speculative sampling on a tiny-vocabulary LFM2: the first 3 sampled tokens follow AR's exact joint."""
    from test_lossless import assert_lossless

    base, lm = converted("L3", vocab=8, sharpen=0.25)
    assert_lossless(base, lm, 10000)


def test_lfm2_rows_joining_and_leaving_decode_as_alone():
    """Continuous batching: merged caches (conv states stacked, conv layers have no slots), rows leaving."""
    from test_serve_batching import assert_joined_rows_decode_as_alone

    _, lm = converted("L4")
    ps = random_prompts(6, seed=7)
    assert_joined_rows_decode_as_alone(lm, ps, cancel={1: 4})


def test_lfm2_distill_train_drafting_adapter_end_to_end(tmp_path):
    """`ar2dlm distill`, then `ar2dlm train` with the gated drafting adapter, on an LFM2 checkpoint, then decoding
    from its output: greedy equals the base model's HF generate, and the trained drafts get accepted."""
    drafting_end_to_end(tiny_lfm2("L3", dtype=torch.float32), tmp_path)


def test_lfm2_tune_forward_cost_runs():
    """tune's forward-cost timing builds a cache with conv states and crops it (no values asserted: speed lives in
    benchmarks)."""
    from ar2dlm.measure.tune import forward_cost

    _, lm = converted("L3")
    assert set(forward_cost(lm, (1, 4, 8), context=16, reps=1)) == {1, 4, 8}
