"""Layers that read their neighbours: every row reads its *logical* predecessors, in every layout.

Attention reads the KV cache through our 4D mask, so any row order works.
ZAYA1's CCA (transformers `zaya`) also reads *the previous rows of the input
tensor*: q and k are mixed by two causal convolutions (kernels `cca_time0`,
`cca_time1`: each row sees W = cca_time0 + cca_time1 - 2 earlier rows), and
half of each value head is the previous token's `v_proj_delayed`. In
ar2dlm's layouts the tensor neighbour is often the wrong token, so a
forward carries a predecessor map: pred[b, i] = the row of this forward that
holds row i's previous token, or -1 = the cache's state (the last committed
token; zeros at the start of a sequence).

```
decode step, K = 3, R = {1, 2}  (docs/DESIGN.md §3)
row    d1  d2  d3 | P1s1 P1s2 P1s3 | P2s1 P2s2 P2s3
index   0   1   2 |   3    4    5  |   6    7    8
pred   -1   0   1 |   0    3    4  |   1    6    7

training [clean | masks], S = 6, B = 3 (mask slot bB follows clean x_{bB-1})
row    c0  c1  c2  c3  c4  c5 | m0  m1  m2  m3  m4  m5
index   0   1   2   3   4   5 |  6   7   8   9  10  11
pred   -1   0   1   2   3   4 | -1   6   7   2   9  10

prefill / AR: pred[i] = i - 1 (the stock layout; the hooks change nothing)
```

Going back W steps from a row follows pred through this forward's rows and
then into the cached state's W columns (newest last). Each row's conv output
is the stock convolutions (the module's own weights) applied to its own
chain of W + 1 inputs; its delayed value is its predecessor's. After a step
accepts r, `commit` sets each row's conv and delayed-value state to the
one after d_r (row r - 1 of the forward), not after the last row fed.

The hooks are forward hooks on one model instance's modules (no modeling
file is forked, nothing global is patched), active only inside
`predecessors(model, pred, cache)`. LFM2's short convolution (`Lfm2ShortConv`,
y = C * conv(B x) over L = `conv_L_cache` inputs) is hooked the same way: each
row's convolution over its own chain of L inputs, its conv state after a
row that chain. Another finite-window mixer joins by adding its module's
hooks here: it needs the same chain of W inputs per row.

A recurrent mixer (transformers' `linear_attention` kind: Qwen3-Next's and
Qwen3.5's gated DeltaNet, Nemotron-H's Mamba-2) has no finite window: its
state after a row depends on the whole chain. So the scan runs in row order
(every layout puts a row's predecessor before it) and keeps the state after
every row:

```
decode step, K = 3, R = {1, 2}; S(x) = the state after row x, S(-1) the committed one
S(d1) = f(S(-1), d1)   S(d2) = f(S(d1), d2)   S(d3) = f(S(d2), d3)
S(P1s1) = f(S(d1), P1s1)   S(P1s2) = f(S(P1s1), P1s2) ...   S(P2s1) = f(S(d2), P2s1) ...
accept r = 2: commit S(d2) (and the conv state after d2); S(-1) was only read
```

f is transformers' one-token update (the form its `generate` runs after the
prompt), so a row equals the AR loop's step at its position. A prefill's
prompt rows (`prompt=` lengths) run transformers' chunked form instead, as
`generate` does, each prompt alone; its slots are scanned from the state
after its last token. Training's doubled sequence is the scan with
`training_predecessors`.
"""

from __future__ import annotations

import contextlib
import sys
import weakref

import torch
import torch.nn.functional as F


def chain(pred: torch.Tensor, depth: int) -> torch.Tensor:
    """[b, n, depth + 1] indices into ext = [state_0 .. state_{depth-1} | rows 0..n-1] of each row's ancestors,
    oldest first: column depth is the row itself, column depth - l its l-th predecessor."""
    b, n = pred.shape
    W = depth
    # one step back from every ext position: a row goes to its predecessor (or the newest state column);
    # a state column to the one before it (column 0, never stepped from at depth W, stays put)
    back_rows = torch.where(pred >= 0, pred + W, torch.full_like(pred, W - 1))
    back_state = (torch.arange(W, device=pred.device) - 1).clamp(min=0).expand(b, W)
    back = torch.cat([back_state, back_rows], dim=1)  # [b, W + n]
    cur = torch.arange(n, device=pred.device).expand(b, n) + W
    out = [cur]
    for _ in range(depth):
        cur = back.gather(1, cur)
        out.append(cur)
    return torch.stack(out[::-1], dim=-1)


