"""Whole-volume prediction from a per-slab predictor by Gaussian-weighted sliding window.

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
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["compute_steps", "gaussian_importance_map", "sliding_window_inference",
           "predict_volume"]

PredictSlab = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


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


def gaussian_importance_map(shape: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian ``[T, H, W]`` (sigma = ``sigma_scale`` x size per axis), max 1.

    Centred on the window's centre (symmetric, so mirroring does not bias it); never 0, so
    every voxel of a window counts (nnU-Net replaces zeros by the smallest positive value).
    """
    if sigma_scale <= 0:
        raise ValueError(f"gaussian_sigma_scale must be > 0, got {sigma_scale}")
    weights = torch.ones((), dtype=torch.float64)
    for n in shape:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        weights = weights[..., None] * torch.exp(-0.5 * (x / sigma) ** 2)
    weights = weights / weights.max()
    tiny = weights[weights > 0].min() if (weights > 0).any() else torch.tensor(1.0)
    weights = torch.where(weights > 0, weights, tiny)
    return weights.float()


def _as_volume(volume: "np.ndarray | torch.Tensor") -> torch.Tensor:
    if isinstance(volume, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(volume))
    elif isinstance(volume, torch.Tensor):
        tensor = volume.detach().cpu()
    else:
        raise TypeError(f"volume must be a numpy array or torch tensor, got {type(volume)}")
    if tensor.dim() != 4 or min(tensor.shape) < 1:
        raise ValueError(f"volume must be [C, Z, Y, X] with no empty axis, got "
                         f"{tuple(tensor.shape)}")
    return tensor.float()


