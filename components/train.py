"""``masksam train``: fit MaskSAM on a preprocessed dataset and write a training directory.

The loop is nnU-Net's in spirit: random slabs with foreground oversampling and in-plane
augmentation, AdamW with a poly learning-rate schedule, gradient clipping, mixed precision on
CUDA, gradient accumulation, periodic whole-volume validation Dice (sliding window) on the
fold's validation cases, and checkpoints (last and best) that resume a run exactly. Launched by
``torchrun`` it trains with DistributedDataParallel (rank 0 validates, logs and saves).

Outputs (docs/architecture.md, "training directory"): ``model_config.json``, ``plan.json``,
``checkpoint_last.pt``, ``checkpoint_best.pt``, ``model.safetensors`` (best weights),
``train_summary.json``, ``history.csv``, ``learning_curve.png``, ``overlays/*.png``; and one
MLflow run with parameters, per-step metrics, lineage tags and these artifacts.

The recipe comes from params.yaml: ``train:`` (optimisation, AdamW eps, foreground rule) and
``loss:`` (every loss weight and matching cost, the sampled points); ``masksam train --dry-run``
builds the network and this recipe without data and prints them (parameter counts per part,
one JSON line last).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from masksam.components._augment import AugmentConfig
from masksam.components._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from masksam.components._io import atomic_path, ensure_writable_dir, read_json, sha256_file, write_json
from masksam.components._sampler import Case, SlabDataset, StepSampler, make_case
from masksam.components._tracking import (DEFAULT_TRACKING_TIMEOUT_S, RunLogger, TrackingUnavailable,
                                          check_tracking, flatten, lineage_tags, unique_metric_names)
from masksam.components.params import PRECISIONS, LossParams, Params, TrainParams
from masksam.errors import UserError

if TYPE_CHECKING:
    from masksam.model.criterion import LossWeights

log = logging.getLogger(__name__)

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

def validate(model: torch.nn.Module, cases: list[Case], cfg, device: torch.device, dtype: torch.dtype,
             overlap: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Whole-volume sliding-window prediction of each case through the one predictor;
    ``(dice [cases, K-1], labels)``."""
    from masksam.components.predictor import Predictor

    predictor = Predictor.from_module(model, device=device,
                                      autocast_dtype=None if dtype == torch.float32 else dtype)
    was_training = model.training
    model.eval()
    dices, labels = [], []
    try:
        for case in cases:
            _, pred = predictor.predict_preprocessed(case.image, overlap=overlap, return_probs=False)
            labels.append(pred)
            dices.append(dice_per_class(pred, case.label, cfg.num_classes))
    finally:
        model.train(was_training)
    return np.array(dices), labels


# ----------------------------------------------------------------------------------------------
# Outputs
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


# ----------------------------------------------------------------------------------------------
# The recipe: loss, matcher and optimiser from the params (training and --dry-run share these)
# ----------------------------------------------------------------------------------------------

