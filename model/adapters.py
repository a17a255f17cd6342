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


class HiddenDepthConvAdapter(nn.Module):
    """The paper's depth-convolution adapter, with a residual in the hidden space.

    Linear D -> r, GELU, depthwise ``Conv3d`` 3x3x3 over the ``(T, h, w)`` token grid of each
    slab (per query, for decoder image tokens), channel LayerNorm (LayerNorm3d, eps 1e-6),
    GELU, ``hidden + conv branch``, Linear r -> D. Returns the *delta*; the up-projection is
    zero-initialised (the project's choice, so a loaded SAM is unchanged at step 0).

    The convolution always sees the unpartitioned grid (the public reference code applied its
    attention-branch adapter inside the window partition, so its "depth" axis mixed windows).
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, depth: int, num_queries: int = 1) -> torch.Tensor:
        """``x``: ``[B*T*Q, h, w, D]`` ordered (batch, slice, query) (``Q = 1`` for the encoder's
        ``[B*T, h, w, D]``); returns the delta of the same shape."""
        n, h, w, _ = x.shape
        y = self.act(self.down(x))
        r = y.shape[-1]
        # [B, T, Q, h, w, r] -> [B*Q, r, T, h, w]
        z = y.reshape(-1, depth, num_queries, h, w, r).permute(0, 2, 5, 1, 3, 4).reshape(-1, r, depth, h, w)
        z = self.conv(z)
        z = z.reshape(-1, num_queries, r, depth, h, w).permute(0, 3, 1, 4, 5, 2)  # [B, T, Q, h, w, r]
        z = self.act(self.norm(z)).reshape(n, h, w, r)
        return self.up(y + z)


class SliceMLPAdapter(nn.Module):
    """The paper's depth-MLP adapter for decoder tokens (residual in the hidden space).

    Tokens ``[B*T*Q, N, C]`` ordered (batch, slice, query): Linear C -> r, GELU; per query,
    token and hidden channel an MLP along the slice axis, Linear(T, 4T), GELU, Linear(4T, T);
    ``hidden + slice branch``; Linear r -> C (zero-initialised). The slice MLP's weights are
    T x 4T, so the adapter is tied to the slab depth it was built for (the sliding window
    always feeds full slabs).
    """

    def __init__(self, dim: int, depth: int, ratio: float = 0.25, t_ratio: int = 4) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.depth = depth
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.t_fc1 = nn.Linear(depth, depth * t_ratio)
        self.t_fc2 = nn.Linear(depth * t_ratio, depth)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, depth: int, num_queries: int) -> torch.Tensor:
        """``tokens``: ``[B*T*Q, N, C]``; returns the delta of the same shape."""
        if depth != self.depth:
            raise ValueError(
                f"the decoder's slice-MLP adapters were built for slabs of {self.depth} slices, got {depth} "
                "(decoder_adapters: paper ties the model to model.slab_depth)"
            )
        n, k, _ = tokens.shape
        y = self.act(self.down(tokens))
        r = y.shape[-1]
        # [B, T, Q, N, r] -> [B, Q, N, r, T]
        z = y.reshape(-1, depth, num_queries, k, r).permute(0, 2, 3, 4, 1)
        z = self.t_fc2(self.act(self.t_fc1(z)))
        z = z.permute(0, 4, 1, 2, 3).reshape(n, k, r)
        return self.up(y + z)