class _CCA:
    """The hooks of one `ZayaCCAProjection`: convolutions and delayed value over each row's own chain."""

    def __init__(self, proj, ctx):
        self.proj, self.ctx = proj, ctx
        self.W = proj.conv_kernel_size
        self.ext = None  # [b, C, W + n]: the depthwise conv's input, cached state columns first
        self.windows = None  # [b, n, C, W]: each row's last W conv inputs (the conv state after that row)
        self.delayed = None  # [b, n, dv]: each row's v_proj_delayed (the delayed-value state after that row)
        self.handles = [proj.conv_qk_depthwise.register_forward_pre_hook(self.before_depthwise),
                        proj.conv_qk_grouped.register_forward_hook(self.after_grouped),
                        proj.v_proj_delayed.register_forward_hook(self.after_delayed)]

    def before_depthwise(self, module, args):
        self.ext, self.delayed = args[0], None  # a new forward: the value path runs after the convolutions

    def after_grouped(self, module, args, output):
        p, ext = self.proj, self.ext
        b, C, _ = ext.shape
        idx = chain(self.ctx.pred, self.W)  # [b, n, W + 1]
        n = idx.shape[1]
        win = ext.gather(2, idx.reshape(b, 1, -1).expand(b, C, -1)).view(b, C, n, self.W + 1)
        win = win.permute(0, 2, 1, 3)  # [b, n, C, W + 1]
        self.windows = win[..., 1:]
        # the two stock convolutions over each row's own window of W + 1 inputs (one output per row), as
        # small contractions: conv1d over b * n windows has a large fixed cost per call on a CPU
        dw, gw = p.conv_qk_depthwise, p.conv_qk_grouped
        k0 = dw.kernel_size[0]
        d = torch.einsum("bnctj,cj->bnct", win.unfold(-1, k0, 1), dw.weight[:, 0])  # [b, n, C, k1]
        if dw.bias is not None:
            d = d + dw.bias[:, None]
        g = gw.groups
        m = C // g
        out = torch.einsum("bngit,goit->bngo", d.view(b, n, g, m, -1), gw.weight.view(g, m, m, -1)).reshape(b, n, C)
        if gw.bias is not None:
            out = out + gw.bias
        return out.transpose(1, 2)  # [b, C, n], the stock output's shape

    def after_delayed(self, module, args, output):
        x = args[0]
        if self.delayed is not None:  # the stock code's second call: the state of a cache-less forward
            return output
        pred = self.ctx.pred
        b, n = pred.shape
        self.delayed = output
        state = self.state_value(module, x)  # [b, dv]
        # the stock code shifts by one tensor row (value_delayed[i] = returned[i - 1]); return, at row i - 1,
        # row i's predecessor's delayed projection (the state's for pred = -1)
        prev = torch.where((pred >= 0)[..., None], output.gather(1, pred.clamp(min=0)[..., None].expand_as(output)),
                           state[:, None, :])
        return torch.cat([prev[:, 1:], output[:, -1:]], dim=1)

    def state_value(self, module, x):
        layer = self.ctx.layer(self.proj.layer_idx)
        if layer is not None and layer.is_recurrent_states_initialized.get(0):
            return layer.recurrent_states[0]
        return module(x.new_zeros(x.shape[0], 1, x.shape[-1]))[:, 0]

    def commit(self, rows: torch.Tensor) -> None:
        """Set this layer's conv and delayed-value state to those after row rows[b] of the last forward."""
        layer = self.ctx.layer(self.proj.layer_idx)
        ar = torch.arange(rows.shape[0], device=rows.device)
        layer.conv_states[0].copy_(self.windows[ar, rows])
        layer.recurrent_states[0].copy_(self.delayed[ar, rows])


