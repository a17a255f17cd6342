"""MaskSAM's training loss: what each Hungarian match costs (Mask2Former's ``SetCriterion``).

Terms (each normalised by the number of targets, i.e. classes present, over all slices):

- ``loss_ce``: cross-entropy over K+1 classes for every query; unmatched queries must say
  "no object", whose class weight is ``no_object`` (0.1);
- ``loss_mask`` / ``loss_dice``: sigmoid BCE and Dice of the matched queries' ``pred_masks``
  on importance-sampled points (PointRend);
- ``loss_aux_mask`` / ``loss_aux_dice``: the same for the prompt generator's ``aux_masks`` of
  the matched queries, on their logits (the reference code applied sigmoid before
  ``binary_cross_entropy_with_logits``, a double sigmoid; not here);
- ``loss_box_l1`` / ``loss_giou``: L1 and 1 - GIoU between ``aux_boxes`` and the box of the
  matched target mask.

Terms whose output is absent (an ablation without aux masks or boxes) are left out of the
dict. All losses run in float32 with autocast off, so bf16/fp16 training stays safe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .box_ops import giou_loss, masks_to_boxes_normalized
from .matcher import HungarianMatcher, MatchResult
from .point_sampling import (get_uncertain_point_coords_with_randomness, point_sample,
                             sample_label_masks)

__all__ = ["LossWeights", "SetCriterion", "sigmoid_bce_loss", "dice_loss"]


@dataclass
class LossWeights:
    """Weights of the loss terms (also the matcher's costs for class / mask / dice).

    Sources: class 2, mask 5, dice 5, no-object 0.1 are Mask2Former's defaults
    (``MODEL.MASK_FORMER.{CLASS,MASK,DICE,NO_OBJECT}_WEIGHT``), which MaskSAM keeps; the
    auxiliary mask terms reuse the mask weights (MaskSAM supervises its auxiliary masks like the
    final ones); box L1 5 and GIoU 2 are DETR's (``bbox_loss_coef``, ``giou_loss_coef``).
    """

    ce: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    aux_mask: float = 5.0
    aux_dice: float = 5.0
    box_l1: float = 5.0
    giou: float = 2.0
    no_object: float = 0.1

    def __post_init__(self) -> None:
        bad = {k: v for k, v in asdict(self).items() if v < 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {bad}")


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float
                     ) -> torch.Tensor:
    """Per-mask mean BCE-with-logits over points ``[M, P]``, summed over masks / num_masks."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Per-mask smoothed Dice loss ``1 - (2|XY| + 1) / (|X| + |Y| + 1)`` on points, / num_masks."""
    prob = logits.sigmoid()
    numerator = 2.0 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


class SetCriterion(torch.nn.Module):
    """``criterion(outputs, target [B,T,H,W]) -> {term: loss, ..., "loss": weighted total}``.

    ``num_points`` (Mask2Former: 112 * 112) points per matched mask, of which
    ``importance_sample_ratio`` are the most uncertain of ``oversample_ratio * num_points``
    uniform candidates. ``matcher`` defaults to a :class:`HungarianMatcher` with the class /
    mask / dice weights as costs and the same number of points.
    """

    def __init__(self, num_classes: int, weights: LossWeights | None = None,
                 matcher: HungarianMatcher | None = None, num_points: int = 112 * 112,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1 (background counts)")
        self.num_classes = num_classes
        self.weights = weights if weights is not None else LossWeights()
        self.matcher = matcher if matcher is not None else HungarianMatcher(
            cost_class=self.weights.ce, cost_mask=self.weights.mask, cost_dice=self.weights.dice,
            num_points=num_points)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.weights.no_object
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.last_match: MatchResult | None = None

    # -- terms -----------------------------------------------------------------------------
    def loss_class(self, logits: torch.Tensor, match: MatchResult) -> torch.Tensor:
        """Weighted cross-entropy over K+1; unmatched queries are "no object"."""
        b, t, q, k1 = logits.shape
        target_classes = torch.full((b * t, q), self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes[match.slice_idx, match.query_idx] = match.target_class
        return F.cross_entropy(logits.float().reshape(-1, k1), target_classes.reshape(-1),
                               weight=self.empty_weight.to(logits.device))

    def loss_masks(self, masks: torch.Tensor, target: torch.Tensor, match: MatchResult,
                   num_masks: float) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice of the matched masks ``[B,T,Q,h,w]`` on importance-sampled points."""
        flat = masks.reshape(-1, masks.shape[2], *masks.shape[-2:])
        src = flat[match.slice_idx, match.query_idx].float()  # [M, h, w]
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return zero, zero
        coords = get_uncertain_point_coords_with_randomness(
            src.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio)
        src_points = point_sample(src, coords)
        labels = target.reshape(-1, *target.shape[-2:]).long()
        tgt_points = sample_label_masks(labels, coords, match.slice_idx, match.target_class)
        return (sigmoid_bce_loss(src_points, tgt_points, num_masks),
                dice_loss(src_points, tgt_points, num_masks))

    def loss_boxes(self, boxes: torch.Tensor, target: torch.Tensor, match: MatchResult,
                   num_masks: float) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 and 1 - GIoU between matched ``aux_boxes [B,T,Q,4]`` and target-mask boxes."""
        src = boxes.reshape(-1, boxes.shape[2], 4)[match.slice_idx, match.query_idx].float()
        if src.shape[0] == 0:
            zero = boxes.sum() * 0.0
            return zero, zero
        labels = target.reshape(-1, *target.shape[-2:])
        tgt_masks = labels[match.slice_idx] == match.target_class[:, None, None]
        tgt = masks_to_boxes_normalized(tgt_masks).to(src.device)
        l1 = F.l1_loss(src, tgt, reduction="none").sum() / num_masks
        giou = giou_loss(src, tgt).sum() / num_masks
        return l1, giou

    # -- total -----------------------------------------------------------------------------
    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Match, then compute every term whose output is present, and the weighted total."""
        if "pred_logits" not in outputs or "pred_masks" not in outputs:
            raise KeyError("outputs need 'pred_logits' and 'pred_masks'")
        k1 = outputs["pred_logits"].shape[-1]
        if k1 != self.num_classes + 1:
            raise ValueError(f"pred_logits has {k1} classes, expected num_classes + 1 = "
                             f"{self.num_classes + 1}")
        if target.dim() != 4:
            raise ValueError(f"target must be a [B,T,H,W] label slab, got {tuple(target.shape)}")
        match = self.matcher(outputs, target)
        self.last_match = match
        num_masks = float(max(match.num_targets, 1))
        w = self.weights
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            losses: dict[str, torch.Tensor] = {
                "loss_ce": self.loss_class(outputs["pred_logits"], match)}
            losses["loss_mask"], losses["loss_dice"] = self.loss_masks(
                outputs["pred_masks"], target, match, num_masks)
            total = w.ce * losses["loss_ce"] + w.mask * losses["loss_mask"] \
                + w.dice * losses["loss_dice"]
            if outputs.get("aux_masks") is not None:
                losses["loss_aux_mask"], losses["loss_aux_dice"] = self.loss_masks(
                    outputs["aux_masks"], target, match, num_masks)
                total = total + w.aux_mask * losses["loss_aux_mask"] \
                    + w.aux_dice * losses["loss_aux_dice"]
            if outputs.get("aux_boxes") is not None:
                losses["loss_box_l1"], losses["loss_giou"] = self.loss_boxes(
                    outputs["aux_boxes"], target, match, num_masks)
                total = total + w.box_l1 * losses["loss_box_l1"] + w.giou * losses["loss_giou"]
            losses["loss"] = total
        return losses
