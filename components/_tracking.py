"""MLflow tracking shared by the steps: reachability check, retried logging, lineage tags.

Three rules shape this module:

- An unreachable tracking server fails the step *at start* with a UserError (a quick probe
  with no retries and a short timeout), not after hours of training.
- Once running, every call of a :class:`RunLogger` is bounded: MLflow's own HTTP retries (7,
  exponential backoff, 120 s timeouts: minutes per call) are switched off for it, and the call
  is retried here with short backoff until ``timeout_s`` has passed. A store that stays
  unreachable that long raises :class:`TrackingUnavailable`, so training can save its
  checkpoint and stop with a ``--resume`` hint instead of hanging. A refusal by a store that
  did answer (an HTTP 4xx: invalid value, deleted run) is logged as a warning and the step
  goes on: retrying cannot help and the work is worth more than one lost metric.
- Metric names go through :func:`metric_name` / :func:`unique_metric_names`, so a label name
  MLflow would refuse ("kidney (left)") cannot make it drop a whole batch.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; MLflow 3's default, ``sqlite:///mlflow.db``
in the working directory, is used when it is unset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import time
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from masksam.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_TRACKING_TIMEOUT_S = 120.0
_ATTEMPT_TIMEOUT_S = 30      # one HTTP request never waits longer than this
_MAX_BACKOFF_S = 10.0
_MAX_KEY_LENGTH = 250        # MLflow's limit on metric, param and tag keys
_T = TypeVar("_T")


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@contextlib.contextmanager
def temporary_env(**values: str) -> Iterator[None]:
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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (MLflow's run to pages), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


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
    with temporary_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(max(timeout_s, 1))),
              MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0"):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # connection refused, DNS, timeout, bad scheme, locked DB...
            raise UserError(
                f"MLflow tracking server {uri} cannot be reached ({first_line(exc)}). Start it, fix "
                "MLFLOW_TRACKING_URI, or unset it to log to the local sqlite:///mlflow.db"
            ) from exc
    return uri


class TrackingUnavailable(UserError):
    """The tracking store stayed unreachable for a whole bounded wait (see :func:`bounded_call`)."""

    def __init__(self, uri: str, waited_s: float, what: str, cause: BaseException) -> None:
        self.uri, self.waited_s, self.what = uri, waited_s, what
        super().__init__(f"MLflow tracking server {uri} was unreachable for {waited_s:.0f} s "
                         f"({what}: {first_line(cause)})")


def _is_refusal(exc: BaseException) -> bool:
    """True for an answer of the store that retrying cannot change (HTTP 4xx but 408/429)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def _http_limits(timeout_s: float) -> contextlib.AbstractContextManager:
    """MLflow HTTP settings for one attempt: no retries of its own, at most ``timeout_s``."""
    return temporary_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
                MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, math.ceil(min(timeout_s, _ATTEMPT_TIMEOUT_S)))))


def bounded_call(fn: Callable[..., _T], *args: Any, uri: str, timeout_s: float, what: str,
                 backoff_s: float = 0.5, **kwargs: Any) -> _T:
    """Call ``fn`` until it succeeds, retrying for at most ``timeout_s`` seconds in all.

    Each attempt runs with MLflow's HTTP retries off and a request timeout no longer than the
    time left, so the whole call ends within about ``timeout_s`` + 1 s. A refusal by the store
    (:func:`_is_refusal`) is raised at once; anything else (connection refused, timeouts, 5xx,
    a locked database) is retried, then raised as :class:`TrackingUnavailable`.
    """
    start = time.monotonic()
    delay = backoff_s
    while True:
        left = timeout_s - (time.monotonic() - start)
        try:
            with _http_limits(left):
                return fn(*args, **kwargs)
        except Exception as exc:
            if _is_refusal(exc):
                raise
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise TrackingUnavailable(uri, waited, what, exc) from exc
            if delay == backoff_s:
                log.warning("%s: MLflow at %s did not answer (%s); retrying for up to %.0f s",
                            what, uri, first_line(exc, 200), timeout_s)
            time.sleep(min(delay, max(timeout_s - waited, 0.0)))
            delay = min(delay * 2, _MAX_BACKOFF_S)


def metric_name(text: str) -> str:
    """One part of an MLflow metric key: characters MLflow refuses become ``_``.

    MLflow accepts letters and digits (Unicode ones too), ``_ - . :`` and spaces in a part
    (``/`` separates parts, so it is replaced as well). The text is NFC-normalised first so
    the same label typed two ways gives one key.
    """
    clean = re.sub(r"[^\w\-. :]", "_", unicodedata.normalize("NFC", str(text)))
    if set(clean) <= {"."}:  # "", "." and ".." would make the key a path MLflow refuses
        clean = "_" * max(len(clean), 1)
    return clean


