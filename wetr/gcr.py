"""Graph Category Representation (METHOD.md §3): class tokens aggregate their top-k graph neighbours."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class GraphCategoryRepresentation(nn.Module):
    """Refines class tokens Z with neighbours chosen among Z and the (detached) patch tokens.

    Args:
        dim: token width D.
        topk_ratio: k = max(1, int(topk_ratio * K)), the ratio applies to the number of class
            tokens (METHOD.md §3: VOC 10, COCO 40); at least one neighbour, so K = 1 (k = int(0.5) = 0
            would leave an empty softmax, NaN) keeps a graph of one edge a class.
        dropout: dropout before the final LayerNorm (reference: 0).
        gate_score: how a neighbour's gate score s is formed from neighbour Nb and gate g.
            "reference" (default): (sum_D Nb) * (sum_D g), what the reference computes with
            ``einsum('ijkl,ijkm->ijk')`` (the two D indices differ, so both are summed apart);
            "dot": sum_D Nb * g, the formula as written in METHOD.md §3.
    """

    def __init__(self, dim: int = 768, topk_ratio: float = 0.5, dropout: float = 0.0,
                 gate_score: Literal["reference", "dot"] = "reference") -> None:
        super().__init__()
        if gate_score not in ("reference", "dot"):
            raise ValueError(f"gate_score must be 'reference' or 'dot', got {gate_score!r}")
        # Unused by the forward; present so reference checkpoints load strictly. Frozen (it never
        # gets a gradient anyway) so DDP does not need find_unused_parameters.
        self._fc1 = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU()).requires_grad_(False)
        self.head_proj = nn.Linear(dim, dim)
        self.tail_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.scale = dim ** -0.5
        self.topk_ratio = topk_ratio
        self.gate_score = gate_score

    def forward(self, class_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """class_tokens: (B, K, D), patch_tokens: (B, N, D) (detached here) -> (B, K, D)."""
        B, K, D = class_tokens.shape
        k = max(1, int(self.topk_ratio * K))
        e_h = self.head_proj(class_tokens)  # (B, K, D)
        e_t = self.tail_proj(torch.cat([class_tokens, patch_tokens.detach()], dim=1))  # (B, K+N, D)

        logits = (e_h * self.scale) @ e_t.transpose(1, 2)  # (B, K, K+N)
        a, idx = logits.topk(k, dim=-1)  # (B, K, k)
        batch = torch.arange(B, device=idx.device).view(B, 1, 1)
        nb = e_t[batch, idx]  # (B, K, k, D)

        p = a.softmax(dim=-1).unsqueeze(-1)  # (B, K, k, 1)
        e_h4 = e_h.unsqueeze(2)  # (B, K, 1, D)
        r = (1 - p) * e_h4 + p * nb
        gate = torch.tanh(e_h4 + r)
        if self.gate_score == "reference":
            s = nb.sum(-1) * gate.sum(-1)
        else:
            s = (nb * gate).sum(-1)  # (B, K, k)
        e_n = (s.softmax(dim=-1).unsqueeze(2) @ nb).squeeze(2)  # (B, K, D)

        out = (F.leaky_relu(self.linear1((e_h + e_n) * 0.1 + class_tokens))
               + F.leaky_relu(self.linear2(e_h * e_n * 0.1 + class_tokens)))
        return self.norm(self.dropout(out))
