"""Hungarian matching between queries and the classes present in each slice (Mask2Former).

MaskSAM treats every slice of a slab as its own set-prediction problem: the targets of slice
``(b, t)`` are the classes present in it, background included, each with its binary mask. The
cost of giving target ``j`` to query ``i`` is the paper's (paper-recipe.md, "Loss and
matching"; Mask2Former's ``HungarianMatcher`` plus MaskSAM's auxiliary terms)::

    w_class * (-p_i[class_j]) + w_mask * BCE(mask_i, mask_j) + w_dice * Dice(mask_i, mask_j)
    + w_aux_mask * BCE(aux_i, mask_j) + w_aux_dice * Dice(aux_i, mask_j)
    + w_box_l1 * L1(box_i, box_j) + w_giou * (-GIoU(box_i, box_j))

with every BCE and Dice on the same random points for every prediction and target (the
auxiliary masks are read at the same normalised points as the final ones, whatever their
resolution), and ``box_j`` the box of target mask ``j``. The auxiliary terms count only where
the outputs carry ``aux_masks`` / ``aux_boxes`` and their weight is non-zero. All costs of all
slices are computed in one batched pass; only ``scipy.optimize.linear_sum_assignment`` loops
over slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .box_ops import masks_to_boxes_normalized, order_box_corners
from .point_sampling import point_sample, sample_label_masks_all

__all__ = ["FixedMatcher", "HungarianMatcher", "MatchResult", "check_targets", "class_presence",
           "pairwise_box_costs", "pairwise_mask_costs", "slice_class_boxes"]


@dataclass
class MatchResult:
    """Matches of all slices, flattened so the criterion can gather them in one go.

    Slices are numbered ``n = b * T + t``. Matched pair ``m`` gives query ``query_idx[m]`` of
    slice ``slice_idx[m]`` the target mask ``labels[n] == target_class[m]``.
    """

    slice_idx: torch.Tensor     # [M] int64
    query_idx: torch.Tensor     # [M] int64
    target_class: torch.Tensor  # [M] int64
    # per slice: (query indices, target indices into present[n]), Mask2Former's format
    indices: list[tuple[torch.Tensor, torch.Tensor]]
    present: list[torch.Tensor]  # per slice: the classes present (its targets), ascending
    num_targets: int             # targets over all slices (the loss normaliser)


def check_targets(target: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``target`` is an integer label slab with labels < K."""
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer label slab, got dtype {target.dtype}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target labels must lie in [0, {num_classes - 1}] "
                         f"(num_classes={num_classes}), found [{int(target.min())}, "
                         f"{int(target.max())}]")


