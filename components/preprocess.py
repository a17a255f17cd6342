"""`masksam preprocess`: nnU-Net v2 raw dataset -> fingerprint, plan, preprocessed cases, folds.

Per case: reorient to one canonical orientation, crop to the body, normalise (CT: clip to the
dataset's foreground 0.5/99.5 percentiles and z-score with its foreground mean/std; any other
channel: per-case z-score inside the body), resample to the target spacing. Every later step
(train, predict, evaluate, export) goes through `preprocess_case` and `restore_to_original`, so
training and inference see the same geometry and intensities.

Outputs (written as a whole, atomically: a failed run leaves a previous OUT untouched):
``OUT/plan.json``, ``OUT/splits.json``, ``OUT/cases/{case}.npz`` (``image`` float32
``[C,Z,Y,X]``, ``label`` uint8 ``[Z,Y,X]``) and ``OUT/cases/{case}.json`` (geometry to go back).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from masksam import __version__
from masksam.components import _fingerprint as fp
from masksam.components._dataset import PLAN_VERSION, load_case, load_plan  # noqa: F401 (re-exported)
from masksam.components._io import check_output_dir, owned_output_dir, read_image
from masksam.components.params import PreprocessParams, add_params_arguments, params_from_args, pick
from masksam.components._resample import (CANONICAL_ORIENTATION, IMAGE_INTERPOLATORS, LABEL_MODES,
                                          Grid, orientation_of, reorient, resample_image,
                                          resample_label, resample_probabilities, target_grid)
from masksam.components._scan import read_dataset_json
from masksam.components._splits import make_splits
from masksam.components._workers import kill_workers, spawn_pool, stop_on_signals
from masksam.components.data.manifest import build_manifest
from masksam.errors import UserError

log = logging.getLogger(__name__)

# preprocess_dataset's keyword defaults: the params defaults (components/params.py), except the
# target spacing, which a library call derives from the dataset (median, nnU-Net's rule) unless told
DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in asdict(PreprocessParams()).items() if k not in ("out", "target_spacing", "workers")},
    "target_spacing": None,  # None: the dataset's median (nnU-Net rule)
    "workers": min(8, os.cpu_count() or 1),
}
NPZ_COMPRESSLEVEL = 1  # zlib level: float volumes barely compress further, level 6 is 4x slower


# ----------------------------------------------------------------------------------------------
# One case: the functions every later step uses
# ----------------------------------------------------------------------------------------------

def _check_geometry(images: list[sitk.Image], label: sitk.Image | None) -> sitk.Image | None:
    """Channels and label must share one grid (tiny header rounding is tolerated and fixed)."""
    ref = Grid.of(images[0])
    others = [("channel %d" % i, im) for i, im in enumerate(images[1:], 1)]
    if label is not None:
        others.append(("label", label))
    for what, im in others:
        g = Grid.of(im)
        if g.size != ref.size:
            raise UserError(f"{what} has size {g.size} but channel 0 has {ref.size}")
        tol = 1e-3 * min(ref.spacing)
        if not (np.allclose(g.spacing, ref.spacing, rtol=1e-4, atol=1e-6)
                and np.allclose(g.origin, ref.origin, rtol=0, atol=max(tol, 1e-4))
                and np.allclose(g.direction, ref.direction, rtol=0, atol=1e-4)):
            raise UserError(f"{what} geometry (spacing {g.spacing}, origin {g.origin}) differs from "
                            f"channel 0 (spacing {ref.spacing}, origin {ref.origin})")
    if label is not None:
        label = sitk.Image(label)
        label.CopyInformation(images[0])
    return label


def _label_array(label: sitk.Image, labels: dict[str, int]) -> np.ndarray:
    array = sitk.GetArrayFromImage(label)
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise UserError("label map has non-integer values (is this an image, not a label?)")
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:  # bincount: 10x faster than unique
        values = np.flatnonzero(np.bincount(array.ravel()))
    else:
        values = np.unique(array)
    unknown = sorted(set(int(v) for v in values) - set(labels.values()))
    if unknown:
        raise UserError(f"label map has values {unknown[:10]} that dataset.json 'labels' does not list "
                        f"({sorted(labels.values())})")
    return array.astype(np.uint8, copy=False)


def _reorient_and_crop(images: list[sitk.Image], label: sitk.Image | None, modalities: list[str],
                       labels: dict[str, int], orientation: str, crop_rule: dict):
    """Shared front half of fingerprinting and preprocessing; see `preprocess_case`."""
    if not images:
        raise UserError("no image channels given")
    if len(images) != len(modalities):
        raise UserError(f"{len(images)} image channels given, the plan has {len(modalities)}")
    original = Grid.of(images[0])
    original_orientation = orientation_of(images[0])
    label = _check_geometry(images, label)
    images = [reorient(im, orientation) for im in images]
    reoriented = Grid.of(images[0])
    arrays = [sitk.GetArrayViewFromImage(im) for im in images]
    nonzero = np.zeros(arrays[0].shape, dtype=bool)
    for a in arrays:
        nonzero |= a != 0
    _, nonzero_size_zyx = fp.bounding_box(nonzero)
    del nonzero
    body = fp.body_mask(arrays, modalities, crop_rule)
    lo_zyx, size_zyx = fp.bounding_box(body)
    cut = tuple(slice(a, a + s) for a, s in zip(lo_zyx, size_zyx))
    arrays = [np.array(a[cut], dtype=np.float32) for a in arrays]
    body = body[cut]
    label_array = None
    outside = 0
    if label is not None:
        full = _label_array(reorient(label, orientation), labels)
        label_array = np.ascontiguousarray(full[cut])
        outside = int(np.count_nonzero(full)) - int(np.count_nonzero(label_array))
    cropped = reoriented.sub(lo_zyx[::-1], size_zyx[::-1])
    crop = {"index_xyz": [int(v) for v in lo_zyx[::-1]], "size_xyz": [int(v) for v in size_zyx[::-1]],
            "label_voxels_outside": outside, "nonzero_size_xyz": [int(v) for v in nonzero_size_zyx[::-1]]}
    return arrays, label_array, body, original, original_orientation, reoriented, cropped, crop


def _normalise(arrays: list[np.ndarray], body: np.ndarray, normalization: dict) -> tuple[np.ndarray, list]:
    """Per-channel intensity normalisation; returns ``[C, Z, Y, X]`` and the parameters used."""
    out = np.empty((len(arrays),) + arrays[0].shape, dtype=np.float32)
    used = []
    for c, array in enumerate(arrays):
        scheme = normalization[str(c)]
        if scheme["scheme"] == "ct":
            lo, hi = scheme["clip"]
            np.clip(array, lo, hi, out=out[c])
            out[c] -= scheme["mean"]
            out[c] /= max(scheme["std"], 1e-8)
            used.append({"scheme": "ct"})
        else:
            inside = array[body] if body.any() else array.ravel()
            mean, std = float(inside.mean(dtype=np.float64)), float(inside.std(dtype=np.float64))
            np.subtract(array, mean, out=out[c])
            out[c] /= max(std, 1e-8)
            out[c][~body] = 0.0
            used.append({"scheme": "zscore_per_case", "mean": mean, "std": std})
    return out, used


def preprocess_case(images: list[sitk.Image], label: sitk.Image | None,
                    plan: dict) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Preprocess one case with a plan: reorient, crop to body, normalise, resample.

    ``images`` are the channels (one SimpleITK image each, on one grid); ``label`` may be None
    (inference). Returns ``image`` float32 ``[C, Z, Y, X]``, ``label`` uint8 ``[Z, Y, X]`` or
    None, and the properties `restore_to_original` needs to map results back.
    """
    modalities = [plan["modalities"][str(c)] for c in range(len(plan["modalities"]))]
    arrays, label_array, body, original, orig_orient, reoriented, cropped, crop = _reorient_and_crop(
        images, label, modalities, plan["labels"], plan["orientation"], plan["crop"])
    normalised, used = _normalise(arrays, body, plan["normalization"])
    del arrays
    grid = target_grid(cropped, plan["target_spacing_xyz"])
    image = np.stack([resample_image(ch, cropped, grid, plan["image_interp"]) for ch in normalised])
    if label_array is not None:
        label_array = resample_label(label_array, cropped, grid, plan["label_interp"])
    properties = {
        "original": {**original.to_json(), "orientation": orig_orient},
        "reoriented": {**reoriented.to_json(), "orientation": plan["orientation"]},
        "crop": {**{k: v for k, v in crop.items() if k != "nonzero_size_xyz"}, "origin_xyz": cropped.to_json()["origin_xyz"]},
        "resampled": {**grid.to_json(), "shape_zyx": list(grid.shape_zyx)},
        "normalization": used,
        "image_interp": plan["image_interp"],
        "label_interp": plan["label_interp"],
    }
    return image.astype(np.float32, copy=False), label_array, properties


