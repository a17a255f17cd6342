"""The registered pyfunc cannot be called wrong, and its server protects itself (issue 14, 2 and 6).

A tiny random model is exported and registered for real (a SQLite store in a temporary folder)
and loaded the way the README says. Python calls go through ``mlflow.pyfunc.load_model``; REST
calls go through MLflow's own scoring app behind ``masksam serve``'s guard, in process (fast), and
through a real ``masksam serve`` on 127.0.0.1 (slow).
"""

from __future__ import annotations

import asyncio
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
from mlflow.exceptions import MlflowException

from _delivery_fixtures import delivery_root, export_dir, phantom_ct, preprocessed, train_dir  # noqa: F401
from _shared import eval_summary_for
from masksam.components import serve as serve_mod
from masksam.components._pyfunc import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV, check_size
from masksam.components.serve import MAX_BYTES_ENV
from masksam.errors import UserError

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # diag(-1, -1, 1): not the plan's LPS


def _geometry(img: sitk.Image) -> dict:
    return {"spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection())}


def _flipped_scan(seed: int = 5) -> sitk.Image:
    img, _ = phantom_ct(seed)
    img.SetDirection(FLIPPED)
    return img


@pytest.fixture(scope="module")
def registry(tmp_path_factory, train_dir, export_dir):  # noqa: F811
    """The tiny model registered as ``models:/masksam@champion`` in a fresh SQLite store."""
    import mlflow

    from masksam.components.register import register

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # the SQLite store keeps its artifacts under ./mlruns
        mlflow.set_tracking_uri(uri)
        ev = eval_summary_for(export_dir)
        (root / "eval.json").write_text(json.dumps(ev))
        register(train_dir, export_dir, root / "eval.json")
        yield uri
    mlflow.set_tracking_uri(previous)


def _load(registry_uri: str):
    """``mlflow.pyfunc.load_model("models:/masksam@champion")``, leaving sys.path as it was
    (MLflow prepends the model's shipped code to it)."""
    import mlflow

    path = list(sys.path)
    mlflow.set_tracking_uri(registry_uri)
    try:
        return mlflow.pyfunc.load_model("models:/masksam@champion")
    finally:
        sys.path[:] = path


@pytest.fixture(scope="module")
def model(registry):
    return _load(registry)


def _refused(exc_info, *words: str) -> str:
    """The refusal is an MlflowException with INVALID_PARAMETER_VALUE (HTTP 400 over REST) and a
    UserError, and its message names ``words``."""
    err = exc_info.value
    assert isinstance(err, MlflowException) and err.error_code == "INVALID_PARAMETER_VALUE"
    assert isinstance(err, UserError)
    for word in words:
        assert word in err.message, (word, err.message)
    return err.message


# ---------------------------------------------------------------------------------- Python calls

def test_registered_model_serves_without_torch(registry, tmp_path):
    """``mlflow.pyfunc.load_model`` of the registered model (its shipped code, its pip
    requirements) predicts in a process where torch cannot be imported, and none of torch,
    torchvision or segment-anything is loaded; the requirements leave them out."""
    import mlflow

    code = (
        "import importlib.abc, json, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'segment_anything'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mlflow, numpy as np\n"
        "m = mlflow.pyfunc.load_model('models:/masksam@champion')\n"
        "x = np.full((10, 24, 28), -1000.0, np.float32); x[2:8, 6:18, 6:22] = 40.0\n"
        "y = m.predict(x, params={'spacing': [1.5, 1.7, 3.0], 'origin': [0.0, 0.0, 0.0],\n"
        "              'direction': [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]})\n"
        "print(json.dumps({'shape': list(y.shape), 'loaded': sorted(k for k in sys.modules\n"
        "      if k.split('.')[0] in ('torch', 'torchvision', 'segment_anything'))}))\n")
    root = Path(registry.removeprefix("sqlite:///")).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"shape": [10, 24, 28], "loaded": []}
    mlflow.set_tracking_uri(registry)
    reqs = Path(mlflow.artifacts.download_artifacts("models:/masksam@champion/requirements.txt",
                                                    dst_path=str(tmp_path))).read_text()
    for name in ("torch", "torchvision", "segment-anything"):
        assert not any(line.split("==")[0].strip() == name for line in reqs.splitlines()), reqs
    assert "onnxruntime" in reqs


