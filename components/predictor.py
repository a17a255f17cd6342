"""The one predictor (the project's ``nnUNetPredictor``): a scan in, labels in its own geometry out.

Every inference path goes through :class:`Predictor`: ``masksam predict``, evaluate's pipeline
mode, training's validation, export's parity check, the benchmarks and the MLflow pyfunc. It is
built from a training directory, an exported ONNX file, a registered MLflow model or an
in-memory module plus plan, and turns a scan into labels the nnU-Net way:

    preprocess_case -> sliding window over slabs (optional in-plane mirroring)
    -> class probabilities restored to the original grid -> argmax

so the label map has the input's exact size, spacing, origin and direction. Several models
(training directories and/or ONNX files, e.g. the folds of a cross-validation) form an ensemble,
like nnU-Net's ``-f 0 1 2 3 4``: their class probabilities on the preprocessed grid are averaged
before the argmax; they must share the plan (same preprocessing) and the labels.

Nothing here imports PyTorch at module level: a predictor over ONNX files runs where torch is
not installed (the serving image). :class:`TorchRunner` imports it when it is built.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from masksam.components._sliding_window import sliding_window_inference
from masksam.errors import UserError

__all__ = ["OrtRunner", "TorchRunner", "Member", "Prediction", "Predictor", "structure_summary"]

MIRROR_AXES = (1, 2)  # in-plane flips of [Z, Y, X]: the flips training augments with
# the plan entries preprocess_case reads: members of an ensemble must agree on all of them
PREPROCESSING_KEYS = ("channel_names", "modalities", "orientation", "crop", "normalization",
                      "target_spacing_xyz", "image_interp", "label_interp")


# ----------------------------------------------------------------------------- slab runners


class OrtRunner:
    """numpy float32 ``[B, C, T, H, W]`` -> per-class maps ``[B, K, T, H, W]`` over an ONNX
    Runtime session (the exported ``MaskSAM.class_probs`` graph)."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def __call__(self, slab: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(slab, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]


class TorchRunner:
    """numpy float32 ``[B, C, T, H, W]`` -> ``[B, K, T, H, W]`` through ``module.class_probs``
    on ``device`` (default: the module's), under ``inference_mode`` and, with
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU), autocast. The module's train/eval
    mode is the caller's business (training's validation switches it around the call)."""

    def __init__(self, module, device=None, autocast_dtype=None) -> None:
        import torch

        if not hasattr(module, "class_probs"):
            raise TypeError(f"{type(module).__name__} has no class_probs; give a MaskSAM module")
        self.module = module
        self.device = torch.device(device) if device is not None else next(module.parameters()).device
        self.autocast_dtype = autocast_dtype

    def __call__(self, slab: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(slab, dtype=np.float32)).to(self.device)
        enabled = self.autocast_dtype is not None
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=enabled,
                                                    dtype=self.autocast_dtype if enabled else None):
            y = self.module.class_probs(x)
        return y.float().cpu().numpy()


# ----------------------------------------------------------------------------- results


def structure_summary(labels_zyx: np.ndarray, probs: np.ndarray, restored_labels: np.ndarray,
                      spacing_xyz: Iterable[float], names: dict[str, int]) -> dict[str, Any]:
    """Per structure: voxels and volume (mL) on the original grid, and mean confidence.

    Confidence is the mean, over the structure's voxels on the preprocessed grid, of the
    winning class's probability after normalising the per-class maps to sum to 1 (Mask2Former
    maps are sums over queries, not probabilities, until normalised).
    """
    voxel_ml = float(np.prod(list(spacing_xyz))) / 1000.0
    counts = np.bincount(np.asarray(restored_labels).ravel(), minlength=max(names.values()) + 1)
    top = probs.max(axis=0)
    top /= np.maximum(probs.sum(axis=0), 1e-6)
    out: dict[str, Any] = {}
    for name, value in sorted(names.items(), key=lambda kv: kv[1]):
        inside = labels_zyx == value
        out[name] = {
            "label": value,
            "voxels": int(counts[value]) if value < len(counts) else 0,
            "volume_ml": round(float(counts[value]) * voxel_ml, 4) if value < len(counts) else 0.0,
            "mean_confidence": round(float(top[inside].mean()), 4) if inside.any() else None,
        }
    return out


