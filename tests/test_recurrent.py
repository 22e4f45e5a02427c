"""Recurrent layers (transformers' `linear_attention` kind) through the decode engine, held to HF generate:
Qwen3-Next's and Qwen3.5's gated DeltaNet and Nemotron-H's Mamba-2. Each row's convolution and recurrent state
follow its logical predecessors (nn/predecessors.py), every row's state is kept, and a step commits the state after
d_r, so greedy decoding equals AR greedy and the lossless sampler AR's distribution."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS, VOCAB, make_tokenizer
from test_decode import drafting_end_to_end, hf_greedy, random_prompts
from transformers import (
    AutoModelForCausalLM,
    NemotronHConfig,
    OlmoHybridConfig,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
)

from ar2dlm.model.architectures import check_architecture
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import masks, predecessors
from ar2dlm.train import objective

_C = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
          max_position_embeddings=256, eos_token_id=EOS, pad_token_id=0, bos_token_id=None)
# grouped values (4 value heads over 2 key heads), a conv of 4 inputs, recurrent layers first and last
_DELTA = dict(num_hidden_layers=3, head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
              linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
              linear_conv_kernel_dim=4)
FAMILIES = {
    "qwen3_next": lambda V: Qwen3NextConfig(vocab_size=V, **_C, **_DELTA, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_5_text": lambda V: Qwen3_5TextConfig(vocab_size=V, **_C, **_DELTA),
    "qwen3_5_moe_text": lambda V: Qwen3_5MoeTextConfig(vocab_size=V, **_C, **_DELTA, num_experts=4,
                                                       num_experts_per_tok=2, moe_intermediate_size=32,
                                                       shared_expert_intermediate_size=32),
    # q, k, v, a, b and the gate projected apart; beta in [0, 2]
    "olmo_hybrid": lambda V: OlmoHybridConfig(vocab_size=V, **_C, **_DELTA),
    # two groups of B/C over 4 heads; chunk_size 8 so that HF's prefill crosses chunks
    "nemotron_h": lambda V: NemotronHConfig(vocab_size=V, **_C, layers_block_type=["mamba", "attention", "mamba"],
                                            mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=4, n_groups=2,
                                            conv_kernel=4, chunk_size=8),
}
MOE = ("qwen3_next", "qwen3_5_moe_text")
SETTINGS = [(2, 1), (2, 2), (4, 1), (4, 3), (8, 1), (8, 3)]  # (K, |R|); |R| <= K
NEW = 24


def tiny(family, seed=0, vocab=VOCAB, dtype=torch.float64, sharpen=8.0):
    torch.manual_seed(seed)
    extra = {"experts_implementation": "eager"} if family in MOE else {}  # grouped_mm: no float64
    model = AutoModelForCausalLM.from_config(FAMILIES[family](vocab), attn_implementation="sdpa", **extra)
    model = model.to(dtype).eval()
    with torch.no_grad():  # sharper logits, and convolutions that matter
        model.get_output_embeddings().weight.mul_(sharpen)
        for n, p in model.named_parameters():
            if "conv1d" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model


def converted(family, **kw):
    base = tiny(family, **kw)
    model = copy.deepcopy(base)
    tok = make_tokenizer(base.config.vocab_size)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recurrent_greedy_equals_hf_generate(family):
    check_architecture(tiny(family).config)  # accepted: its recurrent mixers are hooked
    base, lm = converted(family)
    prompts = random_prompts(8, seed=1)
    expected = [hf_greedy(base, p) for p in prompts]
    assert [g.token_ids for p in prompts for g in lm.generate([p], max_new_tokens=NEW, ar=True)] == expected
    for K, R in SETTINGS:
        alone = [lm.generate([p], max_new_tokens=NEW, draft_len=K, proposals=R)[0].token_ids for p in prompts]
        assert alone == expected, (K, R)
        batched = [g.token_ids for i in range(0, len(prompts), 4)  # ragged: prompts of 2 to 13 tokens
                   for g in lm.generate(prompts[i:i + 4], max_new_tokens=NEW, draft_len=K, proposals=R)]
        assert batched == expected, (K, R)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recurrent_candidate_tree_equals_hf_generate(family):
    """A candidate tree's siblings start from the state after d_j; an accepted sibling's row is committed."""
    base, lm = converted(family)
    prompts = random_prompts(4, seed=5)
    expected = [hf_greedy(base, p) for p in prompts]
    for K, R, tree in [(4, 1, (2, 1)), (4, 3, (3,))]:
        got = [g.token_ids for g in lm.generate(prompts, max_new_tokens=NEW, draft_len=K, proposals=R, tree=tree)]
        assert got == expected, (K, R, tree)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step_commits_the_state_after_d_r(family):
    """The oracle of a crop: after a step's forward (drafts and proposals) commits row r - 1, each recurrent
    layer's conv and recurrent state == those of a prefill that only ever saw prompt + d_1..d_r."""
    _, lm = converted(family)
    prompt, draft = torch.randint(2, VOCAB, (1, 7)), torch.randint(2, VOCAB, (1, 4))
    K, R = 4, torch.tensor([[1, 3]])

    def prefill(ids):
        cache = predecessors.new_cache(lm.model)
        n = ids.shape[1]
        with torch.no_grad(), predecessors.predecessors(lm.model, torch.arange(-1, n - 1)[None], cache) as seq:
            lm.forward(ids, torch.arange(n)[None], masks.causal_mask(n), None, cache)
        seq.commit(torch.tensor([n - 1]))
        return cache

    for r in (1, 2, 4):
        cache = prefill(prompt)
        ids = torch.cat([draft, torch.full((1, 2 * K), lm.mask_token_id)], 1)
        pos = torch.cat([7 + torch.arange(K), 7 + R.repeat_interleave(K, 1)[0] + torch.arange(K).repeat(2)])[None]
        mask = masks.step_mask(torch.ones(1, 7, dtype=torch.bool), K, R)
        with torch.no_grad(), predecessors.predecessors(lm.model, predecessors.step_predecessors(R, K), cache) as seq:
            lm.forward(ids, pos, mask, torch.arange(3 * K)[None] >= K, cache)
        seq.commit(torch.tensor([r - 1]))
        want = prefill(torch.cat([prompt, draft[:, :r]], 1))
        for i in range(len(cache.layers)):
            if getattr(cache.layers[i], "is_recurrent_states_initialized", {}).get(0, False):
                for name in ("conv_states", "recurrent_states"):
                    torch.testing.assert_close(getattr(cache.layers[i], name)[0], getattr(want.layers[i], name)[0],
                                               rtol=1e-6, atol=1e-6, msg=f"{name} of layer {i}, r = {r}")


