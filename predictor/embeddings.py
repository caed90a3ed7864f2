"""Expert-set embeddings shared by the predictor and its routing memory."""

from __future__ import annotations

import torch
from torch import nn


def expert_multi_hot(experts: torch.Tensor, num_experts: int, dtype=torch.float32) -> torch.Tensor:
    """(..., L', k) expert ids, -1 = padding -> (..., L', E) multi-hot (padding sets nothing)."""
    out = torch.zeros(*experts.shape[:-1], num_experts + 1, dtype=dtype, device=experts.device)
    out.scatter_(-1, torch.where(experts >= 0, experts, num_experts).long(), 1.0)
    return out[..., :num_experts]


class ExpertSetEmbedding(nn.Module):
    """Sum of learned (layer, expert) embeddings of an expert set: (..., L', k) -> (..., D).

    Computed as the multi-hot (..., L', E) times a (L, E, D) table (faster than a gather-sum on CPU,
    forward and backward); id -1 (padding) contributes nothing. `per_layer` keeps layers apart.
    """

    def __init__(self, num_layers: int, num_experts: int, d: int):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_layers, num_experts, d))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, experts: torch.Tensor) -> torch.Tensor:  # (..., L, k) -> (..., D)
        n = experts.shape[-2]
        hot = expert_multi_hot(experts, self.num_experts, self.weight.dtype)  # (..., L, E)
        return hot.flatten(-2) @ self.weight[:n].flatten(0, 1)

    def per_layer(self, experts: torch.Tensor) -> torch.Tensor:  # (..., L', k) -> (..., L', D)
        n = experts.shape[-2]
        hot = expert_multi_hot(experts, self.num_experts, self.weight.dtype)  # (..., L', E)
        return torch.einsum("...le,led->...ld", hot, self.weight[:n])
