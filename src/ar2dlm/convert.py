"""HF causal LM -> converted checkpoint: a mask token, and `ar2dlm.json`.

The output is an ordinary HF directory: `AutoModelForCausalLM.from_pretrained`
still loads it as the same AR model (one extra vocabulary row, the mask token,
whose embedding is the mean of the existing rows so it starts "in
distribution"). Nothing else in the weights changes.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .bundled import resolve_base
from .config import ConfigError, DiffusionConfig


def load_base(base: str | Path, dtype="auto"):
    """(model, tokenizer) of a local HF causal-LM directory or a bundled name; errors say which."""
    path = resolve_base(str(base))
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable config.json ({e})") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError as e:
        raise ConfigError(f"{path} is not a causal-LM checkpoint (model_type {config.model_type!r}): {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot load the weights ({e}); is the checkpoint complete?") from e
    if not is_causal(model):
        raise ConfigError(f"{path} ({config.model_type}) is not a causal LM: its early logits depend on later "
                          f"tokens (bidirectional attention); ar2dlm converts decoder-only causal LMs")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load a tokenizer ({e})") from e
    return model, tokenizer


@torch.no_grad()
def is_causal(model) -> bool:
    """Probe: two inputs that differ only in their last token give the same earlier logits."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 6), generator=g)
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % vocab
    la, lb = model(input_ids=a).logits[0, :-1], model(input_ids=b).logits[0, :-1]
    return torch.allclose(la.float(), lb.float(), rtol=1e-4, atol=1e-4)


def add_mask_token(model, tokenizer, mask_token: str = "<|mask|>", reuse: bool = False) -> int:
    """Add `mask_token` to the tokenizer and give it a mean embedding row; return its id.

    reuse=True takes an existing (reserved, unused) token of that text instead.
    """
    existing = tokenizer.convert_tokens_to_ids(mask_token)
    exists = mask_token in tokenizer.get_vocab()
    if reuse:
        if not exists:
            raise ConfigError(f"--reuse-token: {mask_token!r} is not in the vocabulary; name a reserved token "
                              f"that exists, or drop --reuse-token to add a new one")
        return int(existing)
    if exists:
        raise ConfigError(f"mask token {mask_token!r} collides with existing token id {existing}; choose another "
                          f"--mask-token, or pass --reuse-token if that token is an unused reserved one")
    tokenizer.add_special_tokens({"additional_special_tokens": [mask_token]}, replace_extra_special_tokens=False)
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    embed = model.get_input_embeddings()
    if mask_id >= embed.weight.shape[0]:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    with torch.no_grad():
        for layer in _vocab_matrices(model):
            layer.weight[mask_id] = layer.weight[:mask_id].float().mean(0).to(layer.weight.dtype)
    return mask_id


def _vocab_matrices(model):
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embed.weight:
        return [embed]
    return [embed, head]


def convert(base: str | Path, out: str | Path, block_size: int = 16, mask_token: str = "<|mask|>",
            reuse_token: bool = False, **settings) -> Path:
    """Convert BASE (HF dir or bundled name) into OUT; returns OUT.

    Writes into a temporary sibling first and renames, so an interrupted
    conversion never leaves a half-written OUT.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new output directory")
    model, tokenizer = load_base(base)
    mask_id = add_mask_token(model, tokenizer, mask_token, reuse_token)
    diffusion = DiffusionConfig(block_size=block_size, mask_token_id=mask_id, mask_token=mask_token,
                                base_model=str(base), **settings)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        diffusion.save(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"converted {base} -> {out} (mask token {mask_token!r} = id {mask_id}, block size {block_size})",
          file=sys.stderr)
    return out
