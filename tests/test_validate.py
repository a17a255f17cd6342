"""Raw dataset validation: every kind of bad file is found, named and collected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from masksam.cli import main
from masksam.components.data.validate import validate_dataset

from _data_helpers import case_arrays, image, make_dataset

from _shared import REAL_CT_DIR as REAL_CT


def _messages(report) -> dict[str, str]:
    return {p.path: p.message for p in report.errors}


def test_valid_dataset_passes_with_table_and_frequencies(tmp_path):
    root = make_dataset(tmp_path / "ds", n=3)
    r = validate_dataset(root, progress=False)
    assert r.ok, r.format()
    assert [c.case for c in r.cases] == ["case_000", "case_001", "case_002"]
    assert r.cases[0].size_xyz == (8, 8, 4) and r.cases[0].classes == [0, 1, 2]
    assert r.class_case_fraction == {"background": 1.0, "liver": 1.0, "spleen": 1.0}
    _, lab = case_arrays(0)
    assert r.class_voxel_share["liver"] == pytest.approx((lab == 1).mean())
    text = r.format()
    assert "case_001" in text and "8x8x4" in text and "spleen" in text and text.endswith("OK")


def test_bad_files_are_all_reported(tmp_path):
    root = make_dataset(tmp_path / "ds", n=8)
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    # 0: truncated gzip; 1: 2D image; 2: 4D image; 3: undeclared label value;
    # 4: geometry mismatch; 5: empty label (warning); 6: missing label; 7: NaN in a float image
    data = (img_dir / "case_000_0000.nii.gz").read_bytes()
    (img_dir / "case_000_0000.nii.gz").write_bytes(data[: len(data) // 2])
    sitk.WriteImage(image(np.zeros((8, 8), np.int16)), str(img_dir / "case_001_0000.nii.gz"))
    four = sitk.JoinSeries([image(np.zeros((4, 8, 8), np.int16))] * 2)
    sitk.WriteImage(four, str(img_dir / "case_002_0000.nii.gz"))
    _, lab = case_arrays(3)
    lab[0, 0, 0] = 9
    sitk.WriteImage(image(lab), str(lab_dir / "case_003.nii.gz"))
    img, _ = case_arrays(4)
    sitk.WriteImage(image(img, spacing=(0.8, 0.9, 2.5)), str(img_dir / "case_004_0000.nii.gz"))
    sitk.WriteImage(image(np.zeros((4, 8, 8), np.uint8)), str(lab_dir / "case_005.nii.gz"))
    (lab_dir / "case_006.nii.gz").unlink()
    img = case_arrays(7)[0].astype(np.float32)
    img[1, 1, 1] = np.nan
    sitk.WriteImage(image(img), str(img_dir / "case_007_0000.nii.gz"))

    r = validate_dataset(root, progress=False)
    assert not r.ok
    m = _messages(r)
    assert "truncated" in m["imagesTr/case_000_0000.nii.gz"]
    assert "expected a 3D image, got 2D" in m["imagesTr/case_001_0000.nii.gz"]
    assert "expected a 3D image, got 4D" in m["imagesTr/case_002_0000.nii.gz"]
    assert "[9]" in m["labelsTr/case_003.nii.gz"] and "not declared" in m["labelsTr/case_003.nii.gz"]
    assert "spacing" in m["imagesTr/case_004_0000.nii.gz"]
    assert "label file is missing" in m["labelsTr/case_006.nii.gz"]
    assert "NaN" in m["imagesTr/case_007_0000.nii.gz"]
    assert "labelsTr/case_005.nii.gz" not in m
    assert any(w.path == "labelsTr/case_005.nii.gz" and "empty" in w.message for w in r.warnings)
    assert len(r.errors) == 7

    strict = validate_dataset(root, strict=True, progress=False)
    assert "empty" in _messages(strict)["labelsTr/case_005.nii.gz"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: {**m, "labels": {"liver": 0, "background": 1}}, "'background' must be label 0"),
    (lambda m: {**m, "labels": {"background": 0, "a": 1, "b": 1}}, "share the value 1"),
    (lambda m: {k: v for k, v in m.items() if k != "file_ending"}, "'file_ending' is missing"),
    (lambda m: {**m, "numTraining": "3"}, "'numTraining' must be a int"),
    (lambda m: {**m, "numTraining": 5}, "numTraining is 5"),
    (lambda m: {**m, "channel_names": {"1": "CT"}}, "'channel_names' keys"),
])
def test_malformed_dataset_json(tmp_path, mutate, expected):
    root = make_dataset(tmp_path / "ds", n=3)
    meta = json.loads((root / "dataset.json").read_text())
    new = mutate(meta)
    (root / "dataset.json").write_text(new if isinstance(new, str) else json.dumps(new))
    r = validate_dataset(root, progress=False)
    assert not r.ok
    assert any(p.path == "dataset.json" and expected in p.message for p in r.errors), r.format()


def test_cli_exit_code_names_files(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=2)
    assert main(["data", "validate", str(root), "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    assert main(["data", "validate", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "labelsTr/case_001.nii.gz: label file is missing" in err and "FAILED" in err


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="real CT example not present")
def test_real_ct_with_41_labels(tmp_path):
    root = tmp_path / "real"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copyfile(REAL_CT / "example_ct_sm.nii.gz", root / "imagesTr" / "s0011_0000.nii.gz")
    shutil.copyfile(REAL_CT / "example_seg.nii.gz", root / "labelsTr" / "s0011.nii.gz")
    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_CT / "example_seg.nii.gz"))))
    labels = {("background" if v == 0 else f"class_{v}"): int(v) for v in values}
    assert len(labels) == 42  # background + 41 organs
    (root / "dataset.json").write_text(json.dumps(
        {"name": "real", "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}))
    r = validate_dataset(root, progress=False)
    assert r.ok, r.format()
    assert r.cases[0].size_xyz == (122, 101, 30) and len(r.cases[0].classes) == 42
    assert sum(r.class_voxel_share.values()) == pytest.approx(1.0)
    # one undeclared organ is caught
    del labels["class_5"]
    (root / "dataset.json").write_text(json.dumps(
        {"name": "real", "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}))
    r = validate_dataset(root, progress=False)
    assert "[5]" in _messages(r)["labelsTr/s0011.nii.gz"]
