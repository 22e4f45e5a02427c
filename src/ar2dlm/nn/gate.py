"""Which rows of a forward are drafting (mask-slot) rows, and the gate that lets an adapter reach only them.

`SlotGate` holds the `mask_slots` [b, q] of the forward in progress; the
drafting adapter's `RowGate` (where peft's LoRA dropout sits) multiplies its
input by "is this row a slot", so clean rows run the untouched base weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class SlotGate:
    """Holds the `mask_slots` [b, q] of the forward in progress (None outside one).

    `slot_start`: None when no row is a slot; else the first slot row when
    every row of the batch has its slots as a suffix from there (every ar2dlm
    layout: [prompt | P_0], [draft | proposals], [clean | slots]); -1 otherwise.
    """

    def __init__(self):
        self.mask_slots: torch.Tensor | None = None
        self._column: torch.Tensor | None = None  # [rows, 1]; None when no row is a slot
        self.slot_start: int | None = None

    @contextlib.contextmanager
    def rows(self, mask_slots: torch.Tensor | None, slots_from: int | None = None):
        """Within it, `mask_slots` are the forward's slot rows. slots_from: the caller knows that every row's
        slots are its columns from there on (the decode engine's layouts), so nothing is read back from the
        mask; without it the layout is found from the mask (one host read)."""
        previous = self.mask_slots, self._column, self.slot_start
        self.mask_slots, self._column, self.slot_start = mask_slots, None, None
        if mask_slots is not None and slots_from is not None:
            if slots_from < mask_slots.shape[-1]:
                self._column, self.slot_start = mask_slots.reshape(-1, 1), slots_from
        elif mask_slots is not None:
            n_slots = mask_slots.sum(-1)  # [b]
            lo, hi = int(n_slots.min()), int(n_slots.max())  # host reads: the layout is not known
            if hi > 0:
                self._column = mask_slots.reshape(-1, 1)
                start = mask_slots.shape[-1] - hi
                self.slot_start = start if lo == hi and bool(mask_slots[:, start:].all()) else -1
        try:
            yield
        finally:
            self.mask_slots, self._column, self.slot_start = previous

    def suffix_of(self, x: torch.Tensor) -> bool:
        """Whether x's rows are this forward's rows and its slot rows a suffix from slot_start."""
        if self.slot_start is None or self.slot_start < 0:
            return False
        b, q = self.mask_slots.shape
        return tuple(x.shape[:-1]) == (b, q) or (b == 1 and x.dim() == 2 and x.shape[0] == q)

    def column(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gate as a [rows, 1] 0/1 column for x [..., d] flattened to [rows, d]; None when no row is a slot.

        Cast to x's dtype once per forward (every adapted layer asks).
        """
        column = self._column
        if column is None or column.shape[0] != x.shape[:-1].numel():
            return None
        if column.dtype != x.dtype:
            column = self._column = column.to(x.dtype)
        return column


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
