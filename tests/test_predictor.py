"""The one predictor: every source gives the same labels, ensembles average probabilities,
mismatched ensembles are refused, the ONNX path imports no torch, evaluate runs in memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from _delivery_fixtures import (delivery_root, export_dir, make_training_dir, phantom_ct,  # noqa: F401
                                preprocessed, train_dir)
from masksam.components._io import sha256_file
from masksam.components.predictor import Member, Predictor
from masksam.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _case(preprocessed_dir: Path) -> np.ndarray:  # noqa: F811
    path = sorted((preprocessed_dir / "cases").glob("*.npz"))[0]
    with np.load(path) as npz:
        return npz["image"].astype(np.float32)


@pytest.fixture(scope="module")
def second_train_dir(tmp_path_factory, preprocessed):  # noqa: F811
    """Another random tiny model (seed 1) on the same plan: an ensemble member."""
    return make_training_dir(tmp_path_factory.mktemp("second"), preprocessed, seed=1)


@pytest.fixture()
def scan(tmp_path) -> Path:
    img, _ = phantom_ct(6)
    sitk.WriteImage(img, str(tmp_path / "scan.nii.gz"))
    return tmp_path / "scan.nii.gz"


def test_every_source_gives_the_same_labels(train_dir, export_dir, scan):  # noqa: F811
    from masksam.components._loading import build_model_from_dir

    by_dir = Predictor.from_training_dir(train_dir, device="cpu")
    by_onnx = Predictor.from_onnx(export_dir / "model.onnx", device="cpu")
    by_folder = Predictor.load(export_dir, device="cpu")
    model, _, plan, _ = build_model_from_dir(train_dir, "cpu")
    by_module = Predictor.from_module(model, plan, device="cpu")
    assert (by_dir.backend, by_onnx.backend, by_module.backend) == ("torch", "onnxruntime", "torch")
    assert by_onnx.verified["model.onnx"] == sha256_file(export_dir / "model.onnx")
    assert by_dir.labels == by_onnx.labels == {"background": 0, "liver": 1, "spleen": 2}
    results = {name: p.predict_files(scan, return_probs=True)
               for name, p in (("dir", by_dir), ("onnx", by_onnx), ("folder", by_folder), ("module", by_module))}
    labels = {k: sitk.GetArrayFromImage(r.labels) for k, r in results.items()}
    original = sitk.ReadImage(str(scan))
    for r in results.values():
        assert r.labels.GetSize() == original.GetSize() and r.labels.GetSpacing() == original.GetSpacing()
        assert r.labels.GetDirection() == original.GetDirection() and r.labels.GetOrigin() == original.GetOrigin()
        assert r.probabilities.shape[0] == 3 and set(r.structures) == {"background", "liver", "spleen"}
    np.testing.assert_array_equal(labels["dir"], labels["module"])      # same weights, same code
    np.testing.assert_array_equal(labels["onnx"], labels["folder"])
    assert (labels["dir"] == labels["onnx"]).mean() > 0.999             # ONNX Runtime vs PyTorch
    np.testing.assert_allclose(results["dir"].probabilities, results["onnx"].probabilities, atol=1e-3)


def test_ensemble_equals_manual_average(train_dir, second_train_dir, preprocessed, scan):  # noqa: F811
    from masksam.components.preprocess import restore_to_original

    a = Predictor.from_training_dir(train_dir, device="cpu")
    b = Predictor.from_training_dir(second_train_dir, device="cpu")
    both = Predictor.load([train_dir, second_train_dir], device="cpu")
    assert both.sources == [str(train_dir), str(second_train_dir)] and "ensemble(" in both.source
    image = _case(preprocessed)
    for mirror in (False, True):
        pa, _ = a.predict_preprocessed(image, mirror=mirror)
        pb, _ = b.predict_preprocessed(image, mirror=mirror)
        probs, labels = both.predict_preprocessed(image, mirror=mirror)
        average = (pa + pb) / 2
        np.testing.assert_allclose(probs, average, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(labels, average.argmax(0))
        assert not np.array_equal(pa.argmax(0), pb.argmax(0))  # the members really differ
    # the whole path: averaged probabilities restored to the scan's grid, then argmax
    image, properties = both.preprocess([sitk.ReadImage(str(scan))])
    result = both.predict_case(image, properties)
    pa, _ = a.predict_preprocessed(image)
    pb, _ = b.predict_preprocessed(image)
    expect = sitk.GetArrayFromImage(restore_to_original((pa + pb) / 2, properties))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), expect)


def _retrained_with(plan_change: dict, src: Path, dst: Path) -> Path:
    """A copy of training directory ``src`` whose plan.json differs, its summary's hashes updated
    (a consistent, completed training of a differently preprocessed dataset)."""
    shutil.copytree(src, dst)
    plan = json.loads((dst / "plan.json").read_text())
    plan.update(plan_change)
    (dst / "plan.json").write_text(json.dumps(plan))
    summary = json.loads((dst / "train_summary.json").read_text())
    summary["hashes"]["plan.json"] = sha256_file(dst / "plan.json")
    (dst / "train_summary.json").write_text(json.dumps(summary))
    return dst


def test_ensemble_of_different_plans_or_labels_is_refused(tmp_path, train_dir, export_dir):  # noqa: F811
    spacing = _retrained_with({"target_spacing_xyz": [1.0, 1.0, 2.0]}, train_dir, tmp_path / "other")
    with pytest.raises(UserError, match="preprocessed differently") as exc:
        Predictor.load([export_dir / "model.onnx", spacing], device="cpu")
    assert str(export_dir / "model.onnx") in str(exc.value) and str(spacing) in str(exc.value)
    assert "target_spacing_xyz" in str(exc.value)
    plan = json.loads((train_dir / "plan.json").read_text())
    labels = _retrained_with({"labels": {**plan["labels"], "kidney": 3}}, train_dir, tmp_path / "labels")
    with pytest.raises(UserError, match="different labels"):
        Predictor.load([train_dir, labels], device="cpu")
    with pytest.raises(UserError, match="at least one"):
        Predictor.load([], device="cpu")
    single = Predictor.from_training_dir(train_dir, device="cpu").members[0]
    with pytest.raises(UserError, match="num_classes"):
        Predictor([single, Member(single.runner, single.plan, {**single.config, "num_classes": 4},
                                  "torch", "other")])


TORCH_FREE = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = ("torch", "torchvision", "segment_anything")

    class Block(importlib.abc.MetaPathFinder):  # as if torch were not installed at all
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    import SimpleITK as sitk
    from masksam.components.predictor import Predictor
    from masksam.components._pyfunc import MaskSAMPyfunc

    onnx, scan = sys.argv[1], sys.argv[2]
    labels = sitk.GetArrayFromImage(Predictor.from_onnx(onnx, device="cpu").predict_files(scan).labels)

    class Context:
        artifacts = {"onnx": onnx}

    model = MaskSAMPyfunc()
    model.load_context(Context())
    image = sitk.ReadImage(scan)
    served = model.predict(None, sitk.GetArrayFromImage(image).astype("float32"),
                           params={"spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
                                   "direction": list(image.GetDirection())})
    print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
                      "labels": sorted(set(labels.ravel().tolist())), "same": bool((served == labels).all())}))
""")


