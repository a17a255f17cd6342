"""Distributed data parallel training, for real: `torchrun --nproc_per_node=2` on the CPU (gloo)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_MODEL, preprocessed, tiny_train  # noqa: E402,F401  (fixture)

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.mark.slow
def test_torchrun_two_ranks_keep_identical_weights(preprocessed, tmp_path):  # noqa: F811
    out = tmp_path / "ddp"
    train_section = {**vars(tiny_train(steps=3, val_every=3)), "out": str(out)}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preprocess": {"out": str(preprocessed)}, "model": TINY_MODEL,
                                      "train": train_section}))
    res = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "masksam", "train", "--params", str(params),
         "--no-progress", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    hashes = dict(re.findall(r"rank (\d)/2 final parameter sha256 ([0-9a-f]{64})", log))
    assert set(hashes) == {"0", "1"}, log[-4000:]
    assert hashes["0"] == hashes["1"]
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["step"] == 3 and (out / "model.safetensors").is_file()
    summary = yaml.safe_load((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2
