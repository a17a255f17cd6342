"""Dataset fingerprint (nnU-Net v2 style): body crop, spacings, sizes, intensities, class volumes.

The fingerprint is what the plan is derived from: the target spacing comes from the spacings
and cropped sizes, CT normalisation from the foreground intensity statistics.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Body crop. nnU-Net crops to nonzero voxels, which keeps the whole field of view of a CT
# (air is -1000 HU, not 0); a threshold plus the large connected components finds the body.
CROP_RULE = {
    "CT": {"rule": "threshold_largest_components", "threshold_hu": -500.0,
           "min_component_fraction": 0.05},
    "other": {"rule": "nonzero"},
    "channels": "union of the per-channel masks",
}
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's: a spacing 3x coarser than the others is "anisotropic"
SAMPLES_PER_CASE = 10_000   # foreground intensity samples per case and channel
SAMPLE_BUDGET = 2_000_000   # ... or this many over the whole dataset, whichever is larger


def modality_of(channel_name: str) -> str:
    """"CT" for CT channels (dataset-wide clip + z-score), "MR" for any other (per-case z-score)."""
    return "CT" if str(channel_name).strip().upper() == "CT" else "MR"


def keep_large_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Keep the connected components at least ``min_fraction`` as large as the largest one.

    Drops noise, the scanner table's thin parts and air pockets outside the body while keeping
    limbs that are not connected to the trunk (arms beside the chest).
    """
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(labelled.ravel())
    counts[0] = 0
    keep = counts >= min_fraction * counts.max()
    keep[0] = False
    return keep[labelled]


def body_mask(arrays_zyx: list[np.ndarray], modalities: list[str], rule: dict = CROP_RULE) -> np.ndarray:
    """Union over channels of each channel's body mask (CT: threshold + components; MR: nonzero)."""
    mask = np.zeros(arrays_zyx[0].shape, dtype=bool)
    for array, modality in zip(arrays_zyx, modalities):
        if modality == "CT":
            ct = rule["CT"]
            mask |= keep_large_components(array > ct["threshold_hu"], ct["min_component_fraction"])
        else:
            mask |= array != 0
    return mask


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, size)`` of the mask's bounding box in ``[Z, Y, X]`` voxels; the whole array if empty."""
    if not mask.any():
        return np.zeros(3, dtype=int), np.asarray(mask.shape, dtype=int)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nonzero = np.flatnonzero(mask.any(axis=other))
        lo.append(nonzero[0])
        hi.append(nonzero[-1] + 1)
    lo = np.asarray(lo, dtype=int)
    return lo, np.asarray(hi, dtype=int) - lo


def samples_per_case(num_cases: int) -> int:
    return max(SAMPLES_PER_CASE, SAMPLE_BUDGET // max(num_cases, 1))


def case_fingerprint(arrays_zyx: list[np.ndarray], label_zyx: np.ndarray | None, body: np.ndarray,
                     spacing_xyz, labels: dict[str, int], n_samples: int,
                     rng: np.random.Generator) -> tuple[dict, list[np.ndarray], str]:
    """One case's entry (cropped arrays in): size, spacing, class volumes; intensity samples.

    Intensities are sampled from the label foreground like nnU-Net; a case without foreground
    (or without a label) falls back to its body mask so it still contributes.
    """
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    entry: dict = {"size_xyz": [int(s) for s in arrays_zyx[0].shape[::-1]],
                   "spacing_xyz": [float(s) for s in spacing_xyz]}
    region = body
    source = "body"
    if label_zyx is not None:
        counts = np.bincount(label_zyx.ravel(), minlength=max(labels.values()) + 1)
        entry["class_volumes_ml"] = {name: round(float(counts[v]) * voxel_ml, 4)
                                     for name, v in labels.items() if v != 0}
        foreground = label_zyx > 0
        if foreground.any():
            region, source = foreground, "label_foreground"
    index = np.flatnonzero(region)
    if index.size == 0:
        index = np.arange(region.size)
    picks = rng.choice(index, size=n_samples, replace=True)
    samples = [np.asarray(a.ravel()[picks], dtype=np.float32) for a in arrays_zyx]
    return entry, samples, source


def intensity_stats(samples: np.ndarray) -> dict:
    """nnU-Net's per-channel foreground intensity properties."""
    samples = np.asarray(samples, dtype=np.float64)
    p005, median, p995 = np.percentile(samples, [0.5, 50.0, 99.5])
    return {"mean": float(samples.mean()), "std": float(samples.std()), "median": float(median),
            "min": float(samples.min()), "max": float(samples.max()),
            "percentile_00_5": float(p005), "percentile_99_5": float(p995),
            "num_samples": int(samples.size)}


def choose_target_spacing(spacings_xyz: list, sizes_xyz: list,
                          anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> tuple[list[float], dict]:
    """nnU-Net v2's 3d_fullres target spacing: the median per axis, except for anisotropic data.

    ``sizes_xyz`` are the cases' sizes after nnU-Net's nonzero crop (the voxel-count test).
    When the coarsest median axis is more than ``anisotropy_threshold`` times coarser than the
    others *and* has that many times fewer voxels, its target is the 10th percentile of that
    axis's spacings instead (clamped to at least the other axes' spacing), so thin-slice cases
    are not thrown away for the thick-slice majority.
    """
    spacings = np.asarray(spacings_xyz, dtype=float)
    sizes = np.asarray(sizes_xyz, dtype=float)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(sizes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > anisotropy_threshold * max(target[others])
    aniso_voxels = target_size[worst] * anisotropy_threshold < min(target_size[others])
    info = {"rule": "median", "anisotropic": bool(aniso_spacing and aniso_voxels),
            "median_spacing_xyz": [float(t) for t in target],
            "median_nonzero_size_xyz": [float(s) for s in target_size]}
    if aniso_spacing and aniso_voxels:
        low_res = float(np.percentile(spacings[:, worst], 10))
        if low_res < max(target[others]):
            low_res = max(max(target[others]), low_res) + 1e-5
        target[worst] = low_res
        info["rule"] = f"median; axis {'xyz'[worst]} anisotropic: 10th percentile"
    return [float(t) for t in target], info
