"""ar2dlm's attention kernel (nn/csrc/attention.cpp): equal to attention computed in float64, and every row one
fixed function of its own query, keys and values, bit for bit, whatever else is in the call.

Oracles: float64 SDPA (values), the row alone over only the keys it sees (the AR loop's cache ends there), the
same call at another thread count, and the reference in torch ops (the same property, other bits).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ar2dlm.nn import invariant, native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"kernels not built: {native.reason()}")

DTYPES = [torch.bfloat16, torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _inputs(B, H, R, L, D, dtype, seed, holes=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, R, D, generator=g).to(dtype)
    k = (torch.randn(B, H, L, D, generator=g) * 2).to(dtype)
    v = torch.randn(B, H, L, D, generator=g).to(dtype)
    mask = torch.rand(B, 1, R, L, generator=g) < (0.6 if holes else 2.0)
    return q, k, v, mask


def _float64(q, k, v, mask, scale):
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))  # a row that sees nothing: 0


@settings(max_examples=30, deadline=None, derandomize=True)
@given(R=st.integers(1, 20), L=st.integers(1, 700), D=st.sampled_from([8, 16, 24, 64, 128]),
       dtype=st.sampled_from(DTYPES), holes=st.booleans(), heads=st.sampled_from([1, 3]))
def test_kernel_equals_attention_in_float64(R, L, D, dtype, holes, heads):
    q, k, v, mask = _inputs(2, heads, R, L, D, dtype, seed=R * 1000 + L, holes=holes)
    out = native.attention(q, k, v, mask, D ** -0.5)
    ref = _float64(q, k, v, mask, D ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(R=st.integers(1, 16), context=st.integers(1, 3000), dtype=st.sampled_from(DTYPES),
       D=st.sampled_from([16, 64]), extra=st.integers(0, 300))
def test_a_row_alone_equals_the_row_among_others(R, context, dtype, D, extra):
    """R causal rows after `context` keys, plus `extra` trailing keys none of them sees (proposals, a longer
    request's cache): row i == the row alone over exactly the keys it sees, bitwise."""
    L = context + R + extra
    q, k, v, _ = _inputs(1, 3, R, L, D, dtype, seed=context * 7 + R)
    mask = torch.zeros(1, 1, R, L, dtype=torch.bool)
    for i in range(R):
        mask[0, 0, i, :context + i + 1] = True
    out = native.attention(q, k, v, mask, 0.125)
    for i in range(R):
        n = context + i + 1
        alone = native.attention(q[:, :, i:i + 1].contiguous(), k[:, :, :n], v[:, :, :n],
                                 torch.ones(1, 1, 1, n, dtype=torch.bool), 0.125)
        assert torch.equal(out[:, :, i], alone[:, :, 0]), f"row {i} of {R} at {context} keys"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_and_strides_change_nothing(dtype):
    """The work is split by (batch, head, segment, rows) among threads; any split gives the same bits. Keys and
    values may be views of a larger buffer (the lean forward's cache)."""
    q, k, v, mask = _inputs(2, 3, 48, 2100, 64, dtype, seed=5, holes=True)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(native.attention(q, k, v, mask, 0.125))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    buffer_k = torch.zeros(2, 3, 2400, 64, dtype=dtype)
    buffer_v = torch.zeros(2, 3, 2400, 64, dtype=dtype)
    buffer_k[:, :, :2100], buffer_v[:, :, :2100] = k, v
    assert torch.equal(native.attention(q, buffer_k[:, :, :2100], buffer_v[:, :, :2100], mask, 0.125), outs[0])


def test_a_key_no_row_sees_is_never_read():
    """Keys a row does not see weigh an exact 0, even when they hold inf or NaN (a buffer's stale tail)."""
    q, k, v, mask = _inputs(1, 2, 5, 300, 32, torch.float32, seed=3)
    mask[..., 200:] = False
    clean = native.attention(q, k, v, mask, 0.2)
    k[..., 200:, :], v[..., 200:, :] = float("nan"), float("inf")
    assert torch.equal(native.attention(q, k, v, mask, 0.2), clean)


def test_invariant_attention_runs_the_kernel_and_the_reference_keeps_the_property():
    """invariant.attention (the lean forward's and BatchInvariant's attention) runs the kernel; the reference in
    torch ops has the same property, to other bits, and agrees to rounding."""
    g = torch.Generator().manual_seed(0)
    b, H, Hkv, q, L, d = 1, 6, 2, 7, 450, 32
    query = torch.randn(b, H, q, d, generator=g).to(torch.bfloat16)
    key, value = (torch.randn(b, Hkv, L, d, generator=g).to(torch.bfloat16) for _ in range(2))
    allowed = torch.ones(q, L, dtype=torch.bool).tril(L - q)[None, None]
    assert invariant.kernel_runs(query, value)
    out = invariant.attention(query, key, value, allowed)
    rows = query.reshape(b, Hkv, 3 * q, d)
    ref = invariant.reference_attention(rows, key, value, allowed.repeat(1, 1, 3, 1), d ** -0.5).reshape(b, H, q, d)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    for i in range(q):
        n = L - q + i + 1
        one = invariant.reference_attention(rows.reshape(b, Hkv, 3, q, d)[:, :, :, i], key[:, :, :n],
                                            value[:, :, :n], torch.ones(1, 1, 3, n, dtype=torch.bool), d ** -0.5)
        assert torch.equal(ref[:, :, i], one.reshape(b, H, d))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(M=st.integers(1, 40), K=st.sampled_from([1, 7, 32, 64, 191, 576]), N=st.sampled_from([1, 5, 16, 40, 130]),
       bias=st.booleans(), strided=st.booleans())
def test_linear_equals_the_product_and_each_row_equals_the_row_alone(M, K, N, bias, strided):
    """ar2dlm's bf16 linear (csrc/linear.cpp) == x W^T + b computed in float64 (to bf16 rounding), and every row of
    an M-row call == that row alone, bitwise; rows may be a strided view (a LoRA's h inside the stacked output)."""
    g = torch.Generator().manual_seed(M * 1000 + K * 7 + N)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16) if bias else None
    wide = torch.randn(M, K + 6, generator=g).to(torch.bfloat16)
    x = wide[:, 3:3 + K] if strided else wide[:, :K].contiguous()
    packed = native.pack(w)
    y = native.linear(x, packed, b, N)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(y.double(), ref, atol=2e-2 * K ** 0.5, rtol=1e-2)
    for i in range(M):
        assert torch.equal(y[i], native.linear(x[i:i + 1].contiguous(), packed, b, N)[0]), f"row {i} of {M}"


