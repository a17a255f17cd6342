"""``masksam train``: fit MaskSAM on a preprocessed dataset and write a checkpoint directory.

The loop is nnU-Net's in spirit: random slabs with foreground oversampling and in-plane
augmentation, AdamW with a poly learning-rate schedule, gradient clipping, mixed precision on
CUDA, gradient accumulation, periodic whole-volume validation Dice (sliding window) on the
fold's validation cases, and checkpoints (last and best) that resume a run exactly. Launched by
``torchrun`` it trains with DistributedDataParallel (rank 0 validates, logs and saves).

Outputs (docs/architecture.md, "checkpoint directory"): ``model_config.json``, ``plan.json``,
``checkpoint_last.pt``, ``checkpoint_best.pt``, ``model.safetensors`` (best weights),
``train_summary.json``, ``history.csv``, ``learning_curve.png``, ``overlays/*.png``; and one
MLflow run with parameters, per-step metrics, lineage tags and these artifacts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from masksam.components._augment import AugmentConfig
from masksam.components._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from masksam.components._io import atomic_path, ensure_writable_dir, load_params, read_json, sha256_file, write_json
from masksam.components._sampler import Case, SlabDataset, StepSampler, make_case
from masksam.components._tracking import (DEFAULT_TRACKING_TIMEOUT_S, RunLogger, TrackingUnavailable,
                                          check_tracking, flatten, lineage_tags, unique_metric_names)
from masksam.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MATCHINGS = ("hungarian", "fixed")


@dataclass
class TrainConfig:
    """The ``train:`` section of params.yaml (every field can also be given on the CLI)."""

    out: str = "data/train"
    fold: int = 0
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    precision: str = "auto"       # auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    poly_exponent: float = 0.9    # nnU-Net's poly schedule: lr * (1 - step/steps) ** 0.9
    warmup_steps: int = 0         # linear warm-up before the poly decay
    steps: int = 400
    val_every: int = 100
    checkpoint_every: int = 0     # 0 = at every validation
    grad_clip: float = 1.0        # max gradient norm (nnU-Net: 12; 0 = off)
    foreground_oversample: float = 0.33
    augment: bool = True
    num_points: int = 0           # points per mask in the loss; 0 = min(112*112, img_size**2 / 4)
    matching: str = "hungarian"   # hungarian (Mask2Former) | fixed (query c answers for class c)
    num_workers: int = 0
    val_overlap: float = 0.25     # sliding-window overlap in validation (fast setting)
    val_cases: int = 0            # validate on at most this many cases (0 = all of the fold's)
    overlay_cases: int = 3
    log_every: int = 1
    experiment: str = "masksam"
    mlflow: bool = True
    # Longest wait for the MLflow server once training runs: a call still failing after this
    # long saves checkpoint_last.pt and stops with a --resume hint (see _tracking.RunLogger).
    tracking_timeout_s: float = DEFAULT_TRACKING_TIMEOUT_S

    @classmethod
    def from_params(cls, section: dict[str, Any], where: str = "params.yaml") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise UserError(f"{where}: unknown train: keys {unknown}; known: {sorted(known)}")
        cfg = cls(**section)
        cfg.check(where)
        return cfg

    def check(self, where: str = "train config") -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"{where}: train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "steps"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{where}: train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.foreground_oversample <= 1.0:
            raise UserError(f"{where}: train.foreground_oversample must be in [0, 1]")
        if self.matching not in MATCHINGS:
            raise UserError(f"{where}: train.matching must be one of {MATCHINGS}, got {self.matching!r}")
        if self.lr <= 0:
            raise UserError(f"{where}: train.lr must be positive, got {self.lr}")
        if not (isinstance(self.tracking_timeout_s, (int, float)) and 0 < self.tracking_timeout_s < math.inf):
            raise UserError(f"{where}: train.tracking_timeout_s must be a positive number of seconds, "
                            f"got {self.tracking_timeout_s!r}")


# ----------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: PyTorch sees no CUDA device here; pass --device cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA where supported, else fp16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision fp16 needs CUDA (use bf16 or fp32 on the CPU)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of torch's RNG for one optimiser step (the loss's point sampling): a function of
    (seed, rank, step) only, so an interrupted and resumed run draws the same points."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] % 2**63)


def poly_lambda(steps: int, exponent: float, warmup: int) -> Callable[[int], float]:
    """Multiplier of the base lr after ``k`` scheduler steps: linear warm-up, then poly decay."""

    def f(k: int) -> float:
        if warmup and k < warmup:
            return (k + 1) / warmup
        return max(0.0, 1.0 - k / max(steps, 1)) ** exponent

    return f


def load_preprocessed(preprocessed: str | os.PathLike, fold: int) -> tuple[dict, dict, list[str], list[str]]:
    """``(plan, splits, train_cases, val_cases)``; a missing or inconsistent directory is a UserError."""
    from masksam.components._dataset import load_plan

    pre = Path(preprocessed)
    if not pre.is_dir():
        raise UserError(f"preprocessed dataset not found: {pre} (run `masksam preprocess` first, "
                        "or pass --preprocessed)")
    plan = load_plan(pre)
    splits = read_json(pre / "splits.json", "fold splits")
    folds = splits.get("folds") if isinstance(splits, dict) else None
    if not isinstance(folds, list) or not folds:
        raise UserError(f"{pre / 'splits.json'} has no 'folds' list; rerun `masksam preprocess`")
    if not 0 <= fold < len(folds):
        raise UserError(f"--fold {fold}: {pre / 'splits.json'} has folds 0..{len(folds) - 1}")
    train_cases, val_cases = list(folds[fold].get("train", [])), list(folds[fold].get("val", []))
    if not train_cases:
        raise UserError(f"{pre / 'splits.json'}: fold {fold} has no training cases")
    for key in ("labels", "channel_names"):
        if key not in plan:
            raise UserError(f"{pre / 'plan.json'} lacks '{key}'; rerun `masksam preprocess`")
    return plan, splits, train_cases, val_cases


def read_cases(preprocessed: str | os.PathLike, names: list[str], num_classes: int) -> list[Case]:
    """Load labelled preprocessed cases into memory, checking label values against the plan."""
    from masksam.components._dataset import load_case

    cases = []
    for name in names:
        image, label, _ = load_case(preprocessed, name)
        where = Path(preprocessed) / "cases" / f"{name}.npz"
        if label is None:
            raise UserError(f"{where} has no label; training needs labelled cases")
        if image.ndim != 4 or label.shape != image.shape[1:]:
            raise UserError(f"{where}: image {image.shape} and label {label.shape} do not match "
                            "([C,Z,Y,X] and [Z,Y,X]); rerun `masksam preprocess`")
        if label.size and int(label.max()) >= num_classes:
            raise UserError(f"{where}: label value {int(label.max())} is not in plan.json's labels "
                            f"(0..{num_classes - 1}); rerun `masksam preprocess`")
        cases.append(make_case(name, image, label))
    return cases


def model_config(model_params: dict[str, Any], plan: dict, where: str = "params.yaml"):
    """MaskSAMConfig from the ``model:`` section plus the dataset's classes and channels."""
    from masksam.model import MaskSAMConfig

    d = dict(model_params)
    d["num_classes"] = len(plan["labels"])
    d["in_channels"] = len(plan["channel_names"])
    try:
        return MaskSAMConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: invalid model: section ({exc})") from exc


