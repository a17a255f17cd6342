"""The MLflow pyfunc model: raw intensities in, label map out, on the exported ONNX graph.

Registered by ``masksam register`` as a *model from code* (``_pyfunc_entry.py``, no pickle): its
artifacts are ``model.onnx`` (+ external data) and the ``model.onnx.json`` sidecar (plan, config,
sha256). Preprocessing (reorientation, crop, normalisation, resampling) and postprocessing
(sliding window, restoring the original grid) travel inside the model, through masksam's own code
shipped with it (``code_paths``), so a user needs neither masksam nor PyTorch weights, and the
serving environment needs no PyTorch at all (nothing on this path imports torch):

    image = sitk.ReadImage("scan.nii.gz")
    model = mlflow.pyfunc.load_model("models:/masksam@champion")
    labels = model.predict(sitk.GetArrayFromImage(image).astype("float32"),
                           params={"spacing": list(image.GetSpacing()),
                                   "origin": list(image.GetOrigin()),
                                   "direction": list(image.GetDirection())})

``model_input``: float32 ``[Z, Y, X]`` (``[C, Z, Y, X]`` for multi-channel plans) in raw units
(HU for CT). ``params``: ``spacing`` (x, y, z mm), ``origin`` (x, y, z mm) and ``direction`` (9
numbers, SimpleITK order) are all *required*: the model reorients to the plan's orientation and
resamples to its training spacing, so a guessed geometry gives a plausible but wrong segmentation
(an identity direction on a flipped scan scores Dice 0.1 instead of 0.76). MLflow's ParamSpec
cannot mark a parameter required (a missing one is filled with its default), so the signature's
defaults are empty lists, which this model refuses by name. Optional: ``mirror`` (bool),
``overlap`` (float in [0, 1)). Output: uint8 ``[Z, Y, X]`` labels on the input's grid. Over REST:
``{"inputs": [...nested lists...], "params": {"spacing": [...], "origin": [...], "direction":
[...]}}`` to ``/invocations``.

Files (no 52-million-number JSON for a 512x512x200 CT): ``params["file_b64"]`` carries a NIfTI,
NRRD or MHA file's bytes in base64 (``file_format`` names it when its magic bytes do not), or
``params["file_path"]`` names a file under ``MASKSAM_FILE_ROOT`` on a volume mounted into the
server (unset: refused); ``model_input`` is then ignored (``[[[0]]]`` satisfies the signature).
The answer is ``{"labels_b64": the label file in the same format, "format", "size_xyz",
"spacing_xyz", "structures": per-structure volume and confidence, "model_sha256"}``. In Python,
``unwrap_python_model().predict_file(path, out_path)`` does the same on a local file.

Inputs larger than ``MASKSAM_MAX_VOXELS`` values (read when the model loads; default 512**3) are
refused before any work. Every refusal is a :class:`RequestRefused`: an ``MlflowException`` with
``INVALID_PARAMETER_VALUE`` (MLflow's scoring server answers HTTP 400 with the message and no
stack trace) that is also a ``UserError`` for masksam's own callers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from masksam.errors import UserError

ARTIFACT_ONNX = "onnx"
ARTIFACT_SIDECAR = "sidecar"
ARTIFACT_DATA = "onnx_data"
GEOMETRY_PARAMS = {"spacing": 3, "origin": 3, "direction": 9}
MAX_VOXELS_ENV = "MASKSAM_MAX_VOXELS"
# 512**3 = 134,217,728 values (512 MiB as float32): every 512x512 CT up to 512 slices passes (a
# 512x512x300 abdomen is 78.6 M), a 600x512x512 request (157 M) is refused. The whole chain
# (JSON parse, float32 copy, per-class probabilities on the original grid) costs several bytes
# of memory per value, so a server with less memory sets a lower MASKSAM_MAX_VOXELS.
DEFAULT_MAX_VOXELS = 512 ** 3
TOO_LARGE = "REQUEST_TOO_LARGE"  # error_class of size refusals; `masksam serve` answers them 413
ROTATION_TOL = 1e-4


class RequestRefused(MlflowException, UserError):
    """A request the caller can fix. MLflow's scoring server turns an ``MlflowException`` into
    an HTTP 400 body with the message and without a stack trace (any other exception becomes
    "unexpected error" with the full traceback), and masksam's CLI prints a UserError as one
    line."""

    def __init__(self, message: str, error_class: str | None = None) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE, error_class=error_class)


def max_voxels_from_env() -> int:
    """The largest input (values over all channels) this process accepts:
    ``MASKSAM_MAX_VOXELS`` or :data:`DEFAULT_MAX_VOXELS`."""
    raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MAX_VOXELS_ENV}={raw!r}: must be a positive number of voxels "
                        f"(default {DEFAULT_MAX_VOXELS})")
    return value


def check_size(shape: tuple[int, ...], limit: int) -> None:
    """Refuse an input of more than ``limit`` values before anything is computed on it."""
    n = int(np.prod(shape, dtype=np.int64))
    if n > limit:
        raise RequestRefused(
            f"model_input of shape {tuple(shape)} holds {n:,} voxel values, over this server's "
            f"limit of {limit:,} (HTTP 413 Payload Too Large; {MAX_VOXELS_ENV} sets the limit "
            "when the model loads); send a smaller or cropped scan", error_class=TOO_LARGE)


def _numbers(params: dict[str, Any], name: str, n: int) -> list[float]:
    try:
        values = [float(v) for v in np.asarray(params[name], dtype=np.float64).ravel()]
    except (TypeError, ValueError) as exc:
        raise RequestRefused(f"params['{name}'] must be {n} numbers, got {params[name]!r}") from exc
    if len(values) != n:
        raise RequestRefused(f"params['{name}'] must be {n} numbers, got {len(values)}")
    if not np.all(np.isfinite(values)):
        raise RequestRefused(f"params['{name}'] = {values}: every value must be finite")
    return values


def check_direction(direction: list[float]) -> None:
    """A direction must be a rotation, possibly with a reflection (orthonormal 3x3, |det| = 1):
    anything else is not an image orientation and would shear the scan."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not (np.allclose(d @ d.T, np.eye(3), atol=ROTATION_TOL)
            and abs(abs(np.linalg.det(d)) - 1.0) <= ROTATION_TOL):
        raise RequestRefused(
            f"params['direction'] = {direction} is not an orthonormal 3x3 direction matrix "
            "(|det| = 1); pass image.GetDirection() of the scan, row by row")