def test_linear_thread_count_changes_nothing():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(1000, 576, generator=g).to(torch.bfloat16), torch.randn(23, 576, generator=g).to(torch.bfloat16)
    packed, before = native.pack(w), torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(native.linear(x, packed, None, 1000))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_packed_runs_the_kernel_and_rows_need_no_tile():
    """kernels.Packed (every prepacked linear of the lean forward and the fused groups) uses the kernel: a one-row
    call is not padded to a tile, and gives the row's bits in any call."""
    from ar2dlm.nn.kernels import Packed

    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(96, 64, generator=g).to(torch.bfloat16), torch.randn(5, 64, generator=g).to(torch.bfloat16)
    p = Packed(w)
    assert p.own
    y = p(x[None])  # [1, 5, 96]
    assert y.shape == (1, 5, 96)
    assert all(torch.equal(y[0, i], p(x[i:i + 1])[0]) for i in range(5))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(M=st.integers(1, 20), rank=st.sampled_from([2, 8, 16]), outs=st.sampled_from([(24, 8, 8), (40,), (16, 48)]),
       batch=st.integers(1, 2))
def test_linear_add_is_the_block_diagonal_update_and_row_invariant(M, rank, outs, batch):
    """The fused group's LoRA update (kernels.FusedGroup: y[slots] += h blockdiag(B_1..B_n)^T in one call) == the
    update computed in float64 from the members' B, rows bitwise as alone; only the slot rows change."""
    from types import SimpleNamespace

    from ar2dlm.nn.kernels import _pair_ranges

    g = torch.Generator().manual_seed(M * 31 + rank + len(outs))
    n_base, start = sum(outs), 1
    members, B, o = [], torch.zeros(n_base, rank * len(outs)), 0
    for i, n in enumerate(outs):
        members.append(SimpleNamespace(out=slice(o, o + n), h=slice(n_base + i * rank, n_base + (i + 1) * rank)))
        B[o:o + n, i * rank:(i + 1) * rank] = torch.randn(n, rank, generator=g)
        o += n
    B = B.to(torch.bfloat16)
    packed, ranges = native.pack(B), _pair_ranges(members, n_base)
    Y = torch.randn(batch, M + start, n_base + rank * len(outs), generator=g).to(torch.bfloat16)
    before = Y.clone()
    native.linear_add(Y[:, start:, n_base:], packed, ranges, Y[:, start:, :n_base])
    ref = before[:, start:, :n_base].double() + before[:, start:, n_base:].double() @ B.double().T
    torch.testing.assert_close(Y[:, start:, :n_base].double(), ref, atol=0.05 * rank ** 0.5, rtol=2e-2)
    assert torch.equal(Y[:, :start], before[:, :start]) and torch.equal(Y[..., n_base:], before[..., n_base:])
    for i in range(M):
        one = before[:1, start + i:start + i + 1].clone()
        native.linear_add(one[:, :, n_base:], packed, ranges, one[:, :, :n_base])
        assert torch.equal(one[0, 0], Y[0, start + i]), f"row {i} of {M}"


