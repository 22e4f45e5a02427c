"""HF causal LM -> converted checkpoint: a mask token, and `ar2dlm.json`.

The output is an ordinary HF directory: `AutoModelForCausalLM.from_pretrained`
still loads it as the same AR model (one extra vocabulary row, the mask token,
whose embedding is the mean of the existing rows so it starts "in
distribution"). Nothing else in the weights changes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from ..core import files
from ..core.errors import ConfigError
from . import checkpoint
from .bundled import resolve_base
from .settings import ConvertConfig, DiffusionConfig


def load_base(base: str | Path, dtype="auto", settings: DiffusionConfig | None = None):
    """(model, tokenizer) of a local HF causal-LM directory or a bundled name; errors say which file.

    The architecture (and that the context holds the blocks of `settings`, the
    conversion's) is checked from config.json before any weight loads.
    """
    path = resolve_base(str(base))
    config = checkpoint.check_architecture(path, settings)
    model = checkpoint.load_weights(path, config, dtype=dtype)
    if not is_causal(model):
        raise ConfigError(f"{path} ({model.config.model_type}) is not a causal LM: its early logits depend on later "
                          f"tokens (bidirectional attention); ar2dlm converts decoder-only causal LMs")
    return model, checkpoint.load_tokenizer(path)


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

    reuse=True takes an existing reserved token of that text instead: one the
    tokenizer marks special (checked with the tokenizer, not a list), so text
    never tokenizes to it.
    The mask token must be a token of its own: never the text of an ordinary
    word or whitespace (adding it would change how text is tokenized, so even
    AR output would differ) and never a token the model emits or reads with a
    meaning (EOS, BOS, UNK, padding): its logit is excluded from every
    distribution, so decoding could never stop or would lose a token.
    """
    if not isinstance(mask_token, str) or not mask_token or mask_token != mask_token.strip() or \
            any(c.isspace() for c in mask_token):
        raise ConfigError(f"mask_token must be a non-empty text without whitespace (such as <|mask|>), got "
                          f"{mask_token!r}", field="mask_token")
    vocab = tokenizer.get_vocab()
    exists = mask_token in vocab
    if reuse:
        if not exists:
            raise ConfigError(f"reuse_token=True: {mask_token!r} is not in the vocabulary; name a reserved token "
                              f"that exists, or drop reuse_token=True to add a new one", field="mask_token")
        mask_id = int(vocab[mask_token])
        roles = _special_roles(model, tokenizer)
        if mask_id in roles:
            raise ConfigError(f"reuse_token=True: {mask_token!r} (id {mask_id}) is the model's {roles[mask_id]} "
                              f"token; the mask token must be an unused reserved token (its logit is never emitted)",
                              field="mask_token")
        if not _reserved(tokenizer, mask_id):
            raise ConfigError(f"reuse_token=True: {mask_token!r} (id {mask_id}) is a token of ordinary text, so every "
                              f"{mask_token!r} in a prompt would become a draft slot; name a reserved special token "
                              f"the tokenizer never produces from text (such as <|reserved_special_token_0|>), or "
                              f"drop reuse_token=True to add a new one", field="mask_token")
        if mask_id >= model.get_input_embeddings().weight.shape[0]:
            raise ConfigError(f"reuse_token=True: {mask_token!r} (id {mask_id}) has no embedding row in the model",
                              field="mask_token")
        return mask_id
    if exists:
        raise ConfigError(f"mask token {mask_token!r} collides with existing token id {vocab[mask_token]}; choose "
                          f"another mask_token, or pass reuse_token=True if that token is an unused reserved one",
                          field="mask_token")
    probe = "Hello world, 1 2 3: the mask token must not change this."
    before = tokenizer(probe, add_special_tokens=False)["input_ids"]
    n_before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [mask_token]}, replace_extra_special_tokens=False)
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    if len(tokenizer) != n_before + 1 or mask_id is None or mask_id < n_before or \
            tokenizer(probe, add_special_tokens=False)["input_ids"] != before:
        raise ConfigError(f"mask token {mask_token!r} is not a new, distinct token for this tokenizer (it changes "
                          f"how text is tokenized); choose another mask_token, such as <|mask|>", field="mask_token")
    embed = model.get_input_embeddings()
    if mask_id >= embed.weight.shape[0]:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    with torch.no_grad():
        for layer in _vocab_matrices(model):
            layer.weight[mask_id] = layer.weight[:mask_id].float().mean(0).to(layer.weight.dtype)
    return mask_id


