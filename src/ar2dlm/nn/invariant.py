"""Batch-invariant forward: a row's result does not depend on the rows it shares a forward with.

A matmul library picks its blocking (and with it the order in which each
output element's dot product is summed) from the shape of the call: the
logits of a row computed alone (M = 1, the AR loop) and inside an 8-row
decode step differ in the last bits, in fp32 on every row and in bf16 on
some. Greedy decoding agrees with the AR loop only while no argmax is that
close. The fix serving engines use is to make every reduction run in one
fixed order per row, whatever the rest of the batch:

1. matmuls (linears, LoRA products, the LM head, MoE experts): the rows are
   cut into tiles of exactly `ROW_TILE` rows (the last one padded with
   zeros), and each tile is one call of the same shape. The library then
   runs the same kernel, with the same reduction order, for every row,
   wherever it sits in whichever step. Where a few rows cost what one row
   costs (bf16 on AMX / AVX512-BF16) the padding is free.
2. attention: scores and the weighted sum of values in fp32, over the keys
   in fixed chunks of `KEY_CHUNK` from position 0, the chunks summed in
   order: ar2dlm's kernel (native.attention, csrc/attention.cpp) where it is
   built, else `reference_attention` in torch ops. A masked key adds an
   exact zero, so trailing keys a row does not see (later drafts,
   proposals, a longer request's cache) change nothing: a verify row equals
   the AR loop's row at that position, whose cache simply ends there. Holes
   before a row's keys (a shorter prompt's padding, drafts another request
   of the batch kept and this one did not) would shift its keys across the
   chunks, so the keys a batch row sees are first moved to the front, in
   order, where they are when that request decodes alone. A query row whose
   holes are its own (a candidate tree's sibling sees the step's first j
   keys, then its own key further right, where the AR loop has it next) is
   flagged in `orders[COMPACT]`: it reads its keys in rank order, its n-th
   seen key as if at key n, and so equals the row over exactly its keys.
3. activations (`ACTIVATIONS`: sigmoid, silu, gelu, softplus, ...; rsqrt):
   elementwise, yet not invariant as they are. Their CPU kernel runs its
   loop in blocks of two vector registers (32 fp32 with AVX512) and the
   remainder in scalar code, whose libm result can differ from the vector
   one in the last bit: a column of width 1 (an MoE's shared-expert gate)
   falls in one or the other depending on how many rows follow it, and
   so does any element where a thread's share of a large tensor ends.
   Each runs on rows of whole `ELEMENT_TILE`s (x's own rows when they are
   that, else its elements laid out flat and padded with zeros), with more
   than one thread in calls that give each thread whole tiles, so every
   element takes the vector path wherever it sits.
4. everything else a decoder runs (norms, rotary, residuals, the exp and
   tanh of attention and gelu_new) is exact arithmetic, reduces within one
   row, or has no scalar remainder, and is invariant as it is.

`BatchInvariant` is a `TorchFunctionMode`: inside `with BatchInvariant():`
(entered by `DiffusionLM.forward` for a model that decodes invariantly, so
it is scoped to one model's forward, never global) the matmul-like torch
functions, `scaled_dot_product_attention` and the activations run as
above; every other op is untouched. Under autograd (training) it steps
aside. The plain functions stay the reference: `tests/test_invariant.py`
holds each row of a multi-row forward to the 1-row forwards, bit for bit,
and the mode's results to the plain ops to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import native

ROW_TILE = 16
"""Rows per matmul call: every call has this many rows (bf16 CPU kernels cost about the same for 1 to 16)."""
KEY_CHUNK = 64
"""Keys per chunk of the attention's reductions, from key 0 (the reference pads the cache to a multiple of it)."""
ELEMENT_TILE = 64
"""Elements per row of an activation's input: whole blocks of its kernel's loop (32 fp32 AVX512, 16 AVX2)."""
ELEMENT_BLOCK = 32768
"""Most elements per activation call with several threads: ATen's default parallel grain (at::internal::GRAIN_SIZE)."""


