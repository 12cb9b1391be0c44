"""The two-layer MLP (Linear, GELU, Linear) used for both adaptors and for the image head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear


class MLPAdaptor(nn.Module):
    """Understanding adaptor (vision width -> D), generation adaptor (code dim -> D), image head (D -> codebook)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = Linear(in_dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
