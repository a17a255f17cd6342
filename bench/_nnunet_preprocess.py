"""Helper for bench/preprocess.py, run with nnU-Net v2's own Python (its own venv).

``run``: nnU-Net v2 fingerprint extraction + planning + 3d_fullres preprocessing of a raw
dataset (linked into a DatasetXXX folder), timed per stage. ``compare``: nnU-Net's preprocessed
cases against masksam's, mapped through physical space onto masksam's grid. Both print JSON.
Imports only numpy/scipy/blosc2/nnunetv2, never masksam (which is not in that venv).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np

NNUNET_KEYS = ("channel_names", "labels", "numTraining", "file_ending", "name")


def _setup(work: Path, raw: Path, dataset_id: int) -> str:
    name = f"Dataset{dataset_id:03d}_MaskSAMBench"
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[sub] = str(work / sub)
    target = work / "nnUNet_raw" / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).symlink_to(raw.resolve() / sub, target_is_directory=True)
    ds = json.loads((raw / "dataset.json").read_text())
    (target / "dataset.json").write_text(json.dumps({k: ds[k] for k in NNUNET_KEYS if k in ds}, indent=1))
    return name


def run(args: argparse.Namespace) -> dict:
    name = _setup(Path(args.work), Path(args.raw), args.dataset_id)
    import nnunetv2  # noqa: F401  (after the environment variables: nnunetv2.paths reads them)
    from importlib.metadata import version

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints,
                                                                      plan_experiments, preprocess)

    out = {"nnunetv2": version("nnunetv2"), "dataset": name, "fingerprint_s": [], "plan_s": [],
           "preprocess_s": [], "total_s": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        extract_fingerprints([args.dataset_id], num_processes=args.workers, clean=True, verbose=False,
                             show_progress_bar=False)
        t1 = time.perf_counter()
        plan_experiments([args.dataset_id])
        t2 = time.perf_counter()
        preprocess([args.dataset_id], configurations=["3d_fullres"], num_processes=[args.workers],
                   verbose=False)
        t3 = time.perf_counter()
        out["fingerprint_s"].append(t1 - t0)
        out["plan_s"].append(t2 - t1)
        out["preprocess_s"].append(t3 - t2)
        out["total_s"].append(t3 - t0)
    return out


def _physical_to_nnunet_index(points_xyz: np.ndarray, props: dict, out_shape_zyx) -> np.ndarray:
    """Continuous ``[3, N]`` (z, y, x) index into nnU-Net's resampled array of physical points."""
    sitk_stuff = props["sitk_stuff"]
    origin = np.asarray(sitk_stuff["origin"], float)
    spacing = np.asarray(sitk_stuff["spacing"], float)
    direction = np.asarray(sitk_stuff["direction"], float).reshape(3, 3)
    file_xyz = (direction.T @ (points_xyz - origin[:, None])) / spacing[:, None]
    file_zyx = file_xyz[::-1]
    bbox_lo = np.asarray([b[0] for b in props["bbox_used_for_cropping"]], float)
    in_shape = np.asarray(props["shape_after_cropping_and_before_resampling"], float)
    crop_zyx = file_zyx - bbox_lo[:, None]
    scale = np.asarray(out_shape_zyx, float) / in_shape  # edge-aligned resize (skimage/nnU-Net)
    return (crop_zyx + 0.5) * scale[:, None] - 0.5


def compare(args: argparse.Namespace) -> dict:
    import blosc2
    from scipy import ndimage

    work, ours = Path(args.work), Path(args.ours)
    name = f"Dataset{args.dataset_id:03d}_MaskSAMBench"
    pre = work / "nnUNet_preprocessed" / name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    backward = plans["transpose_backward"]
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())
    our_plan = json.loads((ours / "plan.json").read_text())
    spacing_nnunet_zyx = np.asarray(cfg["spacing"])[backward]
    result = {
        "target_spacing_xyz": {"masksam": our_plan["target_spacing_xyz"],
                               "nnunet": [float(s) for s in spacing_nnunet_zyx[::-1]]},
        "ct_normalization": {"masksam": our_plan["normalization"]["0"],
                             "nnunet": fingerprint["foreground_intensity_properties_per_channel"]["0"]},
        "cases": {},
    }
    for npz in sorted((ours / "cases").glob("*.npz")):
        case = npz.stem
        with np.load(npz) as d:
            image, label = d["image"][0], d["label"]
        props_ours = json.loads(npz.with_suffix(".json").read_text())
        data = blosc2.open(str(pre / cfg["data_identifier"] / f"{case}.b2nd"), mode="r")[:]
        seg = blosc2.open(str(pre / cfg["data_identifier"] / f"{case}_seg.b2nd"), mode="r")[:]
        with open(pre / cfg["data_identifier"] / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)
        data = data[0].transpose(backward)
        seg = seg[0].transpose(backward)
        g = props_ours["resampled"]
        stride = args.stride
        kz, ky, kx = np.meshgrid(*[np.arange(0, n, stride) for n in image.shape], indexing="ij")
        idx_xyz = np.stack([kx.ravel(), ky.ravel(), kz.ravel()]).astype(float)
        points = np.asarray(g["origin_xyz"])[:, None] + np.asarray(g["direction"]).reshape(3, 3) @ (
            idx_xyz * np.asarray(g["spacing_xyz"])[:, None])
        coords = _physical_to_nnunet_index(points, props, data.shape)
        theirs = ndimage.map_coordinates(data.astype(np.float32), coords, order=1, mode="nearest")
        their_lab = ndimage.map_coordinates(seg.astype(np.int16), coords, order=0, mode="nearest")
        mine = image[::stride, ::stride, ::stride].ravel()
        my_lab = label[::stride, ::stride, ::stride].ravel()
        dices = []
        for v in np.unique(my_lab):
            if v == 0:
                continue
            a, b = my_lab == v, their_lab == v
            dices.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
        result["cases"][case] = {
            "shape_zyx": {"masksam": list(image.shape), "nnunet": list(data.shape)},
            "intensity_pearson_r": float(np.corrcoef(mine, theirs)[0, 1]),
            "intensity_mean_abs_diff": float(np.abs(mine - theirs).mean()),
            "label_dice_mean": float(np.mean(dices)) if dices else None,
            "label_dice_min": float(np.min(dices)) if dices else None,
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--raw", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--ours", required=True)
    c.add_argument("--stride", type=int, default=2)
    for p in (r, c):
        p.add_argument("--work", required=True)
        p.add_argument("--dataset-id", type=int, default=987)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args) if args.cmd == "run" else compare(args)
    print("@@RESULT@@" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
