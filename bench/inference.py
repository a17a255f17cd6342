"""Inference benchmark: PyTorch eager vs ONNX Runtime on CPU, time per volume and peak memory.

Both go through the one predictor (``masksam.components.predictor``): its ``TorchRunner`` or
``OrtRunner`` under ``Predictor.predict_preprocessed`` (the preprocessed grid; the end-to-end
path from a CT file, with preprocessing and restoring, is ``bench/onnx_memory.py``).

Each (model, backend) runs in its own subprocess so peak RSS (``ru_maxrss``) is that backend's
alone. The demo model (params.yaml's ``model`` section, random weights: speed does not depend on
training) segments a phantom CT of real size (default 512x512x200 at 0.78x0.78x2.5 mm, i.e. the
preprocessed grid at params.yaml's target spacing) by sliding window; ``vit_b`` runs one slab.

    python bench/inference.py [--repeats 3] [--size 512 512 200] [--skip-vit-b]

Prints medians and a Markdown table; the ratio is measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _grid(size_xyz, spacing_xyz, target_xyz) -> tuple[int, int, int]:
    """[Z, Y, X] of the preprocessed grid."""
    return tuple(int(round(n * s / t)) for n, s, t in zip(size_xyz, spacing_xyz, target_xyz))[::-1]


def prepare(workdir: Path, variant: str, cfg_over: dict, exporter: str) -> Path:
    """Checkpoint dir with random weights + its ONNX export (TorchScript exporter: same graph)."""
    import torch
    from safetensors.torch import save_file

    from masksam.components.export import _class_probs_module, export_onnx
    from masksam.model import MaskSAMConfig, build_masksam

    cfg = MaskSAMConfig(variant=variant, **cfg_over)
    torch.manual_seed(0)
    model = build_masksam(cfg).eval()
    d = workdir / variant
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    x = torch.randn(1, cfg.in_channels, cfg.slab_depth, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        export_onnx(_class_probs_module(model), x, d / "model.onnx", 18, exporter)
    return d


def child(args: argparse.Namespace) -> None:
    """One backend in this process: warm up, time ``repeats`` runs, report peak RSS. Volumes go
    through the one predictor (``Predictor.predict_preprocessed``), slabs through its runners."""
    import onnxruntime as ort

    from masksam.components._loading import ort_session_options
    from masksam.components.predictor import Member, OrtRunner, Predictor, TorchRunner

    d = Path(args.model_dir)
    cfg_d = json.loads((d / "model_config.json").read_text())
    if args.backend == "torch":
        import torch
        from safetensors.torch import load_file

        from masksam.model import MaskSAMConfig, build_masksam

        torch.set_num_threads(args.threads or torch.get_num_threads())
        model = build_masksam(MaskSAMConfig.from_dict(cfg_d)).eval()
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        runner = TorchRunner(model, "cpu")
    else:
        sess = ort.InferenceSession(str(d / "model.onnx"), sess_options=ort_session_options(args.threads),
                                    providers=["CPUExecutionProvider"])
        runner = OrtRunner(sess)
    predictor = Predictor([Member(runner, {}, cfg_d, args.backend, str(d))])
    rng = np.random.default_rng(0)
    if args.shape:
        volume = rng.standard_normal((cfg_d["in_channels"], *args.shape)).astype(np.float32)
        run = lambda: predictor.predict_preprocessed(volume, overlap=args.overlap)  # noqa: E731
    else:
        slab = rng.standard_normal((1, cfg_d["in_channels"], cfg_d["slab_depth"], cfg_d["img_size"],
                                    cfg_d["img_size"])).astype(np.float32)
        run = lambda: runner(slab)  # noqa: E731
    run()  # warm-up (graph optimisation, allocator)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    peak_mb = _peak_rss_mb()
    print(json.dumps({"times": times, "peak_rss_mb": peak_mb}))


def _peak_rss_mb() -> float:
    """This process's peak RSS. /proc's VmHWM starts afresh at exec; ru_maxrss would carry the
    parent's high-water mark into the child on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_dir: Path, backend: str, shape, repeats: int, overlap: float, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--backend", backend,
           "--repeats", str(repeats), "--overlap", str(overlap)]
    if shape:
        cmd += ["--shape", *map(str, shape)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    res = json.loads(out)
    res["median_s"] = statistics.median(res["times"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 200], help="CT voxels x y z")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.78, 0.78, 2.5], help="CT mm x y z")
    p.add_argument("--target-spacing", type=float, nargs=3,
                   help="preprocessed spacing mm x y z (default: params.yaml preprocess.target_spacing)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--exporter", default="torchscript", choices=("auto", "dynamo", "torchscript"))
    p.add_argument("--skip-vit-b", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    model_params = params["model"]
    if args.target_spacing is None:
        args.target_spacing = params["preprocess"]["target_spacing"] or [2.0, 2.0, 4.0]
    demo = {k: model_params[k] for k in ("img_size", "patch_size", "slab_depth", "num_queries") if k in model_params}
    demo.update(num_classes=5, freeze_sam=False)
    shape = _grid(args.size, args.spacing, args.target_spacing)
    rows = []
    with tempfile.TemporaryDirectory(prefix="masksam-bench-") as tmp:
        jobs = [("tiny (demo)", model_params.get("variant", "tiny"), demo, shape)]
        if not args.skip_vit_b:
            jobs.append(("vit_b", "vit_b", {"img_size": 1024, "slab_depth": 8, "num_classes": 5}, None))
        for label, variant, over, shp in jobs:
            d = prepare(Path(tmp), variant, over, args.exporter)
            res = {b: measure(d, b, shp, args.repeats, args.overlap, args.threads) for b in ("torch", "onnxruntime")}
            what = f"volume {args.size} -> grid {list(shp)} (zyx)" if shp else "one slab"
            rows.append((label, what, res))
            print(json.dumps({"model": label, "what": what, **res}), flush=True)
    print("\n| model | input | PyTorch eager s (median) | ORT s (median) | ORT speed-up | eager peak RSS MB | ORT peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for label, what, r in rows:
        t, o = r["torch"], r["onnxruntime"]
        print(f"| {label} | {what} | {t['median_s']:.2f} | {o['median_s']:.2f} | "
              f"{t['median_s'] / o['median_s']:.2f}x | {t['peak_rss_mb']:.0f} | {o['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
