"""MLflow tracking: fail fast on an unreachable server, retries, lineage tags, and a short
training logged to a real `mlflow server` over HTTP."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from masksam.components._tracking import (RunLogger, check_tracking, dvc_lock_hashes, flatten,
                                          lineage_tags, retry, tracking_uri)
from masksam.errors import UserError

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
MASKSAM = str(Path(sys.executable).with_name("masksam"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_clear_message():
    import mlflow.tracking  # noqa: F401  (import time is not the probe's)

    uri = f"http://127.0.0.1:{free_port()}"
    t = time.time()
    with pytest.raises(UserError, match=f"MLflow tracking server {uri} cannot be reached"):
        check_tracking(uri)
    assert time.time() - t < 10


def test_train_cli_fails_at_start_when_server_unreachable(tmp_path, monkeypatch, capsys):
    import mlflow.tracking  # noqa: F401  (import time is not the probe's)

    from masksam.cli import build_parser, main

    build_parser()  # import every step module first: the timing below is the probe's

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"variant": "tiny"}, "train": {"steps": 1000},
                                      "preprocess": {"out": str(tmp_path)}}))
    # The probe runs right after the cheap plan/splits checks, before cases or the model load.
    _write_min_preprocessed(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.chdir(tmp_path)
    t = time.time()
    assert main(["train", "--params", str(params)]) == 2
    assert time.time() - t < 10
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "MLFLOW_TRACKING_URI" in err


def _write_min_preprocessed(root: Path) -> None:
    import json

    from masksam.components.preprocess import PLAN_VERSION

    (root / "plan.json").write_text(json.dumps({"version": PLAN_VERSION, "labels": {"background": 0, "a": 1},
                                                "channel_names": {"0": "CT"}}))
    (root / "splits.json").write_text(json.dumps({"folds": [{"train": ["x"], "val": []}], "test": []}))


def test_sqlite_uri_in_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_tracking(f"sqlite:///{tmp_path / 'no' / 'mlflow.db'}")


def test_default_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://x:5000")
    assert tracking_uri() == "http://x:5000"
    assert tracking_uri("sqlite:///a.db") == "sqlite:///a.db"


def test_retry_recovers_then_gives_up_with_warning(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("transient")
        return "ok"

    assert retry(flaky, attempts=3, backoff_s=0.01) == "ok" and len(calls) == 3
    with caplog.at_level(logging.WARNING):
        assert retry(lambda: 1 / 0, what="log metrics", attempts=2, backoff_s=0.01) is None
    assert "log metrics failed after 2 attempts" in caplog.text


def test_logging_failure_never_raises(tmp_path, caplog):
    logger = RunLogger(f"sqlite:///{tmp_path / 'm.db'}", "exp", backoff_s=0.01)
    logger.start("r")
    logger.client.set_terminated(logger.run_id, "FINISHED")
    logger.client.delete_run(logger.run_id)  # further logging now fails server-side
    with caplog.at_level(logging.WARNING):
        logger.log_metrics({"loss": 1.0}, 1)
    assert "failed after" in caplog.text


def test_flatten_and_lineage_tags(tmp_path, monkeypatch):
    assert flatten({"train": {"lr": 0.001, "size": [1, 2]}, "a": None}) == {
        "train.lr": "0.001", "train.size": "[1, 2]", "a": "None"}
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "manifest.json").write_text('{"dataset_sha256": "' + "a" * 64 + '"}')
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"preprocess": {
        "cmd": "masksam preprocess", "outs": [{"path": "data/preprocessed", "md5": "abc.dir", "size": 3}]}}}))
    assert dvc_lock_hashes(tmp_path / "dvc.lock") == {"data/preprocessed": "abc.dir"}
    tags = lineage_tags({"labels": {}}, tmp_path / "raw", data_paths=("data/preprocessed",),
                        dvc_lock=tmp_path / "dvc.lock")
    assert tags["data.dataset_sha256"] == "a" * 64
    assert tags["dvc.md5.data/preprocessed"] == "abc.dir"
    assert tags["git_commit"] != "" and tags["segment_anything_version"]


def test_git_commit_unknown_outside_git(tmp_path):
    from masksam.components._tracking import git_commit

    assert git_commit(tmp_path) == "unknown"


@pytest.mark.slow
def test_training_logs_to_real_mlflow_server(tmp_path):
    """A real `mlflow server` on a free port; a short training logs its run there over HTTP."""
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import TINY_MODEL, tiny_train  # noqa: E402
    from _delivery_fixtures import write_raw_dataset  # noqa: E402

    from masksam.components.preprocess import preprocess_dataset
    from masksam.components.train import train

    port = free_port()
    server = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        raw = write_raw_dataset(tmp_path / "raw", 5)
        pre = tmp_path / "pre"
        preprocess_dataset(raw, pre, target_spacing=[2.0, 2.0, 3.0], workers=1, folds=2, test_fraction=0.2,
                           progress=False)
        deadline = time.time() + 180
        while True:
            try:
                check_tracking(uri, timeout_s=2)
                break
            except UserError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        summary = train(pre, tmp_path / "train", TINY_MODEL, tiny_train(steps=2, val_every=2, mlflow=True),
                        tracking=uri, progress=False)
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert "val_mean_dice" in run.data.metrics
        assert "learning_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert list((tmp_path / "artifacts").rglob("learning_curve.png"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
