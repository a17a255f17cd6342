"""The MLflow pyfunc model: raw intensities in, label map out, on the exported ONNX graph.

Registered by ``masksam register`` as a *model from code* (``_pyfunc_entry.py``, no pickle): its
artifacts are ``model.onnx`` (+ external data) and the ``model.onnx.json`` sidecar (plan, config,
sha256). Preprocessing (reorientation, crop, normalisation, resampling) and postprocessing
(sliding window, restoring the original grid) travel inside the model, through masksam's own code
shipped with it (``code_paths``), so a user needs neither masksam nor PyTorch weights:

    model = mlflow.pyfunc.load_model("models:/masksam@champion")
    labels = model.predict(volume_zyx.astype("float32"), params={"spacing": [0.8, 0.8, 2.5]})

``model_input``: float32 ``[Z, Y, X]`` (``[C, Z, Y, X]`` for multi-channel plans) in raw units
(HU for CT). ``params``: ``spacing`` (x, y, z mm), optional ``origin`` (x, y, z) and
``direction`` (9 numbers, SimpleITK order), ``mirror`` (bool), ``overlap`` (float). Output: uint8
``[Z, Y, X]`` labels on the input's grid. Over REST: ``{"inputs": [...nested lists...],
"params": {"spacing": [...]}}`` to ``/invocations``. For files, ``unwrap_python_model()
.predict_file(path, out_path)`` reads any SimpleITK format and writes the label map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

ARTIFACT_ONNX = "onnx"
ARTIFACT_SIDECAR = "sidecar"
ARTIFACT_DATA = "onnx_data"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _param_list(params: dict[str, Any], name: str, n: int, default=None) -> list[float] | None:
    value = params.get(name, default)
    if value is None:
        return None
    values = [float(v) for v in np.asarray(value, dtype=np.float64).ravel()]
    if len(values) != n:
        raise ValueError(f"params['{name}'] needs {n} numbers, got {len(values)}")
    return values


class MaskSAMPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc over the verified ONNX graph plus masksam's preprocessing and restoring."""

    def load_context(self, context) -> None:
        from masksam.components._loading import load_onnx

        device = os.environ.get("MASKSAM_DEVICE", "auto")
        # load_onnx checks every file against the sidecar's sha256 before ONNX Runtime parses it
        self.model = load_onnx(Path(context.artifacts[ARTIFACT_ONNX]), device=device)

    def _segment(self, images, mirror: bool, overlap: float):
        from masksam.components.predict import _infer
        from masksam.components.preprocess import preprocess_case, restore_to_original

        image, _, properties = preprocess_case(images, None, self.model.plan)
        probs, _ = _infer(self.model, image, mirror, overlap, 1, False)
        return restore_to_original(probs, properties)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        """Segment one volume given as an array in raw units; returns uint8 labels, same shape."""
        import SimpleITK as sitk

        params = dict(params or {})
        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor
            model_input = next(iter(model_input.values()))
        volume = np.asarray(model_input, dtype=np.float32)
        n_channels = len(self.model.plan.get("channel_names", {"0": ""}))
        if volume.ndim == 3 and n_channels == 1:
            volume = volume[None]
        if volume.ndim != 4 or volume.shape[0] != n_channels:
            raise ValueError(f"model_input must be [Z, Y, X] (or [C, Z, Y, X] with C = {n_channels}); "
                             f"got shape {tuple(np.asarray(model_input).shape)}")
        spacing = _param_list(params, "spacing", 3)
        if spacing is None or min(spacing) <= 0:
            raise ValueError("params['spacing'] = [x, y, z] in mm (positive) is required: the model "
                             "resamples to its training spacing")
        origin = _param_list(params, "origin", 3, (0.0, 0.0, 0.0))
        direction = _param_list(params, "direction", 9, IDENTITY)
        images = []
        for channel in volume:
            img = sitk.GetImageFromArray(channel)
            img.SetSpacing(spacing)
            img.SetOrigin(origin)
            img.SetDirection(direction)
            images.append(img)
        restored = self._segment(images, bool(params.get("mirror", False)), float(params.get("overlap", 0.5)))
        return sitk.GetArrayFromImage(restored).astype(np.uint8)

    def predict_file(self, path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                     mirror: bool = False, overlap: float = 0.5):
        """Segment an image file (channel files for multi-channel plans: pass a list);
        writes ``out_path`` when given and returns the SimpleITK label image."""
        from masksam.components._io import read_image, write_image

        paths = path if isinstance(path, (list, tuple)) else [path]
        restored = self._segment([read_image(p) for p in paths], mirror, overlap)
        if out_path is not None:
            write_image(restored, out_path)
        return restored
