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

This module applies the LoRA to a model (attach, load, trainable groups);
adapter folders are read, checked and exported by `checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from pathlib import Path

from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ..core.errors import ConfigError
from ..nn.gate import RowGate
from ..nn.lora import AdapterLinear, TokenRows
from . import checkpoint
from .settings import AdapterSection


# peft refuses LoRA on a Mamba mixer's out_proj and conv1d in the model types it knows as Mamba (a fused kernel reads
# their weights directly); the adapter leaves them out there
MAMBA_TYPES = ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")
MAMBA_SKIPPED = ["out_proj", "conv1d"]


def lora_config(section: AdapterSection, mask_token_id: int, embed_name: str, model_type: str | None = None):
    from peft import LoraConfig

    targets = "all-linear" if tuple(section.targets) == ("all-linear",) else list(section.targets)
    return LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=targets, bias="none",
                      exclude_modules=MAMBA_SKIPPED if model_type in MAMBA_TYPES else None,
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
    cfg = lora_config(section, lm.mask_token_id, embedding_name(lm.model), lm.model.config.model_type)
    with _quiet_peft():
        model = get_peft_model(lm.model, cfg)
        if section.kind == "drafting" and any(type(m).__name__ == "ParamWrapper" for m in model.modules()):
            # peft put LoRA on fused parameters (transformers' stacked MoE experts, a router: its MoE conversion of
            # 'all-linear' also takes layers named like experts, e.g. a shared expert's gate_proj): a weight delta
            # reaches every row, so the drafting adapter keeps only the layers it adapts per row
            cfg = lora_config(section, lm.mask_token_id, embedding_name(lm.model), lm.model.config.model_type)
            cfg.target_modules = _per_row_layers(model)
            model = get_peft_model(model.unload(), cfg)
        lm.model = model
    if section.init:
        start_from(lm.model, section.init)
    if section.kind == "drafting":
        install_gates(lm)
    install_token_rows(lm)
    lm.settings = _with_adapter(lm.settings, section.kind)


def _per_row_layers(model) -> list[str]:
    """Names (in the base model) of the modules peft adapted as layers, not through their weights."""
    from peft.tuners.lora import LoraLayer

    return sorted(name.removeprefix("base_model.model.") for name, m in model.named_modules()
                  if isinstance(m, LoraLayer) and type(m).__name__ != "ParamWrapper")


def start_from(model, init: str) -> None:
    """Put the weights of a saved adapter (folder or bundled name, `AdapterSection.init`) into the fresh one of
    `model`; every tensor must match by name and shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .bundled import drafter_asset, is_bundled

    folder = drafter_asset(init) if is_bundled(init) else Path(init)
    path = None if folder is None else folder / "adapter_model.safetensors"
    if path is None or not path.is_file():
        raise ConfigError(f"adapter.init: {init} holds no adapter_model.safetensors (give an exported drafter "
                          f"folder, a run's final/ folder, or a bundled name that ships one)", field="adapter.init")
    fit = "use the rank and targets it was trained with"
    state = model.state_dict()
    own = {k for k in state if "lora_" in k or "trainable_tokens" in k}
    try:
        result = set_peft_model_state_dict(model, load_file(str(path)))
    except (RuntimeError, OSError, ValueError) as e:  # a shape that differs, a file that is not safetensors
        raise ConfigError(f"adapter.init: {path} does not fit this adapter ({checkpoint.first_line(e)}): {fit}",
                          field="adapter.init") from e
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = own & set(getattr(result, "missing_keys", []) or [])
    loaded = {state[k].data_ptr() for k in own - missing}
    missing = {k for k in missing if state[k].data_ptr() not in loaded}  # a tied copy (lm_head = embeddings) is loaded
    if unexpected or missing:
        raise ConfigError(f"adapter.init: {path} does not fit this adapter ({len(unexpected)} tensors it has no "
                          f"place for, {len(missing)} of its own not in the file): {fit}", field="adapter.init")


def install_gates(lm) -> int:
    """Gate every LoRA layer on lm.slot_gate; returns how many.

    Each LoRA dropout becomes a RowGate (the definition: peft's own forward
    then computes B A (x * gate)), and each LoRA linear becomes a
    `lora.AdapterLinear` (same object and keys), whose forward computes the
    same function in fewer ops.
    """
    _GATED.pop(lm.model, None)
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in lm.model.modules():
        drop = getattr(module, "lora_dropout", None)
        if not isinstance(drop, nn.ModuleDict):
            continue
        if type(module) in (LoraLinear, AdapterLinear):
            AdapterLinear.adopt(module, lm.slot_gate)
        else:  # another peft LoRA layer: its own forward, with the gate where the dropout was
            for name in list(drop.keys()):
                drop[name] = RowGate(lm.slot_gate)
        n += len(drop)
    if n == 0:
        raise ConfigError("no LoRA layers found to gate")
    return n


def all_gated(model) -> bool:
    """Whether every LoRA layer of `model` applies its update to slot rows only (a gated AdapterLinear, or a
    RowGate in its dropout slot): then a forward without slot rows computes the base model exactly. Kept per
    model until `install_gates` changes its layers."""
    if model not in _GATED:
        _GATED[model] = all(getattr(m, "slot_gate", None) is not None
                            or (len(m.lora_dropout) > 0 and all(isinstance(d, RowGate) for d in m.lora_dropout.values()))
                            for m in model.modules() if isinstance(m, LoraLinear))
    return _GATED[model]


_GATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load(lm, folder: Path) -> None:
    """Load a saved adapter folder (its files checked by `checkpoint.read_settings`) onto lm, its base with the
    mask token; what peft raises about the folder's files becomes a ConfigError naming them."""
    from peft import PeftModel

    try:
        with _quiet_peft():
            # the adapter in the base's dtype (peft would keep a bf16 model's LoRA in fp32, so every adapted
            # layer would cast, and none could join its fused group)
            model = PeftModel.from_pretrained(lm.model, str(folder), autocast_adapter_dtype=False).eval()
    except checkpoint.LOAD_ERRORS as e:
        raise ConfigError(f"{folder}: cannot apply the adapter in adapter_config.json / adapter_model.safetensors "
                          f"to its base ({checkpoint.first_line(e)})") from e
    lm.model = model
    if lm.settings.adapter == "drafting":
        install_gates(lm)
    install_token_rows(lm)


def install_token_rows(lm) -> int:
    """Make every peft trainable-token layer (the mask row) a `lora.TokenRows`; returns how many."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    n = 0
    for module in lm.model.modules():
        if type(module) in (TrainableTokensLayer, TokenRows):
            TokenRows.adopt(module)
            n += 1
    return n


@contextlib.contextmanager
def _quiet_peft():
    """Silence peft's call of a transformers API deprecated in this version (a FutureWarning per attach)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _with_adapter(settings, kind):
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
