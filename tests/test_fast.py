"""The bf16 decode fast paths held to the plain path: prepacked oneDNN linears (kernels.Packed) and the lean
Llama-family forward (nn/decoder.py). Oracles: F.linear, transformers' own forward under `plain()`, the one-row
forward and the AR loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, tiny_model
from test_kernels import adapted, layouts
from transformers import DynamicCache

from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import decoder, kernels, masks

PACKS = kernels.packs(torch.zeros(1, dtype=torch.bfloat16))
needs_packing = pytest.mark.skipif(not PACKS, reason="oneDNN computes no bf16 on this CPU")


@needs_packing
@pytest.mark.parametrize("shape", [(8, 49153), (32, 97), (32, 1001), (576, 960), (1536, 576), (576, 1001)])
def test_packed_linear_rows_equal_their_one_row_product(shape):
    """Each row of a many-row product is bitwise the row's own product, and equals F.linear (float rounding)."""
    K, N = shape
    g = torch.Generator().manual_seed(K + N)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    bias = torch.randn(N, generator=g).bfloat16()
    x = torch.randn(40, K, generator=g).bfloat16()
    for b in (None, bias):
        packed = kernels.Packed(w, b)
        one = torch.cat([packed(x[i:i + 1]) for i in range(40)])
        for M in (2, 5, 16, 17, 40):
            assert torch.equal(packed(x[:M]), one[:M]), M
        torch.testing.assert_close(one, F.linear(x, w, b), rtol=1e-2, atol=1e-2)
        assert packed(x[None, :3]).shape == (1, 3, N)


@needs_packing
def test_packed_weight_changed_in_place_is_not_used():
    w = torch.randn(8, 16).bfloat16()
    packed = kernels.Packed(w)
    assert packed.current(w)
    with torch.no_grad():
        w.mul_(2)
    assert not packed.current(w) and not packed.current(w.clone())


def lean_model(arch: str, kind: str | None, dtype: torch.dtype) -> DiffusionLM:
    lm = adapted(arch, kind)
    lm.model.to(dtype)
    lm.batch_invariant = True
    lm.fuse()
    return lm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch,kind", [("llama", "drafting"), ("qwen2", "drafting"), ("mistral", None),
                                       ("llama", "lora"), ("qwen2", None)])
def test_lean_forward_equals_the_plain_forward(arch, kind, dtype):
    """Every layout (ragged prefill, a decode step over a cache, a non-suffix gate), with the adapter on and off:
    logits and cached K/V of the lean forward == transformers' forward of the plain modules, to rounding."""
    lm = lean_model(arch, kind, dtype)
    assert lm.lean is not None
    tol = {} if dtype == torch.float32 else dict(rtol=5e-2, atol=0.15)  # bf16: rounding over a few layers
    calls = []
    real = decoder.LeanDecoder.__call__
    decoder.LeanDecoder.__call__ = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        for name, (ids, pos, mask, slots) in layouts().items():
            for base_only in (False, True):
                with torch.inference_mode(), (lm.base_weights() if base_only else torch.inference_mode()):
                    caches = [DynamicCache(), DynamicCache()]
                    outs = []
                    for plain, cache in zip((False, True), caches):
                        with lm.plain() if plain else torch.inference_mode():
                            if name == "step":
                                lm.forward(torch.arange(2, 7)[None], torch.arange(5)[None], masks.causal_mask(5),
                                           None, cache)
                            outs.append(lm.forward(ids, pos, mask, slots, cache if name == "step" else None))
                torch.testing.assert_close(outs[0], outs[1], **tol, msg=f"{name} base_only={base_only}")
                for a, b in zip(caches[0].layers, caches[1].layers):
                    torch.testing.assert_close(a.keys, b.keys, **tol)
                    torch.testing.assert_close(a.values, b.values, **tol)
    finally:
        decoder.LeanDecoder.__call__ = real
    assert calls, "the lean forward never ran"


@pytest.mark.parametrize("arch", ["qwen3", "qwen2_moe", "gpt2"])
def test_other_architectures_run_transformers_forward(arch):
    model = tiny_model(arch).to(torch.bfloat16)
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))
    lm.fuse()
    assert lm.batch_invariant and lm.lean is None


def test_the_lean_forward_is_the_batch_invariant_one():
    """Only where the model decodes batch-invariantly (bf16 by default; fp32 when asked)."""
    model = tiny_model("llama")
    tok = make_tokenizer()
    cfg = DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok))
    plain = DiffusionLM(model, tok, cfg)
    plain.fuse()
    assert plain.lean is None  # fp32 default: transformers' forward, == HF generate
    bf16 = DiffusionLM(tiny_model("llama").to(torch.bfloat16), tok, cfg)
    bf16.fuse()
    assert bf16.lean is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_lean_greedy_equals_the_ar_loop(drafter, dtype):
    """A trained drafter in the lean forward: greedy with drafts == its AR loop, token for token; the ragged
    batch == each prompt alone."""
    lm = DiffusionLM(copy.deepcopy(drafter.model).to(dtype), drafter.tokenizer, drafter.settings, batch_invariant=True)
    lm.fuse()
    assert lm.lean is not None
    p = drafter.pattern
    prompts = [p[:5], p[2:4] + p, [p[1]], p[3:] * 2]
    ar = lm.generate(prompts, max_new_tokens=24, ar=True, eos_token_id=())
    for K, R in ((4, 1), (4, 3), (2, 1)):
        drafted = lm.generate(prompts, max_new_tokens=24, draft_len=K, proposals=R, adaptive=False,
                              eos_token_id=())
        assert [g.token_ids for g in drafted] == [g.token_ids for g in ar], (K, R)
        alone = [lm.generate([q], max_new_tokens=24, draft_len=K, proposals=R, adaptive=False,
                             eos_token_id=())[0].token_ids for q in prompts]
        assert alone == [g.token_ids for g in ar], (K, R)
    assert sum(g.stats.forwards for g in drafted) <= sum(g.stats.forwards for g in ar)
