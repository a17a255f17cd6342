"""Tiny raw datasets written with SimpleITK, shared by the data-step tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING = (0.8, 0.8, 2.5)
ORIGIN = (-12.0, 30.5, -400.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def image(arr: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> sitk.Image:
    """A SimpleITK image of ``arr`` ([Z, Y, X]) with a non-trivial geometry."""
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing[: im.GetDimension()])
    im.SetOrigin(origin[: im.GetDimension()])
    if im.GetDimension() == 3:
        im.SetDirection(direction)
    return im


def case_arrays(seed: int, shape=(4, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 100, shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 2:5, 2:5] = 1
    lab[2:4, 5:7, 1:3] = 2
    return img, lab


def make_dataset(root: Path, n: int = 3, labels=None) -> Path:
    """A valid nnU-Net raw dataset of ``n`` tiny cases in ``root``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        img, lab = case_arrays(i)
        sitk.WriteImage(image(img), str(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(image(lab), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    meta = {"name": "tiny", "channel_names": {"0": "CT"},
            "labels": labels or {"background": 0, "liver": 1, "spleen": 2},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root
