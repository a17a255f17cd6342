"""Integration: phantom raw dataset -> `masksam data validate` -> `masksam preprocess` (real CLI),
then every preprocessed label map restored onto its original grid must match the original."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from masksam.cli import main
from masksam.components.preprocess import load_case, load_plan, restore_to_original

phantom = pytest.importorskip("masksam.components.data.phantom")


def test_phantom_validate_preprocess_restore(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "pre"
    assert main(["data", "phantom", "--out", str(raw), "--cases", "3", "--size", "64", "64", "16",
                 "--seed", "5", "--no-progress"]) == 0
    assert main(["data", "validate", str(raw), "--no-progress"]) == 0
    # Finer than every phantom spacing (in-plane 0.6-1.0 mm, slices 2-5 mm): nothing is lost,
    # so the round trip must be (nearly) exact; two workers exercise the process pool.
    assert main(["preprocess", "--raw", str(raw), "--out", str(out), "--target-spacing", "0.5", "0.5", "1.0",
                 "--folds", "2", "--workers", "2", "--no-progress"]) == 0
    plan = load_plan(out)
    ds = json.loads((raw / "dataset.json").read_text())
    assert plan["labels"] == ds["labels"] and plan["orientation"] == "LPS"
    # the training data's identity travels with the plan: the phantom's manifest hash
    assert plan["dataset_sha256"] == json.loads((raw / "manifest.json").read_text())["dataset_sha256"]
    assert plan["cases"] == sorted(p.name[:-7] for p in (raw / "labelsTr").glob("*.nii.gz"))
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["test"]) == 1 and len(splits["folds"]) == 2
    orientations = set()
    for case in plan["cases"]:
        image, label, props = load_case(out, case)
        assert image.shape[0] == 1 and image.shape[1:] == label.shape
        assert props["resampled"]["spacing_xyz"] == [0.5, 0.5, 1.0]
        original = sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))
        orientations.add(props["original"]["orientation"])
        restored = restore_to_original(label, props)
        assert restored.GetSize() == original.GetSize()
        assert restored.GetSpacing() == original.GetSpacing()
        assert restored.GetOrigin() == original.GetOrigin()
        assert restored.GetDirection() == original.GetDirection()
        a, b = sitk.GetArrayFromImage(original), sitk.GetArrayFromImage(restored)
        for value in np.unique(a)[1:]:
            x, y = a == value, b == value
            d = 2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum())
            assert d >= 0.98, f"{case} label {value}: Dice {d:.4f}"
        # The CT channel is clipped/z-scored with the dataset's foreground statistics.
        norm = plan["normalization"]["0"]
        lo, hi = (np.array(norm["clip"]) - norm["mean"]) / norm["std"]
        assert image.min() >= lo - 1e-4 and image.max() <= hi + 1e-4
    assert "stomach" in plan["fingerprint"]["cases"][plan["cases"][0]]["class_volumes_ml"]
    capsys.readouterr()
