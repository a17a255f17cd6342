"""ONNX export: parity figures, sidecar, dynamic batch, failure leaves nothing, TensorRT boundary."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from _delivery_fixtures import delivery_root, export_dir, preprocessed, train_dir  # noqa: F401
from masksam.components import export as export_mod
from masksam.components._loading import sha256_file
from masksam.components._tensorrt import TensorRTUnavailable, build_engine, tensorrt_unavailable_reason
from masksam.errors import UserError


def test_export_writes_verified_onnx_and_sidecar(export_dir, train_dir):  # noqa: F811
    side = json.loads((export_dir / "model.onnx.json").read_text())
    assert side["files"]["model.onnx"] == sha256_file(export_dir / "model.onnx")
    assert side["plan"] == json.loads((train_dir / "plan.json").read_text())
    assert side["config"]["img_size"] == 32
    for kind in ("random", "real"):  # real = slabs of the preprocessed phantom cases
        assert side["parity"][kind]["max_abs_diff"] <= 1e-3
        assert side["parity"][kind]["label_agreement"] >= 0.999
    # a whole preprocessed case through the predictor (sliding window, blending, argmax)
    volume = side["parity"]["volume"]
    assert volume["ok"] and volume["label_agreement"] >= 0.999 and volume["windows"] >= 1
    assert side["parity"]["random"]["batch_sizes"] == [1, 3]
    # dynamic batch axis: a batch of 5 runs and matches per-item results
    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((5, 1, 4, 32, 32)).astype(np.float32)
    many = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    one = sess.run(None, {sess.get_inputs()[0].name: x[2:3]})[0]
    assert many.shape == (5, 3, 4, 32, 32)
    np.testing.assert_allclose(many[2:3], one, atol=1e-5)


def test_parity_failure_writes_nothing(train_dir, preprocessed, tmp_path, monkeypatch):  # noqa: F811
    real_compare = export_mod.compare

    def skewed(onnx_runner, torch_runner, slabs):  # PyTorch reference shifted: ORT now "disagrees"
        return real_compare(onnx_runner, lambda x: torch_runner(x) + 0.01, slabs)

    monkeypatch.setattr(export_mod, "compare", skewed)
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_mod.export(train_dir, tmp_path / "out", exporter="torchscript", tensorrt="off")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_dynamo_failure_falls_back_with_reason(train_dir, tmp_path, monkeypatch):  # noqa: F811
    import torch

    original = torch.onnx.export

    def failing(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", failing)
    side = export_mod.export(train_dir, tmp_path / "out", tensorrt="off")
    assert side["exporter"] == "torchscript"
    assert "simulated dynamo failure" in side["exporter_fallback_reason"]
    with pytest.raises(UserError, match="dynamo ONNX exporter failed"):
        export_mod.export(train_dir, tmp_path / "out2", exporter="dynamo", tensorrt="off")


@pytest.mark.slow
def test_dynamo_export_parity(train_dir, preprocessed, tmp_path):  # noqa: F811
    side = export_mod.export(train_dir, tmp_path / "out", data_dir=preprocessed, exporter="dynamo",
                             tensorrt="off")
    assert side["exporter"] == "dynamo" and side["exporter_fallback_reason"] is None
    assert side["parity"]["real"]["max_abs_diff"] <= 1e-3


@pytest.mark.slow
def test_fp16_export_or_clear_refusal(train_dir, tmp_path):  # noqa: F811
    """FP16 copy: parity within the FP16 tolerance, or (CPU EP lacking FP16 kernels) a clear
    UserError and nothing written; never an unverified file."""
    try:
        side = export_mod.export(train_dir, tmp_path / "out", fp16=True, exporter="torchscript",
                                 tensorrt="off")
    except UserError as exc:
        assert "FP16" in str(exc)
        assert not (tmp_path / "out").exists()
        return
    half = json.loads((tmp_path / "out" / "model_fp16.onnx.json").read_text())
    assert half["precision"] == "fp16"
    assert half["parity"]["random"]["label_agreement"] >= 0.99
    assert half["files"]["model_fp16.onnx"] == sha256_file(tmp_path / "out" / "model_fp16.onnx")
    assert side["precision"] == "fp32"


def test_tensorrt_boundary(export_dir, tmp_path, train_dir):  # noqa: F811
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT present: covered by test_tensorrt_engine_builds")
    assert "tensorrt" in reason
    with pytest.raises(TensorRTUnavailable, match="cannot build a TensorRT engine"):
        build_engine(export_dir / "model.onnx", tmp_path / "model.engine")
    with pytest.raises(UserError, match="--tensorrt on"):
        export_mod.export(train_dir, tmp_path / "out", exporter="torchscript", tensorrt="on")


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt_unavailable_reason() is not None,
                    reason=f"no TensorRT engine here: {tensorrt_unavailable_reason()}")
def test_tensorrt_engine_builds(export_dir, tmp_path):  # noqa: F811
    engine = build_engine(export_dir / "model.onnx", tmp_path / "model.engine")
    assert engine.stat().st_size > 0
