"""Tiny real artefacts shared by the prediction/export/register/serve tests.

A four-case CT-like dataset in the nnU-Net raw layout, run through the real ``preprocess``, and a
training directory holding a randomly initialised ``tiny`` MaskSAM (img_size 32) in the exact
layout ``masksam train`` writes. The model is untrained: these tests check plumbing, geometry and
parity, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "liver": 1, "spleen": 2}
SPACING = (1.5, 1.7, 3.0)
SIZE_XYZ = (28, 24, 10)


def phantom_ct(seed: int, size_xyz=SIZE_XYZ, spacing=SPACING) -> tuple[sitk.Image, sitk.Image]:
    """A CT-like volume (air around an ellipsoid body, two brighter organs) and its labels."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx),
                          indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.75) ** 2 < 1
    liver = ((x + 0.35) / 0.3) ** 2 + (y / 0.3) ** 2 + (z / 0.7) ** 2 < 1
    spleen = ((x - 0.4) / 0.2) ** 2 + ((y + 0.1) / 0.2) ** 2 + (z / 0.6) ** 2 < 1
    ct = np.full(body.shape, -1000.0, np.float32)
    ct[body] = 30
    ct[liver] = 110
    ct[spleen] = 180
    ct += rng.normal(0, 8, ct.shape).astype(np.float32)
    label = np.zeros(body.shape, np.uint8)
    label[liver] = 1
    label[spleen] = 2
    image, seg = sitk.GetImageFromArray(ct.astype(np.int16)), sitk.GetImageFromArray(label)
    direction = (1, 0, 0, 0, -1, 0, 0, 0, 1)  # not LPS: restoring must undo the reorientation
    for im in (image, seg):
        im.SetSpacing(spacing)
        im.SetOrigin((-20.5 + seed, 13.25, -7.0))
        im.SetDirection(direction)
    return image, seg


def write_raw_dataset(root: Path, n_cases: int = 4) -> Path:
    """nnU-Net v2 raw dataset with ``n_cases`` phantom cases."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        image, seg = phantom_ct(i)
        sitk.WriteImage(image, str(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(seg, str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "delivery-phantom", "channel_names": {"0": "CT"}, "labels": LABELS,
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return root


def make_preprocessed(root: Path) -> Path:
    """Run the real preprocessing on the phantom dataset."""
    from masksam.components.preprocess import preprocess_dataset

    raw = write_raw_dataset(root / "raw")
    out = root / "preprocessed"
    preprocess_dataset(raw, out, target_spacing=[2.0, 2.0, 3.0], workers=1, folds=2, seed=0,
                       test_fraction=0.25, progress=False)
    return out


def make_training_dir(root: Path, preprocessed: Path, seed: int = 0, img_size: int = 32,
                        slab_depth: int = 4) -> Path:
    """A training directory as `masksam train` writes it, with random tiny weights."""
    import torch
    from safetensors.torch import save_file

    from masksam.model import MaskSAMConfig, build_masksam

    out = root / f"train_{seed}"
    out.mkdir(parents=True)
    cfg = MaskSAMConfig(variant="tiny", img_size=img_size, slab_depth=slab_depth,
                        num_classes=len(LABELS), num_queries=4, freeze_sam=False)
    torch.manual_seed(seed)
    model = build_masksam(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "plan.json").write_text((preprocessed / "plan.json").read_text())
    from masksam.components._loading import sha256_file

    (out / "train_summary.json").write_text(json.dumps({
        "mlflow_run_id": None, "steps": 0, "best_val_dice": None,
        "hashes": {name: sha256_file(out / name) for name in
                   ("model.safetensors", "plan.json", "model_config.json")}}))
    return out


# ----------------------------------------------------------------------------- pytest fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def delivery_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("delivery")


@pytest.fixture(scope="session")
def preprocessed(delivery_root) -> Path:
    return make_preprocessed(delivery_root)


@pytest.fixture(scope="session")
def train_dir(delivery_root, preprocessed) -> Path:
    return make_training_dir(delivery_root, preprocessed)


@pytest.fixture(scope="session")
def export_dir(delivery_root, train_dir, preprocessed) -> Path:
    """ONNX export with the TorchScript exporter (seconds; the dynamo path has a slow test)."""
    from masksam.components.export import export

    out = delivery_root / "export"
    export(train_dir, out, data_dir=preprocessed, exporter="torchscript", tensorrt="off")
    return out