class _ShortConv:
    """The hooks of one `Lfm2ShortConv`: y = C * conv(B * x) over each row's own chain of L = `conv_L_cache` inputs.

    The stock forward convolves the tensor's neighbouring rows (in a function, not a module call, so no hook sits
    on the convolution itself): `in_proj`'s output gives B, C and x, each row's convolution is computed here over
    its chain (the cached conv state's columns first, newest last), and `out_proj`'s input is replaced by that
    row's C * conv. The state after a row is its chain's L inputs (the stock state after a token: the last L)."""

    def __init__(self, conv, ctx):
        self.conv, self.ctx = conv, ctx
        self.L = conv.conv_kernel_size
        self.y = None  # [b, n, C]: out_proj's input, computed from each row's chain
        self.windows = None  # [b, n, C, L]: each row's chain of conv inputs (the conv state after that row)
        self.handles = [conv.in_proj.register_forward_hook(self.after_in_proj),
                        conv.out_proj.register_forward_pre_hook(self.before_out_proj)]

    def after_in_proj(self, module, args, output):
        B, C, x = output.transpose(-1, -2).chunk(3, dim=-2)  # [b, C, n] each, as the stock code splits them
        Bx = B * x
        b, channels, _ = Bx.shape
        W = self.L - 1
        state = self.state(Bx)  # [b, C, L]: the inputs before this forward, newest last
        ext = torch.cat([state[..., self.L - W:], Bx], dim=-1)  # [b, C, W + n]
        idx = chain(self.ctx.pred, W)  # [b, n, W + 1]
        n = idx.shape[1]
        win = ext.gather(2, idx.reshape(b, 1, -1).expand(b, channels, -1)).view(b, channels, n, W + 1)
        weight = self.conv.conv.weight[:, 0].to(win.dtype)  # [C, L], applied oldest first as F.conv1d does
        out = torch.einsum("bcnj,cj->bcn", win, weight)
        if self.conv.conv.bias is not None:
            out = out + self.conv.conv.bias[:, None]
        self.windows = win.permute(0, 2, 1, 3)
        self.y = (C * out.to(C.dtype)).transpose(-1, -2).contiguous()  # [b, n, C]
        return output

    def before_out_proj(self, module, args):
        y, self.y = self.y, None
        return (y,) if y is not None else None

    def state(self, like: torch.Tensor) -> torch.Tensor:
        layer = self.ctx.layer(self.conv.layer_idx)
        if layer is not None and layer.is_conv_states_initialized.get(0) and layer.has_previous_state.get(0):
            return layer.conv_states[0].clone()  # the stock forward overwrites it with the rows it was fed
        return like.new_zeros(like.shape[0], like.shape[1], self.L)  # the start of a sequence

    def commit(self, rows: torch.Tensor) -> None:
        """Set this layer's conv state to the one after row rows[b] of the last forward."""
        layer = self.ctx.layer(self.conv.layer_idx)
        if layer is None or not layer.is_conv_states_initialized.get(0):
            return
        ar = torch.arange(rows.shape[0], device=rows.device)
        layer.conv_states[0].copy_(self.windows[ar, rows])


