"""`masksam train` end to end on tiny real data: training dir, MLflow run, repeatability,
exact resume after SIGKILL, and clear errors for broken inputs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from masksam.components.params import LossParams, TrainParams, load_params
from masksam.components.train import state_hash, train
from masksam.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from _delivery_fixtures import write_raw_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MASKSAM = str(Path(sys.executable).with_name("masksam"))
TINY_MODEL = {"variant": "tiny", "img_size": 32, "slab_depth": 4, "num_queries": 5, "freeze_sam": False}


def tiny_train(**over) -> TrainParams:
    """A few steps of batch 1, no tracking; Hungarian matching with augmentation (what the
    paper configurations train with), not the demo's fixed matching."""
    base = dict(steps=3, val_every=2, batch_size=1, lr=1e-3, mlflow=False, overlay_cases=0, val_cases=1,
                matching="hungarian", augment=True, warmup_steps=0, foreground_oversample=0.33)
    base.update(over)
    return TrainParams(**base)


TINY_LOSS = LossParams(num_points=64)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    """Six phantom CT cases through the real preprocessing (2 folds, 1 test case)."""
    from masksam.components.preprocess import preprocess_dataset

    root = tmp_path_factory.mktemp("train-data")
    raw = write_raw_dataset(root / "raw", 6)
    from masksam.components.data.manifest import write_manifest

    write_manifest(raw, progress=False)
    out = root / "preprocessed"
    preprocess_dataset(raw, out, target_spacing=[2.0, 2.0, 3.0], workers=1, folds=2, seed=0,
                       test_fraction=0.2, progress=False)
    return out