def resolve_num_points(loss: LossParams, img_size: int) -> int:
    """``loss.num_points``, with 0 = min(112 * 112, img_size ** 2 // 4) (Mask2Former's 12,544
    points, fewer on small slabs)."""
    return int(loss.num_points) or min(112 * 112, img_size ** 2 // 4)


def loss_weights(loss: LossParams) -> LossWeights:
    """The criterion's :class:`~masksam.model.criterion.LossWeights` from the ``loss:`` section."""
    from masksam.model.criterion import LossWeights

    try:
        return LossWeights(ce=loss.class_weight, mask=loss.mask_bce_weight, dice=loss.mask_dice_weight,
                           aux_mask=loss.aux_bce_weight, aux_dice=loss.aux_dice_weight,
                           box_l1=loss.box_l1_weight, giou=loss.giou_weight, no_object=loss.no_object_weight)
    except ValueError as exc:
        raise UserError(f"loss: section: {exc}; set at least one loss.*_weight above 0") from exc


def matcher_costs(loss: LossParams) -> dict[str, float]:
    """Each matching cost: ``loss.cost_TERM``, or the term's loss weight where that is null."""
    return {term: loss.cost(term) for term in _COST_TERMS}


_COST_TERMS = ("class", "mask_bce", "mask_dice", "aux_bce", "aux_dice", "box_l1", "giou")


def build_criterion(loss: LossParams, mcfg, matching: str) -> tuple[torch.nn.Module, int]:
    """``(SetCriterion, num_points)`` for the model config: every weight, cost and point-sampling
    ratio from ``loss:``; ``matching`` fixed ties query c to class c (needs a query per class)."""
    from masksam.model.criterion import SetCriterion
    from masksam.model.matcher import FixedMatcher, HungarianMatcher

    num_points = resolve_num_points(loss, mcfg.img_size)
    weights = loss_weights(loss)
    if matching == "fixed":
        if int(mcfg.num_queries) < mcfg.num_classes:
            raise UserError(f"train.matching fixed needs model.num_queries >= {mcfg.num_classes} (one per class, "
                            f"background included); got {mcfg.num_queries}. Raise model.num_queries, set it to "
                            "null (classes + 3), or use train.matching: hungarian")
        matcher: torch.nn.Module = FixedMatcher()
    else:
        c = matcher_costs(loss)
        try:
            matcher = HungarianMatcher(
                cost_class=c["class"], cost_mask=c["mask_bce"], cost_dice=c["mask_dice"], num_points=num_points,
                cost_aux_mask=c["aux_bce"], cost_aux_dice=c["aux_dice"], cost_box_l1=c["box_l1"],
                cost_giou=c["giou"])
        except ValueError as exc:
            raise UserError(f"loss: section: {exc}; give the Hungarian matcher a non-zero loss.cost_* "
                            "(or use train.matching: fixed)") from exc
    criterion = SetCriterion(mcfg.num_classes, weights=weights, matcher=matcher, num_points=num_points,
                             oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_ratio)
    return criterion, num_points


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainParams) -> torch.optim.Optimizer:
    """AdamW with the recipe's lr, weight decay and eps (the paper: 1e-3, 3e-5, 1e-4)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def recipe(cfg: TrainParams, loss: LossParams, mcfg) -> dict[str, Any]:
    """The resolved training recipe (what the dry run prints and MLflow records)."""
    return {
        "loss_weights": {"class": loss.class_weight, "no_object": loss.no_object_weight,
                         "mask_bce": loss.mask_bce_weight, "mask_dice": loss.mask_dice_weight,
                         "aux_bce": loss.aux_bce_weight, "aux_dice": loss.aux_dice_weight,
                         "box_l1": loss.box_l1_weight, "giou": loss.giou_weight},
        "matching": cfg.matching,
        "matcher_costs": matcher_costs(loss),
        "point_sampling": {"num_points": resolve_num_points(loss, mcfg.img_size),
                           "oversample_ratio": loss.oversample_ratio, "importance_ratio": loss.importance_ratio},
        "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay, "eps": cfg.adam_eps},
        "schedule": {"kind": "poly", "exponent": cfg.poly_exponent, "warmup_steps": cfg.warmup_steps,
                     "steps": cfg.steps, "grad_clip": cfg.grad_clip},
        "foreground": {"oversample": cfg.foreground_oversample, "rule": cfg.foreground_rule},
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "precision": cfg.precision,
    }


# ----------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """What one training run holds between its parts (setup, resume, steps, validation, end)."""

    cfg: TrainParams
    loss: LossParams
    out: Path
    pre: Path
    plan: dict
    mcfg: Any
    device: torch.device
    dist: Dist
    dtype: torch.dtype
    train_cases: list[Case]
    val_cases: list[Case]
    val_names: list[str]
    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    criterion: torch.nn.Module
    num_points: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    tracker: RunLogger
    ckpt: dict | None = None
    net: torch.nn.Module | None = None
    step: int = 0
    best: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    run_url: str | None = None  # where the MLflow UI shows the run (asked once, at start)
    last_val_labels: list[np.ndarray] = field(default_factory=list)

    def save(self, kind: str) -> None:
        """Write ``checkpoint_{kind}.pt``: everything an exact ``--resume`` needs."""
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "step": self.step,
            "epoch": self.step * self.cfg.batch_size * self.cfg.grad_accum * self.dist.world
            // max(len(self.train_cases), 1),
            "best_metric": self.best, "history": self.history, "mlflow_run_id": self.run_id,
            "mlflow_unlogged": self.tracker.unlogged, "model_config": self.mcfg.to_dict(),
            "train_config": dataclasses.asdict(self.cfg), "loss_config": dataclasses.asdict(self.loss),
        }
        save_checkpoint(self.out / f"checkpoint_{kind}.pt", state)


def train(
    preprocessed: str | os.PathLike,
    out: str | os.PathLike,
    model_params: dict[str, Any],
    cfg: TrainParams,
    *,
    loss: LossParams | None = None,
    resume: bool = False,
    params: dict[str, Any] | None = None,
    raw_dir: str | os.PathLike | None = None,
    tracking: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train MaskSAM on fold ``cfg.fold`` of ``preprocessed``; write the training dir ``out``.

    ``model_params`` is params.yaml's ``model:`` section (MaskSAMConfig keys), ``cfg`` its
    ``train:`` and ``loss`` its ``loss:`` section (default: the built-in defaults); ``params``
    (the whole file, effective values) is logged to MLflow. Returns the training summary (also
    ``out/train_summary.json``).
    """
    loss = loss if loss is not None else LossParams()
    cfg.check("train options")
    loss.check("loss options")
    start_time = time.time()
    run = _setup(Path(preprocessed), Path(out), model_params, cfg, loss, tracking=tracking, resume=resume)
    with _log_file(run.out if run.dist.main else None):
        if run.ckpt is not None:
            _restore(run)
        run.net = _wrap_ddp(run)
        _start_tracking(run, params, raw_dir, resume)
        batches = iter(_loader(run))
        bar = None
        if run.dist.main and progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
        run.net.train()
        while run.step < cfg.steps:
            row = _train_step(run, batches, bar)
            _end_of_step(run, row, bar)
        if bar is not None:
            bar.close()
        return _finish(run, params, resume, start_time)


