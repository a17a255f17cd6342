"""Verify and open what a trained MaskSAM was saved as: training directory, ONNX file, MLflow URI.

:class:`masksam.components.predictor.Predictor` is built on these functions; nothing else turns
a model into predictions. Only files the project writes are loaded (safetensors weights, ONNX
graphs, JSON), never a pickle, and every file is checked before it is parsed:

- a training folder needs the completed ``train_summary.json`` of ``masksam train``; every sha256
  it records (weights, plan, ...) must match;
- an export folder's ``export_manifest.json`` fixes the sidecar's sha256, the sidecar fixes the
  ONNX files' (so neither the graph nor the plan's labels change unnoticed);
- a ``models:/`` URI is downloaded beside its destination and checked against the registry's
  ``manifest_sha256`` tag -> ``masksam_manifest.json`` -> every file of the MLflow model, none
  missing or added, before it is moved into place.

File names read from these records stay inside their folder (no absolute paths, ``..`` or links).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masksam.components._io import read_json, sha256_file
from masksam.components._tracking import first_line, temporary_env
from masksam.errors import UserError

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json
EXPORT_MANIFEST = "export_manifest.json"  # sha256 of every file masksam export wrote
MODEL_MANIFEST = "masksam_manifest.json"  # sha256 of every file of a registered MLflow model
DEVICES = ("auto", "cpu", "cuda", "tensorrt")

# What each --device asks ONNX Runtime for, best first. CPU stays last as the fallback for nodes
# an accelerator provider does not implement (ORT assigns those to the next provider).
DEVICE_PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class HashMismatch(UserError):
    """A model file differs from the sha256 recorded when it was written."""


# ----------------------------------------------------------------------------- hashes


def confined(directory: str | os.PathLike, name: str, what: str) -> Path:
    """``directory / name`` for a relative ``name`` that stays inside ``directory``.

    Names come from files an attacker or a corruption can change (sidecars, summaries,
    manifests): absolute paths, ``..`` parts and symlinks resolving outside are refused by name.
    """
    directory = Path(directory)
    rel = Path(str(name))
    if not str(name) or rel.is_absolute() or "\\" in str(name) or ".." in rel.parts:
        raise UserError(f"{what}: file entry {name!r} is not a plain relative path inside "
                        f"{directory}; refusing the model (re-export or re-download it)")
    path = directory / rel
    root = directory.resolve()
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        raise UserError(f"{what}: file entry {name!r} is a link or leads outside {directory}; refusing "
                        "the model (re-export or re-download it)")
    return path


def verify_files(directory: str | os.PathLike, expected: dict[str, str], what: str) -> dict[str, str]:
    """Check each ``name -> sha256`` in ``expected`` under ``directory``; raise on any mismatch.

    Returns the verified mapping. Names must stay inside ``directory`` (:func:`confined`). A
    missing file is an error as well: a model that lost its external-data file would otherwise
    fail later with a less helpful message.
    """
    directory = Path(directory)
    if not isinstance(expected, dict):
        raise UserError(f"{what}: its file list is not a {{name: sha256}} mapping; re-export the model")
    for name, want in expected.items():
        path = confined(directory, name, what)
        if not path.is_file():
            raise UserError(f"{path}: listed in {what} but missing; re-export or re-download the model")
        got = sha256_file(path)
        if got != want:
            raise HashMismatch(
                f"{path}: sha256 {got[:16]}... does not match {str(want)[:16]}... recorded in {what}; "
                "the file was modified or corrupted after it was written. Refusing to load it: "
                "re-export (masksam export) or re-download (masksam pull) the model"
            )
    return dict(expected)


def folder_hashes(folder: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``folder`` (links refused)."""
    folder = Path(folder)
    hashes: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise UserError(f"{path}: a symbolic link inside a model folder; refusing it")
        if path.is_file() and rel not in exclude:
            hashes[rel] = sha256_file(path)
    return hashes


def write_manifest(folder: str | os.PathLike, name: str = EXPORT_MANIFEST,
                   exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Write ``folder/name`` recording the sha256 of every other file of ``folder`` (but
    ``exclude``); return the ``{relative path: sha256}`` written."""
    from masksam.components._io import write_json

    files = folder_hashes(folder, exclude=(name, *exclude))
    write_json(Path(folder) / name, {"format_version": 1, "algorithm": "sha256", "files": files})
    return files


def read_manifest(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, str]:
    """The ``{name: sha256}`` of a manifest written by :func:`write_manifest`; with
    ``expected_sha256`` (a registry tag) the manifest file itself is checked first."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; the model was not written by this version of "
                        "masksam export/register: re-export or re-register it")
    if expected_sha256 is not None:
        got = sha256_file(path)
        if got != expected_sha256:
            raise HashMismatch(f"{path}: sha256 {got[:16]}... differs from {expected_sha256[:16]}... "
                               "recorded in the registry; the model was altered in the artifact "
                               "store after registration. Refusing it")
    data = read_json(path, "manifest")
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise UserError(f"{path}: not a masksam manifest (no files: {{name: sha256}})")
    return files