def validation_metrics(per_class: np.ndarray, mean: float, labels: dict[str, int]) -> dict[str, float]:
    """``val_dice_{label}`` per foreground class plus ``val_mean_dice``, with label names made
    into keys MLflow accepts (:func:`~masksam.components._tracking.unique_metric_names`)."""
    names = {int(v): str(k) for k, v in labels.items()}
    ordered = [names.get(c + 1, str(c + 1)) for c in range(len(per_class))]
    keys = unique_metric_names(ordered)
    metrics = {f"val_dice_{keys[n]}": float(d) for n, d in zip(ordered, per_class)}
    metrics["val_mean_dice"] = float(mean)
    return metrics


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..K-1 (NaN where a class is absent from both)."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        if denom:
            out[c - 1] = 2.0 * np.logical_and(p, t).sum() / denom
    return out


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and raw tensor bytes (bitwise identity of weights)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                 if state[k].numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

class _SlabPredictor:
    """``predict_slab`` for sliding-window inference: the bare model's ``class_probs``."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, slab):
        is_numpy = isinstance(slab, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(slab, np.float32)) if is_numpy else slab
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                     enabled=self.dtype != torch.float32):
            y = self.model.class_probs(x.to(self.device, torch.float32)).float()
        return y.cpu().numpy() if is_numpy else y.to(slab.device)


def validate(model: torch.nn.Module, cases: list[Case], cfg, device: torch.device, dtype: torch.dtype,
             overlap: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Whole-volume sliding-window prediction of each case; ``(dice [cases, K-1], labels)``."""
    from masksam.model.inference import sliding_window_inference

    predict = _SlabPredictor(model, device, dtype)
    was_training = model.training
    model.eval()
    dices, labels = [], []
    try:
        for case in cases:
            _, pred = sliding_window_inference(predict, case.image, slab_depth=cfg.slab_depth,
                                               img_size=cfg.img_size, num_classes=cfg.num_classes,
                                               overlap=overlap, device=device, return_probs=False)
            pred = np.asarray(pred)
            labels.append(pred.astype(np.uint8))
            dices.append(dice_per_class(pred, case.label, cfg.num_classes))
    finally:
        model.train(was_training)
    return np.array(dices), labels


