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

from masksam.components._tracking import (RunLogger, TrackingUnavailable, bounded_call, check_tracking,
                                          dvc_lock_hashes, flatten, lineage_tags, tracking_uri,
                                          unique_metric_names)
from masksam.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_MODEL, preprocessed, tiny_train  # noqa: E402,F401  (fixture reused)

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

    build_parser(complete=True)  # import every step module first: the timing below is the probe's

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


def test_ui_links_open_on_the_model_training_view():
    """MLflow 3.17's UI opens on its GenAI view unless the link asks for the runs view (seen in
    headless Chromium, scripts/mlflow_ui_check.py): every printed link carries the query."""
    from masksam.components._tracking import ui_hint, ui_url

    assert ui_url("http://mlflow.example:5000/", "experiments/3/runs/abc") == (
        "http://mlflow.example:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert ui_hint("https://mlflow.example", "models/m/versions/2") == (
        "https://mlflow.example/#/models/m/versions/2?workflowType=machine_learning")
    local = ui_hint("sqlite:///mlflow.db", "models/m/versions/2")
    assert local.startswith("`mlflow ui --backend-store-uri sqlite:///mlflow.db`, then http://127.0.0.1:5000/#/")


def test_git_commit_unknown_outside_git(tmp_path):
    from masksam.components._tracking import git_commit

    assert git_commit(tmp_path) == "unknown"


@pytest.mark.slow
def test_training_logs_to_real_mlflow_server(tmp_path):
    """A real `mlflow server` on a free port; a short training logs its run there over HTTP."""
    from mlflow.tracking import MlflowClient

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
        _wait_ready(uri, server, limit_s=180)
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


# ---------------------------------------------------------------------------------------------
# Bounded waits: a tracking server that dies mid-run (issue 14, finding 5)
# ---------------------------------------------------------------------------------------------

def test_logger_gives_up_on_dead_server_within_its_timeout():
    """MLflow's own HTTP retries (7, exponential backoff, 120 s timeouts) would wait minutes per
    call; every RunLogger call is bounded by its timeout, and after an outage it waits no more."""
    import mlflow.tracking  # noqa: F401  (import time is not the call's)

    uri = f"http://127.0.0.1:{free_port()}"
    logger = RunLogger(uri, "exp", timeout_s=2.0, backoff_s=0.2)
    logger.run_id = "0123456789abcdef"  # as if started before the server died
    t = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"{uri} was unreachable for [23] s"):
        logger.log_metrics({"loss": 1.0}, 7)
    assert 2.0 <= time.monotonic() - t < 6
    assert logger.failure is not None and logger.unlogged[0]["step"] == 7
    t = time.monotonic()
    logger.log_metrics({"loss": 0.5}, 8)  # kept for later, no second wait
    with pytest.raises(TrackingUnavailable):
        logger.end()
    assert time.monotonic() - t < 0.5
    assert [e["step"] for e in logger.unlogged] == [7, 8]


def test_bounded_call_retries_transient_errors_and_raises_refusals():
    from mlflow.exceptions import MlflowException

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    assert bounded_call(flaky, uri="u", timeout_s=5, what="x", backoff_s=0.01) == "ok" and len(calls) == 3

    def refused():
        calls.append(1)
        raise MlflowException.invalid_parameter_value("bad name")

    calls.clear()
    with pytest.raises(MlflowException, match="bad name"):
        bounded_call(refused, uri="u", timeout_s=5, what="x", backoff_s=0.01)
    assert len(calls) == 1  # a refusal is not retried


