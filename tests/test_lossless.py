"""Lossless sampling reproduces the AR distribution; stub distributions force accept none/all/some;
the mix sampler is lossless at w = 0 and accepts more as w grows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, tiny_model, train_drafter
from scipy.stats import chisquare

from ar2dlm.decode import verify
from ar2dlm.decode.config import DecodeConfig
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig

SMALL_V = 8


def small_lm(seed=0, dtype=torch.float64):
    """(base, converted) with an 8-token vocabulary, float64 unless said."""
    base = tiny_model("llama", seed, dtype, vocab=SMALL_V)
    model = tiny_model("llama", seed, dtype, vocab=SMALL_V)
    with torch.no_grad():  # softer than the default sharpening: more outcomes have visible mass
        base.lm_head.weight.mul_(0.25)
        model.lm_head.weight.mul_(0.25)
    tok = make_tokenizer(SMALL_V)
    mask_id = add_mask_token(model, tok)
    return base, DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=mask_id))


def exact_joint(model, prompt, cfg: DecodeConfig, n_tokens=3, vocab=None):
    """Exact probability of every sequence of the first n_tokens under AR sampling with cfg's processing."""
    vocab = vocab or model.config.vocab_size
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=n_tokens - 1):
            ids = torch.tensor([prompt + list(seq)])
            logits = model(ids).logits[0, len(prompt) - 1:, :vocab]  # [n_tokens, vocab]
            p = verify.process_logits(logits, cfg, None)
            for last in range(vocab):
                full = seq + (last,)
                prob = float(np.prod([p[i, full[i]].item() for i in range(n_tokens)]))
                probs[full] = prob
    return probs