def restore_to_original(array_zyx: np.ndarray, properties: dict, is_label: bool = True,
                        fill_value: float = 0.0) -> sitk.Image:
    """Map a map on the preprocessed grid back onto the case's original grid.

    ``array_zyx`` is a ``[Z, Y, X]`` label map (``is_label``: resampled with the plan's label
    interpolation) or float map (linear), or ``[K, Z, Y, X]`` per-class probabilities (class 0 =
    background), which become a label map the nnU-Net way: each class interpolated linearly,
    argmax on the original grid (smoother, more accurate boundaries than resampling labels).
    Pads the crop back with ``fill_value`` (background) and undoes the reorientation. The result
    has exactly the original size, spacing, origin and direction.
    """
    array_zyx = np.asarray(array_zyx)
    grid = Grid.from_json(properties["resampled"])
    probabilities = array_zyx.ndim == 4
    if array_zyx.ndim not in (3, 4) or tuple(array_zyx.shape[-3:]) != grid.shape_zyx:
        raise ValueError(f"array of shape {array_zyx.shape} is not on this case's preprocessed grid "
                         f"{grid.shape_zyx} (expected [Z, Y, X] or [K, Z, Y, X])")
    reoriented = Grid.from_json(properties["reoriented"])
    crop = properties["crop"]
    cropped = reoriented.sub(crop["index_xyz"], crop["size_xyz"])
    if probabilities:
        back = resample_probabilities(array_zyx, grid, cropped)
        full = np.full(reoriented.shape_zyx, int(fill_value), dtype=np.uint8)
    elif is_label:
        mode = properties.get("label_interp", "nearest")
        back = resample_label(array_zyx.astype(np.uint8, copy=False), grid, cropped, mode)
        full = np.full(reoriented.shape_zyx, int(fill_value), dtype=np.uint8)
    else:
        back = resample_image(array_zyx.astype(np.float32, copy=False), grid, cropped, "linear")
        full = np.full(reoriented.shape_zyx, fill_value, dtype=np.float32)
    lo = crop["index_xyz"][::-1]
    full[tuple(slice(a, a + s) for a, s in zip(lo, back.shape))] = back
    image = reorient(reoriented.image(full), properties["original"]["orientation"])
    original = Grid.from_json(properties["original"])
    restored = Grid.of(image)
    if restored.size != original.size or not np.allclose(restored.origin, original.origin, atol=1e-3) \
            or not np.allclose(restored.spacing, original.spacing, atol=1e-6):
        raise RuntimeError(f"reorientation did not return to the original grid: {restored} vs {original}")
    # Reorientation is a pure permutation/flip; write the header back bit-exactly.
    image.SetSpacing(original.spacing)
    image.SetOrigin(original.origin)
    image.SetDirection(original.direction)
    return image


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez_compressed` with fixed zip timestamps, so identical arrays give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED,
                         compresslevel=NPZ_COMPRESSLEVEL) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

def read_raw_dataset(raw_dir: str | os.PathLike) -> tuple[dict, dict[str, tuple[list[Path], Path]]]:
    """dataset.json plus ``{case: ([image paths per channel], label path)}`` for labelled cases."""
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise UserError(f"raw dataset directory not found: {raw} (run `masksam data` first)")
    ds = read_dataset_json(raw / "dataset.json", "nnU-Net dataset.json")
    where = raw / "dataset.json"
    channels = ds.get("channel_names") or ds.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise UserError(f"{where}: 'channel_names' must map channel index to name, e.g. {{\"0\": \"CT\"}}")
    if sorted(channels) != [str(i) for i in range(len(channels))]:
        raise UserError(f"{where}: channel_names keys must be 0..{len(channels) - 1}, got {sorted(channels)}")
    labels = ds.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in labels.values()):
        raise UserError(f"{where}: 'labels' must map names to integers (region-based labels are not "
                        "supported)")
    if labels.get("background") != 0 or not all(0 <= v <= 255 for v in labels.values()):
        raise UserError(f"{where}: 'labels' needs background = 0 and values in 0..255")
    ending = ds.get("file_ending", ".nii.gz")
    label_dir = raw / "labelsTr"
    label_files = sorted(label_dir.glob(f"*{ending}")) if label_dir.is_dir() else []
    if not label_files:
        raise UserError(f"no labelled cases: {label_dir} has no *{ending} files")
    cases = {}
    for label_path in label_files:
        case = label_path.name[: -len(ending)]
        paths = [raw / "imagesTr" / f"{case}_{int(c):04d}{ending}" for c in sorted(channels, key=int)]
        for p in paths:
            if not p.is_file():
                raise UserError(f"{p}: image of case '{case}' missing (labelsTr has {label_path.name})")
        cases[case] = (paths, label_path)
    return ds, cases


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _fail(case: str, paths: list[Path], label: Path, exc: BaseException) -> UserError:
    files = ", ".join(str(p) for p in [*paths, label])
    if isinstance(exc, UserError) and any(str(p) in str(exc) for p in [*paths, label]):
        return UserError(f"case '{case}': {exc}")
    return UserError(f"case '{case}' ({files}): {exc}")


def _fingerprint_case(case: str, paths: list[Path], label_path: Path, plan: dict, n_samples: int):
    try:
        images = [read_image(p) for p in paths]
        label = read_image(label_path)
        modalities = [plan["modalities"][str(c)] for c in range(len(paths))]
        arrays, label_array, body, original, orient, _, cropped, crop = _reorient_and_crop(
            images, label, modalities, plan["labels"], plan["orientation"], plan["crop"])
        rng = np.random.default_rng([plan["seed"], zlib.crc32(case.encode())])
        entry, samples, source = fp.case_fingerprint(arrays, label_array, body, cropped.spacing,
                                                     plan["labels"], n_samples, rng)
    except Exception as exc:  # noqa: BLE001 - every failure is reported with the case's files
        raise _fail(case, paths, label_path, exc) from exc
    entry["original_size_xyz"] = list(original.size)
    entry["original_orientation"] = orient
    entry["crop_index_xyz"] = crop["index_xyz"]
    entry["label_voxels_outside_crop"] = crop["label_voxels_outside"]
    entry["nonzero_size_xyz"] = crop["nonzero_size_xyz"]
    return case, entry, samples, source


def _preprocess_and_write(case: str, paths: list[Path], label_path: Path, plan: dict, out: Path):
    try:  # the fingerprint pass read and checked these files already: skip the raw-stream scan
        images = [read_image(p, check=False) for p in paths]
        label = read_image(label_path, check=False)
        image, label_array, properties = preprocess_case(images, label, plan)
        properties = {"case": case, "image_files": [p.name for p in paths],
                      "label_file": label_path.name, **properties}
        save_npz(out / f"{case}.npz", {"image": image, "label": label_array})
        _dump_json(out / f"{case}.json", properties)
    except Exception as exc:  # noqa: BLE001
        raise _fail(case, paths, label_path, exc) from exc
    return case, list(image.shape)


def _make_pool(workers: int, jobs: int) -> ProcessPoolExecutor | None:
    """One spawn-based pool for both passes (None: run inline); ITK threads split among workers.
    Its workers die with this process, even when it is SIGKILLed."""
    workers = min(workers, jobs)
    if workers <= 1:
        return None
    threads = max(1, (os.cpu_count() or 1) // workers)
    return spawn_pool(workers, _init_worker, (threads,))


def _run_parallel(fn: Callable, jobs: dict[str, tuple], pool: ProcessPoolExecutor | None, desc: str,
                  progress: bool) -> dict:
    """``{case: fn(case, *args)}`` over the pool (or inline without one), with a tqdm bar.

    On any failure or interruption the pool's workers are killed before the error propagates,
    so none is still writing into the temporary output when it is removed."""
    results = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress)
    try:
        if pool is None:
            for case, args in jobs.items():
                results[case] = fn(case, *args)
                bar.update()
        else:
            futures = {pool.submit(fn, case, *args): case for case, args in jobs.items()}
            try:
                for future in as_completed(futures):
                    try:
                        results[futures[future]] = future.result()
                    except BrokenProcessPool as exc:
                        raise UserError(
                            f"a {desc} worker process died while working on case "
                            f"'{futures[future]}' (killed for memory?); rerun with fewer --workers"
                        ) from exc
                    bar.update()
            except BaseException:  # the pool breaks: every pending future fails, none runs on
                kill_workers(pool)
                raise
    finally:
        bar.close()
    return {case: results[case] for case in sorted(results)}


def _channel_normalization(modality: str, stats: dict) -> dict:
    if modality == "CT":
        return {"scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                "mean": stats["mean"], "std": stats["std"],
                "why": "clip to dataset foreground 0.5/99.5 percentiles, z-score with foreground mean/std"}
    return {"scheme": "zscore_per_case", "mask": "body", "outside_mask": 0.0,
            "why": "per-case z-score from the voxels inside the body mask; outside set to 0"}


def preprocess_dataset(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       target_spacing: Sequence[float] | None = DEFAULTS["target_spacing"],
                       workers: int = DEFAULTS["workers"], folds: int = DEFAULTS["folds"],
                       seed: int = DEFAULTS["seed"], test_fraction: float = DEFAULTS["test_fraction"],
                       image_interp: str = DEFAULTS["image_interp"],
                       label_interp: str = DEFAULTS["label_interp"], progress: bool = True,
                       force: bool = False) -> dict:
    """Fingerprint, plan and preprocess an nnU-Net v2 raw dataset into ``out_dir``; returns the plan.

    ``target_spacing`` (x, y, z mm) overrides the fingerprint's median spacing. The output
    directory is replaced as a whole only when every case succeeded, and only when it is new,
    empty or an earlier output of this step (``force``: any folder that is not an input).
    SIGTERM stops the workers and removes the partial output before exiting non-zero.
    """
    if image_interp not in IMAGE_INTERPOLATORS:
        raise UserError(f"--image-interp must be one of {sorted(IMAGE_INTERPOLATORS)}, got {image_interp!r}")
    if label_interp not in LABEL_MODES:
        raise UserError(f"--label-interp must be one of {list(LABEL_MODES)}, got {label_interp!r}")
    if target_spacing is not None:
        target_spacing = [float(s) for s in target_spacing]
        if len(target_spacing) != 3 or min(target_spacing) <= 0:
            raise UserError(f"--target-spacing needs three positive numbers (x y z mm), got {target_spacing}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    check_output_dir(out_dir, "preprocess", inputs=(raw_dir,), force=force, what="--out")
    ds, cases = read_raw_dataset(raw_dir)
    # Fail early on an impossible split, before the expensive part.
    splits = make_splits(list(cases), folds, seed, ds.get("fixed_test_cases"), test_fraction)
    channels = {str(k): str(v) for k, v in sorted(ds["channel_names"].items(), key=lambda kv: int(kv[0]))}
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "masksam_version": __version__,
        "dataset_name": ds.get("name", Path(raw_dir).name),
        # the raw folder's content identity (manifest.py's hash, whether or not a manifest.json is
        # there): what the export's sidecar, the model card and the run tags call the training data
        "dataset_sha256": build_manifest(raw_dir, progress=False)["dataset_sha256"],
        "labels": dict(sorted(ds["labels"].items(), key=lambda kv: kv[1])),
        "channel_names": channels,
        "modalities": {c: fp.modality_of(n) for c, n in channels.items()},
        "file_ending": ds.get("file_ending", ".nii.gz"),
        "orientation": CANONICAL_ORIENTATION,
        "crop": fp.CROP_RULE,
        "image_interp": image_interp,
        "label_interp": label_interp,
        "seed": seed,
        "cases": sorted(cases),
    }
    with stop_on_signals("preprocess"):
        pool = _make_pool(workers, len(cases))
        try:
            plan = _plan_and_write(plan, splits, cases, out_dir, target_spacing, pool, progress,
                                   inputs=(raw_dir,), force=force)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    return plan


def _plan_and_write(plan: dict, splits: dict, cases: dict, out_dir, target_spacing,
                    pool: ProcessPoolExecutor | None, progress: bool, inputs: Sequence = (),
                    force: bool = False) -> dict:
    """Fingerprint pass, plan, then the preprocessing pass into a temporary OUT renamed at the end."""
    channels = plan["channel_names"]
    n_samples = fp.samples_per_case(len(cases))
    jobs = {case: (paths, label, plan, n_samples) for case, (paths, label) in cases.items()}
    found = _run_parallel(_fingerprint_case, jobs, pool, "fingerprint", progress)
    entries = {case: r[1] for case, r in found.items()}
    sources = sorted({r[3] for r in found.values()})
    intensity = {}
    for c in channels:
        samples = np.concatenate([r[2][int(c)] for r in found.values()])
        intensity[c] = fp.intensity_stats(samples)
    # nnU-Net's anisotropy test compares voxel counts after *its* (nonzero) crop; the body crop
    # shrinks CT in-plane sizes and would change the outcome, so use nnU-Net's sizes here.
    spacing, spacing_info = fp.choose_target_spacing([e["spacing_xyz"] for e in entries.values()],
                                                     [e["nonzero_size_xyz"] for e in entries.values()])
    if target_spacing is not None:
        spacing_info = {**spacing_info, "rule": "explicit (--target-spacing)"}
        spacing = target_spacing
    plan["fingerprint"] = {"cases": entries, "foreground_intensity_properties_per_channel": intensity,
                           "intensity_sample_region": sources, "samples_per_case": n_samples,
                           **{k: v for k, v in spacing_info.items() if k.startswith("median")}}
    plan["target_spacing_xyz"] = [float(s) for s in spacing]
    plan["target_spacing_rule"] = spacing_info["rule"]
    plan["normalization"] = {c: _channel_normalization(plan["modalities"][c], intensity[c])
                             for c in channels}
    outside = {c: e["label_voxels_outside_crop"] for c, e in entries.items() if e["label_voxels_outside_crop"]}
    if outside:
        log.warning("label voxels outside the body crop (lost in training): %s", outside)

    out = Path(out_dir)
    with owned_output_dir(out, "preprocess", inputs=inputs, force=force, what="--out") as tmp:
        (tmp / "cases").mkdir()
        jobs = {case: (paths, label, plan, tmp / "cases") for case, (paths, label) in cases.items()}
        shapes = _run_parallel(_preprocess_and_write, jobs, pool, "preprocess", progress)
        plan["preprocessed_shapes_zyx"] = {case: r[1] for case, r in shapes.items()}
        _dump_json(tmp / "plan.json", plan)
        _dump_json(tmp / "splits.json", splits)
    log.info("preprocessed %d cases into %s (target spacing %s mm, %s)", len(cases), out,
             plan["target_spacing_xyz"], plan["target_spacing_rule"])
    return plan


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    """Options given win, else params' preprocess: section (data.out is the raw dataset);
    ``--spacing-strategy median`` overrides preprocess.target_spacing with the median rule."""
    params = params_from_args(args)
    pre = params.preprocess
    target = args.target_spacing
    if target is None and args.spacing_strategy is None:
        target = pre.target_spacing
    preprocess_dataset(pick(args.raw, params.data.out), pick(args.out, pre.out), target_spacing=target,
                       workers=pick(args.workers, pick(pre.workers, DEFAULTS["workers"])), folds=pick(args.folds, pre.folds),
                       seed=pick(args.seed, pre.seed), test_fraction=pick(args.test_fraction, pre.test_fraction),
                       image_interp=pick(args.image_interp, pre.image_interp),
                       label_interp=pick(args.label_interp, pre.label_interp),
                       progress=not args.no_progress, force=args.force)
    return 0


def register_cli(subparsers) -> None:
    """Add `masksam preprocess`."""
    p = subparsers.add_parser(
        "preprocess", help="fingerprint, plan and preprocess a raw dataset (nnU-Net v2 style)",
        description="Fingerprint an nnU-Net v2 raw dataset, choose the target spacing, then per case "
        "reorient to LPS, crop to the body, normalise (CT: dataset foreground clip + z-score; other "
        "channels: per-case z-score) and resample. Writes OUT/plan.json, OUT/splits.json and "
        "OUT/cases/{case}.npz|.json; OUT is replaced only if every case succeeds.")
    p.add_argument("--raw", metavar="DIR", help="nnU-Net v2 raw dataset (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--out", metavar="DIR", help="output directory, replaced as a whole when it is new, "
                   "empty or this step's earlier output (never inside or around --raw)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it holds files this step did not write")
    spacing = p.add_mutually_exclusive_group()
    spacing.add_argument("--target-spacing", nargs=3, type=float, metavar=("X", "Y", "Z"),
                         help="target voxel spacing in mm, x y z order")
    spacing.add_argument("--spacing-strategy", choices=["median"],
                         help="derive the spacing from the fingerprint: per-axis median, with "
                         "nnU-Net's 10th-percentile rule for an anisotropic axis (also what "
                         "preprocess.target_spacing: null selects; default: preprocess.target_spacing "
                         f"of --params, {PreprocessParams().target_spacing})")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"parallel worker processes (default: {DEFAULTS['workers']}, min(8, CPUs))")
    p.add_argument("--folds", type=int, metavar="K", help=f"cross-validation folds (default {DEFAULTS['folds']})")
    p.add_argument("--seed", type=int, help=f"seed of the splits and intensity sampling (default {DEFAULTS['seed']})")
    p.add_argument("--test-fraction", type=float, metavar="F",
                   help="fraction of cases held out as test when dataset.json has no fixed_test_cases "
                   f"(default {DEFAULTS['test_fraction']}; at least 1 case once there are 3)")
    p.add_argument("--image-interp", choices=sorted(IMAGE_INTERPOLATORS),
                   help=f"image resampling (default {DEFAULTS['image_interp']})")
    p.add_argument("--label-interp", choices=list(LABEL_MODES),
                   help="label resampling: nearest neighbour, or label_aware = per-label linear + "
                   f"argmax like nnU-Net (default {DEFAULTS['label_interp']})")
    add_params_arguments(p, "params file: its preprocess: section fills the options not given here and "
                         "data.out fills --raw (default: params.yaml when present, else the built-in defaults)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.set_defaults(func=_run)
