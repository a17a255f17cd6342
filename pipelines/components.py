"""The pipeline steps as kfp lightweight Python components running in the project image.

Each body only imports ``masksam.pipelines.steps`` (installed in the image) and calls one
function there, so the real work is ordinary, testable Python and the component is a wiring
of KFP artifacts. ``make_components(image)`` binds the functions to an image at compile time
with ``install_kfp_package=False`` and no ``packages_to_install``: kfp 2.17 then emits no
``pip install`` at all (kfp itself is a project dependency, so it is in the image already).
"""

from dataclasses import dataclass
from typing import Callable

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from masksam.pipelines._defaults import DEFAULT_IMAGE  # noqa: E402  (re-exported)


def data(params_json: str, overrides: str, repo_url: str, rev: str, path: str, dataset: Output[Dataset]):
    """The raw dataset: the user's DVC-tracked one at a git revision when repo_url is given
    (commit and hash recorded), else the generated phantom CT dataset (only when data.source
    says phantom: a real source without a repository is refused)."""
    from masksam.pipelines import steps

    if repo_url:
        meta = steps.import_data(dataset.path, repo_url, rev, path)
    else:
        meta = steps.phantom_data(dataset.path, params_json, overrides)
    dataset.metadata.update(meta)


def validate_data(raw: Input[Dataset], report: Output[Markdown]) -> str:
    """Validate the raw dataset; the report is the case/label table. Returns the dataset hash."""
    from masksam.pipelines import steps

    identity = steps.validate_data(raw.path, report.path)
    return identity["dataset_sha256"]


def preprocess(raw: Input[Dataset], params_json: str, overrides: str,
               preprocessed: Output[Dataset], report: Output[Markdown]):
    """Resample, normalise and split the raw dataset."""
    from masksam.pipelines import steps

    info = steps.preprocess(raw.path, preprocessed.path, params_json, overrides, report.path)
    preprocessed.metadata.update(info)
    preprocessed.metadata["dataset_sha256"] = raw.metadata.get("dataset_sha256")


def train(data: Input[Dataset], raw: Input[Dataset], params_json: str, overrides: str,
          model: Output[Model], metrics: Output[Metrics], report: Output[HTML]):
    """Train MaskSAM on one node (the GPU the task was given); log to MLflow."""
    from masksam.pipelines import steps

    summary = steps.train(data.path, raw.path, model.path, params_json, overrides, report.path)
    for name, value in steps.scalar_metrics(summary).items():
        metrics.log_metric(name, value)
    model.metadata.update({k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))})
    model.metadata["framework"] = "pytorch"


def train_trainjob(data: Input[Dataset], raw: Input[Dataset], params_json: str, overrides: str, image: str,
                   num_nodes: int, gpus_per_node: int, pvc_name: str, runtime: str,
                   mlflow_secret: str, mlflow_secret_keys: str,
                   model: Output[Model], metrics: Output[Metrics], report: Output[HTML]):
    """Train as a Kubeflow Trainer TrainJob (torchrun over N nodes x M GPUs) and wait for it."""
    from masksam.pipelines import steps, trainjob

    summary = trainjob.run_trainjob_step(
        data_dir=data.path, raw_dir=raw.path, model_dir=model.path, params_json=params_json, overrides=overrides,
        image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node, pvc_name=pvc_name,
        runtime=runtime, mlflow_secret=mlflow_secret, mlflow_secret_keys=mlflow_secret_keys,
        report_path=report.path,
    )
    for name, value in steps.scalar_metrics(summary).items():
        metrics.log_metric(name, value)
    model.metadata.update({k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))})
    model.metadata["framework"] = "pytorch"


def evaluate(model: Input[Model], data: Input[Dataset], raw: Input[Dataset], params_json: str, overrides: str,
             evaluation: Output[Dataset], metrics: Output[Metrics], report: Output[HTML]):
    """Predict and score the held-out test cases with the exported ONNX model (what register
    publishes): per-class Dice/HD95/NSD table and plots."""
    from masksam.pipelines import steps

    summary = steps.evaluate(model.path, data.path, raw.path, evaluation.path, params_json, overrides,
                             report.path)
    names = summary.get("labels", {})
    for label, values in summary.get("mean", {}).items():
        for metric, value in steps.scalar_metrics(values).items():
            metrics.log_metric(f"{metric}.{names.get(label, label)}", value)
    for metric, value in steps.scalar_metrics(summary.get("foreground_mean", {})).items():
        metrics.log_metric(f"{metric}.foreground_mean", value)


def export(model: Input[Model], data: Input[Dataset], params_json: str, overrides: str,
           onnx_model: Output[Model], metrics: Output[Metrics]):
    """Export to ONNX and check it against PyTorch."""
    from masksam.pipelines import steps

    summary = steps.export(model.path, data.path, onnx_model.path, params_json, overrides)
    for name, value in steps.scalar_metrics(summary.get("parity", summary)).items():
        metrics.log_metric(name, value)
    onnx_model.metadata["framework"] = "onnx"


def register(model: Input[Model], onnx_model: Input[Model], evaluation: Input[Dataset], params_json: str,
             overrides: str, report: Output[Markdown]) -> str:
    """Register the model in MLflow under its name and alias; returns the model URI."""
    from masksam.pipelines import steps

    info = steps.register(model.path, onnx_model.path, evaluation.path, params_json, overrides, report.path)
    return info["model_uri"]


@dataclass(frozen=True)
class Components:
    """The components bound to one image."""

    data: Callable
    validate_data: Callable
    preprocess: Callable
    train: Callable
    train_trainjob: Callable
    evaluate: Callable
    export: Callable
    register: Callable


def component(func: Callable, image: str) -> Callable:
    """Wrap ``func`` as a lightweight component running in ``image`` with nothing pip-installed."""
    return dsl.component(func, base_image=image, install_kfp_package=False, packages_to_install=[])


def make_components(image: str = DEFAULT_IMAGE) -> Components:
    """Every step as a kfp component running in ``image``."""
    funcs = {name: globals()[name] for name in Components.__dataclass_fields__}
    return Components(**{name: component(f, image) for name, f in funcs.items()})
