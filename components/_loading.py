"""Load a trained MaskSAM for inference: checkpoint directory, exported ONNX file or MLflow URI.

Every way of loading yields the same :class:`LoadedModel`: the preprocessing plan, the model
config and a ``predict_slab`` callable (``[B, C, T, H, W]`` float32 -> ``[B, K, T, H, W]``) that
``sliding_window_inference`` drives. Only files the project writes are loaded (safetensors
weights, ONNX graphs, JSON), never a pickle, and a file whose sha256 differs from the one recorded
beside it (ONNX sidecar, ``train_summary.json``, registry tags) is refused before it is parsed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from masksam.components._io import read_json, sha256_file
from masksam.errors import UserError

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json
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


@dataclass
class LoadedModel:
    """A model ready for :func:`sliding_window_inference`, whatever it was loaded from."""

    plan: dict[str, Any]
    config: dict[str, Any]
    predict_slab: Callable[[Any], Any]
    backend: str  # "torch" or "onnxruntime"
    source: str
    device: str = "cpu"
    providers: list[str] = field(default_factory=list)
    verified: dict[str, str] = field(default_factory=dict)  # file name -> sha256 checked

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> integer, background included (from the plan)."""
        return {str(k): int(v) for k, v in self.plan.get("labels", {}).items()}


# ----------------------------------------------------------------------------- hashes


def verify_files(directory: str | os.PathLike, expected: dict[str, str], what: str) -> dict[str, str]:
    """Check each ``name -> sha256`` in ``expected`` under ``directory``; raise on any mismatch.

    Returns the verified mapping. A missing file is an error as well: a model that lost its
    external-data file would otherwise fail later with a less helpful message.
    """
    directory = Path(directory)
    for name, want in expected.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path}: listed in {what} but missing; re-export or re-download the model")
        got = sha256_file(path)
        if got != want:
            raise HashMismatch(
                f"{path}: sha256 {got[:16]}... does not match {want[:16]}... recorded in {what}; "
                "the file was modified or corrupted after it was written. Refusing to load it: "
                "re-export (masksam export) or re-download (masksam pull) the model"
            )
    return dict(expected)


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


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + SIDECAR_SUFFIX)


def read_sidecar(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check the sidecar JSON written by ``masksam export``."""
    side = sidecar_path(onnx_path)
    if not side.is_file():
        raise UserError(
            f"{onnx_path}: no sidecar {side.name} beside it (it holds the plan, the model config and "
            "the sha256); export with `masksam export`, which writes both"
        )
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


class OrtSlabPredictor:
    """``predict_slab`` over an ONNX Runtime session; takes and returns what it is given
    (numpy arrays, or CPU torch tensors when sliding_window_inference passes those)."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def __call__(self, slab):
        is_torch = type(slab).__module__.startswith("torch")
        x = slab.detach().cpu().numpy() if is_torch else np.asarray(slab)
        y = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        if is_torch:
            import torch

            return torch.from_numpy(y).to(slab.device)
        return y


def load_onnx(onnx_path: str | os.PathLike, device: str = "auto", threads: int | None = None,
              expected_sha256: str | None = None) -> LoadedModel:
    """Load an exported ONNX model after checking its files against the sidecar's sha256."""
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: ONNX model not found")
    meta = read_sidecar(onnx_path)
    files = dict(meta["files"])
    if onnx_path.name not in files:
        raise UserError(f"{sidecar_path(onnx_path)}: records no sha256 for {onnx_path.name}")
    if expected_sha256 is not None and files[onnx_path.name] != expected_sha256:
        raise HashMismatch(
            f"{sidecar_path(onnx_path)}: records sha256 {files[onnx_path.name][:16]}... for "
            f"{onnx_path.name} but the registry tag says {expected_sha256[:16]}...; the model "
            "artifacts were altered after registration. Refusing to load them"
        )
    verified = verify_files(onnx_path.parent, files, str(sidecar_path(onnx_path)))
    providers = select_providers(device)
    cache = onnx_path.parent / "trt_cache"
    options = [provider_options(p, cache) for p in providers]
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=ort_session_options(threads),
                                       providers=providers, provider_options=options)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{onnx_path}: ONNX Runtime cannot load it ({str(exc)[:300]})") from exc
    check_session_providers(session.get_providers(), providers, str(onnx_path))
    return LoadedModel(
        plan=meta["plan"], config=meta["config"], predict_slab=OrtSlabPredictor(session),
        backend="onnxruntime", source=str(onnx_path), device=providers[0],
        providers=session.get_providers(), verified=verified,
    )


# ----------------------------------------------------------------------------- checkpoint dir


def _torch_device(device: str) -> str:
    import torch

    if device in ("auto",):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "tensorrt":
        raise UserError("--device tensorrt needs an ONNX model (masksam export), not a checkpoint directory")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device here; pass --device cpu")
    return device


def recorded_weight_hash(train_dir: Path) -> str | None:
    """The sha256 of ``model.safetensors`` recorded in ``train_summary.json``, if any."""
    summary_path = train_dir / "train_summary.json"
    if not summary_path.is_file():
        return None
    summary = read_json(summary_path, "training summary")
    hashes = summary.get("hashes") or {}
    for key in ("model.safetensors", "model_safetensors", "weights", "model"):
        value = hashes.get(key) if isinstance(hashes, dict) else None
        if isinstance(value, str) and len(value) == 64:
            return value
    return None