def class_presence(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[N, K]`` bool: which classes occur in each of the ``N = B*T`` slices of ``target``."""
    n = target.shape[0] * target.shape[1]
    presence = torch.zeros(n, num_classes, dtype=torch.bool, device=target.device)
    presence.scatter_(1, target.reshape(n, -1).long(), True)
    return presence


def pairwise_mask_costs(pred_points: torch.Tensor, tgt_points: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid-BCE and Dice loss of every prediction against every target.

    ``pred_points [N, Q, P]`` logits and ``tgt_points [N, K, P]`` in [0, 1] -> two ``[N, Q, K]``
    tensors, equal to looping ``binary_cross_entropy_with_logits(...).mean()`` and
    ``1 - (2|XY| + 1) / (|X| + |Y| + 1)`` over all pairs, via two batched matmuls.
    """
    num_points = pred_points.shape[-1]
    tgt_t = tgt_points.transpose(1, 2)
    pos = F.softplus(-pred_points)  # BCE where the target is 1
    neg = F.softplus(pred_points)   # BCE where the target is 0
    bce = (torch.bmm(pos, tgt_t) + torch.bmm(neg, 1.0 - tgt_t)) / num_points
    prob = pred_points.sigmoid()
    numerator = 2.0 * torch.bmm(prob, tgt_t)
    denominator = prob.sum(-1)[:, :, None] + tgt_points.sum(-1)[:, None, :]
    dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return bce, dice


def slice_class_boxes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Normalised box of every class in every slice: ``labels [N, H, W]`` -> ``[N, K, 4]``.

    The same boxes the criterion's box terms use (``masks_to_boxes_normalized``); a class
    absent from a slice gets a zero box, which the matcher never assigns.
    """
    n = labels.shape[0]
    boxes = [masks_to_boxes_normalized(labels == c) for c in range(num_classes)]  # K x [N, 4]
    return torch.stack(boxes, dim=1) if boxes else labels.new_zeros((n, 0, 4), dtype=torch.float32)


def pairwise_box_costs(pred: torch.Tensor, tgt: torch.Tensor, eps: float = 1e-7
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 distance and generalised IoU of every predicted box against every target box.

    ``pred [N, Q, 4]`` (corners ordered first, as the criterion does) and ``tgt [N, K, 4]``
    -> two ``[N, Q, K]`` tensors; the GIoU equals torchvision's ``generalized_box_iou`` per
    slice, with ``eps`` in the denominators as in its loss (degenerate boxes stay finite).
    """
    pred = order_box_corners(pred.float())
    tgt = tgt.float()
    l1 = torch.cdist(pred, tgt, p=1)
    p, t = pred[:, :, None, :], tgt[:, None, :, :]
    area_p = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
    area_t = (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1])
    wh = (torch.minimum(p[..., 2:], t[..., 2:]) - torch.maximum(p[..., :2], t[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_p + area_t - inter
    iou = inter / (union + eps)
    hull = torch.maximum(p[..., 2:], t[..., 2:]) - torch.minimum(p[..., :2], t[..., :2])
    area_c = hull[..., 0] * hull[..., 1]
    return l1, iou - (area_c - union) / (area_c + eps)


def _matching_points(num_points: int, device: torch.device) -> torch.Tensor:
    """Uniform random points ``[1, P, 2]`` shared by every prediction and target (Mask2Former)."""
    return torch.rand(1, num_points, 2, device=device)


class HungarianMatcher(torch.nn.Module):
    """Per-slice optimal assignment of queries to present classes (no gradient).

    Every cost weight is an argument. The defaults of the first three are Mask2Former's
    (``MODEL.MASK_FORMER``: CLASS_WEIGHT 2, MASK_WEIGHT 5, DICE_WEIGHT 5, TRAIN_NUM_POINTS
    112 * 112); the auxiliary-mask and box costs default to 0 (off, Mask2Former's matcher).
    Training builds the matcher from params.yaml's ``loss:`` section (the paper's costs are
    class 0.2, mask 1.2 / 1.2, aux mask 0.5 / 0.5, box L1 0.5, GIoU 0.2).
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 112 * 112, *, cost_aux_mask: float = 0.0,
                 cost_aux_dice: float = 0.0, cost_box_l1: float = 0.0,
                 cost_giou: float = 0.0) -> None:
        super().__init__()
        self.weights = {"class": cost_class, "mask": cost_mask, "dice": cost_dice,
                        "aux_mask": cost_aux_mask, "aux_dice": cost_aux_dice,
                        "box_l1": cost_box_l1, "giou": cost_giou}
        negative = {k: v for k, v in self.weights.items() if v < 0}
        if negative:
            raise ValueError(f"matching costs must be >= 0, got {negative}")
        if not any(self.weights.values()):
            raise ValueError("all matching costs are 0")
        if num_points <= 0:
            raise ValueError("num_points must be positive")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def _check(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> None:
        b, t, q, k1 = outputs["pred_logits"].shape
        for key in ("pred_masks", "aux_masks", "aux_boxes"):
            value = outputs.get(key)
            if value is not None and value.shape[:3] != (b, t, q):
                raise ValueError(f"{key} {tuple(value.shape)} does not match pred_logits "
                                 f"{tuple(outputs['pred_logits'].shape)}")
        if target.shape[:2] != (b, t):
            raise ValueError(f"target {tuple(target.shape)} does not match outputs [B={b}, T={t}]")
        check_targets(target, k1 - 1)

    @torch.no_grad()
    def cost_terms(self, outputs: dict[str, torch.Tensor], target: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
        """The unweighted cost terms, each ``[N, Q, K]`` (N = B*T): ``class`` (-p), ``mask`` /
        ``dice`` and, where present and weighted, ``aux_mask`` / ``aux_dice`` (BCE / Dice on the
        same points) and ``box_l1`` / ``giou`` (the negated GIoU)."""
        self._check(outputs, target)
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        b, t, q, k1 = logits.shape
        n, num_classes = b * t, k1 - 1
        w = self.weights
        labels = target.reshape(n, *target.shape[-2:]).long()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            terms = {"class": -logits.float().reshape(n, q, k1).softmax(-1)[..., :num_classes]}
            coords = _matching_points(self.num_points, masks.device)
            tgt_points = sample_label_masks_all(labels, coords, num_classes)
            pairs = [("mask", "dice", masks)]
            aux = outputs.get("aux_masks")
            if aux is not None and (w["aux_mask"] or w["aux_dice"]):
                pairs.append(("aux_mask", "aux_dice", aux))
            for bce_name, dice_name, m in pairs:
                pred_points = point_sample(m.float().reshape(n * q, *m.shape[-2:]),
                                           coords).reshape(n, q, -1)
                terms[bce_name], terms[dice_name] = pairwise_mask_costs(pred_points, tgt_points)
            boxes = outputs.get("aux_boxes")
            if boxes is not None and (w["box_l1"] or w["giou"]):
                tgt_boxes = slice_class_boxes(labels, num_classes).to(boxes.device)
                terms["box_l1"], giou = pairwise_box_costs(boxes.reshape(n, q, 4), tgt_boxes)
                terms["giou"] = -giou
        return terms

    @torch.no_grad()
    def cost_matrices(self, outputs: dict[str, torch.Tensor], target: torch.Tensor
                      ) -> torch.Tensor:
        """Cost ``[N, Q, K]`` of every query against every class of every slice (N = B*T):
        the weighted sum of :meth:`cost_terms`."""
        terms = self.cost_terms(outputs, target)
        return sum(self.weights[name] * value for name, value in terms.items())  # type: ignore[return-value]

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> MatchResult:
        """Match the queries of every slice of ``outputs`` to the classes of ``target [B,T,H,W]``."""
        cost = self.cost_matrices(outputs, target)
        n, _, num_classes = cost.shape
        presence = class_presence(target, num_classes)
        cost_np = cost.cpu().numpy()
        presence_np = presence.cpu().numpy()
        slices, queries, classes = [], [], []
        indices: list[tuple[torch.Tensor, torch.Tensor]] = []
        present: list[torch.Tensor] = []
        for i in range(n):
            cols = np.flatnonzero(presence_np[i])
            rows, tgt = linear_sum_assignment(cost_np[i][:, cols])
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(tgt, dtype=torch.int64)))
            present.append(torch.as_tensor(cols, dtype=torch.int64))
            slices.append(np.full(len(rows), i))
            queries.append(rows)
            classes.append(cols[tgt])
        device = target.device
        return MatchResult(
            slice_idx=torch.as_tensor(np.concatenate(slices), dtype=torch.int64, device=device),
            query_idx=torch.as_tensor(np.concatenate(queries), dtype=torch.int64, device=device),
            target_class=torch.as_tensor(np.concatenate(classes), dtype=torch.int64,
                                         device=device),
            indices=indices,
            present=present,
            num_targets=int(presence_np.sum()),
        )


class FixedMatcher(torch.nn.Module):
    """Query ``c`` always answers for class ``c`` (MaskFormer's "fixed matching" ablation).

    With few classes and a fixed label set (organ segmentation), tying queries to classes
    removes the per-slice reshuffling of Hungarian matching, which a model trained from scratch
    for a few thousand steps spends much of its budget on. Queries ``K..Q-1`` are always
    unmatched and learn "no object". Same :class:`MatchResult` as :class:`HungarianMatcher`, so
    :class:`~masksam.model.criterion.SetCriterion` is unchanged.
    """

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> MatchResult:
        """Match query ``c`` to class ``c`` wherever class ``c`` is present in a slice."""
        b, t, q, k1 = outputs["pred_logits"].shape
        num_classes = k1 - 1
        if q < num_classes:
            raise ValueError(f"fixed matching needs num_queries >= num_classes ({num_classes}), got {q}")
        if target.shape[:2] != (b, t):
            raise ValueError(f"target {tuple(target.shape)} does not match outputs [B={b}, T={t}]")
        check_targets(target, num_classes)
        presence = class_presence(target, num_classes)
        slice_idx, target_class = presence.nonzero(as_tuple=True)
        present = [row.nonzero().flatten().cpu() for row in presence]
        indices = [(cols, torch.arange(len(cols), dtype=torch.int64)) for cols in present]
        return MatchResult(slice_idx=slice_idx, query_idx=target_class.clone(), target_class=target_class,
                           indices=indices, present=present, num_targets=int(presence.sum()))
