"""The vocabulary side of a model: how many token rows its input embedding has."""

from __future__ import annotations

import torch


def embedding_rows(model) -> int:
    """Rows of the input embedding, read off the nn.Embedding itself: a peft wrapper's `.weight`
    builds a merged copy of the whole matrix (~40 ms for SmolLM2 on a CPU)."""
    emb = model.get_input_embeddings()
    for m in emb.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    return emb.weight.shape[0]
