"""The paper's configurations (configs/paper_*.yaml): they load through the path training uses,
set every architecture switch to the paper's value, build at full size on the CPU, and run one
slab forward within the 24 GB of a CI machine (measured in a subprocess, peak RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("data", "preprocess", "model", "train", "evaluate", "export", "register")

# name -> (file, variant, img_size, slab_depth, num_queries, labels incl. background)
PAPER_CONFIGS = {
    "amos": ("configs/paper_amos_vit_h.yaml", "vit_h", 512, 9, 24, 16),
    "synapse": ("configs/paper_synapse_vit_h.yaml", "vit_h", 256, 26, 24, 9),
    "acdc": ("configs/paper_acdc_vit_b.yaml", "vit_b", 1024, 4, 8, 4),
}
PAPER_SWITCHES = dict(
    encoder_adapter="paper", adapter_mlp_scale=0.5, pos_embed="crop", stem="conv", prompt_generator="full",
    mask_prompt="binary", prompt_temporal_embedding=True, decoder_adapters="paper", mask_upsampler="learned3d",
    freeze_sam=True, use_depth_conv_adapter=True, use_depth_mlp_adapter=True, use_temporal_embedding=True,
    use_aux_boxes=True, use_aux_class_tokens=True, adapter_ratio=0.25,
)


def _plan(num_labels: int) -> dict:
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, num_labels)}}
    return {"labels": labels, "channel_names": {"0": "CT"}}


def _load(path: str, num_labels: int):
    """The training path: components.params.load_params -> Params (train, loss) / model_config."""
    from masksam.components.params import load_params
    from masksam.components.train import model_config

    params = load_params(ROOT / path)
    mcfg = model_config(params.model.config_kwargs(), _plan(num_labels), path)
    return params, params.train, mcfg


# the public code's loss weights per trainer (configs/paper_*.yaml cite the lines)
PAPER_LOSS = {
    "amos": dict(mask=1.2, points=131072), "synapse": dict(mask=1.5, points=32768),
    "acdc": dict(mask=1.5, points=32768),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_loads_through_the_training_path(name):
    path, variant, size, depth, queries, labels = PAPER_CONFIGS[name]
    params, tcfg, cfg = _load(path, labels)
    raw = __import__("yaml").safe_load((ROOT / path).read_text())
    assert all(raw.get(s) for s in SECTIONS + ("loss",)), [s for s in SECTIONS if not raw.get(s)]
    assert (cfg.variant, cfg.img_size, cfg.slab_depth, cfg.num_queries, cfg.patch_size) == (variant, size, depth, queries, 16)
    assert cfg.num_classes == labels
    for key, value in PAPER_SWITCHES.items():
        assert getattr(cfg, key) == value, key
    assert (tcfg.lr, tcfg.weight_decay, tcfg.grad_clip, tcfg.matching) == (1e-3, 3e-5, 12.0, "hungarian")
    assert (tcfg.foreground_oversample, tcfg.foreground_rule, tcfg.adam_eps) == (0.33, "batch", 1e-4)
    loss, want = params.loss, PAPER_LOSS[name]
    assert (loss.class_weight, loss.no_object_weight, loss.mask_bce_weight, loss.mask_dice_weight,
            loss.aux_bce_weight, loss.aux_dice_weight, loss.box_l1_weight, loss.giou_weight) == (
        0.2, 0.1, want["mask"], want["mask"], 0.5, 0.5, 0.5, 0.2)
    assert all(loss.cost(t) == getattr(loss, "class_weight" if t == "class" else f"{t}_weight")
               for t in ("class", "mask_bce", "mask_dice", "aux_bce", "aux_dice", "box_l1", "giou"))
    assert (loss.num_points, loss.oversample_ratio, loss.importance_ratio) == (want["points"], 2.0, 0.75)
    text = (ROOT / path).read_text()
    assert "recipe values not yet wired" not in text  # every recipe value is a key now


def test_paper_vit_b_config_still_loads():
    params, tcfg, cfg = _load("configs/paper_vit_b.yaml", 16)
    assert cfg.variant == "vit_b" and params.loss.class_weight == 0.2 and tcfg.adam_eps == 1e-4


def _child(name: str, forward: bool) -> dict:
    """Build (and optionally run one slab through) a paper configuration in a fresh process;
    returns its JSON report (parameter counts, seconds, peak RSS in GB)."""
    path, _, _, _, _, labels = PAPER_CONFIGS[name]
    code = f"""
import json, resource, time, torch
from pathlib import Path
from masksam.components.params import load_params
from masksam.components.train import model_config
from masksam.model import build_masksam, parameter_report
params = load_params({str(ROOT / path)!r})
plan = {json.dumps(_plan(labels))}
cfg = model_config(params.model.config_kwargs(), plan)
torch.manual_seed(0)
t0 = time.time(); m = build_masksam(cfg).eval(); build_s = time.time() - t0
rep = parameter_report(m)
out = dict(total=rep["total"], trainable=rep["trainable"], new=rep["new"], build_s=round(build_s, 1))
if {forward!r}:
    x = torch.randn(1, cfg.in_channels, cfg.slab_depth, cfg.img_size, cfg.img_size)
    t0 = time.time()
    with torch.no_grad():
        y = m.class_probs(x)
    out.update(forward_s=round(time.time() - t0, 1), shape=list(y.shape), finite=bool(torch.isfinite(y).all()))
out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
print("REPORT " + json.dumps(out))
"""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    report = json.loads(line[len("REPORT "):])
    print(name, report)
    return report


# trainable parameters with random weights and freeze_sam (docs/architecture.md records them);
# the paper reports about 14M for ViT-B
EXPECTED_TRAINABLE = {"acdc": 21_377_610, "synapse": 65_992_481, "amos": 66_593_965}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_builds_at_full_size(name):
    """Build only (ViT-H: ~10-20 s, ~3.5 GB); the forward is the slow test below."""
    rep = _child(name, forward=False)
    assert rep["trainable"] == rep["new"] == EXPECTED_TRAINABLE[name]
    assert rep["peak_rss_gb"] < 24


# Each forward takes 3-4 minutes on 2 cores: `make test-heavy` runs all three (figures in
# docs/architecture.md). CI ran the AMOS one until the machine of 2026-12-02, 2x slower than
# before, took CI to 30 min 11 s; CI still builds every configuration at full size (above).
@pytest.mark.heavy(reason="3-minute full-size forward; run by make test-heavy")
@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_runs_one_full_size_slab_within_24_gb(name):
    """One slab of the paper's size through the whole network (no_grad, float32, CPU). Slow:
    on 2 shared CPU cores ACDC (ViT-B, 4 x 1024^2) and the ViT-H slabs take minutes (figures in
    docs/architecture.md). Training-step memory (activations kept for backward) is a GPU
    matter: bench/gpu_check.py (issue 10, item 6)."""
    path, _, size, depth, _, labels = PAPER_CONFIGS[name]
    rep = _child(name, forward=True)
    assert rep["shape"] == [1, labels, depth, size, size] and rep["finite"]
    assert rep["peak_rss_gb"] < 24
