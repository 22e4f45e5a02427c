"""The batch-invariant forward (nn/invariant.py): a row's logits and K/V, bit for bit, whatever shares its forward.

Oracles: the one-row forward at that position (the AR loop), the same row alone over the same keys, the same
request decoded alone; and the plain torch ops, to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS, VOCAB, make_tokenizer, tiny_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_zaya import tiny_zaya
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from ar2dlm.model.convert import add_mask_token
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig
from ar2dlm.nn import invariant, predecessors

DTYPES = [torch.bfloat16, torch.float32]
SETTINGS = dict(max_examples=6, deadline=None, derandomize=True,  # the same examples on every run, in CI too
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _lm(arch: str, dtype: torch.dtype) -> DiffusionLM:
    if arch == "zaya":
        model = tiny_zaya("cca2x2").to(dtype)
    elif arch == "lfm2":  # short convolutions beside attention
        from test_lfm2 import tiny_lfm2

        model = tiny_lfm2("L3", dtype=dtype)
    elif arch == "gemma3":  # sliding-window layers (a window of 5) beside full ones
        from test_sliding import tiny

        model = tiny("gemma3_text", dtype=dtype)
    elif arch == "llama-long":  # a context beyond 1,000 tokens
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             eos_token_id=EOS, bos_token_id=None, pad_token_id=0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()
    else:
        model = tiny_model(arch, dtype=dtype)
    tok = make_tokenizer()
    lm = DiffusionLM(model, tok, DiffusionConfig(block_size=4, mask_token_id=add_mask_token(model, tok)),
                     batch_invariant=True)
    lm.fuse()
    return lm


_MODELS: dict = {}


def lm_of(arch: str, dtype: torch.dtype) -> DiffusionLM:
    if (arch, dtype) not in _MODELS:
        _MODELS[arch, dtype] = _lm(arch, dtype)
    return _MODELS[arch, dtype]


def _forward(lm, ids, start, allowed, cache, slots=None):
    """ids [b, q] at positions start.. over `cache`; allowed: bool [b, q, cache + q]."""
    pos = torch.arange(ids.shape[1])[None] + torch.as_tensor(start).reshape(-1, 1)
    with torch.no_grad():
        return lm.forward(ids, pos, allowed, slots, past_key_values=cache)


def _prefill(lm, prefix: torch.Tensor) -> DynamicCache:
    cache = predecessors.new_cache(lm.model)  # every key kept (a sliding layer's window is in its mask)
    L = prefix.shape[1]
    _forward(lm, prefix, 0, torch.ones(L, L, dtype=torch.bool).tril()[None], cache)
    return cache


def _kv(cache, lo, hi):
    return [(layer.keys[..., lo:hi, :].clone(), layer.values[..., lo:hi, :].clone()) for layer in cache.layers
            if hasattr(layer, "keys")]  # a conv-only layer (LFM2's) has none


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "zaya", "gemma3", "lfm2"])
@settings(**SETTINGS)
@given(data=st.data())
def test_each_row_equals_the_one_row_forward_at_its_position(arch, dtype, data):
    """M causal rows after a cache (a draft being verified): row j's logits and K/V == the AR loop's j-th step."""
    lm = lm_of(arch, dtype)
    L = data.draw(st.integers(1, 120), label="cache")
    M = data.draw(st.integers(1, 24), label="rows")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    prefix = torch.randint(2, VOCAB, (1, L), generator=g)
    rows = torch.randint(2, VOCAB, (1, M), generator=g)
    cache = _prefill(lm, prefix)
    many = copy.deepcopy(cache)
    allowed = torch.cat([torch.ones(M, L, dtype=torch.bool), torch.ones(M, M, dtype=torch.bool).tril()], 1)[None]
    logits = _forward(lm, rows, L, allowed, many)
    one = copy.deepcopy(cache)
    for j in range(M):
        single = _forward(lm, rows[:, j:j + 1], L + j, torch.ones(1, 1, L + j + 1, dtype=torch.bool), one)
        assert torch.equal(logits[0, j], single[0, 0]), f"row {j} of {M}"
    for (k1, v1), (k2, v2) in zip(_kv(many, L, L + M), _kv(one, L, L + M)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
@settings(**SETTINGS)
@given(data=st.data())
def test_rows_do_not_change_when_more_rows_share_the_step(arch, dtype, data):
    """A decode step's layout (any visibility among its rows, slot rows a suffix on the adapter's path): adding
    rows after them (more proposals, a longer draft) that they do not see changes none of their logits or K/V."""
    L = data.draw(st.integers(1, 80), label="cache")
    M, E = data.draw(st.integers(1, 16), label="rows"), data.draw(st.integers(1, 20), label="extra rows")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    _check_more_rows(lm_of(arch, dtype), L, M, E, seed, data.draw(st.integers(1, M + E), label="first slot"))


def test_moe_rows_do_not_change_when_more_rows_share_the_step():
    """A found case: 16 rows, then 33. The shared expert's gate (one column) went through sigmoid, whose fp32
    kernel computed its first 32 elements with vector code and the rest with libm: row 3 and 15 moved by an ulp."""
    _check_more_rows(lm_of("qwen2_moe", torch.float32), L=1, M=16, E=17, seed=1, first_slot=1)


def _check_more_rows(lm, L: int, M: int, E: int, seed: int, first_slot: int):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, VOCAB, (1, L), generator=g)
    rows = torch.randint(2, VOCAB, (1, M + E), generator=g)
    sees = (torch.rand(M + E, M + E, generator=g) < 0.5) | torch.eye(M + E, dtype=torch.bool)  # each sees itself
    sees[:M, M:] = False  # the first M rows never see the extra ones
    slots = torch.zeros(1, M + E, dtype=torch.bool)
    slots[:, first_slot:] = True  # a suffix, as in the engine
    cache = _prefill(lm, prefix)
    few, more = copy.deepcopy(cache), copy.deepcopy(cache)
    prefix_seen = torch.ones(M + E, L, dtype=torch.bool)
    a = _forward(lm, rows[:, :M], L, torch.cat([prefix_seen[:M], sees[:M, :M]], 1)[None], few, slots[:, :M])
    b = _forward(lm, rows, L, torch.cat([prefix_seen, sees], 1)[None], more, slots)
    assert torch.equal(a[0], b[0, :M])
    for (k1, v1), (k2, v2) in zip(_kv(few, L, L + M), _kv(more, L, L + M)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(**SETTINGS)
@given(data=st.data())
def test_a_row_ignores_the_other_requests_of_its_batch(dtype, data):
    """Batch composition: the same request beside another of another length (right-padded, masked) == alone."""
    lm = lm_of("llama", dtype)
    La, Lb = data.draw(st.integers(1, 60), label="a"), data.draw(st.integers(1, 60), label="b")
    M = data.draw(st.integers(1, 12), label="rows")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    a, b = torch.randint(2, VOCAB, (La + M,), generator=g), torch.randint(2, VOCAB, (Lb + M,), generator=g)
    alone = _forward(lm, a[None], 0, torch.ones(La + M, La + M, dtype=torch.bool).tril()[None],
                     DynamicCache(config=lm.model.config))
    S = max(La, Lb) + M
    ids = torch.zeros(2, S, dtype=torch.long)
    ids[0, :La + M], ids[1, :Lb + M] = a, b
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
    allowed[0, :, La + M:], allowed[1, :, Lb + M:] = False, False
    for r, n in ((0, La + M), (1, Lb + M)):
        allowed[r, n:, :] = torch.eye(S, dtype=torch.bool)[n:]  # padding rows see only themselves
    both = _forward(lm, ids, 0, allowed, DynamicCache(config=lm.model.config))
    assert torch.equal(both[0, :La + M], alone[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_beyond_a_thousand_tokens_of_context(dtype):
    lm = lm_of("llama-long", dtype)
    g = torch.Generator().manual_seed(0)
    L, M = 1100, 9
    prefix, rows = torch.randint(2, VOCAB, (1, L), generator=g), torch.randint(2, VOCAB, (1, M), generator=g)
    cache = _prefill(lm, prefix)
    many = copy.deepcopy(cache)
    allowed = torch.cat([torch.ones(M, L, dtype=torch.bool), torch.ones(M, M, dtype=torch.bool).tril()], 1)[None]
    logits = _forward(lm, rows, L, allowed, many)
    for j in range(M):
        single = _forward(lm, rows[:, j:j + 1], L + j, torch.ones(1, 1, L + j + 1, dtype=torch.bool), cache)
        assert torch.equal(logits[0, j], single[0, 0]), f"row {j}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "zaya", "gemma3", "lfm2"])
def test_greedy_equals_the_ar_loop_in_its_dtype(arch, dtype):
    """The contract: greedy decoding == the same-stack AR loop in the same dtype, token for token (batch 1 and a
    ragged batch), with drafts of several lengths."""
    lm = lm_of(arch, dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (4,), generator=g)]
    ar = [x.token_ids for x in lm.generate(prompts, max_new_tokens=24, ar=True, eos_token_id=())]
    for K, R in ((2, 1), (4, 3)):
        alone = [lm.generate([p], max_new_tokens=24, draft_len=K, proposals=R, eos_token_id=())[0].token_ids
                 for p in prompts]
        assert alone == ar, (K, R)
        batch = [x.token_ids for x in lm.generate(prompts, max_new_tokens=24, draft_len=K, proposals=R,
                                                  eos_token_id=())]
        assert batch == ar, (K, R)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(M=st.integers(1, 40), K=st.sampled_from([8, 64, 96]), N=st.sampled_from([8, 40, 128]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans())
def test_linear_rows_are_invariant_and_equal_the_plain_linear(M, K, N, dtype, bias):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = invariant.linear(x, w, b)
    for i in range(M):
        assert torch.equal(y[i], invariant.linear(x[i:i + 1], w, b)[0])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), atol=tol * K ** 0.5, rtol=tol)


ACTIVATIONS = {"sigmoid": torch.sigmoid, "silu": F.silu, "gelu": F.gelu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "softplus": F.softplus, "mish": F.mish,
               "elu": F.elu, "rsqrt": lambda x: torch.rsqrt(x.abs() + 0.01)}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(M=st.integers(1, 300), width=st.sampled_from([1, 3, 64, 96, 256]), op=st.sampled_from(sorted(ACTIVATIONS)),
       dtype=st.sampled_from(DTYPES), threads=st.sampled_from([1, 3]))
@example(M=33, width=1, op="sigmoid", dtype=torch.float32, threads=1)  # the MoE shared-expert gate of 33 rows
@example(M=257, width=256, op="silu", dtype=torch.float32, threads=3)  # 3 threads' shares end inside a block
@example(M=257, width=256, op="rsqrt", dtype=torch.bfloat16, threads=3)
def test_activation_rows_are_invariant_and_equal_the_plain_op(M, width, op, dtype, threads):
    """Each row of an activation's result == the row alone (a scalar remainder of the plain kernel, e.g. fp32
    sigmoid past 32 elements, would move some; so would a thread's share ending inside a vector block), and ==
    the plain op to float rounding."""
    f, g = ACTIVATIONS[op], torch.Generator().manual_seed(M * 100 + width)
    x = (torch.randn(M, width, generator=g) * 4).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), invariant.BatchInvariant():
            y = f(x)
            alone = torch.cat([f(x[i:i + 1].clone()) for i in range(M)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, alone)
    torch.testing.assert_close(y, f(x), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)


def test_activations_in_place_write_into_their_input():
    x = torch.randn(5, 7)
    with torch.no_grad(), invariant.BatchInvariant():
        y, z = x.clone(), x.clone()
        assert y.sigmoid_() is y and F.silu(z, inplace=True) is not None
    torch.testing.assert_close(y, torch.sigmoid(x))
    torch.testing.assert_close(z, F.silu(x))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(q=st.integers(1, 20), L=st.integers(1, 300), dtype=st.sampled_from(DTYPES), gqa=st.booleans())
def test_attention_equals_sdpa_and_trailing_masked_keys_change_nothing(q, L, dtype, gqa):
    g = torch.Generator().manual_seed(q * 1000 + L)
    H, Hkv, d = 4, 2 if gqa else 4, 8
    query = torch.randn(1, H, q, d, generator=g).to(dtype)
    key, value = torch.randn(1, Hkv, L + q, d, generator=g).to(dtype), torch.randn(1, Hkv, L + q, d, generator=g).to(dtype)
    allowed = torch.cat([torch.ones(q, L, dtype=torch.bool), torch.ones(q, q, dtype=torch.bool).tril()], 1)
    out = invariant.attention(query, key, value, allowed[None, None])
    ref = F.scaled_dot_product_attention(query.float(), key.float().repeat_interleave(H // Hkv, 1),
                                         value.float().repeat_interleave(H // Hkv, 1), attn_mask=allowed[None, None])
    torch.testing.assert_close(out.float(), ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
    for i in range(q):  # the row alone, over only the keys it sees (the AR loop's cache ends there)
        n = L + i + 1
        alone = invariant.attention(query[:, :, i:i + 1], key[:, :, :n], value[:, :, :n], allowed[None, None, i:i + 1, :n])
        assert torch.equal(out[:, :, i], alone[:, :, 0])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(q=st.integers(1, 8), L=st.integers(1, 200), holes=st.integers(1, 90), dtype=st.sampled_from(DTYPES))
def test_attention_of_a_row_ignores_holes_in_its_cache(q, L, holes, dtype):
    """Keys a batch row never sees, anywhere among its keys (a ragged batch's padding and rejected drafts), leave
    its result bitwise unchanged."""
    g = torch.Generator().manual_seed(q * 7 + L * 13 + holes)
    H, d = 4, 8
    query = torch.randn(1, H, q, d, generator=g).to(dtype)
    key, value = torch.randn(1, 2, L + q, d, generator=g).to(dtype), torch.randn(1, 2, L + q, d, generator=g).to(dtype)
    allowed = torch.cat([torch.ones(q, L, dtype=torch.bool), torch.ones(q, q, dtype=torch.bool).tril()], 1)
    dense = invariant.attention(query, key, value, allowed[None, None])
    where = torch.sort(torch.randperm(L + q + holes, generator=g)[:L + q]).values  # the seen keys among holes
    k2 = torch.randn(1, 2, L + q + holes, d, generator=g).to(dtype)
    v2 = torch.randn(1, 2, L + q + holes, d, generator=g).to(dtype)
    k2[:, :, where], v2[:, :, where] = key, value
    allowed2 = torch.zeros(q, L + q + holes, dtype=torch.bool)
    allowed2[:, where] = allowed
    assert torch.equal(invariant.attention(query, k2, v2, allowed2[None, None]), dense)


def _rank_order_case(n: int, dtype: torch.dtype, seed: int):
    """GQA attention inputs (6 heads on 2 KV heads, 2 batch rows of 8 query rows) whose first 5 rows per batch row
    see n keys each with a gap of their own (a candidate tree's sibling: the first n - 1 keys, then its own key
    further right; random holes; the keys shifted right; from key 0; none at all) and are flagged, the other 3 see
    random keys (holes in the batch's keys: the key order moves them) and are not."""
    g = torch.Generator().manual_seed(seed)
    b, H, Hkv, q, d, L = 2, 6, 2, 8, 16, n + 20
    query = torch.randn(b, H, q, d, generator=g).to(dtype)
    key, value = (torch.randn(b, Hkv, L, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(b, q, L, generator=g) < 0.5
    mask[:, :5] = False
    for i in range(b):
        mask[i, 0, :n - 1] = True
        mask[i, 0, n - 1 + int(torch.randint(1, L - n + 1, (1,), generator=g))] = True
        mask[i, 1, torch.randperm(L, generator=g)[:n]] = True
        mask[i, 2, L - n:] = True
        mask[i, 3, :n] = True
    compact = torch.zeros(b, q, dtype=torch.bool)
    compact[:, :5] = True
    return query, key, value, mask[:, None], compact


def _over_its_keys(query, key, value, mask, bi: int, i: int) -> torch.Tensor:
    """[H, d]: query row i of batch row bi, unflagged, over only the keys it sees, stored from key 0."""
    seen = mask[bi, 0, i].nonzero()[:, 0]
    if seen.numel() == 0:
        return torch.zeros_like(query[bi, :, i])
    return invariant.attention(query[bi:bi + 1, :, i:i + 1], key[bi:bi + 1, :, seen], value[bi:bi + 1, :, seen],
                               torch.ones(1, 1, 1, seen.numel(), dtype=torch.bool))[0, :, 0]


@pytest.mark.parametrize("n", [63, 65, 70, 257, 1030])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_attention_in_rank_order_equals_the_row_over_only_its_keys(path, dtype, n, monkeypatch):
    """invariant.attention with orders[COMPACT] (the kernel, or the reference in torch ops where it is not built):
    each flagged row == that query alone over exactly its keys, bitwise, in a GQA call over a ragged batch; the
    unflagged rows == the call without flags."""
    if path == "reference":
        monkeypatch.setattr(invariant, "kernel_runs", lambda query, value: False)
    elif not invariant.kernel_runs(torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype)):
        pytest.skip("the kernel is not built here")
    query, key, value, mask, compact = _rank_order_case(n, dtype, seed=n)
    out = invariant.attention(query, key, value, mask, orders={invariant.COMPACT: compact})
    for bi in range(2):
        for i in range(5):
            assert torch.equal(out[bi, :, i], _over_its_keys(query, key, value, mask, bi, i)), (bi, i)
    assert torch.equal(out[:, :, 5:], invariant.attention(query, key, value, mask)[:, :, 5:])


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_rank_order_flags_follow_the_stacked_rows(path, monkeypatch):
    """The flags are over the forward's query rows ([q] or [b, q]); the query heads stacked on their KV head
    (here, or by the packed-GQA attention before sdpa: [b, H_kv, rep q, d]) each get their row's flag. Every
    layer of a forward shares one `orders`; flags over another row count are refused."""
    if path == "reference":
        monkeypatch.setattr(invariant, "kernel_runs", lambda query, value: False)
    query, key, value, mask, compact = _rank_order_case(70, torch.float32, seed=3)
    compact[1] = compact[0]  # the same flags in both batch rows: [q] says it as well
    b, H, q, d = query.shape
    orders = {invariant.COMPACT: compact[0]}
    out = invariant.attention(query, key, value, mask, orders=orders)
    assert torch.equal(out, invariant.attention(query, key, value, mask, orders=orders))  # the next layer
    assert torch.equal(out, invariant.attention(query, key, value, mask, orders={invariant.COMPACT: compact}))
    packed = invariant.attention(query.reshape(b, 2, 3 * q, d), key, value, mask.repeat(1, 1, 3, 1),
                                 orders={invariant.COMPACT: compact})
    assert torch.equal(packed.reshape(b, H, q, d), out)
    with pytest.raises(ValueError, match="stacked rows"):
        invariant.attention(query, key, value, mask, orders={invariant.COMPACT: compact[:, :5]})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_a_sibling_in_rank_order_equals_the_ar_loop(arch, dtype):
    """DiffusionLM.forward(compact=...) on the lean forward (llama) and the HF forward under BatchInvariant
    (qwen2_moe): a step of a chain d_0..d_3 and sibling candidates, sibling i at depth j seeing the cache, d_0..
    d_{j-1} and its own key after all of the chain's and the siblings before it. Flagged, each sibling's logits ==
    the AR loop's at position C + j after d_0..d_{j-1}; the chain's too (unflagged)."""
    lm = lm_of(arch, dtype)
    assert (lm.lean is not None) == (arch == "llama")
    g = torch.Generator().manual_seed(5)
    C, K, depths = 61, 4, [0, 1, 3, 4, 1, 2]  # keys 61 + j + 1: the own key moves across the first chunk's end
    S = len(depths)
    prefix = torch.randint(2, VOCAB, (1, C), generator=g)
    chain, siblings = torch.randint(2, VOCAB, (1, K), generator=g), torch.randint(2, VOCAB, (1, S), generator=g)
    cache = _prefill(lm, prefix)
    allowed = torch.zeros(K + S, C + K + S, dtype=torch.bool)
    allowed[:, :C] = True
    allowed[:K, C:C + K] = torch.ones(K, K, dtype=torch.bool).tril()
    for i, j in enumerate(depths):
        allowed[K + i, C:C + j] = True
        allowed[K + i, C + K + i] = True
    pos = torch.tensor([[C + j for j in range(K)] + [C + j for j in depths]])
    compact = torch.tensor([[False] * K + [True] * S])
    with torch.no_grad():
        logits = lm.forward(torch.cat([chain, siblings], 1), pos, allowed[None], past_key_values=copy.deepcopy(cache),
                            compact=compact)
    ar = copy.deepcopy(cache)
    for j in range(K + 1):
        for i in (i for i, depth in enumerate(depths) if depth == j):
            one = _forward(lm, siblings[:, i:i + 1], C + j, torch.ones(1, 1, C + j + 1, dtype=torch.bool),
                           copy.deepcopy(ar))
            assert torch.equal(logits[0, K + i], one[0, 0]), f"sibling {i} at depth {j}"
        if j < K:
            one = _forward(lm, chain[:, j:j + 1], C + j, torch.ones(1, 1, C + j + 1, dtype=torch.bool), ar)
            assert torch.equal(logits[0, j], one[0, 0]), f"chain row {j}"


@pytest.mark.parametrize("q,L,holes,window", [(6, 62, 3, 5), (4, 120, 7, 9), (8, 60, 30, 6)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_window_is_not_a_hole(q, L, holes, window, dtype):
    """A sliding window leaves keys before a row's own unread: they are not holes. Given the layout's keys
    (`invariant.SEEN`), a row among holes finds its window's keys where they are alone, across a key chunk's edge,
    and its result is bitwise the same (moving only the window's keys to the front changes the chunks' sums)."""
    g = torch.Generator().manual_seed(q * 7 + L * 13 + holes)
    H, d = 4, 8
    query = torch.randn(1, H, q, d, generator=g).to(dtype)
    key, value = torch.randn(1, 2, L + q, d, generator=g).to(dtype), torch.randn(1, 2, L + q, d, generator=g).to(dtype)
    layout = torch.cat([torch.ones(q, L, dtype=torch.bool), torch.ones(q, q, dtype=torch.bool).tril()], 1)
    near = (L + torch.arange(q))[:, None] - torch.arange(L + q)[None, :] < window
    alone = invariant.attention(query, key, value, (layout & near)[None, None],
                                orders={invariant.SEEN: layout.any(0)[None]})
    where = torch.sort(torch.randperm(L + q + holes, generator=g)[:L + q]).values  # the layout's keys among holes
    k2 = torch.randn(1, 2, L + q + holes, d, generator=g).to(dtype)
    v2 = torch.randn(1, 2, L + q + holes, d, generator=g).to(dtype)
    k2[:, :, where], v2[:, :, where] = key, value
    windowed, seen = torch.zeros(2, q, L + q + holes, dtype=torch.bool)
    windowed[:, where], seen[:, where] = layout & near, layout
    got = invariant.attention(query, k2, v2, windowed[None, None],
                              orders={invariant.SEEN: seen.any(0)[None], invariant.HOLES: True})
    assert torch.equal(got, alone)


def test_the_mode_stays_out_of_autograd_and_other_models():
    """Training (autograd) runs the plain ops; a model without batch invariance is untouched by another's."""
    lm = _lm("llama", torch.float32)
    plain = DiffusionLM(tiny_model("llama"), make_tokenizer(), lm.settings, batch_invariant=False)
    assert lm.batch_invariant and not plain.batch_invariant
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(5, 8)
    with invariant.BatchInvariant():
        y = F.linear(x, w)
    assert y.grad_fn is not None and torch.equal(y, F.linear(x, w))


_RUN = """
import hashlib, sys, torch
sys.path[:0] = {paths!r}
from test_invariant import _lm
lm = _lm("llama", torch.bfloat16)
prompts = [[5, 9, 2, 7], [3] * 11, list(range(2, 40))]
out = [g.token_ids for g in lm.generate(prompts, max_new_tokens=16, draft_len=4, proposals=2, eos_token_id=())]
with torch.no_grad():
    logits = lm.forward(torch.tensor([prompts[2]]), torch.arange(38)[None],
                        torch.ones(38, 38, dtype=torch.bool).tril()[None])
print(out, hashlib.sha256(logits.float().numpy().tobytes()).hexdigest())
"""


def test_greedy_and_logits_are_bit_identical_across_processes():
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).parent)
    code = _RUN.format(paths=[here, str(Path(here).parent / "src")])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()


SAMPLING_OPS = {  # what decode/verify.py reduces a row of logits with (softmax, top-k, top-p, argmax, the cdf)
    "softmax": lambda x: x.softmax(-1), "log_softmax": lambda x: x.log_softmax(-1),
    "argmax": lambda x: x.argmax(-1), "topk": lambda x: x.topk(40, dim=-1).values,
    "sort": lambda x: x.sort(dim=-1, descending=True).values,
    "top_p_cdf": lambda x: x.sort(dim=-1, descending=True).values.softmax(-1).cumsum(-1),
    "cdf64": lambda x: x.softmax(-1).cumsum(-1, dtype=torch.float64),
}


@pytest.mark.parametrize("op", sorted(SAMPLING_OPS))
def test_sampling_reductions_are_row_invariant(op):
    """A row's sampling distribution (and so a seeded draw) does not depend on the rows beside it: each op of
    verify.py over [rows, vocab] gives each row the bits of the row alone, at several row counts."""
    f = SAMPLING_OPS[op]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 49153, generator=g) * 4
    alone = [f(x[i:i + 1].clone()) for i in range(x.shape[0])]
    for n in (2, 3, 4, 7, 16, 37):
        together = f(x[:n].clone())
        for i in range(n):
            assert torch.equal(together[i], alone[i][0]), (op, n, i)


def test_sampling_reductions_on_avx2_kernels(tmp_path):
    """The same property through ATen's AVX2 kernels (what a CPU without AVX-512 runs)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "test_sampling_reductions_are_row_invariant"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-3000:]
