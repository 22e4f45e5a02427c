"""A model's forward-cost table on this machine (decode/costs.py says why it must be this machine's).

Where it comes from, in order: the checkpoint's `forward_cost` in ar2dlm.json
when `ar2dlm tune` measured it on this machine, dtype and thread count; the
cache file of an earlier first use, under `$AR2DLM_HOME/costs/`; else it is
measured now (a second or two; a line on stderr says so) and cached. A table
measured elsewhere, or one of the old format that named no machine, is not
used, and a line says so.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ..core.errors import ConfigError
from ..core.files import read_json, write_text
from ..decode import costs
from .bundled import ar2dlm_home

SHAPE = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "vocab_size", "num_experts", "num_experts_per_tok")
"""The config fields that name a model's shape: what a cost table (and an exactness verdict) belongs to, besides
the machine."""


def cost_table(lm) -> dict[int, float]:
    """{token slots per row: forward cost relative to one AR step} for `lm` here (see the module docstring)."""
    key = costs.machine_key(lm.model.dtype)
    saved = lm.settings.forward_cost if lm.settings is not None else None
    table = costs.table_for(saved, key)
    if table is not None:
        return table
    path = cache_path(lm, key)
    if path.is_file():
        try:
            table = costs.table_for(read_json(path, "forward-cost cache"), key)
        except ConfigError:
            table = None  # a damaged cache file is measured anew and replaced
        if table is not None:
            return table
    if saved:
        print(f"ar2dlm: the forward-cost table in ar2dlm.json was measured on "
              f"{saved.get('machine', 'an unnamed machine') if isinstance(saved, dict) else 'an unnamed machine'}, "
              f"not here ({key}): not used", file=sys.stderr)
    print(f"ar2dlm: measuring what a drafting step costs on this machine ({key}): once, cached in {path}",
          file=sys.stderr)
    table = costs.measure(lm)
    try:
        write_text(path, json.dumps(costs.as_saved(table, key), indent=1) + "\n", force=True,
                   what="forward-cost cache")
    except (ConfigError, OSError) as e:
        print(f"ar2dlm: could not cache the forward-cost table ({e}); it is measured again next time",
              file=sys.stderr)
    return table


def cache_path(lm, key: str) -> Path:
    """$AR2DLM_HOME/costs/<hash of the machine key, the model's shape, its adapter and forward>.json"""
    config = lm.model.config
    shape = {name: getattr(config, name, None) for name in SHAPE}
    ident = json.dumps([key, shape, getattr(lm.settings, "adapter", None), lm.batch_invariant,
                        lm.lean is not None], sort_keys=True)
    return ar2dlm_home() / "costs" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