def build_model_from_dir(train_dir: str | os.PathLike, device: str = "cpu"):
    """Build MaskSAM from a checkpoint directory: config JSON + safetensors weights (strict)."""
    import torch
    from safetensors.torch import load_file

    from masksam.model import MaskSAMConfig, build_masksam

    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise UserError(f"{train_dir}: checkpoint directory not found (run masksam train first)")
    config = read_json(train_dir / "model_config.json", "model config")
    plan = read_json(train_dir / "plan.json", "preprocessing plan")
    weights = train_dir / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights}: not found; the checkpoint directory must hold the best weights "
                        "written by masksam train")
    verified: dict[str, str] = {}
    want = recorded_weight_hash(train_dir)
    if want is not None:
        verified = verify_files(train_dir, {"model.safetensors": want}, str(train_dir / "train_summary.json"))
    else:
        log.warning("%s: train_summary.json records no sha256 for model.safetensors; not verified", train_dir)
    try:
        # the SAM checkpoint path was for training's initialisation; the weights come from
        # model.safetensors, so the (possibly absent) .pth file is never read here.
        cfg = MaskSAMConfig.from_dict({**config, "checkpoint": None})
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


class TorchSlabPredictor:
    """``predict_slab`` over ``MaskSAM.class_probs`` (no grad; numpy or torch in, same out)."""

    def __init__(self, model, device: str) -> None:
        self.model = model
        self.device = device

    def __call__(self, slab):
        import torch

        is_numpy = isinstance(slab, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(slab, np.float32)) if is_numpy else slab
        with torch.inference_mode():
            y = self.model.class_probs(x.to(self.device, torch.float32))
        if is_numpy:
            return y.float().cpu().numpy()
        return y.to(slab.device)


def load_checkpoint_dir(train_dir: str | os.PathLike, device: str = "auto") -> LoadedModel:
    """Load the PyTorch model of a ``masksam train`` output directory."""
    dev = _torch_device(device)
    model, config, plan, verified = build_model_from_dir(train_dir, dev)
    return LoadedModel(plan=plan, config=config, predict_slab=TorchSlabPredictor(model, dev),
                       backend="torch", source=str(train_dir), device=dev, verified=verified)


# ----------------------------------------------------------------------------- MLflow


def is_mlflow_uri(ref: str) -> bool:
    return str(ref).startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def registry_onnx_hash(uri: str) -> str | None:
    """The ``onnx_sha256`` tag of the model version a ``models:/name@alias`` or ``models:/name/N``
    URI points to (set by ``masksam register``), or None for other URIs."""
    if not uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    rest = uri[len("models:/"):].strip("/")
    client = MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.partition("/")
            if not number.isdigit():
                return None
            version = client.get_model_version(name, number)
    except Exception as exc:  # MlflowException, connection errors
        raise UserError(f"{uri}: cannot look the model up in the registry at "
                        f"{_tracking_uri()} ({str(exc)[:200]})") from exc
    return (version.tags or {}).get("onnx_sha256")


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def find_onnx(directory: str | os.PathLike) -> Path:
    """The ``model.onnx`` inside a downloaded MLflow model (artifacts/...)."""
    found = sorted(Path(directory).rglob(ONNX_NAME))
    if not found:
        raise UserError(f"{directory}: no {ONNX_NAME} in the downloaded model; it was not "
                        "registered by masksam register")
    return found[0]


def download_model(uri: str, dst: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Download an MLflow model to ``dst`` and verify its ONNX files; return (onnx path, hashes)."""
    import mlflow

    want = registry_onnx_hash(uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except Exception as exc:  # MlflowException, connection errors
        raise UserError(f"{uri}: cannot download it from {_tracking_uri()} ({str(exc)[:300]}); check "
                        "MLFLOW_TRACKING_URI and the model name/alias") from exc
    onnx_path = find_onnx(local)
    meta = read_sidecar(onnx_path)
    files = dict(meta["files"])
    if want is not None and files.get(onnx_path.name) != want:
        raise HashMismatch(f"{uri}: the downloaded sidecar's sha256 for {onnx_path.name} differs from "
                           "the registry's onnx_sha256 tag; refusing the model")
    verified = verify_files(onnx_path.parent, files, str(sidecar_path(onnx_path)))
    return onnx_path, verified


def load_mlflow(uri: str, device: str = "auto", threads: int | None = None,
                cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Download a registered model and load its ONNX graph (the registry tag hash is checked)."""
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="masksam-model-"))
    onnx_path, _ = download_model(uri, dst)
    loaded = load_onnx(onnx_path, device=device, threads=threads)
    loaded.source = uri
    return loaded


def load_model(ref: str | os.PathLike, device: str = "auto", threads: int | None = None) -> LoadedModel:
    """Load whatever ``--model`` names: checkpoint dir, ``.onnx`` file (or its dir), MLflow URI."""
    ref_s = str(ref)
    if is_mlflow_uri(ref_s):
        return load_mlflow(ref_s, device=device, threads=threads)
    path = Path(ref_s)
    if path.is_file() and path.suffix == ".onnx":
        return load_onnx(path, device=device, threads=threads)
    if path.is_dir():
        if (path / "model_config.json").is_file():
            return load_checkpoint_dir(path, device=device)
        if (path / ONNX_NAME).is_file():
            return load_onnx(path / ONNX_NAME, device=device, threads=threads)
    if not path.exists():
        raise UserError(f"--model {ref_s}: not found (give a checkpoint directory, an exported "
                        "model.onnx, or an MLflow URI such as models:/masksam@champion)")
    raise UserError(f"--model {ref_s}: neither a checkpoint directory (model_config.json + "
                    "model.safetensors), an exported model.onnx with its sidecar, nor an MLflow URI")