def test_tracking_timeout_is_configurable_and_checked(tmp_path, monkeypatch):
    """train.tracking_timeout_s in params.yaml and the paper config, --tracking-timeout on the
    CLI; non-positive values are refused."""
    import masksam.components.train as train_mod
    from masksam.cli import main
    from masksam.components.params import TrainParams, load_params

    repo = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "configs/paper_vit_b.yaml"):
        assert load_params(repo / name).train.tracking_timeout_s == 120
    assert TrainParams().tracking_timeout_s == 120
    for bad in (0, -1, "soon"):
        with pytest.raises(UserError, match="tracking_timeout_s must be a (positive )?number"):
            load_params(None, {"train.tracking_timeout_s": bad})
    with pytest.raises(UserError, match="positive number of seconds"):
        RunLogger("sqlite:///x.db", timeout_s=0)

    seen = {}
    monkeypatch.setattr(train_mod, "train", lambda pre, out, model, cfg, **k: seen.update(cfg=cfg) or {})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"variant": "tiny"}, "train": {"tracking_timeout_s": 30}}))
    assert main(["train", "--params", str(params)]) == 0
    assert seen["cfg"].tracking_timeout_s == 30
    assert main(["train", "--params", str(params), "--tracking-timeout", "7.5"]) == 0
    assert seen["cfg"].tracking_timeout_s == 7.5


def test_training_saves_checkpoint_and_stops_when_tracking_stays_down_then_resumes(
        preprocessed, tmp_path, monkeypatch):
    """The store fails from step 3 on: training stops with a --resume hint after the timeout,
    its checkpoint holds step 3 and the metrics MLflow did not get; resuming logs every step."""
    from mlflow.tracking import MlflowClient

    from masksam.components.train import train

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    real_log_batch = MlflowClient.log_batch

    def dies_at_step_3(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step >= 3 for m in metrics):
            raise ConnectionError("connection refused")
        return real_log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", dies_at_step_3)
    out = tmp_path / "train"
    cfg = tiny_train(steps=5, val_every=0, mlflow=True, tracking_timeout_s=1.0)
    with pytest.raises(UserError, match=r"unreachable for 1 s.*stopped at step 3 of 5.*--resume") as err:
        train(preprocessed, out, TINY_MODEL, cfg, tracking=uri, progress=False)
    assert not isinstance(err.value, TrackingUnavailable)  # the message is training's, with the hint
    state = torch_load(out / "checkpoint_last.pt")
    assert state["step"] == 3 and [e["step"] for e in state["mlflow_unlogged"]] == [3]
    assert not (out / "train_summary.json").exists()

    monkeypatch.setattr(MlflowClient, "log_batch", real_log_batch)
    summary = train(preprocessed, out, TINY_MODEL, cfg, resume=True, tracking=uri, progress=False)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and summary["steps"] == 5
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4, 5]


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over tmp_path's sqlite store, in its own process group
    (its workers die with it)."""
    return subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_ready(uri: str, server: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.time() + limit_s
    while True:
        try:
            check_tracking(uri, timeout_s=2)
            return
        except UserError:
            if time.time() > deadline or server.poll() is not None:
                raise
            time.sleep(0.5)


def _kill_group(server: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


@pytest.mark.slow
def test_server_killed_mid_training_fails_within_bound_and_resume_finishes(preprocessed, tmp_path):
    """A real `mlflow server`, SIGKILLed while the CLI trains: training exits 2 within its
    --tracking-timeout plus slack, with checkpoint_last.pt saved; the server restarted on the same
    store, `--resume` finishes the same MLflow run with every step's loss."""
    from mlflow.tracking import MlflowClient

    port, bound_s, steps = free_port(), 6, 15
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "train"
    section = {k: v for k, v in vars(tiny_train(steps=steps, val_every=0, mlflow=True)).items()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preprocess": {"out": str(preprocessed)}, "model": TINY_MODEL,
                                      "train": {**section, "out": str(out)}}))
    cmd = [MASKSAM, "train", "--params", str(params), "--no-progress", "--tracking-uri", uri,
           "--tracking-timeout", str(bound_s)]
    server = _start_server(tmp_path, port)
    try:
        _wait_ready(uri, server)
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(tracking_uri=uri)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            runs = client.search_runs(client.get_experiment_by_name("masksam").experiment_id) \
                if client.get_experiment_by_name("masksam") else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 2:
                break
            time.sleep(0.2)
        _kill_group(server)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=bound_s + 60)
        took = time.monotonic() - killed
        assert proc.returncode == 2, err[-3000:]
        assert took < bound_s + 20, f"training took {took:.0f} s to give up (bound {bound_s} s)"
        assert f"{uri} was unreachable for" in err and "--resume" in err, err[-2000:]
        stopped_at = torch_load(out / "checkpoint_last.pt")["step"]
        assert 2 <= stopped_at < steps

        server = _start_server(tmp_path, port)  # same store
        _wait_ready(uri, server)
        res = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        summary = yaml.safe_load((out / "train_summary.json").read_text())
        run = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED" and summary["steps"] == steps
        logged = {m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "loss")}
        assert logged == set(range(1, steps + 1))
    finally:
        _kill_group(server)