def _pad_to(volume: torch.Tensor, minimum: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Pad spatial axes up to ``minimum`` (centred) with each channel's minimum value."""
    sizes = list(volume.shape[1:])
    if all(s >= m for s, m in zip(sizes, minimum)):
        return volume, [0, 0, 0]
    target = [max(s, m) for s, m in zip(sizes, minimum)]
    lows = [(t - s) // 2 for s, t in zip(sizes, target)]
    fill = volume.reshape(volume.shape[0], -1).amin(dim=1)
    padded = fill.view(-1, 1, 1, 1).expand(-1, *target).clone()
    padded[:, lows[0]:lows[0] + sizes[0], lows[1]:lows[1] + sizes[1],
           lows[2]:lows[2] + sizes[2]] = volume
    return padded, lows


def _mirror_sets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror_axes are spatial axes of [Z, Y, X] (0, 1, 2), got "
                         f"{tuple(mirror_axes)}; in-plane mirroring is (1, 2)")
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def sliding_window_inference(
    predict_slab: PredictSlab,
    volume: "np.ndarray | torch.Tensor",
    *,
    slab_depth: int,
    img_size: int,
    num_classes: int,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    gaussian_sigma_scale: float = 0.125,
    device: "str | torch.device" = "cpu",
    return_probs: bool = True,
    progress: bool = False,
) -> tuple["np.ndarray | None", np.ndarray]:
    """Predict a ``[C, Z, Y, X]`` volume with a slab predictor; returns ``(probs, labels)``.

    ``predict_slab`` maps float32 ``[B, C, slab_depth, img_size, img_size]`` (on ``device``)
    to per-class maps ``[B, num_classes, slab_depth, img_size, img_size]`` (tensor or numpy;
    e.g. ``MaskSAM.class_probs`` or an ONNX Runtime session wrapper). ``mirror_axes`` are
    axes of ``[Z, Y, X]`` to flip for test-time augmentation (every combination is predicted
    and averaged; ``(1, 2)`` is the in-plane choice). ``probs`` is float32
    ``[num_classes, Z, Y, X]`` (``None`` unless ``return_probs``), ``labels`` uint8
    ``[Z, Y, X]`` its argmax.
    """
    if slab_depth < 1 or img_size < 1:
        raise ValueError(f"slab_depth and img_size must be >= 1, got {slab_depth}, {img_size}")
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in [1, 256] for uint8 labels, got {num_classes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mirrors = _mirror_sets(mirror_axes)
    vol = _as_volume(volume)
    channels, depth, height, width = vol.shape
    vol, lows = _pad_to(vol, (slab_depth, img_size, img_size))
    _, zp, yp, xp = vol.shape
    window = (slab_depth, img_size, img_size)
    starts = [compute_steps(s, w, overlap) for s, w in zip((zp, yp, xp), window)]
    positions = list(itertools.product(*starts))
    gaussian = gaussian_importance_map(window, gaussian_sigma_scale)

    labels = np.zeros((depth, height, width), dtype=np.uint8)
    probs = np.zeros((num_classes, depth, height, width), dtype=np.float32) \
        if return_probs else None
    acc = torch.zeros(num_classes, slab_depth, yp, xp)   # rolling band over Z
    wsum = torch.zeros(slab_depth, yp, xp)
    band_lo = 0                                             # padded z of acc[:, 0]

    def flush(upto: int) -> None:
        """Finalise padded slices [band_lo, upto) into the outputs and shift the band."""
        nonlocal band_lo
        n = upto - band_lo
        if n <= 0:
            return
        block = acc[:, :n] / wsum[:n].clamp_min(1e-12)
        block = block[:, :, lows[1]:lows[1] + height, lows[2]:lows[2] + width]
        z0 = max(band_lo, lows[0])
        z1 = min(upto, lows[0] + depth)
        if z1 > z0:
            part = block[:, z0 - band_lo:z1 - band_lo]
            labels[z0 - lows[0]:z1 - lows[0]] = part.argmax(0).numpy().astype(np.uint8)
            if probs is not None:
                probs[:, z0 - lows[0]:z1 - lows[0]] = part.numpy()
        keep = slab_depth - n
        if keep > 0:
            acc[:, :keep] = acc[:, n:].clone()
            wsum[:keep] = wsum[n:].clone()
        acc[:, max(keep, 0):] = 0
        wsum[max(keep, 0):] = 0
        band_lo = upto

    bar = tqdm(total=len(positions), desc="sliding window", unit="slab", disable=not progress)
    try:
        for first in range(0, len(positions), batch_size):
            batch_pos = positions[first:first + batch_size]
            x = torch.stack([vol[:, z:z + slab_depth, y:y + img_size, xx:xx + img_size]
                             for z, y, xx in batch_pos]).to(device)
            pred = torch.zeros(len(batch_pos), num_classes, *window)
            for flips in mirrors:
                dims = [a + 2 for a in flips]
                xin = torch.flip(x, dims) if dims else x
                with torch.inference_mode():
                    out = predict_slab(xin)
                out = torch.as_tensor(out).detach().float().cpu()
                expected = (len(batch_pos), num_classes, *window)
                if tuple(out.shape) != expected:
                    raise ValueError(f"predict_slab returned shape {tuple(out.shape)}, "
                                     f"expected {expected}")
                pred += torch.flip(out, dims) if dims else out
            pred /= len(mirrors)
            for (z, y, xx), p in zip(batch_pos, pred):
                if z > band_lo:
                    flush(z)
                acc[:, :, y:y + img_size, xx:xx + img_size] += p * gaussian
                wsum[:, y:y + img_size, xx:xx + img_size] += gaussian
            bar.update(len(batch_pos))
    finally:
        bar.close()
    flush(band_lo + slab_depth)
    return probs, labels


def predict_volume(
    model: torch.nn.Module,
    volume: "np.ndarray | torch.Tensor",
    *,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    gaussian_sigma_scale: float = 0.125,
    device: "str | torch.device | None" = None,
    autocast_dtype: "torch.dtype | None" = None,
    return_probs: bool = True,
    progress: bool = False,
) -> tuple["np.ndarray | None", np.ndarray]:
    """Sliding-window prediction with a MaskSAM module (its ``cfg`` gives the window).

    Uses ``model.class_probs`` in eval mode on ``device`` (default: the model's), optionally
    under autocast (e.g. ``torch.bfloat16`` on GPU); restores the model's training flag.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "class_probs"):
        raise TypeError("predict_volume needs a MaskSAM-like module with .cfg and .class_probs")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()

    def predict_slab(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            return model.class_probs(x).float()

    try:
        return sliding_window_inference(
            predict_slab, volume, slab_depth=cfg.slab_depth, img_size=cfg.img_size,
            num_classes=cfg.num_classes, overlap=overlap, mirror_axes=mirror_axes,
            batch_size=batch_size, gaussian_sigma_scale=gaussian_sigma_scale, device=device,
            return_probs=return_probs, progress=progress)
    finally:
        model.train(was_training)
