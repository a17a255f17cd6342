"""bench/gpu_check.py, the GPU check of the paper configurations (issue 10 item 6): its --tiny
CPU run goes through the same path (training's builders and step, FLOP counting, ONNX export
and ONNX Runtime parity) and writes a JSON row per configuration and precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
CONFIGS = ("amos", "synapse", "acdc")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    """One --tiny run of every configuration in fp32 and bf16 (about 35 s on 2 busy cores:
    one thread, the FLOP-counted step as the only warm-up, one timed step, and the TorchScript
    exporter, which exports the tiny graph in ~3 s where the dynamo one takes ~35-45 s)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "tmp.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--threads", "1", "--steps", "1", "--warmup", "0",
           "--exporter", "torchscript", "--out", str(out)]
    res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text()), res.stdout


def test_tiny_run_reports_a_row_per_config_and_precision(tiny_run):
    report, _ = tiny_run
    rows = report["rows"]
    assert [(r["config"], r["precision"]) for r in rows] == [(c, p) for c in CONFIGS for p in ("fp32", "bf16")]
    for r in rows:
        where = f"{r['config']} {r['precision']}"
        assert r["status"] == "ok", where
        assert r["tiny"] and r["variant"] == "tiny" and r["batch"] == 2, where
        assert r["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[r["precision"]], where
        assert r["step_s"] > 0 and len(r["step_s_all"]) == r["steps_timed"] == 1, where
        assert r["flops_per_step"] > 1e9, where  # forward + backward of a 2 x 4 x 64 x 64 batch
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e12), where
        assert "peak_gpu_gib" in r and r["peak_gpu_gib"] is None and r["peak_rss_gib"] > 0, where
        assert r["mfu"] is None and r["peak_tflops"] is None, where  # no peak known for a CPU
        assert r["loss_last"] > 0 and r["grad_scaler"] is False, where
        assert r["trainable_parameters"] > 0, where


def test_tiny_run_keeps_each_configuration_s_recipe(tiny_run):
    rows = {(r["config"], r["precision"]): r for r in tiny_run[0]["rows"]}
    # the paper's queries and dataset classes stay; only size and variant are shrunk
    assert (rows["amos", "fp32"]["num_queries"], rows["amos", "fp32"]["num_classes"]) == (24, 16)
    assert (rows["synapse", "fp32"]["num_queries"], rows["synapse", "fp32"]["num_classes"]) == (24, 9)
    assert (rows["acdc", "fp32"]["num_queries"], rows["acdc", "fp32"]["num_classes"]) == (8, 4)
    assert all(r["matching"] == "hungarian" for r in rows.values())
    # the same step in both precisions: the same FLOPs
    for c in CONFIGS:
        assert rows[c, "fp32"]["flops_per_step"] == rows[c, "bf16"]["flops_per_step"]


def test_tiny_run_checks_onnx_parity_on_the_cpu_provider(tiny_run):
    for r in tiny_run[0]["rows"]:
        parity = r["parity"]
        assert parity["status"] == "ok", parity
        assert parity["provider"] == "CPUExecutionProvider" and parity["exporter"] == "torchscript"
        assert parity["max_abs_diff"] < 1e-4 and parity["label_agreement"] > 0.999, parity


def test_tiny_run_prints_the_markdown_table(tiny_run):
    report, stdout = tiny_run
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| config | precision |") and "MFU" in lines[0]
    assert len(lines) == 1 + len(report["rows"])
    assert "| amos | bf16 | tiny | 4 x 64 x 64 | 2 |" in stdout
    env = report["environment"]
    assert env["device"] == "cpu" and env["tiny"] is True and env["torch"]


def test_peak_table_and_override():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_check.peak_tflops("NVIDIA L40S", None) == 362.0
    assert gpu_check.peak_tflops("Some Future GPU", None) is None
    assert gpu_check.peak_tflops("NVIDIA H200", 500.0) == 500.0


def test_an_oom_is_reported_and_the_check_goes_on(monkeypatch):
    """A precision that runs out of memory becomes an "OOM: ..." row; the next one still runs."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    real = gpu_check.measure

    def measure(p, mcfg, model, precision, device, args):
        if precision == "bf16":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(p, mcfg, model, precision, device, args)

    monkeypatch.setattr(gpu_check, "measure", measure)
    args = gpu_check.parse_args(["--tiny", "--configs", "acdc", "--precisions", "bf16", "fp32", "--steps", "1",
                                 "--warmup", "0", "--no-parity"])
    args.deadline = float("inf")
    rows = gpu_check.run_config("acdc", torch.device("cpu"), args)
    assert [r["precision"] for r in rows] == ["bf16", "fp32"]
    assert rows[0]["status"] == "OOM: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert rows[1]["status"] == "ok" and rows[1]["step_s"] > 0
    assert "OOM: CUDA out of memory" in gpu_check.markdown(rows, gpu_check.environment(torch.device("cpu"), args))
