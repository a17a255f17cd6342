"""Geometry of preprocessing: canonical reorientation, resampling onto a target grid and back.

Everything here is SimpleITK, so physical positions (origin, spacing, direction) are honoured
exactly; numpy arrays are ``[Z, Y, X]`` and grids are described in SimpleITK ``(x, y, z)`` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

CANONICAL_ORIENTATION = "LPS"  # ITK/DICOM letters: identity direction; radiological display
IMAGE_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
LABEL_MODES = ("nearest", "label_aware")


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space (all tuples in SimpleITK x, y, z order)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(image.GetSpacing()),
                   tuple(image.GetOrigin()), tuple(image.GetDirection()))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.size))

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def image(self, array_zyx: np.ndarray) -> sitk.Image:
        """Wrap a ``[Z, Y, X]`` array as an image on this grid."""
        if tuple(array_zyx.shape) != self.shape_zyx:
            raise ValueError(f"array shape {array_zyx.shape} does not match grid {self.shape_zyx}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def sub(self, lo_xyz, size_xyz) -> "Grid":
        """The sub-grid starting at voxel index ``lo_xyz`` with ``size_xyz`` voxels."""
        origin = np.asarray(self.origin) + self.matrix @ (np.asarray(lo_xyz) * np.asarray(self.spacing))
        return Grid(tuple(int(s) for s in size_xyz), self.spacing, tuple(float(o) for o in origin),
                    self.direction)

    def same_as(self, other: "Grid", tol: float = 1e-5) -> bool:
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, rtol=0, atol=tol)
                and np.allclose(self.origin, other.origin, rtol=0, atol=tol)
                and np.allclose(self.direction, other.direction, rtol=0, atol=tol))

    def to_json(self) -> dict:
        return {"size_xyz": list(self.size), "spacing_xyz": [float(s) for s in self.spacing],
                "origin_xyz": [float(o) for o in self.origin],
                "direction": [float(d) for d in self.direction]}

    @classmethod
    def from_json(cls, d: dict) -> "Grid":
        return cls(tuple(int(s) for s in d["size_xyz"]), tuple(float(s) for s in d["spacing_xyz"]),
                   tuple(float(o) for o in d["origin_xyz"]), tuple(float(v) for v in d["direction"]))


def orientation_of(image: sitk.Image) -> str:
    """The three-letter ITK/DICOM orientation code of the image's direction cosines."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, orientation: str = CANONICAL_ORIENTATION) -> sitk.Image:
    """Permute/flip axes (no interpolation) so the image has the given orientation code."""
    if orientation_of(image) == orientation:
        return image
    return sitk.DICOMOrient(image, orientation)


def target_grid(source: Grid, target_spacing_xyz) -> Grid:
    """The grid covering the same field of view as ``source`` at ``target_spacing_xyz``.

    Voxel *edges* are aligned (the first voxel's outer corner stays put), like nnU-Net's and
    scikit-image's resize; the size is the rounded physical extent over the new spacing.
    """
    spacing = np.asarray(source.spacing, dtype=float)
    target = np.asarray(target_spacing_xyz, dtype=float)
    size = np.maximum(1, np.round(np.asarray(source.size) * spacing / target)).astype(int)
    origin = np.asarray(source.origin) + source.matrix @ ((target - spacing) / 2.0)
    return Grid(tuple(int(s) for s in size), tuple(float(t) for t in target),
                tuple(float(o) for o in origin), source.direction)


def _resample(image: sitk.Image, grid: Grid, interpolator: int, pixel_type: int) -> sitk.Image:
    f = sitk.ResampleImageFilter()
    f.SetSize(grid.size)
    f.SetOutputSpacing(grid.spacing)
    f.SetOutputOrigin(grid.origin)
    f.SetOutputDirection(grid.direction)
    f.SetInterpolator(interpolator)
    f.SetOutputPixelType(pixel_type)
    f.SetDefaultPixelValue(0)
    # Edge voxels of one grid can lie a fraction of a voxel outside the other's extent.
    f.SetUseNearestNeighborExtrapolator(True)
    return f.Execute(image)


