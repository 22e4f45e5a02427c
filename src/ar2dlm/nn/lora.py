"""The adapter's layers, each with one forward and, beside it, peft's own forward as its reference.

peft's LoRA Linear computes y = W x + s B A dropout(x). The drafting adapter
puts a `RowGate` where the dropout goes (gate.py), so its definition is

    y = W x + [row is a slot] * s * B A x                x [b, q, d] -> y [b, q, out]

and clean rows run the untouched base weights. `AdapterLinear` is that peft
layer, re-typed in place: the same object with the same parameters and
state-dict keys, so peft's saving, merging, `disable_adapter()` and training
see the LoraLinear they made. Only its forward is ours, and it picks one of:

1. the fused path: this layer's columns of one stacked matmul shared with its
   sibling linears (kernels.FusedGroup), in inference when the model's
   fused groups are on and the slot rows are a suffix;
2. the gated path: the definition in three ops (the base matmul, h = A x
   with the 0/1 row gate folded into h, one addmm with B), under autograd
   (training) and for any other row layout;
3. peft's own forward (`reference`): ungated or non-plain adapters.

`reference` is kept for the tests, which hold paths 1 and 2 to it.
`TokenRows` is peft's trainable-token layer (the mask-token row) the same way.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn

from .gate import RowGate, SlotGate


class AdapterLinear(LoraLinear):
    """A peft LoRA Linear whose forward is the gated (drafting) or plain LoRA, fused with its siblings when
    the model's fused groups run."""

    slot_gate: SlotGate | None = None  # the model's SlotGate when the update is gated (drafting), else None
    fused = None  # (kernels.FusedGroup, index in it) once DiffusionLM.fuse() grouped this layer

    @classmethod
    def adopt(cls, module: LoraLinear, slot_gate: SlotGate | None = None) -> "AdapterLinear":
        """Re-type a peft LoraLinear in place (a new module would change the keys peft saves and finds)."""
        if not isinstance(module, cls):
            module.__class__ = cls
        if slot_gate is not None:
            for name in list(module.lora_dropout.keys()):
                module.lora_dropout[name] = RowGate(slot_gate)  # the definition, for `reference`
            module.slot_gate = slot_gate
        return module

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.fused is not None and not args and not kwargs:
            group, index = self.fused
            if group.usable(x):
                return group.output(index, x)
        if self.slot_gate is None or self.lora_variant or self.base_layer.bias is not None:
            return self.reference(x, *args, **kwargs)
        return self.gated(x, *args, **kwargs)

    def reference(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """peft's own forward: with the RowGate in the dropout slot, the definition of the gated LoRA."""
        return LoraLinear.forward(self, x, *args, **kwargs)

    def gated(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """y = W x + s B (gate * (A x)): the gate is a [rows, 1] 0/1 column (cast once per forward on the
        SlotGate); multiplying A x by it equals multiplying x by it, as RowGate does."""
        if self.disable_adapters or self.merged:
            return self.reference(x, *args, **kwargs)
        gate = self.slot_gate.column(x)
        result = self.base_layer(x, *args, **kwargs)
        if gate is None:  # no slot rows in this forward
            return result
        flat = x.reshape(-1, x.shape[-1])  # [rows, d]
        out = result.reshape(-1, result.shape[-1])  # [rows, out]
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            A, B = self.lora_A[name].weight, self.lora_B[name].weight  # [r, d], [out, r]
            h = torch.nn.functional.linear(flat.to(A.dtype), A) * gate.to(A.dtype)  # [rows, r]
            out = torch.addmm(out, h.to(out.dtype), B.t().to(out.dtype), alpha=self.scaling[name])
        return out.view_as(result)


class TokenRows(TrainableTokensLayer):
    """peft's trainable-token layer (the mask-token row) without its per-forward copy of the whole vocabulary.

    peft builds W' = W with the trained rows replaced (a full [vocab, d] copy,
    twice per forward with tied embeddings: ~50 ms on a CPU for SmolLM2) and
    runs the layer with W'. The same result: run the base layer, then replace
    what the trained rows produce: the embedding of those token ids, or the
    logit columns of those tokens (a tied LM head).
    """

    @classmethod
    def adopt(cls, module: TrainableTokensLayer) -> "TokenRows":
        """Re-type a peft TrainableTokensLayer in place (same object, same keys)."""
        module.__class__ = cls
        return module

    def reference(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return TrainableTokensLayer.forward(self, x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.patches():
            return self.reference(x, *args, **kwargs)
        return self.patch(x, self.base_layer(x, *args, **kwargs))

    def patches(self) -> bool:
        """Whether `patch` gives this layer's output (else only peft's own forward does)."""
        return (not self.disable_adapters and not self.merged and isinstance(self.base_layer, (nn.Embedding, nn.Linear))
                and any(a in self.trainable_tokens_delta for a in self.active_adapters))

    def patch(self, x: torch.Tensor, out: torch.Tensor, linear=torch.nn.functional.linear) -> torch.Tensor:
        """The base layer's output `out` for x with the trained rows' part replaced (`linear`: the product
        for a tied head's columns)."""
        base = self.base_layer
        for name in [a for a in self.active_adapters if a in self.trainable_tokens_delta]:
            index = torch.tensor(self.token_indices[name], device=out.device)  # [n]
            delta = self.trainable_tokens_delta[name]  # [n, d]
            if isinstance(base, nn.Embedding):
                hit = x[..., None] == index  # [..., n]
                if bool(hit.any()):
                    rows = torch.nn.functional.embedding(hit.float().argmax(-1), delta.to(out.dtype))
                    scale = self._get_embed_scale()
                    if scale is not None:
                        rows = rows * scale.to(rows.dtype)
                    out = torch.where(hit.any(-1, keepdim=True), rows, out)
            else:  # a tied LM head: the trained rows are output columns
                out = out.index_copy_(-1, index, linear(x, delta.to(x.dtype)))
        return out
