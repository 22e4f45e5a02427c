"""Linear layers for few-row decoding on a CPU.

A decode step multiplies a handful of rows (1 for an AR step, K + |R| K for
an ar2dlm step) by every weight matrix, so its cost is streaming the weights.
The stock `F.linear(x, W)` computes `x @ W.T`; on some BLAS / CPU pairs that
product takes a slow path for a few rows, while the same product written as
`(W @ x.T).T` (x row-major, so x.T is a column-major operand) streams W at
full speed. Measured with MKL on a 2-core AMD EPYC, float32, a 1536x576
weight over 60 distinct matrices (cold cache):

    rows          1     2     4     8    16    32
    x @ W.T     221   346   315   348   413   548  us
    (W @ x.T).T 109    93    86   177   279   403  us   (1 row: padded to 2)

Which form is faster is not a property of the code but of the machine, so it
is measured (`calibrate`) once per process, per weight shape and row count,
on the model's own weight matrices; the stock form stays wherever it is as
fast. Only inference is affected: a forward that records autograd, a
non-float32 or non-CPU tensor, or more than `MAX_ROWS` rows takes the stock
path. The two forms give the same values up to float32 rounding.

`AR2DLM_KERNELS=stock` in the environment (or `with stock():`) turns it off.
"""

from __future__ import annotations

import contextlib
import os
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 32
BUCKETS = (1, 2, 4, 8, 16, 32)  # a row count uses the decision of the next bucket up

_enabled = os.environ.get("AR2DLM_KERNELS", "auto") != "stock"
_choice: dict[tuple[tuple[int, int], int], bool] = {}  # (weight shape, bucket) -> transposed form is faster


@contextlib.contextmanager
def stock():
    """Run the stock `F.linear` everywhere inside (to measure against it)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _bucket(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


def fast_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The row count of x [..., in] if the transposed form (`transposed`) should run it, else 0."""
    if not _enabled or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return 0
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS:
        return 0
    return rows if _choice.get((tuple(weight.shape), _bucket(rows)), False) else 0


def transposed(x: torch.Tensor, weight: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as [rows', in] row-major, W x^T [out, rows']); rows' = max(rows, 2).

    A single column takes the slow matrix-vector path, so one row is doubled.
    """
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    if rows == 1:
        flat = flat.expand(2, -1).contiguous()
    return flat, weight @ flat.t()


def untranspose(yT: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
    """W x^T [out, rows'] back to x's leading shape [..., out], row-major (attention kernels want that)."""
    return yT.t()[:rows].contiguous().view(*x.shape[:-1], yT.shape[0])


def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with the transposed form where it was measured faster."""
    rows = fast_rows(x, self.weight)
    if not rows:
        return F.linear(x, self.weight, self.bias)
    _, yT = transposed(x, self.weight, rows)
    if self.bias is not None:
        yT += self.bias[:, None]
    return untranspose(yT, x, rows)


def install(model: nn.Module, reps: int = 5, per_shape: int = 32) -> int:
    """Calibrate on model's float32 linear weights and give every nn.Linear `linear_forward`; returns how many."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    calibrate([m.weight for m in linears], reps=reps, per_shape=per_shape)
    for m in linears:
        m.forward = types.MethodType(linear_forward, m)
    return len(linears)


@torch.inference_mode()
def calibrate(weights: list[torch.Tensor], reps: int = 5, per_shape: int = 32) -> dict:
    """Time both forms per weight shape and bucket on up to `per_shape` distinct matrices of that shape.

    Distinct matrices so the weights come from memory, as in a forward, not
    from a cache warmed by the previous repetition.
    """
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        if w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2:
            by_shape.setdefault(tuple(w.shape), []).append(w.detach())
    rng = torch.Generator().manual_seed(0)
    for shape, ws in by_shape.items():
        ws = ws[:per_shape]
        for b in BUCKETS:
            if (shape, b) in _choice:
                continue
            x = torch.randn(b, shape[1], generator=rng)  # its own generator: the global RNG stream is the user's
            stock_t = _best_of(lambda: [F.linear(x, w) for w in ws], reps)
            fast_t = _best_of(lambda: [transposed(x, w, b)[1].t().contiguous() for w in ws], reps)
            _choice[(shape, b)] = fast_t < stock_t
    return dict(_choice)


def _best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
