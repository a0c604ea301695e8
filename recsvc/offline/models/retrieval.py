"""Retrieval two-tower: item embeddings and a query vector pooled from the user's recent history.

Score(user, item) = <query(history), item_embedding>, so retrieval is maximum inner product search over
the item embeddings (what the FAISS index holds). Users need no embedding of their own: a new user's
first event already moves their query, and an empty history maps to a learned cold-start query.
"""

from __future__ import annotations

import torch
from torch import nn

from recsvc.offline.models._layers import embed_padded

__all__ = ["RetrievalNet"]


class RetrievalNet(nn.Module):
    """Item tower (an embedding table) and query tower (recency-weighted pooling + MLP)."""

    def __init__(self, num_items: int, dim: int, history_len: int) -> None:
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        self.history_len = history_len
        self.item_embedding = nn.Embedding(num_items, dim)
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        # One learned weight per position: recent items usually predict the next one best, and the
        # model learns how fast that decays instead of us fixing a half-life.
        self.position_logits = nn.Parameter(torch.zeros(history_len))
        # Learned query for users with no usable history (cold start).
        self.empty_query = nn.Parameter(torch.zeros(dim))
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def item_vectors(self) -> torch.Tensor:
        """The item embeddings the index is built from, [num_items, dim]."""
        weight: torch.Tensor = self.item_embedding.weight
        return weight

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Map HISTORY int64 [B, L] (-1 padded on the left, newest last) to QUERY float32 [B, dim]."""
        emb, mask = embed_padded(self.item_embedding, history)
        weights = torch.softmax(self.position_logits, dim=0) * mask
        total = weights.sum(dim=1, keepdim=True)
        pooled = (emb * weights.unsqueeze(-1)).sum(dim=1) / total.clamp(min=1e-6)
        last = emb[:, -1, :]                     # newest item; zero when the history is empty
        query = pooled + self.mlp(torch.cat([pooled, last], dim=-1))
        has_history = (total > 0).to(query.dtype)
        out: torch.Tensor = has_history * query + (1.0 - has_history) * self.empty_query
        return out
