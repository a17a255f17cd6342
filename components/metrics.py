"""Segmentation metrics on numpy label maps with voxel spacing: Dice, HD95, normalised surface Dice.

Pure functions (no file I/O) so the folder evaluator, the pipeline's evaluate step and tests all
score a case the same way.

Surfaces are *voxel borders*, as medpy and MONAI (``use_subvoxels=False``) define them: the
foreground voxels removed by one binary erosion with ``generate_binary_structure(ndim,
connectivity)`` (medpy's default ``connectivity=1``: face neighbours), with voxels outside the
image counting as background. Surface distances are Euclidean distances in millimetres from each
border voxel of one mask to the nearest border voxel of the other
(``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``).

- HD95, ``"medpy"`` convention (default; ``medpy.metric.binary.hd95``): the 95th percentile
  (numpy's linear interpolation) of the *pooled* distances of both directions.
- HD95, ``"monai"`` convention (``monai.metrics.compute_hausdorff_distance(percentile=95)``):
  the larger of the two per-direction 95th percentiles. It is never smaller than the pooled one.
- NSD (normalised surface Dice, Nikolov et al. 2021) at tolerance ``tau`` mm: the fraction of
  border voxels of both masks lying within ``tau`` of the other mask's border,
  ``(#{d_pg <= tau} + #{d_gp <= tau}) / (#border_pred + #border_gt)``. This is DeepMind's
  ``surface-distance`` definition with every border voxel weighted 1 instead of by the area of
  its surface elements (surfels); it equals MONAI's ``compute_surface_dice(use_subvoxels=False)``.
  Weighting surfels by area instead differs by up to ~0.07 on smooth organs and more on objects
  of a few voxels (tests/test_metrics.py measures it against DeepMind's package).

Distance transforms run on the bounding box of ``pred | gt`` grown by one voxel, which gives the
same borders and distances as the whole image at a fraction of the cost.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

HD_CONVENTIONS = ("medpy", "monai")
METRICS = ("Dice", "HD95", "NSD", "TP", "FP", "FN", "n_pred", "n_ref")

#: What each metric is when one or both masks are empty. Written into every summary.json.
EMPTY_CONVENTIONS = {
    "both_empty": {
        "Dice": "NaN",
        "HD95": "NaN",
        "NSD": "NaN",
        "why": "the class is absent from reference and prediction: nothing to score (as nnU-Net); "
        "means ignore NaN",
    },
    "one_empty": {
        "Dice": 0.0,
        "HD95": "image diagonal in mm, sqrt(sum((size_i * spacing_i)^2)): the worst possible "
        "distance, so a missed or hallucinated organ raises the mean instead of vanishing from it",
        "NSD": 0.0,
    },
}


def conventions(tolerance_mm: float, hd_convention: str = "medpy", connectivity: int = 1) -> dict:
    """The ``conventions`` block of a summary: how every number in it was computed."""
    hd = {
        "medpy": "95th percentile (linear interpolation) of the pooled surface distances of both "
        "directions, as medpy.metric.binary.hd95",
        "monai": "max of the two per-direction 95th percentiles, as "
        "monai.metrics.compute_hausdorff_distance(percentile=95)",
    }[hd_convention]
    return {
        "surface": f"voxel borders: mask XOR binary_erosion(mask, generate_binary_structure(ndim, "
        f"{connectivity})), outside the image counts as background (medpy/MONAI voxel "
        "convention, not DeepMind's area-weighted surfels)",
        "surface_connectivity": connectivity,
        "distances": "Euclidean, in mm, scipy.ndimage.distance_transform_edt(sampling=spacing)",
        "HD95": hd,
        "hd_convention": hd_convention,
        "NSD": "normalised surface Dice (DeepMind surface-distance definition) over border voxels, "
        "each weighted 1: (#{d_pred->gt <= tol} + #{d_gt->pred <= tol}) / (#border_pred + "
        "#border_gt)",
        "nsd_tolerance_mm": tolerance_mm,
        "Dice": "2 TP / (2 TP + FP + FN) over voxels",
        "empty": EMPTY_CONVENTIONS,
        "mean": "per label, the mean over cases ignoring NaN (null if every case is NaN)",
        "foreground_mean": "the mean over foreground labels (background 0 excluded) of the "
        "per-label means, ignoring NaN",
        "missing_prediction": "scored as an empty prediction and listed in missing_predictions",
        "nan_in_json": "written as null",
    }


def _check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (array axis order), got {spacing!r}")
    return sp


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in mm: the HD95 of a case where one mask is empty."""
    sp = _check_spacing(spacing, len(shape))
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * sp) ** 2)))


def _crop_box(boxes: Iterable[tuple[slice, ...] | None], shape: Sequence[int], margin: int) -> tuple[slice, ...]:
    """Union of bounding boxes, grown by ``margin`` voxels and clipped to the image."""
    boxes = [b for b in boxes if b is not None]
    lo = np.min([[s.start for s in b] for b in boxes], axis=0) - margin
    hi = np.max([[s.stop for s in b] for b in boxes], axis=0) + margin
    return tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, shape))


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    objs = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    return objs[0] if objs else None