def pad_rows(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x [..., M, K] -> [..., ceil(M / tile) * tile, K]: zero rows appended."""
    pad = (-x.shape[-2]) % tile
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], -2)


def matmul(a: torch.Tensor, b: torch.Tensor, tile: int = ROW_TILE) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] with every call on exactly `tile` rows of a."""
    if a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    M = a.shape[-2]
    padded = pad_rows(a, tile)
    out = torch.cat([torch.matmul(padded[..., i:i + tile, :], b) for i in range(0, padded.shape[-2], tile)], -2)
    return out[..., :M, :]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tile: int = ROW_TILE) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K], weight [N, K], the rows of x in tiles of `tile`."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    padded = pad_rows(rows, tile)
    out = torch.cat([F.linear(padded[i:i + tile], weight, bias) for i in range(0, padded.shape[0], tile)])
    return out[:rows.shape[0]].reshape(*x.shape[:-1], weight.shape[0])


def elementwise(func, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """func(x, *args, **kwargs) (an activation, see `ACTIVATIONS`) with every element on the kernel's vector path.

    The kernel's loop runs along x's rows (its last dimension, when that is contiguous) or along all of a
    contiguous x. Rows of whole `ELEMENT_TILE`s are taken as they are; any other x is laid out flat and padded
    with zeros to whole tiles. ATen splits a large call among its T threads in equal shares: one call does
    when its elements are a multiple of `ELEMENT_TILE` times lcm(1..T) (any T with one thread; sizes like 16 x
    8192 with 2); else the rows go in calls of at most `ELEMENT_BLOCK` elements, each a multiple of T tiles (the
    last call padded), which a kernel with ATen's default parallel grain runs on one thread and one that splits
    it anyway (gelu, past 6,144 elements) splits into whole tiles. Which call computes an element changes
    nothing but the time. An in-place form (`sigmoid_`, `inplace=True`) still writes into x.
    """
    n, width = x.numel(), x.shape[-1] if x.dim() else 1
    if n == 0:
        return func(x, *args, **kwargs)
    threads = torch.get_num_threads()
    share = ELEMENT_TILE * threads  # a call's elements come in multiples of this
    rows = x.reshape(-1, width)  # a view of x where its layout allows
    if rows.stride(-1) != 1 or width % ELEMENT_TILE or width * share // math.gcd(width, share) > ELEMENT_BLOCK:
        rows = pad_rows(x.reshape(n, 1), ELEMENT_TILE).reshape(-1, ELEMENT_TILE)
    if rows.numel() % (ELEMENT_TILE * math.lcm(*range(1, threads + 1))) == 0:
        pieces = [rows]  # however many of the T threads ATen splits it into, each gets whole tiles
    else:
        per = share // math.gcd(rows.shape[1], share)  # rows per call: a multiple of this
        step = ELEMENT_BLOCK // rows.shape[1] // per * per
        pieces = [rows[i:i + step] for i in range(0, rows.shape[0], step)]
        pieces[-1] = pad_rows(pieces[-1], per)
    outs = [func(piece, *args, **kwargs) for piece in pieces]
    out = (outs[0] if len(outs) == 1 else torch.cat(outs)).reshape(-1)[:n].reshape(x.shape)
    return x.copy_(out) if outs[0] is pieces[0] else out  # an in-place op returns its input


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
              tile: int = ROW_TILE, orders: dict | None = None, keys_t: torch.Tensor | None = None) -> torch.Tensor:
    """scaled_dot_product_attention, batch-invariant: every row's reductions in one order fixed by construction.

    query [b, H, q, d]; key, value [b, H_kv, L, d] (H_kv divides H: grouped
    query heads read their KV head without a copy); attn_mask bool (True =
    attend) or additive, broadcastable to [b, H, q, L]; -> [b, H, q, d_v]. `orders` caches the key order
    per mask object: every layer of one forward gets the same mask, so the hole test (a host sync) runs once.
    keys_t: optionally the keys transposed [b, H_kv, d, L] (a cache that keeps them so: the kernel then reads
    them without transposing; the same numbers, the same result). orders[COMPACT]: the query rows that read their
    keys in rank order (see `COMPACT`).
    Runs ar2dlm's kernel (native.attention) where it is built and takes the shapes, else `reference_attention`;
    which one is fixed per process and dtype, never by the rows of a call.
    """
    b, H, q, d = query.shape
    Hkv, L = key.shape[1], key.shape[-2]
    rep = H // Hkv
    scale = d ** -0.5 if scale is None else scale
    cached = orders.get(id(attn_mask)) if orders is not None and attn_mask is not None else None
    if cached is not None and cached[0] is attn_mask:
        order, allowed = cached[1], cached[2]
    else:
        allowed = _allowed(attn_mask, is_causal, b, q, L, query.device)
        seen = orders.get(SEEN) if orders is not None else None
        seen = seen if seen is not None and seen.shape == (b, L) else allowed.any(1).any(1)
        order = key_order(seen, orders.get(HOLES) if orders is not None else None)
        if order is not None:
            allowed = allowed.gather(3, order[:, None, None, :].expand(-1, allowed.shape[1], allowed.shape[2], -1))
        # the query heads of a KV head stacked as its rows: row rep_i * q + i is query head h_kv * rep + rep_i
        if allowed.shape[1] == 1:
            allowed = allowed.repeat(1, 1, rep, 1)  # [b, 1, rep q, L]
        else:
            allowed = allowed.expand(b, H, q, L).reshape(b, Hkv, rep * q, L)
        if orders is not None and attn_mask is not None:
            orders[id(attn_mask)] = (attn_mask, order, allowed)  # the mask kept alive: its id is not reused
    if order is not None:
        key, value = in_order(key, order), in_order(value, order)
        keys_t = None
    rows = query.reshape(b, Hkv, rep * q, d)
    compact = _ranked_rows(orders, rep * q)
    if kernel_runs(query, value):
        out = native.attention(rows, _last_contiguous(key), _last_contiguous(value), allowed, scale, keys_t, compact)
    else:
        out = reference_attention(rows, key, value, allowed, scale, tile, compact)
    return out.reshape(b, H, q, -1)