def test_onnx_path_imports_no_torch(export_dir, scan):  # noqa: F811
    """Predictor.from_onnx and the MLflow pyfunc class predict a scan in a process where torch,
    torchvision and segment-anything cannot be imported, and none of them gets loaded."""
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(export_dir / "model.onnx"), str(scan)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["same"] and len(result["labels"]) > 1


def test_evaluate_model_in_memory(tmp_path, train_dir, export_dir, preprocessed, monkeypatch):  # noqa: F811
    """Pipeline-mode evaluate with an ensemble: no temporary folder, no links, nothing of its own
    output read back; summary.json and per_case.csv name files that exist."""
    import csv
    import tempfile

    from masksam.components import _io
    from masksam.components import evaluate as evaluate_mod

    raw = preprocessed.parent / "raw"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # any temporary folder would land here

    def no_links(*args, **kwargs):
        raise AssertionError("evaluate made a symbolic link")

    monkeypatch.setattr(os, "symlink", no_links)
    read: list[Path] = []
    for module in (_io, evaluate_mod):
        original = module.read_image

        def recording(path, *args, _original=original, **kwargs):
            read.append(Path(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(module, "read_image", recording)
    out = tmp_path / "eval"
    models = [train_dir, export_dir / "model.onnx"]
    summary = evaluate_mod.evaluate_model(models, raw, preprocessed, out, mirror=True, overlap=0.25,
                                          progress=False, mlflow_log=False, device="cpu")
    assert list(scratch.iterdir()) == []
    assert read and all(p.is_relative_to(raw) for p in read), read
    saved = json.loads((out / "summary.json").read_text())
    assert saved["model"] == [str(m) for m in models] and saved["n_cases"] == summary["n_cases"] >= 1
    assert Path(saved["prediction_folder"]) == out / "predictions"
    for entry in saved["metric_per_case"]:
        assert Path(entry["prediction_file"]).is_file() and Path(entry["prediction_file"]).parent == out / "predictions"
        assert Path(entry["reference_file"]).is_file() and Path(entry["reference_file"]).parent == raw / "labelsTr"
        dice = entry["metrics"]["1"]["Dice"]
        assert dice is None or 0.0 <= dice <= 1.0
        side = json.loads((out / "predictions" / f"{entry['case']}.json").read_text())
        assert side["mirror"] is True and side["overlap"] == 0.25
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(Path(r["prediction_file"]).is_file() and Path(r["reference_file"]).is_file() for r in rows)
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    # the scores are those of the written files, scored the folder way
    gt = tmp_path / "gt"
    gt.mkdir()
    for entry in saved["metric_per_case"]:
        shutil.copy(entry["reference_file"], gt)
    again = evaluate_mod.evaluate_folders(out / "predictions", gt, {"liver": 1, "spleen": 2}, mlflow_log=False)
    assert again["foreground_mean"]["Dice"] == pytest.approx(summary["foreground_mean"]["Dice"], nan_ok=True)


def test_evaluate_records_what_it_scored_and_writes_readable_dvc_metrics(tmp_path, export_dir, preprocessed):  # noqa: F811
    """The summary names the exact ONNX file scored (sha256) and the training run it came from;
    metrics.json leads with Dice and holds no counts, for a readable `dvc metrics show`."""
    from masksam.components import evaluate as evaluate_mod

    raw = preprocessed.parent / "raw"
    out = tmp_path / "eval"
    summary = evaluate_mod.evaluate_model(export_dir, raw, preprocessed, out, progress=False, mlflow_log=False,
                                          device="cpu")
    sidecar = json.loads((export_dir / "model.onnx.json").read_text())
    assert summary["model_sha256"]["model.onnx"] == sidecar["files"]["model.onnx"]
    assert summary.get("train_run_id") == sidecar["source"].get("train_run_id")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["Dice", "HD95", "NSD"]
    assert set(metrics["Dice"]) == {"mean", "liver", "spleen"}
    assert metrics["Dice"]["mean"] == pytest.approx(summary["foreground_mean"]["Dice"], abs=1e-4, nan_ok=True)
    # the test set is identified by the content of its scans and references
    from masksam.components.data.manifest import test_set_digest

    cases = [e["case"] for e in summary["metric_per_case"]]
    files = {c: [*sorted((raw / "imagesTr").glob(f"{c}_0*")), raw / "labelsTr" / f"{c}.nii.gz"] for c in cases}
    assert summary["test_set_id"] == test_set_digest(files)
