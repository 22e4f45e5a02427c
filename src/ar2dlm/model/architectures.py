"""Which architectures ar2dlm decodes exactly, and a refusal, before anything is written, for the rest.

A decode step feeds rows in ar2dlm's own order (`[d_1..d_K | P_r ...]`) and
then crops the cache back to the accepted prefix. That is exact for layers
whose only memory is a per-token KV cache read through our 4D mask: full
causal attention, and sliding-window attention (each layer kind gets its
window drawn into its own mask, `nn/masks.windowed`, and the cache keeps
every key, so a crop undoes a step). Every other kind of sequence memory
breaks one of the two:

    layer kind (transformers' `layer_types`)  why it is not exact (yet)
    ----------------------------------------  ----------------------------------------------------
    linear_attention  (Mamba/SSM, gated       one recurrent state per sequence: the step's proposal
      DeltaNet, RG-LRU, linear attention)     rows would advance it past tokens that are rejected,
                                              and a state cannot be cropped back to d_r. (The gated
                                              DeltaNet of Qwen3-Next, Qwen3.5 and OLMo hybrid and
                                              Nemotron-H's Mamba-2 are exact: nn/predecessors.py
                                              scans each row's state from its predecessor's and
                                              commits the state after d_r)
    conv, hybrid_sliding                      reads the previous rows of the tensor, not each row's
      (a short convolution not hooked;        logical predecessor; conv state is set after the last
      ZAYA1 CCA + window)                     row fed, not after d_r. (LFM2's 'conv' layers and ZAYA1's
                                              full-attention 'hybrid' layers are exact: nn/predecessors.py
                                              hooks their short convolution / CCA projection)
    chunked_attention (Llama 4)               attention within fixed chunks of positions: a layout
                                              ar2dlm does not draw (no test holds it to HF generate)

Sliding layers also need a forward that takes one mask per layer kind (a
dict keyed by kind, as transformers' hybrid models do) when full and
sliding layers mix; a model whose forward takes one mask for all layers is
exact only when all its attention layers see the same window.

Detection is generic: transformers' own per-layer cache kinds
(`cache_utils.get_layer_types_and_kwargs`, the same function that builds the
model's `DynamicCache`), plus a scan of the model's modules (instantiated on
the meta device, so before any weights load) for convolutions over the
sequence and classes named after state-carrying mixers. An unseen
architecture of a known kind is refused the same way.
"""

from __future__ import annotations

import re

import torch

from ..core.errors import ConfigError
from ..nn.predecessors import MIXERS

# the layer kinds whose only sequence memory is the KV cache; "dummy" = a layer without attention (MLP/MoE only)
EXACT_LAYER_TYPES = ("full_attention", "sliding_attention")
WHY = {
    "linear_attention": "a recurrent state per sequence (Mamba/SSM, gated DeltaNet, linear attention, RG-LRU) in a "
                        "mixer nn/predecessors.py does not scan row by row: a step's proposal rows would advance it "
                        "past rejected tokens, and it cannot be cropped back",
    "conv": "a short convolution over the previous rows of the input (conv state), which in ar2dlm's layouts are "
            "not each row's previous token",
    "hybrid": "attention beside a mixer that reads the previous rows or carries a state (ZAYA1's CCA convolutions "
              "and delayed value, Falcon-H1's parallel Mamba; conv and recurrent state in the cache) that "
              "nn/predecessors.py does not hook",
    "hybrid_sliding": "sliding-window attention whose q/k/v also read the previous rows (ZAYA1 CCA, conv state)",
    "chunked_attention": "chunked attention (attention within fixed chunks of positions), a layout ar2dlm's "
                         "masks do not draw",
    "mixed_windows": "full and sliding-window layers, but a forward that takes one attention mask for all of them "
                     "(not one per layer kind)",
    "bidirectional": "bidirectional attention (use_bidirectional_attention): not a causal LM",
}
# module class names of sequence mixers that carry state beside a KV cache
STATEFUL_MODULE = re.compile(r"Mamba|Mixer|Ssm|SSM|DeltaNet|ShortConv|LinearAttention|Recurrent|Rglru|Lru|Rwkv|"
                             r"RWKV|xLSTM|Lstm|Lightning|CCAProjection")
# wrappers and norms named after their family, not mixers themselves
CONTAINER = re.compile(r"(Model|ForCausalLM|Norm|NormGated|Block|DecoderLayer|Mlp|MLP)$")
TESTED = ("llama", "qwen2", "qwen3", "mistral (with and without sliding_window)", "qwen2_moe", "gpt2",
          "gpt_oss", "gemma3_text", "olmo3", "gemma2", "zaya (ZAYA1 CCA)", "lfm2", "qwen3_next", "qwen3_5_text",
          "qwen3_5_moe_text", "olmo_hybrid", "nemotron_h")
SUPPORTED = ("decoder-only causal LMs whose every layer is full causal or sliding-window attention over a KV cache, "
             "with dense or MoE MLPs, ZAYA1's CCA attention, LFM2's short convolutions, or the recurrent layers of "
             "Qwen3-Next / Qwen3.5 / OLMo hybrid (gated DeltaNet) and Nemotron-H (Mamba-2) (their convolutions and "
             f"states follow each row's predecessors, nn/predecessors.py) (tested: {', '.join(TESTED)})")