def _ranked_rows(orders: dict | None, rows: int) -> torch.Tensor | None:
    """orders[COMPACT] ([q] or [b, q] over the forward's query rows) for `rows` stacked rows, bool [1 or b, rows]:
    stacked row i is the forward's row i mod q (the query heads of a KV head stacked here, or by the packed-GQA
    attention before it). Kept in `orders` per row count: every layer stacks alike."""
    compact = orders.get(COMPACT) if orders is not None else None
    if compact is None:
        return None
    stacked = orders.get((COMPACT, rows))
    if stacked is None:
        flags = compact.reshape(-1, compact.shape[-1]).bool()  # [1 or b, q]
        if rows % flags.shape[1]:
            raise ValueError(f"orders[COMPACT] flags {flags.shape[1]} query rows; this attention has {rows} "
                             "stacked rows, not a multiple of them")
        stacked = orders[COMPACT, rows] = flags.repeat(1, rows // flags.shape[1])
    return stacked


def kernel_runs(query: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `attention` runs ar2dlm's kernel for these tensors (else the reference in torch ops)."""
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and value.shape[-1] == query.shape[-1] and native.available())


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _allowed(attn_mask, is_causal: bool, b: int, q: int, L: int, device) -> torch.Tensor:
    """The mask as bool [b, 1 or H, q, L] (True = attend)."""
    if attn_mask is None:
        allowed = torch.ones(q, L, dtype=torch.bool, device=device)
        if is_causal:
            allowed = allowed.tril(L - q)
        allowed = allowed.expand(b, 1, q, L)
    elif attn_mask.dtype == torch.bool:
        allowed = attn_mask
    else:
        allowed = attn_mask > torch.finfo(attn_mask.dtype).min / 2  # an additive mask: 0 = attend
    while allowed.dim() < 4:
        allowed = allowed[None]
    return allowed.expand(b, allowed.shape[1], q, L)


def reference_attention(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                        scale: float, tile: int = ROW_TILE, compact: torch.Tensor | None = None) -> torch.Tensor:
    """The same property in plain torch ops (slower): rows [b, H_kv, R, d], key, value [b, H_kv, L, d], allowed
    bool [b, 1 or H_kv, R, L] -> [b, H_kv, R, d_v]. Scores and the weighted sum of values in fp32 (or the input's
    wider dtype), over the keys in chunks of `KEY_CHUNK` from key 0, each product on row tiles of `tile`, the
    chunks summed in order; a row that sees no key gets zeros. compact: optionally bool, broadcastable to [b, R],
    the rows that read their keys in rank order (the kernel's `compact`): each is computed alone over its seen
    keys gathered to key 0, which is the result of that row over a cache holding exactly them."""
    if compact is not None:
        return _in_rank_order(rows, key, value, allowed, scale, tile, compact)
    b, Hkv, R, d = rows.shape
    L = key.shape[-2]
    work = torch.promote_types(rows.dtype, torch.float32)
    # 1. the keys in whole chunks (masked padding)
    pad = (-L) % KEY_CHUNK
    k, v = key.to(work), value.to(work)
    allowed = allowed.expand(b, Hkv, R, L)
    if pad:
        k = torch.cat([k, k.new_zeros(b, Hkv, pad, d)], 2)
        v = torch.cat([v, v.new_zeros(b, Hkv, pad, v.shape[-1])], 2)
        allowed = torch.cat([allowed, allowed.new_zeros(b, Hkv, R, pad)], 3)
    n_chunks = k.shape[2] // KEY_CHUNK
    # 2. scores [b, H_kv, R, L'] in tiles of rows; a masked key scores -inf and weighs an exact 0
    s = matmul(rows.to(work), k.transpose(-1, -2), tile) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min))
    # 3. per chunk: its weights' sum and its weighted values; the chunks added in order (cumsum is sequential)
    e = e.reshape(b, Hkv, R, n_chunks, KEY_CHUNK)
    total = e.sum(-1).cumsum(-1)[..., -1:]  # [b, H_kv, R, 1]
    chunks = v.reshape(b, Hkv, n_chunks, KEY_CHUNK, v.shape[-1])
    per_chunk = matmul(e.transpose(2, 3), chunks, tile)  # [b, H_kv, n_chunks, R, d_v]
    out = per_chunk.cumsum(2)[:, :, -1] / total.clamp_min(torch.finfo(work).tiny)
    return out.to(rows.dtype)


