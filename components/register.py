"""``masksam register``: log the exported model as an MLflow pyfunc and register it.

The registered model is the ONNX graph plus its sidecar (no pickled torch model), served by
``components/_pyfunc.py`` as a model from code, with masksam's own source shipped in
``code_paths`` so loading needs neither a masksam install nor the training weights. Each version
carries lineage tags (git commit, DVC/data hashes, training run, evaluation metrics, test-set id,
ONNX and sidecar sha256) and ``manifest_sha256``: the hash of ``masksam_manifest.json``, which
lists the sha256 of every file of the logged model and is stored in the model's folder. The tag
lives in the registry, not in the artifact store, so ``masksam pull`` can tell any change of any
file (code included) from the registered model. The ``champion`` alias moves only when the new
version's mean foreground Dice beats the current champion's on the same test set; otherwise the
version becomes ``challenger``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from masksam.components._io import read_json
from masksam.components.params import add_params_arguments, params_from_args, pick
from masksam.components.data.manifest import test_set_digest
from masksam.components._loading import (EXPORT_MANIFEST, MLFLOW_DOWNLOAD_FILES, MODEL_MANIFEST, ONNX_NAME,
                                         sha256_file, sidecar_path, verify_export, verify_training_dir,
                                         write_manifest)
from masksam.errors import UserError

log = logging.getLogger(__name__)

# the subpackages the pyfunc imports at serving time: components/ only. The network (model/,
# PyTorch + segment-anything) is not needed to run the ONNX graph, and pipelines/ is not either.
SHIPPED_SUBPACKAGES = ("components",)
# what the pyfunc imports at serving time: the ONNX path is torch-free (Predictor.from_onnx, the
# numpy sliding window), so torch, torchvision and segment-anything are left out
SERVING_PACKAGES = ("onnxruntime", "SimpleITK", "numpy", "scipy", "pyyaml", "tqdm", "mlflow")


@dataclass
class Decision:
    version: str
    alias: str
    reason: str
    previous_champion: str | None


def stage_code(dst: Path) -> Path:
    """Assemble the importable ``masksam`` package under ``dst`` from the *imported* package:
    the top-level modules of ``masksam`` plus the subpackages the pyfunc imports at serving
    time (:data:`SHIPPED_SUBPACKAGES`), each found where importlib finds it. This works for the
    editable checkout (``masksam.model`` lives in ``model/``) and for an installed wheel
    (``site-packages/masksam/model``) alike."""
    import importlib.util

    import masksam

    pkg = dst / "masksam"
    pkg.mkdir(parents=True)
    for module in sorted(Path(masksam.__file__).parent.glob("*.py")):
        shutil.copy2(module, pkg / module.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for sub in SHIPPED_SUBPACKAGES:
        spec = importlib.util.find_spec(f"masksam.{sub}")  # finds it without importing it (torch)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise UserError(f"masksam.{sub}: not found in this installation ({masksam.__file__}); "
                            "reinstall masksam")
        shutil.copytree(locations[0], pkg / sub, ignore=ignore)
    return pkg


def pip_requirements() -> list[str]:
    """Pinned serving requirements from this environment's installed versions."""
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def example_volume(plan: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """A small CT-like volume (air around a water-density body) and its params, for the
    model's input example; it runs through the whole model when MLflow validates it."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 24), np.linspace(-1, 1, 24), indexing="ij")
    vol = np.where(x ** 2 / 0.7 + y ** 2 / 0.5 < 1, 40.0, -1000.0).astype(np.float32)
    vol[(x + 0.3) ** 2 + y ** 2 + z ** 2 < 0.15] = 120.0
    n_channels = len(plan.get("channel_names", {"0": ""}))
    if n_channels > 1:
        vol = np.stack([vol] * n_channels)
    spacing = [float(s) for s in plan.get("target_spacing_xyz", [1.0, 1.0, 1.0])]
    # the full geometry, as a caller must send it (the pyfunc refuses a call without it)
    return vol, {"spacing": spacing, "origin": [0.0, 0.0, 0.0],
                 "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}


def signature(plan: dict[str, Any]):
    """Tensor signature: float32 volume in, uint8 labels out; geometry and options as params.

    MLflow's ParamSpec has no "required" (a missing param gets its default), so the geometry
    params default to an empty list: valid for the schema, refused by name by the pyfunc. A
    default such as spacing [1, 1, 1] or an identity direction would give a plausible but wrong
    segmentation of any scan whose header differs."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    n_channels = len(plan.get("channel_names", {"0": ""}))
    shape = (-1, -1, -1) if n_channels == 1 else (n_channels, -1, -1, -1)
    return ModelSignature(
        # unnamed tensors: the pyfunc gets a plain ndarray, REST takes {"inputs": nested lists}
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        params=ParamSchema([
            ParamSpec("spacing", "double", [], (-1,)),
            ParamSpec("origin", "double", [], (-1,)),
            ParamSpec("direction", "double", [], (-1,)),
            ParamSpec("mirror", "boolean", False),
            ParamSpec("overlap", "double", 0.5),
            # file requests: the scan as a NIfTI/NRRD/MHA file (geometry inside), answered with
            # the label file and the summary; model_input is then ignored ([[[0]]] will do)
            ParamSpec("file_b64", "string", ""),
            ParamSpec("file_path", "string", ""),
            ParamSpec("file_format", "string", ""),
        ]),
    )


def test_set_id(evaluation: dict[str, Any]) -> str:
    """The content hash of the evaluated test set: ``test_set_id`` as ``masksam evaluate`` recorded
    it (sha256 over each case's image and reference files, :func:`test_set_digest`), or, for a
    summary written without one, the same hash over its reference files still on disk. Case
    names alone never identify a test set: a summary with neither is refused."""
    if evaluation.get("test_set_id"):
        return str(evaluation["test_set_id"])
    entries = evaluation.get("metric_per_case", [])
    if not entries:
        raise UserError("evaluation summary lists no cases (metric_per_case); run masksam evaluate")
    refs = {str(c["case"]): [c.get("reference_file", "")] for c in entries}
    if not all(ref and Path(ref).is_file() for files in refs.values() for ref in files):
        raise UserError("evaluation summary records no test_set_id and its reference files are not all "
                        "on disk, so the test set cannot be identified by content; rerun masksam evaluate")
    return test_set_digest(refs)


def check_scored_model(evaluation: dict[str, Any], onnx_sha256: str, eval_file: Path, export_dir: Path) -> None:
    """What is registered is what was evaluated: the summary's ``model_sha256`` (recorded by
    ``masksam evaluate``) must hold this export's ONNX file. A score of the PyTorch weights, of
    another export or of an ensemble does not vouch for this file."""
    scored = evaluation.get("model_sha256")
    if not isinstance(scored, dict) or scored.get(ONNX_NAME) != onnx_sha256:
        what = ("records no model_sha256 (written by an older masksam evaluate)" if not isinstance(scored, dict)
                else f"scored {evaluation.get('model', 'another model')}, not {export_dir / ONNX_NAME}")
        raise UserError(f"{eval_file}: {what}; the registered model must be the one evaluated. Run "
                        f"`masksam evaluate --model {export_dir} ...` and register with that summary")


def mean_dice(evaluation: dict[str, Any], path: Path) -> float:
    try:
        return float(evaluation["foreground_mean"]["Dice"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: no foreground_mean.Dice; it is not a masksam evaluate summary") from exc


def decide_alias(client, name: str, new_version: str, new_dice: float, new_test_set: str,
                 alias: str = "champion", min_dice: float = 0.0) -> Decision:
    """Move ``alias`` to the new version only if its mean Dice reaches ``min_dice`` and beats the
    current holder's on the same test set (same content hash); otherwise tag the new version
    ``challenger``. A model below the floor never becomes champion, even with no champion yet."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    previous = None if current is None else current.version
    if not new_dice >= min_dice:  # NaN fails too
        reason = (f"mean Dice {new_dice:.4f} is below the floor register.min_dice = {min_dice:g}; "
                  f"{alias} not moved")
    elif current is None or current.version == new_version:
        client.set_registered_model_alias(name, alias, new_version)
        return Decision(new_version, alias, f"no current {alias}; mean Dice {new_dice:.4f} >= floor "
                        f"{min_dice:g}", None)
    else:
        reason = _compare_with(current, alias, new_dice, new_test_set)
        if reason is None:
            client.set_registered_model_alias(name, alias, new_version)
            return Decision(new_version, alias, f"mean Dice {new_dice:.4f} > {alias} v{current.version}'s "
                            f"{float(current.tags['eval.mean_dice']):.4f} on the same test set", previous)
    client.set_registered_model_alias(name, "challenger", new_version)
    return Decision(new_version, "challenger", reason, previous)


def _compare_with(current, alias: str, new_dice: float, new_test_set: str) -> str | None:
    """None when the new version beats ``current`` on the same test set, else why not."""
    tags = current.tags or {}
    old_set, old_dice = tags.get("test_set_id"), tags.get("eval.mean_dice")
    if old_set != new_test_set or old_dice is None:
        return (f"not comparable: {alias} v{current.version} was evaluated on test set "
                f"{str(old_set)[:12]}, this version on {new_test_set[:12]}")
    if new_dice > float(old_dice):
        return None
    return f"mean Dice {new_dice:.4f} <= {alias} v{current.version}'s {float(old_dice):.4f} on the same test set"


def register(train_dir: str | os.PathLike, export_dir: str | os.PathLike, eval_file: str | os.PathLike, *,
             model_name: str = "masksam", alias: str = "champion", experiment: str = "masksam",
             tracking_uri: str | None = None, min_dice: float = 0.0) -> Decision:
    """Log ``export_dir``'s ONNX model as a pyfunc, register it and decide its alias (never
    ``alias`` below ``min_dice``, see :func:`decide_alias`)."""
    import mlflow
    from mlflow import MlflowClient

    from masksam.components import _tracking

    train_dir, export_dir, eval_file = Path(train_dir), Path(export_dir), Path(eval_file)
    onnx_path = export_dir / ONNX_NAME
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: not found; run masksam export first")
    meta, _ = verify_export(onnx_path)  # what is registered is what export wrote
    weights_sha = verify_training_dir(train_dir)["model.safetensors"]
    summary_path = train_dir / "train_summary.json"
    train_summary = read_json(summary_path, "training summary")
    exported_from = (meta.get("source") or {}).get("weights_sha256")
    if exported_from and weights_sha != exported_from:
        raise UserError(f"{onnx_path}: was exported from weights {exported_from[:12]}, but {summary_path} "
                        f"records {weights_sha[:12]}; re-export this training run before registering")
    evaluation = read_json(eval_file, "evaluation summary")
    check_scored_model(evaluation, meta["files"][ONNX_NAME], eval_file, export_dir)
    dice = mean_dice(evaluation, eval_file)
    test_set = test_set_id(evaluation)

    uri = _tracking.check_tracking(_tracking.tracking_uri(tracking_uri))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=_tracking.ensure_experiment(MlflowClient(), experiment))
    lineage = _tracking.lineage_tags(meta["plan"])
    version_tags = {
        **{k: v for k, v in lineage.items() if k == "git_commit" or k.startswith(("dvc.", "data."))},
        "train_run_id": str(train_summary.get("mlflow_run_id")),
        "train_weights_sha256": str(weights_sha),
        "onnx_sha256": meta["files"][ONNX_NAME],
        "sidecar_sha256": sha256_file(sidecar_path(onnx_path)),
        "test_set_id": test_set,
        "eval.mean_dice": f"{dice:.6f}",
        "eval.n_cases": str(evaluation.get("n_cases", "")),
        **{f"eval.{k.lower()}": f"{float(v):.6f}" for k, v in evaluation["foreground_mean"].items()
           if isinstance(v, (int, float)) and k != "Dice"},
    }
    # the export's manifest travels beside model.onnx, so every load checks the sidecar too
    artifacts = {"onnx": str(onnx_path), "sidecar": str(sidecar_path(onnx_path)),
                 "export_manifest": str(export_dir / EXPORT_MANIFEST)}
    data_file = export_dir / (ONNX_NAME + ".data")
    if data_file.is_file():
        artifacts["onnx_data"] = str(data_file)
    example = example_volume(meta["plan"])
    with tempfile.TemporaryDirectory(prefix="masksam-code-") as code_dir:
        code = stage_code(Path(code_dir))
        with _model_run(train_summary.get("mlflow_run_id"), lineage) as run:
            mlflow.log_metrics({"test_mean_dice": dice})
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("_pyfunc_entry.py")),
                artifacts=artifacts, code_paths=[str(code)], signature=signature(meta["plan"]),
                input_example=example, pip_requirements=pip_requirements(),
            )
            manifest_sha, n_files = record_manifest(info.model_id, info.model_uri)
    # registered only now, with its manifest hash: no version exists without its record
    version_tags.update(manifest_sha256=manifest_sha, register_run_id=run.info.run_id)
    registered = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
    new_version = str(registered.version)
    describe(MlflowClient(), model_name, new_version, model_card(meta["plan"], evaluation, version_tags, run.info.run_id))
    decision = decide_alias(MlflowClient(), model_name, new_version, dice, test_set, alias, min_dice)
    log.info("registered %s version %s (run %s; manifest of %d files, sha256 %s)", model_name,
             new_version, run.info.run_id, n_files, manifest_sha)
    return decision


@contextlib.contextmanager
def _model_run(train_run_id: str | None, lineage: dict[str, str]) -> Iterator[Any]:
    """The run the model is logged from: the training run that made it, reopened, so the UI shows
    the model (and its registered versions) on that run; a separate ``register`` run only when
    the training run is not in this tracking store (trained with --no-mlflow, or elsewhere)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from masksam.components._tracking import run_context_tags

    if train_run_id and train_run_id != "None":
        try:
            MlflowClient().get_run(train_run_id)
        except MlflowException:
            log.warning("training run %s is not in %s; logging the model from a register run instead",
                        train_run_id, mlflow.get_tracking_uri())
        else:
            with mlflow.start_run(run_id=train_run_id) as run:
                yield run
            return
    tags = run_context_tags("masksam register", {**lineage, "step": "register"})
    with mlflow.start_run(run_name="register", tags=tags) as run:
        yield run


def model_card(plan: dict[str, Any], evaluation: dict[str, Any], tags: dict[str, str], run_id: str) -> str:
    """The version's description (Markdown, MLflow renders it): data, test metrics, lineage,
    intended use and limits, so a reader of the registry knows what the version is for."""
    labels = {int(v): k for k, v in (plan.get("labels") or {}).items() if int(v) != 0}
    names = evaluation.get("labels") or {}
    rows = ["| structure | Dice | HD95 (mm) | NSD |", "|---|---|---|---|"]
    for key, values in sorted((evaluation.get("mean") or {}).items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {names.get(key, labels.get(int(key), key))} | " + " | ".join(
            _fmt(values.get(m)) for m in ("Dice", "HD95", "NSD")) + " |")
    fm = evaluation.get("foreground_mean") or {}
    channels = ", ".join(str(v) for v in (plan.get("channel_names") or {}).values()) or "unknown"
    spacing = plan.get("target_spacing_xyz")
    return "\n".join([
        "## MaskSAM segmentation model",
        "",
        f"Segments {', '.join(labels.values()) or 'the labels of its dataset'} in {channels} scans.",
        "",
        "**Data.** Trained on the dataset with content hash "
        f"`{tags.get('data.dataset_sha256', 'unknown')[:16]}`; preprocessing resamples to "
        f"{spacing} mm (x, y, z).",
        "",
        f"**Test metrics** ({evaluation.get('n_cases', '?')} held-out cases, test set "
        f"`{tags.get('test_set_id', '')[:16]}`): mean Dice {_fmt(fm.get('Dice'))}, HD95 "
        f"{_fmt(fm.get('HD95'))} mm, NSD {_fmt(fm.get('NSD'))}.",
        "",
        *((rows + [""]) if len(rows) > 2 else []),  # no per-class means recorded: no empty table
        f"**Lineage.** Training run `{tags.get('train_run_id')}`, logged from run `{run_id}`, git "
        f"`{tags.get('git_commit', 'unknown')[:12]}`, ONNX sha256 `{tags.get('onnx_sha256', '')[:16]}`.",
        "",
        "**Intended use.** Research: volumetric organ segmentation of scans like the training data. "
        "Not a medical device; not for diagnosis or treatment decisions.",
        "",
        "**Limits.** Send the scan's spacing, origin and direction with every request (the model "
        "refuses a call without them). Scans of another modality, field of view or anatomy than the "
        "training data, and structures absent from its labels, give unreliable results; check the "
        "per-structure volumes and confidences in the prediction summary.",
    ])


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "n/a"


def describe(client, name: str, version: str, card: str) -> None:
    """Set the version's model card and, when the registered model has none, its description."""
    client.update_model_version(name, version, description=card)
    model = client.get_registered_model(name)
    if not model.description:
        client.update_registered_model(name, description=(
            "MaskSAM: prompt-free SAM for 3D medical image segmentation, exported to ONNX and served as an "
            "MLflow pyfunc (raw intensities + scan geometry in, label map out). Each version's description "
            "is its model card; `champion` is the best version on the shared test set above the Dice floor."))


def record_manifest(model_id: str, model_uri: str) -> tuple[str, int]:
    """Hash every file of the logged model as the artifact store holds it (ONNX, external data,
    sidecar, export manifest, shipped code, MLmodel, environment files) into
    ``masksam_manifest.json``, upload it into the model's folder, and return its sha256 (for
    the ``manifest_sha256`` version tag: the record in the registry that ``pull`` checks) and
    the number of files it lists."""
    import mlflow
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="masksam-manifest-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(Path(tmp) / "m")))
        files = write_manifest(local, MODEL_MANIFEST, exclude=MLFLOW_DOWNLOAD_FILES)
        MlflowClient().log_model_artifact(model_id, str(local / MODEL_MANIFEST))
        return sha256_file(local / MODEL_MANIFEST), len(files)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "register", help="log the exported model as an MLflow pyfunc, register it, set its alias",
        description="Register the ONNX model of `masksam export` as an MLflow pyfunc (preprocessing "
        "and restoring inside; no torch pickle) with lineage tags. The champion alias moves only "
        "when the new version beats the current champion's mean Dice on the same test set; else "
        "the version gets the challenger alias. The tracking server is MLFLOW_TRACKING_URI "
        "(default sqlite:///mlflow.db).")
    p.add_argument("--train", required=True, help="training directory of the training run")
    p.add_argument("--export", required=True, help="directory written by masksam export")
    p.add_argument("--eval", required=True, help="evaluation summary JSON written by masksam evaluate")
    p.add_argument("--result", help="also write the decision (version, alias it got, models:/NAME/VERSION, "
                   "reason) to this JSON file, for the pipeline's next step")
    p.add_argument("--model-name", help="registered model name (default: params register.model_name)")
    p.add_argument("--alias", help="alias of the best version (default: params register.alias, champion)")
    p.add_argument("--experiment", help="MLflow experiment (default: params train.experiment)")
    p.add_argument("--min-dice", type=float, metavar="D", help="Dice floor: a version whose mean Dice "
                   "is below it never gets --alias (default: params register.min_dice, 0.5)")
    add_params_arguments(p, "parameters file for the defaults above (default: params.yaml when present, "
                         "else the built-in defaults)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    reg = params.register
    decision = register(args.train, args.export, args.eval, model_name=pick(args.model_name, reg.model_name),
                        alias=pick(args.alias, reg.alias), experiment=pick(args.experiment, params.train.experiment),
                        min_dice=pick(args.min_dice, reg.min_dice))
    print(f"masksam register: version {decision.version} -> @{decision.alias} ({decision.reason})")
    from masksam.components._tracking import tracking_uri, ui_hint

    name = pick(args.model_name, reg.model_name)
    print(f"model card and lineage: {ui_hint(tracking_uri(), f'models/{name}/versions/{decision.version}')}")
    if args.result:
        from masksam.components._io import write_json

        write_json(args.result, {"model_name": name, "version": decision.version, "alias": decision.alias,
                                 "model_uri": f"models:/{name}/{decision.version}", "reason": decision.reason,
                                 "previous_champion": decision.previous_champion})
    return 0
