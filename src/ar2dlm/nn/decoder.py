"""A lean decode forward for Llama-family decoders: the model's own computation, in fewer and cheaper ops.

A bf16 decode step of the bundled model on a CPU spends about 15 ms in its
linears (prepacked) and, through transformers' module tree, about as much
again in Python and small ops (norms, rotary, cache, mask handling). This
forward runs the same definition as the HF Llama / Mistral / Qwen2 forward

    x = embed(ids)
    per layer:  h = rms(x) ; q, k, v = h W_qkv ; rotary(q, k) ; append k, v to the cache
                x += attention(q, K, V, mask) W_o ; h = rms(x) ; x += (act(h W_g) * h W_u) W_d
    logits = rms(x) W_head

over the model's own parameters and cache (a `DynamicCache`, which the
engine crops and reorders as always), with each layer's linears through
their fused group (kernels.FusedGroup: q/k/v in one product, gate/up in
one, each with the drafting adapter's LoRA on the slot rows), prepacked for
oneDNN where it computes bf16 (kernels.Packed).

It is batch-invariant by construction (invariant.py says why each part
must be): every product runs in row tiles of at most `invariant.ROW_TILE`,
and attention is `invariant.attention`, ar2dlm's own kernel
(csrc/attention.cpp), whose every row sums its keys in fixed chunks from key
0 whatever the other rows, the row count and the trailing keys it does not
see, with each batch row's keys moved to the front when a ragged batch left
holes. (A library's flash attention held this on one CPU kind and not on
another: its blocking follows the call's shape and the instruction set.)
Norms, rotary and activations are per row.

`LeanDecoder.build` returns None for any other architecture (extra norms,
biases in norms, scaled embeddings, mixers), which then runs transformers'
forward under `invariant.BatchInvariant`. The plain HF forward is the
reference: tests/test_fast.py holds this one to it, and each row to the
one-row forward, bit for bit.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import invariant
from .kernels import FusedGroup, Packed, Switch, packs, project
from .lora import TokenRows

ARCHITECTURES = ("llama", "mistral", "qwen2")
"""model_type values whose decoder layer is exactly the definition above."""
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_LAYER = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


class _Linear:
    """One linear position of a layer: its fused group's stacked output, or the bare linear (prepacked)."""

    def __init__(self, module: torch.nn.Module, members: tuple[torch.nn.Module, ...] | None = None):
        rows = getattr(module, "token_adapter", None)  # peft's trainable tokens on a tied head (the mask row)
        self.rows: TokenRows | None = None
        if isinstance(rows, TokenRows) and type(rows.base_layer) is torch.nn.Linear:
            self.rows, module = rows, rows.base_layer
        fused = getattr(module, "fused", None)
        self.group: FusedGroup | None = fused[0] if fused is not None else None
        self.module = module
        self.packed: Packed | None = None
        if self.group is not None:
            if [m.module for m in self.group.members] != list(members or (module,)):
                raise ValueError("a fused group does not hold exactly these linears, in this order")
            self.group.pack()
        elif type(module) is torch.nn.Linear and packs(module.weight):
            self.packed = Packed(module.weight, module.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            if self.group.usable(x):
                return self.group.stacked(x, tiled=True)
            return torch.cat([m.module(x) for m in self.group.members], -1)  # each member's plain forward
        if type(self.module) is not torch.nn.Linear:
            return self.module(x)  # an adapted head outside a group: its own (gated) forward
        out = project(x, self.module.weight, self.module.bias, self.packed, tiled=True)
        # the trained rows replace their columns; disabled (base_weights) or merged, the base linear is the layer
        return out if self.rows is None or not self.rows.patches() else self.rows.patch(x, out, invariant.linear)


class LeanDecoder:
    """The lean forward of one model (see the module docstring). Build it with `build`."""

    def __init__(self, model, switch: Switch):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.switch = model, switch
        self.body, config = base.model, base.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dtype = base.dtype
        self.layers = []
        for layer in self.body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm, _Linear(attn.q_proj, (attn.q_proj, attn.k_proj, attn.v_proj)),
                _Linear(attn.o_proj), layer.post_attention_layernorm,
                _Linear(mlp.gate_proj, (mlp.gate_proj, mlp.up_proj)), _Linear(mlp.down_proj), mlp.act_fn,
                attn.scaling, attn.head_dim))
        self.head = _Linear(base.get_output_embeddings())
        self.probe = None  # callable(component, rows [b, q, ...]) while the exactness check runs, else None

    @classmethod
    def build(cls, model, switch: Switch) -> "LeanDecoder | None":
        """The lean forward of `model`, or None when its architecture is not exactly the one this runs."""
        if _unsupported(model):
            return None
        try:
            return cls(model, switch)
        except (ValueError, AttributeError):
            return None

    def usable(self, cache) -> bool:
        """Whether this forward may run now: inference, the fast paths on, a plain DynamicCache (or none)."""
        if torch.is_grad_enabled() or not self.switch.on or self.model.dtype != self.dtype:
            return False
        return cache is None or (type(cache) is DynamicCache and not cache.offloading
                                 and all(type(layer) is DynamicLayer for layer in cache.layers))

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache: DynamicCache | None = None, logits_to_keep: int | torch.Tensor = 0,
                 holes: bool | None = None, compact: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, q', vocab], as the HF forward gives them. mask: bool [b, q, cache + q] (True = attend);
        holes: whether a row's keys have holes, when the caller knows (`invariant.key_order`); compact: bool [q]
        or [b, q], the rows that read their keys in rank order (`invariant.COMPACT`), or None."""
        b, q = input_ids.shape
        x = self.body.embed_tokens(input_ids)
        cos, sin = self.body.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, q, d]
        mask = mask[:, None]  # [b, 1, q, L]: one mask object for every layer (its key order is found once)
        orders: dict = {key: value for key, value in ((invariant.HOLES, holes), (invariant.COMPACT, compact))
                        if value is not None}
        H, Hkv = self.heads, self.kv_heads
        probe = self.probe
        for i, (norm1, qkv, o_proj, norm2, gate_up, down, act, scaling, d) in enumerate(self.layers):
            h = _rms(x, norm1)
            y = qkv(h)
            heads = y.view(b, q, H + 2 * Hkv, d).transpose(1, 2)  # [b, heads, q, d]
            qk = heads[:, :H + Hkv]
            qk = qk * cos + _rotate_half(qk) * sin
            keys, values, keys_t = _append(cache, i, qk[:, H:], heads[:, H + Hkv:])  # [b, Hkv, L, d], [.., d, L]
            out = invariant.attention(qk[:, :H], keys, values, mask, scale=scaling, orders=orders, keys_t=keys_t)
            out = out.transpose(1, 2).reshape(b, q, H * d)
            o = o_proj(out)
            x = x + o
            h2 = _rms(x, norm2)
            gu = gate_up(h2)
            gate, up = gu.split(gu.shape[-1] // 2, -1)
            dn = down(act(gate) * up)
            x = x + dn
            if probe is not None:  # the exactness check (model/exactness.py) reads each part's rows [b, q, ...]
                for component, t in (("norms", h), ("linears", y), ("attention", out), ("linears", o),
                                     ("norms", h2), ("linears", gu), ("linears", dn)):
                    probe(component, t)
        x = _rms(x, self.body.norm)
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep else x
        else:
            x = x[:, logits_to_keep]
        logits = self.head(x)
        if probe is not None:
            probe("norms", x)
            probe("head", logits)
        return logits


def why_not(model) -> str | None:
    """Why the lean forward does not run `model` (None: it does)."""
    return _unsupported(model)


def _unsupported(model) -> str | None:
    """Why the lean forward does not run this model (None: it does)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in ARCHITECTURES:
        return f"model type {config.model_type}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp"
    if _windowed(config):
        return "sliding window"
    body = getattr(base, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "layout"
    if set(dict(body.named_children())) - {"embed_tokens", "layers", "norm", "rotary_emb"}:
        return "extra modules"
    for layer in body.layers:
        if set(dict(layer.named_children())) != _LAYER:
            return "layer modules"
        if set(dict(layer.self_attn.named_children())) != _ATTENTION or set(dict(layer.mlp.named_children())) != _MLP:
            return "attention / mlp modules"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return "norm"
        if not all(getattr(layer.self_attn, name, None) for name in ("scaling", "head_dim")):
            return "attention attributes"
        if getattr(layer.self_attn, "sliding_window", None):
            return "sliding window"
        if not all(getattr(getattr(layer.self_attn, n), "fused", None) for n in ("q_proj", "k_proj", "v_proj")):
            return "q/k/v not fused"
        if not all(getattr(getattr(layer.mlp, n), "fused", None) for n in ("gate_proj", "up_proj")):
            return "gate/up not fused"
    return None


def _windowed(config) -> bool:
    """Whether some layer sees a sliding window shorter than the context (this forward reads one mask in all)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    ctx = getattr(config, "max_position_embeddings", None)
    _, kwargs = get_layer_types_and_kwargs(config)
    return any(kw.get("sliding_window") is not None and (ctx is None or kw["sliding_window"] < ctx) for kw in kwargs)


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' RMSNorm (Llama, Mistral, Qwen2), op for op: in fp32, cast back, then the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _append(cache: DynamicCache | None, i: int, k: torch.Tensor, v: torch.Tensor):
    """Add this step's k, v [b, Hkv, q, d] to layer i of the cache; return its keys, values [b, Hkv, L, d] and the
    keys transposed [b, Hkv, d, L] (None without a cache).

    The layer's keys and values are views into buffers with room to grow (kept on the layer), so a decode
    step writes its q rows in place instead of copying the whole cache: the engine's crops keep the views;
    anything else that replaces them (row selection, compaction) starts a new buffer. Beside the keys the
    layer keeps them transposed (the layout attention reads them in), written as they come.
    """
    b, h, q, d = k.shape
    if cache is None:
        return k, v, None
    while len(cache.layers) <= i:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[i]
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    out, fresh = [], False
    for new, name in ((k, "keys"), (v, "values")):
        old = getattr(layer, name)
        past = old.shape[-2] if old is not None and old.dim() == 4 else 0
        need = past + q
        buffer = getattr(layer, "_room_" + name, None)
        if not (buffer is not None and past and _is_prefix(old, buffer) and need <= buffer.shape[2]):
            buffer = new.new_zeros(b, h, need + _GROWTH, d)
            if past:
                buffer[:, :, :past] = old
            setattr(layer, "_room_" + name, buffer)
            fresh = fresh or name == "keys"
        buffer[:, :, past:past + q] = new
        setattr(layer, name, buffer[:, :, :past + q])
        out.append(buffer[:, :, :need])
    keys = getattr(layer, "_room_keys")
    transposed = getattr(layer, "_room_keys_t", None)
    if fresh or transposed is None or transposed.shape[-1] != keys.shape[2]:
        transposed = keys.transpose(2, 3).contiguous()  # [b, h, d, room]: the whole buffer, once per new buffer
        layer._room_keys_t = transposed
    else:
        transposed[..., need - q:need] = k.transpose(2, 3)
    return out[0], out[1], transposed[..., :need]


_GROWTH = 256
"""Keys of room a layer's buffer gets beyond what a step needs (a new buffer, one copy, every 256 tokens)."""


def _is_prefix(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `view` is buffer[:, :, :n] (the same memory, from its start)."""
    return (view.data_ptr() == buffer.data_ptr() and view.shape[:2] == buffer.shape[:2]
            and view.shape[3] == buffer.shape[3] and view.stride() == buffer.stride())
