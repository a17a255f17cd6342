"""Adapters that give SAM's 2D blocks a sense of the slice axis (zero-initialised).

Both adapters return a *delta* whose last projection starts at zero, so inserting them with a
residual leaves the pretrained SAM's function unchanged at step 0.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthConvAdapter(nn.Module):
    """3D depth-convolution adapter over the full token grid of a slab.

    Linear down-projection (D -> r), depthwise ``Conv3d`` 3x3x3 across (slice, row, column),
    LayerNorm, GELU, Linear up-projection (r -> D, zero-initialised). The convolution sees the
    *unpartitioned* ``[B, r, T, h, w]`` volume, i.e. it mixes neighbouring slices, not the
    attention windows that the public reference code mixed by mistake.
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """``x``: tokens ``[B*T, h, w, D]`` (slices of each slab contiguous); returns the delta."""
        bt, h, w, _ = x.shape
        y = self.down(x)
        r = y.shape[-1]
        # [B*T, h, w, r] -> [B, r, T, h, w]
        y = y.reshape(-1, depth, h, w, r).permute(0, 4, 1, 2, 3)
        y = self.conv(y)
        y = y.permute(0, 2, 3, 4, 1).reshape(bt, h, w, r)
        return self.up(self.act(self.norm(y)))


class DepthMLPAdapter(nn.Module):
    """3D depth-MLP adapter for decoder tokens: mixes each token of each query along the slices.

    Tokens ``[B*T*Q, N, C]`` are viewed as ``[B, Q, N, C, T]``; per channel, a small MLP acts
    along T. The reference MLP has a weight of size T x T, which ties the network to one slab
    depth; here the slice mixing is a weight-shared banded MLP (each slice with its two
    neighbours, i.e. a depthwise kernel-3 convolution along T), which is the same operator
    restricted to neighbours and works for any T (sliding windows, the last partial slab).
    LayerNorm -> Linear C->r -> GELU -> slice mixing -> GELU -> Linear r->C (zero-init).
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.mix = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, depth: int, num_queries: int) -> torch.Tensor:
        """``tokens``: ``[B*T*Q, N, C]`` ordered (batch, slice, query); returns the delta."""
        btq, n, _ = tokens.shape
        y = self.act(self.down(self.norm(tokens)))
        r = y.shape[-1]
        # [B, T, Q, N, r] -> [B*Q*N, r, T]
        y = y.reshape(-1, depth, num_queries, n, r).permute(0, 2, 3, 4, 1).reshape(-1, r, depth)
        y = self.act(self.mix(y))
        y = y.reshape(-1, num_queries, n, r, depth).permute(0, 4, 1, 2, 3).reshape(btq, n, r)
        return self.up(y)