# ---------------------------------------------------------------------------------------------
# Metric names: one rule, MLflow-safe, distinct (issue 14, finding 7)
# ---------------------------------------------------------------------------------------------

ODD_LABELS = {"background": 0, "kidney (left)": 1, "rein gauche é": 2, "kidney [left]": 3, "a/b": 4,
              "..": 5, "liver": 6}


def test_unique_metric_names_are_safe_stable_and_distinct():
    keys = unique_metric_names(list(ODD_LABELS)[1:])
    assert keys["liver"] == "liver" and keys["rein gauche é"] == "rein gauche é"
    assert keys["kidney (left)"].startswith("kidney _left__") and keys["kidney [left]"].startswith("kidney _left__")
    assert len(set(keys.values())) == len(keys)
    assert keys["a/b"] == "a_b" and keys[".."] == "__"
    assert unique_metric_names(["kidney [left]", "kidney (left)"]) == {k: keys[k] for k in ("kidney [left]", "kidney (left)")}
    assert unique_metric_names(["kidney (left)"]) == {"kidney (left)": "kidney _left_"}
    assert unique_metric_names(["foreground_mean"], reserved=["foreground_mean"])["foreground_mean"] != "foreground_mean"


def test_validation_metrics_with_odd_label_names_all_reach_sqlite_store(tmp_path):
    """Training's validation Dice for labels with parentheses, unicode, slashes: MLflow used to
    refuse the whole batch (val_mean_dice included)."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from masksam.components.train import validation_metrics

    per_class = np.linspace(0.1, 0.6, len(ODD_LABELS) - 1)
    metrics = validation_metrics(per_class, 0.35, ODD_LABELS)
    assert len(metrics) == len(ODD_LABELS)  # one per foreground class, plus the mean
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    logger = RunLogger(uri, "exp")
    logger.start("r")
    logger.log_metrics(metrics, 2)
    stored = MlflowClient(tracking_uri=uri).get_run(logger.run_id).data.metrics
    assert stored == pytest.approx(metrics)
    assert stored["val_mean_dice"] == 0.35


def test_evaluate_logs_every_label_with_odd_names_to_sqlite_store(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from masksam.components.evaluate import BOX_METRICS, log_to_mlflow

    labels = {str(v): k for k, v in ODD_LABELS.items() if v}
    summary = {"labels": labels,
               "mean": {k: {m: 0.5 + int(k) / 100 for m in BOX_METRICS} for k in labels},
               "foreground_mean": {m: 0.5 for m in BOX_METRICS}}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("odd-labels")  # not an experiment id cached by an earlier test's store
    with mlflow.start_run() as run:
        log_to_mlflow(summary, [])
    stored = MlflowClient(tracking_uri=uri).get_run(run.info.run_id).data.metrics
    assert len(stored) == len(BOX_METRICS) * (len(labels) + 1)
    assert sorted(stored.values()) == sorted([0.5 + int(k) / 100 for k in labels for _ in BOX_METRICS]
                                             + [0.5] * len(BOX_METRICS))
    assert stored["eval/Dice/rein gauche é"] == pytest.approx(0.52)
