"""`masksam baseline`: nnU-Net v2 end to end on a tiny phantom, on MaskSAM's own split (slow),
plus the input checks that refuse before any nnU-Net work (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from masksam.cli import main
from masksam.components import baseline as B
from masksam.errors import UserError

from _delivery_fixtures import LABELS, write_raw_dataset


def _phantom(root: Path) -> tuple[Path, Path]:
    """Five phantom cases through the real preprocessing: 2 folds of 3 cases, 2 test cases."""
    from masksam.components.preprocess import preprocess_dataset

    raw = write_raw_dataset(root / "raw", n_cases=5)
    pre = root / "preprocessed"
    preprocess_dataset(raw, pre, target_spacing=[2.0, 2.0, 3.0], workers=1, folds=2, seed=0,
                       test_fraction=0.4, progress=False)
    return raw, pre


@pytest.mark.slow
def test_nnunet_baseline_end_to_end_on_masksams_split(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the built-in defaults, overridden below
    raw, pre = _phantom(tmp_path)
    splits = json.loads((pre / "splits.json").read_text())
    out = tmp_path / "baseline"
    rc = main(["baseline", "--raw", str(raw), "--preprocessed", str(pre), "--out", str(out), "--device", "cpu",
               "--epochs", "2", "--iterations-per-epoch", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "nnU-Net baseline, 2 test cases" in capsys.readouterr().out

    # nnU-Net saw only the non-test cases, and trained on MaskSAM's fold 0
    work = out / "nnunet"
    seen = sorted(p.name for p in (work / "nnUNet_raw" / B.DATASET_NAME / "labelsTr").iterdir())
    assert seen == sorted(f"{c}.nii.gz" for c in splits["folds"][0]["train"] + splits["folds"][0]["val"])
    nn_splits = json.loads((work / "nnUNet_preprocessed" / B.DATASET_NAME / "splits_final.json").read_text())
    assert nn_splits == [{"train": f["train"], "val": f["val"]} for f in splits["folds"]]
    model = work / "nnUNet_results" / B.DATASET_NAME / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    debug = json.loads((model / "fold_0" / "debug.json").read_text())
    assert int(debug["num_epochs"]) == 2 and int(debug["num_iterations_per_epoch"]) == 3
    assert (model / "fold_0" / "validation" / "summary.json").is_file()  # nnU-Net's own validation ran

    # predictions of the test cases in their raw geometry, scored by the project's evaluator
    for case in splits["test"]:
        pred = sitk.ReadImage(str(out / "predictions" / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))
        assert pred.GetSize() == ref.GetSize()
        assert np.allclose(pred.GetDirection(), ref.GetDirection()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= set(LABELS.values())
    summary = json.loads((out / "summary.json").read_text())
    assert [e["case"] for e in summary["metric_per_case"]] == splits["test"]
    assert summary["labels"] == {"1": "liver", "2": "spleen"} and summary["n_cases"] == 2
    assert summary["baseline"]["epochs"] == 2 and summary["baseline"]["fold"] == 0
    assert all(e["reference_file"] == str(raw / "labelsTr" / f"{e['case']}.nii.gz") for e in summary["metric_per_case"])
    assert (out / "per_case.csv").is_file() and (out / "plots" / "dice_per_class.png").is_file()
    assert (out / "logs" / "train.log").read_text().count("Epoch") >= 2

    # the summary pairs with itself in masksam compare (same cases, same conventions)
    assert main(["compare", str(out / "summary.json"), str(out / "summary.json"), "--out", "cmp",
                 "--names", "nnU-Net", "again", "--bootstrap", "100"]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["foreground_mean"]["Dice"]["diff"] == 0.0

    # a rerun may replace its own output, never a foreign folder
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace it"):
        B.run_baseline(raw, pre, foreign, device="cpu")


def test_refuses_before_any_work(tmp_path) -> None:
    raw = write_raw_dataset(tmp_path / "raw", n_cases=3)
    pre = tmp_path / "pre"
    pre.mkdir()
    with pytest.raises(UserError, match="splits file"):
        B.run_baseline(raw, pre, tmp_path / "out")
    (pre / "splits.json").write_text(json.dumps({"folds": [{"train": ["case_000"], "val": ["case_001"]}],
                                                 "test": ["case_002"]}))
    with pytest.raises(UserError, match="train.fold 1 is not one"):
        B.run_baseline(raw, pre, tmp_path / "out", fold=1)
    with pytest.raises(UserError, match="configuration must be one of"):
        B.run_baseline(raw, pre, tmp_path / "out", configuration="3d_cascade_fullres")
    with pytest.raises(UserError, match="cuda:N"):
        B.run_baseline(raw, pre, tmp_path / "out", device="gpu0")
    (raw / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(UserError, match="case 'case_002' of splits.json is missing"):
        B.run_baseline(raw, pre, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_device_env_maps_a_gpu_index_to_cuda_visible_devices() -> None:
    assert B.device_env("cuda:1") == ("cuda", {"CUDA_VISIBLE_DEVICES": "1"})
    assert B.device_env("auto") == ("auto", {})


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["baseline", "--help"])
    assert exc.value.code == 0
    assert "usage: masksam baseline" in capsys.readouterr().out


@pytest.mark.parametrize("validate", [True, False])
def test_train_worker_runs_nnunets_validation_unless_switched_off(monkeypatch, validate) -> None:
    """baseline.validate: nnUNetv2_train's validation of the fold after training, or not (the
    comparison scores the test set only; on a CPU the validation costs minutes per case)."""
    pytest.importorskip("nnunetv2")
    import nnunetv2.run.run_training as rt

    calls = []

    class Trainer:
        def run_training(self):
            calls.append(("train", self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch))

        def perform_actual_validation(self, save_probabilities):
            calls.append(("validate", save_probabilities))

    monkeypatch.setattr(rt, "get_trainer_from_args", lambda *a, **k: Trainer())
    monkeypatch.setattr(B, "_torch_device", lambda device: device)
    B._train_worker({"configuration": "3d_fullres", "fold": 0, "device": "cpu", "epochs": 2,
                     "iterations_per_epoch": 10, "validate": validate})
    assert calls[0] == ("train", 2, 10, 2)
    assert (("validate", False) in calls) is validate