def layer_kinds(config) -> list[str]:
    """transformers' per-layer cache kind of each decoder layer ('full_attention', 'linear_attention', ...)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = config.get_text_config(decoder=True)
    kinds, _ = get_layer_types_and_kwargs(config)
    window = getattr(config, "sliding_window", None)
    ctx = getattr(config, "max_position_embeddings", None)
    named = list(getattr(config, "layer_types", None) or [])
    out = []
    for i, kind in enumerate(kinds):
        if kind == "sliding_attention" and window is not None and ctx is not None and window >= ctx:
            kind = "full_attention"  # a window as long as the context never drops a token
        if kind == "dummy" and i < len(named) and named[i] in ("moe", "mlp"):
            kind = "mlp"  # a layer without attention
        out.append(kind)
    return out


def attention_windows(config) -> dict[str, int | None]:
    """Each attention layer kind of the model (transformers' names, the keys its forward reads a mask dict by) ->
    its window in positions, None for full attention: {"full_attention": None, "sliding_attention": 4096}.

    A row at position p of a sliding layer reads keys at p - window < p' <= p (`nn/masks.windowed`). A window as
    long as the context is full attention."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = config.get_text_config(decoder=True)
    kinds, kwargs = get_layer_types_and_kwargs(config)
    ctx = getattr(config, "max_position_embeddings", None)
    out: dict[str, int | None] = {}
    for kind, kw in zip(kinds, kwargs):
        if kind in ("full_attention", "sliding_attention"):
            w = kw.get("sliding_window") if kind == "sliding_attention" else None
            out[kind] = None if w is None or (ctx is not None and w >= ctx) else int(w)
    return out


def stateful_modules(config) -> tuple[list[str], int, bool | None]:
    """(class names of the modules that read neighbouring rows or carry state and that `nn/predecessors.py` does not
    handle, how many handled mixers there are, whether its forward takes one mask per layer kind (None: unknown)),
    from a meta-device instance."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 -- an exotic config we cannot instantiate: the layer kinds alone decide
        return [], 0, None
    return modules_with_state(model), _handled(model), takes_mask_per_kind(model)


MASK_PER_KIND = re.compile(r"isinstance\(\s*(\w+\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")


def takes_mask_per_kind(model) -> bool:
    """Whether the model's decoder forward takes `attention_mask` as a dict {layer kind: 4D mask}, as
    transformers' models with several layer kinds do (`causal_mask_mapping[config.layer_types[i]]`)."""
    import inspect

    try:
        source = inspect.getsource(type(model.get_decoder()).forward)
    except (AttributeError, OSError, TypeError):
        return False
    return MASK_PER_KIND.search(source) is not None


def _handled(model) -> int:
    return sum(type(m).__name__ in MIXERS for m in model.modules())


def modules_with_state(model) -> list[str]:
    """Class names of the state-carrying or neighbour-reading modules, except mixers `nn/predecessors.py` handles (and
    the convolutions inside them)."""
    inside = {id(c) for m in model.modules() if type(m).__name__ in MIXERS for c in m.modules()}
    names = set()
    for module in model.modules():
        name = type(module).__name__
        if id(module) in inside:
            continue
        if isinstance(module, torch.nn.Conv1d) or (STATEFUL_MODULE.search(name) and not CONTAINER.search(name)):
            names.add(name)
    return sorted(names)


def check_architecture(config, where: str = "") -> None:
    """ConfigError naming the layers (and modules) ar2dlm cannot decode exactly, and what is supported."""
    kinds = layer_kinds(config)
    modules, handled, per_kind = stateful_modules(config)
    # a 'hybrid' layer (attention + conv / delayed-value state, ZAYA1), a 'conv' one (LFM2's short convolution) or a
    # 'linear_attention' one (a recurrent state) is exact when nn/predecessors.py hooks its mixer
    exact = EXACT_LAYER_TYPES + tuple(k for k in ("hybrid", "conv", "linear_attention")
                                      if handled >= kinds.count(k) > 0)
    bad: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        if kind not in exact and kind != "mlp":
            bad.setdefault(kind, []).append(i)
    attention = [i for i, kind in enumerate(kinds) if kind in EXACT_LAYER_TYPES]
    if len(set(attention_windows(config).values())) > 1 and per_kind is False:
        bad["mixed_windows"] = attention
    if getattr(config.get_text_config(decoder=True), "use_bidirectional_attention", False):
        bad["bidirectional"] = list(range(len(kinds)))
    if not bad and not modules:
        return
    parts = [f"{'layers' if len(ix) > 1 else 'layer'} {_span(ix)} of {len(kinds)} {'are' if len(ix) > 1 else 'is'} "
             f"{kind!r}: {WHY.get(kind, 'not full causal attention')}" for kind, ix in bad.items()]
    if modules:
        parts.append(f"modules {', '.join(modules)} read neighbouring rows or carry a sequence state")
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}ar2dlm cannot decode {config.model_type!r} exactly: {'; '.join(parts)}. "
                      f"Supported: {SUPPORTED}.")


def _span(ix: list[int]) -> str:
    return ", ".join(map(str, ix)) if len(ix) <= 6 else f"{', '.join(map(str, ix[:6]))}, ... ({len(ix)} layers)"
