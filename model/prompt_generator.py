"""Prompt generator: a UNETR-like 3D CNN decoder that turns encoder features into prompts.

Inputs are the neck output and the token grids after the global-attention blocks, each seen
as a ``[B, ch, T, h, w]`` volume, and the raw input slab ``[B, C_in, T, H, W]``. The neck
volume is decoded and upsampled (in-plane, x2 per stage) to 1/4 of the input, fusing a
projected and upsampled global-block feature at each stage (UNETR's skip connections; fused
by addition rather than concatenation, which halves the cost of the 3x3x3 convolutions).
As in UNETR, the finest stage also fuses a skip from the raw input: the slab is folded
space-to-depth onto the 1/4 grid (each cell keeps its 4x4 full-resolution pixels as channels,
nothing is averaged away) and goes through a 3x3x3 conv block. Without it the masks only see
the ViT's 16-pixel tokens and cannot follow organ boundaries. (A conv block at full
resolution followed by a strided projection fitted no better and cost ~20% of the tiny
model's CPU training step.) Outputs, per slice and query:

- ``aux_masks``: mask logits ``[B, T, Q, 4 H/p, 4 W/p]`` for ViT patch ``p`` (SAM's mask-input size);
- ``aux_boxes``: ``[B, T, Q, 4]`` normalised ``(x0, y0, x1, y1)``: the mean of a regressed box
  and the box around ``aux_masks > 0`` (computed without gradient; where the mask is empty the
  regressed box alone);
- ``aux_tokens``: ``[B, T, Q, C]`` auxiliary classifier tokens for the mask decoder.

Masks are MaskFormer-style: per-pixel embeddings (1x1 conv of the finest features) dotted with
a per-(slice, query) embedding (an MLP of a learned query embedding plus the slice's global
context). A linear 1x1 head on a few normalised channels grew its logits too slowly to fit.
Query features for boxes and tokens are the mask-weighted average of the finest decoder
features plus that query embedding.

Gradient routing: the mask branch is trained by its own supervision (the criterion's
auxiliary mask terms) only. Boxes and tokens read the trunk features, the query embedding and
the mask weights through a stop-gradient (so do the dense mask prompt in ``MaskSAM`` and the
box-from-mask, as SAM feeds mask prompts back without gradient). Without it, the decoder's
class/mask/box losses reach the shared trunk through the tokens and boxes and overwhelm the
auxiliary mask loss: on a single slab the final masks fit (Dice 0.99) while the auxiliary
Dice loss stayed at ~0.7 (tests/test_overfit.py).
"""

from __future__ import annotations

import torch
from torch import nn

from segment_anything.modeling.mask_decoder import MLP


def _to_volume(x: torch.Tensor, depth: int) -> torch.Tensor:
    """``[B*T, ch, h, w]`` -> ``[B, ch, T, h, w]``."""
    bt, c, h, w = x.shape
    return x.reshape(-1, depth, c, h, w).transpose(1, 2)


def _space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C*f*f, T, H/f, W/f]`` (in-plane pixel unshuffle)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // f, f, w // f, f).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * f * f, t, h // f, w // f)


class ConvBlock3d(nn.Sequential):
    """Conv3d 3x3x3 -> InstanceNorm3d -> GELU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.GELU(),
        )


def mask_boxes(mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(x0, y0, x1, y1)`` normalised to [0, 1] around ``mask_logits > 0`` (no grad).

    ``mask_logits``: ``[..., h, w]``. Returns boxes ``[..., 4]`` and a bool ``[...]`` telling
    which masks are non-empty (empty masks get a zero box). Traceable: no data-dependent shapes.
    """
    with torch.no_grad():
        m = mask_logits > 0
        h, w = m.shape[-2], m.shape[-1]
        cols = m.any(dim=-2)  # [..., w]
        rows = m.any(dim=-1)  # [..., h]
        xs = torch.arange(w, device=m.device, dtype=torch.float32)
        ys = torch.arange(h, device=m.device, dtype=torch.float32)
        big = float(max(h, w) + 1)
        x0 = torch.where(cols, xs, torch.full_like(xs, big)).amin(dim=-1)
        x1 = torch.where(cols, xs, torch.full_like(xs, -1.0)).amax(dim=-1) + 1.0
        y0 = torch.where(rows, ys, torch.full_like(ys, big)).amin(dim=-1)
        y1 = torch.where(rows, ys, torch.full_like(ys, -1.0)).amax(dim=-1) + 1.0
        nonempty = cols.any(dim=-1)
        box = torch.stack([x0 / w, y0 / h, x1 / w, y1 / h], dim=-1)
        box = torch.where(nonempty[..., None], box, torch.zeros_like(box))
    return box, nonempty


