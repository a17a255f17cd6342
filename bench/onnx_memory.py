"""Peak memory and time of one real-size CT through the torch-free ONNX path vs the eager path.

A synthetic 512x512x200 CT (int16 HU: air around an elliptic body, seven organ-like blobs, noise;
spacing 0.8 x 0.8 x 2.5 mm) is segmented by the one predictor end to end (read with the shared
checks -> preprocess_case -> sliding window -> probabilities restored to the original grid ->
argmax -> per-structure summary), from

  (a) the exported ONNX model (``Predictor.from_onnx``; torch never imported), and
  (b) the training directory (``Predictor.from_training_dir``; PyTorch eager),

each run in its own fresh subprocess so its peak RSS (VmHWM) is that path's alone. The model is
the demo's (params.yaml ``model``: ``tiny``), randomly initialised (time and memory do not depend
on training), trained on nothing: a real plan comes from preprocessing a few small synthetic cases.

    python bench/onnx_memory.py [--runs 3] [--threads N]

Prints each run and the medians as a Markdown table row (time, peak RSS, ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ORGANS = 7  # the demo's phantom: 7 organs + background
SIZE_XYZ = (512, 512, 200)
SPACING_XYZ = (0.8, 0.8, 2.5)


def _blobs(rng: np.random.Generator, shape_zyx) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre, radii) in voxels of each organ blob, inside the body."""
    nz, ny, nx = shape_zyx
    out = []
    for k in range(ORGANS):
        angle = 2 * np.pi * k / ORGANS
        centre = np.array([nz * rng.uniform(0.35, 0.65), ny * (0.5 + 0.22 * np.sin(angle)),
                           nx * (0.5 + 0.28 * np.cos(angle))])
        radii = np.array([nz * rng.uniform(0.12, 0.25), ny * rng.uniform(0.05, 0.09), nx * rng.uniform(0.05, 0.09)])
        out.append((centre, radii))
    return out


def synthetic_ct(size_xyz=SIZE_XYZ, spacing_xyz=SPACING_XYZ, seed: int = 0):
    """``(image, label)`` SimpleITK images, built slice by slice (int16 / uint8, never float64
    volumes)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    ct = np.empty((nz, ny, nx), np.int16)
    label = np.zeros((nz, ny, nx), np.uint8)
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    body = ((yy - ny / 2) / (ny * 0.42)) ** 2 + ((xx - nx / 2) / (nx * 0.46)) ** 2 < 1
    blobs = _blobs(rng, (nz, ny, nx))
    for z in range(nz):
        sl = np.where(body, 40.0, -1000.0)
        lab = np.zeros((ny, nx), np.uint8)
        for k, (c, r) in enumerate(blobs, start=1):
            inside = ((z - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
            sl[inside] = 60 + 25 * k
            lab[inside] = k
        ct[z] = np.clip(sl + rng.normal(0, 12, sl.shape), -1024, 3071).astype(np.int16)
        label[z] = lab
    images = []
    for array in (ct, label):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(spacing_xyz)
        img.SetOrigin((-200.0, -180.0, -250.0))
        images.append(img)
    return images[0], images[1]


def prepare(workdir: Path) -> tuple[Path, Path, Path]:
    """A training directory (random demo weights, a real plan) and its ONNX export; the CT file."""
    import SimpleITK as sitk
    import torch
    import yaml
    from safetensors.torch import save_file

    from masksam.components._io import sha256_file
    from masksam.components.export import export
    from masksam.components.preprocess import preprocess_dataset
    from masksam.model import MaskSAMConfig, build_masksam

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = workdir / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i in range(3):  # small cases: only the plan (normalisation, spacing) comes from them
        image, label = synthetic_ct((96, 96, 24), (4.0, 4.0, 8.0), seed=i + 1)
        sitk.WriteImage(image, str(raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(label, str(raw / "labelsTr" / f"case_{i:03d}.nii.gz"))
    labels = {"background": 0, **{f"organ{k}": k for k in range(1, ORGANS + 1)}}
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                  "numTraining": 3, "file_ending": ".nii.gz"}))
    pre = workdir / "preprocessed"
    preprocess_dataset(raw, pre, target_spacing=params["preprocess"]["target_spacing"], workers=1, folds=2,
                       test_fraction=0.0, progress=False)
    model_params = {k: v for k, v in params["model"].items() if v is not None}
    cfg = MaskSAMConfig(**{**model_params, "num_classes": len(labels), "in_channels": 1})
    torch.manual_seed(0)
    model = build_masksam(cfg).eval()
    train = workdir / "train"
    train.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(train / "model.safetensors"))
    (train / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (train / "plan.json").write_text((pre / "plan.json").read_text())
    (train / "train_summary.json").write_text(json.dumps({"steps": 0, "hashes": {
        n: sha256_file(train / n) for n in ("model.safetensors", "plan.json", "model_config.json")}}))
    export(train, workdir / "export", data_dir=pre, exporter="torchscript", tensorrt="off")
    image, _ = synthetic_ct()
    ct = workdir / "ct_512x512x200.nii"
    sitk.WriteImage(image, str(ct), useCompression=False)
    return train, workdir / "export" / "model.onnx", ct


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM starts afresh at exec, unlike an inherited ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One prediction in this process; prints time, peak RSS and whether torch was imported."""
    from masksam.components.predictor import Predictor

    started = time.perf_counter()
    if args.backend == "onnxruntime":
        predictor = Predictor.from_onnx(args.model, device="cpu", threads=args.threads)
    else:
        predictor = Predictor.from_training_dir(args.model, device="cpu")
    loaded = time.perf_counter()
    result = predictor.predict_files(args.ct)
    done = time.perf_counter()
    fg = int(sum(s["voxels"] for n, s in result.structures.items() if n != "background"))
    print(json.dumps({"backend": args.backend, "load_s": loaded - started, "predict_s": done - loaded,
                      "peak_rss_mb": _peak_rss_mb(), "torch_imported": "torch" in sys.modules,
                      "foreground_voxels": fg, "size_xyz": list(result.labels.GetSize())}))


def measure(backend: str, model: Path, ct: Path, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--backend", backend, "--model", str(model), "--ct", str(ct)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{backend} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="fresh processes per path (medians reported)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--ct", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="masksam-onnx-memory-") as tmp:
        train, onnx, ct = prepare(Path(tmp))
        runs: dict[str, list[dict]] = {"onnxruntime": [], "torch": []}
        for _ in range(args.runs):
            for backend, model in (("onnxruntime", onnx), ("torch", train)):
                res = measure(backend, model, ct, args.threads)
                runs[backend].append(res)
                print(json.dumps(res), flush=True)
    med = {b: {k: statistics.median(r[k] for r in rs) for k in ("predict_s", "load_s", "peak_rss_mb")}
           for b, rs in runs.items()}
    o, t = med["onnxruntime"], med["torch"]
    print(f"\nCPU: {os.cpu_count()} cores; {args.runs} run(s) per path; medians")
    print("| path | load s | predict s | peak RSS MB | torch imported |")
    print("|---|---|---|---|---|")
    for name, b in (("ONNX Runtime (Predictor.from_onnx)", "onnxruntime"), ("PyTorch eager (training dir)", "torch")):
        print(f"| {name} | {med[b]['load_s']:.1f} | {med[b]['predict_s']:.1f} | {med[b]['peak_rss_mb']:.0f} | "
              f"{runs[b][0]['torch_imported']} |")
    print(f"ONNX / eager: time {o['predict_s'] / t['predict_s']:.2f}x, peak RSS {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