def resample_image(array_zyx: np.ndarray, source: Grid, grid: Grid, interp: str = "linear") -> np.ndarray:
    """Resample a float ``[Z, Y, X]`` array from ``source`` onto ``grid`` (linear or B-spline)."""
    if interp not in IMAGE_INTERPOLATORS:
        raise ValueError(f"image interpolation must be one of {sorted(IMAGE_INTERPOLATORS)}, got {interp!r}")
    if source.same_as(grid):
        return np.asarray(array_zyx, dtype=np.float32)
    out = _resample(source.image(array_zyx.astype(np.float32, copy=False)), grid,
                    IMAGE_INTERPOLATORS[interp], sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _index_range_on(grid: Grid, source: Grid, lo_xyz, hi_xyz) -> tuple[np.ndarray, np.ndarray]:
    """Voxel range of ``grid`` (same direction as ``source``) covering source voxels lo..hi, +1."""
    spacing_s = np.asarray(source.spacing)
    spacing_g = np.asarray(grid.spacing)
    offset = grid.matrix.T @ (np.asarray(source.origin) - np.asarray(grid.origin))
    first = (offset + (np.asarray(lo_xyz) - 1.0) * spacing_s) / spacing_g
    last = (offset + (np.asarray(hi_xyz) + 1.0) * spacing_s) / spacing_g
    lo = np.clip(np.floor(first).astype(int), 0, np.asarray(grid.size) - 1)
    hi = np.clip(np.ceil(last).astype(int), 0, np.asarray(grid.size) - 1)
    return lo, hi


def resample_label(label_zyx: np.ndarray, source: Grid, grid: Grid, mode: str = "nearest") -> np.ndarray:
    """Resample a label map onto ``grid``: nearest neighbour, or label-aware.

    Label-aware (nnU-Net style) interpolates each label's one-hot mask linearly and takes the
    argmax with background; it keeps boundaries smooth when the spacing changes a lot. Each
    label is resampled only over its own bounding box (plus a voxel), so the cost follows the
    labels' volume, not their number times the volume.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label interpolation must be one of {LABEL_MODES}, got {mode!r}")
    label_zyx = np.asarray(label_zyx)
    if source.same_as(grid):
        return label_zyx.astype(np.uint8, copy=False)
    if mode == "nearest":
        out = _resample(source.image(label_zyx.astype(np.uint8, copy=False)), grid,
                        sitk.sitkNearestNeighbor, sitk.sitkUInt8)
        return sitk.GetArrayFromImage(out)
    _check_same_direction(source, grid, "label-aware resampling")
    best_label = np.zeros(grid.shape_zyx, dtype=np.uint8)
    best_prob = np.zeros(grid.shape_zyx, dtype=np.float32)
    foreground = np.zeros(grid.shape_zyx, dtype=np.float32)
    values = [int(v) for v in np.unique(label_zyx) if v != 0]
    for value, box in zip(values, _bounding_boxes(label_zyx, values)):
        cut, sub_source, g_lo, g_hi = _padded_box(box, label_zyx.shape, source, grid)
        prob = _resample_part((label_zyx[cut] == value).astype(np.float32), sub_source, grid, g_lo, g_hi)
        out = tuple(slice(a, b + 1) for a, b in zip(g_lo[::-1], g_hi[::-1]))
        better = prob > best_prob[out]
        best_prob[out] = np.where(better, prob, best_prob[out])
        best_label[out] = np.where(better, np.uint8(value), best_label[out])
        foreground[out] += prob
    # One-hot masks interpolate to a partition of unity: background is what the labels leave.
    background = 1.0 - foreground
    best_label[background >= best_prob] = 0
    return best_label


def resample_probabilities(probs_kzyx: np.ndarray, source: Grid, grid: Grid) -> np.ndarray:
    """Labels on ``grid`` from per-class maps ``[K, Z, Y, X]`` on ``source`` (class 0 = background).

    nnU-Net's way back to the original spacing: interpolate each class's probability linearly,
    then take the argmax on the target grid, so boundaries follow the soft prediction instead
    of the staircase of an upsampled label map. Only the box around the source voxels where a
    foreground class wins (plus a voxel) can change; everything outside is background. Inside,
    background is resampled over that box and each class over its own box, so time and memory
    follow the organs' extent, not the scan's (a 512x512x200 CT keeps two box-sized arrays).
    """
    probs_kzyx = np.asarray(probs_kzyx)
    if probs_kzyx.ndim != 4 or tuple(probs_kzyx.shape[1:]) != source.shape_zyx:
        raise ValueError(f"probabilities of shape {probs_kzyx.shape} are not [K, Z, Y, X] on {source.shape_zyx}")
    argmax = probs_kzyx.argmax(axis=0).astype(np.uint8)
    if source.same_as(grid):
        return argmax
    _check_same_direction(source, grid, "probability resampling")
    labels = np.zeros(grid.shape_zyx, dtype=np.uint8)
    values = [int(v) for v in np.unique(argmax) if v != 0]
    if not values:
        return labels

    def channel(k: int, cut: tuple[slice, ...]) -> np.ndarray:
        return np.ascontiguousarray(probs_kzyx[(k,) + cut], dtype=np.float32)

    fg_box = _bounding_boxes((argmax != 0).astype(np.uint8), [1])[0]
    cut, sub_source, r_lo, r_hi = _padded_box(fg_box, argmax.shape, source, grid)
    best_prob = _resample_part(channel(0, cut), sub_source, grid, r_lo, r_hi)  # background, fg's box
    best_label = np.zeros(best_prob.shape, dtype=np.uint8)
    for value, box in zip(values, _bounding_boxes(argmax, values)):
        cut, sub_source, g_lo, g_hi = _padded_box(box, argmax.shape, source, grid)
        prob = _resample_part(channel(value, cut), sub_source, grid, g_lo, g_hi)
        # the class's target range lies inside the foreground's (same monotone mapping)
        out = tuple(slice(a - r, b - r + 1) for a, b, r in zip(g_lo[::-1], g_hi[::-1], r_lo[::-1]))
        better = prob > best_prob[out]
        best_prob[out] = np.where(better, prob, best_prob[out])
        best_label[out] = np.where(better, np.uint8(value), best_label[out])
    labels[tuple(slice(a, b + 1) for a, b in zip(r_lo[::-1], r_hi[::-1]))] = best_label
    return labels


def _check_same_direction(source: Grid, grid: Grid, what: str) -> None:
    if source.direction != grid.direction and not np.allclose(source.direction, grid.direction, atol=1e-6):
        raise ValueError(f"{what} needs source and target grids with one direction")


def _padded_box(box: tuple[slice, ...], shape_zyx: tuple[int, ...], source: Grid, grid: Grid
                ) -> tuple[tuple[slice, ...], Grid, np.ndarray, np.ndarray]:
    """A source box padded by a voxel: its cut, its sub-grid, and the ``grid`` index range
    (xyz, inclusive) that it covers."""
    lo_zyx = np.maximum(np.asarray([s.start for s in box]) - 1, 0)
    hi_zyx = np.minimum(np.asarray([s.stop for s in box]), np.asarray(shape_zyx) - 1)  # inclusive, +1 pad
    size_xyz = (hi_zyx - lo_zyx + 1)[::-1]
    sub_source = source.sub(lo_zyx[::-1], size_xyz)
    g_lo, g_hi = _index_range_on(grid, sub_source, np.zeros(3), size_xyz - 1)
    return tuple(slice(a, b + 1) for a, b in zip(lo_zyx, hi_zyx)), sub_source, g_lo, g_hi


def _resample_part(part_zyx: np.ndarray, sub_source: Grid, grid: Grid, g_lo: np.ndarray, g_hi: np.ndarray
                   ) -> np.ndarray:
    """Linear resampling of a float box onto the part of ``grid`` between ``g_lo`` and ``g_hi``."""
    return sitk.GetArrayFromImage(_resample(sub_source.image(part_zyx), grid.sub(g_lo, g_hi - g_lo + 1),
                                            sitk.sitkLinear, sitk.sitkFloat32))


def _bounding_boxes(label_zyx: np.ndarray, values: list[int]) -> list[tuple[slice, ...]]:
    from scipy import ndimage

    if not values:
        return []
    boxes = ndimage.find_objects(label_zyx.astype(np.int32, copy=False) if label_zyx.dtype != np.uint8
                                 else label_zyx)
    return [boxes[v - 1] for v in values]
