"""The model: `DiffusionLM` (a converted checkpoint ready to decode), loading and checking checkpoints,
conversion of a base model, the drafting adapter, the architectures that decode exactly, bundled names."""

from .checkpoint import NotConvertedError
from .lm import DiffusionLM, SlotGate

__all__ = ["DiffusionLM", "NotConvertedError", "SlotGate"]