def test_predictor_from_the_registry_matches_the_export(registry, export_dir, tmp_path, monkeypatch):  # noqa: F811
    from masksam.components.predictor import Predictor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    sitk.WriteImage(_flipped_scan(3), str(tmp_path / "scan.nii.gz"))
    pulled = Predictor.load("models:/masksam@champion", device="cpu")
    assert pulled.source == "models:/masksam@champion" and pulled.backend == "onnxruntime"
    local = Predictor.from_onnx(export_dir / "model.onnx", device="cpu")
    a = sitk.GetArrayFromImage(pulled.predict_files(tmp_path / "scan.nii.gz").labels)
    b = sitk.GetArrayFromImage(local.predict_files(tmp_path / "scan.nii.gz").labels)
    np.testing.assert_array_equal(a, b)
    # and a prediction names the version the alias resolved to and the ONNX file's sha256
    from masksam.components.predict import predict

    (outcome,) = predict(tmp_path / "scan.nii.gz", tmp_path / "out", pulled, progress=False)
    summary = json.loads((tmp_path / "out" / "scan.json").read_text())
    sidecar = json.loads((export_dir / "model.onnx.json").read_text())
    version = summary["model_version"]
    assert (version["name"], version["alias"], version["resolved_uri"]) == (
        "masksam", "champion", f"models:/masksam/{version['version']}")
    assert version["onnx_sha256"] == sidecar["files"]["model.onnx"] == summary["model_sha256"]["model.onnx"]


def test_readme_call_on_flipped_scan_matches_masksam_predict(tmp_path, model, export_dir):  # noqa: F811
    from masksam.components.predict import predict

    sitk.WriteImage(_flipped_scan(), str(tmp_path / "scan.nii.gz"))
    # the README's call, word for word
    image = sitk.ReadImage(str(tmp_path / "scan.nii.gz"))
    labels = model.predict(sitk.GetArrayFromImage(image).astype("float32"),
                           params={"spacing": list(image.GetSpacing()),
                                   "origin": list(image.GetOrigin()),
                                   "direction": list(image.GetDirection())})
    assert np.allclose(image.GetDirection(), FLIPPED)
    out = predict(tmp_path / "scan.nii.gz", tmp_path / "pred", export_dir / "model.onnx", device="cpu",
                  progress=False)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(out[0].output)))
    assert labels.dtype == np.uint8 and labels.shape == reference.shape
    assert np.array_equal(labels, reference)
    assert len(np.unique(reference)) > 1  # a real segmentation, not an empty map
    # the README's former call (spacing only) is refused, naming what is missing
    with pytest.raises(MlflowException) as exc:
        model.predict(sitk.GetArrayFromImage(image).astype("float32"),
                      params={"spacing": list(image.GetSpacing())})
    _refused(exc, "origin", "direction")


@pytest.mark.parametrize("missing", [("spacing",), ("origin",), ("direction",), ("origin", "direction"),
                                     ("spacing", "origin", "direction")])
def test_missing_geometry_refused_by_name(model, missing):
    img = _flipped_scan()
    params = {k: v for k, v in _geometry(img).items() if k not in missing}
    with pytest.raises(MlflowException) as exc:
        model.predict(sitk.GetArrayFromImage(img).astype(np.float32), params=params or None)
    message = _refused(exc, *missing)
    assert message.startswith("params " + ", ".join(missing) + " missing"), message


def test_direction_must_be_a_rotation(model):
    img = _flipped_scan()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    for direction in ([1, 0, 0, 0, 2, 0, 0, 0, 1],          # scaled axis
                      [1, 0, 0, 0, 1, 0, 0, 0, 0],          # singular
                      [1, 0.2, 0, 0, 1, 0, 0, 0, 1],        # sheared
                      [1, 0, 0, 0, 1, 0],                   # six numbers
                      [1, 0, 0, 0, float("nan"), 0, 0, 0, 1]):
        with pytest.raises(MlflowException) as exc:
            model.predict(arr, params={**_geometry(img), "direction": direction})
        _refused(exc, "params['direction']")
    swapped = {**_geometry(img), "direction": [0, 1, 0, 1, 0, 0, 0, 0, 1]}  # det -1, orthonormal
    assert model.predict(arr, params=swapped).shape == arr.shape


