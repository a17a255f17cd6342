"""SAM's ViT image encoder run on the slices of a slab, with 3D depth-convolution adapters.

Parameter names mirror ``segment_anything.modeling.ImageEncoderViT`` (``patch_embed``,
``pos_embed``, ``blocks.{i}.{norm1,attn,norm2,mlp}``, ``neck``) so SAM checkpoints load
unchanged; the additions are ``blocks.{i}.adapter.*`` and ``temporal_embed``.

Adapter placement (``encoder_adapter``):

- ``serial`` (the demo's): one light adapter inside every block, after the attention residual
  and before the MLP (``x = x + attn(norm1(x)); x = x + adapter(x); x = x + mlp(norm2(x))``),
  as in the Medical-SAM-Adapter family MaskSAM builds on; parameters ``blocks.{i}.adapter.*``;
- ``paper``: two hidden-residual adapters (:class:`HiddenDepthConvAdapter`), one on the
  attention branch and one parallel to the MLP scaled by ``mlp_scale`` (0.5):
  ``a = attn(norm1(x)); x = x + a + A_attn(a); n = norm2(x); x = x + mlp(n) + 0.5 A_mlp(n)``;
  parameters ``blocks.{i}.attn_adapter.*`` and ``blocks.{i}.mlp_adapter.*``.

Every adapter runs on the unpartitioned token grid of the whole slab (after
``window_unpartition``), so its 3x3x3 convolution mixes neighbouring slices, never windows.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block, PatchEmbed, window_partition, window_unpartition
from torch import nn

from .adapters import DepthConvAdapter, HiddenDepthConvAdapter


class AdaptedBlock(Block):
    """SAM's ViT block plus depth-convolution adapters (``serial`` or ``paper``, see module)."""

    def __init__(
        self, *args, adapter_ratio: Optional[float] = 0.25, adapter_style: str = "serial",
        mlp_scale: float = 0.5, **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        dim = self.norm1.normalized_shape[0]
        self.adapter: Optional[nn.Module] = None
        self.attn_adapter: Optional[HiddenDepthConvAdapter] = None
        self.mlp_adapter: Optional[HiddenDepthConvAdapter] = None
        self.mlp_scale = mlp_scale
        if adapter_ratio is not None:
            if adapter_style == "paper":
                self.attn_adapter = HiddenDepthConvAdapter(dim, adapter_ratio)
                self.mlp_adapter = HiddenDepthConvAdapter(dim, adapter_ratio)
            elif adapter_style == "serial":
                self.adapter = DepthConvAdapter(dim, adapter_ratio)
            else:
                raise ValueError(f"unknown encoder adapter style {adapter_style!r}")

    def forward(self, x: torch.Tensor, depth: int = 1) -> torch.Tensor:  # type: ignore[override]
        """``x``: ``[B*T, h, w, D]``; ``depth`` = T, the slices of one slab."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        if self.attn_adapter is not None:
            x = x + self.attn_adapter(x, depth)
        x = shortcut + x
        if self.adapter is not None:
            x = x + self.adapter(x, depth)
        if self.mlp_adapter is not None:
            xn = self.norm2(x)
            return x + self.mlp(xn) + self.mlp_scale * self.mlp_adapter(xn, depth)
        x = x + self.mlp(self.norm2(x))
        return x


class MaskSAMImageEncoder(nn.Module):
    """ViT encoder over ``[B*T, 3, H, W]`` slices; returns the neck output and global features."""

    def __init__(
        self,
        *,
        img_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: Sequence[int],
        window_size: int,
        out_chans: int,
        slab_depth: int,
        adapter_ratio: Optional[float],
        use_temporal_embedding: bool,
        patch_size: int = 16,
        mlp_ratio: float = 4.0,
        adapter_style: str = "serial",
        mlp_adapter_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.global_attn_indexes = tuple(global_attn_indexes)
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size), stride=(patch_size, patch_size),
            in_chans=3, embed_dim=embed_dim,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.temporal_embed: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(1, slab_depth, 1, 1, embed_dim)) if use_temporal_embedding else None
        )
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            AdaptedBlock(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                norm_layer=norm, act_layer=nn.GELU, use_rel_pos=True, rel_pos_zero_init=True,
                window_size=0 if i in self.global_attn_indexes else window_size,
                input_size=(grid, grid), adapter_ratio=adapter_ratio, adapter_style=adapter_style,
                mlp_scale=mlp_adapter_scale,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def _temporal(self, depth: int) -> torch.Tensor:
        emb = self.temporal_embed
        assert emb is not None
        if emb.shape[1] == depth:
            return emb
        # another slab depth: resample the slice-position table linearly along T
        d = emb.shape[-1]
        e = emb.reshape(1, -1, d).transpose(1, 2)
        e = F.interpolate(e, size=depth, mode="linear", align_corners=True)
        return e.transpose(1, 2).reshape(1, depth, 1, 1, d)

    def _patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``self.patch_embed`` (a stride = kernel conv) as patches @ weight: ``[N, 3, H, W]``
        -> ``[N, H/p, W/p, D]``. Same function; on the CPU the conv's backward was a tenth
        of the tiny model's training step, the matrix product's is a few per cent."""
        proj = self.patch_embed.proj
        d, c, p, _ = proj.weight.shape
        n, _, hh, ww = x.shape
        h, w = hh // p, ww // p
        cols = x.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h, w, c * p * p)
        return F.linear(cols, proj.weight.reshape(d, c * p * p), proj.bias)

    def forward(self, x: torch.Tensor, depth: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x``: ``[B*T, 3, H, W]``. Returns neck ``[B*T, C, h, w]`` and the token grids
        ``[B*T, h, w, D]`` after each global-attention block (for the prompt generator)."""
        x = self._patch_embed(x) + self.pos_embed
        if self.temporal_embed is not None:
            bt, h, w, d = x.shape
            x = (x.reshape(-1, depth, h, w, d) + self._temporal(depth)).reshape(bt, h, w, d)
        feats: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, depth)
            if i in self.global_attn_indexes:
                feats.append(x)
        return self.neck(x.permute(0, 3, 1, 2)), feats
