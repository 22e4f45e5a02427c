"""`DiffusionLM`: a stock HF causal LM plus the diffusion settings of `ar2dlm.json`.

The forward is the model's own: we hand it a ready 4D attention mask (returned
unchanged by transformers) and explicit `position_ids`, so any architecture
works without forking its modeling file. It also takes `mask_slots`, a bool
per row saying which rows are drafting slots; a drafting adapter reads it from
`slot_gate` to act on those rows only, so clean rows keep the base weights.
"""

from __future__ import annotations

import contextlib
import sys
import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..core import arguments, files
from ..core.errors import ConfigError
from ..core.hardware import decode_dtype
from ..decode.config import DecodeConfig
from ..decode.engine import Generation, generate, stream
from ..nn import attention, decoder, kernels, masks, native
from ..nn.decoder import LeanDecoder
from ..nn.gate import SlotGate
from ..nn.invariant import BatchInvariant
from . import adapter, architectures, checkpoint, costs, exactness
from .bundled import resolve_model
from .convert import add_mask_token
from .settings import SETTINGS_FILE, DiffusionConfig

DECODE_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeConfig))
"""The keyword settings of generate and stream."""


class DiffusionLM:
    """A converted checkpoint ready to decode. `settings is None` means a plain AR model."""

    def __init__(self, model, tokenizer, settings: DiffusionConfig | None, batch_invariant: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.slot_gate = SlotGate()
        self.kernels = kernels.Switch.from_env()  # whether the fused groups run (fuse, plain, AR2DLM_KERNELS)
        self.packed_masks = attention.PackedMasks()  # the packed GQA masks of the forward in progress
        self.source: Path | None = None  # the directory it was loaded from
        self.wrapped = None  # the module that runs the forward when it differs from self.model (DDP in training)
        # a row's logits and K/V independent of the rows sharing its forward (nn/invariant.py): on by default
        # where the plain kernels are not (bf16, fp16); in fp32 it costs too much on a CPU (README)
        self.batch_invariant = (model.dtype in (torch.bfloat16, torch.float16) if batch_invariant is None
                                else batch_invariant)
        self.lean: LeanDecoder | None = None  # the lean batch-invariant forward of a Llama-family model (fuse)
        self.probe = None  # callable(component, rows): each part's output while model/exactness.py checks (HF path)
        # each attention layer kind's window ({"full_attention": None, "sliding_attention": W}); with a window, every
        # forward draws each kind's mask from the caller's layout (`layer_masks`)
        windows = architectures.attention_windows(model.config)
        self.windows = windows if any(w is not None for w in windows.values()) else {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = "auto",
                        attn_implementation: str = "sdpa", allow_ar: bool = False,
                        batch_invariant: bool | None = None) -> "DiffusionLM":
        """Load a converted checkpoint, an adapter folder, or a bundled name (its shipped drafter).

        `allow_ar=True` also accepts an unconverted AR model. Loading reads
        straight down: resolve the name -> read and check the settings (and an
        adapter folder's files and base) -> check the architecture (config.json
        alone) -> load the weights and tokenizer -> attach the adapter ->
        install the fast paths. Each check runs once, before the step it
        protects, so a bad file is named in a ConfigError before the weights load.

        `dtype`: a torch dtype or auto | float32 | bfloat16 | float16 (auto: $AR2DLM_DTYPE if set, else the
        checkpoint's `dtype` in ar2dlm.json, else bfloat16 where the hardware computes it natively, else
        float32; core/hardware.decode_dtype). `batch_invariant` (default: on for bf16 / fp16, off for fp32): every row's
        logits and K/V are bitwise those of a one-row forward (nn/invariant.py), so greedy decoding equals the
        AR loop in that dtype token for token.
        """
        files.check_path(path, "path")
        folder = resolve_model(str(path))
        settings, base = checkpoint.read_settings(folder, allow_ar)
        dtype = decode_dtype(dtype, settings.dtype if settings is not None else "auto")
        config = checkpoint.check_architecture(base, settings, exact=settings is not None,
                                               origin=folder / SETTINGS_FILE)
        model, tokenizer = load_weights_and_tokenizer(
            folder, base, config, settings, dtype=dtype,
            attn_implementation=checkpoint.attention_implementation(config, attn_implementation))
        lm = cls(model, tokenizer, settings, batch_invariant)
        lm.source = folder
        if settings is not None and settings.adapter:
            adapter.load(lm, folder)
        lm.fuse()
        verdict = lm.exactness()
        if verdict is not None and not verdict.exact:
            print(f"ar2dlm: {verdict.line()}. The parts named differ between a row alone and the same row among "
                  f"others on this machine; run `ar2dlm doctor` to see it again", file=sys.stderr)
        return lm

    def exactness(self, quiet: bool = False):
        """This machine's exactness verdict for this model (model/exactness.py: checked once per machine, dtype and
        model shape, then cached), or None where batch invariance is off (float32: greedy agrees with HF generate
        at the argmax, which is what is promised there)."""
        if not self.batch_invariant:
            return None
        if getattr(self, "_verdict", None) is None:
            self._verdict = exactness.verdict(self, quiet=quiet)
        return self._verdict

    def paths(self) -> str:
        """Which forward, linears and attention this model runs, and why not the faster ones (decided at load)."""
        if self.lean is not None:
            forward = "lean Llama-family forward (nn/decoder.py)"
        elif not self.batch_invariant:
            forward = "transformers' forward (batch invariance off)"
        else:
            forward = f"transformers' forward under BatchInvariant (no lean forward: {decoder.why_not(self.model)})"
        weight = self.model.get_output_embeddings().weight
        if weight.dtype == torch.bfloat16 and kernels.packs(weight):
            linears = "ar2dlm kernel, prepacked" if native.available() else "oneDNN prepacked, 16-row tiles"
        elif weight.dtype == torch.bfloat16:
            linears = f"16-row tiles of F.linear (not prepacked: {native.reason()}; oneDNN does not pack bf16 here)"
        else:
            linears = f"F.linear{' in 16-row tiles' if self.batch_invariant else ''} ({str(weight.dtype)[6:]})"
        if not self.batch_invariant:
            attention = "transformers' SDPA"
        else:
            attention = "ar2dlm kernel" if native.available() else f"reference in torch ops ({native.reason()})"
        return f"forward: {forward}; linears: {linears}; attention: {attention}"

    def fuse(self) -> int:
        """Inference fast paths of this model: one matmul per group of linears reading the same input, with
        the LoRA A of each (kernels.py; the members become `FusedLinear` / `lora.AdapterLinear`; returns how
        many groups), and grouped-query attention without per-head K/V copies (attention.py). Autograd runs
        the plain forwards; `plain()` runs the plain path everywhere."""
        attention.install(self.model, self.packed_masks)
        n = kernels.install(self.model, self.slot_gate, self.kernels)
        self.lean = LeanDecoder.build(self.model, self.kernels) if self.batch_invariant else None
        return n

    @contextlib.contextmanager
    def plain(self):
        """Run transformers' own attention and the plain linear modules inside (the reference of `fuse`)."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        switched = impl == attention.NAME
        if switched:
            self.model.set_attn_implementation("sdpa")
        try:
            with self.kernels.off():
                yield
        finally:
            if switched:
                self.model.set_attn_implementation(impl)

    # ------------------------------------------------------------------ forward
    @property
    def mask_token_id(self) -> int | None:
        return None if self.settings is None else self.settings.mask_token_id

    @property
    def context_len(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                mask_slots: torch.Tensor | None = None, past_key_values=None, slots_from: int | None = None,
                holes: bool | None = None, compact: torch.Tensor | None = None,
                cache_positions: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits [b, q, vocab] of the stock forward.

        input_ids, position_ids: [b, q]; attention_mask: bool [b, q, k] over
        (cache + these q tokens), the layout over every committed token (a
        sliding-window layer's mask is drawn from it here, `layer_masks`);
        mask_slots: bool [b, q] drafting rows.
        What the caller knows of the layout, so that nothing is read back from the masks (the decode engine):
        slots_from, that every row's slots are its columns from there on; holes, whether a row's keys have
        holes (`nn.invariant.key_order`). compact: bool [q] or [b, q], rows whose keys are read in rank order:
        a flagged row's n-th seen key counts as if at key n, so its attention equals the row's over a cache
        holding exactly its keys (a candidate tree's sibling, whose own key sits after the other candidates';
        `nn.invariant.COMPACT`); only a batch-invariant forward reads it. cache_positions [b, cache], the cached
        keys' positions (only read by windowed layers; default: `masks.key_positions`). kwargs go to the HF
        forward (e.g. logits_to_keep).
        """
        lean = self.lean
        if (lean is not None and self.batch_invariant and self.wrapped is None and set(kwargs) <= {"logits_to_keep"}
                and lean.usable(past_key_values)):
            with self.slot_gate.rows(mask_slots, slots_from):
                if self.slot_gate.slot_start is None or self.slot_gate.slot_start >= 0:  # slots a suffix, or none
                    return lean(input_ids, position_ids, attention_mask, past_key_values,
                                kwargs.get("logits_to_keep", 0), holes, compact)
        seen = attention_mask.any(1) if self.windows and self.batch_invariant else None  # keys before the windows
        invariant = BatchInvariant(self.probe, holes, compact, seen) if self.batch_invariant \
            else contextlib.nullcontext()
        mask = self.layer_masks(attention_mask, position_ids, mask_slots, cache_positions)
        with self.slot_gate.rows(mask_slots, slots_from), self.packed_masks.one_forward(), invariant:
            out = (self.wrapped or self.model)(input_ids=input_ids, position_ids=position_ids,
                                               attention_mask=masks.for_model(mask, self.model),
                                               past_key_values=past_key_values,
                                               use_cache=past_key_values is not None, **kwargs)
        return out.logits

    def layer_masks(self, mask: torch.Tensor, position_ids: torch.Tensor, mask_slots: torch.Tensor | None = None,
                    cache_positions: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mask each attention layer kind reads, from the layout `mask` [b, q, k]: the layout itself where no
        layer has a window; else one mask for all layers when they share a window, or a dict {layer kind: mask}
        (the form transformers' hybrid models take), a sliding kind's mask cut to its window (`masks.windowed`)."""
        if not self.windows:
            return mask
        b, q = mask.shape[0], position_ids.shape[1]
        position_ids = position_ids.expand(b, q)
        cached = mask.shape[-1] - q
        if cache_positions is None:
            k_pos = masks.key_positions(mask, position_ids, cached)  # [b, cached + q]
        else:
            k_pos = torch.cat([cache_positions.expand(b, cached), position_ids], 1)
        rows = mask_slots if mask_slots is not None else torch.zeros_like(position_ids, dtype=torch.bool)
        k_slot = torch.cat([rows.new_zeros(b, cached), rows], 1)  # a cached key is never a slot
        out = {kind: mask if w is None else masks.windowed(mask, position_ids, k_pos, w, k_slot)
               for kind, w in self.windows.items()}
        return next(iter(out.values())) if len(out) == 1 else out

    def cost_table(self) -> dict[int, float]:
        """Forward cost by token slots per row on this machine, dtype and thread count (model/costs.py):
        what adaptive drafting weighs a wider step by. Kept for the life of this object."""
        key = (self.model.dtype, torch.get_num_threads(), self.settings)
        if getattr(self, "_costs", (None,))[0] != key:
            self._costs = (key, costs.cost_table(self))
        return self._costs[1]

    def base_weights(self):
        """Context: run the bare base layers when that gives the same AR outputs (a drafting adapter).

        The gated adapter never touches clean rows, so AR decoding and HF
        generate are unchanged without it; this only drops its idle cost.
        Where every LoRA layer is gated (what `adapter.install_gates` makes), a
        forward without slot rows already runs the base weights alone (its
        fused groups skip the A rows; a gated layer returns the base output),
        so nothing is switched: peft's `disable_adapter()` walks every module
        on entry and exit (~30 ms for SmolLM2, the cost of a whole AR step).
        """
        if self.settings is not None and self.settings.adapter == "drafting" and not adapter.all_gated(self.model):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ decoding
    def decode_config(self, **overrides) -> DecodeConfig:
        """DecodeConfig from the checkpoint's defaults (ar2dlm.json) and these overrides."""
        defaults = {}
        if self.settings is not None:
            K, R = self.settings.decode_defaults()
            fixed = any(overrides.get(k) is not None for k in ("ar", "draft_len", "proposals"))
            defaults = {"draft_len": K, "proposals": R,
                        # the model's adaptive default and tree, unless the caller fixes the drafting (or asks for AR;
                        # suffix candidates alone have no siblings)
                        "adaptive": self.settings.adaptive and not fixed,
                        "tree": () if fixed or overrides.get("candidates") == "suffix" else tuple(self.settings.tree)}
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("stop", "eos_token_id", "tree"):
            if isinstance(defaults.get(key), (list, str, int)):
                v = defaults[key]
                defaults[key] = tuple([v] if isinstance(v, (str, int)) else v)
        if overrides.get("draft_len") is not None and overrides.get("proposals") is None and self.settings is not None \
                and type(defaults["draft_len"]) is int:  # another type fails in DecodeConfig, naming the field
            defaults["proposals"] = min(defaults["proposals"], defaults["draft_len"])
        if overrides.get("ar"):  # plain AR steps draft nothing: a drafting setting would be dropped in silence
            given = [k for k in ("draft_len", "proposals") if overrides.get(k) is not None]
            if given:
                raise ConfigError(f"{' and '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to drafting, "
                                  f"but ar=True decodes one token per forward without drafts: drop "
                                  f"{' and '.join(given)} or ar=True", field=given[0])
        try:
            config = DecodeConfig(**defaults)
        except ConfigError as e:
            from_file = [k for k in ("draft_len", "proposals") if overrides.get(k) is None and k in defaults]
            if self.settings is None or not from_file or e.field not in ("draft_len", "proposals"):  # K bounds |R|
                raise
            where = self.source / SETTINGS_FILE if self.source is not None else SETTINGS_FILE
            raise ConfigError(f"{e} ({' and '.join(f'{k}={defaults[k]}' for k in from_file)} "
                              f"{'is' if len(from_file) == 1 else 'are'} the default of {where})", field=e.field) from e
        if not config.ar and self.settings is None:
            raise ConfigError("this model is not converted (no ar2dlm.json): decode it with ar=True, "
                              "or convert it with `ar2dlm convert`", field="ar")
        return config

    def encode(self, prompts: Sequence[str | Sequence[int]] | str, chat: bool = False) -> list[list[int]]:
        """Token ids of each prompt (strings are tokenized; `chat` applies the chat template)."""
        arguments.check_prompts(prompts)
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if chat:
                    if not getattr(self.tokenizer, "chat_template", None):
                        raise ConfigError("chat=True: this tokenizer has no chat template; drop chat=True and give "
                                          "the prompt text as the model expects it")
                    toks = self.tokenizer.apply_chat_template(
                        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                        return_dict=False)
                    toks = list(toks["input_ids"]) if isinstance(toks, dict) or hasattr(toks, "keys") else list(toks)
                else:
                    toks = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            else:
                toks = [int(t) for t in prompt]
            if len(toks) == 0:
                raise ConfigError(f"prompt {i} is empty: give at least one token")
            ids.append(toks)
        return ids

    def generate(self, prompts, chat: bool = False, **settings) -> list[Generation]:
        """Decode a batch of prompts (strings or token-id lists); one `Generation` per prompt."""
        arguments.check_prompts(prompts)
        arguments.check_keywords(settings, DECODE_FIELDS, "generate")
        if not isinstance(prompts, str) and len(prompts) == 0:
            raise ConfigError("prompts is empty: give at least one prompt (a string or a list of token ids)")
        return generate(self, self.encode(prompts, chat), self.decode_config(**settings))

    def stream(self, prompt, chat: bool = False, **settings) -> Iterator[str]:
        """Yield text as tokens are committed (one prompt)."""
        arguments.check_prompt(prompt)
        arguments.check_keywords(settings, DECODE_FIELDS, "stream")
        yield from stream(self, self.encode([prompt], chat)[0], self.decode_config(**settings))


def load_weights_and_tokenizer(folder: Path, base: Path, config, settings: DiffusionConfig | None, **kwargs):
    """(model, tokenizer) from `base`, the folder itself or an adapter folder's base; kwargs go to from_pretrained.

    An adapter's base gets the mask token the adapter was trained with (added
    as `convert` adds it, unless the base is converted already) and the
    adapter folder's own tokenizer when it has one. A converted model's mask
    token must be a row of the weights.
    """
    model = checkpoint.load_weights(base, config, **kwargs)
    tokenizer = checkpoint.load_tokenizer(base)
    if settings is None:
        return model, tokenizer
    if settings.adapter:
        if (base / SETTINGS_FILE).exists():  # the adapter was trained on an already converted checkpoint
            mask_id = DiffusionConfig.load(base).mask_token_id
        else:
            mask_id = add_mask_token(model, tokenizer, settings.mask_token)
        if mask_id != settings.mask_token_id:
            raise ConfigError(f"{folder}: the mask token of base {settings.base_model} would be id {mask_id}, the "
                              f"adapter expects {settings.mask_token_id}: wrong base model?")
        if (folder / "tokenizer_config.json").exists():  # else the base's, with the mask token just added
            tokenizer = checkpoint.load_tokenizer(folder)
    checkpoint.check_mask_token(model, settings, folder / SETTINGS_FILE)
    return model, tokenizer
