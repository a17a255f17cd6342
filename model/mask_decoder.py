"""SAM's mask decoder extended with a classifier token, depth adapters and a mask upsampler.

Parameter names of SAM's ``MaskDecoder`` (``transformer.*``, ``iou_token``, ``mask_tokens``,
``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``) are kept so SAM
checkpoints load unchanged. Additions: ``cls_token`` (learnable global classifier token, to
which the query's auxiliary classifier token is added), ``cls_head`` (Linear to K+1 logits),
``image_adapter`` (depth-conv adapter on the decoder's image embedding, once per slice before
the per-query expansion) and ``token_adapters`` (one depth-MLP adapter after each two-way
attention block, on all tokens). One mask per query: SAM's single-mask output token.

Two execution paths with equal results (a test asserts it):
``batched`` runs one decoder pass over all (batch, slice, query) triples, adds the dense prompt
to the image embedding by broadcasting instead of materialising a repeated copy, keeps the
positional encoding un-repeated, and evaluates only the hypernetwork of the single-mask token;
``loop`` is the reference design: one SAM decoder call per query (over the slices, which the
depth adapters couple), with ``repeat_interleave``'d image embedding and positional encoding
and all four mask hypernetworks and the IoU head evaluated as SAM does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

from .adapters import DepthConvAdapter, DepthMLPAdapter


class ClassMaskDecoder(MaskDecoder):
    """SAM ``MaskDecoder`` + classifier token and head + 3D depth adapters."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_classes: int,
        adapter_ratio: float = 0.25,
        use_depth_conv_adapter: bool = True,
        use_depth_mlp_adapter: bool = True,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim, transformer=transformer, num_multimask_outputs=3,
            iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.cls_token = nn.Embedding(1, transformer_dim)
        self.cls_head = nn.Linear(transformer_dim, num_classes + 1)
        self.image_adapter = DepthConvAdapter(transformer_dim, adapter_ratio) if use_depth_conv_adapter else None
        self.token_adapters = (
            nn.ModuleList(DepthMLPAdapter(transformer_dim, adapter_ratio) for _ in transformer.layers)
            if use_depth_mlp_adapter
            else None
        )

    def _run(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        cls_tokens: torch.Tensor,
        depth: int,
        nq: int,
        reference: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass. ``image``: ``[B*T, C, h, w]``; prompts ``[B*T*nq, ...]`` ordered
        (batch, slice, query). Returns mask logits ``[B*T*nq, 1, 4h, 4w]`` and class logits."""
        bt, c, h, w = image.shape
        n = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat([out_tokens, cls_tokens.unsqueeze(1), sparse], dim=1)
        if reference:
            src = torch.repeat_interleave(image, nq, dim=0) + dense
            pos = torch.repeat_interleave(image_pe, n, dim=0).flatten(2).transpose(1, 2)
        else:
            src = (image.unsqueeze(1) + dense.reshape(bt, nq, c, h, w)).reshape(n, c, h, w)
            pos = image_pe.flatten(2).transpose(1, 2)  # [1, hw, C], broadcast over n
        keys = src.flatten(2).transpose(1, 2)
        queries = tokens
        tr = self.transformer
        for i, layer in enumerate(tr.layers):
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=pos)
            if self.token_adapters is not None:
                queries = queries + self.token_adapters[i](queries, depth, nq)
        attn_out = tr.final_attn_token_to_image(q=queries + tokens, k=keys + pos, v=keys)
        queries = tr.norm_final_attn(queries + attn_out)

        cls_logits = self.cls_head(queries[:, 1 + self.num_mask_tokens])
        up = self.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
        _, cu, hu, wu = up.shape
        if reference:
            hyper = torch.stack(
                [self.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in range(self.num_mask_tokens)], dim=1
            )
            masks = (hyper @ up.reshape(n, cu, hu * wu)).reshape(n, -1, hu, wu)
            self.iou_prediction_head(queries[:, 0])  # computed (and unused) as in SAM's decoder
            masks = masks[:, 0:1]
        else:
            hyper = self.output_hypernetworks_mlps[0](queries[:, 1]).unsqueeze(1)
            masks = (hyper @ up.reshape(n, cu, hu * wu)).reshape(n, 1, hu, wu)
        return masks, cls_logits

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        aux_tokens: Optional[torch.Tensor],
        depth: int,
        num_queries: int,
        mode: str = "batched",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode all queries of all slices.

        ``image_embeddings``: ``[B*T, C, h, w]``; ``image_pe``: ``[1, C, h, w]``; prompt
        embeddings ``[B*T*Q, Ns, C]`` / ``[B*T*Q, C, h, w]``; ``aux_tokens``: ``[B, T, Q, C]``
        or None. Returns low-res mask logits ``[B*T*Q, 1, 4h, 4w]`` and class logits
        ``[B*T*Q, K+1]``.
        """
        bt, c, h, w = image_embeddings.shape
        img = image_embeddings
        if self.image_adapter is not None:
            tok = img.permute(0, 2, 3, 1)
            img = (tok + self.image_adapter(tok, depth)).permute(0, 3, 1, 2)
        cls = self.cls_token.weight.reshape(1, 1, c).expand(bt, num_queries, c)
        if aux_tokens is not None:
            cls = cls + aux_tokens.reshape(bt, num_queries, c)
        if mode == "batched":
            return self._run(
                img, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                cls.reshape(bt * num_queries, c), depth, num_queries, reference=False,
            )
        if mode != "loop":
            raise ValueError(f"unknown decoder mode {mode!r}; use 'batched' or 'loop'")
        sp = sparse_prompt_embeddings.reshape(bt, num_queries, *sparse_prompt_embeddings.shape[1:])
        de = dense_prompt_embeddings.reshape(bt, num_queries, c, h, w)
        outs = [
            self._run(img, image_pe, sp[:, q], de[:, q], cls[:, q], depth, 1, reference=True)
            for q in range(num_queries)
        ]
        masks = torch.stack([m for m, _ in outs], dim=1).flatten(0, 1)
        logits = torch.stack([l for _, l in outs], dim=1).flatten(0, 1)
        return masks, logits


class MaskUpsampler(nn.Module):
    """Brings the decoder's 1/4-resolution mask logits to the input resolution.

    ``bilinear x4`` plus a learned sub-pixel correction guided by the image: a stride-4 conv
    turns each 4x4 patch of the input slice into G guide features (space-to-depth, so it sees
    full-resolution detail); per query, ``GELU(a * low + guide)`` goes through a 1x1 conv to 16
    sub-pixel offsets, pixel-shuffled to full resolution. The last conv is zero-initialised, so
    at step 0 this is plain bilinear upsampling (as SAM's own postprocessing). Memory stays at
    the 1/4 grid per query.
    """

    def __init__(self, in_channels: int, guide: int = 16, factor: int = 4) -> None:
        super().__init__()
        self.factor = factor
        self.guide = nn.Sequential(nn.Conv2d(in_channels, guide, kernel_size=factor, stride=factor), nn.GELU())
        self.gain = nn.Parameter(torch.ones(guide))
        self.out = nn.Conv2d(guide, factor * factor, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, low: torch.Tensor, image: torch.Tensor, num_queries: int) -> torch.Tensor:
        """``low``: ``[B*T*Q, 1, h, w]``; ``image``: ``[B*T, C_in, 4h, 4w]`` -> ``[B*T*Q, 1, 4h, 4w]``.

        Computed channels-last with matrix products (same function as conv 1x1 + pixel
        shuffle + ``F.interpolate(bilinear, align_corners=False)``, to float rounding): on the
        CPU the backward of ``upsample_bilinear2d`` and of the per-query 1x1 conv dominated
        the whole training step of the tiny model.
        """
        n, _, h, w = low.shape
        f = self.factor
        g = self.guide(image).permute(0, 2, 3, 1)  # [B*T, h, w, G]
        gc = g.shape[-1]
        lo = low.reshape(-1, num_queries, h, w, 1)
        hidden = F.gelu(lo * self.gain + g.unsqueeze(1))  # [B*T, Q, h, w, G]
        delta = F.linear(hidden, self.out.weight.reshape(f * f, gc), self.out.bias)  # [.., f*f]
        # pixel shuffle: sub-pixel (i, j) = channel i * f + j goes to row h * f + i, col w * f + j
        delta = delta.reshape(n, h, w, f, f).permute(0, 1, 3, 2, 4).reshape(n, 1, h * f, w * f)
        ah = _bilinear_matrix(h, f, low.dtype, low.device)
        aw = ah if w == h else _bilinear_matrix(w, f, low.dtype, low.device)
        base = ah @ low @ aw.transpose(0, 1)  # separable bilinear x f
        return base + delta


def _bilinear_matrix(size: int, factor: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[size * factor, size]`` matrix of bilinear upsampling along one axis, exactly as
    ``F.interpolate(..., scale_factor=factor, mode="bilinear", align_corners=False)`` weights
    it (source index ``(i + 0.5) / factor - 0.5``, clamped at the borders)."""
    dst = (torch.arange(size * factor, device=device, dtype=torch.float64) + 0.5) / factor - 0.5
    src = dst.clamp(min=0.0)
    i0 = src.floor().long().clamp(max=size - 1)
    i1 = (i0 + 1).clamp(max=size - 1)
    frac = src - i0.to(torch.float64)
    m = torch.zeros(size * factor, size, dtype=torch.float64, device=device)
    rows = torch.arange(size * factor, device=device)
    m.index_put_((rows, i0), 1.0 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m.to(dtype)