def sample_first_tokens(lm, prompt, cfg_kwargs, n=3000, batch=2000, n_tokens=3):
    counts, hist = {}, {}
    assert n % batch == 0
    for s in range(n // batch):
        for g in lm.generate([prompt] * batch, max_new_tokens=n_tokens, eos_token_id=(), seed=100 + s,
                             **cfg_kwargs):
            key = tuple(g.token_ids[:n_tokens])
            counts[key] = counts.get(key, 0) + 1
            for r, c in g.stats.accepted.items():
                hist[r] = hist.get(r, 0) + c
    return counts, hist


def chi_square_p(counts, probs, n):
    keys = sorted(probs, key=lambda k: -probs[k])
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for k in keys:
        if probs[k] * n >= 5:
            obs.append(counts.get(k, 0))
            exp.append(probs[k] * n)
        else:
            rest_o += counts.get(k, 0)
            rest_e += probs[k] * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    else:
        assert rest_o == 0, "sampled sequences the AR model gives probability 0"
    assert sum(counts.get(k, 0) for k in counts if k not in probs) == 0, "sampled an impossible sequence"
    exp = np.array(exp) * (n / sum(exp))
    return chisquare(obs, exp).pvalue


def assert_lossless(base, lm, n: int, prompt=(3, 5, 2), settings=None) -> None:
    """The first 3 tokens `lm` samples (lossless, K = 4, |R| = 2 unless `settings` say otherwise) follow the exact
    joint of `base` (chi-square), and the draws had both rejections and accepts."""
    prompt = list(prompt)
    settings = settings or dict(sampler="lossless", draft_len=4, proposals=2)
    probs = exact_joint(base, prompt, DecodeConfig(sampler="lossless"))
    counts, hist = sample_first_tokens(lm, prompt, settings, n=n)
    assert chi_square_p(counts, probs, n) > 1e-3
    assert hist.get(1, 0) > 0 and sum(v for r, v in hist.items() if r > 1) > 0, hist  # rejections and accepts


@pytest.mark.parametrize("settings", [
    dict(sampler="lossless", draft_len=4, proposals=2),
    dict(sampler="lossless", draft_len=3, proposals=3, temperature=0.7, top_k=5, top_p=0.9),
    dict(sampler="mix", mix_weight=0.0, draft_len=4, proposals=1),
    dict(sampler="lossless", ar=True),  # the same-stack AR loop samples from p too
])
def test_lossless_matches_ar_distribution(settings):
    base, lm = small_lm()
    prompt = [3, 5, 2]
    cfg = DecodeConfig(sampler="lossless", **{k: v for k, v in settings.items() if k in ("temperature", "top_k", "top_p")})
    probs = exact_joint(base, prompt, cfg)
    n = 20000
    counts, hist = sample_first_tokens(lm, prompt, settings, n=n)
    pvalue = chi_square_p(counts, probs, n)
    print(f"chi-square p = {pvalue:.4f}")
    assert pvalue > 1e-3
    if not settings.get("ar"):
        assert hist.get(1, 0) > 0 and sum(v for r, v in hist.items() if r > 1) > 0, hist  # rejections and accepts


class SameStackAR(torch.nn.Module):
    """The converted model's own causal forward (the AR loop's logits, bitwise, when batch-invariant)."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.model.config

    def forward(self, ids):
        n = ids.shape[1]
        logits = self.lm.forward(ids, torch.arange(n)[None], torch.ones(n, n, dtype=torch.bool).tril()[None])
        return type("Out", (), {"logits": logits.double()})


@pytest.mark.parametrize("settings", [
    dict(sampler="lossless", draft_len=4, proposals=2),
    dict(sampler="lossless", draft_len=3, proposals=3, temperature=0.7, top_k=5, top_p=0.9),
])
def test_lossless_matches_ar_distribution_in_bf16(settings):
    """In bf16 (batch-invariant) the sampler reproduces the bf16 AR model's distribution, the exact joint
    computed from the model's own forward in bf16."""
    _, lm = small_lm(dtype=torch.bfloat16)
    assert lm.batch_invariant
    prompt = [3, 5, 2]
    cfg = DecodeConfig(sampler="lossless", **{k: v for k, v in settings.items() if k in ("temperature", "top_k", "top_p")})
    probs = exact_joint(SameStackAR(lm), prompt, cfg, vocab=SMALL_V)
    n = 20000
    counts, hist = sample_first_tokens(lm, prompt, settings, n=n)
    assert chi_square_p(counts, probs, n) > 1e-3
    assert hist.get(1, 0) > 0 and sum(v for r, v in hist.items() if r > 1) > 0, hist


def test_lossless_with_a_strong_drafter_matches_ar_distribution():
    lm = train_drafter(vocab=12, steps=100)
    prompt = lm.pattern[:3]
    cfg = DecodeConfig(sampler="lossless", temperature=1.5)
    probs = exact_joint(lm.model, prompt, cfg, vocab=12)
    n = 4000
    counts, hist = sample_first_tokens(lm, prompt, dict(sampler="lossless", draft_len=4, proposals=2,
                                                        temperature=1.5), n=n)
    assert chi_square_p(counts, probs, n) > 1e-3
    assert sum(v for r, v in hist.items() if r > 1) > hist.get(1, 0)  # mostly accepted


# ------------------------------------------------------------------ stub distributions
def one_hot(idx, V):
    return torch.nn.functional.one_hot(torch.tensor(idx), V).double()


def test_stub_accept_all():
    V, K = 6, 4
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, K, V, generator=g, dtype=torch.float64), -1)
    q = p.clone()
    q[:, 1:] = p[:, :-1]  # q_{j+1} == p_j: every draft passes with probability 1
    draft = torch.tensor([[0, 1, 2, 3]])
    bonus = []
    for _ in range(2000):
        r, t = verify.speculative(p, q, draft, torch.tensor([K]), g)
        assert r.item() == K
        bonus.append(t.item())
    freq = np.bincount(bonus, minlength=V) / len(bonus)
    assert np.abs(freq - p[0, K - 1].numpy()).max() < 0.04  # bonus token ~ p_K


def test_stub_accept_none():
    V, K = 6, 4
    p = torch.stack([one_hot(4, V) * 0.5 + one_hot(5, V) * 0.5] * K)[None]  # p never gives token 1
    q = torch.stack([one_hot(1, V)] * K)[None]
    draft = torch.tensor([[0, 1, 1, 1]])
    g = torch.Generator().manual_seed(0)
    ts = []
    for _ in range(500):
        r, t = verify.speculative(p, q, draft, torch.tensor([K]), g)
        assert r.item() == 1
        ts.append(t.item())
    assert set(ts) == {4, 5}  # from the residual (p - q)+ = p


def test_stub_accept_some():
    V, K = 6, 5
    p = torch.stack([one_hot(2, V), one_hot(3, V), one_hot(0, V) * 0.3 + one_hot(5, V) * 0.7, one_hot(1, V),
                     one_hot(1, V)])[None]
    q = torch.stack([one_hot(0, V), one_hot(2, V), one_hot(3, V), one_hot(4, V), one_hot(1, V)])[None]
    draft = torch.tensor([[9 % V, 2, 3, 4, 1]])  # d2, d3 match p1, p2; d4 = 4 has p3(4) = 0
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        r, t = verify.speculative(p, q, draft, torch.tensor([K]), g)
        assert r.item() == 3 and t.item() in (0, 5)
    # a shorter real draft stops acceptance at its end and samples t from p (no residual)
    r, t = verify.speculative(p, q, draft, torch.tensor([2]), g)
    assert r.item() == 2 and t.item() == 3


