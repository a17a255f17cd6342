"""``masksam predict``: segment new scans with a trained, exported or registered MaskSAM.

Each scan goes preprocess_case -> sliding-window inference over slabs -> restore_to_original
(class probabilities resampled back to the original spacing, then argmax, as nnU-Net does),
so the label map has the input's exact size, spacing, origin and direction. Beside each label
map a JSON summary gives, per structure, its volume in mL and its mean confidence. A scan that
cannot be read, or fails the input checks every reader shares (truncated, NaN/inf voxels, NIfTI
pixdim 0, unusable spacing, not 3D), or whose case name several files claim, is reported by name
and the others are still processed; the exit status is non-zero when any failed. Predict never
writes over an input file: such an output folder is refused before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from masksam.components._io import (IMAGE_SUFFIXES, ensure_writable_dir, image_suffix, read_image, write_image,
                                    write_json)
from masksam.components._loading import DEVICES, LoadedModel, load_model
from masksam.errors import UserError

log = logging.getLogger(__name__)

CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha"}


@dataclass
class Scan:
    """One case to segment: its channel files in channel order, and where the outputs go."""

    case: str
    files: list[Path]
    suffix: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    case: str
    ok: bool
    output: Path | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None


def find_scans(src: str | os.PathLike, n_channels: int) -> tuple[list[Scan], list[Path]]:
    """Group image files into cases (nnU-Net ``{case}_{channel:04d}`` naming for several
    channels; any other name is a one-channel case). Returns (scans, ignored non-image files)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"-i {src}: no such file or folder")
    if src.is_file():
        candidates, ignored = [src], []
    else:
        entries = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        candidates = [p for p in entries if image_suffix(p)]
        ignored = [p for p in entries if not image_suffix(p)]
        if not candidates:
            raise UserError(f"-i {src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    groups: dict[str, dict[int, dict[Path, None]]] = {}  # case -> channel -> files (ordered set)
    suffixes: dict[str, str] = {}
    for path in candidates:
        suffix = image_suffix(path) or "".join(path.suffixes) or ".nii.gz"
        stem = path.name[: len(path.name) - len(suffix)] if image_suffix(path) else path.stem
        m = CHANNEL_RE.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        if src.is_file() and m and n_channels > 1:  # one channel file named: pick up its siblings
            for sib in sorted(path.parent.glob(f"{case}_[0-9][0-9][0-9][0-9]{suffix}")):
                sib_channel = int(sib.name[len(case) + 1:len(case) + 5])
                groups.setdefault(case, {}).setdefault(sib_channel, {})[sib] = None
        groups.setdefault(case, {}).setdefault(channel, {})[path] = None
        suffixes[case] = suffix
    scans = []
    for case, chans in sorted(groups.items()):
        scan = Scan(case, [next(iter(chans[c])) for c in sorted(chans)], suffixes[case])
        clashes = sorted(p.name for files in chans.values() if len(files) > 1 for p in files)
        if clashes:
            scan.files = sorted(p for files in chans.values() for p in files)
            scan.problems.append(
                f"case '{case}' is given by several files ({', '.join(clashes)}) and predict writes "
                f"one output per case; keep one file per case (per channel: {case}_0000, "
                f"{case}_0001, ...) in the input folder and move the others out")
        elif sorted(chans) != list(range(n_channels)):
            scan.problems.append(
                f"case '{case}' has channel files {sorted(chans)} ({', '.join(p.name for p in scan.files)}); "
                f"the model expects channels 0..{n_channels - 1} named {case}_0000{scan.suffix}, ...")
        scans.append(scan)
    return scans, ignored


def structure_summary(labels_zyx: np.ndarray, probs: np.ndarray, restored_labels: np.ndarray,
                      spacing_xyz: Iterable[float], names: dict[str, int]) -> dict[str, Any]:
    """Per structure: voxels and volume (mL) on the original grid, and mean confidence.

    Confidence is the mean, over the structure's voxels on the preprocessed grid, of the
    winning class's probability after normalising the per-class maps to sum to 1 (Mask2Former
    maps are sums over queries, not probabilities, until normalised).
    """
    voxel_ml = float(np.prod(list(spacing_xyz))) / 1000.0
    counts = np.bincount(restored_labels.ravel(), minlength=max(names.values()) + 1)
    total = probs.sum(axis=0)
    top = probs.max(axis=0) / np.maximum(total, 1e-6)
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


def _match_header(restored, original, path: Path) -> None:
    """Give the label map the input's header bit for bit (JSON round-trips of the geometry can
    move spacing/origin by an ulp); a real mismatch is an error, never written silently."""
    same = (restored.GetSize() == original.GetSize()
            and np.allclose(restored.GetSpacing(), original.GetSpacing(), rtol=1e-6, atol=1e-9)
            and np.allclose(restored.GetOrigin(), original.GetOrigin(), rtol=0, atol=1e-4)
            and np.allclose(restored.GetDirection(), original.GetDirection(), atol=1e-6))
    if not same:
        raise RuntimeError(f"{path}: restored label map geometry {restored.GetSize()} "
                           f"{restored.GetSpacing()} differs from the input's {original.GetSize()} "
                           f"{original.GetSpacing()}")
    restored.CopyInformation(original)


def _targets(scan: Scan, out: Path, out_format: str | None) -> tuple[Path, Path]:
    """The label map and the JSON summary predict writes for ``scan``."""
    suffix = FORMATS[out_format] if out_format else scan.suffix
    return out / f"{scan.case}{suffix}", out / f"{scan.case}.json"


def _refuse_overwriting_inputs(scans: list[Scan], ignored: list[Path], out: Path,
                               out_format: str | None) -> None:
    """Predict never writes over a file it was given: an output (label map or JSON summary)
    that is an input file (``-o`` equal to the input folder, links included) is refused up
    front, before anything is written."""
    inputs: dict[tuple[int, int], Path] = {}
    for path in [p for scan in scans for p in scan.files] + list(ignored):
        with contextlib.suppress(OSError):
            st = path.stat()
            inputs[(st.st_dev, st.st_ino)] = path
    clashes = []
    for scan in scans:
        for target in _targets(scan, out, out_format):
            with contextlib.suppress(OSError):
                st = target.stat()
                same = inputs.get((st.st_dev, st.st_ino))
                if same is not None:
                    clashes.append(f"{target.name} (case '{scan.case}') is the input {same}")
    if clashes:
        shown = "; ".join(clashes[:3]) + (f"; and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        raise UserError(f"-o {out}: predict would write over its inputs: {shown}. Nothing was written; "
                        "choose an output folder that holds no input scan")


def _prepare(scan: Scan, plan: dict):
    """Read and preprocess one scan (runs in a worker thread)."""
    from masksam.components.preprocess import preprocess_case

    if scan.problems:
        raise UserError("; ".join(scan.problems))
    # the input checks every reader shares: truncation, NaN/inf, spacing, 3D, one value per voxel
    images = [read_image(p, expect_dim=3) for p in scan.files]
    try:
        image, _, properties = preprocess_case(images, None, plan)
    except UserError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{scan.files[0]}: cannot be preprocessed ({str(exc)[:300]})") from exc
    return images[0], image, properties


def _infer(model: LoadedModel, image: np.ndarray, mirror: bool, overlap: float, batch_size: int,
           progress: bool):
    """Sliding-window inference; ``mirror`` averages over flips of the two in-plane axes (the
    flips training augments with)."""
    from masksam.model.inference import sliding_window_inference

    cfg = model.config
    return sliding_window_inference(
        model.predict_slab, image, slab_depth=int(cfg["slab_depth"]), img_size=int(cfg["img_size"]),
        num_classes=int(cfg["num_classes"]), overlap=overlap, mirror_axes=(1, 2) if mirror else (),
        batch_size=batch_size, device=model.device if model.backend == "torch" else "cpu",
        return_probs=True, progress=progress)


def predict(src: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike | LoadedModel, *,
            device: str = "auto", mirror: bool = False, overlap: float = 0.5, workers: int = 2,
            batch_size: int = 1, out_format: str | None = None, threads: int | None = None,
            progress: bool = True) -> list[Outcome]:
    """Segment every scan in ``src`` (file or folder) into ``out``; return one Outcome per scan.

    Per-scan errors are caught and reported in the outcomes (the CLI turns them into the exit
    status); errors about the model or the output folder raise UserError at once.
    """
    import SimpleITK as sitk
    from tqdm import tqdm

    from masksam.components.preprocess import restore_to_original

    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap must be in [0, 1), got {overlap}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if out_format is not None and out_format not in FORMATS:
        raise UserError(f"--format {out_format!r}: choose one of {', '.join(FORMATS)}")
    if not Path(src).exists():
        raise UserError(f"-i {src}: no such file or folder")
    out = ensure_writable_dir(out, "-o")  # before the model loads: an unusable -o fails in seconds
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, threads=threads)
    n_channels = len(loaded.plan.get("channel_names", {"0": "CT"}))
    scans, ignored = find_scans(src, n_channels)
    for path in ignored:
        log.warning("%s: not an image (%s); ignored", path, ", ".join(IMAGE_SUFFIXES))
    _refuse_overwriting_inputs(scans, ignored, out, out_format)
    names = loaded.labels
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict[int, Future] = {}

        def submit(i: int) -> None:
            if i < len(scans) and i not in pending:
                pending[i] = pool.submit(_prepare, scans[i], loaded.plan)

        for i in range(min(workers, len(scans))):
            submit(i)
        bar = tqdm(scans, desc="predict", unit="scan", disable=not progress)
        for i, scan in enumerate(bar):
            bar.set_postfix_str(scan.case)
            started = time.time()
            future = pending.pop(i)
            submit(i + workers)
            try:
                first, image, properties = future.result()
                big = image.shape[1] > 4 * int(loaded.config["slab_depth"])
                probs, labels = _infer(loaded, image, mirror, overlap, batch_size, progress and big)
                probs = np.asarray(probs)
                labels = np.asarray(labels).astype(np.uint8)
                # class probabilities go back to the original spacing, then argmax (nnU-Net's way)
                restored = restore_to_original(probs, properties)
                _match_header(restored, first, scan.files[0])
                target = _targets(scan, out, out_format)[0]
                write_image(restored, target)
                summary = {
                    "case": scan.case,
                    "inputs": [str(p) for p in scan.files],
                    "output": str(target),
                    "model": loaded.source,
                    "backend": loaded.backend,
                    "device": loaded.device,
                    "mirror": mirror,
                    "overlap": overlap,
                    "size_xyz": list(first.GetSize()),
                    "spacing_xyz": list(first.GetSpacing()),
                    "structures": structure_summary(labels, probs, sitk.GetArrayViewFromImage(restored),
                                                    first.GetSpacing(), names),
                    "seconds": round(time.time() - started, 3),
                }
                write_json(out / f"{scan.case}.json", summary)
                outcomes.append(Outcome(scan.case, True, target, summary=summary))
            except UserError as exc:
                log.error("%s", exc)
                outcomes.append(Outcome(scan.case, False, error=str(exc)))
            except (MemoryError, RuntimeError, ValueError, OSError) as exc:
                msg = f"case '{scan.case}' ({', '.join(map(str, scan.files))}): {type(exc).__name__}: {exc}"
                log.error("%s", msg)
                outcomes.append(Outcome(scan.case, False, error=msg))
    return outcomes


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="segment new scans (NIfTI/NRRD/MHA file or folder)",
        description="Segment scans with a checkpoint directory, an exported model.onnx or an MLflow "
        "model URI. Label maps are written in each input's exact geometry, with a JSON summary "
        "(volume in mL and mean confidence per structure) beside each.")
    p.add_argument("-i", "--input", required=True, help="an image file, or a folder of them; several "
                   "channels per case use nnU-Net naming CASE_0000.nii.gz, CASE_0001.nii.gz, ...")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--model", required=True, help="checkpoint directory (masksam train), model.onnx "
                   "(masksam export; its .json sidecar beside it) or a registered model "
                   "(models:/masksam@champion, models:/masksam/3), verified file by file against the "
                   "registry's record before it runs")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: best available; cpu; cuda; "
                   "tensorrt (ONNX models: ONNX Runtime's TensorRT provider). A requested provider "
                   "that is missing is an error, never a silent CPU fallback")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring over the in-plane axes "
                   "(4x the compute, usually slightly better)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) "
                   "(default 0.5)")
    p.add_argument("--workers", type=int, default=2, help="threads reading and preprocessing the next "
                   "scans while the current one is segmented (default 2)")
    p.add_argument("--batch-size", type=int, default=1, help="slabs per forward pass (default 1)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--format", choices=sorted(FORMATS), help="output format (default: the input's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    outcomes = predict(args.input, args.output, args.model, device=args.device, mirror=args.mirror,
                       overlap=args.overlap, workers=args.workers, batch_size=args.batch_size,
                       out_format=args.format, threads=args.threads, progress=not args.no_progress)
    failed = [o for o in outcomes if not o.ok]
    print(f"masksam predict: {len(outcomes) - len(failed)} of {len(outcomes)} scans segmented into "
          f"{args.output}" + (f"; {len(failed)} failed: {', '.join(o.case for o in failed)}" if failed else ""))
    return 1 if failed else 0
