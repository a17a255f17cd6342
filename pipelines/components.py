"""The pipeline steps as kfp components: one signature per step, two ways to run it.

Each function below declares a step's inputs and outputs (kfp's typed signature) and has a
one-line body that runs the step defined in ``pipelines/tasks.py``. From these signatures:

- ``make_components(image, "container")`` (what ``masksam pipeline compile`` uses) builds
  ``dsl.container_component``s: each runs ``masksam pipeline task STEP --NAME VALUE ...`` in the
  project image, the kfp idiom for a command-line tool; the compiled YAML holds a readable
  command line, not Python source.
- ``make_components(image, "lightweight")`` (what ``run-local`` uses: ``kfp.local`` runs only
  lightweight Python components) builds ``dsl.component``s whose body calls the same step.
  ``install_kfp_package=False`` and no ``packages_to_install``: nothing is pip-installed.

The Kubeflow Trainer launcher (``train_trainjob``) talks to the Kubernetes API from Python and
stays a lightweight component in both.
"""

import inspect
from dataclasses import dataclass
from typing import Callable

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output, OutputPath

from masksam.pipelines.tasks import CONTAINER_COMMAND


def resolve(params_json: str, overrides: str, data_repo_url: str, data_rev: str, data_path: str,
            train_steps: int, train_lr: float, model_variant: str,
            params: OutputPath(str), data_spec: OutputPath(str)):
    """Effective params (params_json, then the typed parameters set, then overrides) and what
    defines the data (DVC: repository, path and the commit the revision resolves to now;
    phantom: the data params). Uncached: it is what makes the later cache keys right."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("resolve", locals())


def data(data_spec: str, dataset: Output[Dataset]):
    """The raw dataset the spec names (a DVC dataset at a fixed commit, or the seeded phantom)."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("data", locals())


def validate_data(raw: Input[Dataset], report: Output[Markdown], dataset_sha256: OutputPath(str)):
    """Validate the raw dataset; the report is the case/label table."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("validate_data", locals())


def preprocess(raw: Input[Dataset], params: str, preprocessed: Output[Dataset], report: Output[Markdown]):
    """Resample, normalise and split the raw dataset."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("preprocess", locals())


def train(data: Input[Dataset], raw: Input[Dataset], params: str, checkpoint_root: str,
          model: Output[Model], metrics: Output[Metrics], report: Output[HTML]):
    """Train MaskSAM on one node; checkpoints under checkpoint_root survive a restart (--resume)."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("train", locals())


def export(model: Input[Model], data: Input[Dataset], params: str,
           onnx_model: Output[Model], metrics: Output[Metrics]):
    """Export to ONNX and check it against PyTorch."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("export", locals())


def evaluate(model: Input[Model], data: Input[Dataset], raw: Input[Dataset], params: str,
             evaluation: Output[Dataset], metrics: Output[Metrics], report: Output[HTML]):
    """Score the held-out test cases with the exported ONNX model (what register publishes)."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("evaluate", locals())


def register(model: Input[Model], onnx_model: Input[Model], evaluation: Input[Dataset], params: str,
             report: Output[Markdown], model_uri: OutputPath(str)):
    """Register the model in MLflow under its name and alias."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("register", locals())


def baseline(raw: Input[Dataset], data: Input[Dataset], params: str,
             evaluation: Output[Dataset], report: Output[Markdown]):
    """Train and evaluate nnU-Net v2 on the same split and test cases (runs beside train)."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("baseline", locals())


def compare(evaluation: Input[Dataset], baseline: Input[Dataset], params: str,
            comparison: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown]):
    """MaskSAM against the baseline on the same cases: paired differences, bootstrap CI, Wilcoxon."""
    from masksam.pipelines import tasks

    tasks.run_lightweight("compare", locals())


def train_trainjob(data: Input[Dataset], raw: Input[Dataset], params: str, image: str,
                   num_nodes: int, gpus_per_node: int, pvc_name: str, runtime: str,
                   mlflow_secret: str, mlflow_secret_keys: str,
                   model: Output[Model], metrics: Output[Metrics], report: Output[HTML]):
    """Train as a Kubeflow Trainer TrainJob (torchrun over N nodes x M GPUs) and wait for it."""
    from masksam.pipelines import steps, trainjob

    summary = trainjob.run_trainjob_step(
        data_dir=data.path, raw_dir=raw.path, model_dir=model.path, params_json=params, overrides="{}",
        image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node, pvc_name=pvc_name,
        runtime=runtime, mlflow_secret=mlflow_secret, mlflow_secret_keys=mlflow_secret_keys,
        report_path=report.path,
    )
    for name, value in steps.scalar_metrics(summary).items():
        metrics.log_metric(name, value)
    model.metadata.update({k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))})
    model.metadata["framework"] = "pytorch"


@dataclass(frozen=True)
class Components:
    """The components bound to one image."""

    resolve: Callable
    data: Callable
    validate_data: Callable
    preprocess: Callable
    train: Callable
    train_trainjob: Callable
    evaluate: Callable
    export: Callable
    register: Callable
    baseline: Callable
    compare: Callable


KINDS = ("container", "lightweight")


def component(func: Callable, image: str) -> Callable:
    """Wrap ``func`` as a lightweight component running in ``image`` with nothing pip-installed."""
    return dsl.component(func, base_image=image, install_kfp_package=False, packages_to_install=[])


def container_component(func: Callable, image: str) -> Callable:
    """``func``'s step as a container component: ``masksam pipeline task STEP --NAME VALUE ...``.

    Artifacts pass as their local paths, parameters as values, output parameters as the files
    to write; ``--executor-output`` is where the step reports artifact metadata and metrics.
    """
    sig = inspect.signature(func)

    def spec(*placeholders) -> dsl.ContainerSpec:
        args: list = []
        for name, value in zip(sig.parameters, placeholders):
            args += [f"--{name.replace('_', '-')}", getattr(value, "path", value)]
        args += ["--executor-output", dsl.PIPELINE_TASK_EXECUTOR_OUTPUT_PATH_PLACEHOLDER]
        return dsl.ContainerSpec(image=image, command=[*CONTAINER_COMMAND, func.__name__], args=args)

    spec.__signature__ = sig
    spec.__name__ = func.__name__
    spec.__qualname__ = func.__name__
    spec.__doc__ = func.__doc__
    return dsl.container_component(spec)


def make_components(image: str, kind: str = "container") -> Components:
    """Every step as a kfp component running in ``image``: container components (for a cluster)
    or lightweight ones (for kfp.local), built from the same signatures."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    funcs = {name: globals()[name] for name in Components.__dataclass_fields__}
    wrap = container_component if kind == "container" else component
    return Components(**{name: (component(f, image) if name == "train_trainjob" else wrap(f, image))
                         for name, f in funcs.items()})
