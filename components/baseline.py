"""`masksam baseline`: nnU-Net v2 itself, trained and evaluated on MaskSAM's own split.

The reference of the paper's claim is nnU-Net. This step runs the real thing (the ``nnunetv2``
package, ``pip install -e '.[nnunet]'``) through its own entry points, on the same raw dataset,
the same fold and the same held-out test cases as MaskSAM (``splits.json`` of ``masksam
preprocess``), and scores its test predictions with the project's own evaluator, so that
``masksam compare`` can pair the two summaries case by case. Nothing of nnU-Net is re-implemented:

1. ``nnUNetv2_plan_and_preprocess -d 1 -c CONFIGURATION --verify_dataset_integrity`` on a raw
   dataset holding only the non-test cases (links to the raw files), so the test cases never
   reach nnU-Net's fingerprint, plans or training;
2. MaskSAM's folds written as nnU-Net's ``splits_final.json``; the stock ``nnUNetTrainer`` made by
   nnU-Net's ``get_trainer_from_args``, its ``num_epochs``, ``num_iterations_per_epoch`` (and
   ``num_val_iterations_per_epoch``, nnU-Net's 1/5 of it) set from the ``baseline:`` params
   before ``run_training()`` and ``perform_actual_validation()`` (nnU-Net's validation of the
   fold, which ``nnUNetv2_train`` always runs; ``baseline.validate: false`` skips it, since the
   comparison scores the test set only and it costs minutes per case on a CPU). The stock class keeps its name,
   so nnU-Net's predictor (and ``nnUNetv2_predict`` on the kept results folder) finds it; the
   length actually trained is in nnU-Net's own ``debug.json`` and in ``baseline.json``;
3. ``nnUNetPredictor`` on the raw test scans, written in their raw geometry, with the same
   sliding-window overlap and test-time mirroring as MaskSAM's evaluation (``evaluate:``);
4. :func:`masksam.components.evaluate.evaluate_folders` on those predictions.

Each nnU-Net phase runs in a child process (``python -m masksam.components.baseline PHASE``)
with ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` pointing inside the output, so
this process's environment is untouched; its output goes to ``OUT/logs/PHASE.log`` (and to the
terminal unless ``--no-progress``).

Output folder (default ``data/baseline``): ``predictions/``, ``summary.json``, ``per_case.csv``,
``plots/``, ``baseline.json`` (settings, cases, durations) and ``nnunet/`` (nnU-Net's raw,
preprocessed and results folders; the trained model is
``nnunet/nnUNet_results/Dataset001_masksam/nnUNetTrainer__nnUNetPlans__CONFIGURATION/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

from masksam.components._io import OUTPUT_MARKER, check_output_dir, read_json, write_json
from masksam.components._scan import read_dataset_json
from masksam.errors import UserError

log = logging.getLogger(__name__)

DATASET_ID = 1
DATASET_NAME = f"Dataset{DATASET_ID:03d}_masksam"
TRAINER, PLANS = "nnUNetTrainer", "nnUNetPlans"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
STEP = "baseline"


# ----------------------------------------------------------------------------- inputs


def check_nnunet_installed() -> str:
    """nnunetv2's version, or a UserError saying how to install it."""
    if importlib.util.find_spec("nnunetv2") is None:
        raise UserError("masksam baseline needs nnU-Net v2: pip install -e '.[nnunet]' "
                        "(or pip install nnunetv2==2.8.1) in this environment")
    from importlib.metadata import version

    return version("nnunetv2")


def split_cases(preprocessed_dir: Path, fold: int) -> tuple[list[dict], list[str]]:
    """MaskSAM's folds and test cases from ``splits.json``; a missing fold or empty test set is refused."""
    splits = read_json(preprocessed_dir / "splits.json", "splits file (written by masksam preprocess)")
    folds, test = splits.get("folds") or [], list(splits.get("test") or [])
    if not 0 <= fold < len(folds):
        raise UserError(f"{preprocessed_dir}/splits.json has {len(folds)} folds; train.fold {fold} is not one "
                        f"of them (use 0..{len(folds) - 1})")
    if not test:
        raise UserError(f"{preprocessed_dir}/splits.json has no test cases: raise preprocess.test_fraction "
                        "or record fixed_test_cases in dataset.json, then rerun masksam preprocess")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in folds], test


