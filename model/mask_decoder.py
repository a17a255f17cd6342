"""SAM's mask decoder extended with a classifier token, depth adapters and a mask upsampler.

Parameter names of SAM's ``MaskDecoder`` (``transformer.*``, ``iou_token``, ``mask_tokens``,
``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``) are kept so SAM
checkpoints load unchanged. Additions: ``cls_token`` (learnable global classifier token, to
which the query's auxiliary classifier token is added), ``cls_head`` (Linear to K+1 logits),
``image_adapter`` (depth-conv adapter on the decoder's image embedding, once per slice before
the per-query expansion) and ``token_adapters`` (one depth-MLP adapter after each two-way
attention block, on all tokens). One mask per query: SAM's single-mask output token.

With ``adapter_style="paper"`` (``decoder_adapters: paper``) the adapters are the paper's
instead: in each two-way block a :class:`SliceMLPAdapter` on the self-attention output, on
the token-to-image attention output and parallel to the MLP (scaled by ``mlp_scale``), and a
per-query :class:`HiddenDepthConvAdapter` on the image-to-token attention output (the image
tokens); one more slice-MLP adapter on the final token-to-image attention output: 7 token
adapters and 2 image-token adapters in SAM's 2-block decoder (``block_adapters.{i}.*``,
``final_adapter``). Each adds a delta to the attention output it adapts
(``out + A(out)``), zero at initialisation.

``image_pe`` is ``[1, C, h, w]`` (SAM's dense positional encoding) or ``[B*T, C, h, w]`` (one
per slice: the prompt encoder's temporal embedding added).

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

from .adapters import DepthConvAdapter, DepthMLPAdapter, HiddenDepthConvAdapter, SliceMLPAdapter


class _BlockAdapters(nn.Module):
    """The paper's adapters of one two-way attention block (any of them may be off)."""

    def __init__(self, dim: int, depth: int, ratio: float, tokens: bool, image: bool) -> None:
        super().__init__()
        self.self_attn = SliceMLPAdapter(dim, depth, ratio) if tokens else None
        self.token_to_image = SliceMLPAdapter(dim, depth, ratio) if tokens else None
        self.mlp = SliceMLPAdapter(dim, depth, ratio) if tokens else None
        self.image_to_token = HiddenDepthConvAdapter(dim, ratio) if image else None


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
        adapter_style: str = "light",
        slab_depth: int = 8,
        mlp_scale: float = 0.5,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim, transformer=transformer, num_multimask_outputs=3,
            iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.cls_token = nn.Embedding(1, transformer_dim)
        self.cls_head = nn.Linear(transformer_dim, num_classes + 1)
        self.mlp_scale = mlp_scale
        self.image_adapter: Optional[DepthConvAdapter] = None
        self.token_adapters: Optional[nn.ModuleList] = None
        self.block_adapters: Optional[nn.ModuleList] = None
        self.final_adapter: Optional[SliceMLPAdapter] = None
        if adapter_style == "light":
            if use_depth_conv_adapter:
                self.image_adapter = DepthConvAdapter(transformer_dim, adapter_ratio)
            if use_depth_mlp_adapter:
                self.token_adapters = nn.ModuleList(DepthMLPAdapter(transformer_dim, adapter_ratio) for _ in transformer.layers)
        elif adapter_style == "paper":
            if use_depth_conv_adapter or use_depth_mlp_adapter:
                self.block_adapters = nn.ModuleList(
                    _BlockAdapters(transformer_dim, slab_depth, adapter_ratio, use_depth_mlp_adapter, use_depth_conv_adapter)
                    for _ in transformer.layers
                )
            if use_depth_mlp_adapter:
                self.final_adapter = SliceMLPAdapter(transformer_dim, slab_depth, adapter_ratio)
        else:
            raise ValueError(f"unknown decoder adapter style {adapter_style!r}")

    def _adapted_layer(
        self, i: int, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
        depth: int, nq: int, hw: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """segment-anything's ``TwoWayAttentionBlock.forward`` with the paper's adapters."""
        layer = self.transformer.layers[i]
        ad = self.block_adapters[i]  # type: ignore[index]
        if layer.skip_first_layer_pe:
            out = layer.self_attn(q=queries, k=queries, v=queries)
            queries = out if ad.self_attn is None else out + ad.self_attn(out, depth, nq)
        else:
            q = queries + query_pe
            out = layer.self_attn(q=q, k=q, v=queries)
            if ad.self_attn is not None:
                out = out + ad.self_attn(out, depth, nq)
            queries = queries + out
        queries = layer.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        out = layer.cross_attn_token_to_image(q=q, k=k, v=keys)
        if ad.token_to_image is not None:
            out = out + ad.token_to_image(out, depth, nq)
        queries = layer.norm2(queries + out)
        mlp_out = layer.mlp(queries)
        if ad.mlp is not None:
            mlp_out = mlp_out + self.mlp_scale * ad.mlp(queries, depth, nq)
        queries = layer.norm3(queries + mlp_out)
        q = queries + query_pe
        k = keys + key_pe
        out = layer.cross_attn_image_to_token(q=k, k=q, v=queries)
        if ad.image_to_token is not None:
            n, _, c = out.shape
            grid = out.reshape(n, hw[0], hw[1], c)
            out = out + ad.image_to_token(grid, depth, nq).reshape(n, -1, c)
        keys = layer.norm4(keys + out)
        return queries, keys

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
            pos = torch.repeat_interleave(image_pe, n // image_pe.shape[0], dim=0).flatten(2).transpose(1, 2)
        else:
            src = (image.unsqueeze(1) + dense.reshape(bt, nq, c, h, w)).reshape(n, c, h, w)
            pos = image_pe.flatten(2).transpose(1, 2)  # [1, hw, C], broadcast over n
            if image_pe.shape[0] != 1:  # one encoding per slice: [B*T, hw, C] -> [B*T*nq, hw, C]
                pos = pos.unsqueeze(1).expand(bt, nq, h * w, c).reshape(n, h * w, c)
        keys = src.flatten(2).transpose(1, 2)
        queries = tokens
        tr = self.transformer
        for i, layer in enumerate(tr.layers):
            if self.block_adapters is not None:
                queries, keys = self._adapted_layer(i, queries, keys, tokens, pos, depth, nq, (h, w))
            else:
                queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=pos)
            if self.token_adapters is not None:
                queries = queries + self.token_adapters[i](queries, depth, nq)
        attn_out = tr.final_attn_token_to_image(q=queries + tokens, k=keys + pos, v=keys)
        if self.final_adapter is not None:
            attn_out = attn_out + self.final_adapter(attn_out, depth, nq)
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

        ``image_embeddings``: ``[B*T, C, h, w]``; ``image_pe``: ``[1 or B*T, C, h, w]``; prompt
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

    def forward(self, low: torch.Tensor, image: torch.Tensor, num_queries: int, depth: int = 1) -> torch.Tensor:
        """``low``: ``[B*T*Q, 1, h, w]``; ``image``: ``[B*T, C_in, 4h, 4w]`` -> ``[B*T*Q, 1, 4h, 4w]``
        (``depth`` is not needed: the correction is per slice).

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


class MaskUpsampler3d(nn.Module):
    """The paper's learned 3D upsampler of the decoder's mask logits (``mask_upsampler: learned3d``).

    The ``[B, Q, T, h, w]`` logits of all queries of a slab (queries as channels) go through a
    3x3x3 conv block Q -> ``width`` (InstanceNorm, LeakyReLU), ``log2(factor)`` in-plane x2
    ``ConvTranspose3d`` (1, 2, 2) each with InstanceNorm and GELU, and a 3x3x3 conv
    ``width`` -> Q. It learns from scratch (no bilinear path); it mixes queries and slices, so
    it is tied to ``num_queries``.
    """

    def __init__(self, num_queries: int, factor: int = 4, width: int = 64) -> None:
        super().__init__()
        ups = factor.bit_length() - 1
        if 2**ups != factor or ups < 1:
            raise ValueError(f"upsampling factor must be a power of 2 >= 2, got {factor}")
        self.factor = factor
        self.num_queries = num_queries
        layers: list[nn.Module] = [
            nn.Conv3d(num_queries, width, kernel_size=3, padding=1),
            nn.InstanceNorm3d(width, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01),
        ]
        for _ in range(ups):
            layers += [
                nn.ConvTranspose3d(width, width, kernel_size=(1, 2, 2), stride=(1, 2, 2)),
                nn.InstanceNorm3d(width),
                nn.GELU(),
            ]
        layers.append(nn.Conv3d(width, num_queries, kernel_size=3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, low: torch.Tensor, image: torch.Tensor, num_queries: int, depth: int = 1) -> torch.Tensor:
        """``low``: ``[B*T*Q, 1, h, w]`` ordered (batch, slice, query) -> ``[B*T*Q, 1, fh, fw]``
        (``image`` is not read)."""
        if num_queries != self.num_queries:
            raise ValueError(f"MaskUpsampler3d built for {self.num_queries} queries, got {num_queries}")
        n, _, h, w = low.shape
        x = low.reshape(-1, depth, num_queries, h, w).transpose(1, 2)  # [B, Q, T, h, w]
        y = self.net(x).transpose(1, 2)  # [B, T, Q, fh, fw]
        return y.reshape(n, 1, h * self.factor, w * self.factor)


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
