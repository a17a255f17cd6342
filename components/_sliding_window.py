"""Whole-volume prediction from a per-slab predictor by Gaussian-weighted sliding window (numpy).

The network sees slabs of ``slab_depth`` slices of ``img_size`` x ``img_size``. A volume of any
size is covered by overlapping windows (nnU-Net's scheme): the window positions along each axis
are spread evenly so that neighbours overlap by at least ``overlap``; smaller axes are padded
(with each channel's minimum) and cropped back. Each window's per-class maps are weighted by a
separable Gaussian, highest in the window centre where the network has the most context, and
accumulated; optional mirroring averages the prediction over flips (test-time augmentation).

Memory: the windows are visited slab by slab along Z, so the float32 accumulator only spans
one window depth (``K x slab_depth x Y x X``, a rolling band); slices behind the current slab
are final and are written straight into the outputs (``labels`` uint8 ``[Z, Y, X]``, and
``probs`` float32 ``[K, Z, Y, X]`` only if ``return_probs``). Apart from the outputs, memory is
bounded by the window batch and that band, whatever the volume's depth.

numpy only: the ONNX serving path (``Predictor.from_onnx``, the MLflow pyfunc) runs without
PyTorch installed. A PyTorch module plugs in through ``predictor.TorchRunner``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["compute_steps", "gaussian_importance_map", "sliding_window_inference"]

# float32 [B, C, T, H, W] -> per-class maps [B, K, T, H, W] (anything np.asarray accepts)
PredictSlab = Callable[[np.ndarray], np.ndarray]


def compute_steps(size: int, window: int, overlap: float) -> list[int]:
    """Start positions of windows of ``window`` covering ``[0, size)`` (``size >= window``).

    nnU-Net's rule: as few windows as keep the step at most ``window * (1 - overlap)``, spread
    evenly so the first starts at 0 and the last ends at ``size``.
    """
    if window < 1 or size < window:
        raise ValueError(f"need 1 <= window <= size, got window={window}, size={size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    max_step = max(1.0, window * (1.0 - overlap))
    num = int(math.ceil((size - window) / max_step)) + 1
    if num == 1:
        return [0]
    step = (size - window) / (num - 1)
    return [int(round(step * i)) for i in range(num)]


def gaussian_importance_map(shape: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian ``[T, H, W]`` float32 (sigma = ``sigma_scale`` x size per axis), max 1.

    Centred on the window's centre (symmetric, so mirroring does not bias it); never 0, so
    every voxel of a window counts (nnU-Net replaces zeros by the smallest positive value).
    """
    if sigma_scale <= 0:
        raise ValueError(f"gaussian_sigma_scale must be > 0, got {sigma_scale}")
    weights = np.ones((), dtype=np.float64)
    for n in shape:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        weights = weights[..., None] * np.exp(-0.5 * (x / sigma) ** 2)
    weights = weights / weights.max()
    positive = weights > 0
    tiny = weights[positive].min() if positive.any() else 1.0
    return np.where(positive, weights, tiny).astype(np.float32)


def _as_volume(volume) -> np.ndarray:
    """``volume`` as a float32 ``[C, Z, Y, X]`` numpy array (a CPU tensor converts too)."""
    array = np.asarray(volume)
    if array.ndim != 4 or min(array.shape) < 1:
        raise ValueError(f"volume must be [C, Z, Y, X] with no empty axis, got {tuple(array.shape)}")
    return array.astype(np.float32, copy=False)


