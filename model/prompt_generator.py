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
        with_tokens: bool = True,
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
        # without aux classifier tokens (use_aux_class_tokens: false) no token head: its
        # parameters would get no gradient, which DDP refuses without find_unused_parameters
        self.token_head = MLP(hidden, hidden, token_dim, 2) if with_tokens else None

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
        out = {"aux_masks": masks, "aux_boxes": boxes}
        if self.token_head is not None:
            out["aux_tokens"] = self.token_head(hq)
        return out


# ----------------------------------------------------------------------------------------------
# The paper's full-width prompt generator (prompt_generator: full)
# ----------------------------------------------------------------------------------------------

class NnUNetConvBlock(nn.Sequential):
    """nnU-Net's conv block: Conv3d (bias) -> InstanceNorm3d (affine, eps 1e-5) -> LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, kernel_size=kernel_size, padding=kernel_size // 2, bias=True),
            nn.InstanceNorm3d(cout, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01),
        )


def _up2(cin: int, cout: int) -> nn.ConvTranspose3d:
    """In-plane x2 transposed convolution, kernel = stride = (1, 2, 2)."""
    return nn.ConvTranspose3d(cin, cout, kernel_size=(1, 2, 2), stride=(1, 2, 2))


def adaptive_pool_planes(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool3d(x, (T, size, size))`` for ``x [B, C, T, h, w]``, exported to ONNX
    without adaptive pooling: a reshape-mean where ``size`` divides the plane, else the same
    bins as averaging matrices."""
    b, c, t, h, w = x.shape
    if h % size == 0 and w % size == 0:
        return x.reshape(b, c, t, size, h // size, size, w // size).mean(dim=(4, 6))

    def bins(n: int) -> torch.Tensor:
        # torch's adaptive pooling bins: [floor(i n / s), ceil((i + 1) n / s)); a constant matrix
        # built from Python numbers (traces and exports as an initialiser)
        n = int(n)
        rows = []
        for i in range(size):
            lo, hi = (i * n) // size, -((-(i + 1) * n) // size)
            rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(n)])
        return torch.tensor(rows, dtype=x.dtype, device=x.device)

    return bins(h) @ x @ bins(w).transpose(0, 1)  # [s, h] @ [.., h, w] @ [w, s]


