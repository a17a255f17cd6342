"""MaskSAM hyperparameters: one dataclass, every field a plain value (YAML/JSON round-trips)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

VARIANT_NAMES = ("vit_b", "vit_l", "vit_h", "tiny")
DECODER_MODES = ("batched", "loop")
PATCH_SIZES = (8, 16)


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
    checkpoint: Optional[str] = None
    # "batched": one decoder call over all slices x queries (default, fast); "loop": the
    # reference design, one SAM decoder call per (batch, slice, query); same results.
    decoder_mode: str = "batched"
    # divide class_probs by their sum over classes (else Mask2Former's plain sum over queries)
    normalize_class_probs: bool = False

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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for MLflow params, JSON metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MaskSAMConfig":
        """Build from a dict (e.g. params.yaml's ``model`` section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MaskSAMConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)
