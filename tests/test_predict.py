"""masksam predict: geometry kept, summaries, per-file errors, training dir vs ONNX, ensembles,
tampering."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from _delivery_fixtures import delivery_root, export_dir, phantom_ct, preprocessed, train_dir  # noqa: F401
from masksam.cli import main
from masksam.components._loading import HashMismatch, check_session_providers, select_providers
from masksam.components.predictor import Predictor
from masksam.errors import UserError


def _inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img, _ = phantom_ct(7, size_xyz=(30, 22, 9), spacing=(1.3, 1.9, 3.5))
    sitk.WriteImage(img, str(src / "scan_a.nrrd"))
    sitk.WriteImage(img, str(src / "scan_b_0000.nii.gz"))
    (src / "broken.mha").write_text("not an image at all")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(src / "flat.nii.gz"))  # 2D
    (src / "README.txt").write_text("ignored")
    return src, img


def test_predict_cli_folder_onnx(tmp_path, export_dir, capsys):  # noqa: F811
    src, img = _inputs(tmp_path)
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(src), "-o", str(out), "--model", str(export_dir / "model.onnx"),
               "--device", "cpu", "--no-progress"])
    assert rc == 1  # two bad files
    line = capsys.readouterr().out
    assert "2 of 4 scans segmented" in line and "broken" in line and "flat" in line
    for name, suffix, given in (("scan_a", ".nrrd", "scan_a.nrrd"), ("scan_b", ".nii.gz", "scan_b_0000.nii.gz")):
        img = sitk.ReadImage(str(src / given))  # as stored (NIfTI keeps float32 spacing)
        seg = sitk.ReadImage(str(out / f"{name}{suffix}"))
        assert seg.GetSize() == img.GetSize()
        # ITK's NRRD writer/reader moves a spacing by one ulp per round trip (space directions)
        np.testing.assert_allclose(seg.GetSpacing(), img.GetSpacing(), rtol=1e-12)
        np.testing.assert_allclose(seg.GetOrigin(), img.GetOrigin(), rtol=1e-12)
        np.testing.assert_allclose(seg.GetDirection(), img.GetDirection(), atol=1e-12)
        summary = json.loads((out / f"{name}.json").read_text())
        labels = sitk.GetArrayFromImage(seg)
        voxel_ml = np.prod(img.GetSpacing()) / 1000
        for struct in summary["structures"].values():
            n = int((labels == struct["label"]).sum())
            assert struct["voxels"] == n
            assert struct["volume_ml"] == pytest.approx(n * voxel_ml, rel=1e-3)
            if struct["mean_confidence"] is not None:
                assert 0 < struct["mean_confidence"] <= 1
    assert not (out / "broken.mha").exists()


def test_predictions_open_by_name_in_slicer_and_itksnap(tmp_path, export_dir):  # noqa: F811
    """Beside each label map a .seg.nrrd that 3D Slicer's reader names and colours, the folder's
    colour tables, and a summary naming the exact model file; --no-viewer-files writes none."""
    import slicerio

    src, _ = _inputs(tmp_path)
    out = tmp_path / "out"
    main(["predict", "-i", str(src), "-o", str(out), "--model", str(export_dir), "--device", "cpu", "--no-progress"])
    plan_labels = json.loads((export_dir / "model.onnx.json").read_text())["plan"]["labels"]
    seg = slicerio.read_segmentation(str(out / "scan_a.seg.nrrd"))
    names = {s["name"]: s["labelValue"] for s in seg["segments"]}
    assert names == {k: v for k, v in plan_labels.items() if v != 0}
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan_a.nrrd")))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan_a.seg.nrrd"))), labels)
    assert "spleen" in (out / "labels.ctbl").read_text() and '"spleen"' in (out / "labels.itksnap.txt").read_text()
    summary = json.loads((out / "scan_a.json").read_text())
    sidecar = json.loads((export_dir / "model.onnx.json").read_text())
    assert summary["model_sha256"]["model.onnx"] == sidecar["files"]["model.onnx"]
    assert summary["slicer_segmentation"] == str(out / "scan_a.seg.nrrd")
    bare = tmp_path / "bare"
    main(["predict", "-i", str(src / "scan_a.nrrd"), "-o", str(bare), "--model", str(export_dir), "--device", "cpu",
          "--no-progress", "--no-viewer-files"])
    assert sorted(p.name for p in bare.iterdir()) == ["scan_a.json", "scan_a.nrrd"]


def test_training_dir_and_onnx_agree(tmp_path, train_dir, export_dir):  # noqa: F811
    from masksam.components.predict import predict

    img, _ = phantom_ct(3)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    a = predict(tmp_path / "ct.nii.gz", tmp_path / "torch", train_dir, device="cpu", progress=False)
    b = predict(tmp_path / "ct.nii.gz", tmp_path / "onnx", export_dir / "model.onnx", device="cpu",
                progress=False, mirror=True)
    c = predict(tmp_path / "ct.nii.gz", tmp_path / "onnx_plain", export_dir, device="cpu", progress=False)
    assert a[0].ok and b[0].ok and c[0].ok
    la = sitk.GetArrayFromImage(sitk.ReadImage(str(a[0].output)))
    lc = sitk.GetArrayFromImage(sitk.ReadImage(str(c[0].output)))
    assert (la == lc).mean() > 0.999
    assert b[0].summary["mirror"] is True


def test_predict_cli_ensemble_of_training_dir_and_onnx(tmp_path, train_dir, export_dir, capsys):  # noqa: F811
    """``--model A B``: an ensemble (one training directory, one ONNX file of the same weights)
    gives the single model's labels and records its members."""
    img, _ = phantom_ct(4)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    rc = main(["predict", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "ens"), "--model",
               str(train_dir), str(export_dir / "model.onnx"), "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr()
    rc = main(["predict", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "one"), "--model",
               str(train_dir), "--device", "cpu", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "ens" / "ct.json").read_text())
    assert summary["ensemble"] == [str(train_dir), str(export_dir / "model.onnx")]
    assert summary["backend"] == "torch+onnxruntime"
    ens = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ens" / "ct.nii.gz")))
    one = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / "ct.nii.gz")))
    assert (ens == one).mean() > 0.999


def test_tampered_onnx_refused(tmp_path, export_dir):  # noqa: F811
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    with open(copy / "model.onnx", "r+b") as fh:
        fh.seek(-20, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(HashMismatch, match="does not match"):
        Predictor.load(copy / "model.onnx", device="cpu")
    (copy / "model.onnx.json").unlink()
    with pytest.raises(UserError, match="no sidecar"):
        Predictor.load(copy / "model.onnx", device="cpu")


def test_tampered_weights_refused(tmp_path, train_dir):  # noqa: F811
    copy = tmp_path / "train"
    shutil.copytree(train_dir, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match="train_summary.json"):
        Predictor.load(copy, device="cpu")


def test_provider_selection():
    assert select_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert select_providers("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                         "CPUExecutionProvider"])[0] == "TensorrtExecutionProvider"
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        select_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="session got CPUExecutionProvider"):
        check_session_providers(["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"], "m")


def test_bad_model_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Predictor.load(tmp_path / "nope")


@pytest.mark.gpu
def test_cuda_provider_really_used(export_dir):  # noqa: F811
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDAExecutionProvider is not installed here (CPU build)")
    loaded = Predictor.load(export_dir / "model.onnx", device="cuda")
    assert loaded.providers[0] == "CUDAExecutionProvider"
