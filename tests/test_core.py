"""The engine core (decode/core.Batch): one step loop under generate, stream and the server.

- a step reads the host at most twice (counted over every tensor op that brings a value back to Python);
- generate, stream and a Batch that rows join and leave give the same tokens, greedy and seeded lossless,
  with every candidate kind (model drafts, proposals, suffix candidates, adaptive drafting).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from torch.overrides import TorchFunctionMode

from ar2dlm.decode import engine
from ar2dlm.decode.core import Batch, Request, row_seed
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__len__", "nonzero", "argwhere",
         "unique", "unique_consecutive", "numpy", "masked_select", "equal", "allclose"}
"""Tensor ops that hand a value (or a shape that depends on values) back to Python: on an accelerator each waits
for the device."""


class HostReads(TorchFunctionMode):
    """Counts host reads: the ops above, indexing by a bool tensor, and repeat_interleave by a tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name == "__getitem__" and _bool_index(args[1])) or (
                name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def converted(arch: str, dtype=torch.float32, seed: int = 0) -> DiffusionLM:
    model = tiny_model(arch, seed, dtype)
    tok = make_tokenizer()
    return DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))


def test_the_counter_sees_the_reads_it_is_meant_to():
    x = torch.arange(6)
    with HostReads() as reads:
        x.tolist(), int(x[0]), bool(x[1]), x[x > 2], x.nonzero(), x.sum() + 1  # the last is no read
    assert reads.count == 5


SETTINGS = {
    "drafts and proposals": dict(draft_len=4, proposals=2, adaptive=False, candidates="diffusion"),
    "suffix candidates": dict(draft_len=4, proposals=1, adaptive=False, candidates="both"),
    "adaptive": dict(draft_len=8, proposals=1, adaptive=True),
    "AR": dict(ar=True),
}


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("qwen2", torch.float32)])
@pytest.mark.parametrize("kind", list(SETTINGS))
def test_a_step_reads_the_host_at_most_twice(arch, dtype, kind):
    """Every step of a ragged batch with stop strings: the lean bf16 forward (llama) and transformers' forward
    (qwen2 in fp32), the step's bookkeeping, the suffix indexes, finishing and leaving."""
    lm = converted(arch, dtype)
    cfg = lm.decode_config(max_new_tokens=24, stop=("w7 w8", "w9"), eos_token_id=(), **SETTINGS[kind])
    batch = Batch(lm, cfg)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 90, (n,), generator=g).tolist() for n in (3, 9, 5)]
    batch.join([Request(lm, cfg, p) for p in prompts])
    per_step = []
    while len(batch):
        with HostReads() as reads:
            batch.step()
        per_step.append(reads.count)
    assert len(per_step) >= 5 and max(per_step) <= 2, per_step


def _alike(lm, prompts, settings):
    """The same requests through generate (a batch), stream (one at a time) and a Batch that rows join at
    different steps and that runs beside another request."""
    cfg = lm.decode_config(**settings)
    together = [g.token_ids for g in engine.generate(lm, prompts, cfg)]
    alone = []
    for i, p in enumerate(prompts):
        out = Request(lm, cfg, seed=row_seed(cfg, i))
        text = "".join(engine.stream(lm, p, cfg, out))
        assert text == out.text() == lm.tokenizer.decode(out.tokens, skip_special_tokens=True) or out.finish_reason
        alone.append(out.tokens)
    batch = Batch(lm, cfg)
    rows = [Request(lm, cfg, p, seed=row_seed(cfg, i)) for i, p in enumerate(prompts)]
    batch.join(rows[:1])
    for row in rows[1:]:
        batch.step()
        batch.join([row])
    while len(batch):
        batch.step()
    return together, alone, [r.tokens for r in rows]


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_generate_stream_and_a_joined_batch_give_the_same_tokens(drafter, kind):
    pattern = drafter.pattern
    prompts = [pattern[i:] + pattern[:i] for i in (0, 3)] + [[5, 9, 13, 2, 40]]
    greedy = dict(SETTINGS[kind], max_new_tokens=30)
    together, alone, joined = _alike(drafter, prompts, greedy)
    assert together == alone == joined
    runs = [g.token_ids for g in drafter.generate(prompts, **greedy)]
    assert runs == together
    # the drafter's drafts are accepted: the candidate kinds were exercised, not only rejected
    tpf = drafter.generate(prompts[:1], **greedy)[0].stats.tpf
    assert kind == "AR" or tpf > 1.3


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_seeded_lossless_is_the_same_through_every_driver(drafter, kind):
    """Each request alone: generate, stream and a Batch of its own draw the same samples. In a batch shared with
    others a row's samples stay its own where the draft length does not depend on the others (fixed drafts and
    proposals, AR); adaptive drafting and the suffix shortcut (no proposal rows while every row copies) pool
    their choice over the batch, which changes the drafts a seeded row verifies, not its distribution."""
    pattern = drafter.pattern
    prompts = [pattern[2:] + pattern[:2], [7, 3, 11, 20]]
    sampled = dict(SETTINGS[kind], sampler="lossless", temperature=0.8, seed=11, max_new_tokens=20)
    for p in prompts:
        together, alone, joined = _alike(drafter, [p], sampled)
        assert together == alone == joined
    if kind in ("drafts and proposals", "AR"):
        together, alone, joined = _alike(drafter, prompts, sampled)
        assert together == alone == joined


def test_each_step_is_counted_under_its_candidate_kind(drafter):
    """Stats.by_kind: the tokens of every step after the prefill, under the kind of draft it verified. A text
    that repeats itself is drafted from itself (suffix); the model drafts elsewhere; the AR loop drafts nothing."""
    pattern = drafter.pattern
    prompts = [pattern * 3, [5, 9, 13, 2, 40]]
    for settings, kinds in ((SETTINGS["suffix candidates"], {"suffix", "model"}),
                            (SETTINGS["drafts and proposals"], {"model"}), (SETTINGS["AR"], {"ar"}),
                            (dict(SETTINGS["drafts and proposals"], tree=(2,)), {"tree"})):
        gens = drafter.generate(prompts, max_new_tokens=30, eos_token_id=(), **settings)
        seen = set()
        for g in gens:
            steps, tokens, siblings = map(sum, zip(*g.stats.by_kind.values()))
            assert siblings <= steps and (siblings == 0 or "tree" in g.stats.by_kind)
            assert steps == sum(g.stats.accepted.values()) and tokens == g.stats.new_tokens - 1
            seen |= set(g.stats.by_kind)
            assert g.stats.as_dict()["by_kind"].keys() == g.stats.by_kind.keys()
        assert seen == kinds, settings
