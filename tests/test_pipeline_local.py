"""The whole Kubeflow pipeline under kfp.local (SubprocessRunner, no cluster) on the tiny default.

- `run-local --help`'s own example, run twice: the first run trains and registers (MLflow,
  SQLite in tmp_path, holds the training run and the registered version with its alias); the
  second reuses every cached step up to register.
- A failing step prints one clear line, no traceback.
- A training task killed mid-run resumes from its last checkpoint on the checkpoint root.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHED_STEPS = {"data", "validate-data", "preprocess", "train", "export", "evaluate"}


def _run_example(tmp_path: Path, root: Path) -> int:
    from masksam.cli import main
    from masksam.pipelines.cli import RUN_LOCAL_EXAMPLE

    argv = list(RUN_LOCAL_EXAMPLE)
    argv[argv.index("--root") + 1] = str(root)
    return main(["pipeline", "run-local", "--params", str(ROOT / "params.yaml"), *argv])


@pytest.mark.slow
def test_help_example_runs_and_a_second_run_reuses_the_cache(tmp_path, monkeypatch, caplog):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "kfp"
    assert _run_example(tmp_path, root) == 0
    first = {p.name for p in (root / "pipeline_root").iterdir() if not p.name.startswith(".")}

    # every step left its artifacts; reports are self-contained pages / markdown
    reports = {p.parent.name: p for p in root.rglob("report")}
    assert {"validate-data", "preprocess", "train", "evaluate", "register"} <= set(reports), sorted(reports)
    assert "data:image/png;base64," in reports["evaluate"].read_text()
    summaries = list(root.rglob("summary.json"))
    assert summaries and "foreground_mean" in json.loads(summaries[0].read_text())
    assert list(root.rglob("model.onnx"))
    assert list((root / "checkpoints").glob("*/checkpoint_last.pt")), "train kept no checkpoint on its root"
    assert not list((root / "pipeline_root").rglob("checkpoint_last.pt")), "resume-only files in the artifact"

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    runs = mlflow.search_runs(experiment_names=["masksam"], output_format="list")
    assert runs, "no training run in MLflow"
    (version,) = client.search_model_versions("name='masksam'")
    assert version.run_id in {r.info.run_id for r in runs}
    # 4 steps score below register.min_dice: registered, but as challenger, never champion
    assert client.get_model_version_by_alias("masksam", "challenger").version == version.version
    # and the step reports the version it registered and the alias it really got
    assert f"`models:/masksam/{version.version}` -> `@challenger`" in reports["register"].read_text()

    caplog.clear()
    caplog.set_level(logging.INFO)
    t0 = time.monotonic()
    assert _run_example(tmp_path, root) == 0
    hits = set(re.findall(r"Task (\S+) cache hit", caplog.text))
    assert hits == CACHED_STEPS, caplog.text[-3000:]
    (second,) = {p.name for p in (root / "pipeline_root").iterdir() if not p.name.startswith(".")} - first
    assert {p.name for p in (root / "pipeline_root" / second).iterdir()} == {"resolve", "register"}
    print(f"cached rerun: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_a_failing_step_prints_one_clear_line(tmp_path, monkeypatch, capfd):
    from masksam.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    rc = main(["pipeline", "run-local", "--params", str(ROOT / "params.yaml"), "--root", str(tmp_path / "kfp"),
               "--set", "data.source=amos"])
    out, err = capfd.readouterr()
    both = out + err
    assert rc == 2
    assert "Traceback" not in both, both[-3000:]
    assert both.count("data.source is 'amos', but no DVC repository was given") == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("masksam pipeline: error: Pipeline 'masksam' finished with status FAILURE") and "resolve" in last
    assert "\x1b[" not in last


def _tiny_data(tmp_path: Path, params_text: str) -> tuple[str, str]:
    from masksam.pipelines import steps

    _, spec = steps.resolve_inputs(params_text, "{}", {}, "", "", "data/raw")
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    steps.fetch_data(spec, str(raw))
    steps.preprocess(str(raw), str(pre), params_text, "{}", str(tmp_path / "pre.md"))
    return str(raw), str(pre)


@pytest.mark.slow
def test_a_killed_training_step_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capfd):
    """The train step run twice on one checkpoint root, the first killed (its whole process
    group, as a pod is) once a checkpoint exists: the second resumes there, not at step 0."""
    import torch

    from masksam.pipelines import steps

    monkeypatch.chdir(tmp_path)
    tiny = {"data": {"cases": 6, "size": [48, 48, 16]}, "preprocess": {"folds": 2, "test_fraction": 0.34},
            "model": {"img_size": 32, "slab_depth": 4},
            "train": {"steps": 24, "val_every": 0, "checkpoint_every": 2, "batch_size": 1, "device": "cpu",
                      "mlflow": False, "val_cases": 1, "overlay_cases": 0}}
    params = json.dumps(tiny)
    raw, pre = _tiny_data(tmp_path, params)
    ckpt_root, out = tmp_path / "ckpt", tmp_path / "model"
    call = (f"from masksam.pipelines import steps; steps.train({pre!r}, {raw!r}, {str(out)!r}, {params!r}, '{{}}', "
            f"{str(tmp_path / 'r1.html')!r}, checkpoint_root={str(ckpt_root)!r})")
    proc = subprocess.Popen([sys.executable, "-c", call], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(ckpt_root.glob("*/checkpoint_last.pt")):
            assert proc.poll() is None, "training ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the pod dies: the verb's process too
        proc.wait()
    (last,) = ckpt_root.glob("*/checkpoint_last.pt")
    killed_at = int(torch.load(last, map_location="cpu", weights_only=False)["step"])
    assert 0 < killed_at < 24
    assert not (last.parent / "train_summary.json").exists()

    capfd.readouterr()
    summary = steps.train(pre, raw, str(out), params, "{}", str(tmp_path / "r2.html"), checkpoint_root=str(ckpt_root))
    err = capfd.readouterr().err
    resumed_at = int(re.search(r"resuming \S+ at step (\d+)", err).group(1))
    assert resumed_at == killed_at and summary["resumed"] is True and summary["steps"] == 24
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint_last.pt").exists()
    assert list(ckpt_root.iterdir()) == [last.parent]   # the same key: the same directory
