"""``masksam predict``: segment new scans with a trained, exported or registered MaskSAM.

Each scan goes through :class:`~masksam.components.predictor.Predictor`: preprocess_case ->
sliding-window inference over slabs -> restore_to_original (class probabilities resampled back to
the original spacing, then argmax, as nnU-Net does), so the label map has the input's exact size,
spacing, origin and direction. Several ``--model`` values form an ensemble (their class
probabilities are averaged before the argmax, like nnU-Net's ``-f 0 1 2 3 4``). Beside each label
map a JSON summary gives, per structure, its volume in mL and its mean confidence, and the model
that ran (a registered model's version and sha256); a 3D Slicer ``CASE.seg.nrrd`` carries the
structure names and colours, as do the folder's ``labels.ctbl`` (Slicer) and
``labels.itksnap.txt`` (ITK-SNAP) for the plain label maps. A scan that
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
from typing import Any, Sequence

from masksam.components._io import (IMAGE_SUFFIXES, ensure_writable_dir, image_suffix, read_image, write_image,
                                    write_json)
from masksam.components._loading import DEVICES
from masksam.components._viewer_files import (ITKSNAP_LABELS, SLICER_COLOUR_TABLE, write_label_tables,
                                              write_seg_nrrd)
from masksam.components.predictor import Predictor
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


def _targets(scan: Scan, out: Path, out_format: str | None) -> tuple[Path, Path, Path]:
    """The label map, the JSON summary and the 3D Slicer segmentation predict writes for ``scan``."""
    suffix = FORMATS[out_format] if out_format else scan.suffix
    return out / f"{scan.case}{suffix}", out / f"{scan.case}.json", out / f"{scan.case}.seg.nrrd"


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
    tables = [out / SLICER_COLOUR_TABLE, out / ITKSNAP_LABELS]
    for scan in scans:
        for target in [*_targets(scan, out, out_format), *tables]:
            with contextlib.suppress(OSError):
                st = target.stat()
                same = inputs.get((st.st_dev, st.st_ino))
                if same is not None:
                    clashes.append(f"{target.name} (case '{scan.case}') is the input {same}")
    if clashes:
        shown = "; ".join(clashes[:3]) + (f"; and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        raise UserError(f"-o {out}: predict would write over its inputs: {shown}. Nothing was written; "
                        "choose an output folder that holds no input scan")


def _prepare(scan: Scan, predictor: Predictor):
    """Read and preprocess one scan (runs in a worker thread)."""
    if scan.problems:
        raise UserError("; ".join(scan.problems))
    # the input checks every reader shares: truncation, NaN/inf, spacing, 3D, one value per voxel
    images = [read_image(p, expect_dim=3) for p in scan.files]
    image, properties = predictor.preprocess(images, str(scan.files[0]))
    return images[0], image, properties


def _segment(predictor: Predictor, scan: Scan, prepared, out: Path, out_format: str | None,
             options: dict[str, Any], progress: bool, viewer_files: bool = True) -> Outcome:
    """Predict one preprocessed scan, write its label map and JSON summary."""
    started = time.time()
    first, image, properties = prepared
    big = image.shape[1] > 4 * int(predictor.config["slab_depth"])
    result = predictor.predict_case(image, properties, original=first, progress=progress and big, **options)
    target, _, seg = _targets(scan, out, out_format)
    write_image(result.labels, target)
    if viewer_files:  # the same labels with names and colours, for 3D Slicer
        write_seg_nrrd(result.labels, predictor.labels, seg)
    summary = {
        "case": scan.case,
        "inputs": [str(p) for p in scan.files],
        "output": str(target),
        "model": predictor.source,
        # what exactly ran: the registered version an alias resolved to, and the files' sha256
        **({"model_version": predictor.members[0].registry} if predictor.members[0].registry else {}),
        "model_sha256": predictor.verified,
        **({"ensemble": predictor.sources} if len(predictor.members) > 1 else {}),
        "backend": predictor.backend,
        "device": predictor.device,
        "mirror": options["mirror"],
        "overlap": options["overlap"],
        "size_xyz": list(first.GetSize()),
        "spacing_xyz": list(first.GetSpacing()),
        "structures": result.structures,
        **({"slicer_segmentation": str(seg)} if viewer_files else {}),
        "seconds": round(time.time() - started, 3),
    }
    write_json(out / f"{scan.case}.json", summary)
    return Outcome(scan.case, True, target, summary=summary)


def predict(src: str | os.PathLike, out: str | os.PathLike,
            model: str | os.PathLike | Sequence[str | os.PathLike] | Predictor, *,
            device: str = "auto", mirror: bool = False, overlap: float = 0.5, workers: int = 2,
            batch_size: int = 1, out_format: str | None = None, threads: int | None = None,
            progress: bool = True, viewer_files: bool = True) -> list[Outcome]:
    """Segment every scan in ``src`` (file or folder) into ``out``; return one Outcome per scan.

    ``model`` is one reference (training directory, ``model.onnx``, ``models:/`` URI), several
    (an ensemble: averaged probabilities) or a :class:`Predictor`. Per-scan errors are caught and
    reported in the outcomes (the CLI turns them into the exit status); errors about the model
    or the output folder raise UserError at once. ``viewer_files``: beside each label map a 3D
    Slicer ``CASE.seg.nrrd`` with structure names and colours, and per folder the colour tables
    of Slicer and ITK-SNAP (``_viewer_files``).
    """
    from tqdm import tqdm

    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap must be in [0, 1), got {overlap}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if out_format is not None and out_format not in FORMATS:
        raise UserError(f"--format {out_format!r}: choose one of {', '.join(FORMATS)}")
    if not Path(src).exists():
        raise UserError(f"-i {src}: no such file or folder")
    out = ensure_writable_dir(out, "-o")  # before the model loads: an unusable -o fails in seconds
    predictor = model if isinstance(model, Predictor) else Predictor.load(model, device=device, threads=threads)
    scans, ignored = find_scans(src, predictor.n_channels)
    for path in ignored:
        log.warning("%s: not an image (%s); ignored", path, ", ".join(IMAGE_SUFFIXES))
    _refuse_overwriting_inputs(scans, ignored, out, out_format)
    options = {"mirror": mirror, "overlap": overlap, "batch_size": batch_size}
    if viewer_files and scans:  # one colour table per folder: every label map in it shares it
        write_label_tables(predictor.labels, out)
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict[int, Future] = {}

        def submit(i: int) -> None:
            if i < len(scans) and i not in pending:
                pending[i] = pool.submit(_prepare, scans[i], predictor)

        for i in range(min(workers, len(scans))):
            submit(i)
        bar = tqdm(scans, desc="predict", unit="scan", disable=not progress)
        for i, scan in enumerate(bar):
            bar.set_postfix_str(scan.case)
            future = pending.pop(i)
            submit(i + workers)
            try:
                outcomes.append(_segment(predictor, scan, future.result(), out, out_format, options, progress,
                                         viewer_files))
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
        description="Segment scans with a training directory, an exported model.onnx or an MLflow "
        "model URI (or an ensemble of several). Label maps are written in each input's exact geometry, with a JSON summary "
        "(volume in mL and mean confidence per structure) beside each.")
    p.add_argument("-i", "--input", required=True, help="an image file, or a folder of them; several "
                   "channels per case use nnU-Net naming CASE_0000.nii.gz, CASE_0001.nii.gz, ...")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--model", required=True, nargs="+", metavar="MODEL",
                   help="training directory (masksam train), model.onnx (masksam export; its .json "
                   "sidecar beside it) or a registered model (models:/masksam@champion, "
                   "models:/masksam/3), verified file by file against the registry's record before "
                   "it runs. Several models form an ensemble (e.g. the 5 folds, like nnU-Net's -f 0 1 "
                   "2 3 4): their class probabilities are averaged before the argmax; they must share "
                   "the preprocessing plan and the labels")
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
    p.add_argument("--no-viewer-files", action="store_true", help="write only the label maps and JSON "
                   "summaries: no CASE.seg.nrrd (3D Slicer segmentation with structure names and colours) "
                   "and no labels.ctbl / labels.itksnap.txt (colour tables for Slicer and ITK-SNAP)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    outcomes = predict(args.input, args.output, args.model, device=args.device, mirror=args.mirror,
                       overlap=args.overlap, workers=args.workers, batch_size=args.batch_size,
                       out_format=args.format, threads=args.threads, progress=not args.no_progress,
                       viewer_files=not args.no_viewer_files)
    failed = [o for o in outcomes if not o.ok]
    print(f"masksam predict: {len(outcomes) - len(failed)} of {len(outcomes)} scans segmented into "
          f"{args.output}" + (f"; {len(failed)} failed: {', '.join(o.case for o in failed)}" if failed else ""))
    return 1 if failed else 0
