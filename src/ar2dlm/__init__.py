"""ar2dlm: turn a pretrained autoregressive LM into a TiDAR-style block-diffusion LM.

    import ar2dlm
    ar2dlm.convert("smollm2-135m", "out/smol-tidar", block_size=16)
    lm = ar2dlm.DiffusionLM.from_pretrained("out/smol-tidar")
    print(lm.generate(["def fib(n):"], max_new_tokens=64)[0].text)
"""

from .core.errors import ConfigError
from .decode.config import DecodeConfig
from .decode.engine import Generation, Stats
from .model.convert import convert
from .model.lm import DiffusionLM
from .model.settings import DiffusionConfig

__all__ = ["ConfigError", "DecodeConfig", "DiffusionConfig", "DiffusionLM", "Generation", "Stats", "convert"]