def geometry(params: dict[str, Any] | None) -> tuple[list[float], list[float], list[float]]:
    """``spacing``, ``origin`` and ``direction`` from ``params``, all required and checked;
    a missing one (absent, None or the signature's empty default) is refused by name."""
    from masksam.components._scan import check_spacing

    params = params or {}
    missing = [name for name in GEOMETRY_PARAMS if params.get(name) is None or np.size(params[name]) == 0]
    if missing:
        raise RequestRefused(
            f"params {', '.join(missing)} missing: spacing, origin and direction are all required "
            "(pass list(image.GetSpacing()), list(image.GetOrigin()), list(image.GetDirection()) "
            "of the scan); a guessed geometry gives a plausible but wrong segmentation")
    spacing, origin, direction = (_numbers(params, name, n) for name, n in GEOMETRY_PARAMS.items())
    try:
        spacing = check_spacing(spacing, "params['spacing']")
    except UserError as exc:
        raise RequestRefused(str(exc)) from exc
    check_direction(direction)
    return spacing, origin, direction


def options(params: dict[str, Any] | None) -> tuple[bool, float]:
    """``mirror`` and ``overlap`` (optional), checked."""
    params = params or {}
    mirror = params.get("mirror")
    overlap = params.get("overlap")
    overlap = 0.5 if overlap is None else overlap
    if not isinstance(overlap, (int, float, np.number)) or not 0.0 <= float(overlap) < 1.0:
        raise RequestRefused(f"params['overlap'] = {overlap!r}: must be a number in [0, 1)")
    return bool(mirror), float(overlap)


