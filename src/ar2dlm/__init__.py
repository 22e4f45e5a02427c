"""ar2dlm: turn a pretrained autoregressive LM into a TiDAR-style block-diffusion LM.

    import ar2dlm
    ar2dlm.convert("smollm2-135m", "out/smol-tidar", block_size=16)
    lm = ar2dlm.DiffusionLM.from_pretrained("out/smol-tidar")
    print(lm.generate(["def fib(n):"], max_new_tokens=64)[0].text)

The names below are imported when first used (torch and transformers take seconds to import): `import ar2dlm`
itself is instant, and the `ar2dlm` command can listen for signals before they load (entry.py).
"""

from __future__ import annotations

import importlib

_WHERE = {"ConfigError": ".core.errors", "DecodeConfig": ".decode.config", "Generation": ".decode.engine",
          "Stats": ".decode.engine", "convert": ".model.convert", "DiffusionLM": ".model.lm",
          "DiffusionConfig": ".model.settings"}

__all__ = ["ConfigError", "DecodeConfig", "DiffusionConfig", "DiffusionLM", "Generation", "Stats", "convert"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ar2dlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