def verify_folder(folder: str | os.PathLike, manifest: str | os.PathLike, files: dict[str, str],
                  exact: bool, allowed_extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Check ``folder`` against a manifest's ``files``; with ``exact`` also refuse any file the
    manifest does not list (an added module would run as well as a changed one)."""
    verified = verify_files(folder, files, str(manifest))
    if exact:
        present = set(folder_hashes(folder, exclude=(Path(manifest).name, *allowed_extra)))
        extra = sorted(present - set(files))
        if extra:
            raise HashMismatch(f"{folder}: holds files {extra[:5]} that {manifest} does not list; "
                               "the model was altered after it was written. Refusing it")
    return verified


def verify_export(onnx_path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Verify an exported model before anything of it is parsed; return (sidecar, verified).

    The folder's manifest (written by ``masksam export``, shipped beside the ONNX file by
    ``masksam register``) fixes the sidecar's sha256; the sidecar fixes the ONNX files'. So
    neither the graph nor the plan (labels, spacing, normalisation) can change unnoticed.
    """
    onnx_path = Path(onnx_path)
    folder, side = onnx_path.parent, sidecar_path(onnx_path)
    if not side.is_file():
        raise _no_sidecar(onnx_path)
    manifest_path = folder / EXPORT_MANIFEST
    manifest = read_manifest(manifest_path)
    for name in (side.name, onnx_path.name):
        if name not in manifest:
            raise UserError(f"{manifest_path}: records no sha256 for {name}; re-export the model")
    verified = verify_files(folder, {side.name: manifest[side.name]}, str(manifest_path))
    meta = read_sidecar(onnx_path)
    files = meta["files"]
    if not isinstance(files, dict) or onnx_path.name not in files:
        raise UserError(f"{side}: records no sha256 for {onnx_path.name}")
    for name, digest in files.items():
        if manifest.get(name) != digest:
            raise HashMismatch(f"{side}: its sha256 for {name} differs from {manifest_path}'s; "
                               "refusing the model: re-export it")
    verified.update(verify_files(folder, files, str(side)))
    return meta, verified


# ----------------------------------------------------------------------------- providers


def select_providers(device: str, available: list[str] | None = None) -> list[str]:
    """ONNX Runtime providers for ``device`` (auto/cpu/cuda/tensorrt), checked against ``available``.

    ``auto`` takes the best provider installed; an explicit device whose provider is not
    installed is a UserError (a GPU run silently falling back to the CPU would take hours).
    """
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if device == "auto":
        for candidate in ("tensorrt", "cuda", "cpu"):
            if DEVICE_PROVIDERS[candidate][0] in available:
                device = candidate
                break
    wanted = DEVICE_PROVIDERS[device]
    if wanted[0] not in available:
        hint = ("install onnxruntime-gpu (the GPU image has it) instead of onnxruntime"
                if device in ("cuda", "tensorrt") else "reinstall onnxruntime")
        raise UserError(
            f"--device {device} needs ONNX Runtime's {wanted[0]}, but this installation only "
            f"offers {', '.join(available) or 'none'}; {hint}, or pass --device cpu"
        )
    return [p for p in wanted if p in available]


def check_session_providers(session_providers: list[str], requested: list[str], source: str) -> None:
    """Fail when ONNX Runtime did not give the session the primary provider asked for.

    ORT silently drops a provider whose libraries (CUDA, cuDNN, TensorRT) fail to load and runs
    on the next one; ``session.get_providers()`` tells what the session really got.
    """
    if requested and requested[0] not in session_providers:
        raise UserError(
            f"{source}: ONNX Runtime was asked for {requested[0]} but the session got "
            f"{', '.join(session_providers)} (its CUDA/cuDNN/TensorRT libraries did not load; see "
            "the ONNX Runtime warnings above); fix the GPU libraries or pass --device cpu"
        )
    missing = [p for p in requested[1:-1] if p not in session_providers]
    if missing:
        warnings.warn(f"{source}: session lacks fallback providers {missing}", stacklevel=2)


def provider_options(provider: str, cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Provider options: TensorRT builds FP16 engines and caches them next to the model."""
    if provider == "TensorrtExecutionProvider":
        opts: dict[str, Any] = {"trt_fp16_enable": True}
        if cache_dir is not None:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        return opts
    return {}


# ----------------------------------------------------------------------------- ONNX


def verify_model_root(onnx_path: Path) -> dict[str, str]:
    """Inside an MLflow model folder (``ROOT/artifacts/model.onnx``) holding the manifest that
    ``masksam register`` recorded, check every file it lists (shipped code, MLmodel, ...)."""
    root = onnx_path.parent.parent
    manifest = root / MODEL_MANIFEST
    if onnx_path.parent.name != "artifacts" or not manifest.is_file():
        return {}
    return verify_folder(root, manifest, read_manifest(manifest), exact=False)


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + SIDECAR_SUFFIX)


def _no_sidecar(onnx_path: Path) -> UserError:
    return UserError(f"{onnx_path}: no sidecar {sidecar_path(onnx_path).name} beside it (it holds the "
                     "plan, the model config and the sha256); export with `masksam export`, which "
                     "writes both")


def read_sidecar(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check the sidecar JSON written by ``masksam export``."""
    side = sidecar_path(onnx_path)
    if not side.is_file():
        raise _no_sidecar(onnx_path)
    meta = read_json(side, "ONNX sidecar")
    missing = {"plan", "config", "files"} - set(meta)
    if missing:
        raise UserError(f"{side}: lacks {sorted(missing)}; it was not written by masksam export")
    return meta


def ort_session_options(threads: int | None = None):
    """Session options used for every MaskSAM graph: full graph optimisation, sequential run.

    Intra-op threads do not spin-wait after a run: between two slabs the sliding window
    accumulates on the same cores, and spinning ORT threads would steal them.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
    return opts


def onnx_session(onnx_path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 expected_sha256: str | None = None) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """An ONNX Runtime session over an exported model once its sidecar and files match the
    export's manifest (:func:`verify_export`) and, inside a pulled MLflow model, the model's
    manifest too. Returns ``(session, sidecar, {file: sha256 verified})``; the session really
    runs on the provider ``device`` asks for (:func:`check_session_providers`)."""
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: ONNX model not found")
    verified = verify_model_root(onnx_path)
    meta, exported = verify_export(onnx_path)
    verified.update(exported)
    if expected_sha256 is not None and meta["files"][onnx_path.name] != expected_sha256:
        raise HashMismatch(
            f"{sidecar_path(onnx_path)}: records sha256 {meta['files'][onnx_path.name][:16]}... for "
            f"{onnx_path.name} but the registry tag says {expected_sha256[:16]}...; the model "
            "artifacts were altered after registration. Refusing to load them"
        )
    providers = select_providers(device)
    cache = onnx_path.parent / "trt_cache"
    options = [provider_options(p, cache) for p in providers]
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=ort_session_options(threads),
                                       providers=providers, provider_options=options)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{onnx_path}: ONNX Runtime cannot load it ({str(exc)[:300]})") from exc
    check_session_providers(session.get_providers(), providers, str(onnx_path))
    return session, meta, verified


# ----------------------------------------------------------------------------- training dir


def torch_device(device: str) -> str:
    """The PyTorch device for ``--device`` (auto: CUDA when present); TensorRT needs ONNX."""
    import torch

    if device in ("auto",):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "tensorrt":
        raise UserError("--device tensorrt needs an ONNX model (masksam export), not a training directory")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device here; pass --device cpu")
    return device


TRAIN_SUMMARY = "train_summary.json"
# what train.py has recorded in a completed summary since plan hashes were added
REQUIRED_TRAIN_HASHES = ("model.safetensors", "plan.json")


def _unfinished(train_dir: Path, why: str) -> UserError:
    return UserError(
        f"{train_dir}: {why}; the training did not complete (interrupted, or still running). "
        f"Finish it with `masksam train --resume --out {train_dir}` (same parameters) before "
        "predicting or exporting with it")


def verify_training_dir(train_dir: str | os.PathLike) -> dict[str, str]:
    """Refuse a training folder without a completed ``train_summary.json``; check every sha256
    it records (weights, plan, ...). Returns ``{file: sha256}`` verified.

    ``masksam train`` writes the summary last, after the final weights, so its absence means the
    run was interrupted; a summary without hashes was not written by a completed run.
    """
    train_dir = Path(train_dir)
    summary_path = train_dir / TRAIN_SUMMARY
    if not summary_path.is_file():
        raise _unfinished(train_dir, f"no {TRAIN_SUMMARY}")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unfinished(train_dir, f"{TRAIN_SUMMARY} is unreadable ({exc})") from exc
    hashes = summary.get("hashes") if isinstance(summary, dict) else None
    if not isinstance(hashes, dict) or "steps" not in summary:
        raise _unfinished(train_dir, f"{TRAIN_SUMMARY} records no steps/hashes of a finished run")
    missing = [name for name in REQUIRED_TRAIN_HASHES if not isinstance(hashes.get(name), str)]
    if missing:
        raise UserError(f"{summary_path}: records no sha256 for {missing}; it was not written by a "
                        "completed `masksam train` of this version: retrain (or --resume) this folder")
    return verify_files(train_dir, hashes, str(summary_path))


def recorded_weight_hash(train_dir: Path) -> str | None:
    """The sha256 of ``model.safetensors`` recorded in ``train_summary.json``, if any."""
    summary_path = Path(train_dir) / TRAIN_SUMMARY
    if not summary_path.is_file():
        return None
    hashes = read_json(summary_path, "training summary").get("hashes") or {}
    value = hashes.get("model.safetensors") if isinstance(hashes, dict) else None
    return value if isinstance(value, str) and len(value) == 64 else None


def build_model_from_dir(train_dir: str | os.PathLike, device: str = "cpu"):
    """Build MaskSAM from a training directory: config JSON + safetensors weights (strict)."""
    import torch
    from safetensors.torch import load_file

    from masksam.model import MaskSAMConfig, build_masksam

    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise UserError(f"{train_dir}: training directory not found (run masksam train first)")
    verified = verify_training_dir(train_dir)  # before any of its files is parsed
    config = read_json(train_dir / "model_config.json", "model config")
    plan = read_json(train_dir / "plan.json", "preprocessing plan")
    weights = train_dir / "model.safetensors"
    try:
        # the SAM checkpoint path was for training's initialisation; the weights come from
        # model.safetensors, so the (possibly absent) .pth file is never read here.
        cfg = MaskSAMConfig.from_dict({**config, "sam_weights": None})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{train_dir / 'model_config.json'}: not a MaskSAMConfig ({exc})") from exc
    model = build_masksam(cfg)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises SafetensorError / OSError
        raise UserError(f"{weights}: not a readable safetensors file ({str(exc)[:200]})") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(str(exc).split())[:500]
        raise UserError(f"{weights}: does not match {train_dir / 'model_config.json'} ({detail})") from exc
    if missing or unexpected:  # strict: a partial load would silently run random weights
        raise UserError(
            f"{weights}: does not match {train_dir / 'model_config.json'}: {len(missing)} missing "
            f"keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; the weights "
            "come from another model version or config")
    model.eval().to(torch.device(device))
    return model, config, plan, verified


# ----------------------------------------------------------------------------- MLflow

# HTTP settings while resolving/downloading a models:/ URI: MLflow's defaults (7 retries with
# backoff factor 2, 120 s timeout) take minutes to give up on a dead server; these fail within
# about 30 s while still riding out a short hiccup.
REGISTRY_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "8"}
# written by MLflow itself into a downloaded model version (name and version, from the
# registry), so never in the manifest of the artifact store
MLFLOW_DOWNLOAD_FILES = ("registered_model_meta",)


def is_mlflow_uri(ref: str) -> bool:
    return str(ref).startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


@dataclass
class RegistryRecord:
    """What the registry says about one model version: the trusted side of a verified pull."""

    name: str
    version: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def bounded_http():
    """:data:`REGISTRY_HTTP_ENV` for the duration of a call (MLflow reads it per request)."""
    return temporary_env(**REGISTRY_HTTP_ENV)


def registry_record(uri: str) -> RegistryRecord:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` to its version and tags.

    Only registered versions carry the record (manifest hash) a download is checked against, so
    other URIs are refused; an unreachable registry fails within about 30 s naming the server.
    """
    from mlflow import MlflowClient

    rest = uri[len("models:/"):].strip("/") if uri.startswith("models:/") else ""
    name, sep, number = rest.partition("/")
    if not rest or ("@" not in rest and not (sep and number.isdigit())):
        raise UserError(f"{uri}: only registered models can be verified; give models:/NAME@ALIAS or "
                        "models:/NAME/VERSION (register the model with masksam register)")
    server = _tracking_uri()
    try:
        with bounded_http():
            client = MlflowClient()
            if "@" in rest:
                name, alias = rest.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                version = client.get_model_version(name, number)
    except Exception as exc:  # MlflowException, connection errors, timeouts
        raise UserError(f"{uri}: cannot look the model up in the registry at {server} "
                        f"({first_line(exc)}); start the server, fix MLFLOW_TRACKING_URI, or check "
                        "the model name/alias") from exc
    return RegistryRecord(name=name, version=str(version.version), tags=dict(version.tags or {}))


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def find_onnx(directory: str | os.PathLike) -> Path:
    """The ``model.onnx`` inside a downloaded MLflow model (``artifacts/model.onnx``)."""
    path = Path(directory) / "artifacts" / ONNX_NAME
    if not path.is_file():
        raise UserError(f"{directory}: no artifacts/{ONNX_NAME} in the downloaded model; it was not "
                        "registered by masksam register")
    return path


def verify_model_folder(folder: str | os.PathLike, record: RegistryRecord) -> dict[str, str]:
    """Check a downloaded model version against the registry: the manifest's sha256 against the
    ``manifest_sha256`` tag, then every file against the manifest, with no file missing or
    added; the ONNX and sidecar hashes against their own tags as well."""
    folder = Path(folder)
    want = record.tags.get("manifest_sha256")
    if not want:
        raise UserError(f"{record.uri}: the registry records no manifest_sha256 for this version, so "
                        "its files cannot be verified; re-register it with masksam register")
    manifest_path = folder / MODEL_MANIFEST
    files = read_manifest(manifest_path, expected_sha256=want)
    verified = verify_folder(folder, manifest_path, files, exact=True, allowed_extra=MLFLOW_DOWNLOAD_FILES)
    for tag, rel in (("onnx_sha256", f"artifacts/{ONNX_NAME}"),
                     ("sidecar_sha256", f"artifacts/{ONNX_NAME}{SIDECAR_SUFFIX}")):
        if tag in record.tags and files.get(rel) != record.tags[tag]:
            raise HashMismatch(f"{record.uri}: {rel} differs from the registry's {tag} tag; refusing it")
    verify_export(find_onnx(folder))
    return {MODEL_MANIFEST: want, **verified}


def download_model(uri: str, dst: str | os.PathLike,
                   record: RegistryRecord | None = None) -> tuple[Path, dict[str, str]]:
    """Download a registered model into ``dst`` (new or empty) only once all of it is verified.

    The files land in a temporary folder beside ``dst`` (same filesystem), are checked against
    the registry's record (:func:`verify_model_folder`) and only then renamed to ``dst``; a
    refused download leaves ``dst`` as it was and no temporary folder. Returns the ONNX path
    and ``{relative path: sha256}`` of what was verified. ``record``: the registry's answer for
    ``uri`` when the caller has already resolved it (the version it names is what is fetched).
    """
    import mlflow

    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst}: exists and is not empty (or not a folder); pull into a new folder")
    record = record or registry_record(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.pull-", dir=dst.parent))
    try:
        try:
            with bounded_http():  # the version, not the alias: it may move meanwhile
                mlflow.artifacts.download_artifacts(artifact_uri=record.uri, dst_path=str(tmp))
        except Exception as exc:  # MlflowException, connection errors
            raise UserError(f"{uri}: cannot download it from {_tracking_uri()} ({first_line(exc)}); "
                            "check MLFLOW_TRACKING_URI and the model name/alias") from exc
        verified = verify_model_folder(tmp, record)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return find_onnx(dst), verified


def resolve_ref(ref: str | os.PathLike) -> tuple[str, str]:
    """What ``--model`` names: ``("mlflow", uri)``, ``("onnx", path of model.onnx)`` or
    ``("training", directory)``; anything else is a UserError saying what to give."""
    ref_s = str(ref)
    if is_mlflow_uri(ref_s):
        return "mlflow", ref_s
    path = Path(ref_s)
    if path.is_file() and path.suffix == ".onnx":
        return "onnx", ref_s
    if path.is_dir():
        if (path / "model_config.json").is_file():
            return "training", ref_s
        if (path / ONNX_NAME).is_file():
            return "onnx", str(path / ONNX_NAME)
    if not path.exists():
        raise UserError(f"--model {ref_s}: not found (give a training directory, an exported "
                        "model.onnx, or an MLflow URI such as models:/masksam@champion)")
    raise UserError(f"--model {ref_s}: neither a training directory (model_config.json + "
                    "model.safetensors), an exported model.onnx with its sidecar, nor an MLflow URI")
