"""``masksam export``: the per-slab inference graph (``MaskSAM.class_probs``) to ONNX.

The graph covers the whole slab path (image encoder with adapters, prompt generator, mask
decoder with the classifier token, through to per-class probabilities) with a dynamic batch
axis. torch's default (dynamo) exporter is tried first; where it fails the legacy TorchScript
exporter is used and the reason is logged and recorded. The file is checked with ONNX Runtime
against PyTorch on random and real slabs and, through the predictor, on a whole preprocessed case;
if parity is not met nothing is written. Optional extras: an FP16 copy for GPUs (ONNX Runtime's
float16 converter, FP32 inputs/outputs kept) and a TensorRT engine where TensorRT is installed
(GPU image).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from masksam.components._io import check_output_dir, owned_output_dir, read_json, write_json
from masksam.components._loading import ONNX_NAME, sha256_file, sidecar_path, write_manifest
from masksam.components.params import add_params_arguments, params_from_args, pick
from masksam.errors import UserError

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph itself
FP16_NAME = "model_fp16.onnx"
ENGINE_NAME = "model.engine"


class _Skip(Exception):
    """The dynamo exporter was not asked for."""


@dataclass
class Parity:
    """ONNX Runtime vs PyTorch on one set of slabs."""

    slabs: int
    batch_sizes: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    label_agreement: float  # fraction of voxels whose argmax class agrees

    def ok(self, atol: float, min_agreement: float) -> bool:
        return self.max_abs_diff <= atol and self.label_agreement >= min_agreement


def _class_probs_module(model):
    """A module whose forward is ``model.class_probs`` (what ONNX exporters trace)."""
    import torch

    class ClassProbs(torch.nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.class_probs(x)

    return ClassProbs(model).eval()


def _param_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


EXPORTERS = ("auto", "dynamo", "torchscript")


def export_onnx(module, example, path: Path, opset: int, exporter: str = "auto") -> tuple[str, str | None]:
    """Export ``module`` to ``path`` with a dynamic batch axis; return (exporter used, fallback reason).

    ``auto`` tries torch's default (dynamo) exporter and falls back to the TorchScript one when
    it fails; ``dynamo`` fails instead. Models over ~2 GB of weights are saved with one
    external-data file ``model.onnx.data``.
    """
    import onnx
    import torch

    if exporter not in EXPORTERS:
        raise UserError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    large = _param_bytes(module) > EXTERNAL_DATA_BYTES
    try:
        if exporter == "torchscript":
            raise _Skip("--exporter torchscript")
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=opset, input_names=["slab"],
            output_names=["class_probs"], dynamic_shapes={"x": {0: batch}}, external_data=large,
            optimize=True, verify=False, report=False,
        )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(path), external_data=large)
        exporter, reason = "dynamo", None
    except Exception as exc:  # the dynamo exporter raises many types (export, decomposition, onnx)
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        if exporter == "dynamo":
            raise UserError(f"torch's dynamo ONNX exporter failed ({reason}); try --exporter auto") from exc
        if not isinstance(exc, _Skip):
            log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", reason)
        else:
            reason = None
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["slab"], output_names=["class_probs"],
            dynamic_axes={"slab": {0: "batch"}, "class_probs": {0: "batch"}}, do_constant_folding=True,
        )
        exporter = "torchscript"
    if large:  # gather whatever the exporter wrote into a single external-data file
        proto = onnx.load(str(path), load_external_data=True)
        for extra in path.parent.iterdir():
            if extra != path:
                extra.unlink()
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path))
    return exporter, reason


def _ort_session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    from masksam.components._loading import ort_session_options

    return ort.InferenceSession(str(path), sess_options=ort_session_options(),
                                providers=providers or ["CPUExecutionProvider"])


def compare(onnx_runner, torch_runner, slabs: list[np.ndarray]) -> Parity:
    """Run each slab batch through the predictor's two slab runners (ONNX Runtime and the
    PyTorch module, :mod:`masksam.components.predictor`); collect differences and label
    agreement."""
    max_abs, sum_abs, n_abs, agree, n_vox = 0.0, 0.0, 0, 0, 0
    for slab in slabs:
        ref = np.asarray(torch_runner(slab))
        got = np.asarray(onnx_runner(slab))
        if got.shape != ref.shape:
            raise UserError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape} for "
                            f"input {slab.shape}")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = max(max_abs, float(diff.max()))
        sum_abs += float(diff.sum())
        n_abs += diff.size
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        n_vox += ref.shape[0] * int(np.prod(ref.shape[2:]))
    return Parity(slabs=len(slabs), batch_sizes=sorted({int(s.shape[0]) for s in slabs}),
                  max_abs_diff=max_abs, mean_abs_diff=sum_abs / max(n_abs, 1),
                  label_agreement=agree / max(n_vox, 1))


MAX_VOLUME_WINDOWS = 64  # whole-volume parity only where it costs a few dozen forward passes


def volume_parity(onnx, torch_model, data_dir: Path | None, min_agreement: float,
                  max_windows: int = MAX_VOLUME_WINDOWS) -> dict[str, Any]:
    """Whole-volume label agreement of two :class:`Predictor` s (ONNX, PyTorch) on the first
    preprocessed case of ``data_dir``: the sliding window, Gaussian blending and argmax the
    users get, not only single slabs. Skipped (with the reason) where no case is there or the
    case needs more than ``max_windows`` forward passes (full-size SAM on a CPU)."""
    from masksam.components._sliding_window import compute_steps

    cases = sorted((data_dir / "cases").glob("*.npz")) if data_dir is not None else []
    if not cases:
        return {"skipped": "no preprocessed case (--data)"}
    with np.load(cases[0], allow_pickle=False) as npz:
        image = npz["image"].astype(np.float32)
    cfg = onnx.config
    window = (int(cfg["slab_depth"]), int(cfg["img_size"]), int(cfg["img_size"]))
    windows = int(np.prod([len(compute_steps(max(n, w), w, 0.5)) for n, w in zip(image.shape[1:], window)]))
    if windows > max_windows:
        return {"skipped": f"{cases[0].name} needs {windows} windows (> {max_windows})"}
    _, ref = torch_model.predict_preprocessed(image, return_probs=False)
    _, got = onnx.predict_preprocessed(image, return_probs=False)
    agreement = float((ref == got).mean())
    return {"case": cases[0].stem, "windows": windows, "voxels": int(ref.size),
            "label_agreement": agreement, "ok": agreement >= min_agreement}


def random_slabs(cfg: dict[str, Any], seed: int = 0) -> list[np.ndarray]:
    """Random normalised-intensity slabs at batch sizes 1 and 3 (checks the dynamic batch axis)."""
    rng = np.random.default_rng(seed)
    shape = (cfg["in_channels"], cfg["slab_depth"], cfg["img_size"], cfg["img_size"])
    return [rng.standard_normal((b, *shape)).astype(np.float32) for b in (1, 3)]


def real_slabs(data_dir: Path, cfg: dict[str, Any], max_slabs: int = 4) -> list[np.ndarray]:
    """Slabs of preprocessed cases (``DIR/cases/*.npz``) around each case's foreground centre,
    ``slab_depth`` slices deep and cropped/zero-padded in-plane to ``img_size``: the windows
    sliding-window inference feeds the graph, with real anatomy and intensities in them."""
    depth, size = int(cfg["slab_depth"]), int(cfg["img_size"])
    slabs = []
    for case in sorted((data_dir / "cases").glob("*.npz"))[:max_slabs]:
        with np.load(case, allow_pickle=False) as npz:
            image = npz["image"].astype(np.float32)
            label = npz["label"] if "label" in npz.files else None
        fg = np.argwhere(label > 0) if label is not None and label.any() else None
        centre = fg.mean(0).round().astype(int) if fg is not None else np.array(image.shape[1:]) // 2
        slab = np.zeros((image.shape[0], depth, size, size), np.float32)
        src, dst = [], []
        for axis, extent in enumerate((depth, size, size)):
            n = image.shape[axis + 1]
            lo = int(np.clip(centre[axis] - extent // 2, 0, max(n - extent, 0)))
            take = min(extent, n)
            src.append(slice(lo, lo + take))
            dst.append(slice(0, take))
        slab[(slice(None), *dst)] = image[(slice(None), *src)]
        slabs.append(slab[None])
    return slabs


def convert_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and activations with FP32 inputs/outputs (ONNX Runtime's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src), load_external_data=True)
    half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    large = half.ByteSize() > EXTERNAL_DATA_BYTES if _proto_small_enough(half) else True
    onnx.save_model(half, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=dst.name + ".data")


def _proto_small_enough(proto) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:  # protobuf refuses to size > 2 GB messages on some builds
        return False


def _files_of(path: Path) -> dict[str, str]:
    """sha256 of an ONNX file and its external-data file, if any."""
    files = {path.name: sha256_file(path)}
    data = path.with_name(path.name + ".data")
    if data.is_file():
        files[data.name] = sha256_file(data)
    return files


def _parity(onnx_runner, torch_runner, slab_sets: dict[str, list[np.ndarray]], atol: float,
            min_agreement: float, what: str) -> dict[str, Parity]:
    """Slab parity per slab set; a UserError naming the figures when any set misses it."""
    parity = {k: compare(onnx_runner, torch_runner, v) for k, v in slab_sets.items()}
    bad = {k: asdict(v) for k, v in parity.items() if not v.ok(atol, min_agreement)}
    if bad:
        raise UserError(f"{what} differs from PyTorch beyond --atol {atol} / label agreement "
                        f"{min_agreement}: {json.dumps(bad)}; nothing was written to --out. Try another --opset, "
                        "or report the exporter version")
    return parity


def _slab_sets(config: dict[str, Any], data_dir: str | os.PathLike | None) -> dict[str, list[np.ndarray]]:
    """Random slabs (batch 1 and 3) and, where ``data_dir`` has preprocessed cases, real ones."""
    slab_sets = {"random": random_slabs(config)}
    data = Path(data_dir) if data_dir else None
    if data is not None and data.is_dir():
        slab_sets["real"] = real_slabs(data, config)
    if not slab_sets.get("real"):
        slab_sets.pop("real", None)
        log.warning("no preprocessed cases (--data): parity checked on random slabs only")
    return slab_sets


def _check_fp32(onnx_path: Path, model, config: dict[str, Any], plan: dict[str, Any],
                data_dir: str | os.PathLike | None, atol: float, min_agreement: float, train_dir: Path,
                out_dir: Path) -> tuple[Any, dict[str, Any], dict[str, list[np.ndarray]]]:
    """The exported graph against the PyTorch module through the predictor's runners: slab
    parity (random and real slabs) and whole-volume label agreement on a real case.
    Returns (session, the sidecar's parity block, the slab sets)."""
    from masksam.components.predictor import Member, OrtRunner, Predictor, TorchRunner

    session = _ort_session(onnx_path)
    if isinstance(session.get_inputs()[0].shape[0], int):
        raise UserError(f"{train_dir}: exported graph has a fixed batch axis {session.get_inputs()[0].shape}; "
                        "the exporter dropped the dynamic axis")
    onnx_runner, torch_runner = OrtRunner(session), TorchRunner(model, "cpu")
    slab_sets = _slab_sets(config, data_dir)
    what = f"{train_dir}: ONNX Runtime output"
    parity = _parity(onnx_runner, torch_runner, slab_sets, atol, min_agreement, what)
    for name, p in parity.items():
        log.info("parity (%s slabs): max |diff| %.2e, label agreement %.5f", name, p.max_abs_diff,
                 p.label_agreement)
    onnx = Predictor([Member(onnx_runner, plan, config, "onnxruntime", str(onnx_path))])
    torch_model = Predictor([Member(torch_runner, plan, config, "torch", str(train_dir))])
    volume = volume_parity(onnx, torch_model, Path(data_dir) if data_dir else None, min_agreement)
    if not volume.get("ok", True):
        raise UserError(f"{what}: whole-volume labels agree on only {volume['label_agreement']:.5f} of "
                        f"the voxels of {volume['case']} (< {min_agreement}); nothing was written to {out_dir}")
    log.info("volume parity: %s", volume)
    block = {"atol": atol, "min_label_agreement": min_agreement,
             **{k: asdict(v) for k, v in parity.items()}, "volume": volume}
    return session, block, slab_sets


def _export_fp16(tmp: Path, onnx_path: Path, torch_runner, slab_sets: dict[str, list[np.ndarray]],
                 fp16_atol: float, common: dict[str, Any], train_dir: Path) -> None:
    """``model_fp16.onnx`` (FP16 weights/activations, FP32 I/O), parity-checked, with its sidecar."""
    import onnxruntime as ort

    from masksam.components.predictor import OrtRunner

    half_path = tmp / FP16_NAME
    convert_fp16(onnx_path, half_path)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    try:
        half_session = _ort_session(half_path, providers)
    except Exception as exc:  # CPU EP lacks some FP16 kernels
        raise UserError(f"{half_path.name}: ONNX Runtime ({', '.join(providers)}) cannot run the "
                        f"FP16 graph ({str(exc)[:300]}); export FP16 on the GPU image") from exc
    half_parity = _parity(OrtRunner(half_session), torch_runner, slab_sets, fp16_atol, 0.99,
                          f"{train_dir}: FP16 graph")
    write_json(sidecar_path(half_path), {
        **common, "precision": "fp16", "files": _files_of(half_path),
        "parity": {"atol": fp16_atol, "min_label_agreement": 0.99,
                   "providers": half_session.get_providers(),
                   **{k: asdict(v) for k, v in half_parity.items()}}})


def _tensorrt_engine(tmp: Path, onnx_path: Path, tensorrt: str) -> dict[str, Any]:
    """Build ``model.engine`` where TensorRT is installed; the sidecar's record of it."""
    from masksam.components._tensorrt import build_engine, tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None:
        engine = build_engine(onnx_path, tmp / ENGINE_NAME, fp16=True)
        return {"file": ENGINE_NAME, "sha256": sha256_file(engine), "batch_profile": [1, 1, 4], "fp16": True}
    if tensorrt == "on":
        raise UserError(f"--tensorrt on: {reason}")
    log.info("no TensorRT engine: %s", reason)
    return {"skipped": reason}


def _common_sidecar(train_dir: Path, session, config: dict[str, Any], plan: dict[str, Any],
                    verified: dict[str, str], opset: int, used: str, fallback: str | None) -> dict[str, Any]:
    """What the FP32 and FP16 sidecars share: plan, config, I/O, exporter, lineage, versions."""
    import onnx
    import onnxruntime as ort
    import torch

    from masksam.components._loading import recorded_weight_hash

    summary_path = train_dir / "train_summary.json"
    train_summary = read_json(summary_path, "training summary") if summary_path.is_file() else {}
    slab = [config["in_channels"], config["slab_depth"], config["img_size"], config["img_size"]]
    return {
        "format_version": 1,
        "plan": plan,
        "config": config,
        "input": {"name": session.get_inputs()[0].name, "shape": ["batch", *slab], "dtype": "float32",
                  "layout": "B,C,T,H,W (normalised intensities)"},
        "output": {"name": session.get_outputs()[0].name,
                   "shape": ["batch", config["num_classes"], *slab[1:]], "dtype": "float32"},
        "opset": opset,
        "exporter": used,
        "exporter_fallback_reason": fallback,
        "source": {"train_dir": str(train_dir.resolve()), "weights_sha256": verified.get(
            "model.safetensors") or recorded_weight_hash(train_dir) or sha256_file(
            train_dir / "model.safetensors"), "train_run_id": train_summary.get("mlflow_run_id")
            or train_summary.get("run_id")},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "python": platform.python_version()},
    }


def export(train_dir: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = 18,
           fp16: bool = False, atol: float = 1e-3, fp16_atol: float = 5e-2,
           min_agreement: float = 0.999, data_dir: str | os.PathLike | None = None,
           tensorrt: str = "auto", exporter: str = "auto", force: bool = False) -> dict[str, Any]:
    """Export the training directory ``train_dir`` to ``out_dir``; return the sidecar dict.

    Raises UserError (and leaves ``out_dir`` untouched) when ONNX Runtime disagrees with PyTorch
    beyond ``atol`` or on more than ``1 - min_agreement`` of the voxel labels (slabs, and a whole
    preprocessed case through the predictor). ``out_dir`` is replaced only when it is new, empty
    or an earlier export (``force``: any folder that is not an input); a file there, or a folder
    in or around ``train_dir``/``data_dir``, is refused.
    """
    import torch

    from masksam.components._loading import build_model_from_dir
    from masksam.components._tensorrt import tensorrt_unavailable_reason
    from masksam.components.predictor import TorchRunner

    train_dir, out_dir = Path(train_dir), Path(out_dir)
    check_output_dir(out_dir, "export", inputs=(train_dir, data_dir), force=force, what="--out")
    if tensorrt not in ("auto", "on", "off"):
        raise UserError(f"--tensorrt {tensorrt!r}: choose auto, on or off")
    if tensorrt == "on" and tensorrt_unavailable_reason() is not None:  # fail before the export
        raise UserError(f"--tensorrt on: {tensorrt_unavailable_reason()}")
    model, config, plan, verified = build_model_from_dir(train_dir, "cpu")
    started = time.time()
    shape = (2, config["in_channels"], config["slab_depth"], config["img_size"], config["img_size"])
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for noisy in ("onnx_ir", "onnxscript"):  # one INFO line per folded constant / rewrite
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with owned_output_dir(out_dir, "export", inputs=(train_dir, data_dir), force=force, what="--out") as tmp:
        onnx_path = tmp / ONNX_NAME
        with torch.inference_mode(False), torch.no_grad():
            used, fallback = export_onnx(_class_probs_module(model), example, onnx_path, opset, exporter)
        session, parity, slab_sets = _check_fp32(onnx_path, model, config, plan, data_dir, atol,
                                                 min_agreement, train_dir, out_dir)
        common = _common_sidecar(train_dir, session, config, plan, verified, opset, used, fallback)
        sidecar = {**common, "precision": "fp32", "files": _files_of(onnx_path), "parity": parity}
        if fp16:
            _export_fp16(tmp, onnx_path, TorchRunner(model, "cpu"), slab_sets, fp16_atol, common, train_dir)
        if tensorrt != "off":
            sidecar["tensorrt_engine"] = _tensorrt_engine(tmp, onnx_path, tensorrt)
        sidecar["export_seconds"] = round(time.time() - started, 2)
        write_json(sidecar_path(onnx_path), sidecar)
        write_manifest(tmp)  # export_manifest.json: sha256 of every file above, sidecar included
    log.info("exported %s (%s exporter) to %s", train_dir, used, out_dir)
    return sidecar


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained model to ONNX (+FP16, +TensorRT) and verify it",
        description="Export MaskSAM's per-slab inference graph (class_probs) to ONNX with a dynamic "
        "batch axis, check ONNX Runtime against PyTorch, and write model.onnx + model.onnx.json "
        "(plan, config, sha256, parity figures). Nothing is written when parity fails.")
    p.add_argument("--train", required=True, help="training directory written by `masksam train`")
    p.add_argument("--out", help="output directory (default: params.yaml export.out); replaced when it "
                   "is new, empty or an earlier export")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it holds files export did not write")
    p.add_argument("--data", help="preprocessed dataset for parity on real slabs "
                   "(default: params.yaml preprocess.out when it exists)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: params export.opset, 18)")
    p.add_argument("--fp16", action="store_true", default=None,
                   help="also write model_fp16.onnx (FP16 weights/activations, FP32 I/O) for GPUs")
    p.add_argument("--atol", type=float, help="max |ONNX - PyTorch| allowed on class probabilities "
                   "(default: params export.atol, 1e-3)")
    p.add_argument("--fp16-atol", type=float, default=5e-2, help="the same for the FP16 graph")
    p.add_argument("--tensorrt", choices=("auto", "on", "off"), default="auto",
                   help="build model.engine with TensorRT: auto = when tensorrt is installed")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto", help="auto: torch's default "
                   "(dynamo) exporter, falling back to the TorchScript one where it fails (the reason "
                   "is logged and recorded in the sidecar); dynamo or torchscript: only that one")
    add_params_arguments(p, "parameters file for the defaults above (export and preprocess sections; "
                         "default: params.yaml when present, else the built-in defaults)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    """Options given win, else params' export: section (its defaults: components/params.py);
    --data defaults to preprocess.out when that folder exists (else random slabs only)."""
    params = params_from_args(args)
    ex = params.export
    data_dir = args.data
    if data_dir is None and Path(params.preprocess.out).is_dir():
        data_dir = params.preprocess.out
    export(args.train, pick(args.out, ex.out), opset=pick(args.opset, ex.opset), fp16=pick(args.fp16, ex.fp16),
           atol=pick(args.atol, ex.atol), fp16_atol=args.fp16_atol, data_dir=data_dir,
           tensorrt=args.tensorrt, exporter=args.exporter, force=args.force)
    return 0
