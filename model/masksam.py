"""The MaskSAM network: slab in, per-slice query masks and class logits out.

Data flow for ``x: [B, C_in, T, H, W]``:
stem (``linear``: 1x1x1 conv C_in -> 3, initialised to replicate the intensity; ``conv``: the
paper's two 3x3x3 conv blocks) -> slices folded into the batch -> adapted SAM ViT
(``image_encoder``) -> prompt generator (aux masks, boxes, classifier tokens) -> SAM
``prompt_encoder`` (box corners as sparse, the aux mask, as logits or binarised, as dense
embeddings; optionally a per-slice temporal embedding on its dense PE) -> classifier mask
decoder -> mask upsampler. The output dict follows docs/architecture.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder
from torch import nn

from .config import MaskSAMConfig
from .image_encoder import MaskSAMImageEncoder
from .mask_decoder import ClassMaskDecoder


class MaskSAM(nn.Module):
    """Prompt-free, mask-classification SAM over slabs of T slices (see module docstring)."""

    def __init__(
        self,
        cfg: MaskSAMConfig,
        *,
        stem: nn.Module,
        image_encoder: MaskSAMImageEncoder,
        prompt_generator: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: ClassMaskDecoder,
        mask_upsampler: nn.Module,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = stem
        self.image_encoder = image_encoder
        self.prompt_generator = prompt_generator
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.mask_upsampler = mask_upsampler

    @property
    def num_queries(self) -> int:
        return int(self.cfg.num_queries)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: ``[B, C_in, T, H, W]`` -> ``pred_logits [B,T,Q,K+1]``, ``pred_masks
        [B,T,Q,H,W]``, ``aux_masks [B,T,Q,h,w]`` (``h = 4H/p`` for p = patch_size with the light
        prompt generator, ``h = H`` with the full one), ``aux_boxes [B,T,Q,4]`` (x0,y0,x1,y1 in
        [0, 1])."""
        if x.dim() != 5:
            raise ValueError(f"MaskSAM expects x of shape [B, C, T, H, W], got {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        size = self.cfg.img_size
        if c != self.cfg.in_channels or h != size or w != size:
            raise ValueError(
                f"MaskSAM built for {self.cfg.in_channels} channel(s) at {size}x{size}; got input {tuple(x.shape)}"
            )
        q = self.num_queries
        slices = x.transpose(1, 2).reshape(b * t, c, h, w)
        rgb = self.stem(x).transpose(1, 2).reshape(b * t, 3, h, w)
        neck, feats = self.image_encoder(rgb, t)
        pg = self.prompt_generator(neck, feats, x)
        aux_masks, aux_boxes = pg["aux_masks"], pg["aux_boxes"]
        mh, mw = aux_masks.shape[-2:]
        boxes = aux_boxes.reshape(b * t * q, 4) * size if self.cfg.use_aux_boxes else None
        # the mask prompt is read without gradient (as SAM feeds back its low-res logits); the
        # aux masks learn from their own loss terms (see prompt_generator's docstring)
        dense_in = aux_masks.detach().reshape(b * t * q, 1, mh, mw)
        if self.cfg.mask_prompt == "binary":  # the paper: sigmoid > 0.5, as 0/1
            dense_in = (dense_in > 0).to(dense_in.dtype)
        side = 4 * (size // self.cfg.patch_size)  # SAM's mask-input size, 4x the token grid
        if (mh, mw) != (side, side):
            dense_in = F.interpolate(dense_in, size=(side, side), mode="nearest")
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=dense_in)
        aux_tokens = pg["aux_tokens"] if self.cfg.use_aux_class_tokens else None
        pe_fn = getattr(self.prompt_encoder, "slab_dense_pe", None)
        image_pe = pe_fn(b, t) if pe_fn is not None else self.prompt_encoder.get_dense_pe()
        low, logits = self.mask_decoder(
            neck, image_pe, sparse, dense, aux_tokens, t, q, mode=self.cfg.decoder_mode
        )
        masks = self.mask_upsampler(low, slices, q, depth=t)
        return {
            "pred_logits": logits.reshape(b, t, q, -1),
            "pred_masks": masks.reshape(b, t, q, h, w),
            "aux_masks": aux_masks,
            "aux_boxes": aux_boxes,
        }

    @staticmethod
    def combine(pred_logits: torch.Tensor, pred_masks: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Per-class maps ``[B, K, T, H, W]`` from ``pred_logits [B,T,Q,K+1]`` and
        ``pred_masks [B,T,Q,H,W]``: softmax over K+1, drop "no object", times sigmoid masks,
        summed over queries (Mask2Former's semantic inference). ``normalize`` divides by the
        sum over classes (so the maps sum to 1 where any query fires)."""
        probs = pred_logits.softmax(dim=-1)[..., :-1]
        maps = torch.einsum("btqk,btqhw->bkthw", probs, pred_masks.sigmoid())
        if normalize:
            maps = maps / maps.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return maps

    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C_in, T, H, W]`` -> ``[B, K, T, H, W]`` per-class maps (the ONNX graph)."""
        out = self.forward(x)
        return self.combine(out["pred_logits"], out["pred_masks"], self.cfg.normalize_class_probs)


class ClassProbs(nn.Module):
    """Wraps ``MaskSAM.class_probs`` as a module's ``forward`` (for ONNX export / tracing)."""

    def __init__(self, model: MaskSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.class_probs(x)
