"""One input check for every reader of a scan.

``data validate``, ``preprocess``, ``predict``, ``evaluate``, the MLflow pyfunc and the model
server all read scans; each runs the same checks here, so a truncated, non-finite or
absurdly-spaced scan is refused with the same message, naming the file (or the request), wherever
it enters.

Three defects SimpleITK hides are found on the raw NIfTI stream (decompressed in chunks, once):
a truncated ``.nii.gz`` or ``.nii`` reads without error with the missing voxels filled in, NaN and
inf voxels of a float NIfTI read back as 0, and a pixdim of 0 reads as a spacing of 1 mm. Other
formats (MHA, NRRD) keep NaN and refuse spacing 0 themselves, so their values are checked on the
array SimpleITK returns.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from masksam.components._io import read_json
from masksam.errors import UserError

if TYPE_CHECKING:  # SimpleITK is imported where a file is read, not at import time
    import SimpleITK as sitk

# Voxel spacings outside this range (mm) are header errors, not anatomy: 1 micrometre to 50 cm.
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 500.0
CHUNK_BYTES = 1 << 20
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The NIfTI-1 header (sizeof_hdr 348): (offset, struct code) of the fields read. NIfTI-2 files
# (sizeof_hdr 540) get SimpleITK's checks only.
_NIFTI1_SIZE = 348
_NIFTI1_FIELDS = {"datatype": (70, "h"), "bitpix": (72, "h"), "dim": (40, "8h"), "pixdim": (76, "8f"),
                  "vox_offset": (108, "f")}
_FLOAT_CODES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64 voxels
_AXES = "xyz"


# ----------------------------------------------------------------------------- value checks


def spacing_problem(spacing: Iterable[float]) -> str | None:
    """Why ``spacing`` (mm) is not usable, or None: non-finite, non-positive or absurd values."""
    values = [float(v) for v in spacing]
    bad = [v for v in values if not np.isfinite(v) or not MIN_SPACING_MM <= v <= MAX_SPACING_MM]
    if not bad:
        return None
    return (f"voxel spacing {tuple(values)} mm is not usable (each value must lie in "
            f"[{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm); fix the image header (spacing 0 in a "
            "NIfTI pixdim field is not 1 mm)")


def check_spacing(spacing: Iterable[float], where: str) -> list[float]:
    """Return ``spacing`` as floats; a missing, non-finite, non-positive or absurd value is a
    UserError naming ``where`` (a file or a request parameter)."""
    values = [float(v) for v in spacing]
    problem = spacing_problem(values)
    if problem:
        raise UserError(f"{where}: {problem}")
    return values


def _nonfinite_message(count: int, total: int) -> str:
    return f"{count} of {total} voxel(s) are NaN or inf; fix or re-export the scan"


def nonfinite_problem(array: np.ndarray) -> str | None:
    """Why ``array`` is not a usable scan (NaN or inf voxels, counted), or None."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return None
    nonfinite = int(array.size - np.count_nonzero(np.isfinite(array)))
    return _nonfinite_message(nonfinite, array.size) if nonfinite else None


def check_finite(array: np.ndarray, where: str) -> None:
    """A scan holding NaN or inf voxels is a UserError naming ``where`` and the count."""
    problem = nonfinite_problem(array)
    if problem:
        raise UserError(f"{where}: {problem}")


def header_problems(dim: int, size: Sequence[int], components: int, spacing: Sequence[float],
                    expect_dim: int | None = 3) -> list[str]:
    """What is wrong with an image header: dimensionality (when ``expect_dim`` is given), more
    than one value per voxel, unusable spacing. A wrong dimensionality or a vector image stops
    the list: the other checks would only repeat it."""
    if expect_dim is not None and dim != expect_dim:
        return [f"expected a {expect_dim}D image, got {dim}D (size {tuple(size)})"]
    if components != 1:
        return [f"expected one value per voxel, got {components} (vector image); give one scalar "
                "image per channel (_0000, _0001, ...)"]
    problem = spacing_problem(spacing)
    return [problem] if problem else []


# ----------------------------------------------------------------------------- raw NIfTI stream


@dataclass(frozen=True)
class NiftiScan:
    """What the raw bytes of a NIfTI file show that SimpleITK hides.

    ``corrupt``: why the file is truncated or corrupt (None if whole); ``nonfinite``: NaN/inf
    voxels counted in float data (only when the values were streamed); ``voxels``: voxels the
    header declares; ``zero_pixdim``: spatial axes whose pixdim is 0 or not finite.
    """

    corrupt: str | None = None
    nonfinite: int = 0
    voxels: int = 0
    zero_pixdim: tuple[str, ...] = ()
    streamed: bool = False

    def problems(self, header: bool = True, values: bool = True) -> list[str]:
        """Messages for the header defects and/or the value defects found."""
        out = []
        if header and self.zero_pixdim:
            out.append(f"voxel spacing of axis {', '.join(self.zero_pixdim)} is 0 in the NIfTI header "
                       "(pixdim; SimpleITK would read it as 1 mm); write the true spacing into the header")
        if values and self.corrupt:
            out.append(self.corrupt)
        if values and self.nonfinite:
            out.append(_nonfinite_message(self.nonfinite, self.voxels))
        return out


