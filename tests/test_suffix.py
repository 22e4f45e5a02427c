"""Model-free draft candidates (decode/suffix.py): the index against a plain scan (reference.lookup), and
exactness with candidates forced right and forced wrong: greedy == the AR loop, lossless == the AR
distribution."""

from __future__ import annotations

import random

import pytest
from test_decode import random_prompts
from test_lossless import chi_square_p, exact_joint, sample_first_tokens, small_lm

from ar2dlm.decode import reference, suffix
from ar2dlm.decode.config import DecodeConfig


def test_the_index_proposes_what_a_plain_scan_finds():
    rng = random.Random(0)
    for trial in range(60):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]  # a small alphabet: many repeats
        index = suffix.SuffixIndex(seq[:1], exclude=3)
        for i in range(1, len(seq) + 1):
            if i > 1:
                index.extend([seq[i - 1]])
            for k in (1, 3, 7):
                assert index.propose(k) == reference.lookup(seq[:i], k, exclude=3), (seq[:i], k)
        assert suffix.SuffixIndex(seq, exclude=3).propose(5) == index.propose(5)
    assert suffix.SuffixIndex([1, 2, 3, 9, 1, 2, 3]).propose(4) == [9, 1, 2, 3]
    assert suffix.SuffixIndex([5, 6]).propose(3) == [] and suffix.SuffixIndex([1, 2, 3, 1]).propose(0) == []


def _forced(monkeypatch, continuation):
    """Every request's index proposes continuation(tokens so far, k)."""
    monkeypatch.setattr(suffix.SuffixIndex, "propose", lambda self, k: continuation(self.tokens, k)[:k])


def test_greedy_with_candidates_forced_right_or_wrong_equals_the_ar_loop(drafter, monkeypatch):
    prompts = [drafter.pattern[:3]] + random_prompts(3, seed=5)
    ar = {tuple(p): drafter.generate([p], max_new_tokens=24, ar=True, eos_token_id=())[0].token_ids for p in prompts}

    def right(tokens, k):
        for p, out in ar.items():
            if tuple(tokens[:len(p)]) == p and tokens[len(p):] == out[:len(tokens) - len(p)]:
                return out[len(tokens) - len(p):]
        return []

    wrong_token = drafter.mask_token_id - 1
    for name, continuation in (("right", right), ("wrong", lambda tokens, k: [wrong_token] * k)):
        _forced(monkeypatch, continuation)
        for settings in ({"draft_len": 4, "proposals": 1}, {"draft_len": 6, "proposals": 2, "adaptive": True}):
            batch = drafter.generate(prompts, max_new_tokens=24, eos_token_id=(), **settings)
            assert [g.token_ids for g in batch] == [ar[tuple(p)] for p in prompts], (name, settings)
            alone = [drafter.generate([p], max_new_tokens=24, eos_token_id=(), **settings)[0] for p in prompts]
            assert [g.token_ids for g in alone] == [ar[tuple(p)] for p in prompts], (name, settings)
            if name == "right":  # every step verifies a right continuation of K - 1 tokens
                assert all(g.stats.tpf >= 3.0 for g in alone), [g.stats.tpf for g in alone]
    monkeypatch.undo()
    assert [g.token_ids for g in drafter.generate(prompts, max_new_tokens=24, eos_token_id=(),
                                                  candidates="diffusion")] == [ar[tuple(p)] for p in prompts]


@pytest.mark.parametrize("forced", ["wrong", "plausible"])
def test_lossless_with_forced_candidates_keeps_the_ar_distribution(forced, monkeypatch):
    base, lm = small_lm()
    prompt = [3, 5, 2]
    proposal = {"wrong": [7, 7, 7], "plausible": [3, 5, 2]}[forced]
    _forced(monkeypatch, lambda tokens, k: proposal)
    settings = dict(sampler="lossless", draft_len=4, proposals=1, temperature=0.9)
    probs = exact_joint(base, prompt, DecodeConfig(sampler="lossless", temperature=0.9))
    n = 10000
    counts, hist = sample_first_tokens(lm, prompt, settings, n=n, batch=2000)
    assert chi_square_p(counts, probs, n) > 1e-3
    if forced == "plausible":
        assert sum(v for r, v in hist.items() if r > 1) > 0  # some forced candidates were accepted


def test_the_mix_sampler_and_diffusion_only_draft_from_the_model(drafter, monkeypatch):
    calls = []
    _forced(monkeypatch, lambda tokens, k: calls.append(1) or [])
    p = drafter.pattern[:3]
    drafter.generate([p], max_new_tokens=8, sampler="mix", mix_weight=0.5, temperature=0.7, seed=1)
    drafter.generate([p], max_new_tokens=8, candidates="diffusion")
    assert not calls
    drafter.generate([p], max_new_tokens=8, candidates="suffix")
    assert calls
    with pytest.raises(Exception, match="candidates must be one of"):
        DecodeConfig(candidates="ngram")
