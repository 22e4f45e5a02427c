"""What the decode engine needs of a model: `DecodeModel`.

The engine (engine.py) and the naive decoders (reference.py) run any object
with these members; `ar2dlm.model.DiffusionLM` is the one the package ships
(it meets the protocol structurally: nothing here imports the model layer).

- `forward`: logits of the stock HF forward with our 4D mask and explicit
  positions; `mask_slots` says which rows are drafting slots.
- `model`: the HF causal LM that forward runs (or a peft model wrapping it).
  The engine reads its `device`, `config`,
  `generation_config` (`eos_token_id`), input and output embeddings, and
  hands it to `nn.predecessors` for the KV cache and CCA-like layers.
- `tokenizer`: `decode` of committed tokens, `eos_token_id` as a fallback.
- `settings`: the diffusion settings (`None` = a plain AR model).
- `cost_table()`: {token slots per row: forward cost relative to an AR step}
  on this machine (costs.py), what adaptive drafting weighs a step by.
- `mask_token_id`, `context_len`: the mask token (`None` = not converted) and
  the longest sequence the positions allow (`None` = no limit known).
- `base_weights()`: a context in which AR rows run the bare base weights,
  when that gives the same logits for less.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch


class DraftingSettings(Protocol):
    """What the engine reads of a model's diffusion settings (`model.settings.DiffusionConfig` has it)."""

    mask_token_id: int


@runtime_checkable
class DecodeModel(Protocol):
    """A model the decode engine can run (see the module docstring for what each member is used for)."""

    model: Any  # transformers.PreTrainedModel, or a peft model wrapping one
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    settings: DraftingSettings | None

    @property
    def mask_token_id(self) -> int | None: ...

    @property
    def context_len(self) -> int | None: ...

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                mask_slots: torch.Tensor | None = None, past_key_values=None, slots_from: int | None = None,
                holes: bool | None = None, compact: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """input_ids, position_ids: [b, q]; attention_mask: bool [b, q, cache + q]; mask_slots: bool [b, q]
        -> logits [b, q, vocab] (only the rows `logits_to_keep` names, when given). slots_from: every row's
        slots are its columns from there on; holes: whether some row's keys have holes (None: not known);
        compact: bool [q], rows whose keys are read in rank order (a tree's siblings, `nn.invariant`)."""
        ...

    def base_weights(self) -> AbstractContextManager: ...

    def cost_table(self) -> dict[int, float]: ...