def border(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Border voxels of a binary mask: the voxels one erosion removes (medpy's surface)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], connectivity: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each border voxel of ``pred`` to ``gt``'s border, and back.

    Both masks must be non-empty. Computed on the bounding box of ``pred | gt`` plus one voxel.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    sp = _check_spacing(spacing, pred.ndim)
    box_p, box_g = _bbox(pred), _bbox(gt)
    if box_p is None or box_g is None:
        raise ValueError("surface distances need two non-empty masks")
    crop = _crop_box([box_p, box_g], pred.shape, margin=1)
    return _cropped_distances(pred[crop], gt[crop], sp, connectivity)


def _cropped_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    border_p = border(pred, connectivity)
    border_g = border(gt, connectivity)
    d_pg = ndimage.distance_transform_edt(~border_g, sampling=spacing)[border_p]
    d_gp = ndimage.distance_transform_edt(~border_p, sampling=spacing)[border_g]
    return d_pg, d_gp


def hd95_from_distances(d_pg: np.ndarray, d_gp: np.ndarray, convention: str = "medpy") -> float:
    """HD95 from the two directed distance sets, pooled (medpy) or max of directed (MONAI)."""
    if convention == "medpy":
        return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    if convention == "monai":
        return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    raise ValueError(f"unknown HD95 convention {convention!r}; choose one of {HD_CONVENTIONS}")


def nsd_from_distances(d_pg: np.ndarray, d_gp: np.ndarray, tolerance_mm: float) -> float:
    """Normalised surface Dice: share of both borders within ``tolerance_mm`` of the other."""
    total = d_pg.size + d_gp.size
    within = np.count_nonzero(d_pg <= tolerance_mm) + np.count_nonzero(d_gp <= tolerance_mm)
    return float(within / total)


def score_binary(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    hd_convention: str = "medpy",
    connectivity: int = 1,
    *,
    _crop: tuple[slice, ...] | None = None,
    _image_shape: Sequence[int] | None = None,
) -> dict[str, float | int]:
    """Dice, HD95, NSD and voxel counts of one binary prediction against one binary reference.

    Empty masks follow :data:`EMPTY_CONVENTIONS`. ``spacing`` is in array axis order.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    shape = tuple(_image_shape) if _image_shape is not None else pred.shape
    sp = _check_spacing(spacing, len(shape))
    if hd_convention not in HD_CONVENTIONS:
        raise ValueError(f"unknown HD95 convention {hd_convention!r}; choose one of {HD_CONVENTIONS}")
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"NSD tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
    if _crop is None:
        boxes = [_bbox(pred), _bbox(gt)]
        if any(b is not None for b in boxes):
            _crop = _crop_box(boxes, pred.shape, margin=1)
            pred, gt = pred[_crop], gt[_crop]
    tp = int(np.count_nonzero(pred & gt))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(gt))
    fp, fn = n_pred - tp, n_ref - tp
    out: dict[str, float | int] = {}
    if n_pred == 0 and n_ref == 0:
        out.update(Dice=math.nan, HD95=math.nan, NSD=math.nan)
    elif n_pred == 0 or n_ref == 0:
        out.update(Dice=0.0, HD95=image_diagonal_mm(shape, sp), NSD=0.0)
    else:
        d_pg, d_gp = _cropped_distances(pred, gt, sp, connectivity)
        out.update(
            Dice=2.0 * tp / (2 * tp + fp + fn),
            HD95=hd95_from_distances(d_pg, d_gp, hd_convention),
            NSD=nsd_from_distances(d_pg, d_gp, tolerance_mm),
        )
    out.update(TP=tp, FP=fp, FN=fn, n_pred=n_pred, n_ref=n_ref)
    return out


def as_label_map(array: np.ndarray, what: str = "label map") -> np.ndarray:
    """Return ``array`` as a non-negative integer array; ValueError naming ``what`` otherwise."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)) or np.any(
            array != np.round(array)
        ):
            raise ValueError(f"{what} holds non-integer values (dtype {array.dtype}); expected class labels")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{what} holds negative labels (min {array.min()}); expected labels >= 0")
    return array


def labels_present(label_map: np.ndarray) -> list[int]:
    """Foreground label values occurring in a non-negative integer label map."""
    return [i + 1 for i, box in enumerate(ndimage.find_objects(label_map)) if box is not None]


def score_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int],
    tolerance_mm: float = 2.0,
    hd_convention: str = "medpy",
    connectivity: int = 1,
) -> dict[str, dict[str, float | int]]:
    """Score every label of a predicted label map against the reference label map.

    ``pred`` and ``gt`` are integer arrays of one shape, ``spacing`` the voxel size in mm in the
    same axis order (``[Z, Y, X]`` for SimpleITK arrays). Returns ``{str(label): metrics}`` with
    the keys of :data:`METRICS`. Each label is scored inside its own bounding box, found for all
    labels in one pass, so many-organ maps stay fast.
    """
    pred = as_label_map(pred, "prediction")
    gt = as_label_map(gt, "reference")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {gt.shape}")
    sp = _check_spacing(spacing, gt.ndim)
    boxes_p = ndimage.find_objects(pred)
    boxes_g = ndimage.find_objects(gt)
    out: dict[str, dict[str, float | int]] = {}
    for label in labels:
        label = int(label)
        if label == 0:  # background: no bounding-box shortcut, score the whole image
            out[str(label)] = score_binary(pred == 0, gt == 0, sp, tolerance_mm, hd_convention, connectivity)
            continue
        boxes = [b[label - 1] if label <= len(b) else None for b in (boxes_p, boxes_g)]
        if all(b is None for b in boxes):
            crop = tuple(slice(0, 0) for _ in gt.shape)
        else:
            crop = _crop_box(boxes, gt.shape, margin=1)
        out[str(label)] = score_binary(
            pred[crop] == label,
            gt[crop] == label,
            sp,
            tolerance_mm,
            hd_convention,
            connectivity,
            _crop=crop,
            _image_shape=gt.shape,
        )
    return out
