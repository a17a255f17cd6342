"""Check a raw dataset (nnU-Net v2 layout) before anything trains on it.

Every problem is collected, not just the first: the schema of dataset.json, that each case has
all its channels and its label, that files are readable 3D images, that image and label share
size, spacing, origin and direction, that label values are declared, that images hold no NaN or
inf. Headers are read alone (``ImageFileReader.ReadImageInformation``); pixel data is read only
for the value checks, one file at a time.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from masksam.components._io import read_json
from masksam.components._scan import header_problems, is_nifti, nonfinite_problem, scan_nifti
from masksam.errors import UserError

log = logging.getLogger(__name__)

SPACING_RTOL = 1e-3   # relative tolerance on spacing and origin (origin floor: 1 mm scale)
DIRECTION_ATOL = 1e-4
REQUIRED_KEYS = {"channel_names": dict, "labels": dict, "numTraining": int, "file_ending": str}


@dataclass
class Problem:
    """One thing wrong (or suspicious) with one file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CaseInfo:
    """What validate saw of one training case."""

    case: str
    size_xyz: tuple[int, ...]
    spacing_xyz: tuple[float, ...]
    classes: list[int] = field(default_factory=list)


@dataclass
class ValidationReport:
    """Result of ``validate_dataset``: problems, per-case facts and class statistics."""

    root: str
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    cases: list[CaseInfo] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    class_case_fraction: dict[str, float] = field(default_factory=dict)
    class_voxel_share: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, path: str | os.PathLike, message: str) -> None:
        self.errors.append(Problem(self._rel(path), message))

    def warn(self, path: str | os.PathLike, message: str) -> None:
        self.warnings.append(Problem(self._rel(path), message))

    def _rel(self, path: str | os.PathLike) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def format(self, max_cases: int | None = None) -> str:
        """Human-readable report: case table, class frequencies, warnings, errors."""
        lines = [f"dataset {self.root}: {len(self.cases)} training cases"]
        if self.cases:
            shown = self.cases if max_cases is None else self.cases[:max_cases]
            w = max(len("case"), *(len(c.case) for c in shown))
            lines.append(f"  {'case':<{w}}  {'size_xyz':<16}  {'spacing_xyz (mm)':<22}  classes")
            for c in shown:
                size = "x".join(str(s) for s in c.size_xyz)
                spacing = " ".join(f"{s:.3g}" for s in c.spacing_xyz)
                lines.append(f"  {c.case:<{w}}  {size:<16}  {spacing:<22}  {','.join(map(str, c.classes))}")
            if len(shown) < len(self.cases):
                lines.append(f"  ... {len(self.cases) - len(shown)} more")
        if self.class_case_fraction:
            w = max(len(n) for n in self.class_case_fraction)
            lines.append(f"  {'class':<{w}}  value  cases   voxel share")
            for name, frac in self.class_case_fraction.items():
                lines.append(f"  {name:<{w}}  {self.labels[name]:>5}  {frac:6.1%}  {self.class_voxel_share[name]:10.4%}")
        lines += [f"warning: {p}" for p in self.warnings]
        lines += [f"error: {p}" for p in self.errors]
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} error(s)")
        return "\n".join(lines)


def _close(a, b, rtol: float, floor: float = 1.0) -> bool:
    return all(abs(x - y) <= rtol * max(floor, abs(x), abs(y)) for x, y in zip(a, b)) and len(a) == len(b)


