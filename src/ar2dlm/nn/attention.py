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
    mask = _packed_mask(attention_mask, b, q, n_rep)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(b, H, q, value.shape[-1]).transpose(1, 2).contiguous(), None


_forward_masks: dict | None = None  # id(mask) -> (mask, packed) while one DiffusionLM forward runs


@contextlib.contextmanager
def one_forward():
    """Inside: every layer gets the same mask object, so its packed form is built once (DiffusionLM.forward)."""
    global _forward_masks
    previous, _forward_masks = _forward_masks, {}
    try:
        yield
    finally:
        _forward_masks = previous


def _packed_mask(mask: torch.Tensor, b: int, q: int, n_rep: int) -> torch.Tensor:
    """[b, 1, q, k] -> [b, 1, n_rep * q, k] (the same q rows, n_rep times)."""
    key = (id(mask), n_rep)
    if _forward_masks is not None and key in _forward_masks and _forward_masks[key][0] is mask:
        return _forward_masks[key][1]
    packed = mask.expand(b, 1, q, mask.shape[-1]).repeat(1, 1, n_rep, 1)
    if _forward_masks is not None:
        _forward_masks[key] = (mask, packed)
    return packed


AttentionInterface.register(NAME, sdpa_packed_gqa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # HF generate on the same model builds its masks as for sdpa


def install(model) -> bool:
    """Use `sdpa_packed_gqa` for a model that runs transformers' sdpa; returns whether it was switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
