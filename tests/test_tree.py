"""Candidate trees (decode/tree.py): siblings beside the drafter's guesses, verified in the same forward.

- the tree mask and the predecessors are the layout their docstrings draw;
- greedy with trees == HF generate (fp32) and == the same-stack AR loop (bf16, the lean forward), alone and in
  ragged batches, at K in {2, 4, 8}, |R| in {1, 3}, with siblings at one and at several depths, and siblings are
  accepted (the branch runs);
- lossless and mix (w = 0) with trees reproduce the AR distribution (chi-square), and siblings are accepted;
- a step with a tree reads the host once; bad tree settings are refused naming the field.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, make_tokenizer, tiny_model
from test_core import HostReads, _alike
from test_lossless import SMALL_V, chi_square_p, exact_joint, small_lm

from ar2dlm.core.errors import ConfigError
from ar2dlm.decode.config import DecodeConfig
from ar2dlm.decode.core import Batch, Request
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import masks, predecessors

V = 24  # a small vocabulary: an untrained drafter's second and third guesses are right often enough


def test_the_tree_mask_is_its_drawing():
    """K = 3, siblings at depths (1, 1, 2), R = {1}, one committed token and one hole in the cache."""
    cache_valid = torch.tensor([[True, False]])
    got = masks.tree_mask(cache_valid, 3, torch.tensor([1, 1, 2]), torch.tensor([[1]]))[0].int()
    rows = ["1 0 | 1 0 0 | 0 0 0 | 0 0 0",  # d1
            "1 0 | 1 1 0 | 0 0 0 | 0 0 0",  # d2
            "1 0 | 1 1 1 | 0 0 0 | 0 0 0",  # d3
            "1 0 | 1 0 0 | 1 0 0 | 0 0 0",  # a (for d2)
            "1 0 | 1 0 0 | 0 1 0 | 0 0 0",  # b (for d2)
            "1 0 | 1 1 0 | 0 0 1 | 0 0 0",  # c (for d3)
            "1 0 | 1 0 0 | 0 0 0 | 1 1 1",  # P1 slots
            "1 0 | 1 0 0 | 0 0 0 | 1 1 1",
            "1 0 | 1 0 0 | 0 0 0 | 1 1 1"]
    want = torch.tensor([[int(x) for x in r.replace("|", " ").split()] for r in rows])
    assert torch.equal(got, want)
    # without siblings it is the step mask
    plain = masks.tree_mask(cache_valid, 3, torch.zeros(0, dtype=torch.long), torch.tensor([[1, 2]]))
    assert torch.equal(plain, masks.step_mask(cache_valid, 3, torch.tensor([[1, 2]])))


def test_a_sibling_follows_its_parent():
    pred = predecessors.tree_predecessors(torch.tensor([[1, 2]]), 3, torch.tensor([1, 1, 2]))
    #            d1  d2 d3 | a  b  c | P1: after d1, then its slots | P2: after d2, then its slots
    assert pred[0].tolist() == [-1, 0, 1, 0, 0, 1, 0, 6, 7, 1, 9, 10]


def small_vocab(arch: str, dtype=torch.float32, seed: int = 0):
    base = tiny_model(arch, seed, dtype, vocab=V)
    model = tiny_model(arch, seed, dtype, vocab=V)
    tok = make_tokenizer(V)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=8, mask_token_id=add_mask_token(model, tok)))


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (int(m),), generator=g).tolist() for m in torch.randint(2, 12, (n,), generator=g)]


def hf_greedy(model, prompt, new, suppress):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, eos_token_id=EOS,
                         pad_token_id=0, suppress_tokens=suppress)
    return out[0, len(prompt):].tolist()


TREES = [(2, 1, (1,)), (2, 2, (3,)), (4, 1, (3,)), (4, 3, (2, 1)), (8, 1, (3, 2, 1)), (8, 3, (1,))]  # (K, |R|, tree)


def _siblings(gens) -> int:
    return sum(g.stats.by_kind.get("tree", [0, 0, 0])[2] for g in gens)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_trees_equals_hf_generate(arch):
    base, lm = small_vocab(arch)
    ps = prompts(8, seed=1)
    expected = [hf_greedy(base, p, 24, [lm.mask_token_id]) for p in ps]
    hits = 0
    for K, R, shape in TREES:
        settings = dict(max_new_tokens=24, draft_len=K, proposals=R, tree=shape, adaptive=False)
        alone = [lm.generate([p], **settings)[0] for p in ps]
        assert [g.token_ids for g in alone] == expected, (K, R, shape)
        batched = lm.generate(ps, **settings)  # one ragged batch
        assert [g.token_ids for g in batched] == expected, (K, R, shape)
        hits += _siblings(alone)
    assert hits > 10, "siblings were never accepted: the tree's accept branch did not run"


def test_greedy_with_trees_equals_the_bf16_ar_loop():
    """The lean bf16 forward (batch-invariant): greedy with trees gives the bf16 AR loop's tokens. (Tokens rarely
    flip on a tiny model even without the siblings' rank order; that the sibling rows' logits are the AR loop's bit
    for bit is held by tests/test_invariant.py, at the forward, where dropping the rank order fails.)"""
    _, lm = small_vocab("llama", torch.bfloat16)
    lm.fuse()
    assert lm.batch_invariant and lm.lean is not None
    ps = prompts(6, seed=2) + [prompts(1, seed=3)[0] * 8]  # one prompt past a 64-key chunk of the kernel
    ar = [g.token_ids for g in lm.generate(ps, max_new_tokens=40, ar=True)]
    hits = 0
    for K, R, shape in TREES:
        gens = lm.generate(ps, max_new_tokens=40, draft_len=K, proposals=R, tree=shape, adaptive=False)
        assert [g.token_ids for g in gens] == ar, (K, R, shape)
        hits += _siblings(gens)
    assert hits > 10


def test_trees_with_suffix_candidates_and_joined_rows(drafter):
    """Trees compose with suffix candidates, and with rows that join a running batch (generate, stream and a
    joined Batch give the AR loop's tokens)."""
    pattern = drafter.pattern
    ps = [pattern[i:] + pattern[:i] for i in (0, 3)] + [[5, 9, 13, 2, 40]]
    settings = dict(max_new_tokens=30, draft_len=4, proposals=1, tree=(2, 1), candidates="both", adaptive=False)
    expected = [g.token_ids for g in drafter.generate(ps, max_new_tokens=30, ar=True)]
    together, alone, joined = _alike(drafter, ps, settings)
    assert together == alone == joined == expected
    gens = drafter.generate(ps, **settings)
    kinds = set().union(*(g.stats.by_kind for g in gens))
    assert {"tree", "suffix"} <= kinds, kinds
    # adaptive drafting prices the siblings' rows and counts what they bring
    adaptive = drafter.generate(ps, max_new_tokens=30, draft_len=8, proposals=1, tree=(2, 1), adaptive=True,
                                candidates="diffusion")
    assert [g.token_ids for g in adaptive] == expected


@pytest.mark.parametrize("settings", [
    dict(sampler="lossless", draft_len=4, proposals=1, tree=(3,)),
    dict(sampler="lossless", draft_len=3, proposals=2, tree=(2, 2), temperature=0.7, top_k=5, top_p=0.9),
    dict(sampler="mix", mix_weight=0.0, draft_len=4, proposals=1, tree=(2, 1)),
])
def test_lossless_with_trees_matches_the_ar_distribution(settings):
    base, lm = small_lm()
    prompt = [3, 5, 2]
    cfg = DecodeConfig(sampler="lossless", **{k: v for k, v in settings.items()
                                              if k in ("temperature", "top_k", "top_p")})
    probs = exact_joint(base, prompt, cfg)
    n = 20000
    counts, siblings = {}, 0
    for s in range(n // 2000):
        for g in lm.generate([prompt] * 2000, max_new_tokens=3, eos_token_id=(), seed=100 + s, adaptive=False,
                             **settings):
            key = tuple(g.token_ids[:3])
            counts[key] = counts.get(key, 0) + 1
            siblings += g.stats.by_kind.get("tree", [0, 0, 0])[2]
    pvalue = chi_square_p(counts, probs, n)
    print(f"chi-square p = {pvalue:.4f}, siblings accepted {siblings}")
    assert pvalue > 1e-3
    assert siblings > 200, "siblings were rarely accepted: the sequential rejection did not run"
    assert SMALL_V == 8


def test_a_tree_step_reads_the_host_once():
    _, lm = small_vocab("llama", torch.bfloat16)
    cfg = lm.decode_config(max_new_tokens=20, draft_len=4, proposals=1, tree=(3, 1), adaptive=False, eos_token_id=())
    batch = Batch(lm, cfg)
    batch.join([Request(lm, cfg, p) for p in prompts(3, seed=5)])
    per_step = []
    while len(batch):
        with HostReads() as reads:
            batch.step()
        per_step.append(reads.count)
    assert len(per_step) >= 4 and max(per_step) <= 2, per_step


@pytest.mark.parametrize("settings,field", [
    (dict(tree=(17,)), "tree"),
    (dict(draft_len=2, proposals=1, tree=(1, 1)), "tree"),
    (dict(ar=True, tree=(2,)), "tree"),
    (dict(candidates="suffix", tree=(2,)), "tree"),
])
def test_bad_trees_are_refused(settings, field):
    with pytest.raises(ConfigError) as e:
        DecodeConfig(**settings)
    assert e.value.field == field


@pytest.mark.parametrize("family", ["lfm2", "zaya"])
def test_greedy_with_trees_on_layers_that_read_their_neighbours(family):
    """LFM2's short convolutions and ZAYA1's CCA read each row's logical predecessors: a sibling's is its parent
    d_j, and after a step that took a sibling the conv state is the one after the sibling's row."""
    if family == "lfm2":
        from test_lfm2 import converted as build
        base, lm = build("L3", vocab=V)
    else:
        from test_zaya import CONFIGS, converted as build
        base, lm = build(next(iter(CONFIGS)))
    ps = prompts(4, seed=7)
    expected = [hf_greedy(base, p, 20, [lm.mask_token_id]) for p in ps]
    hits = 0
    for K, R, shape in [(4, 1, (3,)), (4, 3, (2, 1))]:
        gens = lm.generate(ps, max_new_tokens=20, draft_len=K, proposals=R, tree=shape, adaptive=False)
        assert [g.token_ids for g in gens] == expected, (K, R, shape)
        hits += _siblings(gens)
    assert hits > 0


def test_trees_are_refused_on_sliding_window_layers():
    from test_sliding import converted as build
    _, lm = build("mistral")
    with pytest.raises(ConfigError) as e:
        lm.generate([[3, 4, 5]], max_new_tokens=4, draft_len=4, proposals=1, tree=(2,))
    assert e.value.field == "tree"


def test_adaptive_drafting_learns_how_often_siblings_are_taken():
    from ar2dlm.decode.policy import AdaptiveDraft, CostModel
    policy = AdaptiveDraft(4, 1, CostModel(), shape=(2,), sibling_prior=0.25)
    for _ in range(30):  # the chain always stops at depth 1 (r = 1 without a sibling, 2 with one), siblings always
        policy.update([2, 2], [4, 4], [0, 1])
    assert policy.h[0] > 0.95 and policy.a[0] < 0.05
    for _ in range(30):  # now they never are
        policy.update([1, 1], [4, 4], [-1, -1])
    assert policy.h[0] < 0.05
