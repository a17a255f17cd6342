"""`masksam evaluate` folder mode: real NIfTI files, the real CLI, a real MLflow SQLite store."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from masksam.cli import main
from masksam.components import evaluate as E
from masksam.components.metrics import METRICS, score_case
from masksam.errors import UserError

SPACING_XYZ = (0.7, 0.9, 3.0)
SHAPE_ZYX = (10, 22, 18)
LABELS = {"background": 0, "liver": 1, "spleen": 2}


def blob(seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(SHAPE_ZYX)
    smooth = ndimage.gaussian_filter(noise, 2.0)
    return smooth > 0.6 * smooth.std()


def label_map(seed: int, with_spleen: bool = True) -> np.ndarray:
    out = np.zeros(SHAPE_ZYX, np.uint8)
    out[blob(seed)] = 1
    if with_spleen:
        out[:, :5, :6] = 2  # touches the image border
    return out


def write(array: np.ndarray, path, spacing=SPACING_XYZ, origin=(10.0, -5.0, 2.5)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture()
def folders(tmp_path):
    """3 references; predictions for 2 of them (one without spleen in either) plus one stray."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    arrays = {}
    for i, case in enumerate(["case_000", "case_001", "case_002"]):
        gt = label_map(i, with_spleen=(i != 1))
        write(gt, gt_dir / f"{case}.nii.gz")
        pred = np.zeros_like(gt)
        pred[ndimage.binary_dilation(gt == 1)] = 1
        if i == 0:
            pred[:, :6, :5] = 2
        arrays[case] = (pred, gt)
        if i != 2:
            write(pred, pred_dir / f"{case}.nii.gz")
    write(label_map(9), pred_dir / "case_999.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    return tmp_path, arrays


def _same(a, b) -> bool:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return a is None or (isinstance(a, float) and math.isnan(a))
    return a == pytest.approx(b, abs=1e-9)


def test_cli_folder_mode_json_csv_plots(folders):
    tmp, arrays = folders
    out = tmp / "eval" / "summary.json"
    rc = main(["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt"),
               "--dataset-json", str(tmp / "dataset.json"), "--out", str(out), "--workers", "2",
               "--nsd-tolerance", "1.5"])
    assert rc == 0
    summary = json.loads(out.read_text())
    # NIfTI stores spacing as float32: score with the spacing read back, as the evaluator does
    spacing_zyx = sitk.ReadImage(str(tmp / "gt" / "case_000.nii.gz")).GetSpacing()[::-1]

    assert summary["missing_predictions"] == ["case_002"]
    assert summary["predictions_without_reference"] == ["case_999"]
    assert summary["labels"] == {"1": "liver", "2": "spleen"}
    assert summary["conventions"]["nsd_tolerance_mm"] == 1.5
    assert summary["conventions"]["hd_convention"] == "medpy"
    assert "one_empty" in summary["conventions"]["empty"]
    cases = {c["case"]: c for c in summary["metric_per_case"]}
    assert list(cases) == ["case_000", "case_001", "case_002"]
    for case, (pred, gt) in arrays.items():
        entry = cases[case]
        assert entry["reference_file"] == str(tmp / "gt" / f"{case}.nii.gz")
        assert entry["prediction_file"] == str(tmp / "pred" / f"{case}.nii.gz")
        assert entry["prediction_missing"] == (case == "case_002")
        scored_pred = np.zeros_like(gt) if case == "case_002" else pred
        want = score_case(scored_pred, gt, spacing_zyx, [1, 2], tolerance_mm=1.5)
        assert set(entry["metrics"]) == {"1", "2"}
        for label in ("1", "2"):
            assert set(entry["metrics"][label]) == set(METRICS)
            for m in METRICS:
                assert _same(entry["metrics"][label][m], want[label][m]), (case, label, m)
    # conventions in action: case_001 has no spleen anywhere (null), case_002 has no prediction
    assert cases["case_001"]["metrics"]["2"]["Dice"] is None
    assert cases["case_002"]["metrics"]["1"]["Dice"] == 0.0
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE_ZYX, spacing_zyx)))
    assert cases["case_002"]["metrics"]["2"]["HD95"] == pytest.approx(diagonal)
    for label in ("1", "2"):
        for m in ("Dice", "HD95", "NSD"):
            vals = [c["metrics"][label][m] for c in cases.values() if c["metrics"][label][m] is not None]
            assert summary["mean"][label][m] == pytest.approx(np.mean(vals))
    for m in METRICS:
        assert summary["foreground_mean"][m] == pytest.approx(
            np.mean([summary["mean"]["1"][m], summary["mean"]["2"][m]]))
    assert summary["mean"]["2"]["Dice"] == pytest.approx(np.mean([cases["case_000"]["metrics"]["2"]["Dice"], 0.0]))

    rows = list(csv.DictReader(open(tmp / "eval" / "summary_per_case.csv")))
    assert len(rows) == 6
    row = next(r for r in rows if r["case"] == "case_000" and r["label"] == "1")
    assert row["label_name"] == "liver"
    assert float(row["Dice"]) == pytest.approx(cases["case_000"]["metrics"]["1"]["Dice"])
    assert float(row["HD95"]) == pytest.approx(cases["case_000"]["metrics"]["1"]["HD95"])
    assert math.isnan(float(next(r for r in rows if r["case"] == "case_001" and r["label"] == "2")["NSD"]))

    plots = tmp / "eval" / "summary_plots"
    for name in ("dice_per_class.png", "boxplot_Dice.png", "boxplot_HD95.png", "boxplot_NSD.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not [p for p in (tmp / "eval").rglob(".*")], "temporary files left behind"


def test_explicit_csv_plots_and_monai_convention(folders, caplog):
    tmp, arrays = folders
    stray = arrays["case_001"][0].copy()
    stray[0, 0, 0] = 7  # a label value dataset.json does not name: reported, not scored
    write(stray, tmp / "pred" / "case_001.nii.gz")
    summary = E.evaluate_folders(tmp / "pred", tmp / "gt", LABELS, hd_convention="monai",
                                 out_csv=tmp / "x.csv", plots_dir=tmp / "figs", mlflow_log=False)
    pred, gt = arrays["case_000"]
    spacing_zyx = sitk.ReadImage(str(tmp / "gt" / "case_000.nii.gz")).GetSpacing()[::-1]
    want = score_case(pred, gt, spacing_zyx, [1, 2], hd_convention="monai")
    assert summary["metric_per_case"][0]["metrics"]["1"]["HD95"] == pytest.approx(want["1"]["HD95"])
    assert summary["conventions"]["hd_convention"] == "monai"
    assert (tmp / "x.csv").is_file() and (tmp / "figs" / "boxplot_NSD.png").is_file()
    entry = summary["metric_per_case"][1]
    assert entry["labels_not_in_dataset_json"] == {"prediction": [7], "reference": []}
    assert "1 of 3 cases hold label values that dataset.json does not name" in caplog.text


def test_geometry_mismatch_names_both_files(folders, capsys):
    """Raised in a worker process, reported by the CLI as a user error naming both files."""
    tmp, arrays = folders
    bad = tmp / "pred" / "case_001.nii.gz"
    write(arrays["case_001"][0], bad, spacing=(0.7, 0.9, 2.5))
    rc = main(["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt"),
               "--dataset-json", str(tmp / "dataset.json"), "--out", str(tmp / "s.json"), "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and str(tmp / "gt" / "case_001.nii.gz") in err and "spacing" in err
    assert not (tmp / "s.json").exists()


def test_bad_inputs_are_user_errors(folders):
    tmp, _ = folders
    with pytest.raises(UserError, match="prediction folder not found: .*nowhere"):
        E.match_files(tmp / "nowhere", tmp / "gt")
    (tmp / "empty").mkdir()
    with pytest.raises(UserError, match="no prediction"):
        E.match_files(tmp / "empty", tmp / "gt")
    (tmp / "regions.json").write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(UserError, match="regions.json"):
        E.labels_from_dataset_json(tmp / "regions.json")
    with pytest.raises(UserError, match="not found"):
        E.labels_from_dataset_json(tmp / "nope.json")
    write(np.full(SHAPE_ZYX, 0.5, np.float32), tmp / "pred" / "case_000.nii.gz")
    with pytest.raises(UserError, match="case_000.nii.gz.*non-integer"):
        E.evaluate_folders(tmp / "pred", tmp / "gt", LABELS, mlflow_log=False)
    with pytest.raises(UserError, match="convention"):
        E.evaluate_folders(tmp / "pred", tmp / "gt", LABELS, hd_convention="x")
    with pytest.raises(UserError, match="workers"):
        E.evaluate_folders(tmp / "pred", tmp / "gt", LABELS, workers=0)


def test_mlflow_logging_cli_and_active_run(folders, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    tmp, _ = folders
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    out = tmp / "mlf" / "summary.json"
    rc = main(["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt"), "--dataset-json",
               str(tmp / "dataset.json"), "--out", str(out), "--workers", "1", "--mlflow"])
    assert rc == 0
    summary = json.loads(out.read_text())
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_name == "evaluate"
    logged = runs[0].data.metrics
    assert logged["eval/Dice/liver"] == pytest.approx(summary["mean"]["1"]["Dice"])
    assert logged["eval/HD95/spleen"] == pytest.approx(summary["mean"]["2"]["HD95"])
    assert logged["eval/NSD/foreground_mean"] == pytest.approx(summary["foreground_mean"]["NSD"])
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation")}
    assert {"evaluation/summary.json", "evaluation/summary_per_case.csv", "evaluation/plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation/plots")}
    assert "evaluation/plots/dice_per_class.png" in plots

    # API inside a caller's active run (the pipeline's way): logs there, starts no run of its own
    with mlflow.start_run(run_name="pipeline") as run:
        result = E.evaluate_folders(tmp / "pred", tmp / "gt", LABELS, tolerance_mm=1.0)
    assert len(client.search_runs([run.info.experiment_id])) == 2
    got = client.get_run(run.info.run_id).data.metrics
    assert got["eval/NSD/liver"] == pytest.approx(result["mean"]["1"]["NSD"])
