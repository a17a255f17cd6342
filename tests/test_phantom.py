"""Phantom CT generator: layout, determinism, anatomy, intensities, geometry and variation."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from masksam.cli import main
from masksam.components.data.manifest import verify_manifest
from masksam.components.data.phantom import LABELS, generate_case, generate_phantom, make_images, sample_case_params
from masksam.components.data.validate import validate_dataset
from masksam.errors import UserError


def _centroid_mm(params, label, value):
    """Physical (LPS) centroid of a label, via the image's own geometry."""
    img = make_images(params, np.zeros_like(label, np.int16), label)[1]
    zyx = np.argwhere(label == value).mean(0)
    return np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def _full_case(size=(96, 96, 24)):
    """First case (seed 0) with every organ present and within the field of view."""
    for i in range(20):
        params, image, label = generate_case(0, i, size)
        if all(np.any(label == v) for v in LABELS.values()):
            return params, image, label
    raise AssertionError("no case with all organs in 20 draws")


def test_dataset_layout_validates_and_has_manifest(tmp_path):
    out = generate_phantom(tmp_path / "raw", cases=3, seed=1, size_xyz=(48, 48, 12), progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == LABELS and meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 3
    assert "seed 1" in meta["source"] and meta["description"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"phantom_00{i}_0000.nii.gz" for i in range(3)]
    report = validate_dataset(out, strict=True, progress=False)
    assert report.ok, report.format()
    assert verify_manifest(out, progress=False).ok
    img = sitk.ReadImage(str(out / "imagesTr" / "phantom_000_0000.nii.gz"))
    assert img.GetSize() == (48, 48, 12) and img.GetPixelID() == sitk.sitkInt16
    assert img.GetOrigin() != (0.0, 0.0, 0.0)


def test_deterministic_by_seed_and_independent_of_workers(tmp_path):
    a = generate_case(3, 1, (40, 40, 10))
    b = generate_case(3, 1, (40, 40, 10))
    c = generate_case(4, 1, (40, 40, 10))
    assert a[1].tobytes() == b[1].tobytes() and a[2].tobytes() == b[2].tobytes()
    assert a[1].tobytes() != c[1].tobytes()
    one = generate_phantom(tmp_path / "w1", cases=2, seed=5, size_xyz=(32, 32, 8), workers=1, progress=False)
    two = generate_phantom(tmp_path / "w2", cases=2, seed=5, size_xyz=(32, 32, 8), workers=2, progress=False)
    for rel in ("imagesTr/phantom_001_0000.nii.gz", "labelsTr/phantom_001.nii.gz"):
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(one / rel)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(two / rel)))
        assert np.array_equal(x, y)


def test_anatomy_is_in_anatomical_relation():
    params, image, label = _full_case()
    c = {name: _centroid_mm(params, label, v) for name, v in LABELS.items() if v}
    x, y, z = 0, 1, 2  # LPS: x grows to the patient's left, y posterior, z superior
    assert c["liver"][x] < c["spleen"][x]                       # liver right, spleen left
    assert c["spleen"][y] > c["liver"][y]                       # spleen posterior
    assert c["liver"][z] > c["kidney_right"][z]                  # liver superior
    assert c["kidney_right"][x] < c["aorta"][x] < c["kidney_left"][x]   # kidneys either side
    assert c["kidney_left"][y] > c["aorta"][y] and c["kidney_right"][y] > c["aorta"][y]
    assert c["stomach"][x] > c["aorta"][x] and c["stomach"][z] > c["pancreas"][z]  # left upper
    assert c["pancreas"][y] < c["aorta"][y]                      # pancreas in front of the aorta


def test_intensities_are_ct_like():
    params, image, label = _full_case()
    hu = image.astype(float)
    assert np.median(hu[:, :3, :3]) == pytest.approx(-1000, abs=60)          # air in the corner
    organ_mean = {n: np.median(hu[label == v]) for n, v in LABELS.items() if v}  # PV-robust
    assert 20 < organ_mean["liver"] < 140 and 20 < organ_mean["spleen"] < 150
    if params.phase != "native":
        assert organ_mean["aorta"] > organ_mean["liver"] + 40
        assert organ_mean["kidney_left"] > organ_mean["liver"]
    assert hu.max() > 400                                       # bone
    assert (hu < -80).sum() > 0.02 * hu.size and ((hu > -130) & (hu < -70)).any()   # fat
    # noise: the liver is not flat
    assert 4 < hu[label == LABELS["liver"]].std() < 80


def test_case_variation_geometry_and_absent_organs():
    rng_draws = [sample_case_params(np.random.default_rng([0, i]), (160, 160, 40)) for i in range(300)]
    spacing = np.array([p.spacing_xyz for p in rng_draws])
    assert spacing[:, 0].min() >= 0.6 and spacing[:, 0].max() <= 1.0 and np.ptp(spacing[:, 0]) > 0.3
    assert set(spacing[:, 2]) <= {2.0, 2.5, 3.0, 4.0, 5.0} and len(set(spacing[:, 2])) == 5
    missing = np.mean([not (p.present["pancreas"] and p.present["kidney_left"] and p.present["kidney_right"])
                       for p in rng_draws])
    assert 0.08 < missing < 0.25
    dirs = {tuple(np.round(p.direction, 3).flatten()) for p in rng_draws}
    assert tuple(np.eye(3).flatten()) in dirs and len(dirs) > 10         # identity, flips, tilts
    assert all(abs(np.linalg.det(p.direction) - 1) < 1e-9 for p in rng_draws)
    # the anatomy is shrunk for a small grid and adult-sized for a full CT grid
    assert max(p.scale for p in rng_draws) < 0.6
    full = sample_case_params(np.random.default_rng([0, 0]), (512, 512, 120))
    assert full.scale > 0.8


def test_cli_and_bad_arguments(tmp_path, capsys):
    assert main(["data", "phantom", "--out", str(tmp_path / "d"), "--cases", "1", "--size", "32", "32", "8",
                 "--no-progress"]) == 0
    assert (tmp_path / "d" / "manifest.json").is_file()
    with pytest.raises(UserError, match="--size"):
        generate_phantom(tmp_path / "e", cases=1, size_xyz=(8, 8, 2))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    assert main(["data", "phantom", "--out", str(tmp_path / "precious"), "--cases", "1", "--size", "32", "32", "8"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "precious" / "thesis.tex").is_file()


@pytest.mark.slow
def test_full_ct_size_renders_in_seconds():
    t = time.process_time()
    params, image, label = generate_case(0, 3, (512, 512, 120))
    cpu = time.process_time() - t
    assert image.shape == (120, 512, 512) and params.scale > 0.8
    assert cpu < 30, f"512x512x120 took {cpu:.1f} s of CPU"
