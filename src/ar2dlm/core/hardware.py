"""What this machine computes natively: the CPU model and bf16 support, and the decode dtype `auto` means here.

Speed figures belong to the machine they were measured on, so every verb
that times or decodes prints `describe()` beside them.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ConfigError

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
"""What a decode dtype setting may say; `auto` = bfloat16 where the hardware computes it natively, else float32."""
DTYPE_ENV = "AR2DLM_DTYPE"
"""Environment variable: what a decode dtype of `auto` means (before the checkpoint's own setting)."""
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (/proc/cpuinfo) of native bf16 matmuls: AVX512-BF16 (AMD EPYC, Intel) and AMX (Intel Xeon)."""


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; (platform.processor(), {}) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model or platform.processor() or "unknown CPU", flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 matmuls natively (CUDA: the GPU says so; CPU: its flags)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return any(flag in _cpuinfo()[1] for flag in NATIVE_BF16_FLAGS)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype setting -> torch dtype (`auto`: bfloat16 where `native_bf16(device)`, else float32)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def decode_dtype(setting: str | torch.dtype, checkpoint: str = "auto",
                 device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a model decodes in. An explicit setting (a torch dtype, or a name other than auto) is it;
    `auto` is $AR2DLM_DTYPE when set, else the checkpoint's own (`dtype` in ar2dlm.json), else bfloat16 where
    the hardware computes it natively, else float32."""
    if not isinstance(setting, torch.dtype) and setting not in DTYPE_NAMES:
        named = getattr(torch, str(setting), None)  # any other floating dtype by name (float64 in the tests)
        if not isinstance(named, torch.dtype) or not named.is_floating_point:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {setting!r}", field="dtype")
        setting = named
    if isinstance(setting, torch.dtype) or setting != "auto":
        return resolve_dtype(setting, device)
    env = os.environ.get(DTYPE_ENV, "").strip()
    if env:
        if env not in DTYPE_NAMES:
            raise ConfigError(f"environment variable {DTYPE_ENV}={env!r} is not a dtype: set it to one of "
                              f"{', '.join(DTYPE_NAMES)}, or unset it", field=DTYPE_ENV)
        return resolve_dtype(env, device)
    return resolve_dtype(checkpoint, device)


def describe(dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> str:
    """'bfloat16 on Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16), 2 threads': what a timing ran on."""
    where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu_model()
    flags = [f for f in NATIVE_BF16_FLAGS if f in _cpuinfo()[1]] if torch.device(device).type == "cpu" else []
    named = " (" + ", ".join(sorted(flags)) + ")" if flags else ""
    text = f"{where}{named}, {torch.get_num_threads()} threads"
    return f"{str(dtype).removeprefix('torch.')} on {text}" if dtype is not None else text


def machine(dtype: torch.dtype, device: str | torch.device = "cpu") -> dict:
    """What a result file records of the machine and dtype it was measured in."""
    where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu_model()
    return {"dtype": str(dtype).removeprefix("torch."), "device": where, "threads": torch.get_num_threads(),
            "native_bf16": native_bf16(device)}
