"""The drafting adapter: LoRA (peft) whose update reaches mask-slot rows only.

peft's LoRA adds `lora_B(lora_A(dropout(x))) * scale` to each adapted linear.
We put a `RowGate` where the dropout goes: it multiplies x by "is this row a
mask slot" (read from the model's `SlotGate` during each forward), so

    y = W x + [row is a slot] * scale * B A x.

Clean rows (prompt, committed tokens, drafts being verified) therefore run the
untouched base weights: AR logits and the KV cache are the base model's, and
greedy output equals the original model's. Outside a DiffusionLM forward (no
slot rows known) the adapter is off. Ungated LoRA ("lora") and full
fine-tuning ("full") adapt every row and train with the AR + diffusion loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterSection, ConfigError


class RowGate(nn.Module):
    """x * [row is a mask slot]: x [b, q, d] -> [b, q, d] (zeros when no slot rows are known)."""

    def __init__(self, slot_gate):
        super().__init__()
        self.slot_gate = slot_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.slot_gate.mask_slots
        if rows is None or rows.numel() != x.shape[:-1].numel():
            return torch.zeros_like(x)
        return x * rows.reshape(*x.shape[:-1], 1).to(x.dtype)  # also [b*q, d] inputs (MoE routers)


def lora_config(section: AdapterSection, mask_token_id: int, embed_name: str):
    from peft import LoraConfig

    targets = "all-linear" if tuple(section.targets) == ("all-linear",) else list(section.targets)
    return LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=targets, bias="none",
                      trainable_token_indices={embed_name: [mask_token_id]} if section.mask_row else None)


def embedding_name(model) -> str:
    embed = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embed:
            return name.split(".")[-1]
    raise ConfigError("could not find the input embedding module")


def attach(lm, section: AdapterSection) -> None:
    """Make `lm` trainable as `section.kind` says (wraps lm.model in peft for the LoRA kinds)."""
    from peft import get_peft_model

    if section.kind == "full":
        for p in lm.model.parameters():
            p.requires_grad_(True)
        return
    cfg = lora_config(section, lm.mask_token_id, embedding_name(lm.model))
    lm.model = get_peft_model(lm.model, cfg)
    if section.kind == "drafting":
        install_gates(lm)
    lm.settings = _with_adapter(lm.settings, section.kind)


def install_gates(lm) -> int:
    """Replace every LoRA dropout by a RowGate bound to lm.slot_gate; returns how many."""
    n = 0
    for module in lm.model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict):
            for name in list(drop.keys()):
                drop[name] = RowGate(lm.slot_gate)
                n += 1
    if n == 0:
        raise ConfigError("no LoRA layers found to gate")
    return n


def load(lm, adapter_dir) -> None:
    """Load a saved adapter (folder with adapter_config.json) onto lm (a converted base)."""
    from peft import PeftModel

    lm.model = PeftModel.from_pretrained(lm.model, str(adapter_dir)).eval()
    if lm.settings.adapter == "drafting":
        install_gates(lm)


def _with_adapter(settings, kind):
    import dataclasses

    return dataclasses.replace(settings, adapter=kind if kind in ("drafting", "lora") else "")


def trainable_groups(model, section: AdapterSection, lr: float, mask_row_lr: float) -> list[dict]:
    """AdamW parameter groups: the mask-token row (its own lr) and everything else trainable."""
    row, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (row if "trainable_tokens_delta" in name else rest).append(p)
    groups = [{"params": rest, "lr": lr, "name": "adapter" if section.kind != "full" else "weights"}]
    if row:
        groups.append({"params": row, "lr": mask_row_lr, "name": "mask_row", "weight_decay": 0.0})
    return groups