FILE_ROOT_ENV = "MASKSAM_FILE_ROOT"
FILE_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")


def _sniff_format(data: bytes) -> str:
    """The image format of a request's bytes, from their magic numbers."""
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if data[:4] == b"NRRD":
        return ".nrrd"
    if data[344:348] in (b"n+1\0", b"ni1\0"):
        return ".nii"
    if b"ObjectType" in data[:1024]:
        return ".mha"
    raise RequestRefused("params['file_b64'] is not a NIfTI (.nii/.nii.gz), NRRD or MHA file; give "
                         "params['file_format'] if it is one")


def request_file(params: dict[str, Any], tmp: Path) -> Path:
    """The image file a request names: ``file_b64`` decoded into ``tmp`` (format from
    ``file_format`` or the bytes), or ``file_path`` confined to ``MASKSAM_FILE_ROOT``."""
    import base64
    import binascii

    if params.get("file_b64") and params.get("file_path"):
        raise RequestRefused("give params['file_b64'] or params['file_path'], not both")
    fmt = str(params.get("file_format") or "")
    if fmt and fmt not in FILE_FORMATS:
        raise RequestRefused(f"params['file_format'] = {fmt!r}: one of {', '.join(FILE_FORMATS)}")
    if params.get("file_b64"):
        try:
            data = base64.b64decode(str(params["file_b64"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestRefused(f"params['file_b64'] is not valid base64 ({exc})") from exc
        path = tmp / f"scan{fmt or _sniff_format(data)}"
        path.write_bytes(data)
        return path
    root = os.environ.get(FILE_ROOT_ENV, "").strip()
    if not root:
        raise RequestRefused(f"params['file_path'] is refused: this server reads no files ({FILE_ROOT_ENV} is not "
                             "set); send the file's bytes as params['file_b64']")
    path = Path(str(params["file_path"]))
    path = path if path.is_absolute() else Path(root) / path
    resolved = path.resolve()
    if not resolved.is_relative_to(Path(root).resolve()) or not resolved.is_file():
        raise RequestRefused(f"params['file_path'] = {params['file_path']!r}: no such file under {FILE_ROOT_ENV}")
    if not any(resolved.name.endswith(f) for f in FILE_FORMATS):
        raise RequestRefused(f"params['file_path']: {resolved.name} is not one of {', '.join(FILE_FORMATS)}")
    return resolved


def check_file_size(path: Path, limit: int) -> None:
    """Refuse an image file over ``limit`` voxel values from its header, before reading it."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise RequestRefused(f"the request's file cannot be read as an image ({str(exc).splitlines()[0][:200]})") from exc
    check_size((*reader.GetSize(), reader.GetNumberOfComponents()), limit)


class MaskSAMPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc over the verified ONNX graph plus masksam's preprocessing and restoring."""

    def load_context(self, context) -> None:
        from masksam.components.predictor import Predictor

        self.max_voxels = max_voxels_from_env()
        device = os.environ.get("MASKSAM_DEVICE", "auto")
        # from_onnx checks every file against the sidecar's sha256 before ONNX Runtime parses it
        self.model = Predictor.from_onnx(Path(context.artifacts[ARTIFACT_ONNX]), device=device)

    def _segment(self, images, mirror: bool, overlap: float, where: str = "model_input"):
        """The label image of one scan, through the one predictor (torch-free ONNX path)."""
        return self.model.predict_images(images, mirror=mirror, overlap=overlap, where=where).labels

    def _volume(self, model_input) -> np.ndarray:
        """The input as ``[C, Z, Y, X]``, its size checked before anything is copied."""
        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor
            model_input = next(iter(model_input.values()))
        volume = np.asanyarray(model_input)
        check_size(volume.shape, getattr(self, "max_voxels", DEFAULT_MAX_VOXELS))
        n_channels = len(self.model.plan.get("channel_names", {"0": ""}))
        if volume.ndim == 3 and n_channels == 1:
            volume = volume[None]
        if volume.ndim != 4 or volume.shape[0] != n_channels:
            raise RequestRefused(f"model_input must be [Z, Y, X] (or [C, Z, Y, X] with C = {n_channels}); "
                                 f"got shape {tuple(np.shape(model_input))}")
        if volume.dtype.kind not in "iuf":
            raise RequestRefused(f"model_input must hold numbers (raw intensities), got {volume.dtype}")
        return volume

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Segment one volume given as an array in raw units; returns uint8 labels, same shape.
        Size, geometry, options and finiteness are checked, in that order, before any work.
        With ``file_b64`` or ``file_path`` in ``params`` the scan is that image file instead
        (``model_input`` is then ignored) and the answer is the label file and the summary
        (:meth:`_predict_file_request`)."""
        import SimpleITK as sitk

        from masksam.components._scan import check_finite

        if (params or {}).get("file_b64") or (params or {}).get("file_path"):
            return self._predict_file_request(params or {})
        volume = self._volume(model_input)
        spacing, origin, direction = geometry(params)
        mirror, overlap = options(params)
        volume = volume.astype(np.float32, copy=False)
        try:
            check_finite(volume, "model_input")
        except UserError as exc:
            raise RequestRefused(str(exc)) from exc
        images = []
        for channel in volume:
            img = sitk.GetImageFromArray(channel)
            img.SetSpacing(spacing)
            img.SetOrigin(origin)
            img.SetDirection(direction)
            images.append(img)
        restored = self._segment(images, mirror, overlap)
        return sitk.GetArrayFromImage(restored).astype(np.uint8)

    def _predict_file_request(self, params: dict[str, Any]) -> dict[str, Any]:
        """A NIfTI/NRRD/MHA file in (``file_b64``: its bytes, base64; or ``file_path``: a file
        under ``MASKSAM_FILE_ROOT`` on a volume mounted into the server), the label file in the
        same format out, base64, with the per-structure summary: the geometry travels inside
        the file, so nothing can be guessed wrong. The size is checked from the header first."""
        import base64
        import tempfile

        mirror, overlap = options(params)
        with tempfile.TemporaryDirectory(prefix="masksam-request-") as tmp:
            path = request_file(params, Path(tmp))
            check_file_size(path, getattr(self, "max_voxels", DEFAULT_MAX_VOXELS))
            if self.model.n_channels != 1:
                raise RequestRefused(f"file requests carry one image; this model needs {self.model.n_channels} "
                                     "channels: send them as a [C, Z, Y, X] array with the geometry params")
            from masksam.components._io import image_suffix, read_image, write_image

            try:
                image = read_image(path, expect_dim=3)
            except UserError as exc:
                raise RequestRefused(str(exc).replace(str(path), "the request's file")) from exc
            result = self.model.predict_images([image], mirror=mirror, overlap=overlap, where="the request's file")
            suffix = image_suffix(path.name)
            out = Path(tmp) / f"labels{suffix}"
            write_image(result.labels, out)
            encoded = base64.b64encode(out.read_bytes()).decode("ascii")
        return {"labels_b64": encoded, "format": suffix, "size_xyz": list(image.GetSize()),
                "spacing_xyz": list(image.GetSpacing()), "structures": result.structures,
                "model_sha256": self.model.verified}

    def predict_file(self, path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                     mirror: bool = False, overlap: float = 0.5):
        """Segment an image file (channel files for multi-channel plans: pass a list);
        writes ``out_path`` when given and returns the SimpleITK label image."""
        from masksam.components._io import read_image, write_image

        paths = path if isinstance(path, (list, tuple)) else [path]
        restored = self._segment([read_image(p) for p in paths], mirror, overlap, where=str(paths[0]))
        if out_path is not None:
            write_image(restored, out_path)
        return restored