@pytest.mark.parametrize("change, words", [
    ({"spacing": [0.0, 1.7, 3.0]}, ["params['spacing']", "spacing"]),
    ({"spacing": [1.5, float("nan"), 3.0]}, ["params['spacing']"]),
    ({"origin": [0.0, float("inf"), 0.0]}, ["params['origin']", "finite"]),
    ({"overlap": 1.0}, ["params['overlap']"]),
    ({"nan_voxel": True}, ["model_input", "NaN"]),
    ({"inf_voxel": True}, ["model_input", "NaN or inf"]),
])
def test_bad_values_refused_with_named_error(model, change, words):
    img = _flipped_scan()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if change.pop("nan_voxel", False):
        arr[2, 3, 4] = np.nan
    if change.pop("inf_voxel", False):
        arr[0, 0, 0] = np.inf
    with pytest.raises(MlflowException) as exc:
        model.predict(arr, params={**_geometry(img), **change})
    _refused(exc, *words)


def test_default_size_limit_passes_512x512x300_refuses_600x512x512(model, monkeypatch):
    check_size((300, 512, 512), DEFAULT_MAX_VOXELS)
    img = _flipped_scan()
    huge = np.broadcast_to(np.float32(0.0), (600, 512, 512))  # 157 M voxels, no memory behind it
    model.unwrap_python_model()._segment = _no_work
    try:
        start = time.perf_counter()
        with pytest.raises(MlflowException) as exc:
            model.predict(huge, params=_geometry(img))
        assert time.perf_counter() - start < 3.0
    finally:
        del model.unwrap_python_model()._segment
    _refused(exc, "157,286,400", f"{DEFAULT_MAX_VOXELS:,}", "413", MAX_VOXELS_ENV)
    assert exc.value.error_class == "REQUEST_TOO_LARGE"


def _no_work(*args, **kwargs):
    raise AssertionError("the model started working on an input it should have refused")


def test_size_limit_from_environment_at_load(registry, monkeypatch):
    img = _flipped_scan()  # 28 x 24 x 10 = 6720 voxels
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    monkeypatch.setenv(MAX_VOXELS_ENV, "6000")
    small = _load(registry)
    with pytest.raises(MlflowException) as exc:
        small.predict(arr, params=_geometry(img))
    _refused(exc, "6,720", "6,000")
    monkeypatch.setenv(MAX_VOXELS_ENV, "6720")
    assert _load(registry).predict(arr, params=_geometry(img)).shape == arr.shape
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(Exception, match=MAX_VOXELS_ENV):
        _load(registry)


# ------------------------------------------------- REST, in process: MLflow's app behind the guard

def _post(app, body: bytes, content_type: bytes = b"application/json", chunk: int = 65536,
          length: int | None = None) -> tuple[int, dict | bytes]:
    """POST ``body`` to ``/invocations`` of an ASGI ``app`` in chunks, as uvicorn delivers it."""
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", content_type),
                         (b"content-length", str(len(body) if length is None else length).encode())]}
    sent: list[dict] = []

    async def receive():
        if chunks:
            part = chunks.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(chunks)}
        await asyncio.sleep(3600)  # the client stays connected until the response is sent

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