def unique_metric_names(names: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """``{name: metric_name(name)}``, with distinct names kept distinct.

    A name that :func:`metric_name` changes and whose result collides with another name's,
    and any name whose key is ``reserved``, gets ``_`` + the first 8 hex digits of its sha256:
    a suffix that depends on the name alone, so a class keeps its key from run to run. Keys
    too long for MLflow (250 characters with a prefix) are cut and suffixed the same way.
    """
    names = list(dict.fromkeys(str(n) for n in names))
    clean = {n: metric_name(n) for n in names}
    taken = set(reserved)
    counts: dict[str, int] = {}
    for key in clean.values():
        counts[key] = counts.get(key, 0) + 1
    out = {}
    for name, key in clean.items():
        clash = (key != name and counts[key] > 1) or key in taken
        if clash or len(key) > _MAX_KEY_LENGTH - 20:
            key = f"{key[: _MAX_KEY_LENGTH - 30]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        out[name] = key
    if len(set(out.values()) | taken) != len(out) + len(taken):
        raise ValueError(f"metric names {sorted(out)} do not sanitise to distinct keys: {out}")
    return out


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


# The experiment's kind as MLflow 3 records it (its UI reads it to pick tabs and hints). Which view
# a browser opens on (GenAI or "Model training") is a per-browser setting of MLflow 3.17's UI,
# GenAI by default, whatever this tag says: the links masksam prints carry the
# ``workflowType=machine_learning`` query that selects the runs view (:func:`ui_url`; seen in
# headless Chromium by scripts/mlflow_ui_check.py).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_DESCRIPTION = ("MaskSAM: prompt-free SAM for 3D medical image segmentation. Training runs "
                          "(learning curves, overlays, test metrics, the logged ONNX model) and "
                          "their registered versions.")


def ensure_experiment(client, name: str) -> str:
    """The id of experiment ``name`` (created if missing), tagged as a model-training experiment
    (so the UI opens on its runs) with a description unless it already has one."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    tags = dict(exp.tags) if exp else {}
    if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if not tags.get("mlflow.note.content"):
        client.set_experiment_tag(exp_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
    return exp_id


UI_VIEW_QUERY = "workflowType=machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"


def ui_url(uri: str, route: str) -> str:
    """A link into the MLflow UI for ``route`` (e.g. ``experiments/1/runs/ID``, ``models/NAME/
    versions/3``) that opens on the model-training view. For an http(s) tracking server the link
    is on that server; for a local store it is on ``mlflow ui --backend-store-uri URI``'s
    default address (:func:`ui_hint` says so)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI
    return f"{base}/#/{route.strip('/')}?{UI_VIEW_QUERY}"


def ui_hint(uri: str, route: str) -> str:
    """One line telling where to look at ``route``: the link, preceded for a local store by the
    command that serves the UI over it."""
    link = ui_url(uri, route)
    if uri.startswith(("http://", "https://")):
        return link
    return f"`mlflow ui --backend-store-uri {uri}`, then {link}"