def match_header(restored, original, what: str = "input") -> None:
    """Give the label map the input's header bit for bit (JSON round-trips of the geometry can
    move spacing/origin by an ulp); a real mismatch is an error, never written silently."""
    same = (restored.GetSize() == original.GetSize()
            and np.allclose(restored.GetSpacing(), original.GetSpacing(), rtol=1e-6, atol=1e-9)
            and np.allclose(restored.GetOrigin(), original.GetOrigin(), rtol=0, atol=1e-4)
            and np.allclose(restored.GetDirection(), original.GetDirection(), atol=1e-6))
    if not same:
        raise RuntimeError(f"{what}: restored label map geometry {restored.GetSize()} "
                           f"{restored.GetSpacing()} differs from the input's {original.GetSize()} "
                           f"{original.GetSpacing()}")
    restored.CopyInformation(original)


@dataclass
class Prediction:
    """One scan's result: ``labels`` (SimpleITK uint8 image in the input's exact geometry), the
    per-structure ``structures`` summary, and, when asked for, ``probabilities`` (float32
    ``[K, Z, Y, X]`` on the preprocessed grid that ``properties`` describes)."""

    labels: Any
    structures: dict[str, Any]
    properties: dict[str, Any]
    probabilities: np.ndarray | None = None


# ----------------------------------------------------------------------------- members


@dataclass
class Member:
    """One model of a predictor: a slab runner with the plan and config it was trained with."""

    runner: Any  # OrtRunner, TorchRunner or any numpy-in/numpy-out slab callable
    plan: dict[str, Any]
    config: dict[str, Any]
    backend: str  # "torch" or "onnxruntime"
    source: str
    device: str = "cpu"
    providers: list[str] = field(default_factory=list)
    verified: dict[str, str] = field(default_factory=dict)  # file -> sha256 checked at load
    registry: dict[str, Any] | None = None  # a registered model: name, version its alias resolved to

    def sliding_window(self, image: np.ndarray, *, mirror: bool, overlap: float, batch_size: int,
                       return_probs: bool, progress: bool) -> tuple[np.ndarray | None, np.ndarray]:
        cfg = self.config
        return sliding_window_inference(
            self.runner, image, slab_depth=int(cfg["slab_depth"]), img_size=int(cfg["img_size"]),
            num_classes=int(cfg["num_classes"]), overlap=overlap,
            mirror_axes=MIRROR_AXES if mirror else (), batch_size=batch_size,
            return_probs=return_probs, progress=progress)