def _reserved(tokenizer, token_id: int) -> bool:
    """The tokenizer's own word: a special token (an added one marked special, or one of its named special tokens),
    which decoding text skips, so it has no text use."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return bool(getattr(added, "special", False)) or token_id in set(getattr(tokenizer, "all_special_ids", ()))


def _special_roles(model, tokenizer) -> dict[int, str]:
    """{token id: role} of the tokens with a meaning: EOS / BOS / UNK / padding of tokenizer and model."""
    roles = {}
    for role in ("eos", "bos", "unk", "pad"):
        for source in (tokenizer, model.config, getattr(model, "generation_config", None)):
            ids = getattr(source, f"{role}_token_id", None) if source is not None else None
            for i in ([ids] if isinstance(ids, int) else list(ids or [])):
                roles.setdefault(int(i), {"eos": "end-of-sequence (EOS)", "bos": "beginning-of-sequence (BOS)",
                                          "unk": "unknown (UNK)", "pad": "padding"}[role])
    return roles


def _vocab_matrices(model):
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embed.weight:
        return [embed]
    return [embed, head]


def convert(base: str | Path, out: str | Path, block_size: int = ConvertConfig.block_size,
            mask_token: str = ConvertConfig.mask_token, reuse_token: bool = ConvertConfig.reuse_token,
            force: bool = False, **settings) -> Path:
    """Convert BASE (HF dir or bundled name) into OUT; returns OUT.

    The keywords are `ConvertConfig`'s fields (masking, loss_weight, ...); any other `DiffusionConfig`
    setting (e.g. half_life_ratio, draft_len) is written into ar2dlm.json as given. OUT must not exist or
    be empty (force=True replaces it). Writes into a temporary sibling first and renames, so an interrupted
    conversion never leaves a half-written OUT.
    """
    files.check_path(base, "base")
    files.check_path(out, "out")
    names = {f.name for f in dataclasses.fields(ConvertConfig)}
    unknown = sorted(set(settings) - names - {f.name for f in dataclasses.fields(DiffusionConfig)})
    if unknown:
        raise ConfigError(f"convert() got an unknown keyword argument {unknown[0]!r}: it takes ConvertConfig's and "
                          f"DiffusionConfig's fields (block_size, mask_token, masking, loss_weight, ...)",
                          field=unknown[0])
    options = ConvertConfig(block_size=block_size, mask_token=mask_token, reuse_token=reuse_token,
                            **{k: v for k, v in settings.items() if k in names})
    settings = {k: v for k, v in settings.items() if k not in names}
    options.diffusion(**settings)  # bad settings fail before anything is read
    files.check_output_dir(out, force)
    source = resolve_base(str(base))
    out = files.check_output_dir(out, force, inputs=[source])
    # blocks longer than the context fail before the weights load
    model, tokenizer = load_base(source, settings=options.diffusion(**settings))
    mask_id = add_mask_token(model, tokenizer, options.mask_token, options.reuse_token)
    diffusion = options.diffusion(mask_token_id=mask_id, base_model=checkpoint.base_model_name(base), **settings)
    with files.output_dir(out, force, inputs=[source]) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        diffusion.save(tmp)
    print(f"converted {base} -> {out} (mask token {options.mask_token!r} = id {mask_id}, block size "
          f"{options.block_size})", file=sys.stderr)
    return out
