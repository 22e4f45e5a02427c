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

import contextlib
import types
import warnings

import torch
from torch import nn

from ..core.errors import ConfigError
from .settings import AdapterSection
from ..nn.gate import RowGate


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
    with _quiet_peft():
        lm.model = get_peft_model(lm.model, cfg)
    if section.kind == "drafting":
        install_gates(lm)
    install_token_rows(lm)
    lm.settings = _with_adapter(lm.settings, section.kind)


def install_gates(lm) -> int:
    """Gate every LoRA layer on lm.slot_gate; returns how many.

    Each LoRA dropout becomes a RowGate (the definition: peft's own forward
    then computes B A (x * gate)), and each LoRA linear gets `gated_forward`,
    the same function in fewer ops: two small
    matmuls (the scale and the add folded into one addmm) per layer instead of
    peft's generic path.
    """
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in lm.model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict):
            for name in list(drop.keys()):
                drop[name] = RowGate(lm.slot_gate)
                n += 1
            if type(module) is LoraLinear and not module.lora_variant and module.base_layer.bias is None:
                module.forward = types.MethodType(gated_forward, module)
                module._ar2dlm_slot_gate = lm.slot_gate
    if n == 0:
        raise ConfigError("no LoRA layers found to gate")
    return n


def gated_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward with the row gate, in three ops: y = W x + s B (gate * (A x)).

    The gate is a [rows, 1] column of 0/1 (one per forward, cached on the
    SlotGate); multiplying A x by it equals multiplying x by it, as RowGate does.
    """
    if self.disable_adapters or self.merged:
        return self.base_layer(x, *args, **kwargs)
    gate = self._ar2dlm_slot_gate.column(x)
    if gate is None:
        return self.base_layer(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    out = result.reshape(-1, result.shape[-1])
    for name in self.active_adapters:
        if name not in self.lora_A.keys():
            continue
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        h = torch.nn.functional.linear(flat.to(A.dtype), A) * gate.to(A.dtype)
        out = torch.addmm(out, h.to(out.dtype), B.t().to(out.dtype), alpha=self.scaling[name])
    return out.view_as(result)


def load(lm, adapter_dir) -> None:
    """Load a saved adapter (folder with adapter_config.json) onto lm (a converted base)."""
    from peft import PeftModel

    with _quiet_peft():
        lm.model = PeftModel.from_pretrained(lm.model, str(adapter_dir)).eval()
    if lm.settings.adapter == "drafting":
        install_gates(lm)
    install_token_rows(lm)


def install_token_rows(lm) -> int:
    """Give every peft trainable-token layer (the mask row) `token_rows_forward`; returns how many."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    n = 0
    for module in lm.model.modules():
        if type(module) is TrainableTokensLayer:
            module.forward = types.MethodType(token_rows_forward, module)
            n += 1
    return n


def token_rows_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's trainable-token forward without its per-forward copy of the whole vocabulary matrix.

    peft builds W' = W with the trained rows replaced (a full [vocab, d] copy,
    twice per forward with tied embeddings: ~50 ms on a CPU for SmolLM2) and
    runs the layer with W'. The same result: run the base layer, then replace
    what the trained rows produce: the embedding of those token ids, or the
    logit columns of those tokens (a tied LM head).
    """
    active = [a for a in self.active_adapters if a in self.trainable_tokens_delta]
    if self.disable_adapters or not active or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    out = base(x, *args, **kwargs)
    for name in active:
        index = torch.tensor(self.token_indices[name], device=out.device)
        delta = self.trainable_tokens_delta[name]
        if isinstance(base, nn.Embedding):
            hit = x[..., None] == index  # [..., n]
            if bool(hit.any()):
                rows = torch.nn.functional.embedding(hit.float().argmax(-1), delta.to(out.dtype))
                scale = self._get_embed_scale()
                if scale is not None:
                    rows = rows * scale.to(rows.dtype)
                out = torch.where(hit.any(-1, keepdim=True), rows, out)
        elif isinstance(base, nn.Linear):  # a tied LM head: the trained rows are output columns
            out = out.index_copy_(-1, index, torch.nn.functional.linear(x, delta.to(x.dtype)))
        else:
            return type(self).forward(self, x, *args, **kwargs)
    return out


@contextlib.contextmanager
def _quiet_peft():
    """Silence peft's call of a transformers API deprecated in this version (a FutureWarning per attach)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


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