def _params_file(tmp_path: Path, preprocessed: Path, out: Path, **train_over) -> Path:
    train_section = {k: v for k, v in vars(tiny_train(**train_over)).items()}
    train_section["out"] = str(out)
    params = {"preprocess": {"out": str(preprocessed)}, "model": TINY_MODEL, "train": train_section,
              "loss": {"num_points": TINY_LOSS.num_points}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_train_writes_training_dir_and_mlflow_run(preprocessed, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "train"
    params = {"model": TINY_MODEL, "train": {"steps": 3}}
    summary = train(preprocessed, out, TINY_MODEL, tiny_train(mlflow=True, overlay_cases=1), params=params,
                    tracking=uri,
                    raw_dir=preprocessed.parent / "raw", loss=TINY_LOSS, progress=False)

    for name in ("model_config.json", "plan.json", "checkpoint_last.pt", "checkpoint_best.pt",
                 "model.safetensors", "train_summary.json", "history.csv", "learning_curve.png"):
        assert (out / name).is_file(), name
    assert list((out / "overlays").glob("*.png"))
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_metric"} <= set(ckpt)
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert 0.0 <= ckpt["best_metric"] <= 1.0
    disk = json.loads((out / "train_summary.json").read_text())
    assert disk["steps"] == 3 and disk["mlflow_run_id"] == summary["mlflow_run_id"]
    assert disk["mlflow_run_url"].endswith(f"/runs/{summary['mlflow_run_id']}?workflowType=machine_learning")

    # The prediction side reads the directory back with the contract's loader (strict, hashed).
    from masksam.components._loading import build_model_from_dir

    model, config, plan, verified = build_model_from_dir(out)
    assert verified and config["img_size"] == 32 and plan["labels"]["spleen"] == 2

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # each parameter once, with the value training used (the file's train.steps and the options
    # agree here); the loss section and the optimiser's eps are recorded with the run
    p = run.data.params
    assert p["train.steps"] == "3" and p["model.img_size"] == "32" and p["train.lr"] == "0.001"
    assert p["loss.num_points"] == "64" and p["loss.class_weight"] == "2.0" and p["train.adam_eps"] == "1e-08"
    assert p["run.num_trainable_params"] and not [k for k in p if k.startswith("effective.")]
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "masksam train" and tags["mlflow.user"]
    # the raw dataset is the run's input, its manifest hash the digest
    (dataset,) = [i.dataset for i in run.inputs.dataset_inputs]
    # and the run's log stays with its outputs, naming the run
    log_text = (out / "train.log").read_text()
    assert f"MLflow run {summary['mlflow_run_id']}" in log_text and "training tiny" in log_text
    assert tags["git_commit"] and tags["host"] and tags["torch_version"] == torch.__version__
    manifest = json.loads((preprocessed.parent / "raw" / "manifest.json").read_text())
    assert tags["data.dataset_sha256"] == manifest["dataset_sha256"]
    assert dataset.digest == manifest["dataset_sha256"][:36]
    assert "segment_anything_version" in tags
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert {"loss_ce", "lr", "val_mean_dice", "val_dice_liver", "val_dice_spleen"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")] == [2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plan.json", "learning_curve.png", "history.csv", "overlays", "params.yaml", "train.log"} <= artifacts


def test_same_seed_same_weights_other_seed_differs(preprocessed, tmp_path):
    hashes = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        s = train(preprocessed, tmp_path / name, TINY_MODEL, tiny_train(steps=1, val_every=0, seed=seed),
                  loss=TINY_LOSS, progress=False)
        hashes.append(s["param_sha256"])
    assert hashes[0] == hashes[1]
    assert hashes[0] != hashes[2]


def test_fixed_matching_trains_and_bad_settings_are_user_errors(preprocessed, tmp_path):
    """train.matching fixed: query c answers for class c (needs a query per class)."""
    fixed = train(preprocessed, tmp_path / "f", TINY_MODEL, tiny_train(steps=2, val_every=2, matching="fixed"),
                  loss=TINY_LOSS, progress=False)
    hung = train(preprocessed, tmp_path / "h", TINY_MODEL, tiny_train(steps=2, val_every=2), loss=TINY_LOSS, progress=False)
    assert fixed["steps"] == 2 and fixed["best_val_mean_dice"] is not None
    assert fixed["param_sha256"] != hung["param_sha256"]
    with pytest.raises(UserError, match="num_queries >= 3"):  # background, liver, spleen
        train(preprocessed, tmp_path / "q", {**TINY_MODEL, "num_queries": 2}, tiny_train(matching="fixed"),
              loss=TINY_LOSS, progress=False)
    with pytest.raises(UserError, match="train.matching must be one of"):
        load_params(None, {"train.matching": "greedy"})


def test_resume_after_interruption_matches_uninterrupted_run(preprocessed, tmp_path, monkeypatch):
    """Fast, in-process: stop a run right after its first checkpoint, resume, compare bitwise."""
    import masksam.components.train as train_mod

    cfg = tiny_train(steps=2, val_every=1, checkpoint_every=1)
    ref = train(preprocessed, tmp_path / "ref", TINY_MODEL, cfg, loss=TINY_LOSS, progress=False)

    real_save = train_mod.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if Path(path).name == "checkpoint_last.pt":
            raise KeyboardInterrupt("simulated kill after the first checkpoint")

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(preprocessed, tmp_path / "run", TINY_MODEL, cfg, loss=TINY_LOSS, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)["step"] == 1
    shutil.copytree(tmp_path / "run", tmp_path / "restarted")
    resumed = train(preprocessed, tmp_path / "run", TINY_MODEL, cfg, resume=True, loss=TINY_LOSS, progress=False)
    assert resumed["steps"] == 2 and resumed["param_sha256"] == ref["param_sha256"]
    assert resumed["best_val_mean_dice"] == ref["best_val_mean_dice"]

    # a pod restarted with the same command (a TrainJob node): --resume-if-present continues from
    # the checkpoint it finds, and starts from step 0 where there is none
    from masksam.cli import main

    for out, resumed_expected in ((tmp_path / "restarted", True), (tmp_path / "fresh", False)):
        params = _params_file(tmp_path, preprocessed, out, steps=2, val_every=1, checkpoint_every=1)
        assert main(["train", "--params", str(params), "--resume-if-present", "--no-progress"]) == 0
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["resumed"] is resumed_expected
        assert summary["param_sha256"] == ref["param_sha256"]


# heavy (make test-heavy), not in CI's 30 minutes: the fast suite's in-process interruption test
# checks the same bitwise resume, and the slow suite's kfp.local test kills a real training step
# (its process group) and checks it resumes at its checkpoint
@pytest.mark.heavy
def test_resume_after_sigkill_matches_uninterrupted_run(preprocessed, tmp_path):
    """Kill a CLI training with SIGKILL after its first checkpoint; --resume ends bitwise equal."""
    steps = 6
    ref = train(preprocessed, tmp_path / "ref", TINY_MODEL,
                tiny_train(steps=steps, val_every=2, checkpoint_every=2), loss=TINY_LOSS, progress=False)

    out = tmp_path / "killed"
    params = _params_file(tmp_path, preprocessed, out, steps=steps, val_every=2, checkpoint_every=2)
    cmd = [MASKSAM, "train", "--params", str(params), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = out / "checkpoint_last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert killed_at < steps, "the run finished before it could be killed"

    res = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == steps
    assert state_hash(state["model"]) == ref["param_sha256"]
    resumed = json.loads((out / "train_summary.json").read_text())
    assert resumed["resumed"] is True and resumed["hashes"]["model.safetensors"] == \
        json.loads((tmp_path / "ref" / "train_summary.json").read_text())["hashes"]["model.safetensors"]


def test_missing_and_corrupt_inputs_are_user_errors(preprocessed, tmp_path):
    cfg = tiny_train(steps=1)
    with pytest.raises(UserError, match="preprocessed dataset not found"):
        train(tmp_path / "nope", tmp_path / "o", TINY_MODEL, cfg, progress=False)

    broken = tmp_path / "broken"
    shutil.copytree(preprocessed, broken)
    (broken / "splits.json").unlink()
    with pytest.raises(UserError, match="splits.json"):
        train(broken, tmp_path / "o", TINY_MODEL, cfg, progress=False)

    shutil.rmtree(broken)
    shutil.copytree(preprocessed, broken)
    with pytest.raises(UserError, match="--fold 7"):
        train(broken, tmp_path / "o", TINY_MODEL, tiny_train(fold=7), progress=False)
    first = json.loads((broken / "splits.json").read_text())["folds"][0]["train"][0]
    (broken / "cases" / f"{first}.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match=f"{first}.npz"):
        train(broken, tmp_path / "o", TINY_MODEL, cfg, progress=False)

    with pytest.raises(UserError, match="unknown MaskSAMConfig keys|invalid model"):
        train(preprocessed, tmp_path / "o", {**TINY_MODEL, "bogus": 1}, cfg, progress=False)

    # --resume without a checkpoint, and with a corrupt one.
    with pytest.raises(UserError, match="checkpoint not found"):
        train(preprocessed, tmp_path / "fresh", TINY_MODEL, cfg, resume=True, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint_last.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot be loaded"):
        train(preprocessed, tmp_path / "bad", TINY_MODEL, cfg, resume=True, progress=False)


def test_cli_reports_user_error_and_help(tmp_path, capsys, monkeypatch):
    from masksam.cli import main

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {"steps": 1, "mlflow": False},
                                      "preprocess": {"out": str(tmp_path / "missing")}}))
    assert main(["train", "--params", str(params)]) == 2
    assert "preprocessed dataset not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for opt in ("--resume", "--fold", "--steps", "--device", "--preprocessed", "--out", "--precision", "--dry-run",
                "--set", "--num-classes"):
        assert opt in help_text
    params.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {"stepz": 1}}))
    assert main(["train", "--params", str(params)]) == 2
    assert "stepz" in capsys.readouterr().err