class _Recurrent:
    """The hooks of one recurrent mixer (gated DeltaNet, Mamba-2): a causal convolution, then a recurrent state
    carried from token to token, each row over its own chain of predecessors.

    The stock forward runs without the cache (`cache_params=None`), so it never changes the committed state; its
    projections' outputs are kept, and the gated norm's input (the mixer's sequence output) is replaced by each
    row's output from a scan in row order: row i's state = the update of its predecessor's state (the cache's
    for pred = -1, zeros at the start of a sequence) by row i's own input, every row's state kept. The update is
    transformers' one-token recurrent form, the one its `generate` uses after the prompt; a prefill's prompt rows
    take its chunked form instead (`prompt_runs`), keeping the state after the prompt's last token only. The
    output of the stock forward's own (cache-less) computation is thrown away. `commit` sets the cached conv and
    recurrent state to those after the chosen row (the accepted length), as a crop rolls the KV cache back.
    """

    projections: tuple[str, ...] = ()
    norm = "norm"  # the gated norm the sequence output goes through

    def __init__(self, mixer, ctx):
        self.mixer, self.ctx = mixer, ctx
        self.L = mixer.conv_kernel_size  # the conv state holds the last L inputs (transformers' layout)
        self.proj: dict = {}
        self.pending = False  # the gated norm of this forward is still to come
        self.conv_state = self.recurrent_state = None  # the committed state this forward starts from
        self.windows = None  # [b, n, C, L]: each row's chain of conv inputs (the conv state after that row)
        self.states, self.offset = None, -1  # [b, m, ...]: states[:, j] = the recurrent state after row offset + j
        self.handles = [mixer.register_forward_pre_hook(self.before, with_kwargs=True),
                        getattr(mixer, self.norm).register_forward_pre_hook(self.before_norm),
                        mixer.register_forward_hook(self.after)]
        self.handles += [getattr(mixer, name).register_forward_hook(self.keeper(name)) for name in self.projections]

    def keeper(self, name):
        def keep(module, args, output):
            self.proj[name] = output
        return keep

    def before(self, module, args, kwargs):
        layer = self.ctx.layer(self.mixer.layer_idx)
        started = layer is not None and bool(layer.is_recurrent_states_initialized.get(0))
        self.conv_state = layer.conv_states[0] if started else None
        self.recurrent_state = layer.recurrent_states[0] if started else None
        self.proj, self.pending = {}, True
        return args, {**kwargs, "cache_params": None}

    def after(self, module, args, output):
        if self.pending:  # a fused kernel ran the whole mixer: its rows read their tensor neighbours
            raise RuntimeError(f"{type(module).__name__} ran without its gated norm (a fused kernel?): ar2dlm cannot "
                               "give its rows their logical predecessors; load the model without kernels")

    def before_norm(self, module, args):
        if not self.pending:
            return None
        self.pending = False
        return (self.scan(args[0]),) + tuple(args[1:])

    def convolve(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """x [b, n, C] conv inputs -> act(conv) [b, n, C], each row's depthwise convolution over its own chain."""
        from transformers.activations import ACT2FN

        conv = self.mixer.conv1d
        b, n, C = x.shape
        W = self.L - 1
        xt = x.transpose(1, 2)  # [b, C, n]
        state = self.conv_state if self.conv_state is not None else xt.new_zeros(b, C, self.L)
        ext = torch.cat([state[..., self.L - W:].to(xt.dtype), xt], -1)  # [b, C, W + n]
        idx = chain(self.ctx.pred, W)  # [b, n, L]
        win = ext.gather(2, idx.reshape(b, 1, -1).expand(b, C, -1)).view(b, C, n, self.L)
        self.windows = win.permute(0, 2, 1, 3)
        weight = conv.weight[:, 0]  # [C, L], applied oldest first as F.conv1d does
        # a sum over each row's own L inputs (an einsum would pick its matmul blocking from the row count)
        out = (win.to(weight.dtype) * weight[:, None, :]).sum(-1)
        if conv.bias is not None:
            out = out + conv.bias[:, None]
        return ACT2FN[activation](out).to(x.dtype).transpose(1, 2)

    def scan(self, stock: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prompt_runs(self, chunked, *rows: torch.Tensor):
        """A prefill's prompts through transformers' chunked form (what its `generate` runs on a prompt), each batch
        row alone over its own prompt from the zero state: (lens [b], outputs [b, n, ...] (zeros past a prompt),
        final states [b, ...]), or None outside a prefill. `chunked(*rows)` takes one prompt's rows [1, T, ...]."""
        lens = self.ctx.prompt
        if lens is None or self.recurrent_state is not None:
            return None
        outs, finals = [], []
        for b, T in enumerate(lens):  # a prefill, not the step: one call per prompt keeps each row as alone
            out, final = chunked(*(x[b:b + 1, :T] for x in rows))
            outs.append(F.pad(out, (0, 0) * (out.dim() - 2) + (0, rows[0].shape[1] - T)))
            finals.append(final)
        return torch.tensor(lens, device=rows[0].device), torch.cat(outs), torch.cat(finals)

    def commit(self, rows: torch.Tensor) -> None:
        """Set this layer's conv and recurrent state to those after row rows[b] of the last forward."""
        layer = self.ctx.layer(self.mixer.layer_idx)
        if layer is None or self.states is None:
            return
        ar = torch.arange(rows.shape[0], device=rows.device)
        layer.conv_states[0] = self.windows[ar, rows].contiguous()
        layer.recurrent_states[0] = self.states[ar, rows - self.offset].contiguous()
        layer.conv_kernel_size[0] = self.L
        layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
        layer.has_previous_state[0] = True


def _states(b: int, n: int, tail: tuple, initial, runs, like: torch.Tensor):
    """The buffer a scan keeps its states in, and what it starts from -> (states, first, done).

    first: the first row scanned (0, or past the shortest prompt of `runs`); states[:, j] (fp32) = the state after
    row first - 1 + j, states[:, 0] the one the scan starts from (the committed state, zeros at the start of a
    sequence, or the shortest prompt's final state): a prompt's rows keep no state but their last. done [b, n]:
    rows `runs` computed (None without)."""
    first = 0 if runs is None else int(runs[0].min())
    states = like.new_zeros(b, n - first + 1, *tail, dtype=torch.float32)
    if initial is not None:
        states[:, 0] = initial.to(states)
    done = None
    if runs is not None:
        lens, _, final = runs
        states[torch.arange(b, device=lens.device), lens - first] = final.to(states)
        done = torch.arange(n, device=lens.device)[None, :] < lens[:, None]
    return states, first, done


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # transformers' (and FLA's) l2norm


def gated_delta_scan(query, key, value, g, beta, initial, pred, runs=None):
    """transformers' `torch_recurrent_gated_delta_rule`, row i starting from row pred[b, i]'s state.

    query, key [b, n, hk, dk]; value [b, n, hv, dv]; g, beta [b, n, hv]; initial [b, hv, dk, dv] or None;
    pred [b, n] -> (output [b, n, hv, dv] in query's dtype, states [b, m, hv, dk, dv] fp32, offset): states[:, j]
    is the state after row offset + j (`_states`). runs: (lens, outputs, final states) of rows already computed
    (`_Recurrent.prompt_runs`): row i < lens[b] keeps its output, and only the state after its last row (the one a
    later row reads) is kept.
    """
    dtype = query.dtype
    b, n, hk, dk = key.shape
    hv, dv = value.shape[-2:]
    if hk != hv:  # grouped values: each q/k head serves hv // hk consecutive value heads
        query, key = (x.repeat_interleave(hv // hk, dim=2) for x in (query, key))
    # 1. fp32, heads first, q and k l2-normalised, q scaled (the stock steps, once for all rows)
    query, key, value, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                                  for x in (query, key, value, beta, g))
    query, key = _l2norm(query), _l2norm(key)
    query = query / (query.shape[-1] ** 0.5)
    # 2. the state the scan starts from, and a slot for the state after each row it scans
    states, first, done = _states(b, n, (hv, dk, dv), initial, runs, query)
    out = torch.zeros_like(value)  # [b, hv, n, dv]
    if runs is not None:
        out.copy_(runs[1].transpose(1, 2))
    ar, src = torch.arange(b, device=pred.device), pred - first + 1
    decay = g.exp()[..., None, None]  # [b, hv, n, 1, 1]
    for i in range(first, n):
        # 3. the stock one-token update from the predecessor's state
        q_t, k_t, v_t = query[:, :, i], key[:, :, i], value[:, :, i]
        s = states[ar, src[:, i]] * decay[:, :, i]
        kv_mem = (s * k_t.unsqueeze(-1)).sum(dim=-2)
        delta = (v_t - kv_mem) * beta[:, :, i].unsqueeze(-1)
        s = s + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        o = (s * q_t.unsqueeze(-1)).sum(dim=-2)
        if done is not None:  # rows of a longer prompt: computed already
            keep = done[:, i, None, None]
            o, s = torch.where(keep, out[:, :, i], o), torch.where(keep[..., None], states[:, i - first + 1], s)
        out[:, :, i] = o
        states[:, i - first + 1] = s
    return out.transpose(1, 2).contiguous().to(dtype), states, first - 1


class _GatedDeltaNet(_Recurrent):
    """The gated DeltaNet of Qwen3-Next, Qwen3.5 and OLMo hybrid: conv over [q | k | v], then the gated delta rule."""

    def __init__(self, mixer, ctx):
        if hasattr(mixer, "in_proj_qkvz"):  # Qwen3-Next: q, k, v, z interleaved per key head
            self.projections = ("in_proj_qkvz", "in_proj_ba")
        elif hasattr(mixer, "in_proj_qkv"):  # Qwen3.5
            self.projections = ("in_proj_qkv", "in_proj_b", "in_proj_a")
        else:  # OLMo hybrid: one projection each, and its gated norm is o_norm
            self.projections, self.norm = ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj"), "o_norm"
        super().__init__(mixer, ctx)

    def scan(self, stock: torch.Tensor) -> torch.Tensor:
        m, p = self.mixer, self.proj
        if "in_proj_qkvz" in p:
            q, k, v, _, b_, a = m.fix_query_key_value_ordering(p["in_proj_qkvz"], p["in_proj_ba"])
            qkv = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)], -1)
        elif "in_proj_qkv" in p:
            qkv, b_, a = p["in_proj_qkv"], p["in_proj_b"], p["in_proj_a"]
        else:
            qkv, b_, a = torch.cat([p["q_proj"], p["k_proj"], p["v_proj"]], -1), p["b_proj"], p["a_proj"]
        qkv = self.convolve(qkv, m.activation)
        bsz, n, _ = qkv.shape
        q, k, v = torch.split(qkv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
        q, k = (x.reshape(bsz, n, -1, m.head_k_dim) for x in (q, k))
        v = v.reshape(bsz, n, -1, m.head_v_dim)
        beta = b_.reshape(bsz, n, -1).sigmoid()
        if getattr(m, "allow_neg_eigval", False):  # OLMo hybrid: beta in [0, 2]
            beta = beta * 2.0
        g = -m.A_log.float().exp() * F.softplus(a.reshape(bsz, n, -1).float() + m.dt_bias)
        chunk = sys.modules[type(m).__module__].torch_chunk_gated_delta_rule  # the function the stock forward calls
        runs = self.prompt_runs(lambda *x: chunk(*x, initial_state=None, output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True), q, k, v, g, beta)
        out, self.states, self.offset = gated_delta_scan(q, k, v, g, beta, self.recurrent_state, self.ctx.pred, runs)
        return out.reshape(stock.shape)  # the stock passes [b * n * hv, dv] to the norm


def mamba2_scan(x, dt, A, B, C, D, dt_bias, initial, pred, runs=None):
    """transformers' `mamba2_selective_state_update` (Mamba-2's one-token step), row i starting from row
    pred[b, i]'s state.

    x [b, n, H, P]; dt [b, n, H]; A, D, dt_bias [H]; B, C [b, n, G, N]; initial [b, H, P, N] or None;
    pred [b, n] -> (output [b, n, H, P] in x's dtype, states [b, m, H, P, N] fp32, offset), as `gated_delta_scan`;
    runs: rows already computed, as there.
    """
    b, n, H, P = x.shape
    G, N = B.shape[-2:]
    # 1. the stock step's operands, every row at once (the [.., P, N] products are formed per row, below)
    dt = dt[..., None].expand(b, n, H, P)
    dt = F.softplus(dt + dt_bias[:, None].expand(H, P).to(dt.dtype))[..., None]  # [b, n, H, P, 1]
    A = A[:, None, None].expand(H, P, N)
    B = B[:, :, :, None].expand(b, n, G, H // G, N).reshape(b, n, H, 1, N)
    C = C[:, :, :, None].expand(b, n, G, H // G, N).reshape(b, n, H, N)
    D = D[:, None].expand(H, P)
    # 2. the state the scan starts from (fp32, transformers' cache dtype), a slot for the state after each row scanned
    states, first, done = _states(b, n, (H, P, N), initial, runs, x)
    out = x.new_zeros(b, n, H, P)
    if runs is not None:
        out.copy_(runs[1])
    ar, src = torch.arange(b, device=pred.device), pred - first + 1
    for i in range(first, n):
        # 3. the stock step: the output reads the new state before it is rounded to the cache's dtype
        dA = torch.exp(dt[:, i].float() * A.float())  # [b, H, P, N]
        s = states[ar, src[:, i]] * dA + (dt[:, i] * B[:, i]) * x[:, i, ..., None]
        y = torch.bmm(s.to(C.dtype).reshape(b * H, P, N), C[:, i].reshape(b * H, N, 1)).view(b, H, P)
        y = (y + x[:, i] * D).to(y.dtype).to(x.dtype)
        s = s.to(states.dtype)
        if done is not None:  # rows of a longer prompt: computed already
            keep = done[:, i, None, None]
            y, s = torch.where(keep, out[:, i], y), torch.where(keep[..., None], states[:, i - first + 1], s)
        out[:, i] = y
        states[:, i - first + 1] = s
    return out, states, first - 1


class _Mamba2(_Recurrent):
    """Nemotron-H's Mamba-2 mixer: conv over [x | B | C], then the selective state update."""

    projections = ("in_proj",)

    def scan(self, stock: torch.Tensor) -> torch.Tensor:
        m = self.mixer
        _, xBC, dt = self.proj["in_proj"].split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        xBC = self.convolve(xBC, m.activation)
        bsz, n, _ = xBC.shape
        GN = m.n_groups * m.ssm_state_size
        x, B, C = torch.split(xBC, [m.intermediate_size, GN, GN], dim=-1)
        x = x.reshape(bsz, n, m.num_heads, m.head_dim)
        B, C = (y.reshape(bsz, n, m.n_groups, -1) for y in (B, C))
        A = -torch.exp(m.A_log.float())
        chunk = sys.modules[type(m).__module__].mamba2_chunk_scan  # the function the stock forward calls
        runs = self.prompt_runs(
            lambda x, dt, B, C: chunk(x, dt, A, B, C, chunk_size=m.chunk_size, D=m.D, z=None, dt_bias=m.dt_bias,
                                      dt_softplus=True, initial_states=None, dt_limit=m.time_step_limit,
                                      return_final_states=True), x, dt, B, C)
        out, self.states, self.offset = mamba2_scan(x, dt, A, B, C, m.D, m.dt_bias, self.recurrent_state,
                                                    self.ctx.pred, runs)
        return out.reshape(bsz, n, -1)


MIXERS = {"ZayaCCAProjection": _CCA, "Lfm2ShortConv": _ShortConv,  # module class name -> its hooks
          "Qwen3NextGatedDeltaNet": _GatedDeltaNet, "Qwen3_5GatedDeltaNet": _GatedDeltaNet,
          "Qwen3_5MoeGatedDeltaNet": _GatedDeltaNet, "OlmoHybridGatedDeltaNet": _GatedDeltaNet,
          "NemotronHMamba2Mixer": _Mamba2}


_FOUND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its mixer modules (found once)


def mixer_modules(model) -> list:
    """The modules of `model` that MIXERS hooks, found once per model instance (a step pays a dict lookup)."""
    if model not in _FOUND:
        _FOUND[model] = [m for m in model.modules() if type(m).__name__ in MIXERS]
    return _FOUND[model]


def has_mixers(model) -> bool:
    return bool(mixer_modules(model))


class Predecessors:
    """The hooks of one model instance for one forward; see the module docstring.

    `pred` is a [b, n] tensor, or a function returning one (only called when the model has mixers, so the
    other architectures pay nothing). `prompt`: per batch row, how many rows from row 0 are its prompt, read in
    order from the start of a sequence (a prefill): a recurrent mixer runs transformers' chunked form there."""

    def __init__(self, model, pred, cache=None, prompt: list[int] | None = None):
        self.mixers, self.cache, self.prompt = [], cache, prompt
        mods = mixer_modules(model)
        self.pred = (pred() if callable(pred) else pred) if mods else None
        self.mixers = [MIXERS[type(m).__name__](m, self) for m in mods]

    def layer(self, idx):
        return None if self.cache is None else self.cache.layers[idx]

    def commit(self, rows: torch.Tensor) -> None:
        for m in self.mixers:
            m.commit(rows)

    def remove(self):
        for m in self.mixers:
            for h in m.handles:
                h.remove()


@contextlib.contextmanager
def predecessors(model, pred: torch.Tensor, cache=None, prompt: list[int] | None = None):
    """Inside: every hooked mixer of `model` (MIXERS) reads each row's predecessors from `pred` [b, n] (-1 = state);
    `prompt` (a prefill): each batch row's prompt length (see `Predecessors`)."""
    ctx = Predecessors(model, pred, cache, prompt)
    try:
        yield ctx
    finally:
        ctx.remove()


def training_predecessors(seq_len: int, block_size: int, doc_ids: torch.Tensor,
                          block_offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Training layout [clean x | mask slots] (positions 0..S-1 twice) -> pred [b, 2S] (the drawing above).

    Clean x_i follows x_{i-1}; the first slot of a block follows the clean token before the block, any other
    slot the slot before it. A document's first token (clean or slot) starts a sequence: -1.
    """
    from .masks import block_ids

    S = seq_len
    b = doc_ids.shape[0]
    i = torch.arange(S, device=doc_ids.device)
    starts_doc = torch.ones(b, S, dtype=torch.bool, device=doc_ids.device)
    starts_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    block = block_ids(S, block_size, block_offset, doc_ids.device).expand(b, S)
    starts_block = torch.ones(b, S, dtype=torch.bool, device=doc_ids.device)
    starts_block[:, 1:] = block[:, 1:] != block[:, :-1]
    clean = (i - 1).expand(b, S)
    slot = torch.where(starts_block, i - 1, S + i - 1)
    none = torch.full_like(clean, -1)
    return torch.cat([torch.where(starts_doc, none, clean), torch.where(starts_doc, none, slot)], 1)


def prefill_predecessors(lens: torch.Tensor, padded_len: int, slots: int) -> torch.Tensor:
    """[prompt (right-padded to padded_len) | P_0: slots] -> pred [b, padded_len + slots].

    prompt row i follows row i - 1 (row 0 the start: -1); P_0 slot 1 follows the last prompt token
    (row len - 1), slot s slot s - 1.
    """
    b = lens.shape[0]
    pred = (torch.arange(padded_len + slots, device=lens.device) - 1).expand(b, -1).clone()
    if slots:
        pred[:, padded_len] = lens - 1
    return pred


def step_predecessors(proposals: torch.Tensor, draft_len: int) -> torch.Tensor:
    """[d_1..d_K | P_r for r in R] -> pred [b, K + |R| K] (the decode-step drawing above).

    proposals: [b, n] the r of each P_r (1..K); P_r slot 1 follows d_r (row r - 1).
    """
    b, n = proposals.shape
    K = draft_len
    idx = torch.arange(K + n * K, device=proposals.device)
    pred = (idx - 1).expand(b, -1).clone()
    if n:
        pred[:, K::K] = proposals - 1
    return pred


def tree_predecessors(proposals: torch.Tensor, draft_len: int, depths: torch.Tensor) -> torch.Tensor:
    """[d_1..d_K | siblings | P_r for r in R] -> pred [b, K + S + |R| K] (`masks.tree_mask`'s layout).

    A sibling at depth j follows d_j (row j - 1); the chain and the proposals as in `step_predecessors`, the
    proposal rows S further on.
    """
    K, S = draft_len, depths.shape[0]
    chain = step_predecessors(proposals, K)  # [b, K + nK]
    b = chain.shape[0]
    moved = torch.where(chain[:, K:] >= K, chain[:, K:] + S, chain[:, K:])  # a proposal slot after its block's
    return torch.cat([chain[:, :K], (depths - 1).expand(b, S), moved], 1)


def move_slots(cache, source: torch.Tensor, target: torch.Tensor) -> None:
    """Copy cache slot source[i] to slot target[i] of batch row i, in every layer (keys, values, and the keys a
    layer keeps transposed); the decode step puts an accepted sibling where its position's token belongs."""
    for layer in cache.layers:
        for name, dim in (("keys", 2), ("values", 2), ("_room_keys_t", 3)):
            x = getattr(layer, name, None)
            if x is None or x.dim() != 4:
                continue
            shape = list(x.shape)
            shape[dim] = 1
            src = source.view(-1, 1, 1, 1).expand(shape)
            dst = target.view(-1, 1, 1, 1).expand(shape)
            x.scatter_(dim, dst, x.gather(dim, src))


def new_cache(model):
    """A DynamicCache whose layers hold the conv, delayed-value or recurrent state when the model has mixers."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config) if has_mixers(model) else DynamicCache()


def crop(cache, tokens: int) -> None:
    """Drop the last `tokens` keys/values of every layer; a mixer's state is set by `commit`, never cropped."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

    if tokens <= 0:
        return
    if not any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers):
        cache.crop(-tokens)
        return
    for layer in cache.layers:
        if isinstance(layer, DynamicLayer):  # a conv-only layer (LFM2's) has no keys
            DynamicLayer.crop(layer, -tokens)


def select_rows(cache, keep: torch.Tensor) -> None:
    """Keep batch rows `keep` of the keys/values and of every conv / recurrent state."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    for layer in cache.layers:
        if hasattr(layer, "batch_select_indices"):  # keys and values (a conv-only layer has none)
            layer.batch_select_indices(keep)
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for i in range(layer.number_of_states):
                if layer.is_conv_states_initialized[i]:
                    layer.conv_states[i] = layer.conv_states[i][keep]
                if layer.is_recurrent_states_initialized[i]:
                    layer.recurrent_states[i] = layer.recurrent_states[i][keep]

