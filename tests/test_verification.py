"""Everything that runs is verified (issue 14, finding 3 / deliverable 4; issue 11, installed
package): the registry's record covers every file of a registered model, pull and models:/
loading refuse any change and leave nothing behind, local training and export folders are
checked against the hashes recorded when they were written, and a dead tracking server fails
fast."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
import SimpleITK as sitk

from _delivery_fixtures import delivery_root, export_dir, phantom_ct, preprocessed, train_dir  # noqa: F401
from _shared import eval_summary_for
from masksam.components._loading import (EXPORT_MANIFEST, MODEL_MANIFEST, HashMismatch,
                                         sha256_file, sidecar_path, write_manifest)
from masksam.components.predictor import Predictor
from masksam.errors import UserError

REPO = Path(__file__).resolve().parents[1]
URI = "models:/masksam@champion"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def registered(tmp_path_factory, train_dir, export_dir):  # noqa: F811
    """A real registration into a local sqlite store (artifacts under tmp); yields the path of
    the stored model folder in the artifact store, the one an attacker would edit."""
    import mlflow
    from mlflow import MlflowClient

    from masksam.components.register import register

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("masksam", artifact_location=(root / "store").as_uri())
        ev = eval_summary_for(export_dir)
        (root / "eval.json").write_text(json.dumps(ev))
        decision = register(train_dir, export_dir, root / "eval.json")
        client = MlflowClient()
        version = client.get_model_version("masksam", decision.version)
        model_id = version.source.split("/")[-1]  # models:/m-...
        stored = Path(url2pathname(urlparse(client.get_logged_model(model_id).artifact_location).path))
        yield {"root": root, "stored": stored, "tags": version.tags, "version": decision.version}
        mlflow.set_tracking_uri(None)


@pytest.fixture()
def tamper(registered):
    """Change one file of the stored model for one test, restoring it afterwards."""
    saved: dict[Path, bytes | None] = {}

    def change(rel: str, edit) -> Path:
        path = registered["stored"] / rel
        saved.setdefault(path, path.read_bytes() if path.exists() else None)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(edit(path.read_bytes() if path.exists() else b""))
        return path

    yield change
    for path, data in saved.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)


@pytest.fixture()
def own_tmpdir(tmp_path, monkeypatch):
    """tempfile's folder for this test only, to see what a call leaves behind."""
    import tempfile

    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _swap_labels(data: bytes) -> bytes:
    side = json.loads(data)
    labels = side["plan"]["labels"]
    names = [k for k in labels if labels[k] != 0][:2]
    labels[names[0]], labels[names[1]] = labels[names[1]], labels[names[0]]
    return json.dumps(side, indent=2).encode()


def _scan(tmp_path: Path) -> Path:
    img, _ = phantom_ct(5)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    return tmp_path / "ct.nii.gz"


# ----------------------------------------------------------------------------- registry record