# Rank order (`compact`): a flagged row's n-th seen key counts as if at key n. Oracle: the same query, unflagged,
# over a key tensor that holds exactly its seen keys from key 0 (the AR loop's cache).
KEY_COUNTS = [1, 5, 63, 64, 65, 70, 255, 256, 257, 270, 1030]


def _ranked_masks(n: int, L: int, R: int, g: torch.Generator) -> torch.Tensor:
    """[R, L] masks of rows that see n keys (row R - 1: none), each with another gap pattern: a candidate tree's
    sibling (the cache and the step's first j keys, then its own key after the other candidates), random holes,
    the keys from 0 (no gap), the keys shifted right, a hole at the front."""
    mask = torch.zeros(R, L, dtype=torch.bool)
    for r in range(R - 1):
        kind = r % 5
        if kind == 0:  # the cache and the step's first j keys, then its own key after a gap
            mask[r, :n - 1] = True
            mask[r, n - 1 + int(torch.randint(1, L - n + 1, (1,), generator=g))] = True
        elif kind == 1:
            mask[r, torch.randperm(L, generator=g)[:n]] = True
        elif kind == 2:
            mask[r, :n] = True
        elif kind == 3:
            mask[r, L - n:] = True
        else:
            mask[r, 1:n + 1] = True
    return mask


def _alone(q, k, v, mask, scale):
    """[B, H, R, D]: each row unflagged over only its seen keys, stored from key 0."""
    B, H, R, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for r in range(R):
                seen = mask[b, h if mask.shape[1] > 1 else 0, r].nonzero()[:, 0]
                if seen.numel():
                    ones = torch.ones(1, 1, 1, seen.numel(), dtype=torch.bool)
                    out[b, h, r] = native.attention(q[b:b + 1, h:h + 1, r:r + 1], k[b:b + 1, h:h + 1, seen],
                                                    v[b:b + 1, h:h + 1, seen], ones, scale)[0, 0, 0]
    return out