class _Spy:
    """Wraps MLflow's app to record whether a request reached it (i.e. was parsed)."""

    def __init__(self, app) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def guarded(registry):
    """The app `masksam serve` runs, for the model loaded with MASKSAM_MAX_VOXELS=20000."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MAX_VOXELS_ENV, "20000")
        loaded = _load(registry)
    guard = serve_mod.build_app(loaded, max_values=20000, max_bytes=serve_mod.max_request_bytes(20000))
    guard.app = _Spy(guard.app)
    guard.model = loaded
    return guard


def _body(arr: np.ndarray, params: dict) -> bytes:
    return json.dumps({"inputs": arr.tolist(), "params": params}).encode()


def _no_trace(reply) -> None:
    text = json.dumps(reply) if isinstance(reply, dict) else reply.decode()
    assert "stack_trace" not in text and "Traceback" not in text and 'File "' not in text


def test_rest_correct_call_and_missing_params_400(model, guarded):
    img = _flipped_scan()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    status, reply = _post(guarded, _body(arr, _geometry(img)))
    assert status == 200
    assert np.array_equal(np.asarray(reply["predictions"]), model.predict(arr, params=_geometry(img)))
    for missing in ("spacing", "direction"):
        params = {k: v for k, v in _geometry(img).items() if k != missing}
        status, reply = _post(guarded, _body(arr, params))
        assert status == 400 and reply["error_code"] == "INVALID_PARAMETER_VALUE"
        assert reply["message"].startswith(f"params {missing} missing"), reply["message"]
        _no_trace(reply)
    status, reply = _post(guarded, _body(arr, {**_geometry(img), "spacing": [0, 1, 1]}))
    assert status == 400 and "params['spacing']" in reply["message"]
    arr[1, 2, 3] = np.nan
    status, reply = _post(guarded, _body(arr, _geometry(img)))  # json.dumps writes NaN
    assert status == 400 and "model_input" in reply["message"] and "NaN" in reply["message"]


def test_rest_oversize_refused_413_before_parsing(guarded):
    img = _flipped_scan()
    body = _body(np.zeros((40, 40, 40), np.float32), _geometry(img))  # 64,000 values > 20,000
    before = guarded.app.calls
    start = time.perf_counter()
    status, reply = _post(guarded, body)
    assert time.perf_counter() - start < 3.0
    assert status == 413 and "20,000" in reply["message"] and MAX_VOXELS_ENV in reply["message"]
    assert guarded.app.calls == before  # MLflow's app never saw it: nothing was parsed
    # a Content-Length over the byte limit is refused unread
    status, reply = _post(guarded, b"", length=10 ** 10)
    assert status == 413 and "10,000,000,000 bytes" in reply["message"]
    assert guarded.app.calls == before
    # just over the limit by less than the params' slack: the pyfunc's exact check, also 413
    status, reply = _post(guarded, _body(np.zeros((23, 29, 30), np.float32), _geometry(img)))
    assert status == 413 and "20,010" in reply["message"]
    _no_trace(reply)


def test_rest_unexpected_error_has_no_stack_trace(guarded):
    img = _flipped_scan()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    python_model = guarded.model.unwrap_python_model()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside the model")

    python_model._segment = broken
    try:
        status, reply = _post(guarded, _body(arr, _geometry(img)))
    finally:
        del python_model._segment
    assert status == 400
    _no_trace(reply)
    assert "RuntimeError: simulated failure inside the model" in reply["message"]


def test_rest_only_json(guarded):
    status, reply = _post(guarded, b"a,b\n1,2\n", content_type=b"text/csv")
    assert status == 415 and "application/json" in reply["message"]


def test_clean_error_drops_trace_and_input_echo():
    body = json.dumps({"error_code": "BAD_REQUEST", "stack_trace": "Traceback ...\nValueError: x",
                       "message": "Failed to predict data '[[1.0, 2.0]]'. \nError: params spacing missing"})
    cleaned, too_large = serve_mod.clean_error(body.encode())
    reply = json.loads(cleaned)
    assert "stack_trace" not in reply and not too_large
    assert reply["message"] == "params spacing missing (ValueError: x)"
    long = json.dumps({"error_code": "BAD_REQUEST", "message": "x" * 10 ** 6}).encode()
    assert len(serve_mod.clean_error(long)[0]) < 3 * serve_mod.MAX_MESSAGE


# ----------------------------------------------------------------- REST, a real `masksam serve`

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _http_post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_masksam_serve_real_server(tmp_path, registry, model):
    port = _free_port()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry, "MASKSAM_DEVICE": "cpu", MAX_VOXELS_ENV: "20000",
           "TMPDIR": str(tmp_path / "tmp")}
    masksam = str(Path(sys.executable).with_name("masksam"))
    proc = subprocess.Popen([masksam, "serve", "-m", "models:/masksam@champion", "-p", str(port)],
                            env=env, cwd=tmp_path, stdout=open(tmp_path / "serve.log", "w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < end, "masksam serve did not start"
                time.sleep(1)
        img = _flipped_scan()
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        status, reply = _http_post(f"{url}/invocations", _body(arr, _geometry(img)))
        assert status == 200
        assert np.array_equal(np.asarray(reply["predictions"]), model.predict(arr, params=_geometry(img)))
        status, reply = _http_post(f"{url}/invocations",
                                   _body(arr, {k: v for k, v in _geometry(img).items() if k != "spacing"}))
        assert status == 400 and reply["message"].startswith("params spacing missing")
        _no_trace(reply)

        rss = _rss_mb(proc.pid)
        # 64,000 values: over the voxel limit, refused while it streams in
        status, reply = _http_post(f"{url}/invocations", _body(np.zeros((40, 40, 40), np.float32),
                                                                _geometry(img)))
        assert status == 413 and "64,0" in reply["message"] and "20,000" in reply["message"]
        # 3 M values (~15 MB of JSON, over the byte limit too): the client, which sends it all
        # before reading, still gets a 413 answer; nothing of the body is kept
        big = _body(np.zeros((30, 316, 316), np.float32), _geometry(img))
        start = time.perf_counter()
        status, reply = _http_post(f"{url}/invocations", big)
        assert time.perf_counter() - start < 5.0
        assert status == 413 and "bytes" in reply["message"] and MAX_BYTES_ENV in reply["message"]
        assert _rss_mb(proc.pid) - rss < 40, (rss, _rss_mb(proc.pid))
        # 10 GB announced by a client that waits for "100 Continue" (as curl does): 413 at once,
        # before any byte of the body is sent
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            start = time.perf_counter()
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Expect: 100-continue\r\nContent-Length: 10000000000\r\n\r\n")
            head = s.recv(4096)
            assert time.perf_counter() - start < 2.0
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        urllib.request.urlopen(f"{url}/ping", timeout=5)  # still serving
        assert list((tmp_path / "tmp").glob("masksam-serve-*"))  # the pulled, verified model
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not list((tmp_path / "tmp").glob("masksam-serve-*"))  # removed on SIGTERM


def test_file_requests_base64_and_mounted_path(model, tmp_path, export_dir, monkeypatch):  # noqa: F811
    """A NIfTI file's bytes (base64) or a path under MASKSAM_FILE_ROOT in, the label file (same
    format) and the summary out: the same labels as masksam predict on that file."""
    import base64

    from masksam.components.predict import predict

    scan = tmp_path / "scans" / "ct.nii.gz"
    scan.parent.mkdir()
    sitk.WriteImage(_flipped_scan(3), str(scan))
    (outcome,) = predict(scan, tmp_path / "ref", export_dir, progress=False, viewer_files=False)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(outcome.output)))
    dummy = np.zeros((1, 1, 1), np.float32)
    answer = model.predict(dummy, params={"file_b64": base64.b64encode(scan.read_bytes()).decode()})
    assert answer["format"] == ".nii.gz" and set(answer["structures"]) >= {"liver", "spleen"}
    (tmp_path / "labels.nii.gz").write_bytes(base64.b64decode(answer["labels_b64"]))
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    assert labels.GetDirection() == sitk.ReadImage(str(scan)).GetDirection()
    # a path only under the root the server mounts, never elsewhere
    with pytest.raises(MlflowException) as exc:
        model.predict(dummy, params={"file_path": str(scan)})
    _refused(exc, "MASKSAM_FILE_ROOT")
    monkeypatch.setenv("MASKSAM_FILE_ROOT", str(scan.parent))
    by_path = model.predict(dummy, params={"file_path": "ct.nii.gz"})
    assert by_path["labels_b64"] == answer["labels_b64"]
    for bad in ("../ref/ct.nii.gz", str(tmp_path / "labels.nii.gz")):
        with pytest.raises(MlflowException) as exc:
            model.predict(dummy, params={"file_path": bad})
        _refused(exc, "no such file under")
    with pytest.raises(MlflowException) as exc:
        model.predict(dummy, params={"file_b64": "not base64!"})
    _refused(exc, "base64")
    with pytest.raises(MlflowException) as exc:
        model.predict(dummy, params={"file_b64": base64.b64encode(b"hello").decode()})
    _refused(exc, "NIfTI")