def geometry_mismatch(ref: dict, other: dict) -> list[str]:
    """Ways ``other``'s geometry differs from ``ref`` beyond the tolerances (empty if none)."""
    out = []
    if tuple(ref["size"]) != tuple(other["size"]):
        out.append(f"size {tuple(other['size'])} != {tuple(ref['size'])}")
    if not _close(ref["spacing"], other["spacing"], SPACING_RTOL, floor=0.0):
        out.append(f"spacing {_fmt(other['spacing'])} != {_fmt(ref['spacing'])}")
    if not _close(ref["origin"], other["origin"], SPACING_RTOL):
        out.append(f"origin {_fmt(other['origin'])} != {_fmt(ref['origin'])}")
    if not all(abs(x - y) <= DIRECTION_ATOL for x, y in zip(ref["direction"], other["direction"])):
        out.append(f"direction {_fmt(other['direction'])} != {_fmt(ref['direction'])}")
    return out


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def read_header(path: Path) -> dict:
    """Header of an image without its pixels; raises RuntimeError if unreadable."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {
        "dim": reader.GetDimension(),
        "size": tuple(reader.GetSize()),
        "spacing": tuple(reader.GetSpacing()),
        "origin": tuple(reader.GetOrigin()),
        "direction": tuple(reader.GetDirection()),
        "components": reader.GetNumberOfComponents(),
        "pixel": sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    }


def _short(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else type(exc).__name__)
    return msg[:300]


def check_schema(meta: Any, path: Path, report: ValidationReport) -> bool:
    """dataset.json keys and types; returns False when nothing else can be checked."""
    if not isinstance(meta, dict):
        report.error(path, "must hold a JSON object")
        return False
    usable = True
    for key, typ in REQUIRED_KEYS.items():
        if key not in meta:
            report.error(path, f"required key '{key}' is missing")
            usable = False
        elif not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            report.error(path, f"'{key}' must be a {typ.__name__}, got {type(meta[key]).__name__}")
            usable = False
    if not usable:
        return False
    channels = meta["channel_names"]
    if not channels:
        report.error(path, "'channel_names' is empty (give one entry per channel, e.g. {\"0\": \"CT\"})")
        usable = False
    elif sorted(channels) != [str(i) for i in range(len(channels))]:
        report.error(path, f"'channel_names' keys must be \"0\"..\"{len(channels) - 1}\", got {sorted(channels)}")
        usable = False
    labels = meta["labels"]
    seen: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            report.error(path, f"label '{name}' is region-based ({value}); only integer labels are supported")
            usable = False
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 255:
            report.error(path, f"label '{name}' must be an integer in 0..255, got {value!r}")
            usable = False
        elif value in seen:
            report.error(path, f"labels '{seen[value]}' and '{name}' share the value {value}")
            usable = False
        else:
            seen[value] = name
    if seen.get(0) != "background":
        report.error(path, f"'background' must be label 0 (label 0 is {seen.get(0)!r})")
    if meta["numTraining"] < 0:
        report.error(path, "'numTraining' must be >= 0")
    fe = meta["file_ending"]
    if not fe.startswith("."):
        report.error(path, f"'file_ending' must start with '.', e.g. \".nii.gz\", got {fe!r}")
        usable = False
    if "fixed_test_cases" in meta and not (
        isinstance(meta["fixed_test_cases"], list) and all(isinstance(c, str) for c in meta["fixed_test_cases"])
    ):
        report.error(path, "'fixed_test_cases' must be a list of case ids")
    return usable


def _index_images(folder: Path, file_ending: str, report: ValidationReport) -> dict[str, dict[int, Path]]:
    """case -> {channel: path} for ``{case}_{cccc}{file_ending}`` files in ``folder``."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        m = pattern.match(p.name)
        if not m:
            report.warn(p, f"ignored: name is not {{case}}_{{channel:04d}}{file_ending}")
            continue
        cases.setdefault(m.group(1), {})[int(m.group(2))] = p
    return cases


def _check_header(path: Path, report: ValidationReport) -> dict | None:
    try:
        header = read_header(path)
    except RuntimeError as exc:
        report.error(path, f"cannot be read as an image ({_short(exc)})")
        return None
    problems = header_problems(header["dim"], header["size"], header["components"], header["spacing"])
    nifti = scan_nifti(path, stream=False)
    problems += nifti.problems(values=False) if nifti is not None else []
    for problem in problems:
        report.error(path, problem)
    if header["dim"] != 3 or header["components"] != 1:
        return None
    return header


