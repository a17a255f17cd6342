"""nnU-Net-like data augmentation for anisotropic slabs, built from MONAI dictionary transforms.

Slabs are ``[C, T, H, W]`` with few, thick slices, so spatial transforms act in-plane: rotation
about the slice axis, in-plane scaling, optional elastic deformation (off by default, as in
nnU-Net v2), mirroring of the two in-plane axes. Intensity transforms follow nnU-Net's
defaults: Gaussian noise, Gaussian blur, multiplicative brightness, additive shift, gamma.

Randomness is owned by the caller: :func:`augment` reseeds every transform from a
``numpy.random.Generator`` so a sample depends only on its seed (repeatable runs, exact
resume, any number of data-loader workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # monai takes seconds to import: only when a training builds its transforms
    from monai.transforms import Compose


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; the defaults are nnU-Net's, restricted to in-plane geometry."""

    p_spatial: float = 0.2     # one draw for rotation + scaling (nnU-Net draws each at 0.2)
    rotate_deg: float = 180.0
    scale: tuple[float, float] = (0.7, 1.4)
    p_elastic: float = 0.0
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.2
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_shift: float = 0.15
    shift: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5


def build_augmentation(patch: tuple[int, int, int], cfg: AugmentConfig = AugmentConfig()) -> "Compose":
    """Transforms for a ``{"image": [C,T,h,w], "label": [1,T,h,w]}`` crop that is larger than
    ``patch`` (T, P, P) in-plane; the output is centre-cropped to ``patch``.

    Cropping a larger region first means rotated or zoomed-out patches show real anatomy in
    their corners instead of padding, as nnU-Net does.
    """
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    # Scale range in MONAI is "factor - 1"; a zoom factor > 1 shows a smaller field of view.
    lo, hi = cfg.scale
    rot = math.radians(cfg.rotate_deg)
    spatial = [
        RandAffined(
            keys, prob=cfg.p_spatial, rotate_range=(rot, 0.0, 0.0),
            scale_range=(0.0, (lo - 1.0, hi - 1.0), (lo - 1.0, hi - 1.0)),
            mode=("bilinear", "nearest"), padding_mode="zeros",
        ),
    ]
    if cfg.p_elastic > 0:
        spatial.append(
            Rand3DElasticd(
                keys, sigma_range=(9.0, 13.0), magnitude_range=(0.0, 200.0), prob=cfg.p_elastic,
                mode=("bilinear", "nearest"), padding_mode="zeros",
            )
        )
    spatial.append(CenterSpatialCropd(keys, roi_size=patch))
    intensity = [
        RandGaussianNoised("image", prob=cfg.p_noise, std=cfg.noise_std),
        RandGaussianSmoothd("image", prob=cfg.p_blur, sigma_x=(0.0, 0.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", prob=cfg.p_brightness, factors=(cfg.brightness[0] - 1, cfg.brightness[1] - 1)),
        RandShiftIntensityd("image", prob=cfg.p_shift, offsets=cfg.shift),
        RandAdjustContrastd("image", prob=cfg.p_gamma, gamma=cfg.gamma, retain_stats=True),
        RandFlipd(keys, prob=cfg.p_mirror, spatial_axis=1),
        RandFlipd(keys, prob=cfg.p_mirror, spatial_axis=2),
    ]
    return Compose(spatial + intensity)


def augment(
    transform: "Compose", image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``transform`` to one crop with randomness drawn from ``rng``.

    ``image`` is ``[C, T, h, w]`` float32 and ``label`` ``[T, h, w]`` integer; returns
    ``(image [C,T,P,P] float32, label [T,P,P] int64)`` as plain tensors.
    """
    transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
    out = transform({"image": torch.from_numpy(image), "label": torch.from_numpy(label[None].astype(np.float32))})
    img = out["image"].as_tensor() if hasattr(out["image"], "as_tensor") else out["image"]
    lab = out["label"].as_tensor() if hasattr(out["label"], "as_tensor") else out["label"]
    return img.float().contiguous(), lab[0].round().long().contiguous()