@pytest.mark.parametrize("n", KEY_COUNTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_in_rank_order_equals_the_row_over_only_its_keys(dtype, n):
    """Flagged rows (sibling gaps, random holes, none, a shift) == each row alone over exactly its keys, bitwise,
    across chunk (64) and segment (256) boundaries; the unflagged rows of the call are what they were without."""
    g = torch.Generator().manual_seed(n)
    B, H, R, D, L = 2, 2, 7, 64, n + 9
    q, k, v, _ = _inputs(B, H, R, L, D, dtype, seed=n)
    ranked = torch.stack([_ranked_masks(n, L, R, g) for _ in range(B)])[:, None]  # [B, 1, R, L]
    others = torch.rand(B, 1, R, L, generator=g) < 0.6
    mask = torch.cat([ranked, others], 2)  # the flagged rows, then as many unflagged ones
    compact = torch.zeros(B, 2 * R, dtype=torch.bool)
    compact[:, :R] = True
    q2 = torch.cat([q, q], 2)
    out = native.attention(q2, k, v, mask, 0.125, None, compact)
    assert torch.equal(out[:, :, :R], _alone(q, k, v, ranked, 0.125))
    assert torch.equal(out[:, :, R - 1], torch.zeros_like(out[:, :, R - 1]))  # a row that sees no key
    assert torch.equal(out[:, :, R:], native.attention(q2, k, v, mask, 0.125)[:, :, R:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_order_per_head_masks_and_broadcast_flags(dtype):
    """A mask per head ([B, H, R, L]: each head its own keys) and flags given as [R] or [1, R]: the same bits."""
    g = torch.Generator().manual_seed(11)
    B, H, R, D, L = 2, 3, 6, 32, 300
    q, k, v, _ = _inputs(B, H, R, L, D, dtype, seed=11)
    mask = torch.stack([torch.stack([_ranked_masks(n, L, R, g) for n in (70, 260, 129)]) for _ in range(B)])
    want = _alone(q, k, v, mask, 0.2)
    for compact in (torch.ones(R, dtype=torch.bool), torch.ones(1, R, dtype=torch.bool), torch.tensor(True)):
        assert torch.equal(native.attention(q, k, v, mask, 0.2, None, compact), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_order_thread_count_and_cache_views_change_nothing(dtype):
    """Flagged rows among unflagged ones, keys and values views of a larger buffer, with their transpose (the lean
    forward's cache): any thread count gives the same bits, the flagged rows those of their keys alone."""
    g = torch.Generator().manual_seed(7)
    B, H, R, D, L = 2, 2, 24, 64, 1100
    q, k, v, mask = _inputs(B, H, R, L, D, dtype, seed=7, holes=True)
    mask[:, :, ::3] = torch.stack([_ranked_masks(1030, L, 8, g) for _ in range(B)])[:, None]
    compact = torch.zeros(B, R, dtype=torch.bool)
    compact[:, ::3] = True
    buffer_k, buffer_v = torch.zeros(B, H, 1200, D, dtype=dtype), torch.zeros(B, H, 1200, D, dtype=dtype)
    buffer_k[:, :, :L], buffer_v[:, :, :L] = k, v
    keys_t = buffer_k.transpose(2, 3).contiguous()[..., :L]
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(native.attention(q, buffer_k[:, :, :L], buffer_v[:, :, :L], mask, 0.125, keys_t, compact))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(outs[0][:, :, ::3], _alone(q[:, :, ::3], k, v, mask[:, :, ::3], 0.125))
    assert torch.equal(outs[0][:, :, 1::3], native.attention(q, k, v, mask, 0.125)[:, :, 1::3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_order_rows_with_the_same_keys(dtype):
    """Flagged rows with the same keys (the query heads stacked on one KV head) share each chunk's keys, up to 6
    rows at a time: 15 rows of two gap patterns interleaved, each its own query, == each row alone."""
    q, k, v, _ = _inputs(2, 2, 15, 700, 64, dtype, seed=9)
    mask = torch.zeros(2, 1, 15, 700, dtype=torch.bool)
    mask[..., :300] = True
    mask[:, :, 0::2, 650] = True
    mask[:, :, 1::2, 420:430] = True
    compact = torch.ones(2, 15, dtype=torch.bool)
    assert torch.equal(native.attention(q, k, v, mask, 0.125, None, compact), _alone(q, k, v, mask, 0.125))


def test_rank_order_never_reads_a_key_the_row_does_not_see():
    """The gaps of a flagged row may hold inf or NaN (keys other rows see, a buffer's stale tail)."""
    q, k, v, _ = _inputs(1, 2, 3, 300, 32, torch.float32, seed=4)
    mask = torch.zeros(1, 1, 3, 300, dtype=torch.bool)
    mask[..., :100] = True
    mask[..., 250] = True
    compact = torch.ones(1, 3, dtype=torch.bool)
    clean = native.attention(q, k, v, mask, 0.2, None, compact)
    k[..., 100:250, :], v[..., 100:250, :] = float("nan"), float("inf")
    k[..., 251:, :], v[..., 251:, :] = float("inf"), float("nan")
    assert torch.equal(native.attention(q, k, v, mask, 0.2, None, compact), clean)
