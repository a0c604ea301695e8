"""Ranker: scores (history, candidate) pairs with attention over the history (DIN-style).

For each candidate the history is pooled with weights that depend on the candidate, so "bought a tent"
lifts a sleeping bag more than it lifts a phone case. One forward call scores all C candidates of B users:
the Triton model and the ONNX file take HISTORY [B, L] and CANDIDATES [B, C] and return SCORES [B, C].

The ranker is a residual on top of retrieval: it holds a frozen copy of the retrieval net and scores
``scale * retrieval_score + residual``, with the residual's last layer initialised to zero. An untrained
ranker therefore reproduces retrieval order exactly, and training can only learn what retrieval misses;
a short training run never makes the cascade worse than retrieval alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recsvc.bundle import PADDING_SCORE
from recsvc.offline.models._layers import embed_padded
from recsvc.offline.models.retrieval import RetrievalNet

__all__ = ["RankerNet"]



class RankerNet(nn.Module):
    """Frozen retrieval score + candidate-aware attention pooling + MLP + per-item bias."""

    def __init__(self, retrieval: RetrievalNet, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        num_items = retrieval.num_items
        self.num_items = num_items
        self.dim = dim
        self.retrieval = retrieval
        for p in self.retrieval.parameters():
            p.requires_grad_(False)
        self.retrieval_scale = nn.Parameter(torch.ones(()))
        self.item_embedding = nn.Embedding(num_items, dim)
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        # Popularity and quality that no co-occurrence captures live in a per-item bias.
        self.item_bias = nn.Embedding(num_items, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.attention = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden // 2), nn.GELU(),
            nn.Linear(hidden // 2, 1),
        )  # fmt: skip
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Score CANDIDATES [B, C] for HISTORY [B, L]; returns SCORES [B, C] (padding -> PADDING_SCORE)."""
        hist, hist_mask = embed_padded(self.item_embedding, history)            # [B, L, D], [B, L]
        cand, cand_mask = embed_padded(self.item_embedding, candidates)         # [B, C, D], [B, C]
        logits = torch.einsum("bcd,bld->bcl", self.attention(cand), hist) / math.sqrt(self.dim)
        logits = logits.masked_fill(hist_mask.unsqueeze(1) == 0, -1e4)
        attn = torch.softmax(logits, dim=-1) * hist_mask.unsqueeze(1)           # empty history -> zeros
        pooled = torch.einsum("bcl,bld->bcd", attn, hist)                       # [B, C, D]
        count = hist_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (hist.sum(dim=1) / count).unsqueeze(1).expand_as(cand)           # [B, C, D]
        features = torch.cat([cand, pooled, cand * pooled, cand * mean], dim=-1)
        bias = self.item_bias(candidates.clamp(min=0)).squeeze(-1)
        query = self.retrieval(history)                                         # [B, D_r]
        cand_r = self.retrieval.item_embedding(candidates.clamp(min=0))         # [B, C, D_r]
        retrieval_score = torch.einsum("bd,bcd->bc", query, cand_r)
        scores = self.retrieval_scale * retrieval_score + self.mlp(features).squeeze(-1) + bias
        return torch.where(cand_mask > 0, scores, torch.full_like(scores, PADDING_SCORE))
