"""`masksam evaluate`: score a folder of predicted label maps against a folder of references.

Like nnU-Net's ``nnUNetv2_evaluate_folder``: files are matched by case name, every foreground
label of dataset.json is scored per case (Dice, HD95 in mm, normalised surface Dice; see
:mod:`masksam.components.metrics` for the exact definitions), and a summary.json of nnU-Net's
shape is written with a ``conventions`` block saying how each number was computed. A per-case
CSV, PNG plots and (optionally) MLflow logging come with it.

:func:`evaluate_folders` is the API for files; the pipeline's evaluate step
(:func:`evaluate_model`) predicts the held-out cases with the one predictor and scores the
arrays in memory with :func:`score_arrays`, the function both paths share.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import logging
import math
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from masksam.components import metrics
from masksam.components._io import atomic_path, ensure_writable_dir, image_suffix, owned_output_dir, read_image, read_json, write_json
from masksam.components._tracking import metric_name, unique_metric_names
from masksam.components._scan import read_dataset_json
from masksam.components.data.manifest import test_set_digest
from masksam.components.metrics import METRICS, score_case  # noqa: F401  (re-exported API)
from masksam.components.params import add_params_arguments, params_from_args, pick
from masksam.errors import UserError

log = logging.getLogger(__name__)

BOX_METRICS = ("Dice", "HD95", "NSD")


# ----------------------------------------------------------------------------- inputs


def labels_from_dataset_json(path: str | os.PathLike) -> dict[str, int]:
    """Foreground labels (name -> id, background 0 dropped) from an nnU-Net dataset.json."""
    labels = read_dataset_json(path).get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path}: no 'labels' mapping (name -> integer id, background 0)")
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(
                f"{path}: label {name!r} has value {value!r}; only integer ids >= 0 are supported "
                "(region-based labels are not)"
            )
        if value != 0:
            out[str(name)] = value
    if len(set(out.values())) != len(out):
        raise UserError(f"{path}: two labels share one id: {out}")
    if not out:
        raise UserError(f"{path}: 'labels' has no foreground class (only background)")
    return out


def _normalise_labels(labels: Mapping[str, int] | Sequence[int]) -> dict[int, str]:
    if isinstance(labels, Mapping):
        return {int(v): str(k) for k, v in labels.items() if int(v) != 0}
    return {int(v): str(int(v)) for v in labels if int(v) != 0}


def _case_name(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _image_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"{what} folder not found: {folder}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and image_suffix(path) and not path.name.startswith("."):
            case = _case_name(path)
            if case in files:
                raise UserError(f"{what} folder {folder} holds two files for case {case!r}: "
                                f"{files[case].name} and {path.name}; keep one")
            files[case] = path
    return files


def match_files(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair references with predictions by case name (file name without its image suffix).

    Returns ``(pairs, missing, extra)``: ``(case, gt_path, pred_path)`` for every reference
    (``pred_path`` may not exist: a missing prediction), the missing case names, and predictions
    without a reference (ignored).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    refs = _image_files(gt_dir, "reference")
    preds = _image_files(pred_dir, "prediction")
    if not refs:
        raise UserError(f"reference folder {gt_dir} holds no image files (.nii.gz, .nii, .nrrd, .mha, .mhd)")
    if not set(refs) & set(preds):
        raise UserError(
            f"no prediction in {pred_dir} matches a reference in {gt_dir} by case name "
            f"(references e.g. {sorted(refs)[:3]}, predictions e.g. {sorted(preds)[:3]}); check both folders"
        )
    pairs = [(case, gt, preds.get(case, pred_dir / gt.name)) for case, gt in refs.items()]
    missing = [case for case in refs if case not in preds]
    extra = [case for case in preds if case not in refs]
    return pairs, missing, extra


def _check_geometry(pred, gt, pred_path: Path, gt_path: Path) -> None:
    problems = []
    if pred.GetSize() != gt.GetSize():
        problems.append(f"size {pred.GetSize()} vs {gt.GetSize()}")
    for what, a, b in (
        ("spacing", pred.GetSpacing(), gt.GetSpacing()),
        ("origin", pred.GetOrigin(), gt.GetOrigin()),
        ("direction", pred.GetDirection(), gt.GetDirection()),
    ):
        if len(a) != len(b) or not np.allclose(a, b, rtol=1e-5, atol=1e-4):
            problems.append(f"{what} {tuple(round(x, 6) for x in a)} vs {tuple(round(x, 6) for x in b)}")
    if problems:
        raise UserError(
            f"prediction {pred_path} and reference {gt_path} have different geometry ("
            + "; ".join(problems)
            + "); predictions must be written on the reference's grid (resample the prediction "
            "with nearest-neighbour interpolation onto the reference, or re-run prediction)"
        )


def _label_array(image, path: Path) -> np.ndarray:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                        "expected a single-channel label map")
    try:
        return metrics.as_label_map(sitk.GetArrayFromImage(image), str(path))
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _score_file_pair(job: tuple) -> dict[str, Any]:
    """Worker: read one pair, check geometry, score it. Top-level so process pools can pickle it."""
    case, gt_path, pred_path, label_ids, tolerance_mm, hd_convention, connectivity = job
    gt_img = read_image(gt_path, expect_dim=None)
    gt = _label_array(gt_img, gt_path)
    missing = not pred_path.is_file()
    if missing:
        pred = np.zeros_like(gt)
    else:
        pred_img = read_image(pred_path, expect_dim=None)
        _check_geometry(pred_img, gt_img, pred_path, gt_path)
        pred = _label_array(pred_img, pred_path)
    entry: dict[str, Any] = {
        "case": case,
        "reference_file": str(gt_path),
        "prediction_file": str(pred_path),
        "prediction_missing": missing,
    }
    entry.update(score_arrays(pred, gt, gt_img.GetSpacing(), label_ids, tolerance_mm, hd_convention, connectivity))
    return entry


def score_arrays(pred: np.ndarray, gt: np.ndarray, spacing_xyz: Sequence[float], label_ids: Sequence[int],
                 tolerance_mm: float, hd_convention: str, connectivity: int) -> dict[str, Any]:
    """Score one case given as label arrays ``[Z, Y, X]`` on one grid of ``spacing_xyz`` (mm,
    SimpleITK order): ``spacing_xyz``, ``metrics`` per label and, when either array holds
    labels dataset.json does not name, ``labels_not_in_dataset_json``. Files and in-memory
    predictions (evaluate's pipeline mode) are scored by this one function."""
    spacing = tuple(spacing_xyz)[::-1]  # SimpleITK (x, y, z) -> array axis order (z, y, x)
    scores = metrics.score_case(pred, gt, spacing, label_ids, tolerance_mm, hd_convention, connectivity)
    known = set(label_ids)
    unexpected = {
        "prediction": [v for v in metrics.labels_present(pred) if v not in known],
        "reference": [v for v in metrics.labels_present(gt) if v not in known],
    }
    out: dict[str, Any] = {"spacing_xyz": list(spacing_xyz), "metrics": scores}
    if unexpected["prediction"] or unexpected["reference"]:
        out["labels_not_in_dataset_json"] = unexpected
    return out


# ----------------------------------------------------------------------------- aggregation


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    return float(arr.mean()) if arr.size else math.nan


def _nanstd(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    return float(arr.std()) if arr.size else math.nan


def aggregate(per_case: Sequence[Mapping[str, Any]], label_ids: Sequence[int]) -> tuple[dict, dict]:
    """``mean`` (per label, over cases, NaN ignored) and ``foreground_mean`` (over labels != 0)."""
    mean = {
        str(label): {m: _nanmean([float(c["metrics"][str(label)][m]) for c in per_case]) for m in METRICS}
        for label in label_ids
    }
    fg = [str(label) for label in label_ids if label != 0]
    foreground_mean = {m: _nanmean([mean[k][m] for k in fg]) for m in METRICS}
    return mean, foreground_mean


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- outputs


def check_outputs(out_json: str | os.PathLike | None, out_csv: str | os.PathLike | None,
                  plots_dir: str | os.PathLike | None) -> None:
    """Refuse, before any scoring, a folder where the summary or CSV file goes, a file where the
    plots folder goes, and locations that cannot be written."""
    for path, what, example in ((out_json, "summary file (--out)", "summary.json"),
                                (out_csv, "per-case CSV (--csv)", "per_case.csv")):
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder; give the file to write, e.g. {path / example}")
        ensure_writable_dir(path.absolute().parent, f"folder of the {what}")
    if plots_dir is not None:
        ensure_writable_dir(Path(plots_dir), "plots folder (--plots)")


def write_csv(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One row per case and label (long format, ready for pandas)."""
    path = Path(path)
    names = summary["labels"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "label", "label_name", *METRICS, "prediction_missing",
                         "reference_file", "prediction_file"])
        for entry in summary["metric_per_case"]:
            for label, values in entry["metrics"].items():
                writer.writerow([entry["case"], label, names.get(label, label),
                                 *[values[m] for m in METRICS], entry["prediction_missing"],
                                 entry["reference_file"], entry["prediction_file"]])
    return path


def write_plots(summary: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Per-class Dice bar chart (mean +/- std over cases) and per-class box plots per metric."""
    from masksam.components import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = summary["labels"]
    per_case = summary["metric_per_case"]
    tol = summary["conventions"]["nsd_tolerance_mm"]
    values = {
        m: {names[k]: [float(c["metrics"][k][m]) for c in per_case] for k in names} for m in BOX_METRICS
    }
    files = [
        plots.bar_chart(
            list(values["Dice"]),
            [_nanmean(v) for v in values["Dice"].values()],
            [_nanstd(v) for v in values["Dice"].values()],
            out_dir / "dice_per_class.png",
            ylabel="Dice (mean +/- std over cases)",
            title=f"Dice per class ({len(per_case)} cases)",
            ylim=(0.0, 1.05),
        )
    ]
    ylabels = {"Dice": "Dice", "HD95": "HD95 (mm)", "NSD": f"NSD @ {tol:g} mm"}
    for m in BOX_METRICS:
        files.append(plots.box_plot(values[m], out_dir / f"boxplot_{m}.png", ylabel=ylabels[m],
                                    title=f"{m} per class over cases"))
    return files


def _mlflow_key(*parts: str) -> str:
    """``a/b/c`` from parts made MLflow-safe one by one (``/`` inside a part is replaced)."""
    return "/".join(metric_name(p) for p in parts)


def log_to_mlflow(summary: Mapping[str, Any], files: Sequence[Path], prefix: str = "eval") -> None:
    """Log per-label means and foreground means as metrics and the output files as artifacts
    into the active MLflow run (``{prefix}/{metric}/{label name}``, ``.../foreground_mean``).
    Label names become keys by the rule training uses (``_tracking.unique_metric_names``):
    characters MLflow refuses are replaced and distinct labels keep distinct keys."""
    import mlflow

    label_names = {label: str(summary["labels"].get(label, label)) for label in summary["mean"]}
    keys = unique_metric_names(label_names.values(), reserved=("foreground_mean",))
    values: dict[str, float] = {}
    for label, means in summary["mean"].items():
        for m in BOX_METRICS:
            values[_mlflow_key(prefix, m) + "/" + keys[label_names[label]]] = means[m]
    for m in BOX_METRICS:
        values[_mlflow_key(prefix, m, "foreground_mean")] = summary["foreground_mean"][m]
    finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    skipped = sorted(set(values) - set(finite))
    if skipped:
        log.warning("not logging undefined (NaN) metrics to MLflow: %s", ", ".join(skipped))
    mlflow.log_metrics(finite)
    for path in files:
        mlflow.log_artifact(str(path), artifact_path="evaluation" if path.suffix != ".png" else "evaluation/plots")


# ----------------------------------------------------------------------------- API


def _summary(per_case: list[dict[str, Any]], names: dict[int, str], missing: list[str], extra: list[str],
             pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, references: dict[str, list[Path]],
             conventions: dict[str, Any]) -> dict[str, Any]:
    """The nnU-Net-shaped summary of scored cases (shared by folder and pipeline mode)."""
    label_ids = sorted(names)
    odd = [e for e in per_case if "labels_not_in_dataset_json" in e]
    if odd:
        values = sorted({v for e in odd for vs in e["labels_not_in_dataset_json"].values() for v in vs})
        log.warning("%d of %d cases hold label values that dataset.json does not name, so they are not "
                    "scored: %s (per case: labels_not_in_dataset_json in the summary)", len(odd), len(per_case), values)
    mean, foreground_mean = aggregate(per_case, label_ids)
    return {
        "foreground_mean": foreground_mean,
        "mean": mean,
        "metric_per_case": per_case,
        "labels": {str(k): names[k] for k in label_ids},
        "n_cases": len(per_case),
        "missing_predictions": missing,
        "predictions_without_reference": extra,
        "prediction_folder": str(pred_dir),
        "reference_folder": str(gt_dir),
        # the references' content hash: registration compares scores only on the same test set
        "test_set_id": test_set_digest(references),
        "conventions": conventions,
    }


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    labels: Mapping[str, int] | Sequence[int],
    *,
    tolerance_mm: float = 2.0,
    hd_convention: str = "medpy",
    connectivity: int = 1,
    workers: int = 1,
    out_json: str | os.PathLike | None = None,
    out_csv: str | os.PathLike | None = None,
    plots_dir: str | os.PathLike | None = None,
    mlflow_log: bool | None = None,
) -> dict[str, Any]:
    """Score every reference in ``gt_dir`` against the same-named prediction in ``pred_dir``.

    ``labels`` is dataset.json's name -> id mapping (or a list of ids); background is not scored.
    A missing prediction is scored as empty and listed in ``missing_predictions``; a prediction
    whose geometry differs from its reference is a UserError naming both files. Writes the
    summary (``out_json``; NaN as null), the per-case CSV and PNG plots when paths are given.
    ``mlflow_log``: True logs to the active run (starting one if none), None logs only when a
    run is active, False never. Returns the summary dict (NaN kept as float NaN).
    """
    from tqdm.auto import tqdm

    names = _normalise_labels(labels)
    if not names:
        raise UserError("no foreground labels to evaluate (labels must contain ids other than 0)")
    if hd_convention not in metrics.HD_CONVENTIONS:
        raise UserError(f"unknown HD95 convention {hd_convention!r}; choose one of {metrics.HD_CONVENTIONS}")
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise UserError(f"--nsd-tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    label_ids = sorted(names)
    pairs, missing, extra = match_files(pred_dir, gt_dir)
    check_outputs(out_json, out_csv, plots_dir)
    if missing:
        log.warning("%d of %d predictions missing in %s (scored as empty): %s",
                    len(missing), len(pairs), pred_dir, ", ".join(missing))
    if extra:
        log.warning("%d predictions without a reference in %s are ignored: %s", len(extra), gt_dir, ", ".join(extra))
    jobs = [(case, gt, pred, label_ids, tolerance_mm, hd_convention, connectivity) for case, gt, pred in pairs]
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    progress = tqdm(total=len(jobs), desc="evaluate", unit="case")
    try:
        if workers == 1 or len(jobs) == 1:
            for i, job in enumerate(jobs):
                results[i] = _score_file_pair(job)
                progress.update()
        else:
            ctx = multiprocessing.get_context(_start_method())
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = {pool.submit(_score_file_pair, job): i for i, job in enumerate(jobs)}
                try:
                    for fut in cf.as_completed(futures):
                        results[futures[fut]] = fut.result()
                        progress.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        progress.close()
    per_case = [r for r in results if r is not None]
    summary = _summary(per_case, names, missing, extra, pred_dir, gt_dir, {case: [gt] for case, gt, _ in pairs},
                       metrics.conventions(tolerance_mm, hd_convention, connectivity))
    files: list[Path] = []
    if out_json is not None:
        write_json(out_json, _json_safe(summary))
        files.append(Path(out_json))
    if out_csv is not None:
        files.append(write_csv(summary, out_csv))
    if plots_dir is not None:
        files.extend(write_plots(summary, plots_dir))
    _maybe_log_mlflow(summary, files, mlflow_log)
    fm = summary["foreground_mean"]
    log.info("foreground mean over %d cases: Dice %.4f, HD95 %.2f mm, NSD@%gmm %.4f",
             len(per_case), fm["Dice"], fm["HD95"], tolerance_mm, fm["NSD"])
    return summary


def _held_out(raw: Path, cases: list[str], fe: str) -> list[tuple[str, list[Path], Path]]:
    """``(case, channel files, reference label)`` of each held-out case in the raw dataset."""
    found = []
    for case in cases:
        channels = sorted((raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{fe}"))
        label = raw / "labelsTr" / f"{case}{fe}"
        if not channels or not label.is_file():
            raise UserError(f"held-out case '{case}' is missing from {raw} (imagesTr/{case}_0000{fe} "
                            f"or labelsTr/{case}{fe}): was the raw data changed after preprocessing?")
        found.append((case, channels, label))
    return found


def _predict_held_out(predictor, held_out: list[tuple[str, list[Path], Path]], staged: Path, final: Path,
                      fe: str, label_ids: list[int], scoring: dict[str, Any], options: dict[str, Any],
                      workers: int, progress: bool) -> list[dict[str, Any]]:
    """Predict each case in memory, write its label map (and structure summary) into
    ``staged``, score the arrays; scoring runs in ``workers`` processes beside the next
    prediction. Entries name the prediction where it will be (``final``)."""
    from tqdm.auto import tqdm

    from masksam.components._io import write_image

    pool = None
    if workers > 1 and len(held_out) > 1:
        pool = cf.ProcessPoolExecutor(max_workers=min(workers, len(held_out)),
                                      mp_context=multiprocessing.get_context(_start_method()))
    entries: list[Any] = []
    try:
        for case, channels, label in tqdm(held_out, desc="evaluate", unit="case", disable=not progress):
            result = predictor.predict_files(channels, **options)
            name = f"{case}{fe}"
            write_image(result.labels, staged / name)
            write_json(staged / f"{case}.json", {"case": case, "inputs": [str(c) for c in channels],
                                                 "model": predictor.source, **options,
                                                 "structures": result.structures})
            gt_img = read_image(label, expect_dim=None)
            _check_geometry(result.labels, gt_img, final / name, label)
            pred, gt = _label_array(result.labels, final / name), _label_array(gt_img, label)
            head = {"case": case, "reference_file": str(label), "prediction_file": str(final / name),
                    "prediction_missing": False}
            job = (pred, gt, gt_img.GetSpacing(), label_ids, *scoring.values())
            entries.append((head, pool.submit(score_arrays, *job) if pool else score_arrays(*job)))
        return [{**head, **(scores.result() if pool else scores)} for head, scores in entries]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def evaluate_model(
    model: str | os.PathLike | Sequence[str | os.PathLike],
    raw_dir: str | os.PathLike,
    preprocessed_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    tolerance_mm: float = 2.0,
    hd_convention: str = "medpy",
    device: str = "auto",
    mirror: bool = False,
    overlap: float = 0.5,
    workers: int = 1,
    mlflow_log: bool | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Pipeline mode: predict the held-out cases of ``splits.json`` with ``model``, then score them.

    ``model``: a training directory, an exported ``model.onnx`` or an MLflow URI, or several
    (an ensemble: averaged probabilities), run through the one
    :class:`~masksam.components.predictor.Predictor`. The cases are read from the RAW dataset
    (the files a user would give ``masksam predict``), so the score covers the whole path:
    preprocessing, the network, and restoring the original geometry. Predictions are scored in
    memory (no temporary folder, nothing re-read) and written into ``out_dir``:
    ``predictions/``, ``summary.json`` (nnU-Net shape), ``per_case.csv``, ``plots/``,
    ``metrics.json`` (flat, for ``dvc metrics``) and ``per_class.csv`` (for ``dvc plots``). With
    one training directory as ``model``, metrics are logged into that training's MLflow run
    (``test/...``), so one run holds the whole story. ``out_dir`` is written whole, atomically,
    and replaces only an earlier evaluate output (or any folder with ``force``); it never
    overlaps the raw data, the preprocessed data or the models.
    """
    from masksam.components.predictor import Predictor

    refs = [model] if isinstance(model, (str, os.PathLike)) else list(model)
    raw, out = Path(raw_dir), Path(out_dir)
    meta = read_dataset_json(raw / "dataset.json")
    splits = read_json(Path(preprocessed_dir) / "splits.json", "splits file")
    if split == "test":
        cases = list(splits.get("test") or [])
    else:
        fold = int(split.removeprefix("val"))
        cases = list(splits["folds"][fold]["val"])
    if not cases:
        raise UserError(f"{preprocessed_dir}/splits.json has no '{split}' cases: raise "
                        "preprocess.test_fraction or record fixed_test_cases in dataset.json")
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap must be in [0, 1), got {overlap}")
    fe = meta.get("file_ending", ".nii.gz")
    names = _normalise_labels(meta["labels"])
    local_models = tuple(Path(str(r)) for r in refs if Path(str(r)).exists())
    with owned_output_dir(out, "evaluate", inputs=(raw, Path(preprocessed_dir), *local_models), force=force,
                          what="output folder (--out-dir)") as staged:
        held_out = _held_out(raw, cases, fe)
        predictor = Predictor.load(refs, device=device)
        (staged / "predictions").mkdir()
        scoring = {"tolerance_mm": tolerance_mm, "hd_convention": hd_convention, "connectivity": 1}
        per_case = _predict_held_out(predictor, held_out, staged / "predictions", out / "predictions", fe,
                                     sorted(names), scoring, {"mirror": mirror, "overlap": overlap},
                                     workers, progress)
        summary = _summary(per_case, names, [], [], out / "predictions", raw / "labelsTr",
                           {case: [*channels, label] for case, channels, label in held_out},
                           metrics.conventions(tolerance_mm, hd_convention, 1))
        write_plots(summary, staged / "plots")
        summary["split"] = split
        summary["model"] = str(refs[0]) if len(refs) == 1 else [str(r) for r in refs]
        # what exactly was scored: register refuses to ship an ONNX file other than this one
        summary["model_sha256"] = predictor.verified
        run_id = training_run_of(refs[0]) if len(refs) == 1 else None
        if run_id:
            summary["train_run_id"] = run_id
        write_json(staged / "summary.json", _json_safe(summary))
        write_csv(summary, staged / "per_case.csv")
        write_json(staged / "metrics.json", dvc_metrics(summary))
        with open(staged / "per_class.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["class", *BOX_METRICS])
            for key, values in summary["mean"].items():
                writer.writerow([summary["labels"][key], *[_json_safe(values.get(m)) for m in BOX_METRICS]])
    files = [out / "summary.json", out / "per_case.csv", out / "metrics.json", out / "per_class.csv",
             *sorted((out / "plots").glob("*.png"))]
    if len(refs) == 1:
        _log_into_training_run(run_id, summary, files, mlflow_log)
    else:  # an ensemble has no one training run
        _maybe_log_mlflow(summary, files, mlflow_log)
    return summary


DVC_METRICS = ("Dice", "HD95", "NSD")


def dvc_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json for ``dvc metrics show`` / ``dvc exp show``: per metric (Dice first, so it
    leads the table), the foreground mean then each class; counts stay in per_case.csv."""
    out: dict[str, Any] = {}
    for m in DVC_METRICS:
        per = {"mean": summary["foreground_mean"].get(m)}
        per.update({str(summary["labels"][k]): v.get(m) for k, v in summary["mean"].items()})
        out[m] = {k: (None if v is None else round(float(v), 4)) for k, v in _json_safe(per).items()}
    return out


def training_run_of(model: str | os.PathLike) -> str | None:
    """The MLflow run id of the training that made ``model``: a training directory's summary, or
    the sidecar of an exported ONNX model (``source.train_run_id``); None if unknown."""
    from masksam.components._loading import ONNX_NAME, sidecar_path

    path = Path(str(model))
    candidates = [(path / "train_summary.json", ("mlflow_run_id",))]
    onnx = path if path.suffix == ".onnx" else path / ONNX_NAME
    candidates.append((sidecar_path(onnx), ("source", "train_run_id")))
    for file, keys in candidates:
        if file.is_file():
            try:
                value: Any = read_json(file)
                for key in keys:
                    value = value.get(key) if isinstance(value, dict) else None
            except UserError:
                value = None
            if value:
                return str(value)
    return None


def _log_into_training_run(run_id: str | None, summary: Mapping[str, Any], files: Sequence[Path],
                           mlflow_log: bool | None) -> None:
    """Log test metrics into the MLflow run of the training that made the model, when known
    (so one run holds the whole story), else into the active run as ``mlflow_log`` says."""
    if mlflow_log is False:
        return
    if run_id is None:
        _maybe_log_mlflow(summary, files, mlflow_log)
        return
    import mlflow

    from masksam.components._tracking import DEFAULT_TRACKING_TIMEOUT_S, bounded_call

    def log_into_run() -> None:
        with mlflow.start_run(run_id=run_id):
            log_to_mlflow(summary, files, prefix="test")

    # bounded like training's own calls: a dead server is an error within minutes, not a hang
    bounded_call(log_into_run, uri=mlflow.get_tracking_uri(), timeout_s=DEFAULT_TRACKING_TIMEOUT_S,
                 what=f"logging test metrics into training run {run_id}")


def _start_method() -> str:
    """'spawn' (no fork of a parent whose threads belong to MLflow or torch), except when the
    main script cannot be re-imported by a spawned child (code piped through stdin): 'fork'."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return "spawn" if main_file is None or os.path.isfile(main_file) else "fork"


def _maybe_log_mlflow(summary: Mapping[str, Any], files: Sequence[Path], mlflow_log: bool | None) -> None:
    if mlflow_log is False:
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    active = mlflow.active_run()
    if active is None and not mlflow_log:
        return
    try:
        if active is not None:
            log_to_mlflow(summary, files)
        else:
            with mlflow.start_run(run_name="evaluate"):
                log_to_mlflow(summary, files)
    except MlflowException as exc:
        raise UserError(f"logging to MLflow at {mlflow.get_tracking_uri()} failed: {exc}; check "
                        "MLFLOW_TRACKING_URI or run without --mlflow") from exc


# ----------------------------------------------------------------------------- CLI


def _run_cli(args: argparse.Namespace) -> int:
    if args.model is not None:
        return _run_pipeline_mode(args)
    missing = [f"--{n.replace('_', '-')}" for n in ("pred", "gt", "dataset_json", "out") if getattr(args, n) is None]
    if missing:
        raise UserError(f"folder mode needs {', '.join(missing)} (or give --model for pipeline mode)")
    out = Path(args.out)
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    csv_path = Path(args.csv) if args.csv else out.with_name(f"{stem}_per_case.csv")
    plots_dir = Path(args.plots) if args.plots else out.with_name(f"{stem}_plots")
    ev = params_from_args(args).evaluate
    evaluate_folders(
        args.pred,
        args.gt,
        labels_from_dataset_json(args.dataset_json),
        tolerance_mm=pick(args.nsd_tolerance, ev.nsd_tolerance_mm),
        hd_convention=pick(args.hd_convention, ev.hd_convention),
        connectivity=args.surface_connectivity,
        workers=args.workers,
        out_json=out,
        out_csv=csv_path,
        plots_dir=plots_dir,
        mlflow_log=True if args.mlflow else None,
    )
    print(f"wrote {out}, {csv_path} and plots in {plots_dir}")
    return 0


def _run_pipeline_mode(args: argparse.Namespace) -> int:
    """Pipeline mode: every option given on the command line wins, else params (evaluate:,
    data.out, preprocess.out), whose missing keys are the defaults of components/params.py."""
    params = params_from_args(args)
    ev = params.evaluate
    out_dir = pick(args.out_dir, ev.out)
    summary = evaluate_model(args.model, pick(args.raw, params.data.out), pick(args.preprocessed, params.preprocess.out),
                             out_dir, split=args.split, tolerance_mm=pick(args.nsd_tolerance, ev.nsd_tolerance_mm),
                             hd_convention=pick(args.hd_convention, ev.hd_convention), device=args.device,
                             mirror=pick(args.mirror, ev.mirror), overlap=pick(args.overlap, ev.overlap),
                             workers=args.workers, mlflow_log=False if args.no_mlflow else None,
                             progress=not args.no_progress, force=args.force)
    fm = summary["foreground_mean"]
    print(f"{summary['n_cases']} {args.split} cases: foreground mean Dice {fm['Dice']:.4f}, "
          f"HD95 {fm['HD95']:.2f} mm, NSD {fm['NSD']:.4f}; wrote {out_dir}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` verb."""
    p = subparsers.add_parser(
        "evaluate",
        help="score predicted label maps against references (Dice, HD95, NSD)",
        description="Score a folder of predicted label maps against a folder of reference label "
        "maps (NIfTI/NRRD/MHA, matched by case name), like nnUNetv2_evaluate_folder. Writes an "
        "nnU-Net-style summary.json (per case and per label, means, foreground mean, and the "
        "conventions used for empty masks and surfaces), a per-case CSV and PNG plots.",
    )
    folder = p.add_argument_group("folder mode (like nnUNetv2_evaluate_folder)")
    folder.add_argument("--pred", metavar="DIR", help="folder of predicted label maps")
    folder.add_argument("--gt", metavar="DIR",
                   help="folder of reference label maps; every file here is one case (a missing "
                   "prediction is scored as empty and reported)")
    folder.add_argument("--dataset-json", metavar="FILE",
                   help="nnU-Net dataset.json whose 'labels' name the classes (background 0 is not scored)")
    folder.add_argument("--out", metavar="FILE", help="summary JSON to write (NaN written as null)")
    p.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                   help="tolerance of the normalised surface Dice, in mm (default: 2.0, or "
                   "evaluate.nsd_tolerance_mm of --params)")
    p.add_argument("--hd-convention", choices=metrics.HD_CONVENTIONS, default=None,
                   help="HD95 definition: 'medpy' = 95th percentile of the pooled distances of both "
                   "directions (medpy.metric.binary.hd95); 'monai' = max of the two directed 95th "
                   "percentiles (monai compute_hausdorff_distance); default: evaluate.hd_convention of "
                   "--params, medpy")
    p.add_argument("--surface-connectivity", type=int, choices=(1, 2, 3), default=1,
                   help="connectivity of the erosion that defines border voxels (medpy's "
                   "'connectivity'; 1 = face neighbours, medpy's and MONAI's default; default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="cases scored in parallel, in separate processes (default: %(default)s)")
    p.add_argument("--csv", metavar="FILE", help="per-case CSV, one row per case and label "
                   "(default: OUT's name with _per_case.csv)")
    p.add_argument("--plots", metavar="DIR", help="folder for the PNG plots: per-class Dice bars, "
                   "box plots of Dice, HD95 and NSD (default: OUT's name with _plots)")
    p.add_argument("--mlflow", action="store_true",
                   help="log mean metrics and the output files to MLflow (MLFLOW_TRACKING_URI, "
                   "default sqlite:///mlflow.db), in the active run or a new run 'evaluate'")
    pipe = p.add_argument_group(
        "pipeline mode (predict the held-out cases with a model, then score them; dvc.yaml's stage)")
    pipe.add_argument("--model", metavar="M", nargs="+", help="training directory, exported model.onnx or "
                      "MLflow model URI; several form an ensemble (class probabilities averaged before "
                      "the argmax, e.g. the folds); selects pipeline mode")
    pipe.add_argument("--raw", metavar="DIR", help="raw dataset (default: data.out of --params)")
    pipe.add_argument("--preprocessed", metavar="DIR", help="preprocessed dataset holding splits.json "
                      "(default: preprocess.out of --params)")
    pipe.add_argument("--out-dir", metavar="DIR", help="output folder: predictions/, summary.json, "
                      "per_case.csv, plots/, metrics.json, per_class.csv (default: evaluate.out of --params)")
    pipe.add_argument("--split", default="test", help="'test' (default) or 'valN' for fold N's validation cases")
    add_params_arguments(p, "params file supplying the defaults of the options (its evaluate:, data.out, "
                         "preprocess.out; default: params.yaml when present, else the built-in defaults)")
    pipe.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) "
                      "(default: evaluate.overlap of --params, 0.5)")
    pipe.add_argument("--device", default="auto", help="auto, cpu, cuda or tensorrt (default: %(default)s)")
    pipe.add_argument("--mirror", action="store_true", help="test-time mirroring (slower, slightly better)")
    pipe.add_argument("--no-mlflow", action="store_true", help="do not log the test metrics to the "
                      "training's MLflow run")
    pipe.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    pipe.add_argument("--force", action="store_true", help="replace --out-dir even when it holds files "
                      "masksam evaluate did not write (by default only its own earlier output is replaced)")
    # mirror=None: "not given" (then evaluate.mirror of --params decides), whatever --mirror's action
    p.set_defaults(func=_run_cli, mirror=None)
