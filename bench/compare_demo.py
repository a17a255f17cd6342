"""MaskSAM against nnU-Net v2 on the demo's data, at the same training wall budget (issue 12).

1. The demo's raw and preprocessed data (params.yaml: the phantom, its split) are made in WORK
   with the `masksam` verbs, unless --raw/--preprocessed name existing ones.
2. MaskSAM: an existing evaluation (--masksam-eval DIR holding summary.json, e.g. data/eval) or,
   with --run-masksam, `masksam train` + `masksam evaluate` in WORK. Its training wall time
   (train_summary.json's wall_time_s) is the budget, unless --budget-s says otherwise.
3. nnU-Net's speed on this machine: a calibration run (1 epoch of --calibrate-iterations) gives
   seconds per iteration from nnU-Net's own "Epoch time" log lines.
4. `masksam baseline` with iterations_per_epoch --iterations-per-epoch and as many epochs as fit
   the budget; then `masksam compare` MaskSAM vs nnU-Net on the same test cases.

Writes WORK/compare_demo.json (budget, calibration, the baseline's own phase times, the
foreground means) and prints the compare table.

    python bench/compare_demo.py --work /tmp/cmp --masksam-eval data/eval
    python bench/compare_demo.py --work /tmp/cmp --run-masksam          # trains MaskSAM too (~7 min)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def masksam(*args: str) -> float:
    """Run one `masksam` verb with the project's params.yaml; return its wall seconds."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "masksam", *args, "--params", str(REPO / "params.yaml")], check=True)
    return time.monotonic() - start


def demo_data(work: Path, raw: Path | None, pre: Path | None) -> tuple[Path, Path, dict]:
    seconds = {}
    if raw is None:
        raw = work / "raw"
        if not (raw / "dataset.json").is_file():
            seconds["data"] = masksam("data", "fetch", "--set", f"data.out={raw}", "--no-progress")
    if pre is None:
        pre = work / "preprocessed"
        if not (pre / "splits.json").is_file():
            seconds["preprocess"] = masksam("preprocess", "--raw", str(raw), "--out", str(pre), "--no-progress")
    return raw, pre, seconds


def masksam_eval(work: Path, raw: Path, pre: Path, eval_dir: Path | None, run: bool) -> tuple[Path, dict]:
    """The MaskSAM evaluation folder and its training's wall time."""
    times = {}
    if eval_dir is None:
        if not run:
            raise SystemExit("give --masksam-eval DIR (a `masksam evaluate` output) or --run-masksam")
        train, eval_dir = work / "masksam_train", work / "masksam_eval"
        times["train_stage_s"] = masksam("train", "--preprocessed", str(pre), "--out", str(train), "--no-mlflow",
                                         "--no-progress")
        times["evaluate_stage_s"] = masksam("evaluate", "--model", str(train), "--raw", str(raw), "--preprocessed",
                                            str(pre), "--out-dir", str(eval_dir), "--no-mlflow", "--no-progress")
    summary = json.loads((eval_dir / "summary.json").read_text())
    train_summary = Path(summary.get("model", "")) / "train_summary.json"
    if train_summary.is_file():
        times["train_wall_time_s"] = json.loads(train_summary.read_text()).get("wall_time_s")
    return eval_dir, times