def test_register_records_every_file_in_the_registry(registered, tmp_path, capsys):
    import argparse

    from masksam.components.pull import _main, pull

    tags = registered["tags"]
    for key in ("manifest_sha256", "onnx_sha256", "sidecar_sha256", "train_weights_sha256", "eval.mean_dice"):
        assert key in tags, key
    stored = registered["stored"]
    assert sha256_file(stored / MODEL_MANIFEST) == tags["manifest_sha256"]
    files = json.loads((stored / MODEL_MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()} - {MODEL_MANIFEST}
    assert set(files) == on_disk  # every file: ONNX, sidecar, code, MLmodel, environment files
    for rel in ("MLmodel", "artifacts/model.onnx", "artifacts/model.onnx.json", f"artifacts/{EXPORT_MANIFEST}",
                "code/masksam/components/_pyfunc.py", "code/masksam/components/predictor.py"):
        assert rel in files, rel
    assert files["artifacts/model.onnx.json"] == tags["sidecar_sha256"]

    onnx_path, verified = pull(URI, tmp_path / "pulled")
    assert set(verified) == {MODEL_MANIFEST, *files}
    assert onnx_path == tmp_path / "pulled" / "artifacts" / "model.onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["pulled"]  # no temporary folder left
    # the pulled folder loads (its manifests are checked again)
    assert Predictor.load(onnx_path, device="cpu").verified["artifacts/model.onnx"] == tags["onnx_sha256"]
    assert _main(argparse.Namespace(uri=URI, dir=str(tmp_path / "cli"))) == 0
    printed = capsys.readouterr().out
    assert f"verified {MODEL_MANIFEST} sha256 {tags['manifest_sha256']}" in printed
    assert f"{len(files)} files verified, none missing or added" in printed


def test_code_appended_in_store_refused_by_pull_and_predict(registered, tamper, tmp_path, own_tmpdir):
    from masksam.components.predict import predict
    from masksam.components.pull import pull

    tamper("code/masksam/components/_pyfunc.py", lambda b: b + b"\nprint('pwned')\n")
    with pytest.raises(HashMismatch, match="_pyfunc.py"):
        pull(URI, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["systmp"]  # no .pulled.pull-* either
    with pytest.raises(HashMismatch, match="_pyfunc.py"):
        predict(_scan(tmp_path), tmp_path / "out", URI, device="cpu", progress=False)
    assert not list(own_tmpdir.iterdir())  # no masksam-model-* left


def test_added_file_or_swapped_labels_in_store_refused(registered, tamper, tmp_path):
    from masksam.components.pull import pull

    tamper("code/masksam/components/extra.py", lambda b: b"import os\n")
    with pytest.raises(HashMismatch, match="extra.py"):
        pull(URI, tmp_path / "a")
    (registered["stored"] / "code/masksam/components/extra.py").unlink()
    tamper("artifacts/model.onnx.json", _swap_labels)
    with pytest.raises(HashMismatch):
        pull(URI, tmp_path / "b")
    with pytest.raises(HashMismatch):
        Predictor.load(URI, device="cpu")
    # the attacker rewrites the manifest too: its sha256 in the registry no longer matches
    stored = registered["stored"]
    tamper(MODEL_MANIFEST, lambda b: b)
    write_manifest(stored, MODEL_MANIFEST)
    with pytest.raises(HashMismatch, match="registry"):
        pull(URI, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pulled_folder_changed_locally_refused(registered, tmp_path):
    from masksam.components.pull import pull

    onnx_path, _ = pull(URI, tmp_path / "pulled")
    side = sidecar_path(onnx_path)
    side.write_bytes(_swap_labels(side.read_bytes()))
    with pytest.raises(HashMismatch, match="model.onnx.json"):
        Predictor.load(onnx_path, device="cpu")


def test_dead_tracking_server_fails_fast_and_leaves_nothing(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "TMPDIR": str(systmp)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "masksam", "predict", "--model", URI, "-i", str(_scan(tmp_path)),
                           "-o", str(tmp_path / "out"), "--no-progress"], env=env, capture_output=True,
                          text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert URI in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert elapsed < 45, elapsed  # MLflow's defaults took 4 min 10 s
    assert not list(systmp.glob("masksam-model-*"))


# ----------------------------------------------------------------------------- local folders


def test_local_export_sidecar_and_manifest_checked(export_dir, tmp_path):  # noqa: F811
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    side = copy / "model.onnx.json"
    original = side.read_bytes()
    side.write_bytes(_swap_labels(original))
    with pytest.raises(HashMismatch, match=EXPORT_MANIFEST):
        Predictor.load(copy / "model.onnx", device="cpu")
    side.write_bytes(original)
    (copy / EXPORT_MANIFEST).unlink()
    with pytest.raises(UserError, match="manifest not found"):
        Predictor.load(copy, device="cpu")


@pytest.mark.parametrize("entry", ["../../../../etc/hostname", "/etc/hostname", "../secret.bin", "link.bin"])
def test_sidecar_paths_confined_to_their_folder(export_dir, tmp_path, entry):  # noqa: F811
    """Even with sidecar and manifest rewritten consistently, a file outside is never read."""
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not a model")
    (copy / "link.bin").symlink_to(secret)
    side = json.loads((copy / "model.onnx.json").read_text())
    side["files"][entry] = sha256_file(secret)
    (copy / "model.onnx.json").write_text(json.dumps(side))
    manifest = json.loads((copy / EXPORT_MANIFEST).read_text())
    manifest["files"].update({"model.onnx.json": sha256_file(copy / "model.onnx.json"), entry: sha256_file(secret)})
    (copy / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="outside|plain relative path"):
        Predictor.load(copy / "model.onnx", device="cpu")


def test_external_data_model_loads_then_its_folder_can_go(export_dir, tmp_path):  # noqa: F811
    """A models:/ load removes its download once the session exists: external data included."""
    import onnx

    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    model = onnx.load(str(copy / "model.onnx"))
    onnx.save_model(model, str(copy / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    side = json.loads((copy / "model.onnx.json").read_text())
    side["files"] = {n: sha256_file(copy / n) for n in ("model.onnx", "model.onnx.data")}
    (copy / "model.onnx.json").write_text(json.dumps(side))
    write_manifest(copy)
    loaded = Predictor.from_onnx(copy / "model.onnx", device="cpu")
    assert "model.onnx.data" in loaded.verified
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 32, 32)).astype(np.float32)
    before = loaded.members[0].runner(x)
    shutil.rmtree(copy)
    np.testing.assert_array_equal(loaded.members[0].runner(x), before)


@pytest.mark.parametrize("change", ["plan", "config", "summary_deleted", "summary_incomplete", "hash_outside"])
def test_training_folder_checked_by_predict_and_export(train_dir, tmp_path, change):  # noqa: F811
    from masksam.components.export import export
    from masksam.components.predict import predict

    copy = tmp_path / "train"
    shutil.copytree(train_dir, copy)
    summary = json.loads((copy / "train_summary.json").read_text())
    if change == "plan":  # swapped label names: would rename the organs of every output
        plan = json.loads((copy / "plan.json").read_text())
        plan["labels"] = {"background": 0, "spleen": 1, "liver": 2}
        (copy / "plan.json").write_text(json.dumps(plan))
        expect = "plan.json"
    elif change == "config":
        (copy / "model_config.json").write_text((copy / "model_config.json").read_text() + " ")
        expect = "model_config.json"
    elif change == "summary_deleted":  # an interrupted run: checkpoint state, no summary
        (copy / "train_summary.json").unlink()
        expect = "--resume"
    elif change == "summary_incomplete":
        (copy / "train_summary.json").write_text(json.dumps({"rank": 0, "param_sha256": "0" * 64}))
        expect = "--resume"
    else:
        summary["hashes"]["../../../../etc/hostname"] = "0" * 64
        (copy / "train_summary.json").write_text(json.dumps(summary))
        expect = "plain relative path"
    with pytest.raises(UserError, match=expect):
        predict(_scan(tmp_path), tmp_path / "out", copy, device="cpu", progress=False)
    with pytest.raises(UserError, match=expect):
        export(copy, tmp_path / "export", exporter="torchscript", tensorrt="off")
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------- installed package


def test_stage_code_from_installed_wheel(tmp_path):
    """Installed as the Dockerfile installs it (a wheel, not editable), register packages the
    code of the installed package, and the staged tree imports on its own."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("masksam", "model", "components", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, cwd=tmp_path, timeout=300)
    wheel = next((tmp_path / "dist").glob("masksam-*.whl"))
    target = tmp_path / "target"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    staged = tmp_path / "staged"

    def run(pythonpath: Path, code: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = run(target, "import masksam; from pathlib import Path; from masksam.components.register import stage_code; "
              f"print(masksam.__file__); stage_code(Path({str(staged)!r}))")
    assert out.startswith(str(target)), out  # the installed copy ran, not the checkout
    assert (staged / "masksam" / "components" / "predictor.py").is_file()
    assert not (staged / "masksam" / "pipelines").exists()
    assert not (staged / "masksam" / "model").exists()  # the torch network is not needed to serve
    out = run(staged, "import masksam.components._pyfunc as p, masksam.components.predict as q, "
              "masksam.components.preprocess as r, masksam.errors as e; "
              "print(p.__file__, q.__file__, r.__file__, e.__file__)")
    assert all(path.startswith(str(staged / "masksam")) for path in out.split()), out