LOG_NAME = "train.log"


@contextlib.contextmanager
def _log_file(out: Path | None) -> Iterator[None]:
    """masksam's log records of the run also go to ``out/train.log`` (appended on --resume), so a
    run's story stays with its outputs after the terminal is gone."""
    if out is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("masksam")
    previous = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def _setup(pre: Path, out: Path, model_params: dict[str, Any], cfg: TrainParams, loss: LossParams, *,
           tracking: str | None, resume: bool) -> _Run:
    """Everything before the first step, failing early: the data and its fold, the device and
    process group, a writable --out and a reachable tracking server (before hours of training),
    the checkpoint to resume, then the model, criterion, optimiser and schedule."""
    plan, _splits, train_names, val_names = load_preprocessed(pre, cfg.fold)
    mcfg = model_config(model_params, plan)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    dtype = resolve_precision(cfg.precision, device)
    if dist.main:
        ensure_writable_dir(out, "--out")
        if cfg.mlflow:
            check_tracking(tracking)
    ckpt = _resume_checkpoint(out, mcfg) if resume else None
    train_cases = read_cases(pre, train_names, mcfg.num_classes)
    val_cases = read_cases(pre, val_names[: cfg.val_cases or None], mcfg.num_classes) if dist.main else []
    seed_everything(cfg.seed)
    model = _build_model(mcfg).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    criterion, num_points = build_criterion(loss, mcfg, cfg.matching)
    optimizer = build_optimizer(trainable, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.steps, cfg.poly_exponent, cfg.warmup_steps))
    tracker = RunLogger(tracking, cfg.experiment, enabled=dist.main and cfg.mlflow, timeout_s=cfg.tracking_timeout_s)
    return _Run(cfg=cfg, loss=loss, out=out, pre=pre, plan=plan, mcfg=mcfg, device=device, dist=dist, dtype=dtype,
                train_cases=train_cases, val_cases=val_cases, val_names=val_names, model=model,
                trainable=trainable, criterion=criterion.to(device), num_points=num_points, optimizer=optimizer,
                scheduler=scheduler, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                tracker=tracker, ckpt=ckpt)