def _in_rank_order(rows, key, value, allowed, scale, tile, compact) -> torch.Tensor:
    """reference_attention with the `compact` rows, one (batch row, query row, mask head) at a time, over their
    seen keys gathered to key 0 (host reads: the reference is the slow path)."""
    out = reference_attention(rows, key, value, allowed, scale, tile)
    b, Hkv, R = rows.shape[:3]
    allowed = allowed.expand(b, allowed.shape[1], R, key.shape[-2])
    for bi, r in compact.expand(b, R).nonzero().tolist():
        for h in range(allowed.shape[1]):  # one mask for every KV head, or one per head
            heads = slice(None) if allowed.shape[1] == 1 else slice(h, h + 1)
            seen = allowed[bi, h, r].nonzero()[:, 0]  # [n]: the row's keys, in order
            if seen.numel() == 0:
                out[bi, heads, r] = 0
                continue
            one = reference_attention(rows[bi:bi + 1, heads, r:r + 1], key[bi:bi + 1, heads, seen],
                                      value[bi:bi + 1, heads, seen],
                                      torch.ones(1, 1, 1, seen.numel(), dtype=torch.bool, device=rows.device),
                                      scale, tile)
            out[bi, heads, r] = one[0, :, 0]
    return out


HOLES = "holes"
"""The key of `orders` under which a caller that knows says whether the forward's keys have holes (True / False);
without it `key_order` looks (a host read)."""


COMPACT = "compact"
"""The key of `orders` under which a caller flags the query rows that read their keys in rank order: bool [q] or
[b, q] over the forward's query rows, or None (no row). A flagged row's n-th seen key (in key order) counts as if
it sat at key n: the chunks of its sums hold exactly its keys, packed from key 0, so its result is the row's over a
cache that holds only them (the AR loop's), whatever gaps it has among the keys of the call (a candidate tree's
sibling: the step's first j keys, then its own after the other candidates). Other rows are computed as without."""