def _labels(plan: dict[str, Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in plan.get("labels", {}).items()}


def _check_compatible(members: Sequence[Member]) -> None:
    """Ensemble members must share labels, preprocessing, input channels and classes."""
    first = members[0]
    for other in members[1:]:
        pair = f"ensemble members {first.source} and {other.source}"
        if _labels(first.plan) != _labels(other.plan):
            raise UserError(f"{pair} predict different labels ({_labels(first.plan)} vs "
                            f"{_labels(other.plan)}); ensemble models trained on one dataset")
        for key in PREPROCESSING_KEYS:
            if first.plan.get(key) != other.plan.get(key):
                raise UserError(
                    f"{pair} were preprocessed differently (plan '{key}': {first.plan.get(key)!r} vs "
                    f"{other.plan.get(key)!r}); an ensemble averages probabilities on one preprocessed "
                    "grid, so give models trained on one `masksam preprocess` output (e.g. its folds)")
        for key in ("in_channels", "num_classes"):
            if int(first.config[key]) != int(other.config[key]):
                raise UserError(f"{pair} differ in {key} ({first.config[key]} vs {other.config[key]})")


def _argmax(probs: np.ndarray) -> np.ndarray:
    """uint8 argmax over classes, slice by slice (no int64 volume)."""
    labels = np.empty(probs.shape[1:], dtype=np.uint8)
    for z in range(probs.shape[1]):
        labels[z] = probs[:, z].argmax(0)
    return labels


# ----------------------------------------------------------------------------- the predictor


class Predictor:
    """One model or an ensemble, from any source, turning scans into labels (module docstring)."""

    def __init__(self, members: Sequence[Member]) -> None:
        if not members:
            raise UserError("a predictor needs at least one model")
        _check_compatible(members)
        self.members = list(members)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_training_dir(cls, path: str | os.PathLike, device: str = "auto") -> "Predictor":
        """The PyTorch model of a ``masksam train`` directory (completed, every sha256 checked)."""
        from masksam.components._loading import build_model_from_dir, torch_device

        dev = torch_device(device)
        model, config, plan, verified = build_model_from_dir(path, dev)
        return cls([Member(TorchRunner(model, dev), plan, config, "torch", str(path), dev,
                           verified=verified)])

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                  expected_sha256: str | None = None) -> "Predictor":
        """An exported ``model.onnx`` once its sidecar and files match the export's manifest."""
        from masksam.components._loading import onnx_session

        session, meta, verified = onnx_session(path, device, threads, expected_sha256)
        providers = list(session.get_providers())
        return cls([Member(OrtRunner(session), meta["plan"], meta["config"], "onnxruntime", str(path),
                           providers[0], providers, verified)])

    @classmethod
    def from_mlflow(cls, uri: str, device: str = "auto", threads: int | None = None) -> "Predictor":
        """A registered model, downloaded into a temporary folder, verified against the
        registry's record, loaded, and the folder removed (ONNX Runtime holds the graph)."""
        from masksam.components._loading import ONNX_NAME, download_model, registry_record

        record = registry_record(uri)  # alias -> version once: the version is what runs
        tmp = Path(tempfile.mkdtemp(prefix="masksam-model-"))
        try:
            onnx_path, _ = download_model(uri, tmp / "model", record=record)
            predictor = cls.from_onnx(onnx_path, device=device, threads=threads)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        member = predictor.members[0]
        member.source = uri
        alias = uri.split("@", 1)[1] if "@" in uri else None
        member.registry = {"uri": uri, "name": record.name, "version": record.version, "alias": alias,
                           "resolved_uri": record.uri, "onnx_sha256": member.verified.get(ONNX_NAME),
                           "manifest_sha256": record.tags.get("manifest_sha256")}
        return predictor

    @classmethod
    def from_module(cls, model, plan: dict[str, Any] | None = None, device=None,
                    autocast_dtype=None) -> "Predictor":
        """An in-memory MaskSAM (training's validation, export's parity). Without ``plan`` only
        :meth:`predict_preprocessed` works (the plan drives preprocessing)."""
        cfg = getattr(model, "cfg", None)
        if cfg is None:
            raise TypeError("Predictor.from_module needs a MaskSAM-like module with .cfg")
        config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        runner = TorchRunner(model, device, autocast_dtype)
        return cls([Member(runner, dict(plan or {}), config, "torch", f"in-memory {type(model).__name__}",
                           str(runner.device))])

    @classmethod
    def load(cls, ref_or_refs, device: str = "auto", threads: int | None = None) -> "Predictor":
        """Whatever ``--model`` names: a training directory, a ``model.onnx`` (or its folder), a
        ``models:/`` URI; a list of several gives an ensemble of all of them."""
        from masksam.components._loading import resolve_ref

        many = not isinstance(ref_or_refs, (str, os.PathLike))
        refs = list(ref_or_refs) if many else [ref_or_refs]
        if not refs:
            raise UserError("--model: give at least one model")
        members: list[Member] = []
        for ref in refs:
            kind, target = resolve_ref(ref)
            if kind == "mlflow":
                one = cls.from_mlflow(target, device=device, threads=threads)
            elif kind == "onnx":
                one = cls.from_onnx(target, device=device, threads=threads)
            else:
                one = cls.from_training_dir(target, device=device)
            members += one.members
        return cls(members)

    # ------------------------------------------------------------------ what it is

    @property
    def plan(self) -> dict[str, Any]:
        return self.members[0].plan

    @property
    def config(self) -> dict[str, Any]:
        return self.members[0].config

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> integer, background included (from the plan)."""
        return _labels(self.plan)

    @property
    def n_channels(self) -> int:
        return len(self.plan.get("channel_names", {"0": "CT"}))

    @property
    def sources(self) -> list[str]:
        return [m.source for m in self.members]

    @property
    def source(self) -> str:
        """The model's source, or ``ensemble(a, b, ...)``."""
        return self.sources[0] if len(self.members) == 1 else f"ensemble({', '.join(self.sources)})"

    def _joined(self, attr: str) -> str:
        return "+".join(dict.fromkeys(str(getattr(m, attr)) for m in self.members))

    @property
    def backend(self) -> str:
        return self._joined("backend")

    @property
    def device(self) -> str:
        return self._joined("device")

    @property
    def providers(self) -> list[str]:
        return list(dict.fromkeys(p for m in self.members for p in m.providers))

    @property
    def verified(self) -> dict[str, str]:
        """File -> sha256 checked at load (``source::file`` for an ensemble)."""
        if len(self.members) == 1:
            return dict(self.members[0].verified)
        return {f"{m.source}::{k}": v for m in self.members for k, v in m.verified.items()}

    # ------------------------------------------------------------------ predicting

    def predict_preprocessed(self, image_czyx: np.ndarray, *, mirror: bool = False, overlap: float = 0.5,
                             batch_size: int = 1, return_probs: bool = True, progress: bool = False
                             ) -> tuple[np.ndarray | None, np.ndarray]:
        """``(probs [K, Z, Y, X] float32 or None, labels [Z, Y, X] uint8)`` on the preprocessed
        grid; an ensemble averages its members' probabilities before the argmax."""
        image = np.asarray(image_czyx)
        if image.ndim != 4 or image.shape[0] != int(self.config["in_channels"]):
            raise ValueError(f"preprocessed image of shape {image.shape} is not [C, Z, Y, X] with "
                             f"C = {self.config['in_channels']}")
        kw = dict(mirror=mirror, overlap=overlap, batch_size=batch_size, progress=progress)
        if len(self.members) == 1:
            return self.members[0].sliding_window(image, return_probs=return_probs, **kw)
        total = None
        for member in self.members:
            probs, _ = member.sliding_window(image, return_probs=True, **kw)
            if total is None:
                total = probs
            else:
                total += probs
            del probs
        total /= len(self.members)
        return (total if return_probs else None), _argmax(total)

    def preprocess(self, images: list, where: str = "input") -> tuple[np.ndarray, dict[str, Any]]:
        """``preprocess_case`` with this predictor's plan: ``(image [C, Z, Y, X], properties)``;
        an image preprocessing cannot handle is a UserError naming ``where``."""
        from masksam.components.preprocess import preprocess_case

        if len(images) != self.n_channels:
            raise UserError(f"{where}: {len(images)} image channels given, the model expects "
                            f"{self.n_channels}")
        try:
            image, _, properties = preprocess_case(images, None, self.plan)
        except UserError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{where}: cannot be preprocessed ({str(exc)[:300]})") from exc
        return image, properties

    def predict_case(self, image_czyx: np.ndarray, properties: dict[str, Any], *, original=None,
                     mirror: bool = False, overlap: float = 0.5, batch_size: int = 1,
                     return_probs: bool = False, progress: bool = False) -> Prediction:
        """From a preprocessed case (``image``, ``properties`` of :meth:`preprocess`) to labels
        on the original grid: probabilities restored class by class, then argmax (nnU-Net's
        way). ``original`` (the first input channel) gives the label map its header bit for bit."""
        import SimpleITK as sitk

        from masksam.components.preprocess import restore_to_original

        probs, labels = self.predict_preprocessed(image_czyx, mirror=mirror, overlap=overlap,
                                                  batch_size=batch_size, return_probs=True,
                                                  progress=progress)
        restored = restore_to_original(probs, properties)
        if original is not None:
            match_header(restored, original)
        structures = structure_summary(labels, probs, sitk.GetArrayViewFromImage(restored),
                                       restored.GetSpacing(), self.labels)
        return Prediction(restored, structures, properties, probs if return_probs else None)

    def predict_images(self, images: list, *, mirror: bool = False, overlap: float = 0.5,
                       batch_size: int = 1, return_probs: bool = False, progress: bool = False,
                       where: str = "input") -> Prediction:
        """Segment one scan given as SimpleITK images (one per channel, one grid)."""
        image, properties = self.preprocess(images, where)
        return self.predict_case(image, properties, original=images[0], mirror=mirror, overlap=overlap,
                                 batch_size=batch_size, return_probs=return_probs, progress=progress)

    def predict_files(self, paths: str | os.PathLike | Sequence[str | os.PathLike], **kwargs) -> Prediction:
        """Segment one scan from its channel files, read with the checks every reader shares
        (truncation, NaN/inf, spacing, 3D); keyword arguments as :meth:`predict_images`."""
        from masksam.components._io import read_image

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        images = [read_image(p, expect_dim=3) for p in paths]
        return self.predict_images(images, where=str(paths[0]), **kwargs)
