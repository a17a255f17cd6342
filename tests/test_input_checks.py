"""One input check for every reader: truncated, non-finite and badly spaced scans are refused by
name in predict (per file, the others still segmented), evaluate and preprocess; duplicate case
names are refused; predict never writes over an input; a dataset.json that is not a JSON object
is a clear error."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from _data_helpers import make_dataset
from _delivery_fixtures import delivery_root, phantom_ct, preprocessed, train_dir  # noqa: F401
from masksam.cli import main
from masksam.components._scan import check_scan_file, scan_nifti
from masksam.errors import UserError


def _truncate(path: Path, fraction: float = 0.6) -> None:
    """Keep the first ``fraction`` of the file's bytes (a copy cut short)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _set_pixdim(path: Path, axis: int, value: float) -> None:
    """Write ``value`` into pixdim[axis + 1] of a little-endian NIfTI-1 file (gzipped or not)."""
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    assert struct.unpack_from("<i", raw, 0)[0] == 348
    struct.pack_into("<f", raw, 76 + 4 * (axis + 1), value)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))


def _nan_scan(path: Path, everywhere: bool = True) -> None:
    img, _ = phantom_ct(5)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if everywhere:
        arr[:] = np.nan
    else:
        arr[1, 2, 3] = np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


# ----------------------------------------------------------------------------- the shared check


@pytest.mark.parametrize("name, damage, expected", [
    ("a.nii.gz", "truncate", "truncated"),
    ("a.nii", "truncate", "truncated"),
    ("a.nii.gz", "nan", "NaN or inf"),
    ("a.nii", "nan", "NaN or inf"),
    ("a.mha", "nan", "NaN or inf"),
    ("a.nrrd", "inf", "1 of 6720 voxel(s) are NaN or inf"),
    ("a.nii.gz", "pixdim0", "axis y is 0 in the NIfTI header"),
    ("a.nii", "pixdim0", "axis y is 0 in the NIfTI header"),
    ("a.mha", "spacing1000", "voxel spacing (1.5, 1.7, 1000.0) mm is not usable"),
])
def test_check_scan_file_names_the_problem(tmp_path, name, damage, expected):
    path = tmp_path / name
    img, _ = phantom_ct(2)
    sitk.WriteImage(img, str(path))
    assert check_scan_file(path).GetSize() == img.GetSize()  # the intact file passes
    if damage == "truncate":
        _truncate(path)
    elif damage in ("nan", "inf"):
        _nan_scan(path, everywhere=damage == "nan")
    elif damage == "pixdim0":
        _set_pixdim(path, 1, 0.0)
        assert sitk.ReadImage(str(path)).GetSpacing()[1] == 1.0  # what SimpleITK alone would use
    else:
        img.SetSpacing((1.5, 1.7, 1000.0))
        sitk.WriteImage(img, str(path))
    with pytest.raises(UserError, match=f"{path}: .*{expected.replace('(', '.').replace(')', '.')}"):
        check_scan_file(path)


def test_nifti_stream_counts_nan_across_chunks(tmp_path, monkeypatch):
    """NaN counted exactly when float values straddle the stream's chunk boundaries."""
    import masksam.components._scan as scan

    arr = np.zeros((5, 7, 11), np.float64)
    arr.flat[::13] = np.nan
    path = tmp_path / "f.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    monkeypatch.setattr(scan, "CHUNK_BYTES", 37)
    result = scan_nifti(path)
    assert result.nonfinite == int(np.isnan(arr).sum()) and result.corrupt is None


def test_validate_reports_zero_pixdim_by_name(tmp_path):
    from masksam.components.data.validate import validate_dataset

    root = make_dataset(tmp_path / "ds", n=2)
    _set_pixdim(root / "labelsTr" / "case_001.nii.gz", 0, 0.0)
    report = validate_dataset(root, progress=False)
    messages = {p.path: p.message for p in report.errors}
    assert "voxel spacing of axis x is 0 in the NIfTI header" in messages["labelsTr/case_001.nii.gz"]
    assert "labelsTr/case_000.nii.gz" not in messages


# ----------------------------------------------------------------------------- predict


