"""ar2dlm: turn a pretrained autoregressive LM into a TiDAR-style block-diffusion LM.

    import ar2dlm
    ar2dlm.convert("smollm2-135m", "out/smol-tidar", block_size=16)
    lm = ar2dlm.DiffusionLM.from_pretrained("out/smol-tidar")
    print(lm.generate(["def fib(n):"], max_new_tokens=64)[0].text)
"""

from .core.config import ConfigError, DecodeConfig, DiffusionConfig
from .model.convert import convert
from .decode.engine import Generation, Stats
from .model.lm import DiffusionLM

__all__ = ["ConfigError", "DecodeConfig", "DiffusionConfig", "DiffusionLM", "Generation", "Stats", "convert"]