class FullPromptGenerator(nn.Module):
    """The paper's UNETR-like prompt generator (paper-recipe.md, "Prompt generator").

    Five decoder stages of widths ``widths`` (the paper: 256, 128, 128, 64, 64). Stage 0 decodes
    the neck ``[B, 256, T, h, w]`` at the token grid (two conv blocks); stage ``s >= 1``
    upsamples the stage below x2 in-plane (ConvTranspose3d (1, 2, 2)), concatenates the
    ``s``-th global-attention output counted from the last (lifted x 2^s by ``s`` pairs of
    ConvTranspose3d + conv block, UNETR's skip path), and fuses with one conv block. With ViT
    patch ``p`` there are ``1 + log2(p)`` stages, so the last is at full input resolution;
    stages beyond the available global outputs (the tiny variant) have no skip. Outputs:

    - ``aux_masks`` ``[B, T, Q, H, W]``: 1x1x1 conv of the last stage (logits; the public code
      applied sigmoid twice before BCE-with-logits, not here);
    - ``aux_boxes`` ``[B, T, Q, 4]``: every stage pooled to ``(T, 2, 2)``, concatenated, 1x1x1
      conv -> Q, InstanceNorm, sigmoid; the 2x2 map reads ``[[lx, ly], [px, py]]``: top-left
      ``(lx, ly)``, bottom-right ``tl + (1 - tl) * p``; averaged with the box of
      ``aux_masks > 0`` where that mask is non-empty (the public code averaged with a zero box
      when empty, halving the regressed box; here the regressed box alone);
    - ``aux_tokens`` ``[B, T, Q, C]``: every stage pooled to ``(T, s, s)`` with ``s * s = C``
      (16 x 16 = 256), concatenated, 3x3x3 conv -> Q, InstanceNorm, GELU; each ``s x s`` map
      flattened is one token per (slice, query).

    No stop-gradient: as in the paper, the box, token and decoder losses reach the trunk.
    """

    def __init__(
        self,
        *,
        encoder_dim: int,
        neck_dim: int,
        num_global: int,
        num_queries: int,
        token_dim: int,
        widths: tuple[int, ...] = (256, 128, 128, 64, 64),
        patch_size: int = 16,
        with_tokens: bool = True,
    ) -> None:
        super().__init__()
        ups = patch_size.bit_length() - 1
        if 2**ups != patch_size:
            raise ValueError(f"patch_size must be a power of 2, got {patch_size}")
        if len(widths) < ups + 1:
            raise ValueError(f"{ups + 1} stages need {ups + 1} widths, got {widths}")
        side = int(round(token_dim ** 0.5))
        if side * side != token_dim:
            raise ValueError(f"aux tokens are s x s maps: token_dim {token_dim} must be a square")
        self.token_side = side
        self.num_queries = num_queries
        self.num_global = num_global
        w = list(widths[: ups + 1])
        self.widths = tuple(w)
        self.bottom = nn.Sequential(NnUNetConvBlock(neck_dim, w[0]), NnUNetConvBlock(w[0], w[0]))
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for s in range(1, ups + 1):
            self.ups.append(_up2(w[s - 1], w[s]))
            if s <= num_global:
                layers: list[nn.Module] = [_up2(encoder_dim, w[s]), NnUNetConvBlock(w[s], w[s])]
                for _ in range(s - 1):
                    layers += [_up2(w[s], w[s]), NnUNetConvBlock(w[s], w[s])]
                self.skips.append(nn.Sequential(*layers))
                self.fuse.append(NnUNetConvBlock(2 * w[s], w[s]))
            else:
                self.skips.append(nn.Identity())
                self.fuse.append(NnUNetConvBlock(w[s], w[s]))
        total = sum(w)
        self.mask_head = nn.Conv3d(w[-1], num_queries, kernel_size=1)
        self.box_head = nn.Sequential(
            nn.Conv3d(total, num_queries, kernel_size=1, bias=False),
            nn.InstanceNorm3d(num_queries, eps=1e-5, affine=True),
            nn.Sigmoid(),
        )
        # without aux classifier tokens (use_aux_class_tokens: false) no token head: no
        # parameters without gradient (DDP refuses them)
        self.token_head = nn.Sequential(
            nn.Conv3d(total, num_queries, kernel_size=3, padding=1),
            nn.InstanceNorm3d(num_queries, eps=1e-5, affine=True),
            nn.GELU(),
        ) if with_tokens else None

    def forward(
        self, neck: torch.Tensor, feats: list[torch.Tensor], image: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``neck``: ``[B*T, C, h, w]``; ``feats``: global-block tokens ``[B*T, h, w, D]``;
        ``image``: the raw slab ``[B, C_in, T, H, W]`` (only its depth is read)."""
        depth = image.shape[2]
        y = self.bottom(_to_volume(neck, depth))
        stages = [y]
        n = len(feats)
        for s, (up, skip, fuse) in enumerate(zip(self.ups, self.skips, self.fuse), start=1):
            y = up(y)
            if s <= self.num_global:
                f = _to_volume(feats[n - s].permute(0, 3, 1, 2), depth)
                y = torch.cat([y, skip(f)], dim=1)
            y = fuse(y)
            stages.append(y)
        masks = self.mask_head(y).transpose(1, 2)  # [B, T, Q, H, W]
        boxes_in = torch.cat([adaptive_pool_planes(v, 2) for v in stages], dim=1)
        corners = self.box_head(boxes_in).permute(0, 2, 1, 3, 4)  # [B, T, Q, 2, 2]
        tl, frac = corners[..., 0, :], corners[..., 1, :]
        reg = torch.cat([tl, tl + (1.0 - tl) * frac], dim=-1)  # (x0, y0, x1, y1)
        mbox, nonempty = mask_boxes(masks)
        boxes = torch.where(nonempty[..., None], (reg + mbox) / 2, reg)
        out = {"aux_masks": masks, "aux_boxes": boxes}
        if self.token_head is not None:
            tok_in = torch.cat([adaptive_pool_planes(v, self.token_side) for v in stages], dim=1)
            out["aux_tokens"] = self.token_head(tok_in).permute(0, 2, 1, 3, 4).flatten(3)  # [B, T, Q, s*s]
        return out
