"""Compare training settings of the demo on equal footing: same data, same step budget.

Each variant is params.yaml with a few ``section.key=value`` overrides. Every variant trains in
its own ``masksam train`` subprocess (several at once with ``--parallel``; on one GPU they share
it), then the best weights are scored on the preprocessed held-out test cases (Dice on the
preprocessed grid: no resampling back, so it reads higher than `masksam evaluate`'s Dice on the
raw files). Prints a Markdown table and writes ``OUT/sweep.json``.

    python bench/demo_sweep.py --out /tmp/sweep                       # the built-in variants
    python bench/demo_sweep.py --out /tmp/s --variant base --variant fixed:train.matching=fixed
    python bench/demo_sweep.py --device cuda --parallel 6 --steps 2000

A variant is ``NAME`` (a built-in) or ``NAME:key=value,key=value`` (keys like ``train.lr``,
``model.num_queries``; values parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

BUILTIN: dict[str, dict[str, object]] = {
    "base": {},
    "fixed": {"train.matching": "fixed"},
    "fixed_q8": {"train.matching": "fixed", "model.num_queries": 8},
    "lr1e-3": {"train.lr": 1e-3},
    "bs4": {"train.batch_size": 4},
    "img96": {"model.img_size": 96},
}
# issue 10 item 7: the demo with each of the paper's components switched on (the demo keeps the
# light variant) or off (the demo has it on); `--variant ablation` runs them all
ABLATION: dict[str, dict[str, object]] = {
    "demo": {},
    "enc_adapter_paper": {"model.encoder_adapter": "paper"},
    "stem_conv": {"model.stem": "conv"},
    "prompt_gen_full": {"model.prompt_generator": "full"},
    "mask_prompt_binary": {"model.mask_prompt": "binary"},
    "prompt_temporal_on": {"model.prompt_temporal_embedding": True},
    "dec_adapters_paper": {"model.decoder_adapters": "paper"},
    "upsampler_learned3d": {"model.mask_upsampler": "learned3d"},
    "no_depth_conv": {"model.use_depth_conv_adapter": False},
    "no_depth_mlp": {"model.use_depth_mlp_adapter": False},
    "no_temporal": {"model.use_temporal_embedding": False},
    "no_aux_boxes": {"model.use_aux_boxes": False},
    "no_aux_tokens": {"model.use_aux_class_tokens": False},
}
BUILTIN.update(ABLATION)


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    """``NAME`` or ``NAME:a.b=v,c.d=w`` -> (name, overrides)."""
    name, _, rest = spec.partition(":")
    if not rest:
        if name not in BUILTIN:
            raise SystemExit(f"unknown variant {name!r}; built-ins: {', '.join(BUILTIN)}")
        return name, dict(BUILTIN[name])
    overrides: dict[str, object] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise SystemExit(f"variant {spec!r}: expected section.key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def variant_params(base: dict, overrides: dict[str, object], steps: int | None = None) -> dict:
    """params.yaml with ``train.steps`` set to ``steps`` (if given), then the overrides."""
    params = json.loads(json.dumps(base))
    if steps:
        params["train"]["steps"] = steps
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        params.setdefault(section, {})[field] = value
    return params


def run_variant(name: str, params: dict, args: argparse.Namespace) -> dict:
    """Train one variant in a subprocess, then score it on the held-out test cases."""
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    pfile = out / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "masksam", "train", "--params", str(pfile), "--preprocessed",
           args.preprocessed, "--out", str(out / "train"), "--device", args.device, "--val-every",
           str(args.val_every), "--no-mlflow", "--no-progress"]
    started = time.time()
    # run outside the checkout: its top-level masksam/ folder must not shadow the installed package
    with open(out / "train.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
    wall = time.time() - started
    row: dict = {"variant": name, "rc": rc, "train_s": round(wall, 1)}
    if rc != 0:
        row["error"] = (out / "train.log").read_text()[-800:]
        return row
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    row["best_val"] = summary.get("best_val_mean_dice")
    row["steps"] = summary.get("steps")
    row["step_s"] = round(float(summary.get("wall_time_s", wall)) / max(1, int(summary.get("steps") or 1)), 3)
    row["trainable"] = summary.get("num_trainable_params")
    score = subprocess.run([sys.executable, __file__, "--score", str(out / "train"), "--preprocessed",
                            args.preprocessed, "--device", args.device],
                           capture_output=True, text=True, env=env, cwd=out)
    if score.returncode != 0:
        row["error"] = score.stderr[-800:]
        return row
    row.update(json.loads(score.stdout.strip().splitlines()[-1]))
    return row


def score(train_dir: str, preprocessed: str, device: str) -> dict:
    """Dice per class of the best weights on the preprocessed test cases (grid Dice)."""
    import numpy as np
    import torch

    from masksam.components._loading import build_model_from_dir
    from masksam.components.predictor import Predictor
    from masksam.components.train import dice_per_class, read_cases

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, config, plan, _ = build_model_from_dir(train_dir, str(dev))
    splits = json.loads((Path(preprocessed) / "splits.json").read_text())
    k = int(config["num_classes"])
    cases = read_cases(preprocessed, splits["test"], k)
    def aux_probs(x: torch.Tensor) -> torch.Tensor:
        """Diagnostic: the prompt generator's masks (upsampled) in place of the decoder's."""
        out = model(x)
        aux = out["aux_masks"]
        b, t, q = aux.shape[:3]
        up = torch.nn.functional.interpolate(aux.flatten(0, 2)[:, None], size=x.shape[-2:], mode="bilinear",
                                             align_corners=False).reshape(b, t, q, *x.shape[-2:])
        return model.combine(out["pred_logits"], up)

    result = {}
    for key, fn in (("", None), ("_aux", aux_probs)):
        if fn is not None:
            model.class_probs = fn  # instance attribute shadows the method
        predictor = Predictor.from_module(model, plan, device=dev)
        dices = []
        for case in cases:
            _, pred = predictor.predict_preprocessed(case.image, overlap=0.5, return_probs=False)
            dices.append(dice_per_class(pred, case.label, k))
        per_class = np.nanmean(np.array(dices), axis=0)
        names = {v: n for n, v in plan["labels"].items()}
        result[f"test_dice{key}"] = round(float(np.nanmean(per_class)), 4)
        result[f"per_class{key}"] = {names[c + 1]: round(float(d), 3) for c, d in enumerate(per_class)}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"), help="base parameters file")
    ap.add_argument("--preprocessed", default=str(REPO / "data" / "preprocessed"),
                    help="preprocessed dataset (run `dvc repro preprocess` first)")
    ap.add_argument("--out", default="/tmp/masksam-sweep", help="folder for the variants' runs")
    ap.add_argument("--variant", action="append", help="NAME or NAME:key=value,... (repeatable; "
                    f"default: all built-ins {', '.join(BUILTIN)})")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps of every variant (default: params' train.steps; a variant's "
                    "own train.steps override wins)")
    ap.add_argument("--val-every", type=int, default=500, help="validation interval in steps")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--parallel", type=int, default=1, help="variants trained at once")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per variant")
    ap.add_argument("--score", metavar="TRAIN_DIR", help=argparse.SUPPRESS)  # internal: score one run
    args = ap.parse_args(argv)
    if args.score:
        print(json.dumps(score(args.score, args.preprocessed, args.device)))
        return 0
    args.out = str(Path(args.out).resolve())
    args.preprocessed = str(Path(args.preprocessed).resolve())
    base = yaml.safe_load(Path(args.params).read_text())
    specs = args.variant or [n for n in BUILTIN if n not in ABLATION]
    if "ablation" in specs:
        specs = [s for s in specs if s != "ablation"] + list(ABLATION)
    variants = [parse_variant(v) for v in specs]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {pool.submit(run_variant, name, variant_params(base, ov, args.steps), args): (name, ov)
                   for name, ov in variants}
        for future in as_completed(futures):  # report each variant as soon as it is done
            row = future.result() | {"overrides": futures[future][1]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            (Path(args.out) / "sweep.json").write_text(json.dumps(rows, indent=2))
    order = [name for name, _ in variants]
    rows.sort(key=lambda r: order.index(r["variant"]))
    print(f"\n{args.steps or base['train']['steps']} steps unless overridden, device {args.device}, "
          f"{args.parallel} at once\n")
    print("| variant | overrides | trainable | s/step | train s | best val Dice | test Dice (grid) | per class | "
          "aux-mask Dice |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = " ".join(f"{v:.2f}" for v in r.get("per_class", {}).values())
        print(f"| {r['variant']} | {r['overrides']} | {r.get('trainable')} | {r.get('step_s')} | {r['train_s']} | "
              f"{r.get('best_val')} | {r.get('test_dice', r.get('error', '')[-200:])} | {per} | "
              f"{r.get('test_dice_aux')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
