"""ar2dlm's own CPU kernels (`csrc/`), built once per machine and loaded as torch ops.

A kernel here exists because the order of its reductions must be ours:
`csrc/attention.cpp` is attention whose every row is one fixed function of
its query, its keys and its values (its header says how), where a library's
attention blocks rows by the call's shape and the CPU's instruction set;
`csrc/linear.cpp` is a bf16 linear whose every output is a fixed sequence
of pair-dots, so a one-row call needs no padding to a fixed tile and reads
the weight once (an AR step then costs about its bytes).

The source is compiled with torch's extension builder (g++ and ninja, both in
the project's install) for the CPU at hand (-march=native), into
`$AR2DLM_HOME/kernels/<hash of the source, torch version and CPU>/`: the
first use on a machine builds it (about 20 s), later ones load it. Where
it cannot be built, `available()` is False and `reason()` says why; the
callers then run the reference in plain torch ops (`invariant.attention`),
slower but with the same property.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import threading
from pathlib import Path

import torch

from ..core import hardware
from ..core.home import ar2dlm_home

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("attention.cpp", "linear.cpp"))
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17")
_lock = threading.Lock()
_state: dict = {}


def _key() -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(torch.__version__.encode())
    model, flags = hardware._cpuinfo()
    h.update(model.encode())
    h.update(" ".join(sorted(flags)).encode())
    return h.hexdigest()[:16]


def _build() -> str | None:
    """Build or load the library; None when it loaded, else why not."""
    if os.environ.get("AR2DLM_NATIVE", "").strip() == "off":
        return "AR2DLM_NATIVE=off"
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - a torch without the builder
        return f"torch's extension builder is missing ({e})"
    key = _key()
    folder = ar2dlm_home() / "kernels" / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{folder} cannot be created ({e.strerror or e})"
    # ninja from the environment's own bin (pip's ninja) when the PATH does not hold it
    path = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path if path else bindir
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            cpp_extension.load(name=f"ar2dlm_native_{key}", sources=[str(p) for p in SOURCES],
                               extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"], build_directory=str(folder),
                               is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - a failed build is a fact about the machine, reported by reason()
        text = str(e).strip().splitlines()
        return f"the kernels did not build in {folder}: {text[-1] if text else type(e).__name__}"
    finally:
        os.environ["PATH"] = path
    return None


def available() -> bool:
    """Whether ar2dlm's kernels run in this process (built or loaded on first call, once per process)."""
    if "reason" not in _state:
        with _lock:
            if "reason" not in _state:
                _state["reason"] = _build()
    return _state["reason"] is None


def reason() -> str | None:
    """Why the kernels do not run here (None when they do)."""
    available()
    return _state["reason"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              keys_t: torch.Tensor | None = None, compact: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant attention (csrc/attention.cpp). q [B, H, R, D]; k, v [B, H, L, D] (any strides with the last
    dim contiguous); mask bool [B, 1 or H, R, L] (True = attend); keys_t: optionally k transposed, [B, H, D, L] (the
    lean forward's cache keeps it: the same numbers, read without a transpose); compact: optionally bool,
    broadcastable to [B, R], the rows that read their keys in rank order (a flagged row's n-th seen key counts as
    if at column n: its result is the row's over exactly its keys stored from column 0); -> [B, H, R, D] in q's
    dtype. A row that sees no key gets zeros."""
    return torch.ops.ar2dlm_native.attention(q, k, v, mask, scale, keys_t, compact)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] in the layout `linear` reads: [N/16, K/2, 16, 2] (zero-padded to whole blocks)."""
    return torch.ops.ar2dlm_native.pack(weight)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [M, K] bf16 (rows with a contiguous last dim) times the packed weight -> [M, out_features] bf16: each output
    a fixed sequence of bf16 pair-dots over k in fp32, plus the bias, rounded once (csrc/linear.cpp)."""
    return torch.ops.ar2dlm_native.linear(x, packed, bias, out_features)


def linear_add(x: torch.Tensor, packed: torch.Tensor, ranges: torch.Tensor, y: torch.Tensor) -> None:
    """y += x W^T in place, for a block-diagonal W packed by `pack`: column block nb (16 outputs) reads only the
    k-pairs ranges[nb, 0] .. ranges[nb, 1]. x [B, M, K], y [B, M, N] bf16 (views: a fused group's h columns and its
    output columns, the slot rows); each output y + its pair-dots in fp32, rounded once."""
    torch.ops.ar2dlm_native.linear_add(x, packed, ranges, y)
