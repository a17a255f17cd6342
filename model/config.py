"""MaskSAM hyperparameters: one dataclass, every field a plain value (YAML/JSON round-trips)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

VARIANT_NAMES = ("vit_b", "vit_l", "vit_h", "tiny")
DECODER_MODES = ("batched", "loop")
PATCH_SIZES = (8, 16)
# the paper's architecture switches: each tuple's first value is the demo's (today's) default,
# the other the paper's (configs/paper_*.yaml; docs/architecture.md, "Model switches")
ENCODER_ADAPTERS = ("serial", "paper")
POS_EMBEDS = ("interpolate", "crop")
STEMS = ("linear", "conv")
PROMPT_GENERATORS = ("light", "full")
MASK_PROMPTS = ("logits", "binary")
DECODER_ADAPTERS = ("light", "paper")
MASK_UPSAMPLERS = ("guided", "learned3d")


@dataclass
class MaskSAMConfig:
    """Everything that defines a MaskSAM network.

    ``variant`` picks the encoder/decoder dimensions (see ``masksam.model.build.VARIANTS``);
    the rest are the task and the method's switches. ``num_classes`` counts background, so the
    classifier predicts ``num_classes + 1`` logits (the last is "no object").
    ``num_queries=None`` resolves to ``num_classes + 3`` (one query per class plus spares, so
    the Hungarian matcher always has unmatched queries to train "no object").
    """

    variant: str = "tiny"
    img_size: int = 128
    # ViT patch (token) size in pixels: SAM's 16 for the SAM variants; `tiny` may use 8 (a
    # finer token grid; the prompt generator, mask prompt and upsampler follow it)
    patch_size: int = 16
    slab_depth: int = 8
    num_classes: int = 2
    num_queries: Optional[int] = None
    in_channels: int = 1
    adapter_ratio: float = 0.25
    # ablation switches, one per component of the method
    use_depth_conv_adapter: bool = True
    use_depth_mlp_adapter: bool = True
    use_temporal_embedding: bool = True
    use_aux_boxes: bool = True
    use_aux_class_tokens: bool = True
    # True = the paper's policy (SAM weights frozen); the randomly initialised demo trains all
    freeze_sam: bool = True
    sam_weights: Optional[str] = None  # official SAM weights (sam_vit_*.pth) to start from
    # "batched": one decoder call over all slices x queries (default, fast); "loop": the
    # reference design, one SAM decoder call per (batch, slice, query); same results.
    decoder_mode: str = "batched"
    # divide class_probs by their sum over classes (else Mask2Former's plain sum over queries)
    normalize_class_probs: bool = False
    # --- the paper's network, piece by piece (defaults: the demo's; paper values in comments) ---
    # encoder adapters: "serial" = one light depth-conv adapter after attention; "paper" = two
    # hidden-residual depth-conv adapters, on the attention branch and parallel to the MLP
    encoder_adapter: str = "serial"          # paper: "paper"
    # scale of the adapters parallel to an MLP (encoder blocks and decoder blocks; paper 0.5)
    adapter_mlp_scale: float = 0.5
    # SAM's 64x64 absolute position embedding at other sizes: resampled, or cropped top-left
    pos_embed: str = "interpolate"           # paper: "crop"
    # C_in -> 3 channels: a 1x1x1 mix, or two 3x3x3 conv blocks (C -> 8 -> 3, IN + LeakyReLU)
    stem: str = "linear"                     # paper: "conv"
    # "light": today's 1/4-resolution generator; "full": UNETR-like 256/128/128/64/64 over the
    # four global blocks and the neck up to full resolution (pooled boxes and tokens)
    prompt_generator: str = "light"          # paper: "full"
    # the dense mask prompt: the aux-mask logits, or the binarised aux mask (nearest-resized)
    mask_prompt: str = "logits"              # paper: "binary"
    # zero-initialised (T, C, h, w) temporal embedding added to the prompt encoder's dense PE
    prompt_temporal_embedding: bool = False  # paper: true
    # decoder adapters: "light" = one neighbour-slice adapter after each block + one depth conv
    # on the image embedding; "paper" = slice-MLP adapters at 7 places (after self-attention,
    # after token-to-image attention, parallel to the MLP, per block; after the final attention)
    # and a per-query depth-conv adapter on the image tokens in each block
    decoder_adapters: str = "light"          # paper: "paper"
    # decoder logits (1/4) -> input resolution: "guided" = bilinear + image-guided sub-pixel
    # correction; "learned3d" = conv Q->64, ConvTranspose3d (1,2,2) x2, conv 64->Q
    mask_upsampler: str = "guided"           # paper: "learned3d"

    def __post_init__(self) -> None:
        if self.variant not in VARIANT_NAMES:
            raise ValueError(f"variant must be one of {VARIANT_NAMES}, got {self.variant!r}")
        if self.img_size <= 0 or self.img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16, got {self.img_size}")
        if self.patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {self.patch_size}")
        if self.patch_size != 16 and self.variant != "tiny":
            raise ValueError(f"{self.variant} keeps SAM's patch_size 16 (its checkpoints); got {self.patch_size}")
        if self.slab_depth < 1:
            raise ValueError(f"slab_depth must be >= 1, got {self.slab_depth}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {self.num_classes}")
        if self.num_queries is None:
            self.num_queries = self.num_classes + 3
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not 0.0 < self.adapter_ratio <= 1.0:
            raise ValueError(f"adapter_ratio must be in (0, 1], got {self.adapter_ratio}")
        if self.decoder_mode not in DECODER_MODES:
            raise ValueError(f"decoder_mode must be one of {DECODER_MODES}, got {self.decoder_mode!r}")
        for name, allowed in (
            ("encoder_adapter", ENCODER_ADAPTERS), ("pos_embed", POS_EMBEDS), ("stem", STEMS),
            ("prompt_generator", PROMPT_GENERATORS), ("mask_prompt", MASK_PROMPTS),
            ("decoder_adapters", DECODER_ADAPTERS), ("mask_upsampler", MASK_UPSAMPLERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.adapter_mlp_scale < 0:
            raise ValueError(f"adapter_mlp_scale must be >= 0, got {self.adapter_mlp_scale}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for MLflow params, JSON metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MaskSAMConfig":
        """Build from a dict (e.g. params.yaml's ``model`` section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        if "checkpoint" in d and "sam_weights" not in d:  # the field's name before 0.1 (model_config.json)
            d = {("sam_weights" if k == "checkpoint" else k): v for k, v in d.items()}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MaskSAMConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)
