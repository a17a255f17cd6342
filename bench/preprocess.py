"""Benchmark `masksam preprocess` against nnU-Net v2's own preprocessing on the same phantom cases.

    .venv/bin/python bench/preprocess.py --cases 4 --size 512 512 120 --workers 2 \
        --nnunet-python /work/nnunet-venv/bin/python

Generates phantom cases of real CT size (``masksam data phantom``; reused when already there),
times masksam's fingerprint + preprocessing (median of ``--repeats``), then nnU-Net v2's
fingerprint extraction + planning + 3d_fullres preprocessing of the same raw files with the same
number of workers (in nnU-Net's own venv, see bench/_nnunet_preprocess.py), and compares the
outputs (target spacing, CT normalisation parameters, intensities and labels mapped through
physical space). Prints a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ensure_phantom(raw: Path, cases: int, size: list[int], seed: int, workers: int) -> float | None:
    """Generate the phantom dataset unless one with these cases and size is already there."""
    ds_file = raw / "dataset.json"
    if ds_file.is_file():
        ds = json.loads(ds_file.read_text())
        if ds.get("numTraining") == cases and f"seed {seed}, size_xyz {list(size)}" in ds.get("source", ""):
            return None
    from masksam.components.data.phantom import generate_phantom

    t = time.perf_counter()
    generate_phantom(raw, cases=cases, seed=seed, size_xyz=size, workers=workers, progress=True)
    return time.perf_counter() - t


def _nnunet(python: str, *args: str) -> dict:
    cmd = [python, str(HERE / "_nnunet_preprocess.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@"):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=4, help="phantom cases (default 4)")
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 120], metavar=("X", "Y", "Z"),
                   help="voxels per case (default 512 512 120: real CT size)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for both tools (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="masksam timing repeats; the median is reported")
    p.add_argument("--nnunet-repeats", type=int, default=1, help="nnU-Net timing repeats (it is slow)")
    p.add_argument("--nnunet-python", default="/work/nnunet-venv/bin/python",
                   help="Python of a venv with nnunetv2 installed; 'none' skips nnU-Net")
    p.add_argument("--work", default="/tmp/masksam-bench-preprocess", help="scratch directory")
    p.add_argument("--raw", default=None, help="existing raw dataset to use instead of generating one")
    p.add_argument("--label-interp", default="nearest", choices=["nearest", "label_aware"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from masksam.components.preprocess import preprocess_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    raw = Path(args.raw) if args.raw else work / f"raw_{args.cases}x{'x'.join(map(str, args.size))}"
    gen_s = None if args.raw else _ensure_phantom(raw, args.cases, args.size, args.seed, args.workers)
    if gen_s is not None:
        print(f"phantom: {args.cases} cases {args.size} generated in {gen_s:.1f} s", file=sys.stderr)
    n = len(list((raw / "labelsTr").glob("*.nii.gz")))

    ours = work / "masksam"
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        plan = preprocess_dataset(raw, ours, workers=args.workers, folds=2, seed=args.seed,
                                  label_interp=args.label_interp, progress=False)
        times.append(time.perf_counter() - t)
    ours_s = statistics.median(times)
    print(f"masksam: {n} cases, runs {[round(x, 1) for x in times]} s, target spacing "
          f"{[round(s, 3) for s in plan['target_spacing_xyz']]}", file=sys.stderr)

    nn = None
    quality = None
    if args.nnunet_python != "none" and Path(args.nnunet_python).exists():
        nn = _nnunet(args.nnunet_python, "run", "--raw", str(raw), "--work", str(work / "nnunet"),
                     "--workers", str(args.workers), "--repeats", str(args.nnunet_repeats))
        print(f"nnU-Net v2 {nn['nnunetv2']}: fingerprint {nn['fingerprint_s']}, plan {nn['plan_s']}, "
              f"preprocess {nn['preprocess_s']} s", file=sys.stderr)
        quality = _nnunet(args.nnunet_python, "compare", "--work", str(work / "nnunet"), "--ours", str(ours))
        print(json.dumps(quality, indent=1), file=sys.stderr)

    ours_rate = n / ours_s
    cpu = os.cpu_count()
    header = ("| step | data | workers (CPUs) | masksam cases/s | nnU-Net v2 cases/s | masksam / nnU-Net "
              "| target spacing (x,y,z mm) masksam / nnU-Net | intensity r (min) | label Dice vs nnU-Net (min) |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    if nn is not None:
        nn_s = statistics.median(nn["total_s"])
        nn_rate = n / nn_s
        cases_q = quality["cases"].values()
        r_min = min(c["intensity_pearson_r"] for c in cases_q)
        d_min = min(c["label_dice_min"] for c in cases_q if c["label_dice_min"] is not None)
        sp = quality["target_spacing_xyz"]
        nn_cols = (f"{nn_rate:.3f} ({nn_s:.1f} s; fp {statistics.median(nn['fingerprint_s']):.1f} + plan "
                   f"{statistics.median(nn['plan_s']):.1f} + pp {statistics.median(nn['preprocess_s']):.1f})",
                   f"{ours_rate / nn_rate:.2f}x",
                   f"{[round(s, 3) for s in sp['masksam']]} / {[round(s, 3) for s in sp['nnunet']]}",
                   f"{r_min:.4f}", f"{d_min:.4f}")
    else:
        nn_cols = ("n/a (no nnunetv2 Python)", "n/a", "n/a", "n/a", "n/a")
    print(f"| preprocess | phantom {n} x {'x'.join(map(str, args.size))} | {args.workers} ({cpu}) | "
          f"{ours_rate:.3f} ({ours_s:.1f} s, median of {args.repeats}) | " + " | ".join(nn_cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
