"""SAM's prompt encoder with the paper's temporal embedding on its dense positional encoding.

segment-anything's ``PromptEncoder`` gives one dense positional encoding ``[1, C, h, w]`` for
every image. The paper adds a zero-initialised, learned ``(T, C, h, w)`` table to it, one map
per slice position of the slab, so the mask decoder's image tokens know their slice
(``prompt_temporal_embedding: true``). Parameter names are SAM's plus ``temporal_embed``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder
from torch import nn


class TemporalPromptEncoder(PromptEncoder):
    """``PromptEncoder`` + an optional per-slice temporal embedding of the dense PE."""

    def __init__(self, *args, slab_depth: int = 1, temporal: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        h, w = self.image_embedding_size
        self.temporal_embed: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(slab_depth, self.embed_dim, h, w)) if temporal else None
        )

    def slab_dense_pe(self, batch: int, depth: int) -> torch.Tensor:
        """Dense PE for a batch of slabs: ``[1, C, h, w]`` without the temporal embedding, else
        ``[B*T, C, h, w]`` (slices of each slab contiguous). Another slab depth than the table's
        resamples it linearly along T."""
        pe = self.get_dense_pe()
        emb = self.temporal_embed
        if emb is None:
            return pe
        if emb.shape[0] != depth:
            t, c, h, w = emb.shape
            e = emb.reshape(t, -1).t().unsqueeze(0)  # [1, C*h*w, T]
            e = F.interpolate(e, size=depth, mode="linear", align_corners=True)
            emb = e.squeeze(0).t().reshape(depth, c, h, w)
        pe = pe + emb  # [T, C, h, w]
        return pe.unsqueeze(0).expand(batch, *pe.shape).reshape(batch * depth, *pe.shape[1:])
