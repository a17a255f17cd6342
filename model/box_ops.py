"""Box helpers: boxes of binary masks and the generalised-IoU box loss.

Boxes are normalised ``(x0, y0, x1, y1)`` in ``[0, 1]`` with pixel-edge semantics: a mask
covering columns ``c0..c1`` has ``x0 = c0 / W`` and ``x1 = (c1 + 1) / W``, so a full mask is
``(0, 0, 1, 1)`` whatever the resolution (the same frame as the prompt generator's
``aux_boxes``).
"""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss

__all__ = ["masks_to_boxes_normalized", "order_box_corners", "giou_loss",
           "generalized_box_iou"]


def masks_to_boxes_normalized(masks: torch.Tensor) -> torch.Tensor:
    """Normalised boxes ``[M, 4]`` of boolean masks ``[M, H, W]``; an empty mask gives zeros."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [M,H,W], got {tuple(masks.shape)}")
    m, height, width = masks.shape
    if m == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    masks = masks.bool()
    cols = masks.any(dim=1)  # [M, W]
    rows = masks.any(dim=2)  # [M, H]
    col_idx = torch.arange(width, device=masks.device)
    row_idx = torch.arange(height, device=masks.device)
    big_w = torch.full_like(col_idx, width)
    big_h = torch.full_like(row_idx, height)
    x0 = torch.where(cols, col_idx, big_w).amin(dim=1)
    x1 = torch.where(cols, col_idx + 1, torch.zeros_like(col_idx)).amax(dim=1)
    y0 = torch.where(rows, row_idx, big_h).amin(dim=1)
    y1 = torch.where(rows, row_idx + 1, torch.zeros_like(row_idx)).amax(dim=1)
    boxes = torch.stack([x0 / width, y0 / height, x1 / width, y1 / height], dim=1).float()
    empty = ~cols.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def order_box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Sort each box's corners so that ``x0 <= x1`` and ``y0 <= y1`` (differentiable).

    A regression head is free to output swapped corners; GIoU is undefined for them.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1),
                        torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-box ``1 - GIoU`` (torchvision's implementation) after ordering the predicted corners."""
    return generalized_box_iou_loss(order_box_corners(pred.float()), target.float(),
                                    reduction="none")
