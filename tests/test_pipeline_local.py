"""The whole Kubeflow pipeline under kfp.local (SubprocessRunner, no cluster) on the tiny default.

Every step runs as a subprocess of this interpreter; afterwards MLflow (SQLite in tmp_path)
must hold the training run and the registered model with its alias.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The smallest run the params allow: few tiny phantom cases, a handful of steps.
TINY = {
    "data.cases": 6,
    "data.size": [48, 48, 16],
    "preprocess.folds": 2,
    "preprocess.test_fraction": 0.34,
    "model.img_size": 32,
    "model.slab_depth": 4,
    "model.num_queries": 8,  # one per phantom class: the default fixed matching needs it
    "train.steps": 4,
    "train.val_every": 2,
    "train.batch_size": 1,
    "train.device": "cpu",
    "register.alias": "champion",
}


@pytest.mark.slow
def test_whole_pipeline_under_kfp_local(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from masksam.pipelines.cli import run_local

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    root = run_local(tmp_path / "kfp", ROOT / "params.yaml", overrides=TINY)

    # every step left its artifacts; reports are self-contained pages / markdown
    reports = {p.parent.name: p for p in root.rglob("report")}
    assert {"validate-data", "preprocess", "train", "evaluate", "register"} <= set(reports), sorted(reports)
    assert "data:image/png;base64," in reports["evaluate"].read_text()
    summaries = list(root.rglob("summary.json"))
    assert summaries and "foreground_mean" in json.loads(summaries[0].read_text())
    assert list(root.rglob("model.onnx"))

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    runs = mlflow.search_runs(experiment_names=["masksam"], output_format="list")
    assert runs, "no training run in MLflow"
    version = client.get_model_version_by_alias("masksam", "champion")
    assert version.run_id in {r.info.run_id for r in runs}
