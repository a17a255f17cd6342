"""Builders: the variant table (SAM's published dims plus a tiny demo size) and build_masksam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from segment_anything.modeling import TwoWayTransformer
from torch import nn

from .config import MaskSAMConfig
from .image_encoder import MaskSAMImageEncoder
from .mask_decoder import ClassMaskDecoder, MaskUpsampler, MaskUpsampler3d
from .masksam import MaskSAM
from .params import apply_freezing
from .prompt_encoder import TemporalPromptEncoder
from .prompt_generator import FullPromptGenerator, NnUNetConvBlock, PromptGenerator


@dataclass(frozen=True)
class VariantSpec:
    """Architecture dimensions of one variant (encoder, prompt/decoder, prompt generator)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16
    pg_width: int = 64
    mlp_ratio: float = 4.0
    # stage widths of the full (paper) prompt generator, token grid first
    pg_full_widths: tuple[int, ...] = (256, 128, 128, 64, 64)


VARIANTS: dict[str, VariantSpec] = {
    # segment_anything/build_sam.py's published dimensions
    "vit_b": VariantSpec(768, 12, 12, (2, 5, 8, 11), 14),
    "vit_l": VariantSpec(1024, 24, 16, (5, 11, 17, 23), 14),
    "vit_h": VariantSpec(1280, 32, 16, (7, 15, 23, 31), 14),
    # same classes, CPU-sized (forward of a B=2, T=8, Q=8 slab at 128 px: 3.3 GFLOP, bench/model.py):
    # 8x8 token grid at 128 px, 2x2 windows of 4, 64-d prompt/decoder path
    "tiny": VariantSpec(
        128, 4, 4, (1, 3), 4, prompt_dim=64, decoder_mlp_dim=256, decoder_heads=4, pg_width=32, mlp_ratio=2.0,
        pg_full_widths=(64, 32, 32, 16, 16),
    ),
}


def _stem(in_channels: int, kind: str = "linear") -> nn.Module:
    """C_in -> 3 channels for SAM's patch embedding.

    ``linear``: 1x1x1 conv, weight 1/C_in and bias 0: SAM sees the (mean) intensity replicated.
    ``conv``: the paper's two nnU-Net conv blocks, 3x3x3 C_in -> 8 -> 3 with InstanceNorm and
    LeakyReLU, in place of SAM's pixel mean/std normalisation.
    """
    if kind == "conv":
        return nn.Sequential(NnUNetConvBlock(in_channels, 8), NnUNetConvBlock(8, 3))
    conv = nn.Conv3d(in_channels, 3, kernel_size=1)
    nn.init.constant_(conv.weight, 1.0 / in_channels)
    nn.init.zeros_(conv.bias)
    return conv


def build_masksam(cfg: MaskSAMConfig, sam_weights: Optional[str] = None, allow_missing: bool = False) -> MaskSAM:
    """Build MaskSAM for ``cfg``; load SAM weights from ``sam_weights`` (or ``cfg.sam_weights``).

    The freezing policy (``cfg.freeze_sam``) is applied last. Loading is strict about SAM's
    keys (see :func:`masksam.model.weights.load_sam_weights`).
    """
    spec = VARIANTS[cfg.variant]
    grid = cfg.img_size // cfg.patch_size
    ratio = cfg.adapter_ratio if cfg.use_depth_conv_adapter else None
    encoder = MaskSAMImageEncoder(
        img_size=cfg.img_size, embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
        global_attn_indexes=spec.global_attn_indexes, window_size=spec.window_size,
        out_chans=spec.prompt_dim, slab_depth=cfg.slab_depth, adapter_ratio=ratio,
        use_temporal_embedding=cfg.use_temporal_embedding, mlp_ratio=spec.mlp_ratio,
        patch_size=cfg.patch_size, adapter_style=cfg.encoder_adapter, mlp_adapter_scale=cfg.adapter_mlp_scale,
    )
    nq = int(cfg.num_queries)  # type: ignore[arg-type]
    prompt_generator: nn.Module
    if cfg.prompt_generator == "full":
        prompt_generator = FullPromptGenerator(
            encoder_dim=spec.embed_dim, neck_dim=spec.prompt_dim, num_global=len(spec.global_attn_indexes),
            num_queries=nq, token_dim=spec.prompt_dim, widths=spec.pg_full_widths, patch_size=cfg.patch_size,
            with_tokens=cfg.use_aux_class_tokens,
        )
    else:
        prompt_generator = PromptGenerator(
            encoder_dim=spec.embed_dim, neck_dim=spec.prompt_dim, num_global=len(spec.global_attn_indexes),
            num_queries=nq, token_dim=spec.prompt_dim, in_channels=cfg.in_channels,
            width=spec.pg_width, patch_size=cfg.patch_size, with_tokens=cfg.use_aux_class_tokens,
        )
    prompt_encoder = TemporalPromptEncoder(
        embed_dim=spec.prompt_dim, image_embedding_size=(grid, grid),
        input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=spec.mask_in_chans,
        slab_depth=cfg.slab_depth, temporal=cfg.prompt_temporal_embedding,
    )
    decoder = ClassMaskDecoder(
        transformer_dim=spec.prompt_dim,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads
        ),
        num_classes=cfg.num_classes, adapter_ratio=cfg.adapter_ratio,
        use_depth_conv_adapter=cfg.use_depth_conv_adapter, use_depth_mlp_adapter=cfg.use_depth_mlp_adapter,
        adapter_style=cfg.decoder_adapters, slab_depth=cfg.slab_depth, mlp_scale=cfg.adapter_mlp_scale,
    )
    factor = cfg.patch_size // 4  # the decoder's logits are at 4x the token grid
    upsampler: nn.Module = (
        MaskUpsampler3d(nq, factor=factor) if cfg.mask_upsampler == "learned3d"
        else MaskUpsampler(cfg.in_channels, factor=factor)
    )
    model = MaskSAM(
        cfg, stem=_stem(cfg.in_channels, cfg.stem), image_encoder=encoder, prompt_generator=prompt_generator,
        prompt_encoder=prompt_encoder, mask_decoder=decoder, mask_upsampler=upsampler,
    )
    ckpt = sam_weights if sam_weights is not None else cfg.sam_weights
    if ckpt is not None:
        from .weights import load_sam_weights

        load_sam_weights(model, ckpt, allow_missing=allow_missing)
    apply_freezing(model, cfg.freeze_sam, use_boxes=cfg.use_aux_boxes)
    return model