def _predict_cli(src, out, model, capsys) -> tuple[int, str, str]:
    rc = main(["predict", "-i", str(src), "-o", str(out), "--model", str(model), "--device", "cpu",
               "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_predict_refuses_bad_scans_per_file(tmp_path, train_dir, capsys, caplog):  # noqa: F811
    src = tmp_path / "in"
    src.mkdir()
    for name in ("good.nii.gz", "truncated.nii.gz", "zero_spacing.nii.gz"):
        sitk.WriteImage(phantom_ct(1)[0], str(src / name))
    _truncate(src / "truncated.nii.gz")
    _set_pixdim(src / "zero_spacing.nii.gz", 2, 0.0)
    _nan_scan(src / "all_nan.nii.gz")
    _nan_scan(src / "one_inf.mha", everywhere=False)
    rc, out, _ = _predict_cli(src, tmp_path / "out", train_dir, capsys)
    assert rc == 1
    assert "1 of 5 scans segmented" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.json", "good.nii.gz", "good.seg.nrrd",
                                                                   "labels.ctbl", "labels.itksnap.txt"]
    log = caplog.text
    assert f"{src / 'truncated.nii.gz'}: file is truncated" in log
    assert f"{src / 'all_nan.nii.gz'}: 6720 of 6720 voxel(s) are NaN or inf" in log
    assert f"{src / 'one_inf.mha'}: 1 of 6720 voxel(s) are NaN or inf" in log
    assert f"{src / 'zero_spacing.nii.gz'}: voxel spacing of axis z is 0" in log


def test_predict_refuses_duplicate_case_names(tmp_path, train_dir):  # noqa: F811
    from masksam.components.predict import predict

    src = tmp_path / "in"
    src.mkdir()
    img = phantom_ct(4)[0]
    for name in ("scan.nii.gz", "scan.mha", "scan.nii", "scan_0000.nii.gz", "other.nrrd"):
        sitk.WriteImage(img, str(src / name))
    outcomes = {o.case: o for o in predict(src, tmp_path / "out", train_dir, device="cpu", progress=False)}
    assert sorted(outcomes) == ["other", "scan"]
    assert outcomes["other"].ok
    assert not outcomes["scan"].ok
    assert "several files (scan.mha, scan.nii, scan.nii.gz, scan_0000.nii.gz)" in outcomes["scan"].error
    assert not list((tmp_path / "out").glob("scan*"))


def test_predict_never_writes_over_its_input(tmp_path, train_dir, capsys):  # noqa: F811
    d = tmp_path / "d"
    d.mkdir()
    sitk.WriteImage(phantom_ct(6)[0], str(d / "ct.nii.gz"))
    (d / "ct.json").write_text("my notes")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for given in (d, d / "ct.nii.gz"):
        rc, _, err = _predict_cli(given, d, train_dir, capsys)
        assert rc == 2
        assert f"predict would write over its inputs: ct.nii.gz (case 'ct') is the input {d / 'ct.nii.gz'}" in err
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    # a label map named apart from its input may go into the input folder
    (d / "ct.json").unlink()
    (d / "ct.nii.gz").rename(d / "ct_0000.nii.gz")
    rc, _, _ = _predict_cli(d, d, train_dir, capsys)
    assert rc == 0 and (d / "ct.nii.gz").is_file()


def test_predict_unwritable_output_is_a_user_error(tmp_path, train_dir, capsys):  # noqa: F811
    sitk.WriteImage(phantom_ct(6)[0], str(tmp_path / "ct.nii.gz"))
    (tmp_path / "a_file").write_text("x")
    rc, _, err = _predict_cli(tmp_path / "ct.nii.gz", tmp_path / "a_file" / "out", train_dir, capsys)
    assert rc == 2
    assert f"-o {tmp_path / 'a_file' / 'out'} cannot be written" in err


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_truncated_reference(tmp_path, capsys):
    from masksam.components.evaluate import evaluate_folders

    _, seg = phantom_ct(3)
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(seg, str(tmp_path / folder / "case.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    assert evaluate_folders(tmp_path / "pred", tmp_path / "gt", [1, 2], mlflow_log=False)["foreground_mean"]["Dice"] == 1.0
    _truncate(tmp_path / "gt" / "case.nii.gz")
    with pytest.raises(UserError, match=f"{tmp_path / 'gt' / 'case.nii.gz'}: file is truncated"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", [1, 2], mlflow_log=False)
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--dataset-json",
               str(tmp_path / "dataset.json"), "--out", str(tmp_path / "s.json"), "--workers", "2"])
    assert rc == 2 and "case.nii.gz: file is truncated" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


# ----------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("damage, file, expected", [
    ("truncate", "imagesTr/case_001_0000.nii.gz", "file is truncated"),
    ("nan", "imagesTr/case_001_0000.nii.gz", "voxel(s) are NaN or inf"),
    ("pixdim0", "imagesTr/case_001_0000.nii.gz", "voxel spacing of axis x is 0"),
])
def test_preprocess_refuses_bad_files(tmp_path, damage, file, expected):
    from masksam.components.preprocess import preprocess_dataset

    raw = make_dataset(tmp_path / "raw", n=3)
    path = raw / file
    if damage == "truncate":
        _truncate(path)
    elif damage == "nan":
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        arr[0] = np.nan
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(sitk.ReadImage(str(path)))
        sitk.WriteImage(img, str(path))
    else:  # image and label agree, so only the header check can see it
        _set_pixdim(path, 0, 0.0)
        _set_pixdim(raw / "labelsTr" / "case_001.nii.gz", 0, 0.0)
    with pytest.raises(UserError) as info:
        preprocess_dataset(raw, tmp_path / "out", workers=1, folds=2, progress=False)
    assert f"{path}: " in str(info.value) and expected in str(info.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- dataset.json


def test_dataset_json_array_is_a_clear_error(tmp_path, capsys):
    from masksam.components.evaluate import evaluate_model, labels_from_dataset_json

    raw = make_dataset(tmp_path / "raw", n=2)
    (raw / "dataset.json").write_text(json.dumps([{"labels": {"background": 0}}]))
    expected = f"dataset.json {raw / 'dataset.json'} must hold a JSON object"
    rc = main(["preprocess", "--raw", str(raw), "--out", str(tmp_path / "pre"), "--no-progress"])
    assert rc == 2 and expected in capsys.readouterr().err
    with pytest.raises(UserError, match="must hold a JSON object"):
        labels_from_dataset_json(raw / "dataset.json")
    pre = tmp_path / "pre_ok"
    pre.mkdir()
    (pre / "splits.json").write_text(json.dumps({"test": ["case_000"], "folds": []}))
    with pytest.raises(UserError, match="must hold a JSON object"):
        evaluate_model("unused-model", raw, pre, tmp_path / "eval", mlflow_log=False, progress=False)