def test_poly_schedule_and_precision_resolution():
    from masksam.components.train import poly_lambda, resolve_precision

    f = poly_lambda(100, 0.9, 0)
    assert f(0) == 1.0 and f(100) == 0.0 and 0 < f(50) < 1 and f(10) > f(20)
    g = poly_lambda(100, 0.9, 10)
    assert g(0) == pytest.approx(0.1) and g(9) == pytest.approx(1.0)
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_sampler_oversamples_foreground_and_is_seeded():
    from masksam.components._sampler import SlabDataset, make_case

    rng = np.random.default_rng(0)
    label = np.zeros((12, 64, 64), np.uint8)
    label[5:7, 40:44, 10:14] = 1  # a tiny organ
    image = rng.normal(size=(1, 12, 64, 64)).astype(np.float32)
    case = make_case("c", image, label)

    def hit_rate(fg: float) -> float:
        ds = SlabDataset([case], 2, 16, fg, seed=3, augmentation=None)
        return float(np.mean([(ds[i]["label"] > 0).any().item() for i in range(200)]))

    assert hit_rate(1.0) == 1.0
    assert hit_rate(0.0) < 0.3
    ds = SlabDataset([case], 4, 16, 0.5, seed=3)
    a, b = ds[17], ds[17]
    assert a["image"].shape == (1, 4, 16, 16) and a["label"].dtype == torch.int64
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    other_rank = SlabDataset([case], 4, 16, 0.5, seed=3, rank=1)[17]
    assert not torch.equal(a["image"], other_rank["image"])