# ----------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------

def _write_history(history: list[dict[str, float]], path: Path) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def train(
    preprocessed: str | os.PathLike,
    out: str | os.PathLike,
    model_params: dict[str, Any],
    cfg: TrainConfig,
    *,
    resume: bool = False,
    params: dict[str, Any] | None = None,
    raw_dir: str | os.PathLike | None = None,
    tracking: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train MaskSAM on fold ``cfg.fold`` of ``preprocessed``; write the checkpoint dir ``out``.

    ``model_params`` is params.yaml's ``model:`` section; ``params`` (the whole file) is
    logged to MLflow. Returns the training summary (also ``out/train_summary.json``).
    """
    cfg.check()
    start_time = time.time()
    out = Path(out)
    pre = Path(preprocessed)
    plan, _splits, train_names, val_names = load_preprocessed(pre, cfg.fold)
    mcfg = model_config(model_params, plan)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    dtype = resolve_precision(cfg.precision, device)
    if dist.main:
        # before hours of training: a file there or an unwritable location fails now
        ensure_writable_dir(out, "--out")
    if dist.main and cfg.mlflow:
        check_tracking(tracking)  # fail now, not after hours of training
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out / "checkpoint_last.pt")
        if ckpt.get("model_config") and ckpt["model_config"] != mcfg.to_dict():
            raise UserError(f"{out / 'checkpoint_last.pt'} was trained with a different model config; "
                            "resume with the same params, or train into a new --out")

    train_cases = read_cases(pre, train_names, mcfg.num_classes)
    val_cases = read_cases(pre, val_names[: cfg.val_cases or None], mcfg.num_classes) if dist.main else []

    from masksam.model.criterion import SetCriterion
    from masksam.model.matcher import FixedMatcher

    seed_everything(cfg.seed)
    model = _build_model(mcfg).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    num_points = cfg.num_points or min(112 * 112, mcfg.img_size ** 2 // 4)
    matcher = None
    if cfg.matching == "fixed":
        if int(mcfg.num_queries) < mcfg.num_classes:  # type: ignore[arg-type]
            raise UserError(f"train.matching fixed needs model.num_queries >= {mcfg.num_classes} (one per class, "
                            f"background included); got {mcfg.num_queries}. Raise model.num_queries, set it to "
                            "null (classes + 3), or use train.matching: hungarian")
        matcher = FixedMatcher()
    criterion = SetCriterion(mcfg.num_classes, num_points=num_points, matcher=matcher).to(device)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.steps, cfg.poly_exponent, cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, best, history, run_id = 0, -1.0, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        step, best = int(ckpt["step"]), float(ckpt.get("best_metric", -1.0))
        history, run_id = list(ckpt.get("history", [])), ckpt.get("mlflow_run_id")
        log.info("resuming %s at step %d (best validation Dice %.4f)", out, step, best)
    net: torch.nn.Module = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- outputs and tracking --------------------------------------------------------------
    tracker = RunLogger(tracking, cfg.experiment, enabled=dist.main and cfg.mlflow,
                        timeout_s=cfg.tracking_timeout_s)
    if ckpt is not None:
        tracker.unlogged = list(ckpt.get("mlflow_unlogged", []))  # metrics an outage kept back
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "model_config.json", mcfg.to_dict())
        write_json(out / "plan.json", plan)
        tags = lineage_tags(plan, raw_dir, data_paths=(str(pre),), device=str(device))
        tags.update({"step": "train", "fold": str(cfg.fold), "world_size": str(dist.world)})
        effective = {"train": dataclasses.asdict(cfg), "model": mcfg.to_dict(),
                     "precision_dtype": str(dtype).replace("torch.", ""), "preprocessed": str(pre),
                     "train_cases": len(train_cases), "val_cases": len(val_names),
                     "num_params": n_params, "num_trainable_params": n_train, "loss_num_points": num_points}
        try:
            run_id = tracker.start(f"train-fold{cfg.fold}", tags, run_id=run_id)
            tracker.log_params({**flatten(params or {}), **flatten(effective, "effective.")})
            tracker.log_artifact(out / "plan.json")
            tracker.log_artifact(out / "model_config.json")
            tracker.flush()
        except TrackingUnavailable as exc:
            again = f"`masksam train --out {out} --resume`" if resume else "the same command"
            raise UserError(f"{exc}. Nothing was trained in this run: start the server (or fix "
                            f"MLFLOW_TRACKING_URI) and run {again} again, or add --no-mlflow") from exc
    log.info("training %s: %d/%d trainable parameters, %d train / %d val cases, %s %s, world %d",
             mcfg.variant, n_train, n_params, len(train_cases), len(val_names), device, dtype, dist.world)

    # --- data --------------------------------------------------------------------------------
    per_step = cfg.batch_size * cfg.grad_accum
    dataset = SlabDataset(train_cases, mcfg.slab_depth, mcfg.img_size, cfg.foreground_oversample,
                          seed=cfg.seed, rank=dist.rank, augmentation=AugmentConfig() if cfg.augment else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=StepSampler(step * per_step, cfg.steps * per_step),
        num_workers=cfg.num_workers, worker_init_fn=_worker_init if cfg.num_workers else None,
        persistent_workers=False, pin_memory=device.type == "cuda")
    batches = iter(loader)

    def save(kind: str) -> None:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "step": step, "epoch": step * per_step * dist.world // max(len(train_cases), 1),
            "best_metric": best, "history": history, "mlflow_run_id": run_id,
            "mlflow_unlogged": tracker.unlogged,
            "model_config": mcfg.to_dict(), "train_config": dataclasses.asdict(cfg),
        }
        save_checkpoint(out / f"checkpoint_{kind}.pt", state)

    last_val_labels: list[np.ndarray] = []
    bar = None
    if dist.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    net.train()
    ckpt_every = cfg.checkpoint_every or cfg.val_every or cfg.steps
    while step < cfg.steps:
        torch.manual_seed(step_seed(cfg.seed, dist.rank, step))
        terms: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True)
            target = batch["label"].to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or not dist.enabled
            ctx = net.no_sync() if not sync else _nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    outputs = net(image)
                losses = criterion(outputs, target)
                scaler.scale(losses["loss"] / cfg.grad_accum).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        if not math.isfinite(terms["loss"]):
            raise UserError(f"training diverged at step {step + 1} (loss {terms['loss']}); lower train.lr "
                            f"(now {cfg.lr}) or use precision fp32/bf16")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        step += 1
        row = {"step": step, **terms, "lr": lr, "grad_norm": float(grad_norm)}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}")
        if dist.main and (step % cfg.log_every == 0 or step == cfg.steps):
            _track(tracker, {k: v for k, v in row.items() if k != "step"}, step)
        validating = step == cfg.steps or (cfg.val_every > 0 and step % cfg.val_every == 0)
        improved = False
        if validating and dist.main and val_cases:
            dice, last_val_labels = validate(model, val_cases, mcfg, device, dtype, cfg.val_overlap)
            per_class = np.nanmean(np.where(np.isnan(dice), np.nan, dice), axis=0) if len(dice) else dice
            mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0
            val_metrics = validation_metrics(per_class, mean, plan["labels"])
            row.update(val_metrics)
            _track(tracker, val_metrics, step)
            if bar is not None:
                bar.write(f"step {step}: validation mean Dice {mean:.4f}")
            else:
                log.info("step %d: validation mean Dice %.4f", step, mean)
            improved = mean > best
            best = max(best, mean)
        history.append(row)
        if improved:
            save("best")
            _save_weights(model.state_dict(), out / "model.safetensors")
        if dist.main and (step % ckpt_every == 0 or step == cfg.steps or tracker.failure is not None):
            save("last")
        if tracker.failure is not None:
            raise UserError(
                f"{tracker.failure}. Training stopped at step {step} of {cfg.steps} and saved "
                f"{out / 'checkpoint_last.pt'} (with the metrics MLflow did not get); when the server is "
                f"back, `masksam train --out {out} --resume` (same other options) continues, or add "
                "--no-mlflow to go on without tracking. Raise train.tracking_timeout_s (--tracking-timeout) "
                "to wait longer") from tracker.failure
        if (step % ckpt_every == 0 or step == cfg.steps or validating):
            dist.barrier()
    if bar is not None:
        bar.close()

    # Every rank reports a hash of its weights: DDP replicas must stay identical.
    weights_hash = state_hash(model.state_dict())
    log.info("rank %d/%d final parameter sha256 %s", dist.rank, dist.world, weights_hash)
    summary: dict[str, Any] = {"rank": dist.rank, "param_sha256": weights_hash}
    if dist.main:
        if not val_cases or not (out / "model.safetensors").is_file():
            # No validation cases: the final weights are the best we have.
            _save_weights(model.state_dict(), out / "model.safetensors")
            save("best")
        _write_history(history, out / "history.csv")
        from masksam.components._overlays import learning_curve, overlay

        learning_curve(history, out / "learning_curve.png")
        for case, pred in list(zip(val_cases, last_val_labels))[: cfg.overlay_cases]:
            overlay(case.image[0], case.label, pred, out / "overlays" / f"{case.name}.png",
                    mcfg.num_classes, title=f"{case.name} at step {step}: ground truth vs prediction")
        summary.update({
            "mlflow_run_id": run_id, "tracking_uri": tracker.uri if cfg.mlflow else None,
            "steps": step, "fold": cfg.fold, "best_val_mean_dice": best if best >= 0 else None,
            "wall_time_s": round(time.time() - start_time, 1), "resumed": bool(resume),
            "world_size": dist.world, "device": str(device), "precision": str(dtype).replace("torch.", ""),
            "hashes": {"model.safetensors": sha256_file(out / "model.safetensors"),
                       "plan.json": sha256_file(out / "plan.json"),
                       "model_config.json": sha256_file(out / "model_config.json")},
        })
        write_json(out / "train_summary.json", summary)
        if params:
            with atomic_path(out / "params.yaml") as tmp:
                import yaml

                tmp.write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            _log_final(tracker, out, summary, best, step)
        except TrackingUnavailable as exc:
            raise UserError(
                f"{exc}. Training itself finished: {out} holds the final weights and train_summary.json, "
                f"but MLflow run {run_id} lacks its final metrics and artifacts; when the server is back, "
                f"`masksam train --out {out} --resume` (same other options) logs them and closes the run") from exc
    dist.barrier()
    return summary


def _build_model(mcfg) -> torch.nn.Module:
    """``build_masksam``, with a SAM checkpoint that is missing, unreadable, not a state dict
    of tensors (refused by ``torch.load(weights_only=True)``) or of another variant turned into
    a UserError naming the file."""
    from masksam.model import CheckpointError, build_masksam

    try:
        return build_masksam(mcfg, checkpoint=mcfg.checkpoint)
    except (CheckpointError, FileNotFoundError) as exc:
        raise UserError(f"--checkpoint / model.checkpoint: {exc}") from exc


def _track(tracker: RunLogger, metrics: dict[str, float], step: int) -> None:
    """Log one step's metrics; an outage is left in ``tracker.failure`` for the step's end, so the
    step's bookkeeping (history, best weights, checkpoint) completes before training stops."""
    try:
        tracker.log_metrics(metrics, step)
    except TrackingUnavailable:
        pass


def _log_final(tracker: RunLogger, out: Path, summary: dict[str, Any], best: float, step: int) -> None:
    """The run's closing metrics and artifacts, then its end; each call bounded by the tracker."""
    tracker.flush()
    tracker.log_metrics({"best_val_mean_dice": best if best >= 0 else float("nan"),
                         "wall_time_s": summary["wall_time_s"]}, step)
    for name in ("history.csv", "learning_curve.png", "train_summary.json", "model_config.json", "params.yaml"):
        tracker.log_artifact(out / name)
    tracker.log_artifacts(out / "overlays", "overlays")
    tracker.end("FINISHED")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _worker_init(worker_id: int) -> None:
    # Samples are seeded by index (see _sampler); workers only need to stay single-threaded.
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

_MODEL_OPTS = {"variant": str, "img_size": int, "patch_size": int, "slab_depth": int, "num_queries": int, "checkpoint": str}
_TRAIN_OPTS = {"fold": int, "seed": int, "device": str, "precision": str, "batch_size": int,
               "grad_accum": int, "lr": float, "steps": int, "val_every": int, "num_workers": int,
               "experiment": str, "tracking_timeout_s": float}


def _run(args: argparse.Namespace) -> int:
    params = load_params(args.params) if args.params else {}
    if args.params:
        for section in ("model", "train"):
            if section not in params:
                raise UserError(f"{args.params} has no '{section}:' section")
    model_params = dict(params.get("model") or {})
    train_section = dict(params.get("train") or {})
    for name in _MODEL_OPTS:
        if getattr(args, name) is not None:
            model_params[name] = getattr(args, name)
    for name in _TRAIN_OPTS:
        if getattr(args, name) is not None:
            train_section[name] = getattr(args, name)
    if args.no_mlflow:
        train_section["mlflow"] = False
    out = args.out or train_section.get("out") or TrainConfig.out
    train_section["out"] = str(out)
    cfg = TrainConfig.from_params(train_section, args.params or "train options")
    preprocessed = args.preprocessed or (params.get("preprocess") or {}).get("out") or "data/preprocessed"
    raw_dir = args.raw or (params.get("data") or {}).get("out")
    summary = train(preprocessed, out, model_params, cfg, resume=args.resume, params=params,
                    raw_dir=raw_dir, tracking=args.tracking_uri, progress=not args.no_progress)
    if "steps" in summary:
        best = summary.get("best_val_mean_dice")
        print(f"trained {summary['steps']} steps in {summary['wall_time_s']} s; best validation mean Dice "
              f"{best if best is None else round(best, 4)}; checkpoint directory {out}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train MaskSAM on a preprocessed dataset (checkpoint dir + MLflow run)",
        description="Train MaskSAM on one fold of a preprocessed dataset. Reads the model: and "
        "train: sections of --params; explicit options override them. Writes the checkpoint "
        "directory (model_config.json, plan.json, checkpoint_last/best.pt, model.safetensors, "
        "train_summary.json, history.csv, learning_curve.png, overlays/) and one MLflow run "
        "(MLFLOW_TRACKING_URI, default sqlite:///mlflow.db). Launch with `torchrun "
        "--nproc_per_node=N -m masksam train ...` for distributed data parallel training.")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--preprocessed", help="preprocessed dataset dir (default: preprocess.out of --params)")
    p.add_argument("--raw", help="raw dataset dir, for its manifest hash in MLflow (default: data.out)")
    p.add_argument("--out", help="checkpoint directory to write (default: train.out)")
    p.add_argument("--fold", type=int, help="cross-validation fold of splits.json to train on")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint_last.pt")
    p.add_argument("--steps", type=int, help="number of optimiser steps")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, help="mixed precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="slabs per micro-batch (per process)")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (poly decay to 0)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same weights)")
    p.add_argument("--val-every", dest="val_every", type=int, help="validate every N steps (0 = only at the end)")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="data-loader worker processes")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-timeout", dest="tracking_timeout_s", type=float, metavar="SECONDS",
                   help="longest wait for an unreachable MLflow server during training; then the "
                   f"checkpoint is saved and training stops for --resume (default: train.tracking_timeout_s "
                   f"or {DEFAULT_TRACKING_TIMEOUT_S:g})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--variant", help="model variant: tiny | vit_b | vit_l | vit_h")
    p.add_argument("--img-size", dest="img_size", type=int, help="in-plane input size (multiple of 16)")
    p.add_argument("--patch-size", dest="patch_size", type=int, choices=(8, 16),
                   help="ViT patch size in pixels (tiny only: 8 or 16; SAM variants keep 16)")
    p.add_argument("--slab-depth", dest="slab_depth", type=int, help="slices per slab (T)")
    p.add_argument("--num-queries", dest="num_queries", type=int, help="mask queries")
    p.add_argument("--checkpoint", help="official SAM checkpoint (sam_vit_*.pth) to start from")
    p.set_defaults(func=_run)
