"""TensorRT engine from the exported ONNX graph (GPU image only).

``tensorrt`` ships in the GPU image, not in the CPU install; :func:`tensorrt_unavailable_reason`
says why an engine cannot be built here so callers can skip with that reason instead of failing
obscurely. The engine is built with TensorRT's Python builder API and one optimisation profile
over the dynamic batch axis (the other axes are fixed by the model config).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from masksam.errors import UserError

log = logging.getLogger(__name__)


class TensorRTUnavailable(UserError):
    """TensorRT (or a CUDA device for it) is not present on this machine."""


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else a sentence saying what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the tensorrt Python package is not installed ({exc}); it ships in the GPU image"
    try:
        import torch

        if not torch.cuda.is_available():
            return "tensorrt is installed but no CUDA device is visible"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return None


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 batch: tuple[int, int, int] = (1, 1, 4), fp16: bool = True,
                 workspace_gib: float = 4.0) -> Path:
    """Parse ``onnx_path`` and write a serialized TensorRT engine to ``engine_path``.

    ``batch`` is (min, opt, max) for the optimisation profile of the dynamic batch axis. Raises
    TensorRTUnavailable where TensorRT cannot run and UserError when parsing or building fails.
    """
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(f"cannot build a TensorRT engine from {onnx_path}: {reason}")
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph: {errors[:800]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(int(d) for d in tensor.shape[1:])
        if any(d < 0 for d in rest):
            raise UserError(f"{onnx_path}: input {tensor.name} has dynamic axes besides batch: {tensor.shape}")
        lo, opt, hi = batch
        profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    log.info("TensorRT engine written: %s (%.1f MB, fp16=%s)", engine_path,
             engine_path.stat().st_size / 1e6, fp16)
    return engine_path