@pytest.mark.parametrize("prompt", [None, [19, 19]], ids=["scan", "prompt"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recurrent_prefill_equals_the_stock_forward(family, prompt):
    """The scan in the stock layout (each row after the one before it), and a prefill's prompt rows (transformers'
    chunked form) == transformers' own forward."""
    base, lm = converted(family)
    ids = torch.randint(2, VOCAB, (2, 19))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with predecessors.predecessors(lm.model, torch.arange(-1, 18).expand(2, -1), prompt=prompt):
            got = lm.forward(ids, torch.arange(19).expand(2, -1), masks.causal_mask(19, 2))
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=1e-5, atol=1e-5)  # the recurrent rule runs in fp32


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("offset", [0, 2])
def test_recurrent_doubled_loss_equals_naive(family, offset):
    """The doubled sequence (a block's slots start from the clean prefix's state at the block boundary) == one plain
    forward per block."""
    _, lm = converted(family)
    x = torch.randint(2, VOCAB, (2, 13))
    batch = objective.build_batch(x, lm.settings, block_offset=offset, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = objective.loss(lm, batch)
        want = objective.naive_loss(lm, batch, 4, offset)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recurrent_drafting_loss_equals_naive(family):
    """The gated adapter's loss (one doubled forward) == one forward per block, the adapter on the slot rows only;
    and its gradient reaches the adapter through the scan."""
    from test_zaya import with_drafting_adapter

    from ar2dlm.train.trainer import drafting_loss

    _, lm = converted(family)
    with_drafting_adapter(lm)
    batch = objective.build_batch(torch.randint(2, VOCAB, (2, 14)), lm.settings, block_offset=3,
                                  generator=torch.Generator().manual_seed(0))
    got, _, _ = drafting_loss(lm, batch)
    with torch.no_grad():
        _, _, want = objective.naive_loss(lm, batch, 4, 3)
        with lm.model.disable_adapter():  # the adapter does reach the slots
            _, _, bare = objective.naive_loss(lm, batch, 4, 3)
    torch.testing.assert_close(got.detach(), torch.as_tensor(want, dtype=got.dtype), rtol=1e-5, atol=1e-5)
    assert abs(float(want) - float(bare)) > 1e-3
    got.backward()
    grads = [p.grad for m in predecessors.mixer_modules(lm.model) for n, p in m.named_parameters() if "lora" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_drafting_adapter_leaves_the_clean_rows_on_the_base_weights(family):
    """With the drafting adapter attached (non-zero LoRA), rows that are not slots compute the base model: no LoRA
    reaches them through a weight (peft's MoE conversion targets fused expert parameters) or through a mixer."""
    from test_zaya import with_drafting_adapter

    base, lm = converted(family)
    with_drafting_adapter(lm, scale=0.5)
    ids = torch.randint(2, VOCAB, (2, 11))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with predecessors.predecessors(lm.model, torch.arange(-1, 10).expand(2, -1)):
            got = lm.forward(ids, torch.arange(11).expand(2, -1), masks.causal_mask(11, 2),
                             torch.zeros(2, 11, dtype=torch.bool))
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=1e-5, atol=1e-5)


# one family per mixer class and layer mix: qwen3_5_moe_text's and olmo_hybrid's decoding is held to HF generate
# above, their mixers' sampling path is qwen3_5_text's and qwen3_next's (about 20 s each on one thread)
@pytest.mark.parametrize("family", ["nemotron_h", "qwen3_5_text", "qwen3_next"])
def test_recurrent_lossless_matches_ar_distribution(family):
    """Speculative sampling on a tiny-vocabulary model: the first 3 sampled tokens follow AR's exact joint."""
    from test_lossless import assert_lossless

    base, lm = converted(family, vocab=8, sharpen=0.25)
    assert_lossless(base, lm, 6000)


def test_recurrent_rows_joining_and_leaving_decode_as_alone():
    """Continuous batching: merged caches (recurrent states stacked), rows leaving mid-way."""
    from test_serve_batching import assert_joined_rows_decode_as_alone

    _, lm = converted("qwen3_5_text")
    ps = random_prompts(6, seed=7)
    assert_joined_rows_decode_as_alone(lm, ps, cancel={1: 4})


# a saved qwen3_5_moe_text directory loads transformers' Qwen3.5 tokenizer class whatever tokenizer it holds, so the
# tests' word-level tokenizer does not survive the round trip through disk (its mixer is qwen3_5_text's); olmo_hybrid's
# mixer trains as qwen3_next's does (its greedy and loss tests above)
@pytest.mark.parametrize("family", ["nemotron_h", "qwen3_5_text", "qwen3_next"])
def test_recurrent_distill_train_drafting_adapter_end_to_end(family, tmp_path):
    """`ar2dlm distill`, then `ar2dlm train` with the gated drafting adapter, then decoding from its output: greedy
    equals the base model's HF generate, and the trained drafts get accepted (the commit after d_r > 1 runs)."""
    drafting_end_to_end(tiny(family, dtype=torch.float32), tmp_path, n_data=32, steps=60, n_prompts=4,
                        accepted_min=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recurrent_rows_equal_the_one_row_forward(family, dtype):
    """Batch invariance through the scan: M causal rows after a cache (a draft being verified), beside another
    request: row j's logits == the AR loop's j-th one-row step, bit for bit, and the state committed after the last
    row == the AR loop's."""
    import copy as _copy

    model = tiny(family, dtype=dtype)
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)),
                     batch_invariant=True)
    lm.fuse()
    g = torch.Generator().manual_seed(0)

    def run(ids, start, cache):  # ids [b, n] in order after `cache` (b rows of equal length), then commit the last
        b, n = ids.shape
        mask = torch.cat([torch.ones(b, n, start, dtype=torch.bool), masks.causal_mask(n, b)], -1)
        with torch.no_grad(), predecessors.predecessors(lm.model, torch.arange(-1, n - 1).expand(b, n), cache) as seq:
            logits = lm.forward(ids, (start + torch.arange(n)).expand(b, n), mask, None, cache)
        seq.commit(torch.full((b,), n - 1))
        return logits

    for L, M in [(5, 8), (17, 16), (9, 3)]:
        prefix, rows = torch.randint(2, VOCAB, (2, L), generator=g), torch.randint(2, VOCAB, (2, M), generator=g)
        cache = predecessors.new_cache(lm.model)
        run(prefix, 0, cache)
        many = _copy.deepcopy(cache)
        logits = run(rows, L, many)
        alone = predecessors.new_cache(lm.model)
        run(prefix[:1], 0, alone)
        for j in range(M):
            single = run(rows[:1, j:j + 1], L + j, alone)
            assert torch.equal(logits[0, j], single[0, 0]), f"row {j} of {M} after {L}"
        for a, b in zip(many.layers, alone.layers):
            if getattr(a, "is_recurrent_states_initialized", {}).get(0, False):
                assert torch.equal(a.conv_states[0][:1], b.conv_states[0])
                assert torch.equal(a.recurrent_states[0][:1], b.recurrent_states[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("family", ["nemotron_h", "qwen3_5_text"])
def test_recurrent_prefill_of_a_ragged_batch_equals_each_prompt_alone(family, dtype):
    """A prefill runs each prompt through transformers' chunked form alone, then scans its proposal's slots: in a
    ragged batch, a prompt's last logits, its slots' logits and the state it commits are bitwise its own alone."""
    model = tiny(family, dtype=dtype)
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)),
                     batch_invariant=True)
    lm.fuse()
    K = 4

    def prefill(prompts):
        sizes = [len(p) for p in prompts]
        lens, Lp, b = torch.tensor(sizes), max(sizes), len(prompts)
        ids = torch.tensor([p + [0] * (Lp - len(p)) for p in prompts])
        ids = torch.cat([ids, torch.full((b, K), lm.mask_token_id)], 1)
        pos = torch.cat([torch.arange(Lp).expand(b, Lp), lens[:, None] + torch.arange(K)], 1)
        cache = predecessors.new_cache(lm.model)
        order = predecessors.prefill_predecessors(lens, Lp, K)
        with torch.no_grad(), predecessors.predecessors(lm.model, order, cache, prompt=sizes) as seq:
            logits = lm.forward(ids, pos, masks.prefill_mask(lens, Lp, K), (torch.arange(Lp + K) >= Lp).expand(b, -1),
                                cache, slots_from=Lp, holes=min(sizes) < Lp)
        seq.commit(lens - 1)
        return logits, cache

    prompts = random_prompts(4, seed=11, lo=3, hi=20)
    logits, cache = prefill(prompts)
    Lp = max(len(p) for p in prompts)
    for i, p in enumerate(prompts):
        one, alone = prefill([p])
        assert torch.equal(logits[i, len(p) - 1], one[0, -K - 1]) and torch.equal(logits[i, Lp:], one[0, -K:]), i
        for a, b in zip(cache.layers, alone.layers):
            if getattr(a, "is_recurrent_states_initialized", {}).get(0, False):
                assert torch.equal(a.conv_states[0][i], b.conv_states[0][0])
                assert torch.equal(a.recurrent_states[0][i], b.recurrent_states[0][0])


