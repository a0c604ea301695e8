"""Building blocks shared by the retrieval and ranking networks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["embed_padded"]


def embed_padded(table: nn.Embedding, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Look up ids where -1 means padding; return (embeddings zeroed at padding, float mask).

    -1 rather than a reserved row 0 keeps dense item ids identical everywhere (catalog row i, FAISS id i,
    model id i); the clamp makes the lookup legal and the mask removes what it fetched.
    """
    mask = (ids >= 0).to(table.weight.dtype)
    emb = table(ids.clamp(min=0)) * mask.unsqueeze(-1)
    return emb, mask
