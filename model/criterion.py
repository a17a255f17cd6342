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

Terms whose output is absent (an ablation without aux masks or boxes) or whose weight is 0 are
left out of the dict (and not computed). The normaliser, the number of targets, is summed over
the ranks and divided by the world size under DistributedDataParallel (Mask2Former's
``num_masks``), so every rank divides by the same number; without an initialised process
group it is this process's count. All losses run in float32 with autocast off, so bf16/fp16
training stays safe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .box_ops import giou_loss, masks_to_boxes_normalized
import torch.distributed as torch_dist

from .matcher import HungarianMatcher, MatchResult
from .point_sampling import (get_uncertain_point_coords_with_randomness, point_sample,
                             sample_label_masks)

__all__ = ["LossWeights", "SetCriterion", "sigmoid_bce_loss", "dice_loss", "average_num_masks"]


@dataclass
class LossWeights:
    """Weights of the eight loss terms; the Hungarian matcher's costs default to the same.

    The defaults are Mask2Former's (class 2, mask 5, dice 5, no-object 0.1;
    ``MODEL.MASK_FORMER.*_WEIGHT``), the auxiliary masks weighted like the final ones and DETR's
    box L1 5 / GIoU 2 (``bbox_loss_coef``, ``giou_loss_coef``). The paper's are class 0.2,
    no-object 0.1, mask 1.2 / 1.2, aux mask 0.5 / 0.5, box L1 0.5, GIoU 0.2 (configs/paper_*.yaml).
    A weight of 0 removes its term.
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
        if not any(v for k, v in asdict(self).items() if k != "no_object"):
            raise ValueError("loss weights are all 0: nothing to train")

    def matcher(self, num_points: int, **costs: float | None) -> HungarianMatcher:
        """A :class:`HungarianMatcher` whose costs are these weights, except the ones given in
        ``costs`` (``cost_class``, ``cost_mask``, ... ``cost_giou``; None = the weight)."""
        own = {"cost_class": self.ce, "cost_mask": self.mask, "cost_dice": self.dice,
               "cost_aux_mask": self.aux_mask, "cost_aux_dice": self.aux_dice,
               "cost_box_l1": self.box_l1, "cost_giou": self.giou}
        unknown = sorted(set(costs) - set(own))
        if unknown:
            raise ValueError(f"unknown matcher costs {unknown}; known: {sorted(own)}")
        own.update({k: v for k, v in costs.items() if v is not None})
        return HungarianMatcher(num_points=num_points, **own)


def average_num_masks(num_targets: int, device: torch.device) -> float:
    """The loss normaliser: targets on this rank, averaged over the ranks under DDP (at least 1).

    Mask2Former's ``SetCriterion`` all-reduces ``num_masks`` and divides by the world size, so
    a rank whose slabs hold few classes does not weigh its masks more than the others. A no-op
    when ``torch.distributed`` is not initialised.
    """
    count = torch.tensor([float(num_targets)], device=device)
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(count)
        count = count / torch_dist.get_world_size()
    return float(count.clamp(min=1.0).item())


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

    ``num_points`` (Mask2Former: 112 * 112; the paper: 131,072) points per matched mask, of
    which ``importance_sample_ratio`` are the most uncertain of ``oversample_ratio *
    num_points`` uniform candidates. ``matcher`` defaults to a :class:`HungarianMatcher` with
    the seven loss weights as its costs and the same number of points.
    """

    def __init__(self, num_classes: int, weights: LossWeights | None = None,
                 matcher: torch.nn.Module | None = None, num_points: int = 112 * 112,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1 (background counts)")
        if num_points <= 0 or oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError("need num_points > 0, oversample_ratio >= 1, 0 <= importance_sample_ratio <= 1; "
                             f"got {num_points}, {oversample_ratio}, {importance_sample_ratio}")
        self.num_classes = num_classes
        self.weights = weights if weights is not None else LossWeights()
        self.matcher = matcher if matcher is not None else self.weights.matcher(num_points)
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
    def _check(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> None:
        if "pred_logits" not in outputs or "pred_masks" not in outputs:
            raise KeyError("outputs need 'pred_logits' and 'pred_masks'")
        k1 = outputs["pred_logits"].shape[-1]
        if k1 != self.num_classes + 1:
            raise ValueError(f"pred_logits has {k1} classes, expected num_classes + 1 = "
                             f"{self.num_classes + 1}")
        if target.dim() != 4:
            raise ValueError(f"target must be a [B,T,H,W] label slab, got {tuple(target.shape)}")

    def _terms(self, outputs: dict[str, torch.Tensor], target: torch.Tensor, match: MatchResult,
               num_masks: float) -> dict[str, torch.Tensor]:
        """Every term whose output is present and whose weight is non-zero (unweighted)."""
        w = self.weights
        losses: dict[str, torch.Tensor] = {}
        if w.ce:
            losses["loss_ce"] = self.loss_class(outputs["pred_logits"], match)
        pairs = [("mask", "dice", outputs["pred_masks"]), ("aux_mask", "aux_dice", outputs.get("aux_masks"))]
        for bce_name, dice_name, masks in pairs:
            if masks is not None and (getattr(w, bce_name) or getattr(w, dice_name)):
                bce, dice = self.loss_masks(masks, target, match, num_masks)
                losses.update({f"loss_{n}": v for n, v in ((bce_name, bce), (dice_name, dice))
                               if getattr(w, n)})
        boxes = outputs.get("aux_boxes")
        if boxes is not None and (w.box_l1 or w.giou):
            l1, giou = self.loss_boxes(boxes, target, match, num_masks)
            losses.update({f"loss_{n}": v for n, v in (("box_l1", l1), ("giou", giou)) if getattr(w, n)})
        return losses

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Match, then compute every weighted term whose output is present, and the total."""
        self._check(outputs, target)
        match = self.matcher(outputs, target)
        self.last_match = match
        num_masks = average_num_masks(match.num_targets, outputs["pred_logits"].device)
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            losses = self._terms(outputs, target, match, num_masks)
            total = sum(getattr(self.weights, name[len("loss_"):]) * value for name, value in losses.items())
            losses["loss"] = total if isinstance(total, torch.Tensor) else \
                outputs["pred_logits"].float().sum() * 0.0
        return losses
