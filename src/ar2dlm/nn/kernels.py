"""Fused inference projections: one matmul for the linears of a layer that read the same input.

A decode forward runs every linear of the model on a handful of rows (1 for
an AR step, K + |R| K for an ar2dlm step), so a linear costs its weight bytes
plus a fixed dispatch cost. With the drafting adapter each linear also runs
its LoRA (h = A x, the row gate, B h): about 28 small ops per Llama layer,
and their dispatch, not their bytes, is most of the adapter's price on a CPU.
Here the linears of a layer that read one tensor (q/k/v; gate/up; any other
adapted linear alone) and the LoRA A of each are stacked into one weight

    Y = x [W_q; W_k; W_v; A_q; A_k; A_v]^T            [rows, out_q + out_k + out_v + 3r]
    q = Y[:, :out_q] ;  q[slots] += s_q  Y[slots, h_q] B_q^T       (likewise k, v)

so a layer runs 4 matmuls plus one small addmm per adapted linear, on the
slot rows only (the rows from `slot_start` on, which is how every ar2dlm
layout orders them). The base weights and the A matrices become views into
the stacked buffer: no second copy of the model. With the adapter off (AR
decoding, `base_weights()`), the same buffer's first rows give
[W_q; W_k; W_v] for one base matmul.

Every output element is the same dot product as in the plain path; only the
matmul's blocking can differ, so results agree to float rounding (the tests
hold decoding with it to HF `generate` without it). Inference only (no_grad /
inference_mode): under autograd, with other adapters, LoRA variants or dropout, or when the weights
were replaced after fusing, a layer runs its plain forward.

The members are the model's own modules, re-typed in place so their forward
is the one that runs: a LoRA linear becomes `lora.AdapterLinear`, a bare
linear `FusedLinear`; each keeps its parameters and state-dict keys. The
groups of one model share a `Switch` owned by its DiffusionLM: off under
`DiffusionLM.plain()` or with `AR2DLM_KERNELS=stock` in the environment at load.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ..core.errors import ConfigError
from . import invariant, native
from .gate import RowGate, SlotGate
from .lora import AdapterLinear

# children of one parent that read the same input tensor (Llama, Qwen, Mistral, Gemma, ... naming)
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
ENV = "AR2DLM_KERNELS"  # "stock": load with the fused groups off


class Switch:
    """Whether one model's fused groups run (shared by its groups, owned by its DiffusionLM)."""

    def __init__(self, on: bool = True):
        self.on = on

    @classmethod
    def from_env(cls) -> "Switch":
        """From $AR2DLM_KERNELS: fused (the default, also when unset or empty) or stock; anything else is refused."""
        value = os.environ.get(ENV, "").strip()
        if value not in ("", "fused", "stock"):
            raise ConfigError(f"environment variable {ENV}={value!r} is not a known setting: set it to fused (the "
                              f"default) or stock (the plain forwards), or unset it", field=ENV)
        return cls(value != "stock")

    @contextlib.contextmanager
    def off(self):
        """Run the plain forwards inside (the reference the fused path is held to)."""
        previous, self.on = self.on, False
        try:
            yield
        finally:
            self.on = previous


class FusedLinear(nn.Linear):
    """A bare linear of a fused group: its columns of the group's stacked matmul, else nn.Linear's forward."""

    fused = None  # (FusedGroup, index in it)

    @classmethod
    def adopt(cls, module: nn.Linear) -> "FusedLinear":
        """Re-type an nn.Linear in place (same parameters, same keys)."""
        module.__class__ = cls
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused[0].usable(x):
            return self.fused[0].output(self.fused[1], x)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self, x)


def packs(weight: torch.Tensor) -> bool:
    """Whether `weight` can be held prepacked: bf16 on a CPU, for ar2dlm's own linear (nn/csrc/linear.cpp) where it
    is built, else for oneDNN where it packs and multiplies bf16."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and (native.available() or _onednn_packs_bf16()))


@functools.cache
def _onednn_packs_bf16() -> bool:
    """Whether oneDNN here packs a bf16 weight and multiplies with it: tried once per process on a small weight,
    since what it will do follows the CPU and the ISA cap a user may set (ONEDNN_MAX_CPU_ISA), which flags alone
    do not tell (a cap below AVX512 made packing raise at load)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 32, dtype=torch.bfloat16), None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(invariant.ROW_TILE, 32, dtype=torch.bfloat16), weight,
                                                 None, "none", [], "")
    except RuntimeError:
        return False
    return bool((out == 32).all())