def _pad_to(volume: np.ndarray, minimum: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Pad spatial axes up to ``minimum`` (centred) with each channel's minimum value."""
    sizes = list(volume.shape[1:])
    if all(s >= m for s, m in zip(sizes, minimum)):
        return volume, [0, 0, 0]
    target = [max(s, m) for s, m in zip(sizes, minimum)]
    lows = [(t - s) // 2 for s, t in zip(sizes, target)]
    fill = volume.reshape(volume.shape[0], -1).min(axis=1)
    padded = np.empty((volume.shape[0], *target), dtype=np.float32)
    padded[:] = fill[:, None, None, None]
    padded[:, lows[0]:lows[0] + sizes[0], lows[1]:lows[1] + sizes[1],
           lows[2]:lows[2] + sizes[2]] = volume
    return padded, lows


def _mirror_sets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror_axes are spatial axes of [Z, Y, X] (0, 1, 2), got "
                         f"{tuple(mirror_axes)}; in-plane mirroring is (1, 2)")
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def _check_args(slab_depth: int, img_size: int, num_classes: int, batch_size: int) -> None:
    if slab_depth < 1 or img_size < 1:
        raise ValueError(f"slab_depth and img_size must be >= 1, got {slab_depth}, {img_size}")
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in [1, 256] for uint8 labels, got {num_classes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _predict_mirrored(predict_slab: PredictSlab, x: np.ndarray, mirrors: list[tuple[int, ...]],
                      expected: tuple[int, ...]) -> np.ndarray:
    """Mean of ``predict_slab`` over every flip combination of ``x`` ``[B, C, T, H, W]``."""
    pred = np.zeros(expected, dtype=np.float32)
    for flips in mirrors:
        axes = tuple(a + 2 for a in flips)
        xin = np.ascontiguousarray(np.flip(x, axes)) if axes else x
        out = np.asarray(predict_slab(xin), dtype=np.float32)
        if tuple(out.shape) != expected:
            raise ValueError(f"predict_slab returned shape {tuple(out.shape)}, expected {expected}")
        pred += np.flip(out, axes) if axes else out
    if len(mirrors) > 1:
        pred /= len(mirrors)
    return pred


class _Band:
    """The rolling Z band of the accumulator and the outputs its final slices are written to."""

    def __init__(self, num_classes: int, slab_depth: int, padded_yx: tuple[int, int],
                 shape_zyx: tuple[int, int, int], lows: list[int], return_probs: bool) -> None:
        self.depth, self.lows, self.shape = slab_depth, lows, shape_zyx
        self.acc = np.zeros((num_classes, slab_depth, *padded_yx), dtype=np.float32)
        self.wsum = np.zeros((slab_depth, *padded_yx), dtype=np.float32)
        self.lo = 0  # padded z of acc[:, 0]
        self.labels = np.zeros(shape_zyx, dtype=np.uint8)
        self.probs = np.zeros((num_classes, *shape_zyx), dtype=np.float32) if return_probs else None

    def add(self, z: int, y: int, x: int, pred: np.ndarray, gaussian: np.ndarray) -> None:
        """Accumulate one window's Gaussian-weighted maps, finalising slices before ``z``."""
        if z > self.lo:
            self.flush(z)
        h, w = pred.shape[-2:]
        self.acc[:, :, y:y + h, x:x + w] += pred * gaussian
        self.wsum[:, y:y + h, x:x + w] += gaussian

    def flush(self, upto: int) -> None:
        """Finalise padded slices ``[lo, upto)`` into the outputs and shift the band."""
        n = upto - self.lo
        if n <= 0:
            return
        depth, height, width = self.shape
        lz, ly, lx = self.lows
        z0, z1 = max(self.lo, lz), min(upto, lz + depth)
        if z1 > z0:
            rows = slice(z0 - self.lo, z1 - self.lo)
            part = (self.acc[:, rows, ly:ly + height, lx:lx + width]
                    / np.maximum(self.wsum[rows, ly:ly + height, lx:lx + width], 1e-12))
            self.labels[z0 - lz:z1 - lz] = part.argmax(0)
            if self.probs is not None:
                self.probs[:, z0 - lz:z1 - lz] = part
        keep = self.depth - n
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, n:]
            self.wsum[:keep] = self.wsum[n:]
        self.acc[:, max(keep, 0):] = 0
        self.wsum[max(keep, 0):] = 0
        self.lo = upto


def sliding_window_inference(
    predict_slab: PredictSlab,
    volume,
    *,
    slab_depth: int,
    img_size: int,
    num_classes: int,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    gaussian_sigma_scale: float = 0.125,
    return_probs: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Predict a ``[C, Z, Y, X]`` volume with a slab predictor; returns ``(probs, labels)``.

    ``predict_slab`` maps float32 ``[B, C, slab_depth, img_size, img_size]`` (numpy,
    C-contiguous) to per-class maps ``[B, num_classes, slab_depth, img_size, img_size]``
    (e.g. ``predictor.OrtRunner`` or ``predictor.TorchRunner``). ``mirror_axes`` are axes of
    ``[Z, Y, X]`` to flip for test-time augmentation (every combination is predicted and
    averaged; ``(1, 2)`` is the in-plane choice). ``probs`` is float32 ``[num_classes, Z, Y, X]``
    (``None`` unless ``return_probs``), ``labels`` uint8 ``[Z, Y, X]`` its argmax.
    """
    from tqdm.auto import tqdm

    _check_args(slab_depth, img_size, num_classes, batch_size)
    mirrors = _mirror_sets(mirror_axes)
    vol = _as_volume(volume)
    _, depth, height, width = vol.shape
    vol, lows = _pad_to(vol, (slab_depth, img_size, img_size))
    window = (slab_depth, img_size, img_size)
    starts = [compute_steps(s, w, overlap) for s, w in zip(vol.shape[1:], window)]
    positions = list(itertools.product(*starts))
    gaussian = gaussian_importance_map(window, gaussian_sigma_scale)
    band = _Band(num_classes, slab_depth, vol.shape[2:], (depth, height, width), lows, return_probs)

    bar = tqdm(total=len(positions), desc="sliding window", unit="slab", disable=not progress)
    try:
        for first in range(0, len(positions), batch_size):
            batch_pos = positions[first:first + batch_size]
            x = np.stack([vol[:, z:z + slab_depth, y:y + img_size, xx:xx + img_size]
                          for z, y, xx in batch_pos])
            pred = _predict_mirrored(predict_slab, x, mirrors, (len(batch_pos), num_classes, *window))
            for (z, y, xx), p in zip(batch_pos, pred):
                band.add(z, y, xx, p, gaussian)
            bar.update(len(batch_pos))
    finally:
        bar.close()
    band.flush(band.lo + slab_depth)
    return band.probs, band.labels
