"""Inference fast paths held to the plain modules: fused projections (kernels.py, the layers of lora.py) and
packed grouped-query attention (attention.py). Each fused layer alone equals its plain forward; the logits of
every ar2dlm layout with the drafting adapter, an ungated LoRA and no adapter; greedy decoding equals HF generate
of the plain base."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import EOS, make_tokenizer, tiny_model

from ar2dlm.model import adapter
from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import AdapterSection, DiffusionConfig
from ar2dlm.nn import attention, kernels, masks
from ar2dlm.nn.lora import AdapterLinear


def adapted(arch: str, kind: str | None, seed: int = 0) -> DiffusionLM:
    """A tiny converted model with a LoRA of `kind` whose B is random (so the update is not zero), fused."""
    model = tiny_model(arch, seed)
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)))
    if kind is not None:
        adapter.attach(lm, AdapterSection(kind=kind, rank=4, alpha=8))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_B" in name or "trainable_tokens_delta" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        lm.model.eval()
    assert lm.fuse() > 0
    return lm


def layouts(cache_len: int = 5):
    """(ids, positions, mask, mask_slots) of a prefill, a decode step, a ragged batch and a non-suffix gate."""
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([6, 4])
    prefill = (torch.randint(2, 90, (2, 10), generator=g), torch.arange(10).expand(2, -1),
               masks.prefill_mask(lens, 6, 4), (torch.arange(10) >= 6).expand(2, -1))
    R = torch.tensor([[1, 3]])
    step = (torch.randint(2, 90, (1, 12), generator=g), cache_len + torch.arange(12)[None],
            masks.step_mask(torch.ones(1, cache_len, dtype=torch.bool), 4, R), (torch.arange(12) >= 4)[None])
    odd = (torch.randint(2, 90, (1, 6), generator=g), torch.arange(6)[None], masks.causal_mask(6),
           torch.tensor([[False, True, False, True, True, False]]))
    return {"prefill": prefill, "step": step, "non_suffix": odd}


@pytest.mark.parametrize("arch,kind", [("llama", "drafting"), ("qwen2", "drafting"), ("llama", "lora"),
                                       ("qwen2", None), ("qwen2_moe", "drafting")])
def test_fused_logits_equal_the_plain_modules(arch, kind):
    lm = adapted(arch, kind)
    for name, (ids, pos, mask, slots) in layouts().items():
        for base_only in (False, True):
            ctx = lm.base_weights() if base_only and kind == "drafting" else torch.inference_mode()
            with torch.inference_mode(), ctx:
                if name == "step":  # a cache of 5 tokens first
                    from transformers import DynamicCache
                    caches = [DynamicCache(), DynamicCache()]
                    prefix = torch.randint(2, 90, (1, 5), generator=torch.Generator().manual_seed(1))
                    fused = [lm.forward(prefix, torch.arange(5)[None], masks.causal_mask(5), None, caches[0])]
                    with lm.plain():
                        plain = [lm.forward(prefix, torch.arange(5)[None], masks.causal_mask(5), None, caches[1])]
                    fused.append(lm.forward(ids, pos, mask, slots, caches[0]))
                    with lm.plain():
                        plain.append(lm.forward(ids, pos, mask, slots, caches[1]))
                    for a, b in zip(caches[0].layers, caches[1].layers):
                        torch.testing.assert_close(a.keys, b.keys)
                        torch.testing.assert_close(a.values, b.values)
                else:
                    fused = [lm.forward(ids, pos, mask, slots)]
                    with lm.plain():
                        plain = [lm.forward(ids, pos, mask, slots)]
            for f, p in zip(fused, plain):
                torch.testing.assert_close(f, p, msg=f"{arch} {kind} {name} base_only={base_only}")


@pytest.mark.parametrize("arch,kind", [("llama", "drafting"), ("llama", "lora"), ("qwen2", None)])
def test_each_fused_layer_equals_its_plain_forward(arch, kind):
    """A fused layer (lora.AdapterLinear, kernels.FusedLinear) alone: its forward, the group's stacked matmul,
    equals its `reference` (peft's LoRA forward with the RowGate: W x + [row is slot] s B A x; nn.Linear's
    forward) to float rounding, on slot-suffix rows, all-clean rows, outside a forward and with the adapter
    disabled; with scattered slots it runs the gated path, held to the same reference."""
    lm = adapted(arch, kind)
    layers = [m for m in lm.model.modules() if isinstance(m, (AdapterLinear, kernels.FusedLinear))]
    assert layers and all(m.fused is not None for m in layers)
    assert any(isinstance(m, AdapterLinear) for m in layers) == (kind is not None)
    gates = {m.slot_gate for m in layers if isinstance(m, AdapterLinear)}
    assert gates == ({lm.slot_gate} if kind == "drafting" else {None} if kind else set())
    q = 7
    rows = {"slot_suffix": (torch.arange(q) >= 3).expand(2, -1), "all_clean": torch.zeros(2, q, dtype=torch.bool),
            "no_forward": None, "scattered": (torch.arange(q) % 3 == 1).expand(2, -1)}
    g = torch.Generator().manual_seed(3)
    for adapter_on in (True, False):
        off = lm.model.disable_adapter() if not adapter_on and kind else contextlib.nullcontext()
        with torch.inference_mode(), off:
            for name, slots in rows.items():
                for m in layers:
                    x = torch.randn(2, q, m.in_features, generator=g)
                    with lm.slot_gate.rows(slots):
                        fused_path = m.fused[0].usable(x)
                        got, want = m(x), m.reference(x)
                    assert fused_path == (name != "scattered" or kind is None or not adapter_on), name
                    torch.testing.assert_close(got, want, msg=f"{name} adapter_on={adapter_on} {type(m).__name__}")
                    if kind == "drafting" and adapter_on and slots is not None and name != "all_clean":
                        assert not torch.equal(got, m.base_layer(x))  # the update is there ...
                    if isinstance(m, AdapterLinear) and (not adapter_on or (kind == "drafting" and name in (
                            "all_clean", "no_forward"))):
                        assert torch.equal(got, m.base_layer(x))  # ... and clean rows run the base weight alone
                    if kind == "drafting" and slots is not None:
                        clean = ~slots[0]
                        assert torch.equal(got[:, clean], m.base_layer(x)[:, clean])


def test_fast_paths_are_scoped_to_one_model():
    """plain() of one model leaves another's fused path on; the packed GQA mask is built once per forward and
    not kept after it."""
    a, b = adapted("llama", "drafting"), adapted("llama", "drafting", seed=1)
    ids, pos, mask, slots = layouts()["prefill"]
    group_a = a.model.base_model.model.model.layers[0].self_attn.q_proj.fused[0]
    group_b = b.model.base_model.model.model.layers[0].self_attn.q_proj.fused[0]
    x = torch.randn(2, 10, group_a.weight.shape[1])
    with torch.inference_mode(), a.plain(), a.slot_gate.rows(slots), b.slot_gate.rows(slots):
        assert not group_a.usable(x) and group_b.usable(x)
    packed = []
    original = attention._packed_mask
    attention._packed_mask = lambda *args: packed.append(args[0]) or original(*args)
    try:
        with torch.inference_mode():
            a.forward(ids, pos, mask, slots)
            b.forward(ids, pos, mask, slots)
    finally:
        attention._packed_mask = original
    n_layers = len(a.model.base_model.model.model.layers)
    assert n_layers > 1 and len(packed) == 2 and packed[0] is not packed[1]  # one per forward, not per layer
    assert not a.packed_masks._packed


def test_the_fused_path_runs_and_shares_the_weights():
    """The modules' weights are views of the stacked buffer (no second copy), and an inference forward goes
    through the stacked matmul, not the modules' own forwards."""
    lm = adapted("llama", "drafting")
    attn = lm.model.base_model.model.model.layers[0].self_attn
    buffers = {attn.q_proj.base_layer.weight.untyped_storage().data_ptr(),
               attn.k_proj.base_layer.weight.untyped_storage().data_ptr(),
               attn.v_proj.lora_A["default"].weight.untyped_storage().data_ptr()}
    assert len(buffers) == 1
    calls = []
    original = torch.nn.Linear.forward
    torch.nn.Linear.forward = lambda self, x: calls.append(self) or original(self, x)
    try:
        ids, pos, mask, slots = layouts()["prefill"]
        with torch.inference_mode():
            lm.forward(ids, pos, mask, slots)
            fused_calls = len(calls)
            with lm.plain():
                lm.forward(ids, pos, mask, slots)
    finally:
        torch.nn.Linear.forward = original
    assert fused_calls < (len(calls) - fused_calls) / 4  # only the LM head and MoE-free leftovers run alone


