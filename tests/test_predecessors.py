"""The predecessor hooks of layers that read their neighbours (ZAYA1 CCA), held to plain HF forwards of each
row's logical sequence."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, ZayaConfig

from ar2dlm.nn.predecessors import chain, crop, predecessors

CONFIGS = {
    "k2x2": dict(cca_time0=2, cca_time1=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4),
    "k3x2": dict(cca_time0=3, cca_time1=2, num_attention_heads=4, num_key_value_heads=1, num_experts=3),
}


def tiny_zaya(name, seed=0):
    torch.manual_seed(seed)
    c = ZayaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32,
                   router_hidden_size=16, max_position_embeddings=256, eos_token_id=1, bos_token_id=None,
                   pad_token_id=0, **CONFIGS[name])
    model = AutoModelForCausalLM.from_config(c, attn_implementation="sdpa", experts_implementation="eager")
    model = model.double().eval()
    with torch.no_grad():  # random init is near-uniform (and some biases are zero): make every path matter
        for n, p in model.named_parameters():
            if "conv" in n or "v_proj" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def logits(model, ids, positions=None, mask=None, cache=None):
    kw = {} if mask is None else {"attention_mask": {"hybrid": mask[:, None]}}
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=cache is not None,
                     **kw).logits


def test_chain_follows_the_map():
    pred = torch.tensor([[-1, 0, 1, 0, 3, 4, 1, 6, 7]])  # the decode-step drawing of the module docstring
    c = chain(pred, 2)  # ext = [s0 s1 | rows]: row i is ext index i + 2
    assert c[0, 0].tolist() == [0, 1, 2]  # d1: state, state, itself
    assert c[0, 3].tolist() == [1, 2, 5]  # P1 slot 1: state, d1, itself
    assert c[0, 5].tolist() == [5, 6, 7]  # P1 slot 3: P1s1, P1s2, itself
    assert c[0, 7].tolist() == [3, 8, 9]  # P2 slot 2: d2, P2s1, itself


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stock_layout_changes_nothing(name):
    model = tiny_zaya(name)
    ids = torch.randint(2, 64, (2, 9))
    pred = (torch.arange(9) - 1).expand(2, -1)
    with predecessors(model, pred):
        hooked = logits(model, ids)
    torch.testing.assert_close(hooked, logits(model, ids), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_branched_rows_equal_their_own_sequences(name):
    """Training layout: clean x then a second copy of positions 3.. branching after x_2; each branch row's
    logits equal the plain forward of [x_0 x_1 x_2 y_3 y_4]."""
    model = tiny_zaya(name)
    x = torch.randint(2, 64, (1, 6))
    y = torch.randint(2, 64, (1, 2))
    ids = torch.cat([x, y], 1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4]])
    pred = torch.tensor([[-1, 0, 1, 2, 3, 4, 2, 6]])
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :6, :6] = torch.ones(6, 6).tril().bool()
    mask[0, 6, [0, 1, 2, 6]] = True
    mask[0, 7, [0, 1, 2, 6, 7]] = True
    with predecessors(model, pred):
        got = logits(model, ids, positions, mask)
    torch.testing.assert_close(got[:, :6], logits(model, x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[:, 6:], logits(model, torch.cat([x[:, :3], y], 1))[:, 3:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_then_commit_equals_recomputation(name):
    """Cached step [d1 d2 d3 | P1 (3 slots) | P2 (3 slots)] over a prompt: every row's logits equal the plain
    forward of prompt + its chain; after committing d1 d2 (r = 2) a cached one-token step equals a full
    recomputation."""
    model = tiny_zaya(name)
    prompt = torch.randint(2, 64, (1, 7))
    L = prompt.shape[1]
    cache = DynamicCache(config=model.config)
    logits(model, prompt, cache=cache)
    d = torch.randint(2, 64, (1, 3))
    p1, p2 = torch.randint(2, 64, (1, 3)), torch.randint(2, 64, (1, 3))
    ids = torch.cat([d, p1, p2], 1)
    pred = torch.tensor([[-1, 0, 1, 0, 3, 4, 1, 6, 7]])
    positions = L + torch.tensor([[0, 1, 2, 1, 2, 3, 2, 3, 4]])
    own = torch.zeros(9, 9, dtype=torch.bool)
    for i in range(9):  # each row attends its chain (the rows of this forward it descends from) and itself
        j = i
        while j >= 0:
            own[i, j] = True
            j = pred[0, j].item()
    mask = torch.cat([torch.ones(9, L, dtype=torch.bool), own], 1)[None]
    with predecessors(model, pred, cache) as ctx:
        got = logits(model, ids, positions, mask, cache)
        ctx.commit(torch.tensor([1]))  # r = 2 accepted: the state after d2
    full_d = logits(model, torch.cat([prompt, d], 1))[:, L:]
    torch.testing.assert_close(got[:, :3], full_d, rtol=1e-9, atol=1e-9)
    full_p1 = logits(model, torch.cat([prompt, d[:, :1], p1], 1))[:, L + 1:]
    torch.testing.assert_close(got[:, 3:6], full_p1, rtol=1e-9, atol=1e-9)
    full_p2 = logits(model, torch.cat([prompt, d[:, :2], p2], 1))[:, L + 2:]
    torch.testing.assert_close(got[:, 6:9], full_p2, rtol=1e-9, atol=1e-9)
    crop(cache, 9 - 2)
    t = torch.randint(2, 64, (1, 1))
    step = logits(model, t, torch.tensor([[L + 2]]), cache=cache)
    full = logits(model, torch.cat([prompt, d[:, :2], t], 1))[:, -1:]
    torch.testing.assert_close(step, full, rtol=1e-9, atol=1e-9)