SEEN = "seen"
"""The key of `orders` under which the keys of the forward's layout, before any sliding window cuts them, are given
(bool [b, L]): a window leaves unread keys before a row's own that are not holes, and every layer kind of a row must
find its keys where they are when it decodes alone (`key_order`)."""


def key_order(seen: torch.Tensor, holes: bool | None = None) -> torch.Tensor | None:
    """[b, L] the order that moves each batch row's seen keys to the front, in order, or None when no row has a
    hole (a seen key after an unseen one). seen: bool [b, L]. `holes`: what the caller knows (the decode engine
    tracks it as it commits); None: look, one host read. Sorting where no row has a hole changes nothing but the
    time (the order is the identity).

    The chunked sums run from key 0, so a row must find its keys where they are when it decodes alone. In a
    ragged batch they are not: a shorter prompt's padding, or drafts another row accepted and this one did not,
    leave holes in the shared cache before the step's own keys. Without holes (a single request, the AR loop)
    nothing moves.
    """
    if holes is None:
        holes = bool((seen[:, 1:] & ~seen[:, :-1]).any())
    if not holes:
        return None
    return torch.sort((~seen).to(torch.int8), dim=1, stable=True).indices


def in_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [b, h, L, d] with its keys in `order` [b, L]."""
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


class BatchInvariant(TorchFunctionMode):
    """Inside it, matmuls and attention run in a fixed reduction order per row (see the module docstring).

    One instance serves one forward (DiffusionLM.forward enters a new one): it caches each attention mask's key
    order for the forward's layers.
    """

    def __init__(self, probe=None, holes: bool | None = None, compact: torch.Tensor | None = None,
                 seen: torch.Tensor | None = None):
        super().__init__()
        self.orders: dict = {key: value for key, value in ((HOLES, holes), (COMPACT, compact)) if value is not None}
        if seen is not None:  # [b, L] the layout's keys, before windows (SEEN)
            self.orders[SEEN] = seen
        self.probe = probe  # callable(component, rows [b, q, ...]): the exactness check reads attention's rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func is F.linear:
            return linear(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
                    torch.bmm, torch.Tensor.bmm):
            return matmul(*args, **kwargs)
        if func in (torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm):
            base, a, b = args[:3]
            return _scaled_add(base, matmul(a, b), kwargs.get("beta", 1), kwargs.get("alpha", 1))
        if func in (torch.Tensor.addmm_, torch.Tensor.baddbmm_):
            base, a, b = args[:3]
            return base.copy_(_scaled_add(base, matmul(a, b), kwargs.get("beta", 1), kwargs.get("alpha", 1)))
        if func is F.scaled_dot_product_attention:
            out = _sdpa(self.orders, *args, **kwargs)
            if self.probe is not None:
                self.probe("attention", out.transpose(1, 2))  # [b, q, H, d]
            return out
        if func in ACTIVATIONS and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return elementwise(func, *args, **kwargs)
        return func(*args, **kwargs)


ACTIVATIONS = {torch.sigmoid, torch.Tensor.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid_, torch.rsqrt,
               torch.Tensor.rsqrt, torch.rsqrt_, torch.Tensor.rsqrt_, F.silu, F.gelu, F.softplus, F.mish, F.elu, F.elu_,
               F.selu, F.celu, F.celu_, F.logsigmoid, F.hardswish, F.hardsigmoid}
"""Elementwise ops whose CPU kernel computes a remainder in scalar code (measured: sigmoid, silu, gelu, softplus,
mish, elu in fp32; gelu, rsqrt in bf16), and their kin. Ops without a remainder (exp, tanh, erf, log, sqrt: ATen
runs the remainder as a partial vector) and exact arithmetic are left alone."""


def _scaled_add(base: torch.Tensor, product: torch.Tensor, beta, alpha) -> torch.Tensor:
    """beta * base + alpha * product (addmm's result, from an invariant product)."""
    out = product if alpha == 1 else product * alpha
    return out + (base if beta == 1 else base * beta) if beta != 0 else out


def _sdpa(orders, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if dropout_p:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return attention(query, key, value, attn_mask, is_causal, scale, orders=orders)
