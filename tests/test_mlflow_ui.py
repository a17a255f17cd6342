"""The MLflow UI as a user sees it: a real `mlflow server`, pages rendered by headless Chromium.

A training run (with its raw dataset as input) and the version registered from it, in a sqlite
store; then scripts/mlflow_ui_check.py serves the store and checks the rendered experiment, run,
registered-model and version pages (runs table rather than the GenAI overview, logged and
registered model on the run, model card). Needs Debian's Chromium (`apt-get install chromium`),
so it runs in `make test-heavy`, not in CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _delivery_fixtures import delivery_root, export_dir, preprocessed, train_dir  # noqa: F401
from _shared import eval_summary_for

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.heavy


def test_mlflow_ui_shows_runs_lineage_and_model_card(tmp_path, monkeypatch, train_dir, export_dir):  # noqa: F811
    import mlflow

    from masksam.components._tracking import RunLogger, lineage_tags
    from masksam.components.data.manifest import write_manifest
    from masksam.components.register import register

    assert shutil.which("chromium"), "this test needs Debian's Chromium: apt-get install chromium"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"name": "Phantom", "labels": {"background": 0, "liver": 1}}))
    write_manifest(raw, progress=False)
    trained = tmp_path / "train"
    shutil.copytree(train_dir, trained)
    plan = json.loads((trained / "plan.json").read_text())
    logger = RunLogger(uri, "masksam")
    run_id = logger.start("train-fold0", {**lineage_tags(plan), "step": "train"})
    logger.log_params({"train.steps": "4"})
    logger.log_dataset(raw)
    logger.end()
    summary = json.loads((trained / "train_summary.json").read_text())
    (trained / "train_summary.json").write_text(json.dumps({**summary, "mlflow_run_id": run_id}))
    ev = eval_summary_for(export_dir, foreground_mean={"Dice": 0.61, "HD95": 4.0, "NSD": 0.6}, test_set_id="set-1")
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    register(trained, export_dir, tmp_path / "eval.json", min_dice=0.0)

    out = tmp_path / "ui"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "mlflow_ui_check.py"), "--backend-store-uri",
                           uri, "--out", str(out)], capture_output=True, text=True, timeout=900)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}\nreport: {report}"
    assert [p["page"] for p in report["pages"]] == ["experiment", "run", "model", "version"]
    for page in report["pages"]:
        assert Path(page["screenshot"]).stat().st_size > 10_000, page  # a rendered page, not a blank one
    # the page a reader lands on from the printed link is the runs table with this run's model
    assert "masksam v1" in (out / "experiment.txt").read_text()
    assert "mean Dice 0.610" in (out / "version.txt").read_text()
