"""Attention for ar2dlm's masked multi-row forwards: grouped-query attention without copying K/V per head.

With a mask and more than one query row, transformers' sdpa path copies the
cached keys and values to every query head (`repeat_kv`) in every layer and
step: with a 3,000-token cache that copy is a large share of a decode step.
Every ar2dlm mask is shared by all heads ([b, 1, q, k]), so the n_rep query
heads that read one KV head can instead be stacked as n_rep * q rows of that
KV head, each with its row's mask:

    query [b, H, q, d] -> [b, H_kv, n_rep * q, d]      (row rep * q + i = head h_kv * n_rep + rep, query i)
    mask  [b, 1, q, k] -> [b, 1, n_rep * q, k]         (the same q rows, n_rep times)

one SDPA call over the cache as stored. Each output row is the same softmax
over the same keys as before (transformers does this for one query row,
`pack_gqa`); anything else (no mask, one row, no GQA, a per-head mask or a
position bias) goes to transformers' own sdpa function.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "ar2dlm_sdpa"


def sdpa_packed_gqa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, H, q, d], key/value [b, H_kv, k, d], attention_mask [b, 1, q, k] -> ([b, q, H, d], None)."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    b, H, q, d = query.shape
    if (n_rep == 1 or q == 1 or attention_mask is None or attention_mask.shape[1] != 1 or kwargs.get("softcap")
            or kwargs.get("position_bias") is not None or key.shape[1] * n_rep != H):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    packed = query.reshape(b, H // n_rep, n_rep * q, d)
    packed_masks = getattr(module, "packed_masks", None)  # the model's (install); absent: pack per layer
    mask = (packed_masks.get(attention_mask, b, q, n_rep) if packed_masks is not None
            else _packed_mask(attention_mask, b, q, n_rep))
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(b, H, q, value.shape[-1]).transpose(1, 2).contiguous(), None


class PackedMasks:
    """The packed masks of one model's forward in progress: built by the first layer that reads a mask, reused by
    the others.

    Owned by the DiffusionLM; each attention module that packs rows holds it
    (`install`). Every layer of one kind gets the same mask object in one
    forward (the ready 4D mask transformers passes on; one per layer kind
    when sliding and full layers mix), so the mask object is the key; outside
    `one_forward()` nothing is kept.
    """

    def __init__(self):
        self._packed: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}  # id -> (mask, n_rep -> packed)
        self._active = False

    @contextlib.contextmanager
    def one_forward(self):
        previous = self._active, self._packed
        self._active, self._packed = True, {}
        try:
            yield
        finally:
            self._active, self._packed = previous

    def get(self, mask: torch.Tensor, b: int, q: int, n_rep: int) -> torch.Tensor:
        kept = self._packed.get(id(mask)) if self._active else None
        if kept is not None and kept[0] is mask and n_rep in kept[1]:
            return kept[1][n_rep]
        packed = _packed_mask(mask, b, q, n_rep)
        if self._active:
            if kept is None or kept[0] is not mask:
                kept = self._packed[id(mask)] = (mask, {})  # the mask kept alive: its id is not reused
            kept[1][n_rep] = packed
        return packed


def _packed_mask(mask: torch.Tensor, b: int, q: int, n_rep: int) -> torch.Tensor:
    """[b, 1, q, k] -> [b, 1, n_rep * q, k] (the same q rows, n_rep times)."""
    return mask.expand(b, 1, q, mask.shape[-1]).repeat(1, 1, n_rep, 1)


AttentionInterface.register(NAME, sdpa_packed_gqa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # HF generate on the same model builds its masks as for sdpa


def install(model, packed_masks: PackedMasks) -> bool:
    """Use `sdpa_packed_gqa` for a model that runs transformers' sdpa, its attention modules sharing
    `packed_masks`; returns whether it was switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    for module in model.modules():
        if hasattr(module, "num_key_value_groups"):
            module.packed_masks = packed_masks
    model.set_attn_implementation(NAME)
    return True
