"""Continuous batching (decode/core.Batch): rows join and leave between steps, each row decodes as if alone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from ar2dlm.decode.core import Batch, Request, step_settings
from ar2dlm.decode.step import merge
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig


def converted(arch, seed=0):
    """A converted tiny model in float64 (no near-tie flips an argmax between batch shapes)."""
    model = tiny_model(arch, seed, torch.float64)
    tok = make_tokenizer()
    return DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))


def prompts(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 90, (int(m),), generator=g).tolist() for m in torch.randint(2, 14, (n,), generator=g)]


def drive(lm, cfgs, ps, joins, cancel=None, draft=lambda step, rows: True):
    """Decode requests i (prompt ps[i], settings cfgs[i]) joining before step joins[i]; cancel={id: step}.

    Returns {id: tokens} and the batch sizes seen."""
    groups, rows, sizes = {}, {}, []
    pending = sorted(range(len(ps)), key=lambda i: joins[i])
    step = 0
    while pending or any(len(g) for g in groups.values()):
        now = [i for i in pending if joins[i] <= step]
        pending = [i for i in pending if joins[i] > step]
        by_key = {}
        for i in now:
            by_key.setdefault(step_settings(cfgs[i]), []).append(i)
        for key, ids in by_key.items():
            group = groups.setdefault(key, Batch(lm, cfgs[ids[0]]))
            new = [Request(lm, cfgs[i], ps[i]) for i in ids]
            rows.update(zip(ids, new))
            group.join(new)
        for i, at in (cancel or {}).items():
            if at == step:
                for g in groups.values():
                    g.leave([rows[i]])
        running = sum(len(g) for g in groups.values())
        sizes.append(running)
        for g in groups.values():
            if len(g):
                g.step(draft(step, running))
        step += 1
    return {i: r.tokens for i, r in rows.items()}, sizes


def assert_joined_rows_decode_as_alone(lm, ps, cancel=None) -> None:
    """Six requests of mixed settings (drafts, proposals, AR) join a running batch at different steps, some leave
    (finished or cancelled: cancel={id: step}); each row's tokens == the same request decoded alone (a cancelled
    one: a prefix of it), and the batch really held several rows."""
    news = [5, 24, 9, 17, 3, 30]
    settings = [dict(draft_len=4, proposals=2), dict(draft_len=4, proposals=3), dict(ar=True),
                dict(draft_len=2, proposals=1), dict(draft_len=8, proposals=3), dict(draft_len=4, proposals=2)]
    cfgs = [lm.decode_config(max_new_tokens=m, **s) for m, s in zip(news, settings)]
    got, sizes = drive(lm, cfgs, ps, [0, 0, 2, 3, 3, 6], cancel=cancel, draft=lambda step, rows: rows <= 3)
    assert max(sizes) > 3
    for i, p in enumerate(ps):
        alone = lm.generate([p], max_new_tokens=news[i], **settings[i])[0].token_ids
        assert got[i] == (alone[:len(got[i])] if i in (cancel or {}) else alone), i


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_rows_joining_and_leaving_decode_as_alone(arch):
    lm = converted(arch)
    ps = prompts(7)
    news = [5, 24, 9, 17, 3, 30, 12]
    settings = [dict(draft_len=4, proposals=2), dict(draft_len=4, proposals=2), dict(draft_len=4, proposals=2),
                dict(ar=True), dict(draft_len=4, proposals=2), dict(draft_len=8, proposals=8), dict(ar=True)]
    cfgs = [lm.decode_config(max_new_tokens=m, **s) for m, s in zip(news, settings)]
    joins = [0, 0, 2, 3, 3, 6, 9]
    got, sizes = drive(lm, cfgs, ps, joins, cancel={1: 7},
                       draft=lambda step, rows: rows <= 3)  # drafting stops while more than 3 rows run
    assert max(sizes) > 3 and 1 in sizes  # the load policy took both branches
    for i, p in enumerate(ps):
        alone = lm.generate([p], max_new_tokens=news[i], **settings[i])[0].token_ids
        if i == 1:  # cancelled: what it had is the start of its solo output
            assert 0 < len(got[i]) < len(alone) and got[i] == alone[:len(got[i])]
        else:
            assert got[i] == alone, i


def test_accepting_drafter_with_adaptive_rows_decodes_as_alone(drafter):
    pattern = drafter.pattern
    ps = [pattern[i:] + pattern[:i] for i in range(5)]
    cfgs = [drafter.decode_config(max_new_tokens=20 + 3 * i, draft_len=8, proposals=2, adaptive=i % 2 == 0)
            for i in range(5)]
    got, _ = drive(drafter, cfgs, ps, joins=[0, 1, 1, 4, 6])
    for i, p in enumerate(ps):
        cfg = cfgs[i]
        alone = drafter.generate([p], max_new_tokens=cfg.max_new_tokens, draft_len=8, proposals=2,
                                 adaptive=cfg.adaptive)[0]
        assert got[i] == alone.token_ids, i


def test_seeded_sampling_reproduces_whatever_shares_the_batch(drafter):
    ps = prompts(4, seed=5)
    sampled = dict(sampler="lossless", temperature=1.0, draft_len=4, proposals=2, max_new_tokens=24)
    cfg = drafter.decode_config(seed=1234, **sampled)
    alone, _ = drive(drafter, [cfg], ps[:1], joins=[0])
    others = [drafter.decode_config(seed=s, **sampled) for s in (7, 8, 9)]
    shared, _ = drive(drafter, [cfg] + others, ps, joins=[2, 0, 1, 3])
    assert shared[0] == alone[0]
    assert len({tuple(t) for t in shared.values()}) > 1
    reseeded, _ = drive(drafter, [drafter.decode_config(seed=99, **sampled)], ps[:1], joins=[0])
    assert reseeded[0] != alone[0]


def test_merge_pads_the_shorter_cache_with_holes():
    lm = converted("llama")
    cfg = lm.decode_config(max_new_tokens=8, draft_len=4, proposals=1)
    a, b = Batch(lm, cfg), Batch(lm, cfg)
    with torch.inference_mode():
        a.join([Request(lm, cfg, list(range(2, 12)))])
        b.join([Request(lm, cfg, [5, 6])])
    merged = merge(a.state, b.state)
    assert merged.cache_valid.shape == (2, 10) and merged.cache_valid.sum(1).tolist() == [10, 2]
    assert merged.cache.layers[0].keys.shape[:3] == (2, 2, 10) and merged.lengths == [10, 2] and merged.holes