def _resume_checkpoint(out: Path, mcfg) -> dict:
    """``checkpoint_last.pt`` of ``out``, refused when it was trained with another model config."""
    ckpt = load_checkpoint(out / "checkpoint_last.pt")
    if ckpt.get("model_config") and ckpt["model_config"] != mcfg.to_dict():
        raise UserError(f"{out / 'checkpoint_last.pt'} was trained with a different model config; "
                        "resume with the same params, or train into a new --out")
    return ckpt


def _restore(run: _Run) -> None:
    """Continue exactly where the checkpoint stopped: weights, optimiser, schedule, scaler, RNG,
    step, best score, history, MLflow run and the metrics an outage kept back."""
    ckpt = run.ckpt
    run.model.load_state_dict(ckpt["model"], strict=True)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.step, run.best = int(ckpt["step"]), float(ckpt.get("best_metric", -1.0))
    run.history, run.run_id = list(ckpt.get("history", [])), ckpt.get("mlflow_run_id")
    run.tracker.unlogged = list(ckpt.get("mlflow_unlogged", []))
    log.info("resuming %s at step %d (best validation Dice %.4f)", run.out, run.step, run.best)


def _wrap_ddp(run: _Run) -> torch.nn.Module:
    """The model under DistributedDataParallel when there are several ranks. A zero loss weight
    leaves the parameters only that term trains without gradient: DDP is then told to look for
    unused parameters (otherwise it is not, which is faster)."""
    if not run.dist.enabled:
        return run.model
    weights = dataclasses.asdict(run.loss)
    unused = any(v == 0 for k, v in weights.items() if k.endswith("_weight") and k != "no_object_weight")
    return torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
        find_unused_parameters=unused)


def _start_tracking(run: _Run, params: dict[str, Any] | None, raw_dir: str | os.PathLike | None,
                    resume: bool) -> None:
    """Rank 0: write model_config.json and plan.json, open (or reopen) the MLflow run and log
    the params file, the effective settings (train, loss, model) and the inputs' lineage."""
    n_params = sum(p.numel() for p in run.model.parameters())
    n_train = sum(p.numel() for p in run.trainable)
    cfg, out = run.cfg, run.out
    if run.dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "model_config.json", run.mcfg.to_dict())
        write_json(out / "plan.json", run.plan)
        tags = lineage_tags(run.plan, raw_dir, data_paths=(str(run.pre),), device=str(run.device))
        tags.update({"step": "train", "fold": str(cfg.fold), "world_size": str(run.dist.world)})
        # each parameter once, with the value training used: the params file's sections with
        # train/loss/model as resolved (defaults and options applied), plus what the run derived
        used = {**(params or {}), "train": dataclasses.asdict(cfg), "loss": dataclasses.asdict(run.loss),
                "model": run.mcfg.to_dict()}
        derived = {"precision_dtype": str(run.dtype).replace("torch.", ""), "preprocessed": str(run.pre),
                   "train_cases": len(run.train_cases), "val_cases": len(run.val_names), "num_params": n_params,
                   "num_trainable_params": n_train, "loss_num_points": run.num_points}
        new_run = run.run_id is None
        try:
            run.run_id = run.tracker.start(f"train-fold{cfg.fold}", tags, run_id=run.run_id)
            if run.run_id:
                run.run_url = run.tracker.ui_link()
                log.info("MLflow run %s (experiment %s): %s", run.run_id, cfg.experiment, run.run_url)
            run.tracker.log_params({**flatten(used), **flatten(derived, "run.")})
            if new_run:
                run.tracker.log_dataset(raw_dir)
            run.tracker.log_artifact(out / "plan.json")
            run.tracker.log_artifact(out / "model_config.json")
            run.tracker.flush()
        except TrackingUnavailable as exc:
            again = f"`masksam train --out {out} --resume`" if resume else "the same command"
            raise UserError(f"{exc}. Nothing was trained in this run: start the server (or fix "
                            f"MLFLOW_TRACKING_URI) and run {again} again, or add --no-mlflow") from exc
    log.info("training %s: %d/%d trainable parameters, %d train / %d val cases, %s %s, world %d",
             run.mcfg.variant, n_train, n_params, len(run.train_cases), len(run.val_names), run.device,
             run.dtype, run.dist.world)


