"""Point sampling of mask logits and label maps (after Mask2Former / PointRend).

Losses and matching costs are computed on a few thousand points per mask instead of every
pixel, which keeps them cheap at any resolution. Points are normalised ``(x, y)`` coordinates
in ``[0, 1]`` (pixel ``i`` of ``n`` has its centre at ``(i + 0.5) / n``), read with bilinear
interpolation (``align_corners=False``) and border padding, the same convention for predicted
logits (:func:`point_sample`) and integer label maps (:func:`sample_label_masks`), so a
prediction and its target are always read at the same place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "point_sample",
    "sample_label_masks",
    "sample_label_masks_all",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
    "pixel_centre_coords",
]


def point_sample(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly read ``masks [N, H, W]`` at ``coords [N, P, 2]`` (x, y in [0, 1]) -> [N, P].

    ``coords`` with a leading dimension of 1 are shared by all N masks.
    """
    if masks.dim() != 3 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample expects masks [N,H,W] and coords [N,P,2], got "
                         f"{tuple(masks.shape)} and {tuple(coords.shape)}")
    n = masks.shape[0]
    if coords.shape[0] == 1 and n != 1:
        coords = coords.expand(n, -1, -1)
    grid = (2.0 * coords.to(masks.dtype) - 1.0).unsqueeze(2)  # [N, P, 1, 2]
    out = F.grid_sample(masks.unsqueeze(1), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[:, 0, :, 0]


# Elements of one chunk of binary masks built at once (128 MiB of float32): bounds memory at
# any resolution while staying one grid_sample call per chunk in the common case.
_CHUNK_ELEMENTS = 1 << 25


def sample_label_masks(labels: torch.Tensor, coords: torch.Tensor, slice_idx: torch.Tensor,
                       classes: torch.Tensor) -> torch.Tensor:
    """Read the binary masks ``labels[slice_idx[m]] == classes[m]`` at ``coords`` -> [M, P].

    ``labels`` is ``[N, H, W]`` integer; ``coords`` is ``[M, P, 2]`` (or ``[1, P, 2]``,
    shared); ``slice_idx`` and ``classes`` are ``[M]``. The float masks are built a chunk at a
    time, so memory stays bounded whatever M and H * W are.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [N,H,W], got {tuple(labels.shape)}")
    m = slice_idx.shape[0]
    if coords.shape[0] == 1 and m != 1:
        coords = coords.expand(m, -1, -1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, labels.shape[-1] * labels.shape[-2]))
    parts = []
    for lo in range(0, m, chunk):
        sl = slice(lo, lo + chunk)
        masks = (labels[slice_idx[sl]] == classes[sl].view(-1, 1, 1)).float()
        parts.append(point_sample(masks, coords[sl].float()))
    if not parts:
        return coords.new_zeros((0, coords.shape[1]), dtype=torch.float32)
    return torch.cat(parts)


def sample_label_masks_all(labels: torch.Tensor, coords: torch.Tensor,
                           num_classes: int) -> torch.Tensor:
    """Read every class mask of every slice at the points: ``[N, H, W]`` -> ``[N, K, P]``.

    ``coords`` is ``[1, P, 2]`` (shared) or ``[N, P, 2]``. Used by the matcher, which scores
    every query against every class of a slice at once.
    """
    n = labels.shape[0]
    device = labels.device
    slice_idx = torch.arange(n, device=device).repeat_interleave(num_classes)
    classes = torch.arange(num_classes, device=device).repeat(n)
    if coords.shape[0] != 1:
        coords = coords.repeat_interleave(num_classes, dim=0)
    return sample_label_masks(labels, coords, slice_idx, classes).view(n, num_classes, -1)


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of a mask logit: highest (0) where the logit is 0, i.e. on the boundary."""
    return -logits.abs()


@torch.no_grad()
def get_uncertain_point_coords_with_randomness(logits: torch.Tensor, num_points: int,
                                               oversample_ratio: float,
                                               importance_sample_ratio: float) -> torch.Tensor:
    """PointRend importance sampling: ``logits [N, H, W]`` -> coords ``[N, num_points, 2]``.

    Draw ``oversample_ratio * num_points`` uniform points, keep the
    ``importance_sample_ratio * num_points`` most uncertain of them, fill up with fresh uniform
    points. Concentrates the loss on boundaries while still covering the whole mask.
    """
    if num_points <= 0 or oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("need num_points > 0, oversample_ratio >= 1, 0 <= importance <= 1")
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = calculate_uncertainty(point_sample(logits.float(), coords))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1, sorted=False).indices
    picked = torch.gather(coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        picked = torch.cat([picked, torch.rand(n, num_random, 2, device=logits.device)], dim=1)
    return picked


def pixel_centre_coords(height: int, width: int, device: torch.device | str = "cpu"
                        ) -> torch.Tensor:
    """Coordinates ``[1, H*W, 2]`` of every pixel centre (row-major), where sampling is exact."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1).unsqueeze(0)