@dataclass(frozen=True)
class _NiftiHeader:
    dims: tuple[int, ...]
    pixdim: tuple[float, ...]
    float_dtype: np.dtype | None
    offset: int
    data_bytes: int


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _parse_nifti_header(head: bytes) -> _NiftiHeader | None:
    """The fields of a NIfTI-1 header needed here (either byte order), or None."""
    for endian in "<>":
        if len(head) < _NIFTI1_SIZE or struct.unpack(endian + "i", head[:4])[0] != _NIFTI1_SIZE:
            continue
        f = {k: struct.unpack_from(endian + code, head, off) for k, (off, code) in _NIFTI1_FIELDS.items()}
        dim = [int(d) for d in f["dim"]]
        ndim = max(0, min(dim[0], 7))
        dims = tuple(max(d, 1) for d in dim[1:1 + ndim])
        bitpix = max(int(f["bitpix"][0]), 8)
        kind = _FLOAT_CODES.get(int(f["datatype"][0]))
        return _NiftiHeader(dims=dims, pixdim=tuple(float(p) for p in f["pixdim"][1:1 + min(ndim, 3)]),
                            float_dtype=np.dtype(endian + kind) if kind else None,
                            # a single-file NIfTI's data never starts inside the header (the
                            # NIfTI library reads a smaller vox_offset as 352, so does this)
                            offset=max(int(f["vox_offset"][0]), _NIFTI1_SIZE + 4),
                            data_bytes=int(np.prod(dims, dtype=np.int64)) * bitpix // 8)
    return None


def _count_nonfinite(data: bytes, dtype: np.dtype) -> tuple[int, bytes]:
    """NaN/inf among the whole items of ``data``; the bytes of a split trailing item are returned."""
    usable = len(data) - len(data) % dtype.itemsize
    count = int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype)))) if usable else 0
    return count, data[usable:]


def scan_nifti(path: str | os.PathLike, stream: bool = True) -> NiftiScan | None:
    """Check a NIfTI file on its raw bytes; None for files not named ``.nii``/``.nii.gz`` or whose
    header is not NIfTI (SimpleITK's own error then names the problem).

    ``stream=False`` reads the header alone (pixdim); otherwise every byte is read once, in
    chunks, so memory stays flat: truncation, corrupt compression and NaN/inf in float data.
    """
    path = Path(path)
    if not is_nifti(path):
        return None
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(_NIFTI1_SIZE + 4)  # the header and its extension flag
            header = _parse_nifti_header(head)
            if header is None:
                if len(head) < _NIFTI1_SIZE:
                    return NiftiScan(corrupt=f"file is truncated ({len(head)} bytes, shorter than a "
                                     "NIfTI header)", streamed=True)
                return None
            zero = tuple(_AXES[i] for i, p in enumerate(header.pixdim) if not np.isfinite(p) or p == 0)
            voxels = int(np.prod(header.dims, dtype=np.int64))
            if not stream:
                return NiftiScan(voxels=voxels, zero_pixdim=zero)
            total, nonfinite, dtype, rest = len(head), 0, header.float_dtype, b""
            for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                skip = max(0, header.offset - total)
                total += len(chunk)
                if dtype is not None and len(chunk) > skip:
                    count, rest = _count_nonfinite(rest + chunk[skip:], dtype)
                    nonfinite += count
    except (EOFError, OSError, zlib.error) as exc:
        return NiftiScan(corrupt=f"file is truncated or corrupt ({exc})", streamed=True)
    need = header.offset + header.data_bytes
    corrupt = (f"file is truncated: {total} bytes of data, the header needs {need}"
               if total < need else None)
    return NiftiScan(corrupt=corrupt, nonfinite=nonfinite, voxels=voxels, zero_pixdim=zero, streamed=True)


# ----------------------------------------------------------------------------- one file


def read_sitk(path: str | os.PathLike) -> "sitk.Image":
    """``SimpleITK.ReadImage``, its exception turned into a UserError naming the file."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else type(exc).__name__)
        raise UserError(f"{path}: cannot be read as an image ({detail[:300]})") from exc


def image_problems(image: "sitk.Image", expect_dim: int | None = 3,
                   nifti: NiftiScan | None = None) -> list[str]:
    """Every problem of a read image: the header checks, and NaN/inf voxels (from ``nifti``'s
    streamed count for NIfTI files, whose NaN SimpleITK reads as 0; on the array otherwise)."""
    import SimpleITK as sitk

    problems = nifti.problems() if nifti is not None else []
    problems += header_problems(image.GetDimension(), image.GetSize(),
                                image.GetNumberOfComponentsPerPixel(), image.GetSpacing(), expect_dim)
    if nifti is None or not nifti.streamed:
        problem = nonfinite_problem(sitk.GetArrayViewFromImage(image))
        if problem:
            problems.append(problem)
    return problems


def check_scan_file(path: str | os.PathLike, expect_dim: int | None = 3) -> "sitk.Image":
    """Read a scan (or label map) and run every check on it; return the SimpleITK image.

    Any problem (missing, unreadable, truncated, corrupt, NaN/inf voxels, NIfTI pixdim 0,
    unusable spacing, wrong dimensionality, vector voxels) is a UserError naming the file and
    listing every problem found. The file is read once by SimpleITK, and NIfTI files once more
    as a raw stream (the only way to see truncation and NaN there).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    nifti = scan_nifti(path)
    if nifti is not None and nifti.corrupt:
        raise UserError(f"{path}: " + "; ".join(nifti.problems()))
    image = read_sitk(path)
    problems = image_problems(image, expect_dim, nifti)
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return image


def read_dataset_json(path: str | os.PathLike, what: str = "dataset.json") -> dict:
    """dataset.json as a dict; a missing or malformed file, or one whose top level is not a JSON
    object (an array, a string, ...), is a UserError naming it."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object ({{\"channel_names\": ..., \"labels\": "
                        f"..., ...}}), not a {type(data).__name__}")
    return data