def _loader(run: _Run) -> torch.utils.data.DataLoader:
    """Slabs from the step the run is at: batches of consecutive sample indices, so the
    foreground batch rule sees each micro-batch (and each rank's part of it) as nnU-Net does."""
    cfg = run.cfg
    per_step = cfg.batch_size * cfg.grad_accum
    dataset = SlabDataset(run.train_cases, run.mcfg.slab_depth, run.mcfg.img_size, cfg.foreground_oversample,
                          seed=cfg.seed, rank=run.dist.rank, augmentation=AugmentConfig() if cfg.augment else None,
                          foreground_rule=cfg.foreground_rule, batch_size=cfg.batch_size, world_size=run.dist.world)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=StepSampler(run.step * per_step, cfg.steps * per_step),
        num_workers=cfg.num_workers, worker_init_fn=_worker_init if cfg.num_workers else None,
        persistent_workers=False, pin_memory=run.device.type == "cuda")


def _train_step(run: _Run, batches, bar) -> dict[str, float]:
    """One optimiser step over ``grad_accum`` micro-batches (gradients synchronised on the last
    one only); returns the step's history row (mean loss terms, lr, gradient norm)."""
    cfg, device, dtype, net = run.cfg, run.device, run.dtype, run.net
    torch.manual_seed(step_seed(cfg.seed, run.dist.rank, run.step))
    terms: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        image = batch["image"].to(device, non_blocking=True)
        target = batch["label"].to(device, non_blocking=True)
        sync = micro == cfg.grad_accum - 1 or not run.dist.enabled
        with net.no_sync() if not sync else _nullcontext():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                outputs = net(image)
            losses = run.criterion(outputs, target)
            run.scaler.scale(losses["loss"] / cfg.grad_accum).backward()
        for k, v in losses.items():
            terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
    if not math.isfinite(terms["loss"]):
        raise UserError(f"training diverged at step {run.step + 1} (loss {terms['loss']}); lower train.lr "
                        f"(now {cfg.lr}) or use precision fp32/bf16")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not run.scaler.is_enabled() and not math.isfinite(float(grad_norm)):
        # fp16's scaler skips such a step itself; without it AdamW would write NaN into the weights
        raise UserError(f"training diverged at step {run.step + 1}: the gradient norm is {float(grad_norm)} "
                        f"(finite loss {terms['loss']:.4g}); lower train.lr (now {cfg.lr}), or use precision "
                        "fp32 if this is bf16 on a CPU (torch's bf16 Conv3d backward can give NaN there)")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    run.step += 1
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}")
    return {"step": run.step, **terms, "lr": lr, "grad_norm": float(grad_norm)}


def _end_of_step(run: _Run, row: dict[str, float], bar) -> None:
    """After a step: log its metrics, validate when due (rank 0), keep the best weights, write
    the last checkpoint when due, stop with a --resume hint when tracking stayed down."""
    cfg, step, out = run.cfg, run.step, run.out
    if run.dist.main and (step % cfg.log_every == 0 or step == cfg.steps):
        _track(run.tracker, {k: v for k, v in row.items() if k != "step"}, step)
    validating = step == cfg.steps or (cfg.val_every > 0 and step % cfg.val_every == 0)
    improved = validating and run.dist.main and bool(run.val_cases) and _validate_now(run, row, bar)
    run.history.append(row)
    if improved:
        run.save("best")
        _save_weights(run.model.state_dict(), out / "model.safetensors")
    ckpt_every = cfg.checkpoint_every or cfg.val_every or cfg.steps
    if run.dist.main and (step % ckpt_every == 0 or step == cfg.steps or run.tracker.failure is not None):
        run.save("last")
    if run.tracker.failure is not None:
        raise UserError(
            f"{run.tracker.failure}. Training stopped at step {step} of {cfg.steps} and saved "
            f"{out / 'checkpoint_last.pt'} (with the metrics MLflow did not get); when the server is "
            f"back, `masksam train --out {out} --resume` (same other options) continues, or add "
            "--no-mlflow to go on without tracking. Raise train.tracking_timeout_s (--tracking-timeout) "
            "to wait longer") from run.tracker.failure
    if step % ckpt_every == 0 or step == cfg.steps or validating:
        run.dist.barrier()


