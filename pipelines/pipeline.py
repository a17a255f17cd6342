"""The MaskSAM Kubeflow pipeline: data -> validate -> preprocess -> train -> export -> evaluate
-> register, each step a `masksam` verb in the project image. Evaluate scores the exported ONNX
model, the one register publishes.

``build_pipeline`` returns the pipeline function for one image / secret / training mode (the
image and the secret are fixed at compile time, as KFP requires); ``compile_pipeline`` writes
the IR YAML. Resources: training asks for ``accelerator_count`` x ``accelerator_type`` (both
pipeline parameters); every other step has CPU and memory limits. The data steps retry
(network, object store). Caching is on except where a rerun must do the work again: fetching
the data (a git branch moves) and registering a model.
"""

# (no `from __future__ import annotations`: kfp reads the pipeline signature at runtime)

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kfp import dsl  # noqa: I001  (dsl before compiler: kfp 2.17's import order)
from kfp import compiler, kubernetes

from masksam.pipelines.components import DEFAULT_IMAGE, Components, make_components

PIPELINE_NAME = "masksam"
from masksam.pipelines._defaults import DEFAULT_SECRET_KEYS  # noqa: E402
# CPU / memory limits of the CPU steps (Kubernetes quantities).
CPU_RESOURCES = {
    "data": ("2", "8Gi"),
    "validate-data": ("2", "8Gi"),
    "preprocess": ("4", "32Gi"),
    "evaluate": ("4", "32Gi"),
    "export": ("4", "16Gi"),
    "register": ("1", "4Gi"),
    "train-trainjob": ("1", "2Gi"),
}
TRAIN_RESOURCES = ("8", "64Gi")
DATA_RETRIES = 3
TRAINJOB_MOUNT = "/mnt/masksam"


@dataclass(frozen=True)
class TrainJobOptions:
    """Training as a Kubeflow Trainer TrainJob: the shared volume and the runtime to use."""

    pvc_name: str
    runtime: str = "torch-distributed"


def default_params_text(path: str | os.PathLike = "params.yaml") -> str:
    """params.yaml as one line of JSON: the ``params_json`` default compiled into the pipeline.

    Checked with the loader every verb uses, so a bad file fails at compile time, not in a
    task. One line because kfp copies parameter defaults into the YAML header comment, where a
    multi-line string would end the comment and corrupt the file.
    """
    from masksam.components.params import load_params, read_params_file

    load_params(path)
    return json.dumps(read_params_file(path), separators=(",", ":"))


def _limits(task: dsl.PipelineTask, name: str) -> None:
    cpu, memory = CPU_RESOURCES[name]
    task.set_cpu_limit(cpu).set_memory_limit(memory)