def case_files(raw: Path, case: str, file_ending: str) -> tuple[list[Path], Path]:
    """The channel files and the label file of ``case`` in the raw dataset (refused if missing)."""
    channels = sorted((raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{file_ending}"))
    label = raw / "labelsTr" / f"{case}{file_ending}"
    if not channels or not label.is_file():
        raise UserError(f"case '{case}' of splits.json is missing from {raw} (imagesTr/{case}_0000{file_ending} "
                        f"or labelsTr/{case}{file_ending}): was the raw data changed after preprocessing?")
    return channels, label


def write_nnunet_raw(raw: Path, meta: Mapping[str, Any], cases: Sequence[str], dest: Path) -> Path:
    """nnU-Net's raw dataset of ``cases`` only: links to the raw files and a dataset.json whose
    numTraining counts them."""
    fe = meta.get("file_ending", ".nii.gz")
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in cases:
        channels, label = case_files(raw, case, fe)
        for channel in channels:
            os.symlink(channel.resolve(), dest / "imagesTr" / channel.name)
        os.symlink(label.resolve(), dest / "labelsTr" / label.name)
    dataset = {k: v for k, v in meta.items() if k not in ("fixed_test_cases",)}
    dataset["numTraining"] = len(cases)
    write_json(dest / "dataset.json", dataset)
    return dest


def device_env(device: str) -> tuple[str, dict[str, str]]:
    """``device`` (auto, cpu, cuda, cuda:N) as nnU-Net's device type plus environment: nnU-Net
    takes no GPU index, so cuda:N becomes CUDA_VISIBLE_DEVICES=N."""
    if device in ("auto", "cpu", "cuda"):
        return device, {}
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", {"CUDA_VISIBLE_DEVICES": device[5:]}
    raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


# ----------------------------------------------------------------------------- child processes


def run_phase(phase: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path, echo: bool) -> float:
    """Run one nnU-Net phase in a child process; its output goes to ``log_dir/PHASE.log`` (and to
    stderr with ``echo``). Returns the seconds it took; a failure is a UserError quoting its end."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{phase}.log"
    tail: deque[str] = deque(maxlen=15)
    start = time.monotonic()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, *argv], env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        try:
            for line in proc.stdout:
                fh.write(line)
                if line.strip():
                    tail.append(line.rstrip())
                if echo:
                    sys.stderr.write(line)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    seconds = time.monotonic() - start
    if rc != 0:
        last = " | ".join(list(tail)[-6:])
        raise UserError(f"nnU-Net {phase} failed (exit {rc}) after {seconds:.0f} s; the end of {log_path}: {last}")
    return seconds


def _worker_argv(phase: str, config: Mapping[str, Any]) -> list[str]:
    return ["-m", "masksam.components.baseline", phase, json.dumps(dict(config))]


def _plan_argv(configuration: str, processes: int) -> list[str]:
    """nnUNetv2_plan_and_preprocess, through its entry function (no reliance on PATH)."""
    code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
            "plan_and_preprocess_entry; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; plan_and_preprocess_entry()")
    return ["-c", code, "-d", str(DATASET_ID), "-c", configuration, "-np", str(processes),
            "-npfp", str(processes), "--verify_dataset_integrity"]


def _torch_device(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device cuda requested but torch sees no CUDA device")
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_train -device cpu
    else:
        torch.set_num_threads(1)  # as nnUNetv2_train on a GPU
    return torch.device(device)


def _train_worker(cfg: Mapping[str, Any]) -> None:
    """Child process: nnU-Net's own trainer factory, the length from params, train, validate."""
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), cfg["configuration"], cfg["fold"], TRAINER, PLANS,
                                    False, device=_torch_device(cfg["device"]))
    trainer.num_epochs = cfg["epochs"]
    trainer.num_iterations_per_epoch = cfg["iterations_per_epoch"]
    trainer.num_val_iterations_per_epoch = max(1, cfg["iterations_per_epoch"] // 5)
    trainer.run_training()
    if cfg.get("validate", True):
        trainer.perform_actual_validation(False)


def _predict_worker(cfg: Mapping[str, Any]) -> None:
    """Child process: nnUNetPredictor on the raw test scans, written in their own geometry."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = _torch_device(cfg["device"])
    predictor = nnUNetPredictor(tile_step_size=cfg["tile_step_size"], use_gaussian=True,
                                use_mirroring=cfg["mirror"], perform_everything_on_device=device.type == "cuda",
                                device=device, allow_tqdm=cfg["progress"])
    predictor.initialize_from_trained_model_folder(cfg["model_folder"], use_folds=(cfg["fold"],),
                                                   checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files(cfg["inputs"], cfg["outputs"], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=cfg["processes"],
                                 num_processes_segmentation_export=cfg["processes"])


# ----------------------------------------------------------------------------- API


def run_baseline(raw_dir: str | os.PathLike, preprocessed_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 fold: int = 0, configuration: str = "3d_fullres", epochs: int = 1, iterations_per_epoch: int = 5,
                 device: str = "auto", mirror: bool = False, overlap: float = 0.5, tolerance_mm: float = 2.0,
                 hd_convention: str = "medpy", progress: bool = True, force: bool = False,
                 mlflow_log: bool = False, experiment: str = "masksam", validate: bool = True) -> dict[str, Any]:
    """Train nnU-Net v2 on fold ``fold`` of MaskSAM's split, predict its test cases, score them.

    Returns the evaluator's summary (also ``out_dir/summary.json``). ``out_dir`` may replace only
    an earlier baseline output (or any folder with ``force``) and never overlaps the inputs;
    nnU-Net works inside it (its files hold absolute paths), and summary.json is written last.
    """
    version = check_nnunet_installed()
    raw, pre, out = Path(raw_dir), Path(preprocessed_dir), Path(out_dir)
    if configuration not in CONFIGURATIONS:
        raise UserError(f"baseline.configuration must be one of {', '.join(CONFIGURATIONS)}, got {configuration!r}")
    if epochs < 1 or iterations_per_epoch < 1:
        raise UserError(f"baseline.epochs and baseline.iterations_per_epoch must be >= 1, got {epochs} and "
                        f"{iterations_per_epoch}")
    meta = read_dataset_json(raw / "dataset.json")
    folds, test = split_cases(pre, fold)
    fe = meta.get("file_ending", ".nii.gz")
    train_val = sorted(set(folds[fold]["train"]) | set(folds[fold]["val"]))
    for case in [*train_val, *test]:
        case_files(raw, case, fe)
    device_type, env = device_env(device)
    _reset_output(out, (raw, pre), force)
    work = out / "nnunet"
    env.update({"nnUNet_raw": str((work / "nnUNet_raw").absolute()),
                "nnUNet_preprocessed": str((work / "nnUNet_preprocessed").absolute()),
                "nnUNet_results": str((work / "nnUNet_results").absolute()), "PYTHONUNBUFFERED": "1"})
    processes = max(1, min(4, os.cpu_count() or 1))
    seconds: dict[str, float] = {}
    write_nnunet_raw(raw, meta, train_val, work / "nnUNet_raw" / DATASET_NAME)
    log.info("nnU-Net %s: plan and preprocess %d training cases (%s)", version, len(train_val), configuration)
    seconds["plan_and_preprocess"] = run_phase("plan_and_preprocess", _plan_argv(configuration, processes), env,
                                               out / "logs", progress)
    _write_splits(work / "nnUNet_preprocessed" / DATASET_NAME, folds, configuration)
    log.info("nnU-Net: train fold %d (%d train, %d val cases) for %d epochs x %d iterations on %s", fold,
             len(folds[fold]["train"]), len(folds[fold]["val"]), epochs, iterations_per_epoch, device)
    train_cfg = {"configuration": configuration, "fold": fold, "device": device_type, "epochs": epochs,
                 "iterations_per_epoch": iterations_per_epoch, "validate": validate}
    seconds["train"] = run_phase("train", _worker_argv("train", train_cfg), env, out / "logs", progress)
    model_folder = work / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__{PLANS}__{configuration}"
    log.info("nnU-Net: predict %d test cases", len(test))
    predict_cfg = {"model_folder": str(model_folder.absolute()), "fold": fold, "device": device_type,
                   "mirror": mirror, "tile_step_size": 1.0 - overlap, "progress": progress, "processes": processes,
                   "inputs": [[str(p.absolute()) for p in case_files(raw, c, fe)[0]] for c in test],
                   "outputs": [str((out / "predictions" / c).absolute()) for c in test]}
    seconds["predict"] = run_phase("predict", _worker_argv("predict", predict_cfg), env, out / "logs", progress)
    settings = {"nnunetv2": version, "dataset": DATASET_NAME, "configuration": configuration, "trainer": TRAINER,
                "plans": PLANS, "fold": fold, "epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
                "num_val_iterations_per_epoch": max(1, iterations_per_epoch // 5), "device": device,
                "validate": validate, "mirror": mirror, "tile_step_size": 1.0 - overlap, "train_cases": folds[fold]["train"],
                "val_cases": folds[fold]["val"], "test_cases": test, "seconds": seconds,
                "model_folder": str(model_folder)}
    write_json(out / "baseline.json", settings)
    return _evaluate(out, raw, meta, test, tolerance_mm, hd_convention, settings,
                     experiment if mlflow_log else None)


def _reset_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse a foreign output folder, clear an earlier baseline output, and mark the new one."""
    check_output_dir(out, STEP, inputs=inputs, force=force, what="output folder (--out)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / OUTPUT_MARKER).write_text(json.dumps(
        {"step": STEP, "written_by": "masksam", "note": "marks a folder masksam may replace when it reruns "
         "this step; delete it to protect the folder"}, indent=2) + "\n")