def _validate_now(run: _Run, row: dict[str, float], bar) -> bool:
    """Whole-volume validation Dice into ``row`` and MLflow; True when it beat the best so far."""
    dice, run.last_val_labels = validate(run.model, run.val_cases, run.mcfg, run.device, run.dtype,
                                         run.cfg.val_overlap)
    per_class = np.nanmean(np.where(np.isnan(dice), np.nan, dice), axis=0) if len(dice) else dice
    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0
    val_metrics = validation_metrics(per_class, mean, run.plan["labels"])
    row.update(val_metrics)
    _track(run.tracker, val_metrics, run.step)
    if bar is not None:
        bar.write(f"step {run.step}: validation mean Dice {mean:.4f}")
    else:
        log.info("step %d: validation mean Dice %.4f", run.step, mean)
    improved = mean > run.best
    run.best = max(run.best, mean)
    return improved


def _finish(run: _Run, params: dict[str, Any] | None, resume: bool, start_time: float) -> dict[str, Any]:
    """After the last step: every rank reports its weights' hash (DDP replicas must stay
    identical); rank 0 writes the final weights, history, curve, overlays, summary and params,
    and closes the MLflow run."""
    cfg, out, step = run.cfg, run.out, run.step
    weights_hash = state_hash(run.model.state_dict())
    log.info("rank %d/%d final parameter sha256 %s", run.dist.rank, run.dist.world, weights_hash)
    summary: dict[str, Any] = {"rank": run.dist.rank, "param_sha256": weights_hash}
    if run.dist.main:
        if not run.val_cases or not (out / "model.safetensors").is_file():
            # No validation cases: the final weights are the best we have.
            _save_weights(run.model.state_dict(), out / "model.safetensors")
            run.save("best")
        _write_history(run.history, out / "history.csv")
        from masksam.components._overlays import learning_curve, overlay

        learning_curve(run.history, out / "learning_curve.png")
        for case, pred in list(zip(run.val_cases, run.last_val_labels))[: cfg.overlay_cases]:
            overlay(case.image[0], case.label, pred, out / "overlays" / f"{case.name}.png",
                    run.mcfg.num_classes, title=f"{case.name} at step {step}: ground truth vs prediction")
        best = run.best
        summary.update({
            "mlflow_run_id": run.run_id, "tracking_uri": run.tracker.uri if cfg.mlflow else None,
            "mlflow_run_url": run.run_url,
            "steps": step, "fold": cfg.fold, "best_val_mean_dice": best if best >= 0 else None,
            "wall_time_s": round(time.time() - start_time, 1), "resumed": bool(resume),
            "world_size": run.dist.world, "device": str(run.device),
            "precision": str(run.dtype).replace("torch.", ""),
            "num_params": sum(p.numel() for p in run.model.parameters()),
            "num_trainable_params": sum(p.numel() for p in run.trainable),
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
            _log_final(run.tracker, out, summary, best, step)
        except TrackingUnavailable as exc:
            raise UserError(
                f"{exc}. Training itself finished: {out} holds the final weights and train_summary.json, "
                f"but MLflow run {run.run_id} lacks its final metrics and artifacts; when the server is back, "
                f"`masksam train --out {out} --resume` (same other options) logs them and closes the run") from exc
    run.dist.barrier()
    return summary

def _build_model(mcfg) -> torch.nn.Module:
    """``build_masksam``, with a SAM checkpoint that is missing, unreadable, not a state dict
    of tensors (refused by ``torch.load(weights_only=True)``) or of another variant turned into
    a UserError naming the file."""
    from masksam.model import WeightsError, build_masksam

    try:
        return build_masksam(mcfg, sam_weights=mcfg.sam_weights)
    except (WeightsError, FileNotFoundError) as exc:
        raise UserError(f"--sam-weights / model.sam_weights: {exc}") from exc


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
    for name in ("history.csv", "learning_curve.png", "train_summary.json", "model_config.json", "params.yaml", LOG_NAME):
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

# command-line options that override one key of the params (file < --set < these options)
_MODEL_OPTS = ("variant", "img_size", "patch_size", "slab_depth", "num_queries", "sam_weights")
_TRAIN_OPTS = ("fold", "seed", "device", "precision", "batch_size", "grad_accum", "lr", "steps", "val_every",
               "num_workers", "experiment", "tracking_timeout_s")


def _params(args: argparse.Namespace) -> Params:
    """The effective :class:`~masksam.components.params.Params`: the params file, then each
    ``--set section.key=value``, then the explicit options (``--lr`` is ``train.lr``, ...)."""
    from masksam.components.params import load_params_or_default, parse_set_options

    overrides = parse_set_options(args.set_overrides or ())
    overrides.update({f"model.{name}": getattr(args, name) for name in _MODEL_OPTS if getattr(args, name) is not None})
    overrides.update({f"train.{name}": getattr(args, name) for name in _TRAIN_OPTS if getattr(args, name) is not None})
    if args.out:
        overrides["train.out"] = args.out
    if args.no_mlflow:
        overrides["train.mlflow"] = False
    return load_params_or_default(args.params, overrides)


def _run(args: argparse.Namespace) -> int:
    p = _params(args)
    if args.dry_run:
        return dry_run(p, num_classes=args.num_classes, in_channels=args.in_channels)
    out = p.train.out
    resume = args.resume or (args.resume_if_present and (Path(out) / "checkpoint_last.pt").is_file())
    summary = train(args.preprocessed or p.preprocess.out, out, p.model.config_kwargs(), p.train, loss=p.loss,
                    resume=resume, params=p.to_dict(), raw_dir=args.raw or p.data.out,
                    tracking=args.tracking_uri, progress=not args.no_progress)
    if "steps" in summary:
        best = summary.get("best_val_mean_dice")
        print(f"trained {summary['steps']} steps in {summary['wall_time_s']} s; best validation mean Dice "
              f"{best if best is None else round(best, 4)}; training directory {out} (log: {Path(out) / LOG_NAME})")
        if summary.get("mlflow_run_id"):
            print(f"MLflow run {summary['mlflow_run_id']} at {summary.get('tracking_uri')}; open it with "
                  f"{summary.get('mlflow_run_url')}")
    return 0


# ----------------------------------------------------------------------------------------------
# --dry-run: the network and the recipe, without data
# ----------------------------------------------------------------------------------------------

# Classes (background included) of the datasets the importers write, for --dry-run without data;
# = len(LABELS) of components/data/phantom.py and importers.py's AMOS, BTCV, SYNAPSE8 and ACDC
# lists (a test keeps them equal; not imported here, so training does not depend on the importers)
DEMO_NUM_CLASSES = 8
DATASET_NUM_CLASSES = {"phantom": 8, "amos": 16, "synapse": 14, "synapse8": 9, "acdc": 4}


def dataset_num_classes(data) -> tuple[int, str]:
    """Classes (background included) of the dataset ``data.source`` imports, and where that
    number comes from; the demo's 8 for a source whose labels are only known from its files."""
    source = "synapse8" if data.source == "synapse" and data.subset == 8 else data.source
    if source in DATASET_NUM_CLASSES:
        return DATASET_NUM_CLASSES[source], f"the {source} importer's labels"
    return DEMO_NUM_CLASSES, f"default for data.source {data.source} (pass --num-classes)"


def dry_run(p: Params, *, num_classes: int | None = None, in_channels: int | None = None) -> int:
    """Build the network and the training recipe of params ``p`` without any data; print the
    parameter report, the resolved recipe and, as the last line, one JSON object with them.

    Random weights on the meta device (real counts, no memory, no time) unless ``model.sam_weights``
    names a SAM checkpoint, which is then loaded for real (checked like training does).
    """
    import json

    import yaml

    from masksam.model import MaskSAMConfig, build_masksam
    from masksam.model.params import format_parameter_report, parameter_report

    if num_classes is None:
        num_classes, classes_from = dataset_num_classes(p.data)
    else:
        classes_from = "--num-classes"
    try:
        mcfg = MaskSAMConfig.from_dict({**p.model.config_kwargs(), "num_classes": num_classes,
                                        "in_channels": in_channels or 1})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{p.source}: invalid model: section ({exc})") from exc
    if mcfg.sam_weights:
        model = _build_model(mcfg)
    else:
        with torch.device("meta"):
            model = build_masksam(mcfg)
    trainable = [q for q in model.parameters() if q.requires_grad]
    build_criterion(p.loss, mcfg, p.train.matching)  # the same checks as training
    build_optimizer(trainable, p.train)
    report = parameter_report(model)
    resolved = recipe(p.train, p.loss, mcfg)
    print(f"MaskSAM {mcfg.variant}, {mcfg.slab_depth} x {mcfg.img_size} x {mcfg.img_size} slabs, "
          f"{mcfg.num_queries} queries, {num_classes} classes ({classes_from}), "
          f"{'SAM weights ' + str(mcfg.sam_weights) if mcfg.sam_weights else 'random weights'}; params {p.source}")
    print(format_parameter_report(report))
    print(yaml.safe_dump({"model": mcfg.to_dict(), "recipe": resolved}, sort_keys=False).rstrip())
    print(json.dumps({
        "variant": mcfg.variant, "img_size": mcfg.img_size, "patch_size": mcfg.patch_size,
        "slab_depth": mcfg.slab_depth, "num_queries": mcfg.num_queries, "num_classes": num_classes,
        "in_channels": mcfg.in_channels, "weights": mcfg.sam_weights or "random",
        "total_parameters": report["total"], "trainable_parameters": report["trainable"],
        "trainable_by_part": {g: d["trainable"] for g, d in report["groups"].items()},
        **resolved, "params": p.source,
    }))
    return 0


def register_cli(subparsers) -> None:
    from masksam.components.params import add_params_arguments

    p = subparsers.add_parser(
        "train", help="train MaskSAM on a preprocessed dataset (training dir + MLflow run)",
        description="Train MaskSAM on one fold of a preprocessed dataset. Reads the model:, train: and "
        "loss: sections of --params; --set section.key=value and the explicit options override them. "
        "Writes the training directory (model_config.json, plan.json, checkpoint_last/best.pt, "
        "model.safetensors, train_summary.json, history.csv, learning_curve.png, overlays/) and one MLflow "
        "run (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db). Launch with `torchrun "
        "--nproc_per_node=N -m masksam train ...` for distributed data parallel training. --dry-run "
        "builds the network and the recipe without data and prints their report.")
    add_params_arguments(p)
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="build the model (random weights unless model.sam_weights / --sam-weights names a SAM "
                   "checkpoint) and the loss, matcher and optimiser, print the parameter report and the "
                   "resolved recipe, the last line one JSON object; needs no data, trains nothing")
    p.add_argument("--num-classes", dest="num_classes", type=int,
                   help="--dry-run only: classes including background (training reads them from the "
                   "dataset); default: the dataset of data.source (amos 16, synapse 14 or 9 with "
                   "data.subset 8, acdc 4, phantom 8), else 8")
    p.add_argument("--in-channels", dest="in_channels", type=int,
                   help="--dry-run only: input channels (training reads them from the dataset; default 1)")
    p.add_argument("--preprocessed", help="preprocessed dataset dir (default: preprocess.out of --params)")
    p.add_argument("--raw", help="raw dataset dir, for its manifest hash in MLflow (default: data.out)")
    p.add_argument("--out", help="training directory to write (default: train.out)")
    p.add_argument("--fold", type=int, help="cross-validation fold of splits.json to train on")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint_last.pt")
    p.add_argument("--resume-if-present", action="store_true",
                   help="continue from OUT/checkpoint_last.pt when it is there, else start from step 0 "
                   "(for pods a cluster may restart with the same command, e.g. a TrainJob's nodes)")
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
    p.add_argument("--sam-weights", help="official SAM weights (sam_vit_*.pth) to start from (model.sam_weights)")
    p.set_defaults(func=_run)