def test_greedy_stub():
    V, K = 6, 4
    logits = torch.stack([one_hot(2, V), one_hot(3, V), one_hot(4, V), one_hot(5, V)])[None] * 10
    r, t = verify.greedy(logits, torch.tensor([[0, 2, 3, 1]]), torch.tensor([K]), None)
    assert r.item() == 3 and t.item() == 4
    r, t = verify.greedy(logits, torch.tensor([[0, 2, 3, 4]]), torch.tensor([K]), None)
    assert r.item() == 4 and t.item() == 5  # all accepted: bonus from p_K
    r, t = verify.greedy(logits, torch.tensor([[0, 2, 3, 4]]), torch.tensor([1]), None)
    assert r.item() == 1 and t.item() == 2


# ------------------------------------------------------------------ mix
def test_mix_weight_zero_is_lossless_token_for_token():
    from test_decode import converted, random_prompts

    _, lm = converted("llama")
    prompts = random_prompts(6, seed=11)
    for seed in range(3):
        a = lm.generate(prompts, max_new_tokens=20, sampler="lossless", seed=seed, draft_len=4, proposals=2)
        b = lm.generate(prompts, max_new_tokens=20, sampler="mix", mix_weight=0.0, seed=seed, draft_len=4,
                        proposals=2)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_mix_weight_raises_acceptance():
    from test_decode import converted, random_prompts

    _, lm = converted("llama")
    prompts = random_prompts(8, seed=12)
    tpf = []
    for w in (0.0, 0.5, 1.0):
        gens = lm.generate(prompts, max_new_tokens=32, sampler="mix", mix_weight=w, seed=0, draft_len=4,
                           proposals=4, eos_token_id=())
        tpf.append(sum(g.stats.new_tokens for g in gens) / sum(g.stats.forwards for g in gens))
    assert tpf[0] < tpf[1] < tpf[2], tpf
    assert tpf[2] > 3.0  # w = 1 verifies against q itself: (almost) everything is accepted


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mix_weight_one_pre_drafts_full_acceptance(temperature):
    """At w = 1 every draft is accepted, so with one proposal the policy pre-drafts r = K: K tokens per step."""
    from test_decode import converted, random_prompts

    _, lm = converted("llama")
    K = 4
    gens = lm.generate(random_prompts(3, seed=13), max_new_tokens=4 * K, sampler="mix", mix_weight=1.0, seed=0,
                       draft_len=K, proposals=1, eos_token_id=(), temperature=temperature)
    for g in gens:
        assert g.stats.new_tokens == 4 * K and g.stats.accepted == {K: 4}, g.stats.accepted


def test_choose_proposals_mix_weight():
    """w = 0 keeps the draft-confidence ranking; w = 1 ranks full acceptance first; invalid drafts stay out."""
    from ar2dlm.decode.policy import choose_proposals

    K, V = 4, 10
    draft = torch.tensor([[1, 2, 3, 4]])
    logits = torch.full((1, K, V), -4.0)
    logits[0, 1:, 0] = 4.0  # the drafter prefers token 0 over the drafted tokens: r = 1 is likeliest
    n_draft = torch.tensor([K])
    assert choose_proposals(draft, logits, n_draft, 1, None).tolist() == [[1]]
    assert choose_proposals(draft, logits, n_draft, 1, None, mix_weight=0.0).tolist() == [[1]]
    assert choose_proposals(draft, logits, n_draft, 1, None, mix_weight=1.0).tolist() == [[K]]
    assert choose_proposals(draft, logits, torch.tensor([2]), 1, None, mix_weight=1.0).tolist() == [[2]]


def test_sample_draws_in_proportion_and_never_a_zero_weight():
    """verify.sample (inverse CDF) against the weights it is given: chi-square, and zero weights stay undrawn."""
    g = torch.Generator().manual_seed(5)
    w = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.25, 0.05, 0.0])
    rows = w.expand(6, 40_000, -1) * torch.arange(1.0, 7.0)[:, None, None]  # unnormalised, 6 scales; 4-row chunks
    x = verify.sample(rows, g)
    assert x.shape == (6, 40_000)
    counts = torch.bincount(x.flatten(), minlength=7).double()
    assert counts[w == 0].sum() == 0
    keep = w > 0
    assert chisquare(counts[keep].numpy(), (w[keep] / w.sum() * x.numel()).double().numpy()).pvalue > 1e-3
    assert verify.sample(torch.tensor([[0.0, 0.0, 3.0], [2.0, 0.0, 0.0]]), g).tolist() == [2, 0]
