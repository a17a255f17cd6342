"""Unit tests of `masksam preprocess`: fingerprint, spacing, orientation, crop, resampling,
normalisation, splits, atomic outputs, error messages, and the geometry round trip on a real CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from masksam.cli import main
from masksam.components import _fingerprint as fp
from masksam.components._resample import (Grid, orientation_of, reorient, resample_image,
                                          resample_label, resample_probabilities, target_grid)
from masksam.components._splits import make_splits
from masksam.components.preprocess import (load_case, load_plan, preprocess_case,
                                           preprocess_dataset, restore_to_original)
from masksam.errors import UserError

from _shared import REAL_CT_DIR as REAL, real_ct_dir
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# tiny synthetic cases
# ------------------------------------------------------------------------------------------------

def _ball(shape_zyx, center_zyx, radius_zyx):
    z, y, x = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    c, r = center_zyx, radius_zyx
    return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0


def make_ct(seed=0, size_xyz=(40, 36, 16), spacing=(1.5, 1.5, 3.0), origin=(-30.0, -27.0, 10.0),
            direction=IDENTITY, body_hu=40.0):
    """A body ellipsoid (soft tissue) in air with two organs: liver-like (1) and a cyst-like (2)."""
    rng = np.random.default_rng(seed)
    shape = size_xyz[::-1]
    ct = np.full(shape, -1000.0)
    body = _ball(shape, (shape[0] / 2, shape[1] / 2, shape[2] / 2), (shape[0], shape[1] * 0.35, shape[2] * 0.38))
    ct[body] = body_hu
    organ1 = _ball(shape, (shape[0] / 2, shape[1] / 2, shape[2] * 0.4), (shape[0] * 0.3, 5, 6))
    organ2 = _ball(shape, (shape[0] / 2, shape[1] / 2 + 2, shape[2] * 0.65), (shape[0] * 0.25, 3, 3))
    ct[organ1] = 120.0
    ct[organ2] = -80.0
    ct += rng.normal(0, 5, shape)
    label = np.zeros(shape, np.uint8)
    label[organ1] = 1
    label[organ2] = 2
    images = []
    for array, dtype in ((ct.astype(np.int16), None), (label, None)):
        im = sitk.GetImageFromArray(array)
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        im.SetDirection(direction)
        images.append(im)
    return images[0], images[1]


def write_raw(root: Path, n=4, fixed_test=None, seed0=0, **kw) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        ct, label = make_ct(seed=seed0 + i, **kw)
        sitk.WriteImage(ct, str(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    ds = {"name": "Tiny", "channel_names": {"0": "CT"},
          "labels": {"background": 0, "organ": 1, "cyst": 2}, "numTraining": n, "file_ending": ".nii.gz"}
    if fixed_test:
        ds["fixed_test_cases"] = fixed_test
    (root / "dataset.json").write_text(json.dumps(ds))
    return root


def ct_plan(spacing=(1.5, 1.5, 3.0), **over) -> dict:
    plan = {"modalities": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "cyst": 2},
            "orientation": "LPS", "crop": fp.CROP_RULE, "target_spacing_xyz": list(spacing),
            "image_interp": "linear", "label_interp": "nearest",
            "normalization": {"0": {"scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0}}}
    plan.update(over)
    return plan


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


# ------------------------------------------------------------------------------------------------
# fingerprint and target spacing
# ------------------------------------------------------------------------------------------------

def test_case_fingerprint_volumes_and_intensity_samples():
    arrays = [np.full((4, 5, 6), 7.0, np.float32)]
    arrays[0][0] = 100.0
    label = np.zeros((4, 5, 6), np.uint8)
    label[1:3, 1:3, 1:3] = 1  # 8 voxels of 2 x 2 x 2.5 mm = 80 mm^3 = 0.08 mL
    entry, samples, source = fp.case_fingerprint(arrays, label, np.ones_like(label, bool), (2.0, 2.0, 2.5),
                                                 {"background": 0, "organ": 1, "cyst": 2}, 500,
                                                 np.random.default_rng(0))
    assert entry["size_xyz"] == [6, 5, 4] and entry["spacing_xyz"] == [2.0, 2.0, 2.5]
    assert entry["class_volumes_ml"] == {"organ": pytest.approx(0.08), "cyst": 0.0}
    assert source == "label_foreground"
    assert samples[0].shape == (500,) and np.all(samples[0] == 7.0)  # only foreground voxels sampled
    stats = fp.intensity_stats(np.concatenate([samples[0], np.arange(100, dtype=np.float32)]))
    assert stats["max"] == 99 and stats["min"] == 0 and stats["num_samples"] == 600


def test_dataset_fingerprint_in_plan(tmp_path):
    raw = write_raw(tmp_path / "raw", n=3)
    plan = preprocess_dataset(raw, tmp_path / "out", workers=1, folds=2, progress=False)
    assert plan == load_plan(tmp_path / "out")
    fpr = plan["fingerprint"]
    ct, label = make_ct(seed=0)
    lab = sitk.GetArrayFromImage(label)
    entry = fpr["cases"]["case_000"]
    assert entry["spacing_xyz"] == [1.5, 1.5, 3.0] and entry["original_size_xyz"] == [40, 36, 16]
    # Body crop in x and y only (the body ellipsoid spans all slices).
    assert entry["size_xyz"][2] == 16 and entry["size_xyz"][0] < 40 and entry["size_xyz"][1] < 36
    # nnU-Net's nonzero crop keeps the whole CT (air is -1000): the size its anisotropy rule sees.
    assert entry["nonzero_size_xyz"] == [40, 36, 16]
    assert entry["class_volumes_ml"]["organ"] == pytest.approx((lab == 1).sum() * 1.5 * 1.5 * 3 / 1000, abs=1e-4)
    stats = fpr["foreground_intensity_properties_per_channel"]["0"]
    # Foreground = organ (120 HU) and cyst (-80 HU), both +- 5 HU noise, stored as int16.
    assert -90 < stats["percentile_00_5"] < -70 and 110 < stats["percentile_99_5"] < 135
    assert stats["min"] >= -110 and stats["max"] <= 150
    norm = plan["normalization"]["0"]
    assert norm["scheme"] == "ct" and norm["clip"] == [stats["percentile_00_5"], stats["percentile_99_5"]]
    assert plan["target_spacing_xyz"] == [1.5, 1.5, 3.0] and plan["target_spacing_rule"] == "median"
    assert plan["orientation"] == "LPS" and plan["modalities"] == {"0": "CT"}


def test_target_spacing_median_and_anisotropic_rule():
    spacing, info = fp.choose_target_spacing([[1, 1, 2], [0.8, 0.8, 3], [0.6, 0.6, 2.5]],
                                             [[100, 100, 50]] * 3)
    assert spacing == [0.8, 0.8, 2.5] and not info["anisotropic"]
    # Thick slices (5 mm vs 0.8 mm) and few of them: z target is the 10th percentile of z spacings.
    spacings = [[0.8, 0.8, 5.0]] * 7 + [[0.8, 0.8, 2.5], [0.8, 0.8, 3.0], [0.8, 0.8, 5.0]]
    spacing, info = fp.choose_target_spacing(spacings, [[512, 512, 40]] * 10)
    assert info["anisotropic"] and spacing[:2] == [0.8, 0.8]
    assert spacing[2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))
    # Anisotropic spacing but as many slices as rows: nnU-Net keeps the median.
    spacing, info = fp.choose_target_spacing(spacings, [[100, 100, 200]] * 10)
    assert spacing[2] == 5.0 and not info["anisotropic"]


# ------------------------------------------------------------------------------------------------
# orientation, crop, resampling, normalisation
# ------------------------------------------------------------------------------------------------

def test_reorientation_to_lps_keeps_physical_content():
    # x runs right-to-left flipped, y and z swapped: a permuted, flipped direction.
    direction = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    ct, label = make_ct(spacing=(1.5, 3.0, 2.0), direction=direction)
    assert orientation_of(ct) != "LPS"
    image, lab, props = preprocess_case([ct], label, ct_plan(spacing=(1.5, 2.0, 3.0)))
    assert props["reoriented"]["orientation"] == "LPS"
    assert props["reoriented"]["direction"] == list(IDENTITY)
    assert props["original"]["orientation"] == orientation_of(ct)
    # Same physical content: the original label resampled (nearest) onto the output grid.
    grid = Grid.from_json(props["resampled"])
    ref = sitk.Resample(label, grid.size, sitk.Transform(), sitk.sitkNearestNeighbor, grid.origin,
                        grid.spacing, grid.direction, 0, sitk.sitkUInt8)
    assert np.array_equal(sitk.GetArrayFromImage(ref), lab)
    # Physical position of a voxel in the output = the same tissue in the input.
    k = np.argwhere(lab == 2)[0]
    point = grid.image(lab).TransformIndexToPhysicalPoint([int(i) for i in k[::-1]])
    assert label[label.TransformPhysicalPointToIndex(point)] == 2


def test_reorient_helper_is_a_pure_permutation():
    ct, _ = make_ct(direction=(0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    out = reorient(ct, "LPS")
    assert out.GetDirection() == IDENTITY and sorted(out.GetSize()) == sorted(ct.GetSize())
    assert np.isclose(sitk.GetArrayViewFromImage(out).sum(), sitk.GetArrayViewFromImage(ct).sum())


def test_ct_body_crop_keeps_limbs_and_drops_noise():
    shape = (10, 60, 60)
    ct = np.full(shape, -1000.0, np.float32)
    ct[:, 10:40, 10:40] = 30.0      # trunk, 9000 voxels
    ct[2:8, 45:55, 45:50] = 30.0    # separate arm, 300 voxels (> 5% of trunk)... not: 3.3%
    ct[:, 45:55, 45:51] = 30.0      # make the arm 600 voxels (6.7% of the trunk)
    ct[0, 0, 58] = 500.0            # a single bright noise voxel
    ct[5, 58, 0:3] = -200.0         # table fragment: 3 voxels
    mask = fp.body_mask([ct], ["CT"])
    lo, size = fp.bounding_box(mask)
    assert lo.tolist() == [0, 10, 10] and (lo + size).tolist() == [10, 55, 51]
    # MR: nonzero; an empty mask crops nothing.
    mr = np.zeros(shape, np.float32)
    mr[3:5, 20:22, 30:33] = 1.0
    lo, size = fp.bounding_box(fp.body_mask([mr], ["MR"]))
    assert lo.tolist() == [3, 20, 30] and size.tolist() == [2, 2, 3]
    lo, size = fp.bounding_box(np.zeros(shape, bool))
    assert lo.tolist() == [0, 0, 0] and size.tolist() == list(shape)


def test_crop_box_recorded_and_restored(tmp_path):
    ct, label = make_ct()
    image, lab, props = preprocess_case([ct], label, ct_plan())
    crop = props["crop"]
    arr = sitk.GetArrayFromImage(ct)
    body = arr > -500
    zs, ys, xs = np.nonzero(body)
    assert crop["index_xyz"] == [xs.min(), ys.min(), zs.min()]
    assert crop["size_xyz"] == [xs.max() - xs.min() + 1, ys.max() - ys.min() + 1, zs.max() - zs.min() + 1]
    assert image.shape[1:] == tuple(crop["size_xyz"][::-1])  # target = original spacing: no resampling
    assert crop["label_voxels_outside"] == 0


def test_target_grid_keeps_field_of_view_and_linear_resampling_is_exact_on_ramps():
    source = Grid((20, 16, 10), (1.0, 1.25, 3.0), (5.0, -3.0, 7.0), IDENTITY)
    grid = target_grid(source, (0.5, 2.5, 2.0))
    assert grid.size == (40, 8, 15)
    # First voxel corners coincide: origin - spacing/2 is preserved.
    assert np.allclose(np.subtract(grid.origin, np.divide(grid.spacing, 2)),
                       np.subtract(source.origin, np.divide(source.spacing, 2)))
    z, y, x = np.meshgrid(*[np.arange(n) for n in source.shape_zyx], indexing="ij")
    phys = lambda g, z, y, x: (g.origin[0] + x * g.spacing[0]) + 2 * (g.origin[1] + y * g.spacing[1]) \
        - 0.5 * (g.origin[2] + z * g.spacing[2])  # noqa: E731
    ramp = phys(source, z, y, x).astype(np.float32)
    out = resample_image(ramp, source, grid, "linear")
    z2, y2, x2 = np.meshgrid(*[np.arange(n) for n in grid.shape_zyx], indexing="ij")
    expect = phys(grid, z2, y2, x2)
    # Exact wherever the target voxel centre lies inside the source's voxel centres.
    inside = (x2 * 0.5 + grid.origin[0] >= 5.0) & (x2 * 0.5 + grid.origin[0] <= 5.0 + 19)
    inside &= (y2 * 2.5 + grid.origin[1] <= -3.0 + 15 * 1.25) & (z2 * 2.0 + grid.origin[2] >= 7.0)
    inside &= z2 * 2.0 + grid.origin[2] <= 7.0 + 27
    assert inside.sum() > 0.5 * inside.size
    assert np.allclose(out[inside], expect[inside], atol=1e-3)
    # Cubic B-spline reproduces a ramp too, away from its mirrored borders (3 source voxels).
    bspline = resample_image(ramp, source, grid, "bspline")
    px, py, pz = (x2 * 0.5 + grid.origin[0] - 5.0, y2 * 2.5 + grid.origin[1] + 3.0, z2 * 2.0 + grid.origin[2] - 7.0)
    core = (px >= 3) & (px <= 16) & (py >= 3 * 1.25) & (py <= 12 * 1.25) & (pz >= 9) & (pz <= 18)
    assert core.sum() > 50
    assert np.allclose(bspline[core], expect[core], atol=0.05)


@pytest.mark.parametrize("mode", ["nearest", "label_aware"])
def test_label_resampling_preserves_volumes(mode):
    source = Grid((40, 40, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    label = np.zeros(source.shape_zyx, np.uint8)
    label[_ball(label.shape, (10, 20, 15), (5, 8, 8))] = 1
    label[_ball(label.shape, (10, 20, 28), (4, 6, 6))] = 3
    grid = target_grid(source, (0.7, 0.7, 1.3))
    out = resample_label(label, source, grid, mode)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1, 3}
    for v in (1, 3):
        vol_in = (label == v).sum() * 2.0
        vol_out = (out == v).sum() * 0.7 * 0.7 * 1.3
        assert vol_out == pytest.approx(vol_in, rel=0.08)
    back = resample_label(out, grid, source, mode)
    for v in (1, 3):
        assert dice(back == v, label == v) > 0.95


def test_ct_normalisation_uses_dataset_clip_and_zscore():
    ct, label = make_ct()
    plan = ct_plan()
    image, _, props = preprocess_case([ct], label, plan)
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    c = props["crop"]
    lo, sz = c["index_xyz"][::-1], c["size_xyz"][::-1]
    cropped = arr[tuple(slice(a, a + s) for a, s in zip(lo, sz))]
    expect = (np.clip(cropped, -100.0, 200.0) - 50.0) / 25.0
    assert image.dtype == np.float32 and image.shape == (1,) + cropped.shape
    assert np.allclose(image[0], expect, atol=1e-5)
    assert image.min() == pytest.approx(-6.0) and props["normalization"] == [{"scheme": "ct"}]


def test_mr_normalisation_is_per_case_zscore_inside_body():
    shape = (8, 20, 24)
    rng = np.random.default_rng(1)
    mr = np.zeros(shape, np.float32)
    body = np.zeros(shape, bool)
    body[1:7, 3:17, 4:20] = True
    mr[body] = rng.normal(600.0, 80.0, body.sum())
    im = sitk.GetImageFromArray(mr)
    plan = ct_plan(spacing=(1.0, 1.0, 1.0), modalities={"0": "MR"},
                   normalization={"0": {"scheme": "zscore_per_case", "mask": "body", "outside_mask": 0.0}})
    image, lab, props = preprocess_case([im], None, plan)
    assert lab is None and image.shape == (1, 6, 14, 16)  # cropped to nonzero
    assert image[0].mean() == pytest.approx(0.0, abs=1e-4) and image[0].std() == pytest.approx(1.0, abs=1e-3)
    used = props["normalization"][0]
    assert used["mean"] == pytest.approx(mr[body].mean(), rel=1e-5)
    # A zero voxel inside the crop (outside the body) stays 0 after normalisation.
    mr2 = mr.copy()
    mr2[3, 8, 10] = 0.0
    image2, _, _ = preprocess_case([sitk.GetImageFromArray(mr2)], None, plan)
    assert image2[0, 2, 5, 6] == 0.0


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------

def test_splits_deterministic_disjoint_and_complete():
    cases = [f"c{i:02d}" for i in range(23)]
    a = make_splits(cases, 5, seed=3)
    assert a == make_splits(list(reversed(cases)), 5, seed=3)  # order-independent
    assert a != make_splits(cases, 5, seed=4)
    assert len(a["test"]) == 5  # round(0.2 * 23)
    rest = set(cases) - set(a["test"])
    vals = [set(f["val"]) for f in a["folds"]]
    assert len(vals) == 5 and set().union(*vals) == rest and sum(map(len, vals)) == len(rest)
    for f in a["folds"]:
        assert set(f["train"]) | set(f["val"]) == rest and not set(f["train"]) & set(f["val"])
        assert not (set(f["train"]) | set(f["val"])) & set(a["test"])


def test_splits_fixed_test_and_small_datasets():
    cases = [f"c{i}" for i in range(10)]
    s = make_splits(cases, 3, fixed_test=["c7", "c2"])
    assert s["test"] == ["c2", "c7"] and s["test_source"] == "dataset.json fixed_test_cases"
    assert make_splits(["a", "b", "c", "d"], 2, test_fraction=0.1)["test"].__len__() == 1
    assert make_splits(["a", "b"], 2)["test"] == []
    with pytest.raises(UserError, match="--folds"):
        make_splits(["a", "b", "c", "d"], 5)
    with pytest.raises(UserError, match="fixed_test_cases"):
        make_splits(cases, 3, fixed_test=["nope"])


def test_splits_json_uses_fixed_test_cases(tmp_path):
    raw = write_raw(tmp_path / "raw", n=4, fixed_test=["case_001"])
    preprocess_dataset(raw, tmp_path / "out", workers=1, folds=3, progress=False)
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert splits["test"] == ["case_001"] and len(splits["folds"]) == 3


# ------------------------------------------------------------------------------------------------
# outputs, determinism, atomicity, errors
# ------------------------------------------------------------------------------------------------

def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_outputs_loadable_and_byte_identical_on_rerun(tmp_path):
    raw = write_raw(tmp_path / "raw", n=3)
    preprocess_dataset(raw, tmp_path / "a", target_spacing=(2.0, 2.0, 2.0), workers=1, folds=2, progress=False)
    preprocess_dataset(raw, tmp_path / "b", target_spacing=(2.0, 2.0, 2.0), workers=2, folds=2, progress=False)
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert sorted(a) == [".masksam-output.json", "cases/case_000.json", "cases/case_000.npz", "cases/case_001.json",
                         "cases/case_001.npz", "cases/case_002.json", "cases/case_002.npz",
                         "plan.json", "splits.json"]
    assert a == b
    image, label, props = load_case(tmp_path / "a", "case_001")
    assert image.dtype == np.float32 and image.ndim == 4 and label.dtype == np.uint8
    assert image.shape[1:] == label.shape == tuple(props["resampled"]["shape_zyx"])
    assert props["resampled"]["spacing_xyz"] == [2.0, 2.0, 2.0]
    with pytest.raises(UserError, match="nope"):
        load_case(tmp_path / "a", "nope")


def test_failing_case_names_file_and_leaves_previous_output_intact(tmp_path):
    raw = write_raw(tmp_path / "raw", n=3)
    out = tmp_path / "out"
    preprocess_dataset(raw, out, workers=1, folds=2, progress=False)
    before = _snapshot(out)
    bad = raw / "imagesTr" / "case_002_0000.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(UserError) as err:
        preprocess_dataset(raw, out, workers=1, folds=2, progress=False)
    assert "case_002" in str(err.value) and str(bad) in str(err.value)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_in_worker_process_is_a_user_error(tmp_path):
    raw = write_raw(tmp_path / "raw", n=3)
    lab = sitk.ReadImage(str(raw / "labelsTr" / "case_001.nii.gz"))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 9  # not declared in dataset.json
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(raw / "labelsTr" / "case_001.nii.gz"))
    with pytest.raises(UserError, match=r"case 'case_001'.*labelsTr/case_001.nii.gz.*\[9\]"):
        preprocess_dataset(raw, tmp_path / "out", workers=2, folds=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_geometry_mismatch_and_bad_dataset_json(tmp_path):
    ct, label = make_ct()
    shifted = sitk.Image(label)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(UserError, match="label geometry"):
        preprocess_case([ct], shifted, ct_plan())
    raw = write_raw(tmp_path / "raw", n=3)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"organ": 1}}))
    with pytest.raises(UserError, match="background"):
        preprocess_dataset(raw, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="not found"):
        preprocess_dataset(tmp_path / "missing", tmp_path / "out", progress=False)


def test_cli_runs_and_reports_errors(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw", n=3)
    rc = main(["preprocess", "--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "1",
               "--folds", "2", "--target-spacing", "3", "3", "3", "--label-interp", "label_aware"])
    assert rc == 0
    plan = load_plan(tmp_path / "out")
    assert plan["target_spacing_xyz"] == [3.0, 3.0, 3.0] and plan["label_interp"] == "label_aware"
    rc = main(["preprocess", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "nope" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {raw}\npreprocess:\n  out: {tmp_path / 'o3'}\n  folds: 2\n"
                      "  target_spacing: [2.0, 2.0, 2.0]\n  workers: 1\n")
    assert main(["preprocess", "--params", str(params), "--spacing-strategy", "median"]) == 0
    assert load_plan(tmp_path / "o3")["target_spacing_xyz"] == [1.5, 1.5, 3.0]


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    text = capsys.readouterr().out
    for opt in ("--raw", "--out", "--target-spacing", "--spacing-strategy", "--workers", "--folds", "--seed",
                "--test-fraction", "--image-interp", "--label-interp", "--params"):
        assert opt in text


# ------------------------------------------------------------------------------------------------
# restore_to_original on the real CT (TotalSegmentator example, 41 labels, 3 mm, RAS header)
# ------------------------------------------------------------------------------------------------

MIN_VOXELS = 200  # classes with at least 200 voxels (5.4 mL at 3 mm) must survive at Dice >= 0.98


@pytest.fixture(scope="module")
def real_case():
    real_ct_dir()  # skips with a reason when shared/ is absent
    ct = sitk.ReadImage(str(REAL / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(REAL / "example_seg.nii.gz"))
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(seg)) if v]
    labels = {"background": 0, **{f"class_{v}": v for v in values}}
    return ct, seg, labels


@pytest.mark.parametrize("mode", ["nearest", "label_aware"])
def test_restore_to_original_round_trip_on_real_ct(real_case, mode):
    ct, seg, labels = real_case
    plan = ct_plan(spacing=(1.5, 1.5, 2.0), labels=labels, label_interp=mode)
    image, label, props = preprocess_case([ct], seg, plan)
    assert props["original"]["orientation"] == "RAS" and label.shape == image.shape[1:]
    assert props["resampled"]["spacing_xyz"] == [1.5, 1.5, 2.0]
    restored = restore_to_original(label, props)
    assert restored.GetSize() == seg.GetSize() and restored.GetSpacing() == seg.GetSpacing()
    assert restored.GetOrigin() == seg.GetOrigin() and restored.GetDirection() == seg.GetDirection()
    a, b = sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(restored)
    checked = 0
    for v in labels.values():
        if v and (a == v).sum() >= MIN_VOXELS:
            assert dice(a == v, b == v) >= 0.98, f"class {v}"
            checked += 1
    assert checked >= 20
    # A float map goes back too: the normalised CT, linearly up- then down-sampled, still matches
    # the original CT at r = 0.97 (a one-voxel shift on any axis drops r to <= 0.87).
    back = sitk.GetArrayFromImage(restore_to_original(image[0], props, is_label=False))
    orig = sitk.GetArrayFromImage(ct).astype(np.float32)
    body = orig > -500
    assert np.corrcoef(back[body], np.clip(orig[body], -100, 200))[0, 1] > 0.95


def test_restore_from_coarser_grid_stays_aligned(real_case):
    """Coarser than the source, detail is lost but nothing shifts: big organs keep Dice >= 0.9."""
    ct, seg, labels = real_case
    image, label, props = preprocess_case([ct], seg, ct_plan(spacing=(4.5, 4.0, 5.0), labels=labels))
    a = sitk.GetArrayFromImage(seg)
    b = sitk.GetArrayFromImage(restore_to_original(label, props))
    big = [v for v in labels.values() if v and (a == v).sum() >= 5000]  # >= 135 mL
    assert len(big) >= 5 and all(dice(a == v, b == v) >= 0.9 for v in big)
    with pytest.raises(ValueError, match="preprocessed grid"):
        restore_to_original(label[:-1], props)


def test_restore_class_probabilities_on_real_ct(real_case):
    """[K, Z, Y, X] maps go back as labels (per-class linear, then argmax), geometry exact."""
    ct, seg, labels = real_case
    image, label, props = preprocess_case([ct], seg, ct_plan(spacing=(1.5, 1.5, 2.0), labels=labels))
    k = max(labels.values()) + 1
    probs = np.zeros((k, *label.shape), np.float32)
    np.put_along_axis(probs, label[None].astype(np.int64), 1.0, axis=0)
    restored = restore_to_original(probs, props)
    assert restored.GetSize() == seg.GetSize() and restored.GetOrigin() == seg.GetOrigin()
    assert restored.GetDirection() == seg.GetDirection() and restored.GetSpacing() == seg.GetSpacing()
    a, b = sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(restored)
    big = [v for v in labels.values() if v and (a == v).sum() >= MIN_VOXELS]
    assert len(big) >= 20 and all(dice(a == v, b == v) >= 0.98 for v in big)
    with pytest.raises(ValueError, match="preprocessed grid"):
        restore_to_original(probs[:, :-1], props)


def test_probability_resampling_of_one_hot_equals_label_aware():
    """One-hot probabilities go back exactly as the label-aware label resampling does."""
    source = Grid((40, 40, 20), (1.5, 1.5, 3.0), (0.0, 0.0, 0.0), IDENTITY)
    label = np.zeros(source.shape_zyx, np.uint8)
    label[_ball(label.shape, (10, 20, 15), (5, 8, 8))] = 1
    label[_ball(label.shape, (10, 20, 28), (4, 6, 6))] = 3
    probs = np.stack([(label == k).astype(np.float32) for k in range(4)])
    grid = target_grid(source, (0.7, 0.7, 1.3))
    out = resample_probabilities(probs, source, grid)
    ref = resample_label(label, source, grid, "label_aware")
    assert out.dtype == np.uint8 and out.shape == grid.shape_zyx
    assert (out != ref).mean() < 1e-4  # float rounding of 1 - sum vs the background channel
    same = resample_probabilities(probs, source, source)
    assert np.array_equal(same, label)
    with pytest.raises(ValueError, match="not \\[K, Z, Y, X\\]"):
        resample_probabilities(probs[:, :-1], source, grid)


def test_soft_probabilities_restore_boundaries_better_than_labels():
    """A coarse soft prediction resampled back beats its own argmax label resampled back."""
    fine = Grid((90, 90, 40), (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    truth = _ball(fine.shape_zyx, (20, 45, 45), (9.5, 21.3, 27.7))
    coarse = target_grid(fine, (2.0, 2.0, 4.0))
    # the ideal coarse prediction: the fraction of each coarse voxel the object covers
    fg = resample_image(truth.astype(np.float32), fine, coarse, "linear")
    probs = np.stack([1.0 - fg, fg])
    soft = resample_probabilities(probs, coarse, fine) == 1
    hard = resample_label((fg > 0.5).astype(np.uint8), coarse, fine, "nearest") == 1
    assert dice(soft, truth) > dice(hard, truth) + 0.01
    assert dice(soft, truth) > 0.95


def test_probability_resampling_matches_resampling_every_class_everywhere():
    """Boxes are a shortcut only: the result equals resampling each class over the whole grid
    and taking the argmax, except where interpolation lets a class win away from its box."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    source = Grid((30, 28, 12), (1.5, 1.5, 3.0), (0.0, 0.0, 0.0), IDENTITY)
    logits = ndimage.gaussian_filter(rng.normal(size=(5, 12, 28, 30)), sigma=(0, 1.5, 3, 3))
    logits[0] += 0.5 * logits.std()  # background wins about half the voxels
    probs = np.exp(8 * logits) / np.exp(8 * logits).sum(0, keepdims=True)
    grid = target_grid(source, (0.8, 0.9, 1.7))
    full = np.stack([resample_image(p.astype(np.float32), source, grid) for p in probs]).argmax(0)
    out = resample_probabilities(probs, source, grid)
    assert (out != 0).mean() > 0.2
    assert (out != full).mean() < 0.002
