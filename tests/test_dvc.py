"""`dvc repro` of the real dvc.yaml in a temporary git repository.

The pipeline runs for real (every stage a `masksam` verb) on a shrunken copy of params.yaml:
tiny phantom, a few training steps. Checks: the whole DAG runs and registers a model, a second
`dvc repro` is a no-op, and changing `train.lr` reruns exactly train and what follows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(cases=5, size=[64, 64, 16])
    params["preprocess"].update(target_spacing=[3.0, 3.0, 6.0], test_fraction=0.2, folds=3)
    params["model"].update(img_size=32, slab_depth=4, num_queries=8)  # fixed matching: one per class
    params["train"].update(steps=4, val_every=4, batch_size=1)
    params["register"]["min_dice"] = 0.0  # 4 steps learn little: let the alias logic run anyway
    return params


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture()
def dvc_repo(tmp_path: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    # The code folders are stage dependencies; the code that runs is the installed package.
    for folder in ("masksam", "model", "components"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_params(), sort_keys=False))
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _run(["git", "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo, env)
    _run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(tmp_path / "remote")], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "pipeline"], repo, env)
    return repo, env


def _ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_dvc_repro_end_to_end_noop_and_param_change(dvc_repo: tuple[Path, dict], tmp_path: Path) -> None:
    repo, env = dvc_repo
    dvc = str(BIN / "dvc")
    out = _run([dvc, "repro"], repo, env)
    assert _ran_stages(out) == {"data", "validate", "preprocess", "train", "evaluate", "export", "register"}
    # metrics read well: Dice first, per class and the mean, no counts
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    assert list(metrics) == ["Dice", "HD95", "NSD"] and "mean" in metrics["Dice"]
    shown = _run([dvc, "metrics", "show"], repo, env)
    header = shown.splitlines()[0]
    assert header.index("Dice.mean") < header.index("HD95.mean") and "n_cases" not in shown
    # plots render offline: images embedded in the HTML, no script from a CDN
    _run([dvc, "plots", "show", "--out", str(tmp_path / "plots")], repo, env)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "<img" in html and "<script src=\"http" not in html and "cdn" not in html.lower()

    # Data versioning: the raw dataset is in the DVC cache and goes to the remote.
    _run([dvc, "push"], repo, env)
    assert any((tmp_path / "remote").rglob("*")), "dvc push wrote nothing to the local remote"

    # Nothing changed: a no-op.
    again = _run([dvc, "repro"], repo, env)
    assert _ran_stages(again) == set(), again

    # Code deps: a change in the probability resampling makes evaluate stale, a change in
    # predict.py makes register stale (its model ships and runs that code).
    for source, stage in (("components/_resample.py", "evaluate"), ("components/predict.py", "register")):
        original = (repo / source).read_text()
        (repo / source).write_text(original + "\n# edited\n")
        stale = json.loads(_run([dvc, "status", "--json"], repo, env))
        assert stage in stale, f"editing {source} left '{stage}' up to date: {stale}"
        (repo / source).write_text(original)
    assert json.loads(_run([dvc, "status", "--json"], repo, env)) == {}

    # A training parameter reruns training and what depends on it, nothing upstream.
    _run([dvc, "exp", "run", "-S", "train.lr=0.0005", "--name", "lr-half"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["lr"] == 0.0005
    status = _run([dvc, "status", "--json"], repo, env)
    assert json.loads(status) == {}, status
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == 0.0005

    params["train"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run([dvc, "repro"], repo, env)
    assert _ran_stages(changed) == {"train", "evaluate", "export", "register"}, changed

    # MLflow holds the training runs and the registered model with its alias.
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    name = params["register"]["model_name"]
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) >= 2
    aliases = {a for v in versions for a in client.get_model_version(name, v.version).aliases}
    assert "champion" in aliases