def seconds_per_iteration(baseline_out: Path, iterations: int) -> float:
    """Mean of nnU-Net's "Epoch time: X s" lines over the calibration run, per iteration."""
    text = (baseline_out / "logs" / "train.log").read_text()
    epochs = [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", text)]
    if not epochs:
        raise SystemExit(f"no 'Epoch time' line in {baseline_out}/logs/train.log")
    return sum(epochs) / len(epochs) / iterations


def fit_budget(budget_s: float, s_iter: float, per_epoch: int) -> tuple[int, int]:
    """(epochs, iterations per epoch) whose training iterations fit ``budget_s``: whole epochs of
    ``per_epoch`` iterations, or, when not even one fits (nnU-Net's full-size 3D U-Net on a CPU),
    one shorter epoch of the iterations that do (at least one), said so on stdout."""
    fit = math.floor(budget_s / s_iter)
    if fit >= per_epoch:
        return fit // per_epoch, per_epoch
    print(f"one epoch of {per_epoch} iterations ({per_epoch * s_iter:.0f} s) does not fit the budget: "
          f"one epoch of {max(fit, 1)} iterations", flush=True)
    return 1, max(fit, 1)


def main() -> int:
    from masksam.components.baseline import run_baseline
    from masksam.components.compare import compare
    from masksam.components.params import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--raw", type=Path)
    ap.add_argument("--preprocessed", type=Path)
    ap.add_argument("--masksam-eval", type=Path, help="a `masksam evaluate` output folder on the same data")
    ap.add_argument("--run-masksam", action="store_true", help="train and evaluate MaskSAM in WORK first")
    ap.add_argument("--budget-s", type=float, help="nnU-Net training budget (default: MaskSAM's training wall time)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calibrate-iterations", type=int, default=10)
    ap.add_argument("--iterations-per-epoch", type=int, default=50)
    ap.add_argument("--seconds-per-iteration", type=float,
                    help="nnU-Net's seconds per training iteration measured before (skips the calibration run)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    params = load_params(REPO / "params.yaml")
    ev = params.evaluate
    common = dict(fold=params.train.fold, configuration=params.baseline.configuration, device=args.device,
                  mirror=ev.mirror, overlap=ev.overlap, tolerance_mm=ev.nsd_tolerance_mm,
                  hd_convention=ev.hd_convention, progress=False, force=True,
                  validate=False)  # nnU-Net's fold validation: not part of the comparison, ~5 min/case on CPU
    raw, pre, data_s = demo_data(args.work, args.raw, args.preprocessed)
    eval_dir, masksam_times = masksam_eval(args.work, raw, pre, args.masksam_eval, args.run_masksam)
    budget = args.budget_s or masksam_times.get("train_wall_time_s")
    if not budget:
        raise SystemExit("no MaskSAM training time found next to the evaluation: pass --budget-s")

    calibration = args.work / "nnunet_calibration"
    calib = None
    if args.seconds_per_iteration:
        s_iter = args.seconds_per_iteration
    else:
        calib = run_baseline(raw, pre, calibration, epochs=1, iterations_per_epoch=args.calibrate_iterations, **common)
        s_iter = seconds_per_iteration(calibration, args.calibrate_iterations)
    epochs, per_epoch = fit_budget(budget, s_iter, args.iterations_per_epoch)
    print(f"budget {budget:.0f} s; nnU-Net {s_iter:.3f} s/iteration -> {epochs} epochs x "
          f"{per_epoch} iterations", flush=True)
    start = time.monotonic()
    summary = run_baseline(raw, pre, args.work / "nnunet", epochs=epochs, iterations_per_epoch=per_epoch, **common)
    baseline_wall = time.monotonic() - start
    results = compare(eval_dir / "summary.json", args.work / "nnunet" / "summary.json", args.work / "compare",
                      names=["MaskSAM", "nnU-Net"], resamples=params.compare.bootstrap, seed=params.compare.seed)
    report = {
        "device": args.device, "budget_s": budget, "masksam": masksam_times, "data_s": data_s,
        "nnunet_seconds_per_iteration": s_iter, "nnunet_epochs": epochs,
        "nnunet_iterations_per_epoch": per_epoch,
        "nnunet_phase_seconds": summary["baseline"]["seconds"], "nnunet_baseline_wall_s": baseline_wall,
        "nnunet_calibration_foreground_dice": calib["foreground_mean"]["Dice"] if calib else None,
        "foreground_mean": results["foreground_mean"],
    }
    (args.work / "compare_demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print((args.work / "compare" / "compare.md").read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "foreground_mean"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