def _write_splits(dataset_dir: Path, folds: Sequence[Mapping[str, list]], configuration: str) -> None:
    """MaskSAM's folds as nnU-Net's splits_final.json (read by the trainer instead of its own 5-fold split)."""
    plans = read_json(dataset_dir / f"{PLANS}.json", "nnU-Net plans")
    if configuration not in plans.get("configurations", {}):
        raise UserError(f"nnU-Net planned no '{configuration}' configuration for this dataset (it planned "
                        f"{', '.join(plans.get('configurations', {}))}); set baseline.configuration to one of them")
    write_json(dataset_dir / "splits_final.json", [dict(f) for f in folds])


def _evaluate(out: Path, raw: Path, meta: Mapping[str, Any], test: Sequence[str], tolerance_mm: float,
              hd_convention: str, settings: Mapping[str, Any], experiment: str | None = None) -> dict[str, Any]:
    """Score the test predictions with the project's evaluator (logged as an MLflow run in
    ``experiment`` when given, its id recorded in the summary); summary.json is written last."""
    from masksam.components.evaluate import _json_safe, evaluate_folders, write_csv

    fe = meta.get("file_ending", ".nii.gz")
    with tempfile.TemporaryDirectory(prefix="masksam-baseline-") as tmp:
        gt = Path(tmp)
        for case in test:
            label = case_files(raw, case, fe)[1]
            os.symlink(label.resolve(), gt / label.name)
        summary = evaluate_folders(out / "predictions", gt, meta["labels"], tolerance_mm=tolerance_mm,
                                   hd_convention=hd_convention, plots_dir=out / "plots", mlflow_log=False)
    for entry in summary["metric_per_case"]:
        entry["reference_file"] = str(raw / "labelsTr" / f"{entry['case']}{fe}")
    summary.update({"reference_folder": str(raw / "labelsTr"), "split": "test",
                    "model": settings["model_folder"], "method": f"nnU-Net v2 ({settings['nnunetv2']})",
                    "baseline": dict(settings)})
    write_csv(summary, out / "per_case.csv")
    if experiment is not None:
        summary["mlflow_run_id"] = _log_run(summary, settings, [out / "per_case.csv", *sorted(
            (out / "plots").glob("*.png"))], experiment)
    write_json(out / "summary.json", _json_safe(summary))
    return summary


