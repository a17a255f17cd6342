"""Benchmark MaskSAM forward+backward on the CPU: time per slab, peak memory, decoder share.

For each setting (tiny@128 and vit_b@256 by default) and each decoder path (``batched``, the
default, and ``loop``, the reference design of one SAM decoder call per query), a fresh
subprocess builds the model (random weights) and reports medians over the repeats of:

- ``step_s``: forward + backward of one batch of slabs (wall clock), and ``step_cpu_s`` (CPU
  time of all threads, less sensitive to other processes on a shared machine);
- ``decoder_s``: forward + backward of the mask decoder alone on the same inputs (its share
  of ``step_s``);
- ``saved_mb`` / ``decoder_saved_mb``: bytes of activations saved for backward (the memory a
  training step holds), overall and inside the mask decoder, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks``;
- ``peak_rss_mb``: the process's peak resident memory (``resource.ru_maxrss``, includes the
  weights and the Python runtime);
- ``gflop``: forward FLOPs (``torch.utils.flop_counter``), a load-independent cost measure.

Each row also prints the 1-minute load average before and after the run: on a shared machine
whose load exceeds its cores, multithreaded steps spend most of their time in OpenMP
barriers waiting for descheduled threads (medians of 6-7 s instead of 0.2 s were seen at load
8 on 2 cores), so compare figures only at a low load, or with ``--threads 1`` and
``step_cpu_s``.

Usage: ``python bench/model.py [--settings tiny96 tiny128 vit_b256] [--repeats 7] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = {
    # name: (config kwargs, batch)
    # the CPU demo's training shape (params.yaml: img 96, T=8, batch 2, about 10 queries)
    "tiny96": (dict(variant="tiny", img_size=96, slab_depth=8, num_classes=4, num_queries=10, freeze_sam=False), 2),
    "tiny128": (dict(variant="tiny", img_size=128, slab_depth=8, num_classes=4, num_queries=8, freeze_sam=False), 2),
    "vit_b256": (dict(variant="vit_b", img_size=256, slab_depth=2, num_classes=4, num_queries=8, freeze_sam=True), 1),
}


def _one(setting: str, mode: str, repeats: int, threads: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from masksam.model import MaskSAMConfig, build_masksam

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw, batch = SETTINGS[setting]
    cfg = MaskSAMConfig(decoder_mode=mode, **kw)
    model = build_masksam(cfg)
    x = torch.randn(batch, cfg.in_channels, cfg.slab_depth, cfg.img_size, cfg.img_size)

    captured: dict = {}
    in_decoder = [False]
    saved = {"all": 0, "decoder": 0}

    def pre(mod, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        in_decoder[0] = True

    def post(mod, args, kwargs, out):
        in_decoder[0] = False

    model.mask_decoder.register_forward_pre_hook(pre, with_kwargs=True)
    model.mask_decoder.register_forward_hook(post, with_kwargs=True)

    def pack(t):
        n = t.numel() * t.element_size()
        saved["all"] += n
        if in_decoder[0]:
            saved["decoder"] += n
        return t

    cpu: list[float] = []

    def step() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(x)
        loss = sum(v.float().mean() for v in out.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - c0)
        return time.perf_counter() - t0

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # warm-up, and counts saved activations once
    saved_all, saved_dec = saved["all"], saved["decoder"]

    cpu.clear()
    steps = [step() for _ in range(repeats)]

    # decoder alone, on the captured inputs (leaves that need grad like inside the model)
    args = [a.detach().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in captured["args"]]
    kwargs = dict(captured["kwargs"])

    def dec_step() -> float:
        t0 = time.perf_counter()
        low, logits = model.mask_decoder(*args, **kwargs)
        (low.mean() + logits.mean()).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    dec_step()
    decs = [dec_step() for _ in range(repeats)]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    flop_parts = fc.get_flop_counts()
    return {
        "setting": setting,
        "mode": mode,
        "batch": batch,
        "slab_depth": cfg.slab_depth,
        "queries": cfg.num_queries,
        "step_s": statistics.median(steps),
        "step_s_min": min(steps),
        "step_s_per_slab": statistics.median(steps) / batch,
        "step_cpu_s": statistics.median(cpu),
        "decoder_s": statistics.median(decs),
        "saved_mb": saved_all / 2**20,
        "decoder_saved_mb": saved_dec / 2**20,
        "gflop": fc.get_total_flops() / 1e9,
        "decoder_gflop": sum(flop_parts.get("MaskSAM.mask_decoder", {}).values()) / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="which settings to run (default: all)")
    p.add_argument("--modes", nargs="+", default=["batched", "loop"], choices=["batched", "loop"],
                   help="decoder paths to compare (default: both)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per setting; medians are printed")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--one", nargs=2, metavar=("SETTING", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(_one(a.one[0], a.one[1], a.repeats, a.threads)))
        return
    rows = []
    for s in a.settings:
        for m in a.modes:
            cmd = [sys.executable, __file__, "--one", s, m, "--repeats", str(a.repeats), "--threads", str(a.threads)]
            load0 = os.getloadavg()[0]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{s:>9} {m:>7}  B={r['batch']} T={r['slab_depth']} Q={r['queries']} threads={a.threads}  "
                f"step {r['step_s']:.3f}s (min {r['step_s_min']:.3f}s, {r['step_s_per_slab']:.3f}s/slab, "
                f"CPU {r['step_cpu_s']:.2f}s)  "
                f"decoder {r['decoder_s']:.3f}s ({100 * r['decoder_s'] / r['step_s']:.0f}%)  "
                f"saved act {r['saved_mb']:.0f}MB (decoder {100 * r['decoder_saved_mb'] / max(r['saved_mb'], 1e-9):.0f}%)  "
                f"fwd {r['gflop']:.2f} GFLOP (decoder {100 * r['decoder_gflop'] / r['gflop']:.0f}%)  "
                f"peak RSS {r['peak_rss_mb']:.0f}MB  load {load0:.1f}->{os.getloadavg()[0]:.1f}",
                flush=True,
            )
    for s in a.settings:
        by = {r["mode"]: r for r in rows if r["setting"] == s}
        if "batched" in by and "loop" in by:
            b, l = by["batched"], by["loop"]
            print(
                f"{s}: loop/batched  step x{l['step_s'] / b['step_s']:.2f}  decoder x{l['decoder_s'] / b['decoder_s']:.2f}  "
                f"decoder saved activations x{l['decoder_saved_mb'] / max(b['decoder_saved_mb'], 1e-9):.2f}"
            )


if __name__ == "__main__":
    main()