def test_augmentation_keeps_slices_and_label_values():
    from masksam.components._augment import AugmentConfig, augment, build_augmentation

    image = np.zeros((1, 3, 24, 24), np.float32)
    label = np.zeros((3, 24, 24), np.int64)
    label[1, 6:18, 10:14] = 2
    image[0][label > 0] = 1.0
    always = AugmentConfig(p_spatial=1.0, p_noise=0, p_blur=0, p_brightness=0, p_shift=0, p_gamma=0)
    t = build_augmentation((3, 16, 16), always)
    img, lab = augment(t, image, label, np.random.default_rng(5))
    assert img.shape == (1, 3, 16, 16) and lab.shape == (3, 16, 16)
    assert set(lab.unique().tolist()) <= {0, 2}
    # In-plane only: the organ stays in slice 1.
    assert lab[0].sum() == 0 and lab[2].sum() == 0 and lab[1].sum() > 0


def _dry_run(capsys, *argv: str) -> tuple[str, dict]:
    from masksam.cli import main

    assert main(["train", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


DRY_RUN_KEYS = {"variant", "img_size", "slab_depth", "num_queries", "total_parameters", "trainable_parameters",
                "loss_weights", "matcher_costs", "optimizer", "trainable_by_part", "point_sampling", "foreground"}


def test_dry_run_prints_the_report_and_a_json_last_line_without_data(tmp_path, capsys, monkeypatch):
    """Tiny config, no dataset anywhere: the params, then --set, then the explicit options."""
    from masksam.model import MaskSAMConfig, build_masksam

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "preprocess": {"out": str(tmp_path / "missing")},
        "train": {"lr": 0.01, "adam_eps": 1e-4, "matching": "hungarian"},
        "loss": {"class_weight": 0.2, "mask_bce_weight": 1.2, "cost_giou": 0.7, "num_points": 0}}))
    text, info = _dry_run(capsys, "--params", str(params), "--set", "loss.box_l1_weight=0.5", "--set",
                          "train.lr=0.02", "--lr", "0.03", "--num-classes", "3")
    assert DRY_RUN_KEYS <= set(info)
    assert (info["variant"], info["img_size"], info["slab_depth"], info["num_queries"]) == ("tiny", 32, 4, 5)
    assert info["optimizer"] == {"name": "AdamW", "lr": 0.03, "weight_decay": 1e-4, "eps": 1e-4}
    assert info["loss_weights"]["class"] == 0.2 and info["loss_weights"]["box_l1"] == 0.5
    assert info["matcher_costs"]["giou"] == 0.7 and info["matcher_costs"]["mask_bce"] == 1.2
    assert info["point_sampling"]["num_points"] == 32 * 32 // 4
    real = build_masksam(MaskSAMConfig(**TINY_MODEL, num_classes=3))  # the counts are the real network's
    assert info["total_parameters"] == sum(p.numel() for p in real.parameters())
    assert info["trainable_parameters"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert sum(info["trainable_by_part"].values()) == info["trainable_parameters"]
    assert "encoder_adapters" in text and "prompt_generator" in text and "recipe:" in text
    assert not (tmp_path / "data").exists()  # nothing written


def test_dry_run_of_each_paper_config_counts_the_full_size_network(capsys):
    """The three paper configurations on the meta device: the counts test_model_paper_configs
    measures on real full-size builds, the paper's recipe, in seconds."""
    from test_model_paper_configs import EXPECTED_TRAINABLE, PAPER_CONFIGS

    for name, (path, variant, size, depth, queries, labels) in PAPER_CONFIGS.items():
        _, info = _dry_run(capsys, "--params", str(REPO / path))
        assert (info["variant"], info["img_size"], info["slab_depth"], info["num_queries"], info["num_classes"]) == (
            variant, size, depth, queries, labels), name
        assert info["trainable_parameters"] == EXPECTED_TRAINABLE[name], name
        assert info["trainable_by_part"]["sam"] == 0  # SAM frozen
        assert info["optimizer"]["eps"] == 1e-4 and info["loss_weights"]["class"] == 0.2
        assert info["matcher_costs"]["giou"] == 0.2 and info["foreground"] == {"oversample": 0.33, "rule": "batch"}


def test_recipe_reaches_the_criterion_matcher_and_optimizer():
    from masksam.components.train import build_criterion, build_optimizer
    from masksam.model import MaskSAMConfig

    mcfg = MaskSAMConfig(**TINY_MODEL, num_classes=3)
    loss = LossParams(class_weight=0.2, mask_bce_weight=1.2, mask_dice_weight=1.1, aux_bce_weight=0.5,
                      aux_dice_weight=0.4, box_l1_weight=0.3, giou_weight=0.0, cost_giou=0.25, cost_class=0.9,
                      num_points=77, oversample_ratio=2.0, importance_ratio=0.6)
    crit, points = build_criterion(loss, mcfg, "hungarian")
    w = crit.weights
    assert (w.ce, w.mask, w.dice, w.aux_mask, w.aux_dice, w.box_l1, w.giou) == (0.2, 1.2, 1.1, 0.5, 0.4, 0.3, 0.0)
    assert crit.matcher.weights == {"class": 0.9, "mask": 1.2, "dice": 1.1, "aux_mask": 0.5, "aux_dice": 0.4,
                                    "box_l1": 0.3, "giou": 0.25}
    assert (points, crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio) == (77, 77, 2.0, 0.6)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], tiny_train(adam_eps=1e-4, lr=0.5))
    assert opt.param_groups[0]["eps"] == 1e-4 and opt.param_groups[0]["lr"] == 0.5
    zero = LossParams(**{f: 0.0 for f in ("class_weight", "mask_bce_weight", "mask_dice_weight", "aux_bce_weight",
                                          "aux_dice_weight", "box_l1_weight", "giou_weight")})
    with pytest.raises(UserError, match="loss: section"):
        build_criterion(zero, mcfg, "hungarian")