def test_recurrent_tune_forward_cost_runs():
    """tune's forward-cost timing builds a cache with recurrent states and crops it (no values asserted: speed lives
    in benchmarks)."""
    from ar2dlm.measure.tune import forward_cost

    _, lm = converted("nemotron_h")
    assert set(forward_cost(lm, (1, 4, 8), context=16, reps=1)) == {1, 4, 8}


@pytest.mark.parametrize("family", ["nemotron_h"])
def test_recurrent_bf16_checkpoint_passes_its_machine_check(family, tmp_path, monkeypatch):
    """A converted recurrent checkpoint loads in bf16 (batch-invariant by default), and the machine check of
    model/exactness.py, which runs its forwards as the engine does (the recurrent layers scanned), finds every row
    bitwise equal to the row alone."""
    from ar2dlm import convert

    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path / "home"))  # a fresh verdict, not one cached on this machine
    base = tiny(family, dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    lm = DiffusionLM.from_pretrained(convert(tmp_path / "base", tmp_path / "out", block_size=4), dtype="bfloat16")
    verdict = lm.exactness(quiet=True)
    assert lm.batch_invariant and verdict.exact, verdict.line()
    assert lm.generate([[5, 6, 7]], max_new_tokens=6, draft_len=4, proposals=2)[0].token_ids