class PromptGenerator(nn.Module):
    """UNETR-like decoder predicting auxiliary masks, boxes and classifier tokens."""

    def __init__(
        self,
        *,
        encoder_dim: int,
        neck_dim: int,
        num_global: int,
        num_queries: int,
        token_dim: int,
        in_channels: int = 1,
        width: int = 64,
        stages: int = 2,
        min_width: int = 16,
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.num_global = num_global
        # the finest stage feeds a linear mask head: keep it at least ``min_width`` wide
        chans = [max(min_width, width // (2**s)) for s in range(stages + 1)]
        # ViT patch p -> the finest grid is input / factor = 4x the token grid (SAM's mask input)
        factor = patch_size // 2**stages
        if factor < 1 or factor * 2**stages != patch_size:
            raise ValueError(f"patch_size {patch_size} is not divisible by 2**stages = {2**stages}")
        self.factor = factor
        self.input_block = ConvBlock3d(in_channels * factor * factor, chans[-1])
        self.bottom = ConvBlock3d(neck_dim, chans[0])
        self.skip_proj = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for s in range(1, stages + 1):
            f = 2**s
            self.skip_proj.append(
                nn.Sequential(
                    nn.Conv3d(encoder_dim, chans[s], kernel_size=1),
                    nn.ConvTranspose3d(chans[s], chans[s], kernel_size=(1, f, f), stride=(1, f, f)),
                )
            )
            self.ups.append(nn.ConvTranspose3d(chans[s - 1], chans[s], kernel_size=(1, 2, 2), stride=(1, 2, 2)))
            self.fuse.append(ConvBlock3d(chans[s], chans[s]))
        hidden = max(64, token_dim)
        self.query_embed = nn.Embedding(num_queries, hidden)
        self.ctx_proj = nn.Linear(chans[0], hidden)
        # MaskFormer's mask head: per-pixel embeddings dotted with per-(slice, query) embeddings
        self.pixel_embed = nn.Conv3d(chans[-1], hidden, kernel_size=1)
        self.mask_embed = MLP(hidden, hidden, hidden, 2)
        self.pool_proj = nn.Linear(chans[-1], hidden)
        self.box_head = MLP(hidden, hidden, 4, 3)
        self.token_head = MLP(hidden, hidden, token_dim, 2)

    def forward(
        self, neck: torch.Tensor, feats: list[torch.Tensor], image: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``neck``: ``[B*T, C, h, w]``; ``feats``: global-block tokens ``[B*T, h, w, D]``;
        ``image``: the raw slab ``[B, C_in, T, H, W]`` (UNETR's input skip)."""
        depth = image.shape[2]
        y = self.bottom(_to_volume(neck, depth))
        ctx = y.mean(dim=(-2, -1)).transpose(1, 2)  # [B, T, c0]
        n = len(feats)
        for s, (proj, up, fuse) in enumerate(zip(self.skip_proj, self.ups, self.fuse), start=1):
            skip = feats[max(0, n - 1 - s)].permute(0, 3, 1, 2)
            skip = proj(_to_volume(skip, depth))
            if s == len(self.fuse):
                skip = skip + self.input_block(_space_to_depth(image, self.factor))
            y = fuse(up(y) + skip)
        q0 = self.ctx_proj(ctx)[:, :, None] + self.query_embed.weight  # [B, T, Q, hidden]
        pix = self.pixel_embed(y)  # [B, hidden, T, h4, w4]
        masks = torch.einsum("btqe,bethw->btqhw", self.mask_embed(q0), pix)
        # mask-weighted pooling of the finest features per query
        wts = torch.sigmoid(masks.detach()).flatten(3)  # [B, T, Q, HW]
        f = y.detach().transpose(1, 2).flatten(3)  # [B, T, c, HW]
        pooled = (wts @ f.transpose(-1, -2)) / (wts.sum(-1, keepdim=True) + 1.0)  # [B, T, Q, c]
        hq = self.pool_proj(pooled) + q0.detach()
        cxcywh = torch.sigmoid(self.box_head(hq))
        half = cxcywh[..., 2:] / 2
        reg = torch.cat([cxcywh[..., :2] - half, cxcywh[..., :2] + half], dim=-1).clamp(0.0, 1.0)
        mbox, nonempty = mask_boxes(masks)
        boxes = torch.where(nonempty[..., None], (reg + mbox) / 2, reg)
        return {"aux_masks": masks, "aux_boxes": boxes, "aux_tokens": self.token_head(hq)}