def test_replaced_weights_and_autograd_take_the_plain_path():
    lm = adapted("llama", "drafting")
    ids, pos, mask, slots = layouts()["prefill"]
    logits = lm.forward(ids, pos, mask, slots)  # autograd on: the plain modules, gradients reach the LoRA
    logits.float().square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lm.model.named_parameters() if "lora_B" in n)
    lm.model.double()  # new weight tensors: the stacked buffer is stale and must not be used
    with torch.inference_mode():
        got = lm.forward(ids, pos, mask, slots)
        with lm.plain():
            want = lm.forward(ids, pos, mask, slots)
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_with_fused_projections_equals_hf_generate(arch):
    base = tiny_model(arch, 0, torch.float64)
    lm = adapted(arch, "drafting")
    lm.model.double()
    lm.fuse()  # fused again over the float64 weights
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 96, (int(n),), generator=g).tolist() for n in torch.randint(2, 14, (6,), generator=g)]
    expected = [base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16, eos_token_id=EOS,
                              pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    for K, R in [(1, 1), (4, 1), (4, 3)]:
        got = [g.token_ids for g in lm.generate(prompts, max_new_tokens=16, draft_len=K, proposals=R)]
        assert got == expected, (K, R)


def test_packed_gqa_attention_equals_transformers_sdpa():
    """attention.py on a long cache with ragged holes (decode-step mask, 4 query heads over 2 KV heads) gives
    transformers' own sdpa output, and it is what the model runs."""
    from transformers import DynamicCache

    from ar2dlm.nn import attention

    lm = adapted("llama", "drafting")
    assert lm.model.config._attn_implementation == attention.NAME
    g = torch.Generator().manual_seed(2)
    C = 40
    prefix = torch.randint(2, 90, (2, C), generator=g)
    valid = torch.rand(2, C, generator=g) > 0.2  # holes left by ragged acceptance
    valid[:, 0] = True
    R = torch.tensor([[1, 2], [2, 4]])
    ids = torch.randint(2, 90, (2, 12), generator=g)
    pos = C + torch.arange(12).expand(2, -1)
    outs = []
    for plain in (False, True):
        cache = DynamicCache()
        with torch.inference_mode(), (lm.plain() if plain else torch.inference_mode()):
            lm.forward(prefix, torch.arange(C).expand(2, -1), masks.causal_mask(C, 2), None, cache)
            outs.append(lm.forward(ids, pos, masks.step_mask(valid, 4, R), (torch.arange(12) >= 4).expand(2, -1),
                                   cache))
    assert lm.model.config._attn_implementation == attention.NAME  # plain() switched back
    torch.testing.assert_close(outs[0], outs[1])