def test_dry_run_class_counts_equal_the_importers_labels():
    from masksam.components.data.importers import ACDC_LABELS, AMOS_LABELS, BTCV_LABELS, SYNAPSE8
    from masksam.components.data.phantom import LABELS
    from masksam.components.params import DataParams
    from masksam.components.train import DATASET_NUM_CLASSES, dataset_num_classes

    assert DATASET_NUM_CLASSES == {"phantom": len(LABELS), "amos": len(AMOS_LABELS) + 1,
                                   "synapse": len(BTCV_LABELS) + 1, "synapse8": len(SYNAPSE8) + 1,
                                   "acdc": len(ACDC_LABELS)}
    assert dataset_num_classes(DataParams(source="synapse", subset=8))[0] == 9
    assert dataset_num_classes(DataParams(source="nnunet"))[0] == 8


def test_nan_gradient_with_finite_loss_stops_training_by_name(preprocessed, tmp_path, monkeypatch):
    """Without fp16's scaler nothing skips a NaN gradient: training stops with a clear error
    instead of writing NaN into the weights (and failing later somewhere else)."""
    import masksam.components.train as train_mod

    build = train_mod._build_model

    def poisoned(mcfg):
        model = build(mcfg)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda g: torch.full_like(g, float("nan")))
        return model

    monkeypatch.setattr(train_mod, "_build_model", poisoned)
    with pytest.raises(UserError, match="gradient norm is nan"):
        train(preprocessed, tmp_path / "out", TINY_MODEL, tiny_train(), loss=TINY_LOSS, progress=False)
