"""Training throughput and peak memory of MaskSAM on this machine.

For each configuration (the demo's ``model:``/``train:`` sections of params.yaml, and ``vit_b``
at img 256) a fresh subprocess runs the real training step (slab sampler, with augmentation where the
params turn it on, forward under autocast, SetCriterion with the params' matcher, backward,
clipping, AdamW) on synthetic phantom-like
slabs, and reports slabs/s (median over steps after warm-up) and the process's peak RSS.
With ``--demo DIR`` it also reads a finished demo run (``DIR/train_summary.json``, and
``--eval`` an evaluate summary.json) for its wall time and held-out Dice. Prints Markdown.

    python bench/train.py                      # both configurations, CPU
    python bench/train.py --configs demo --steps 8 --demo data/train
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _configs(params: dict) -> dict[str, tuple[dict, dict]]:
    demo_model = {k: v for k, v in params["model"].items()}
    demo_train = params["train"]
    vit_b = {**demo_model, "variant": "vit_b", "img_size": 256, "patch_size": 16, "freeze_sam": True, "checkpoint": None}
    return {"demo": (demo_model, demo_train), "vit_b_256": (vit_b, demo_train)}


def run_one(model_params: dict, train_params: dict, steps: int, warmup: int, device: str) -> dict:
    """Time ``steps`` training steps after ``warmup``; runs in the calling process."""
    import numpy as np
    import torch

    from masksam.components._augment import AugmentConfig
    from masksam.components._sampler import SlabDataset, make_case
    from masksam.components.train import resolve_precision
    from masksam.model import MaskSAMConfig, build_masksam
    from masksam.model.criterion import SetCriterion
    from masksam.model.matcher import FixedMatcher

    num_classes = 8  # the phantom's background + 7 organs
    cfg = MaskSAMConfig.from_dict({**model_params, "num_classes": num_classes, "in_channels": 1})
    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = resolve_precision(train_params.get("precision", "auto"), dev)
    model = build_masksam(cfg).to(dev).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    matcher = FixedMatcher() if train_params.get("matching") == "fixed" else None
    crit = SetCriterion(num_classes, num_points=train_params.get("num_points") or min(12544, cfg.img_size ** 2 // 4),
                        matcher=matcher).to(dev)
    opt = torch.optim.AdamW(trainable, lr=float(train_params.get("lr", 1e-3)))
    rng = np.random.default_rng(0)
    z, y, x = max(cfg.slab_depth * 3, 12), cfg.img_size + 16, cfg.img_size + 16
    zz, yy, xx = np.mgrid[:z, :y, :x]
    cases = []
    for i in range(3):
        label = np.zeros((z, y, x), np.uint8)
        for c in range(1, num_classes):
            cz, cy, cx = rng.uniform(0.2, 0.8, 3) * (z, y, x)
            r = rng.uniform(0.06, 0.15) * y
            label[((zz - cz) / (r / 2)) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 < 1] = c
        image = (label * 0.4 + rng.normal(0, 0.3, label.shape)).astype(np.float32)[None]
        cases.append(make_case(f"b{i}", image, label))
    batch = int(train_params.get("batch_size", 2))
    ds = SlabDataset(cases, cfg.slab_depth, cfg.img_size, float(train_params.get("foreground_oversample", 0.33)),
                     augmentation=AugmentConfig() if train_params.get("augment", True) else None)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        items = [ds[step * batch + i] for i in range(batch)]
        img = torch.stack([it["image"] for it in items]).to(dev)
        lab = torch.stack([it["label"] for it in items]).to(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(img)
        loss = crit(out, lab)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"variant": cfg.variant, "img_size": cfg.img_size, "slab_depth": cfg.slab_depth, "batch": batch,
            "matching": train_params.get("matching", "hungarian"),
            "trainable_params": sum(p.numel() for p in trainable),
            "median_step_s": med, "slabs_per_s": batch / med, "peak_rss_mib": peak_rss_mib,
            "steps_timed": steps, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"), help="params.yaml with the demo sections")
    ap.add_argument("--configs", nargs="+", default=["demo", "vit_b_256"], choices=["demo", "vit_b_256"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--demo", help="a finished demo training dir (train_summary.json) to report")
    ap.add_argument("--eval", help="the demo's evaluate summary.json (held-out Dice) to report")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import yaml

    params = yaml.safe_load(Path(args.params).read_text())
    configs = _configs(params)
    if args._child:
        model_params, train_params = configs[args._child]
        print("RESULT " + json.dumps(run_one(model_params, train_params, args.steps, args.warmup, args.device)))
        return 0

    rows = []
    for name in args.configs:
        # One process per configuration, so the peak RSS is that configuration's alone.
        cmd = [sys.executable, __file__, "--params", args.params, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--device", args.device, "--_child", name]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if res.returncode or line is None:
            print(f"{name}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append((name, json.loads(line[len("RESULT "):])))

    import torch

    print(f"## Training throughput ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f})\n")
    print("| config | variant | img | T | batch | matching | trainable params | dtype | median s/step | slabs/s "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['variant']} | {r['img_size']} | {r['slab_depth']} | {r['batch']} | {r['matching']} | "
              f"{r['trainable_params'] / 1e6:.2f} M | {r['dtype']} | {r['median_step_s']:.2f} | "
              f"{r['slabs_per_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    if args.demo:
        s = json.loads((Path(args.demo) / "train_summary.json").read_text())
        print(f"\nDemo run {args.demo}: {s['steps']} steps in {s['wall_time_s']} s, best validation mean "
              f"Dice {s.get('best_val_mean_dice')}")
    if args.eval:
        e = json.loads(Path(args.eval).read_text())
        print(f"Held-out evaluation {args.eval}: " + json.dumps({k: v for k, v in e.items()
                                                                 if "mean" in k.lower() or "dice" in k.lower()})[:500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