def run_context_tags(command: str, tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow's standard run tags, as ``mlflow.start_run`` sets them (user, source type), with
    the source named after the masksam verb and the project's git commit, plus ``tags``."""
    from mlflow.tracking.context.registry import resolve_tags

    resolved = dict(resolve_tags(dict(tags or {})))
    resolved["mlflow.source.name"] = command
    if os.environ.get("KFP_POD_NAME") or os.environ.get("KUBERNETES_SERVICE_HOST"):
        resolved["mlflow.source.type"] = "JOB"
    commit = git_commit()
    if commit and commit != "unknown":
        resolved.setdefault("mlflow.source.git.commit", commit.removesuffix("-dirty"))
    return {k: str(v) for k, v in resolved.items()}


def dataset_input(raw_dir: str | os.PathLike, context: str = "training"):
    """The raw dataset as an MLflow run input (``mlflow.data``): its folder as source, the
    dataset.json name, and the manifest's ``dataset_sha256`` as digest (cut to MLflow's 36
    characters; the full hash is the run's ``data.dataset_sha256`` tag). None when the folder
    has no manifest (``masksam data manifest`` writes it)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    raw = Path(raw_dir)
    try:
        manifest = json.loads((raw / "manifest.json").read_text())
        name = str(json.loads((raw / "dataset.json").read_text()).get("name") or raw.name)
    except (OSError, ValueError):
        return None
    digest = str(manifest.get("dataset_sha256") or "")[:36]
    if not digest:
        return None
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local folders
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(raw.resolve()))
    dataset = MetaDataset(source, name=name, digest=digest)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


class RunLogger:
    """One MLflow run whose every call is bounded (:func:`bounded_call`). ``enabled=False`` does
    nothing (non-zero ranks of a distributed run, or ``--no-mlflow``).

    The first call that outlives ``timeout_s`` raises :class:`TrackingUnavailable` and sets
    :attr:`failure`; from then on metrics are only kept in :attr:`unlogged` (no more waiting),
    so the caller can save them with its checkpoint and :meth:`flush` them when it resumes.
    """

    def __init__(self, uri: str | None = None, experiment: str = "masksam", enabled: bool = True,
                 timeout_s: float = DEFAULT_TRACKING_TIMEOUT_S, backoff_s: float = 0.5) -> None:
        if not timeout_s > 0:
            raise UserError(f"the tracking timeout must be a positive number of seconds, got {timeout_s}")
        self.enabled = enabled
        self.timeout_s, self.backoff_s = float(timeout_s), backoff_s
        self.uri = tracking_uri(uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self.failure: TrackingUnavailable | None = None
        self.unlogged: list[dict[str, Any]] = []
        self._client = None

    def _call(self, fn: Callable[..., _T], *args: Any, what: str, **kwargs: Any) -> _T | None:
        """``fn(*args)``, bounded; a refusal by the store is a warning, an outage is raised."""
        if self.failure is not None:
            raise self.failure
        try:
            return bounded_call(fn, *args, uri=self.uri, timeout_s=self.timeout_s, what=what,
                                backoff_s=self.backoff_s, **kwargs)
        except TrackingUnavailable as exc:
            self.failure = exc
            raise
        except Exception as exc:  # the store answered and refused: one lost item, not the run
            log.warning("%s failed after 1 attempt (refused by %s), continuing without it: %s",
                        what, self.uri, first_line(exc))
            return None

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
                bounded_call(self.client.update_run, run_id, status="RUNNING", uri=self.uri,
                             timeout_s=self.timeout_s, what="reopen run", backoff_s=self.backoff_s)
                self.run_id = run_id
            except TrackingUnavailable:
                raise
            except Exception as exc:
                log.warning("cannot reopen MLflow run %s (%s); starting a new run", run_id, first_line(exc))
        if self.run_id is None:
            exp_id = self._call(ensure_experiment, self.client, self.experiment, what="get experiment")
            if exp_id is None:
                raise UserError(f"MLflow at {self.uri} refused to create experiment {self.experiment!r}; "
                                "pick another --experiment")
            context = run_context_tags(f"masksam {run_name.split('-')[0]}")
            run = self._call(self.client.create_run, exp_id, run_name=run_name, tags=context,
                             what="create run")
            if run is None:
                raise UserError(f"MLflow at {self.uri} refused to create a run in experiment "
                                f"{self.experiment!r} (is it deleted? restore it or pick another --experiment)")
            self.run_id = run.info.run_id
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, self.run_id, tags=items[i:i + 100], synchronous=True,
                       what="set tags")
        return self.run_id

    def log_dataset(self, raw_dir: str | os.PathLike | None, context: str = "training") -> None:
        """Log the raw dataset as the run's input (:func:`dataset_input`), if it has a manifest."""
        if not self.run_id or raw_dir is None:
            return
        entry = dataset_input(raw_dir, context)
        if entry is None:
            log.warning("%s: no manifest.json, so the dataset is not logged as the run's input "
                        "(write one with masksam data manifest)", raw_dir)
            return
        self._call(self.client.log_inputs, self.run_id, datasets=[entry], what="log dataset input")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params in batches of 100 (MLflow's limit). Values already logged are kept."""
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        existing = self._existing_params()
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, self.run_id, params=items[i:i + 100], synchronous=True,
                       what="log params")

    def _existing_params(self) -> dict[str, str]:
        run = self._call(self.client.get_run, self.run_id, what="get run")
        return dict(run.data.params) if run else {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's metrics (NaN dropped) synchronously. After an outage they are only
        kept in :attr:`unlogged`, with their time, for :meth:`flush`."""
        if not self.run_id:
            return
        values = {str(k): float(v) for k, v in metrics.items() if v == v}  # drop NaN
        if not values:
            return
        entry = {"step": int(step), "timestamp": int(time.time() * 1000), "metrics": values}
        if self.failure is not None:
            self.unlogged.append(entry)
            return
        try:
            self._log_entry(entry)
        except TrackingUnavailable:
            self.unlogged.append(entry)
            raise

    def _log_entry(self, entry: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, entry["timestamp"], entry["step"]) for k, v in entry["metrics"].items()]
        self._call(self.client.log_batch, self.run_id, metrics=items, synchronous=True, what="log metrics")

    def flush(self) -> None:
        """Log the metrics kept in :attr:`unlogged` (a resumed run's backlog), oldest first."""
        while self.run_id and self.unlogged:
            self._log_entry(self.unlogged[0])
            self.unlogged.pop(0)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id and Path(path).exists():
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path, what=f"log artifact {path}")

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id and Path(path).is_dir():
            self._call(self.client.log_artifacts, self.run_id, str(path), artifact_path, what=f"log artifacts {path}")

    def ui_link(self) -> str | None:
        """Where to look at this run in the MLflow UI (:func:`ui_hint`), or None without a run."""
        if not self.run_id or self.failure is not None:
            return None
        try:
            run = self._call(self.client.get_run, self.run_id, what="get run")
        except TrackingUnavailable:
            return None  # a link is never worth failing a run for; the outage is reported elsewhere
        if run is None:
            return None
        return ui_hint(self.uri, f"experiments/{run.info.experiment_id}/runs/{self.run_id}")

    def set_tag(self, key: str, value: Any) -> None:
        if self.run_id:
            self._call(self.client.set_tag, self.run_id, key, str(value), what=f"set_tag {key}")

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._call(self.client.set_terminated, self.run_id, status, what="end run")
