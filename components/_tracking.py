"""MLflow tracking shared by the steps: reachability check, retried logging, lineage tags.

Two rules shape this module:

- An unreachable tracking server fails the step *at start* with a UserError (a quick probe
  with no retries and a short timeout), not after hours of training.
- Once running, a logging failure never kills the work: each call is retried with backoff,
  then a warning is logged and the step goes on.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; MLflow 3's default, ``sqlite:///mlflow.db``
in the working directory, is used when it is unset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from masksam.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_T = TypeVar("_T")


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (MLflow reads its HTTP settings per request)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(uri: str | None = None, timeout_s: float = 5.0) -> str:
    """Probe the tracking store once, quickly; raise UserError naming the URI if it fails.

    Returns the URI. For a SQLite URI the probe also creates the database (and its schema).
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.parent and not db.parent.exists():
            raise UserError(f"MLflow tracking URI {uri}: folder {db.parent} does not exist "
                            "(create it or set MLFLOW_TRACKING_URI)")
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(max(timeout_s, 1))),
              MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0"):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # connection refused, DNS, timeout, bad scheme, locked DB...
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"MLflow tracking server {uri} cannot be reached ({first}). Start it, fix "
                "MLFLOW_TRACKING_URI, or unset it to log to the local sqlite:///mlflow.db"
            ) from exc
    return uri


def retry(fn: Callable[..., _T], *args: Any, what: str = "MLflow call", attempts: int = 3,
          backoff_s: float = 1.0, **kwargs: Any) -> _T | None:
    """Call ``fn``; on failure retry with exponential backoff, then warn and return None."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # logging must never end a training run
            if attempt == attempts:
                log.warning("%s failed after %d attempts, continuing without it: %s", what, attempts, exc)
                return None
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:6000]
    return out


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The git commit of the source tree (suffixed ``-dirty`` with local changes), or "unknown"."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else (sha or "unknown")


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def dvc_lock_hashes(lock: str | os.PathLike = "dvc.lock") -> dict[str, str]:
    """``{output path: md5}`` of every stage output recorded in ``dvc.lock`` (empty if none)."""
    import yaml

    lock = Path(lock)
    if not lock.is_file():
        return {}
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        return {}
    out = {}
    for stage in (data.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            if isinstance(o, dict) and "path" in o and "md5" in o:
                out[str(o["path"])] = str(o["md5"])
    return out


def lineage_tags(plan: Mapping[str, Any] | None = None, raw_dir: str | os.PathLike | None = None,
                 data_paths: tuple[str, ...] = (), device: str = "cpu",
                 dvc_lock: str | os.PathLike = "dvc.lock") -> dict[str, str]:
    """Tags that say exactly what produced a run: code, data, machine and library versions.

    ``plan`` / ``raw_dir/manifest.json`` give the raw dataset's sha256; ``dvc.lock`` gives
    DVC's md5 of the stage outputs whose path is in ``data_paths`` (all of them if empty).
    """
    import torch

    import masksam

    tags = {
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device,
        "torch_version": torch.__version__,
        "masksam_version": masksam.__version__,
        "python_version": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        tags["segment_anything_version"] = version("segment-anything")
    except Exception:
        tags["segment_anything_version"] = "not installed"
    if device.startswith("cuda") and torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    ds_hash = _find_key(dict(plan), "dataset_sha256") if plan else None
    if raw_dir is not None and (Path(raw_dir) / "manifest.json").is_file():
        try:
            ds_hash = json.loads((Path(raw_dir) / "manifest.json").read_text()).get("dataset_sha256", ds_hash)
        except (OSError, json.JSONDecodeError):
            pass
    if ds_hash:
        tags["data.dataset_sha256"] = str(ds_hash)
    for path, md5 in dvc_lock_hashes(dvc_lock).items():
        if not data_paths or any(Path(path) == Path(p) for p in data_paths):
            tags[f"dvc.md5.{path}"] = md5
    return tags


class RunLogger:
    """One MLflow run, with every call retried and never fatal. ``enabled=False`` does nothing
    (non-zero ranks of a distributed run, or ``--no-mlflow``)."""

    def __init__(self, uri: str | None = None, experiment: str = "masksam", enabled: bool = True,
                 attempts: int = 3, backoff_s: float = 1.0) -> None:
        self.enabled = enabled
        self.attempts, self.backoff_s = attempts, backoff_s
        self.uri = tracking_uri(uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = None

    def _retry(self, fn, *args, what: str, **kwargs):
        return retry(fn, *args, what=what, attempts=self.attempts, backoff_s=self.backoff_s, **kwargs)

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def start(self, run_name: str, tags: Mapping[str, str] | None = None, run_id: str | None = None) -> str | None:
        """Start a run (or reopen ``run_id`` when resuming); returns the run id."""
        if not self.enabled:
            return None
        check_tracking(self.uri)
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            except Exception as exc:
                log.warning("cannot reopen MLflow run %s (%s); starting a new run", run_id, exc)
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        for k, v in (tags or {}).items():
            self._retry(self.client.set_tag, self.run_id, k, str(v)[:5000], what=f"set_tag {k}")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params in batches of 100 (MLflow's limit). Values already logged are kept."""
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        existing = self._existing_params()
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 100):
            self._retry(self.client.log_batch, self.run_id, params=items[i:i + 100], what="log params")

    def _existing_params(self) -> dict[str, str]:
        run = self._retry(self.client.get_run, self.run_id, what="get_run")
        return dict(run.data.params) if run else {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v == v]  # drop NaN
        if items:
            self._retry(self.client.log_batch, self.run_id, metrics=items, what="log metrics")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id and Path(path).exists():
            self._retry(self.client.log_artifact, self.run_id, str(path), artifact_path, what=f"log artifact {path}")

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id and Path(path).is_dir():
            self._retry(self.client.log_artifacts, self.run_id, str(path), artifact_path, what=f"log artifacts {path}")

    def set_tag(self, key: str, value: Any) -> None:
        if self.run_id:
            self._retry(self.client.set_tag, self.run_id, key, str(value), what=f"set_tag {key}")

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._retry(self.client.set_terminated, self.run_id, status, what="end run")