class Packed:
    """A linear's weight prepacked for a bf16 CPU product: a separate copy, for inference.

    Where ar2dlm's kernels are built, the weight is packed for its own linear (nn/csrc/linear.cpp): each output
    is a fixed sequence of bf16 pair-dots over k, whatever the row count, so a call of any rows gives each row the
    bits of the row alone, and a one-row call (an AR step) reads the weight once instead of computing 16 rows.
    Elsewhere it is held in oneDNN's blocked layout, and every call has exactly `invariant.ROW_TILE` rows (zeros
    pad the last tile): oneDNN picks its kernel by the row count, and with small inner dimensions a 1-row and a
    16-row call sum differently. `current` tells when the source weight was replaced or changed in place since
    packing (training, `.to()`): the caller then runs F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.source, self.version = weight, weight._version
        self.own = native.available()
        w = weight.detach().contiguous()
        self.weight = native.pack(w) if self.own else torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.bias = None if bias is None else bias.detach().contiguous()
        self.out_features = weight.shape[0]
        self._zeros: torch.Tensor | None = None  # the padding rows of a short tile (oneDNN)

    def current(self, weight: torch.Tensor) -> bool:
        return weight is self.source and weight._version == self.version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.own:
            out = native.linear(rows if rows.stride(-1) == 1 else rows.contiguous(), self.weight, self.bias,
                                self.out_features)
            return out.reshape(*x.shape[:-1], self.out_features)
        M, tile = rows.shape[0], invariant.ROW_TILE
        if M % tile:
            if self._zeros is None or self._zeros.dtype != rows.dtype:
                self._zeros = rows.new_zeros(tile, rows.shape[1])
            rows = torch.cat([rows, self._zeros[:tile - M % tile]])
        linear = torch.ops.mkldnn._linear_pointwise
        if rows.shape[0] == tile:
            out = linear(rows, self.weight, self.bias, "none", [], "")
        else:
            out = torch.cat([linear(rows[i:i + tile], self.weight, self.bias, "none", [], "")
                             for i in range(0, rows.shape[0], tile)])
        return out[:M].reshape(*x.shape[:-1], self.out_features)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed | None,
            tiled: bool) -> torch.Tensor:
    """x W^T + b: prepacked when `packed` is current, else in row tiles (batch-invariant) or as one F.linear."""
    if packed is not None and packed.current(weight):
        return packed(x)
    return invariant.linear(x, weight, bias) if tiled else F.linear(x, weight, bias)


class _Member:
    """One linear of a group: where its output and its h = A x sit in the stacked output."""

    def __init__(self, module: nn.Module, base: nn.Linear, lora: tuple | None, out: slice, h: slice | None):
        self.module, self.base, self.out, self.h = module, base, out, h
        self.lora = lora  # (B [out, r], scale, gated) or None


class FusedGroup:
    """Linears reading one input: stacked weight [W_1; ..; W_n; A_1; ..; A_n] and their outputs for that input."""

    def __init__(self, members: list[tuple[nn.Module, nn.Linear, tuple | None]], slot_gate: SlotGate,
                 switch: Switch):
        self.slot_gate, self.switch = slot_gate, switch
        bases = [b for _, b, _ in members]
        As = [m.lora_A["default"].weight for m, _, l in members if l is not None]
        weight = torch.cat([b.weight.detach() for b in bases] + [a.detach() for a in As])
        has_bias = any(b.bias is not None for b in bases)
        self.members: list[_Member] = []
        o = 0
        for m, b, _ in members:
            self.members.append(_Member(m, b, None, slice(o, o + b.out_features), None))
            o += b.out_features
        self.n_base = o
        for member, (m, _, lora) in zip(self.members, members):
            if lora is not None:
                r = lora[0].shape[1]
                member.lora, member.h = lora, slice(o, o + r)
                o += r
        # the modules' weights become views of the stacked buffer: one copy of the model
        for member in self.members:
            member.base.weight.data = weight[member.out]
            if member.h is not None:
                member.module.lora_A["default"].weight.data = weight[member.h]
        self.weight = weight
        self.bias = None
        if has_bias:
            self.bias = torch.zeros(o, dtype=weight.dtype, device=weight.device)
            for member in self.members:
                if member.base.bias is not None:
                    self.bias[member.out] = member.base.bias.detach()
                    member.base.bias.data = self.bias[member.out]
        self._ptr = weight.data_ptr()
        self._adapted = [m.module for m in self.members if m.lora is not None]
        self.packed: dict[int, Packed] = {}  # columns -> prepacked weight[:columns] (`pack`)
        self.updates: Packed | None = None  # every member's scaled LoRA B, block-diagonal, prepacked (`pack`)
        self.update_ranges: torch.Tensor | None = None  # [blocks, 2]: the k-pairs of h each 16 outputs read
        self._update_versions: list[int] = []
        self._input: torch.Tensor | None = None
        self._outputs: dict[int, torch.Tensor] = {}

    def pack(self) -> bool:
        """Prepack the stacked weight for oneDNN (base columns, and with the LoRA A rows); False where it can't."""
        if not packs(self.weight) or self.bias is not None:
            return False
        views = {self.n_base, self.weight.shape[0]}
        self.packed = {n: Packed(self.weight[:n]) for n in views}
        for p in self.packed.values():
            p.source = self.weight  # a view is a new object each time: check the buffer (views share its version)
        if self.members and all(m.lora is not None for m in self.members):
            # every member's update in one product: [h_1 .. h_n] blockdiag(s_1 B_1, .., s_n B_n)^T
            B = self.weight.new_zeros(self.n_base, self.weight.shape[0] - self.n_base)
            for m in self.members:
                B[m.out, m.h.start - self.n_base:m.h.stop - self.n_base] = m.lora[0].detach() * m.lora[1]
            self.updates = Packed(B)
            self._update_versions = [m.lora[0]._version for m in self.members]
            if self.updates.own:  # ar2dlm's kernel adds the update into the slot rows in one call, block by block
                self.update_ranges = _pair_ranges(self.members, self.n_base)
        return True

    def usable(self, x: torch.Tensor) -> bool:
        if not self.switch.on or torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return False
        if self.members[0].base._parameters["weight"].data_ptr() != self._ptr:  # weights replaced (.to()): plain
            return False
        adapted = self._adapted
        if not adapted or all(m.disable_adapters for m in adapted):
            return True
        if any(m.training or not _plain_lora(m) for m in adapted):
            return False
        # the gated update needs the slot rows as a suffix of each row of x [b, q, d] (or of x [q, d], b = 1)
        return self.slot_gate.slot_start is None or self.slot_gate.suffix_of(x)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for x: computed for the whole group on the first call with this x."""
        if self._input is not x:
            self._input, self._outputs = x, self._compute(x)
        out = self._outputs.pop(index)
        if not self._outputs:
            self._input = None  # every member took its output: hold no activations between forwards
        return out

    def _compute(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        Y = self.stacked(x)
        return {i: Y[..., m.out] for i, m in enumerate(self.members)}

    def stacked(self, x: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """[..., n_base]: every member's output side by side, the LoRA updates of the slot rows added.

        `tiled`: every product in row tiles, so each row's result is the same whatever the rows beside it.
        """
        start = self.slot_gate.slot_start
        # member -> first row its LoRA reaches (None: this forward runs the base weight only)
        starts = {i: (start if m.lora[2] else 0) for i, m in enumerate(self.members)
                  if m.lora is not None and not m.module.disable_adapters}
        starts = {i: s for i, s in starts.items() if s is not None}
        n = self.weight.shape[0] if starts else self.n_base
        packed = self.packed.get(n)
        if packed is not None and packed.current(self.weight):
            Y = packed(x)  # [..., n]
        else:
            Y = (invariant.linear if tiled else F.linear)(x, self.weight[:n], None if self.bias is None else self.bias[:n])
        if tiled and self._one_update(starts):
            Y3 = Y if Y.dim() == 3 else Y[None]
            if self.update_ranges is not None and Y3.stride(1) % 2 == 0:
                # the slot rows' update, h [.., 3r] blockdiag(B)^T added into their outputs in place
                native.linear_add(Y3[:, starts[0]:, self.n_base:], self.updates.weight, self.update_ranges,
                                  Y3[:, starts[0]:, :self.n_base])
                return Y[..., :self.n_base]
            rows = (slice(starts[0], None),) if Y.dim() == 2 else (slice(None), slice(starts[0], None))
            Y[rows][..., :self.n_base] += self.updates(Y[rows][..., self.n_base:])
            return Y[..., :self.n_base]
        for i, m in enumerate(self.members):
            if i in starts:
                B, scale, _ = m.lora
                _add_lora(Y[..., m.out], Y[..., m.h], B, scale, starts[i], tiled)
        return Y[..., :self.n_base]

    def _one_update(self, starts: dict[int, int]) -> bool:
        """Whether the prepacked block-diagonal update serves this call: every member adapted from one row on,
        and no B changed since packing."""
        return (self.updates is not None and len(starts) == len(self.members) and len(set(starts.values())) == 1
                and all(m.lora[0]._version == v for m, v in zip(self.members, self._update_versions)))


def _pair_ranges(members: list, n_base: int) -> torch.Tensor:
    """[ceil(n_base / 16), 2]: for each block of 16 outputs, the k-pairs of the stacked h its members' B read (the
    block-diagonal update's nonzero columns: a block outside every member reads none)."""
    blocks = -(-n_base // 16)
    ranges = torch.zeros(blocks, 2, dtype=torch.long)
    for nb in range(blocks):
        lo, hi = nb * 16, min(n_base, nb * 16 + 16)
        spans = [(m.h.start - n_base, m.h.stop - n_base) for m in members
                 if m.h is not None and m.out.start < hi and m.out.stop > lo]
        if spans:
            ranges[nb, 0] = min(a for a, _ in spans) // 2
            ranges[nb, 1] = -(-max(b for _, b in spans) // 2)
    return ranges


def _add_lora(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: float, start: int,
              tiled: bool = False) -> torch.Tensor:
    """y[..., rows >= start, :] += scale * h B^T on those rows, in place (`tiled`: the product in row tiles).

    y, h: [b, q, out] / [b, q, r] column ranges of the group's own stacked output (or 2D [rows, .]).
    """
    if tiled:
        rows = (slice(start, None),) if y.dim() == 2 else (slice(None), slice(start, None))
        y[rows] += invariant.matmul(h[rows], B.t()) * scale
        return y
    if y.dim() == 2:
        y[start:].addmm_(h[start:], B.t(), alpha=scale)
    else:
        y[:, start:].baddbmm_(h[:, start:], B.t().expand(y.shape[0], -1, -1), alpha=scale)
    return y


def _plain_lora(module) -> bool:
    """The LoRA layer computes exactly W x + s B A x (one adapter, no variant, no dropout in inference)."""
    return (not module.merged and list(module.active_adapters) == ["default"]
            and not getattr(module, "lora_variant", None) and not module.use_dora.get("default", False))


def _lora_of(module):
    """(B, scale, gated) of a peft LoRA Linear with one plain adapter, else None.

    gated: its update reaches the slot rows only (the drafting adapter's RowGate sits where the dropout was).
    """
    if type(module) not in (LoraLinear, AdapterLinear) or list(module.lora_A.keys()) != ["default"]:
        return None
    if not _plain_lora(module):
        return None
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    if A.dtype != module.base_layer.weight.dtype:
        return None
    return B, module.scaling["default"], isinstance(module.lora_dropout["default"], RowGate)


def _base_of(module) -> nn.Linear | None:
    base = getattr(module, "base_layer", module)
    return base if type(base) in (nn.Linear, FusedLinear) else None


def install(model: nn.Module, slot_gate: SlotGate, switch: Switch) -> int:
    """Fuse every group of sibling linears (and each adapted linear alone) of `model`; returns how many groups.

    Fusing again (e.g. after `.double()`) builds new groups over the current weights.
    """
    n = 0
    done: set[int] = set()
    for parent in model.modules():
        children = dict(parent.named_children())
        groups = [[children[name] for name in names] for names in GROUPS if all(nm in children for nm in names)]
        groups += [[c] for c in children.values() if isinstance(c, LoraLinear)]  # any other adapted linear alone
        for group in groups:
            if any(id(c) in done for c in group):
                continue
            members = []
            for c in group:
                base = _base_of(c)
                lora = _lora_of(c) if base is not None and c is not base else None
                if base is None or (c is not base and lora is None):
                    members = []
                    break
                members.append((c, base, lora))
            if not members or (len(members) == 1 and members[0][2] is None):
                continue  # a lone plain linear gains nothing
            if len({(b.weight.dtype, b.weight.device, b.in_features) for _, b, _ in members}) != 1:
                continue
            fused = FusedGroup(members, slot_gate, switch)
            for i, member in enumerate(fused.members):
                module = member.module
                layer = FusedLinear.adopt(module) if module is member.base else AdapterLinear.adopt(module)
                layer.fused = (fused, i)
                done.add(id(module))
            n += 1
    return n
