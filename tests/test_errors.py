"""Errors, not tracebacks (issue 14, finding 7): outputs that are the wrong kind of path or
cannot be written, and a SAM checkpoint holding Python objects instead of tensors. Each case runs
the real CLI and expects exit status 2 with one line naming the option or file at fault."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from masksam.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _data_helpers import make_dataset  # noqa: E402
from test_train import TINY_MODEL, preprocessed, tiny_train  # noqa: E402,F401  (fixture reused)


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder nobody may create files in: a read-only folder, or /sys for root (whom file
    permissions do not stop)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys")
    try:
        (folder / "masksam-probe").mkdir()
    except OSError:
        yield folder
        return
    (folder / "masksam-probe").rmdir()
    pytest.skip("no unwritable folder available to root here")


def _train(params: Path, *extra: str) -> int:
    return main(["train", "--params", str(params), "--no-mlflow", "--no-progress", *extra])


@pytest.fixture
def train_params(preprocessed, tmp_path) -> Path:
    section = {k: v for k, v in vars(tiny_train(steps=1, val_every=0)).items()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preprocess": {"out": str(preprocessed)}, "model": TINY_MODEL,
                                      "train": {**section, "out": str(tmp_path / "train")}}))
    return params


def test_train_out_is_a_file(train_params, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert _train(train_params, "--out", str(target)) == 2
    err = capsys.readouterr().err
    assert f"--out {target} is a file" in err and err.count("\n") == 1
    assert target.read_text() == "mine"


def test_train_out_unwritable(train_params, unwritable, capsys):
    assert _train(train_params, "--out", str(unwritable / "train")) == 2
    err = capsys.readouterr().err
    assert f"--out {unwritable / 'train'} cannot be written" in err and err.count("\n") == 1


def test_train_checkpoint_with_python_objects_is_refused_unrun(train_params, tmp_path, capsys):
    """A pickle whose payload would create a file: refused by torch.load(weights_only=True)
    before anything runs, reported as one line naming the file."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": Payload()}, evil)
    assert _train(train_params, "--sam-weights", str(evil)) == 2
    err = capsys.readouterr().err
    assert f"SAM weights {evil} holds Python objects other than tensors" in err and err.count("\n") == 1
    assert not marker.exists()

    not_tensors = tmp_path / "lists.pth"
    torch.save({"image_encoder.pos_embed": [1, 2, 3]}, not_tensors)
    assert _train(train_params, "--sam-weights", str(not_tensors)) == 2
    err = capsys.readouterr().err
    assert f"SAM weights {not_tensors} does not hold a state dict" in err and err.count("\n") == 1

    assert _train(train_params, "--sam-weights", str(tmp_path / "missing.pth")) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err


@pytest.fixture
def folders(tmp_path) -> Path:
    """references and identical predictions, with their dataset.json."""
    raw = make_dataset(tmp_path / "raw", 2)
    shutil.copytree(raw / "labelsTr", tmp_path / "pred")
    return raw


def _evaluate(raw: Path, tmp_path: Path, *extra: str) -> int:
    return main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(raw / "labelsTr"),
                 "--dataset-json", str(raw / "dataset.json"), "--workers", "1", *extra])


def test_evaluate_out_is_a_folder(folders, tmp_path, capsys):
    (tmp_path / "results").mkdir()
    assert _evaluate(folders, tmp_path, "--out", str(tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert f"summary file (--out) {tmp_path / 'results'} is a folder" in err and err.count("\n") == 1
    assert list((tmp_path / "results").iterdir()) == []
    assert not (tmp_path / "results_plots").exists()  # refused before any output was written


def test_evaluate_plots_is_a_file(folders, tmp_path, capsys):
    (tmp_path / "plots").write_text("mine")
    assert _evaluate(folders, tmp_path, "--out", str(tmp_path / "s.json"), "--plots", str(tmp_path / "plots")) == 2
    assert "plots folder (--plots)" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists() and (tmp_path / "plots").read_text() == "mine"


def test_evaluate_out_unwritable(folders, tmp_path, unwritable, capsys):
    out = unwritable / "eval" / "summary.json"
    assert _evaluate(folders, tmp_path, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "folder of the summary file (--out)" in err and "cannot be written" in err and err.count("\n") == 1


def test_evaluate_pipeline_out_dir_is_a_file(tmp_path, capsys):
    """Pipeline mode: --out-dir naming a file is refused before any prediction."""
    from masksam.components.evaluate import evaluate_model
    from masksam.errors import UserError

    raw = make_dataset(tmp_path / "raw", 2)
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "splits.json").write_text('{"folds": [], "test": ["case_000"]}')
    (tmp_path / "eval").write_text("mine")
    with pytest.raises(UserError, match="output folder \\(--out-dir\\) .*eval is a file"):
        evaluate_model(tmp_path / "no-model", raw, pre, tmp_path / "eval")
    assert (tmp_path / "eval").read_text() == "mine"