def _log_run(summary: Mapping[str, Any], settings: Mapping[str, Any], files: Sequence[Path], experiment: str) -> str:
    """The baseline as an MLflow run beside MaskSAM's: its settings as params, its test metrics
    (``test/...``, the keys MaskSAM's training run uses), the per-case table and plots."""
    import mlflow
    from mlflow import MlflowClient

    from masksam.components._tracking import ensure_experiment, run_context_tags, tracking_uri
    from masksam.components.evaluate import log_to_mlflow

    client = MlflowClient(tracking_uri(None))
    tags = {"step": "baseline", "method": str(summary.get("method"))}
    run = client.create_run(ensure_experiment(client, experiment), run_name=f"baseline-nnunet-fold{settings['fold']}",
                            tags=run_context_tags("masksam baseline", tags))
    params = {k: v for k, v in settings.items() if not isinstance(v, (list, dict))}
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params({f"baseline.{k}": v for k, v in params.items()})
        log_to_mlflow(summary, files, prefix="test")
    return run.info.run_id


# ----------------------------------------------------------------------------- CLI


def _run_cli(args: argparse.Namespace) -> int:
    from masksam.components.params import params_from_args, pick

    params = params_from_args(args)
    bp = params.baseline
    out = pick(args.out, bp.out)
    summary = run_baseline(
        pick(args.raw, params.data.out), pick(args.preprocessed, params.preprocess.out), out,
        fold=pick(args.fold, params.train.fold), configuration=pick(args.configuration, bp.configuration),
        epochs=pick(args.epochs, bp.epochs), iterations_per_epoch=pick(args.iterations_per_epoch,
                                                                       bp.iterations_per_epoch),
        device=pick(args.device, bp.device), mirror=pick(args.mirror, params.evaluate.mirror),
        overlap=params.evaluate.overlap, tolerance_mm=params.evaluate.nsd_tolerance_mm,
        hd_convention=params.evaluate.hd_convention, progress=not args.no_progress, force=args.force,
        mlflow_log=args.mlflow, experiment=params.train.experiment, validate=pick(args.validate, bp.validate))
    fm, secs = summary["foreground_mean"], summary["baseline"]["seconds"]
    print(f"nnU-Net baseline, {summary['n_cases']} test cases: foreground mean Dice {fm['Dice']:.4f}, "
          f"HD95 {fm['HD95']:.2f} mm, NSD {fm['NSD']:.4f}; trained in {secs['train']:.0f} s; wrote {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``baseline`` verb."""
    from masksam.components.params import add_params_arguments

    p = subparsers.add_parser(
        "baseline",
        help="train and evaluate nnU-Net v2 on the same split, as the reference for `masksam compare`",
        description="Run nnU-Net v2 (pip install -e '.[nnunet]') on the same raw dataset, fold and held-out "
        "test cases as MaskSAM (splits.json of masksam preprocess): nnUNetv2_plan_and_preprocess, "
        "nnUNetTrainer for baseline.epochs x baseline.iterations_per_epoch, nnUNetPredictor on the raw "
        "test scans, then the project's evaluator. Writes predictions/, summary.json, per_case.csv, "
        "plots/, baseline.json and nnU-Net's own folders (nnunet/) into --out.",
    )
    p.add_argument("--raw", metavar="DIR", help="raw dataset (default: data.out of --params)")
    p.add_argument("--preprocessed", metavar="DIR", help="MaskSAM's preprocessed dataset holding splits.json "
                   "(default: preprocess.out of --params)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: baseline.out of --params)")
    p.add_argument("--fold", type=int, default=None, help="fold of splits.json to train on (default: train.fold)")
    p.add_argument("--configuration", choices=CONFIGURATIONS, default=None,
                   help="nnU-Net configuration (default: baseline.configuration, 3d_fullres)")
    p.add_argument("--epochs", type=int, default=None, help="nnU-Net epochs (default: baseline.epochs)")
    p.add_argument("--iterations-per-epoch", type=int, default=None, metavar="N",
                   help="training iterations per epoch (nnU-Net's default 250; default: baseline.iterations_per_epoch)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: baseline.device)")
    p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=None,
                   help="after training, nnU-Net's own validation of the fold (its validation/ folder, as "
                   "nnUNetv2_train does; minutes per case on a CPU, not used by the comparison; default: "
                   "baseline.validate)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time mirroring (default: evaluate.mirror, the same as MaskSAM's evaluation)")
    p.add_argument("--no-progress", action="store_true", help="nnU-Net's output only into OUT/logs/*.log")
    p.add_argument("--mlflow", action="store_true", help="also log the baseline as an MLflow run (experiment "
                   "train.experiment, server MLFLOW_TRACKING_URI) beside MaskSAM's training runs")
    p.add_argument("--force", action="store_true", help="replace --out even when it holds files masksam "
                   "baseline did not write")
    add_params_arguments(p)
    p.set_defaults(func=_run_cli)


def _worker_main(argv: Sequence[str]) -> int:
    phase, config = argv[0], json.loads(argv[1])
    {"train": _train_worker, "predict": _predict_worker}[phase](config)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