def _read_pixels(path: Path, report: ValidationReport) -> np.ndarray | None:
    import SimpleITK as sitk

    nifti = scan_nifti(path)
    if nifti is not None and nifti.corrupt:
        report.error(path, nifti.corrupt)
        return None
    for problem in nifti.problems(header=False) if nifti is not None else []:
        report.error(path, problem)
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        report.error(path, f"pixel data cannot be read, the file may be truncated ({_short(exc)})")
        return None


def validate_dataset(
    directory: str | os.PathLike, strict: bool = False, read_pixels: bool = True, progress: bool = True
) -> ValidationReport:
    """Validate the raw dataset in ``directory``; never raises for bad content, reports it.

    ``strict`` turns warnings that can hide a wrong result (empty labels) into errors;
    ``read_pixels=False`` checks headers only (fast, but misses truncation and value errors).
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    report = ValidationReport(root=str(root))
    meta = _read_dataset_json(root / "dataset.json", report)
    if meta is None:
        return report
    run = _Run(report, meta, strict, read_pixels)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            report.error(d, "folder is missing")
    if not report.ok:
        return report
    image_cases = _index_images(images_dir, run.fe, report)
    label_files = _index_labels(labels_dir, run.fe, report)
    _check_case_lists(root / "dataset.json", meta, image_cases, label_files, report)
    for case in tqdm(sorted(image_cases), desc="validating", unit="case", disable=not progress):
        run.check_case(case, image_cases[case], label_files.get(case), images_dir, labels_dir)
    _check_test_images(root / "imagesTs", run, report)
    if read_pixels and report.cases:
        run.class_statistics()
    return report


def _read_dataset_json(meta_path: Path, report: ValidationReport) -> dict | None:
    """dataset.json when it is readable and its schema usable (else None, the problems reported);
    sets ``report.dataset`` and ``report.labels`` (sorted by value)."""
    try:
        meta = read_json(meta_path, what="dataset.json")
    except UserError as exc:
        report.error(meta_path, str(exc).replace(f"{meta_path}", "").strip(" :") or "unreadable")
        return None
    if not check_schema(meta, meta_path, report):
        return None
    report.dataset = meta
    report.labels = {k: v for k, v in sorted(meta["labels"].items(), key=lambda kv: kv[1])}
    return meta


def _index_labels(labels_dir: Path, fe: str, report: ValidationReport) -> dict[str, Path]:
    """case -> label file for ``{case}{file_ending}`` files in ``labels_dir``."""
    label_files = {}
    for p in sorted(labels_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.name.endswith(fe):
            label_files[p.name[: -len(fe)]] = p
        else:
            report.warn(p, f"ignored: does not end with file_ending {fe}")
    return label_files


def _check_case_lists(meta_path: Path, meta: dict, image_cases: dict, label_files: dict[str, Path],
                      report: ValidationReport) -> None:
    """Labels without images, numTraining against imagesTr, fixed_test_cases that do not exist."""
    fe = meta["file_ending"]
    for case in sorted(set(label_files) - set(image_cases)):
        report.error(label_files[case], f"label without image: imagesTr/{case}_0000{fe} is missing")
    if meta["numTraining"] != len(image_cases):
        report.error(meta_path, f"numTraining is {meta['numTraining']} but imagesTr holds {len(image_cases)} cases")
    for case in meta.get("fixed_test_cases", []) or []:
        if isinstance(case, str) and case not in image_cases:
            report.error(meta_path, f"fixed_test_cases names '{case}', which is not a training case")


def _check_test_images(images_ts: Path, run: "_Run", report: ValidationReport) -> None:
    """imagesTs/ (optional): every declared channel present, every header readable and 3D."""
    if not images_ts.is_dir():
        return
    for case, channels in _index_images(images_ts, run.fe, report).items():
        for c in range(run.n_channels):
            if c not in channels:
                report.error(images_ts / f"{case}_{c:04d}{run.fe}", "channel image is missing")
            else:
                _check_header(channels[c], report)


class _Run:
    """One validation pass over the training cases: the settings and the label statistics."""

    def __init__(self, report: ValidationReport, meta: dict, strict: bool, read_pixels: bool) -> None:
        self.report, self.strict, self.read_pixels = report, strict, read_pixels
        self.fe = meta["file_ending"]
        self.n_channels = len(meta["channel_names"])
        self.declared = np.zeros(256, bool)
        self.declared[list(report.labels.values())] = True
        self.value_count = np.zeros(256, np.int64)
        self.case_count = np.zeros(256, np.int64)

    def check_case(self, case: str, channels: dict[int, Path], label_path: Path | None,
                   images_dir: Path, labels_dir: Path) -> None:
        """Channels present and declared, headers, geometry against the label, pixel values;
        a case whose label header is usable is added to ``report.cases``."""
        report = self.report
        for c in range(self.n_channels):
            if c not in channels:
                report.error(images_dir / f"{case}_{c:04d}{self.fe}", "channel image is missing")
        for c in sorted(set(channels) - set(range(self.n_channels))):
            report.error(channels[c], f"channel {c} is not declared in channel_names (0..{self.n_channels - 1})")
        if label_path is None:
            report.error(labels_dir / f"{case}{self.fe}", "label file is missing")
        label_header = _check_header(label_path, report) if label_path is not None else None
        self._check_channels(channels, label_header)
        if label_header is None:
            return
        classes = self._label_classes(label_path) if self.read_pixels else []
        if classes is not None:
            report.cases.append(CaseInfo(case, label_header["size"], label_header["spacing"], classes))

    def _check_channels(self, channels: dict[int, Path], label_header: dict | None) -> None:
        """Each declared channel's header, its geometry against the label (else channel 0), its values."""
        ref = label_header
        for c in sorted(ch for ch in channels if ch < self.n_channels):
            header = _check_header(channels[c], self.report)
            if header is None:
                continue
            if ref is None:
                ref = header
            else:
                for what in geometry_mismatch(ref, header):
                    other = "label" if ref is label_header else "channel 0"
                    self.report.error(channels[c], f"geometry differs from the {other}: {what}")
            if self.read_pixels:
                arr = _read_pixels(channels[c], self.report)
                problem = nonfinite_problem(arr) if arr is not None and not is_nifti(channels[c]) else None
                if problem:
                    self.report.error(channels[c], problem)

    def _label_classes(self, label_path: Path) -> list[int] | None:
        """The label's values (counted into the statistics); None when they are not integers
        (the case is then left out of the case table)."""
        report = self.report
        arr = _read_pixels(label_path, report)
        if arr is None:
            return []
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                report.error(label_path, "label holds non-integer values (write labels as integers)")
                return None
            report.warn(label_path, f"label stored as {arr.dtype}; integers (uint8) are expected")
        values, counts = np.unique(arr, return_counts=True)
        values = values.astype(np.int64)
        undeclared = [int(v) for v in values if v < 0 or v > 255 or not self.declared[v]]
        if undeclared:
            report.error(label_path, f"values {undeclared} are not declared in dataset.json labels")
        ok = (values >= 0) & (values <= 255)
        np.add.at(self.value_count, values[ok], counts[ok])
        np.add.at(self.case_count, values[ok], 1)
        classes = [int(v) for v in values]
        if not any(v > 0 for v in classes):
            (report.error if self.strict else report.warn)(label_path, "label is empty (background only)")
        return classes

    def class_statistics(self) -> None:
        """Per class: the fraction of cases holding it and its share of all label voxels."""
        report = self.report
        total = max(int(self.value_count.sum()), 1)
        n = len(report.cases)
        for name, value in report.labels.items():
            report.class_case_fraction[name] = float(self.case_count[value]) / n
            report.class_voxel_share[name] = float(self.value_count[value]) / total