@dataclass(frozen=True)
class _Dag:
    """The steps of one compiled pipeline: its components and how MLflow reaches them."""

    c: Components
    mlflow_secret: str | None
    mlflow_secret_keys: tuple[str, ...]

    def with_mlflow(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """Expose the MLflow secret's keys as environment variables of ``task`` (if a secret is set)."""
        if self.mlflow_secret:
            kubernetes.use_secret_as_env(task, secret_name=self.mlflow_secret,
                                         secret_key_to_env={k: k for k in self.mlflow_secret_keys})
        return task

    def data_steps(self, params_json, overrides, data_repo_url, data_rev, data_path):
        """data -> validate -> preprocess; returns (raw dataset, preprocessed dataset)."""
        # One task for both sources: kfp.local (2.17) cannot resolve dsl.OneOf of If/Else
        # branches. No caching: a git branch moves, and the manifest hash in the metadata
        # says what was fetched; validate and preprocess then cache on the dataset's content.
        data = self.c.data(params_json=params_json, overrides=overrides, repo_url=data_repo_url,
                           rev=data_rev, path=data_path)
        data.set_retry(DATA_RETRIES, backoff_duration="30s").set_caching_options(False)
        _limits(data, "data")
        raw = data.outputs["dataset"]

        validate = self.c.validate_data(raw=raw)
        validate.set_retry(DATA_RETRIES, backoff_duration="30s").set_caching_options(True)
        _limits(validate, "validate-data")

        prep = self.c.preprocess(raw=raw, params_json=params_json, overrides=overrides).after(validate)
        prep.set_caching_options(True)
        _limits(prep, "preprocess")
        return raw, prep.outputs["preprocessed"]

    def model_steps(self, trained, preprocessed, raw, params_json, overrides) -> None:
        """export -> evaluate (the exported ONNX model: what is registered is what is scored)
        -> register."""
        model = trained.outputs["model"]
        ex = self.c.export(model=model, data=preprocessed, params_json=params_json, overrides=overrides)
        self.with_mlflow(ex).set_caching_options(True)
        _limits(ex, "export")

        ev = self.c.evaluate(model=ex.outputs["onnx_model"], data=preprocessed, raw=raw,
                             params_json=params_json, overrides=overrides)
        self.with_mlflow(ev).set_caching_options(True)
        _limits(ev, "evaluate")

        reg = self.c.register(model=model, onnx_model=ex.outputs["onnx_model"],
                              evaluation=ev.outputs["evaluation"], params_json=params_json, overrides=overrides)
        self.with_mlflow(reg).set_caching_options(False)
        _limits(reg, "register")

    def run(self, params_json, overrides, data_repo_url, data_rev, data_path, make_train) -> None:
        """The whole DAG; ``make_train(preprocessed, raw)`` adds the training task."""
        raw, preprocessed = self.data_steps(params_json, overrides, data_repo_url, data_rev, data_path)
        trained = self.with_mlflow(make_train(preprocessed, raw))
        trained.set_caching_options(True)
        self.model_steps(trained, preprocessed, raw, params_json, overrides)


def build_pipeline(
    image: str = DEFAULT_IMAGE,
    params_text: str | None = None,
    mlflow_secret: str | None = None,
    mlflow_secret_keys: Sequence[str] = DEFAULT_SECRET_KEYS,
    trainjob: TrainJobOptions | None = None,
) -> Callable:
    """The pipeline function (decorated with ``dsl.pipeline``) for these compile-time choices.

    ``params_text`` is the params.yaml the run uses unless the ``params_json`` parameter is
    given; ``overrides`` (JSON of ``section.key: value``) adjusts it per run, in every step.
    ``mlflow_secret`` names a Kubernetes Secret whose keys become the MLflow environment of the
    steps that talk to MLflow; without it they inherit the tracking URI from the environment.
    """
    dag = _Dag(make_components(image), mlflow_secret, tuple(mlflow_secret_keys))
    params_default = params_text if params_text is not None else default_params_text()
    if trainjob is None:
        return _single_node_pipeline(dag, params_default)
    return _trainjob_pipeline(dag, params_default, image, trainjob)


def _single_node_pipeline(dag: _Dag, params_default: str) -> Callable:
    """Training as one task asking for ``accelerator_count`` accelerators."""

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def masksam_pipeline(
        params_json: str = params_default,
        overrides: str = "{}",
        data_repo_url: str = "",
        data_rev: str = "",
        data_path: str = "data/raw",
        accelerator_type: str = "nvidia.com/gpu",
        accelerator_count: int = 1,
    ):
        def make_train(data, raw):
            task = dag.c.train(data=data, raw=raw, params_json=params_json, overrides=overrides)
            task.set_cpu_limit(TRAIN_RESOURCES[0]).set_memory_limit(TRAIN_RESOURCES[1])
            task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
            return task

        dag.run(params_json, overrides, data_repo_url, data_rev, data_path, make_train)

    return masksam_pipeline


def _trainjob_pipeline(dag: _Dag, params_default: str, image: str, trainjob: TrainJobOptions) -> Callable:
    """Training as a Kubeflow Trainer TrainJob over ``num_nodes`` x ``gpus_per_node``."""

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0] + " (training as a TrainJob)")
    def masksam_trainjob_pipeline(
        params_json: str = params_default,
        overrides: str = "{}",
        data_repo_url: str = "",
        data_rev: str = "",
        data_path: str = "data/raw",
        num_nodes: int = 1,
        gpus_per_node: int = 1,
    ):
        def make_train(data, raw):
            task = dag.c.train_trainjob(
                data=data, raw=raw, params_json=params_json, overrides=overrides, image=image,
                num_nodes=num_nodes, gpus_per_node=gpus_per_node, pvc_name=trainjob.pvc_name,
                runtime=trainjob.runtime, mlflow_secret=dag.mlflow_secret or "",
                mlflow_secret_keys=",".join(dag.mlflow_secret_keys),
            )
            _limits(task, "train-trainjob")
            kubernetes.mount_pvc(task, pvc_name=trainjob.pvc_name, mount_path=TRAINJOB_MOUNT)
            return task

        dag.run(params_json, overrides, data_repo_url, data_rev, data_path, make_train)

    return masksam_trainjob_pipeline


def compile_pipeline(
    out: str | os.PathLike = "pipeline.yaml",
    image: str = DEFAULT_IMAGE,
    params_path: str | os.PathLike = "params.yaml",
    mlflow_secret: str | None = None,
    mlflow_secret_keys: Sequence[str] = DEFAULT_SECRET_KEYS,
    trainjob: TrainJobOptions | None = None,
) -> Path:
    """Compile the pipeline to KFP IR YAML at ``out`` (written atomically)."""
    from masksam.components._io import atomic_path

    func = build_pipeline(image=image, params_text=default_params_text(params_path),
                          mlflow_secret=mlflow_secret, mlflow_secret_keys=mlflow_secret_keys,
                          trainjob=trainjob)
    out = Path(out)
    with atomic_path(out, kind="file") as tmp:  # a folder there is refused, not replaced
        compiler.Compiler().compile(func, package_path=str(tmp))  # tmp keeps the .yaml suffix
    return out
