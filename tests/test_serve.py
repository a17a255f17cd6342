"""Serving: register into a real `mlflow server`, then `mlflow models serve` answers /invocations."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from _delivery_fixtures import delivery_root, export_dir, phantom_ct, preprocessed, train_dir  # noqa: F401
from _shared import eval_summary_for

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.mark.slow
def test_register_then_serve_rest(tmp_path, train_dir, export_dir, monkeypatch):  # noqa: F811
    from masksam.components.register import register

    port = _free_port()
    server = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    serve = None
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait(f"{uri}/health", server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        ev = eval_summary_for(export_dir)
        (tmp_path / "eval.json").write_text(json.dumps(ev))
        assert register(train_dir, export_dir, tmp_path / "eval.json").alias == "champion"

        serve_port = _free_port()
        # mlflow starts `uvicorn` through the shell: the venv's bin must be on PATH (as when
        # the venv is activated)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MASKSAM_DEVICE": "cpu",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        serve = subprocess.Popen(
            [MLFLOW, "models", "serve", "-m", "models:/masksam@champion", "--env-manager", "local",
             "--host", "127.0.0.1", "-p", str(serve_port)], env=env,
            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
        _wait(f"http://127.0.0.1:{serve_port}/ping", serve)
        img, _ = phantom_ct(4)
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        body = json.dumps({"inputs": arr.tolist(), "params": {
            "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection())}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        labels = np.asarray(reply["predictions"])
        assert labels.shape == arr.shape
        assert set(np.unique(labels)) <= {0, 1, 2}
        # plain `mlflow models serve` too: no geometry guessed, a named 400 without stack trace
        body = json.dumps({"inputs": arr.tolist(), "params": {"spacing": list(img.GetSpacing())}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=120)
        assert refused.value.code == 400
        error = json.loads(refused.value.read())
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "params origin, direction missing" in error["message"]
        assert "stack_trace" not in error and "Traceback" not in error["message"]
        # a NIfTI file's bytes in, the label file and the summary out (no 52-million-number JSON)
        import base64

        sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
        body = json.dumps({"inputs": [[[0.0]]], "params": {
            "file_b64": base64.b64encode((tmp_path / "ct.nii.gz").read_bytes()).decode()}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())["predictions"]
        (tmp_path / "labels.nii.gz").write_bytes(base64.b64decode(answer["labels_b64"]))
        from_file = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
        assert from_file.shape == labels.shape and (from_file == labels).mean() > 0.999  # NIfTI stores float32 spacing
        assert answer["format"] == ".nii.gz" and "liver" in answer["structures"]
    finally:
        for proc in (serve, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
