"""GPU check of the paper configurations: training-step time, peak memory, FLOPs, MFU, ONNX parity.

For each paper configuration (configs/paper_{amos,synapse}_vit_h.yaml, paper_acdc_vit_b.yaml)
the network is built with random SAM weights (no checkpoint, no network), and a few real
training steps run at the paper's slab size (img_size x img_size x slab_depth) and batch (2:
the paper's ``*_b2`` plans, two GPUs x 1 there, one GPU x 2 here) in each precision: bf16
autocast, and fp16 autocast with GradScaler, exactly as ``masksam train`` does (the step is
``components.train._train_step``; model, criterion, matcher, optimiser and schedule come from
the same builders as training). Data loading is left out: the slabs are synthetic and already
on the device. Reported per (configuration, precision):

- ``step_s``: median wall time of the timed steps (warm-up steps excluded);
- ``peak_gpu_gib``: ``torch.cuda.max_memory_allocated`` over warm-up and timed steps (weights,
  optimiser state and activations; null on the CPU, where ``peak_rss_gib`` is the process's);
- ``tflop_per_step``: FLOPs of one whole training step (forward, loss, backward, optimiser)
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions;
  a 2*M*N*K convention), ``tflops`` = that / ``step_s``, and ``mfu`` = ``tflops`` / the GPU's
  peak dense bf16/fp16 TFLOP/s (a small table by device name; ``--peak-tflops`` overrides);
- ``parity``: the trained model's class-probability forward exported to ONNX the way
  ``masksam export`` does (``export_onnx`` of ``_class_probs_module``) and run by ONNX Runtime
  on the device's provider (CUDA on a GPU, CPU with ``--device cpu``) against eager PyTorch
  fp32 on one random slab: max |diff| and argmax label agreement; "skipped: no
  CUDAExecutionProvider" where onnxruntime-gpu is not installed.

A configuration that runs out of memory is reported as OOM and the check goes on. Output: a
Markdown table on stdout, every figure in ``--out FILE`` (JSON). ``--tiny`` runs the same code
path on the CPU in seconds (variant tiny, 64 px, 4 slices; fp32 and bf16) for the tests.

    python bench/gpu_check.py --out gpu_check.json                 # all three, bf16 + fp16
    python bench/gpu_check.py --configs amos --precisions bf16 --steps 5
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json     # CPU smoke run
    bash bench/gpu_check.sh                                        # a bare GPU machine (BENCHMARKS.md)

The project need not be installed: run from a copy of the repository, the script maps
``masksam.model`` / ``masksam.components`` onto ``model/`` and ``components/`` itself; it needs
torch, segment-anything, numpy, scipy, pyyaml (and onnx, onnxscript, onnxruntime for parity).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "amos": "configs/paper_amos_vit_h.yaml",
    "synapse": "configs/paper_synapse_vit_h.yaml",
    "acdc": "configs/paper_acdc_vit_b.yaml",
}
PAPER_BATCH = 2  # plans nnUNetPlans_*_b2 in every paper configuration (2 GPUs x 1 in the public code)
# peak dense (no sparsity) bf16 = fp16 tensor-core TFLOP/s from the vendors' data sheets; the
# first name contained in torch.cuda.get_device_name() wins, so the specific names come first
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0), ("RTX 4090", 165.0),
)
# --tiny: the same code path at CPU size (the variant, in-plane size and slab depth only; the
# switches, queries, classes and the loss/matcher recipe stay the configuration's). Not 2 slices:
# torch 2.14.1's CPU bf16 Conv3d backward (oneDNN) returns NaN weight gradients for inputs of
# depth 2 at batch 2 (seen here; depths 1, 3, 4 and batch 1 are fine), which the step reports.
TINY = {"model.variant": "tiny", "model.img_size": 64, "model.patch_size": 8, "model.slab_depth": 4,
        "loss.num_points": 0}


def make_importable() -> None:
    """Import ``masksam.*`` from this checkout when the project is not installed: the packages
    ``masksam.model`` / ``.components`` / ``.pipelines`` live in ``model/`` etc. (pyproject's
    package-dir), so the repository root is added to the ``masksam`` package's search path."""
    try:
        import masksam.components  # noqa: F401
        return
    except ModuleNotFoundError as exc:
        if exc.name not in ("masksam", "masksam.model", "masksam.components"):
            raise SystemExit(f"gpu_check: Python module {exc.name!r} is missing ({exc}); install it "
                             "(segment-anything==1.0 for segment_anything; see BENCHMARKS.md, 'GPU check')")
    sys.path.insert(0, str(REPO))
    import masksam

    if str(REPO) not in masksam.__path__:
        masksam.__path__.append(str(REPO))


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The GPU's peak dense bf16/fp16 TFLOP/s: ``override``, else the table's, else None."""
    if override:
        return float(override)
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return tflops
    return None


def load_config(name: str, tiny: bool, batch: int):
    """The typed params of paper configuration ``name`` (random weights, one micro-batch per step)."""
    from masksam.components.params import load_params

    overrides: dict[str, Any] = {"model.sam_weights": None, "train.grad_accum": 1, "train.batch_size": batch,
                                 "train.num_workers": 0}
    if tiny:
        overrides.update(TINY)
    return load_params(REPO / CONFIGS[name], overrides)


def build_model(p, device):
    """(MaskSAMConfig, model on ``device``): the configuration's network, random weights, with
    the classes of its dataset's importer (``masksam train --dry-run``'s rule)."""
    import torch

    from masksam.components.train import dataset_num_classes
    from masksam.model import MaskSAMConfig, build_masksam

    num_classes, _ = dataset_num_classes(p.data)
    mcfg = MaskSAMConfig.from_dict({**p.model.config_kwargs(), "num_classes": num_classes, "in_channels": 1})
    torch.manual_seed(p.train.seed)
    with torch.device(device):  # initialise on the GPU: ViT-H's random init on the CPU takes long
        model = build_masksam(mcfg)
    return mcfg, model.to(device).train()


def synthetic_batch(mcfg, batch: int, device, seed: int = 0) -> dict:
    """A batch of random slabs ``[B,1,T,H,W]`` and label slabs ``[B,T,H,W]`` whose slices hold up
    to 16 classes in random 4x4 blocks (so the Hungarian matcher and every loss term work)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    t, s = mcfg.slab_depth, mcfg.img_size
    image = torch.randn(batch, mcfg.in_channels, t, s, s, generator=g)
    coarse = torch.randint(0, mcfg.num_classes, (batch, t, 4, 4), generator=g)
    label = coarse.repeat_interleave(s // 4, dim=2).repeat_interleave(s // 4, dim=3)
    return {"image": image.to(device), "label": label.to(device)}


def make_run(p, mcfg, model, device, dtype):
    """A ``components.train._Run`` holding what ``_train_step`` uses, from training's builders
    (criterion and matcher, AdamW, poly schedule, GradScaler for fp16); no data, no tracking."""
    import torch

    from masksam.components.train import Dist, _Run, build_criterion, build_optimizer, poly_lambda

    trainable = [q for q in model.parameters() if q.requires_grad]
    criterion, num_points = build_criterion(p.loss, mcfg, p.train.matching)
    optimizer = build_optimizer(trainable, p.train)
    cfg = p.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.steps, cfg.poly_exponent,
                                                                         cfg.warmup_steps))
    return _Run(cfg=cfg, loss=p.loss, out=Path(tempfile.gettempdir()), pre=Path("."), plan={}, mcfg=mcfg,
                device=device, dist=Dist(), dtype=dtype, train_cases=[], val_cases=[], val_names=[],
                model=model, trainable=trainable, criterion=criterion.to(device), num_points=num_points,
                optimizer=optimizer, scheduler=scheduler,
                scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), tracker=None,
                net=model)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(run, batch: dict, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up steps, one FLOP-counted step, then ``steps`` timed steps of ``_train_step``."""
    import itertools

    from torch.utils.flop_counter import FlopCounterMode

    from masksam.components.train import _train_step

    batches = itertools.repeat(batch)

    def step() -> dict[str, float]:
        row = _train_step(run, batches, None)
        if not math.isfinite(row["grad_norm"]) and not run.scaler.is_enabled():
            # without a GradScaler nothing skips the update: AdamW has just written NaN weights
            raise FloatingPointError(f"non-finite gradient norm at step {run.step} in {run.dtype} (no "
                                     "GradScaler): the optimiser step made the weights non-finite")
        return row

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    t1 = time.perf_counter()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    t2 = time.perf_counter()
    times, row = [], {}
    for _ in range(steps):
        _sync(run.device)
        start = time.perf_counter()
        row = step()
        _sync(run.device)
        times.append(time.perf_counter() - start)
    return {"times": times, "warmup_s": t1 - t0, "flop_step_s": t2 - t1,
            "flops": int(counter.get_total_flops()), "loss": row.get("loss"),
            "grad_norm": row.get("grad_norm")}


def measure(p, mcfg, model, precision: str, device, args) -> dict[str, Any]:
    """One (configuration, precision) row: step time, peak memory, FLOPs, TFLOP/s, MFU."""
    import torch

    from masksam.components.train import resolve_precision

    dtype = resolve_precision(precision, device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = make_run(p, mcfg, model, device, dtype)
    batch = synthetic_batch(mcfg, p.train.batch_size, device, seed=p.train.seed)
    res = train_steps(run, batch, args.warmup, args.steps)
    step_s = statistics.median(res["times"])
    tflops = res["flops"] / step_s / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(device), args.peak_tflops) if device.type == "cuda" \
        else args.peak_tflops
    row = {
        "status": "ok", "dtype": str(dtype).replace("torch.", ""), "steps_timed": len(res["times"]),
        "step_s": step_s, "step_s_all": res["times"], "warmup_s": res["warmup_s"],
        "flop_step_s": res["flop_step_s"], "flops_per_step": res["flops"],
        "tflop_per_step": res["flops"] / 1e12, "tflops": tflops, "peak_tflops": peak,
        "mfu": tflops / peak if peak else None, "loss_last": res["loss"], "grad_norm_last": res["grad_norm"],
        "grad_scaler": run.scaler.is_enabled(),
        "grad_scale_last": run.scaler.get_scale() if run.scaler.is_enabled() else None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    del run, batch
    return row


def onnx_parity(model, mcfg, device, opset: int, exporter: str = "auto") -> dict[str, Any]:
    """Export the model's class-probability forward as ``masksam export`` does and compare ONNX
    Runtime on the device's execution provider with eager fp32 PyTorch on one random slab."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"status": "skipped: onnxruntime not installed"}
    import numpy as np
    import torch

    from masksam.components.export import _class_probs_module, export_onnx

    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"status": f"skipped: no {provider}", "available": ort.get_available_providers()}
    x = torch.randn(1, mcfg.in_channels, mcfg.slab_depth, mcfg.img_size, mcfg.img_size,
                    generator=torch.Generator().manual_seed(1)).to(device)
    module = _class_probs_module(model)
    with torch.no_grad():
        ref = module(x).float().cpu().numpy()
    with tempfile.TemporaryDirectory(prefix="gpu_check_onnx_") as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        used, fallback = export_onnx(module, x, path, opset, exporter)
        export_s = time.perf_counter() - t0
        session = ort.InferenceSession(str(path), providers=[provider])
        got = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]
    if not (np.isfinite(ref).all() and np.isfinite(got).all()):
        return {"status": "error: non-finite class probabilities (eager finite: "
                          f"{bool(np.isfinite(ref).all())}, ONNX Runtime finite: {bool(np.isfinite(got).all())})"}
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return {"status": "ok", "provider": session.get_providers()[0], "exporter": used,
            "exporter_fallback": fallback, "export_s": export_s, "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "label_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def _failure(exc: BaseException) -> str:
    """A row's status for an exception: OOM stated plainly, else the exception's first line."""
    import torch

    text = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return f"OOM: {text}"
    return f"error: {type(exc).__name__}: {text}"


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(name: str, device, args) -> list[dict[str, Any]]:
    """Every precision's row for configuration ``name`` (OOM and errors recorded, not raised)."""
    from masksam.errors import UserError

    p = load_config(name, args.tiny, args.batch)
    m = p.model
    base = {"config": name, "params": CONFIGS[name], "variant": m.variant, "img_size": m.img_size,
            "slab_depth": m.slab_depth, "batch": p.train.batch_size, "num_queries": m.num_queries,
            "matching": p.train.matching, "tiny": args.tiny}
    late = f"skipped: past the {args.budget_s:.0f} s --budget-s"
    if time.perf_counter() > args.deadline:  # nothing of this configuration fits any more
        return [{**base, "precision": prec, "status": late, "parity": None} for prec in args.precisions]
    try:
        mcfg, model = build_model(p, device)
    except Exception as exc:  # OOM while building: say so for every precision and go on
        _free(device)
        print(f"[{name}] model build failed: {_failure(exc)}", file=sys.stderr, flush=True)
        return [{**base, "precision": prec, "status": _failure(exc), "parity": None} for prec in args.precisions]
    base.update(num_classes=mcfg.num_classes,
                total_parameters=sum(q.numel() for q in model.parameters()),
                trainable_parameters=sum(q.numel() for q in model.parameters() if q.requires_grad))
    # every precision starts from the same weights (only the trainable ones change)
    start = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
    rows = []
    for prec in args.precisions:
        t0 = time.perf_counter()
        if t0 > args.deadline:
            rows.append({**base, "precision": prec, "status": late})
            continue
        _restore(model, start)
        try:
            row = {**base, "precision": prec, **measure(p, mcfg, model, prec, device, args)}
        except UserError as exc:
            row = {**base, "precision": prec, "status": f"skipped: {exc}"}
        except Exception as exc:  # noqa: BLE001 - OOM or a failure of this row; the check goes on
            row = {**base, "precision": prec, "status": _failure(exc)}
        row["wall_s"] = time.perf_counter() - t0
        _free(device)
        print(f"[{name} {prec}] {row['status']} {_fmt(row.get('step_s'), '{:.3f}')} s/step "
              f"({row['wall_s']:.1f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    parity: dict[str, Any] | None = None
    model.zero_grad(set_to_none=True)
    if args.no_parity:
        pass
    elif time.perf_counter() > args.deadline:
        parity = {"status": late}
    else:
        try:
            parity = onnx_parity(model, mcfg, device, p.export.opset, args.exporter)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the check goes on
            parity = {"status": _failure(exc)}
        print(f"[{name}] ONNX parity: {json.dumps(parity)}", file=sys.stderr, flush=True)
    for row in rows:
        row["parity"] = parity
    del model
    _free(device)
    return rows


def _restore(model, weights: dict) -> None:
    """Copy ``weights`` (name -> tensor) back into the model's parameters, gradients cleared."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
            param.grad = None


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _parity_cell(parity: dict[str, Any] | None) -> str:
    if parity is None:
        return "not run"
    if parity.get("status") != "ok":
        return str(parity.get("status"))
    provider = parity["provider"].replace("ExecutionProvider", "")
    return f"{provider}: {parity['max_abs_diff']:.1e}, {parity['label_agreement']:.4f}"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The rows as a Markdown table, with a line naming the device and versions."""
    head = (f"{env['device_name']} ({env['device']}), torch {env['torch']}, onnxruntime "
            f"{env.get('onnxruntime') or '-'}; peak {_fmt(env.get('peak_tflops'), '{:.0f}')} TFLOP/s; "
            f"{env['warmup']} warm-up + {env['steps']} timed steps{'; --tiny' if env['tiny'] else ''}")
    lines = [head, "",
             "| config | precision | variant | T x H x W | batch | step s (median) | peak GPU GiB | "
             "TFLOP/step | TFLOP/s | MFU | ONNX parity (max abs diff, label agreement) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['precision']} | {r['variant']} | {r['slab_depth']} x {r['img_size']} x "
            f"{r['img_size']} | {r['batch']} | {_fmt(r.get('step_s'), '{:.3f}')} | "
            f"{_fmt(r.get('peak_gpu_gib'), '{:.1f}')} | {_fmt(r.get('tflop_per_step'), '{:.3g}')} | "
            f"{_fmt(r.get('tflops'), '{:.3g}')} | {_fmt(r.get('mfu'), '{:.1%}')} | "
            f"{_parity_cell(r.get('parity'))} | {r['status']} |")
    return "\n".join(lines)


def environment(device, args) -> dict[str, Any]:
    """Device, versions and run settings recorded beside the rows."""
    import torch

    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError:
        ort_version, providers = None, []
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "onnxruntime": ort_version, "ort_providers": providers,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "peak_tflops": peak_tflops(name, args.peak_tflops) if cuda else args.peak_tflops,
            "tiny": args.tiny, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
            "precisions": args.precisions, "configs": args.configs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                    help="paper configurations to check (default: all three)")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"],
                    help="autocast precisions (default: bf16 fp16 on CUDA; fp32 bf16 on the CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    ap.add_argument("--batch", type=int, default=PAPER_BATCH, help="slabs per step (default: the paper's 2)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda; cpu with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny variant at 64 px x 4 slices: the same path on a CPU")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak dense bf16/fp16 TFLOP/s for the MFU (default: from the device name)")
    ap.add_argument("--no-parity", action="store_true", help="skip the ONNX export and ONNX Runtime parity")
    ap.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                    help="ONNX exporter, as `masksam export --exporter` (default auto: dynamo, TorchScript "
                    "where dynamo fails)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no configuration, precision or parity check after this many seconds (default "
                    "420: the whole check within ~8 minutes of GPU time); the rest is reported as skipped")
    ap.add_argument("--out", help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    cpu = args.device == "cpu"
    args.precisions = args.precisions or (["fp32", "bf16"] if cpu else ["bf16", "fp16"])
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("--steps and --batch must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    make_importable()
    import torch

    from masksam.components.train import resolve_device
    from masksam.errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except UserError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    env = environment(device, args)
    t0 = time.perf_counter()
    args.deadline = t0 + args.budget_s
    rows = [row for name in args.configs for row in run_config(name, device, args)]
    env["wall_s"] = time.perf_counter() - t0
    print(markdown(rows, env))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    failed = [r for r in rows if r["status"].startswith("error")
              or str((r.get("parity") or {}).get("status", "")).startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
