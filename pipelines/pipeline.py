"""The MaskSAM Kubeflow pipeline: resolve -> data -> validate -> preprocess -> train -> export
-> evaluate -> register, each step a `masksam` verb in the project image. Evaluate scores the
exported ONNX model, the one register publishes.

``build_pipeline`` returns the pipeline function for one set of compile-time choices (image,
MLflow secret, training mode, accelerators, checkpoint volume); ``compile_pipeline`` writes the
IR YAML. On a cluster every step is a container component; ``run-local`` builds the same DAG
from lightweight components for kfp.local.

Caching: ``resolve`` (uncached, cheap) turns the parameters into the run's effective params and
a data spec (DVC: the commit the revision resolves to now; phantom: the data params); every
later step is cached on those, so a rerun with unchanged inputs reuses every step up to
register, and a moved branch or changed data params recomputes from the data step on.
Registration is never cached. Resources: CPU and memory requests and limits on every step;
train asks for ``accelerator_count`` x ``accelerator_type`` (pipeline parameters), evaluate and
export for accelerators when compiled with them; train mounts a memory-backed ``/dev/shm`` for
data-loader workers and writes its checkpoints on a persistent volume so a restarted pod
resumes. The data steps retry (network, object store).
"""

# (no `from __future__ import annotations`: kfp reads the pipeline signature at runtime)

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kfp import dsl  # noqa: I001  (dsl before compiler: kfp 2.17's import order)
from kfp import compiler, kubernetes

from masksam.pipelines._defaults import DEFAULT_SECRET_KEYS, resolve_image
from masksam.pipelines.components import Components, make_components

PIPELINE_NAME = "masksam"
# (cpu request, cpu limit, memory request, memory limit) per task, Kubernetes quantities.
RESOURCES = {
    "resolve": ("500m", "1", "1Gi", "2Gi"),
    "data": ("1", "2", "4Gi", "8Gi"),
    "validate-data": ("1", "2", "4Gi", "8Gi"),
    "preprocess": ("2", "4", "16Gi", "32Gi"),
    "train": ("4", "8", "32Gi", "64Gi"),
    "export": ("2", "4", "8Gi", "16Gi"),
    "evaluate": ("2", "4", "16Gi", "32Gi"),
    "register": ("500m", "1", "2Gi", "4Gi"),
    "baseline": ("4", "8", "32Gi", "64Gi"),
    "compare": ("500m", "1", "1Gi", "2Gi"),
    "train-trainjob": ("500m", "1", "1Gi", "2Gi"),
}
DATA_RETRIES = 3
TRAINJOB_MOUNT = "/mnt/masksam"
CHECKPOINT_MOUNT = "/mnt/masksam-checkpoints"
SHM_SIZE = "16Gi"   # /dev/shm of the train pod: data-loader workers pass batches through it
ACCELERATED_STEPS = ("train", "evaluate", "export")


@dataclass(frozen=True)
class TrainJobOptions:
    """Training as a Kubeflow Trainer TrainJob: the shared volume and the runtime to use."""

    pvc_name: str
    runtime: str = "torch-distributed"


@dataclass(frozen=True)
class AcceleratorOptions:
    """Accelerators per step: ``counts`` of ``kind`` for train, evaluate, export (0 = none).

    Train's count is the default of the ``accelerator_count`` pipeline parameter (a runtime
    value: kfp 2.17 accepts a pipeline parameter as accelerator limit); evaluate's and export's
    are fixed at compile time. ``kind`` is the default of ``accelerator_type``.
    """

    kind: str = "nvidia.com/gpu"
    counts: dict = field(default_factory=lambda: {"train": 1, "evaluate": 0, "export": 0})

    def count(self, step: str) -> int:
        return int(self.counts.get(step, 0))


@dataclass(frozen=True)
class CheckpointOptions:
    """Where train keeps its checkpoints on a cluster: an existing PersistentVolumeClaim
    (``pvc_name``) or, without one, a claim the run creates (``size``, ``storage_class``) and
    deletes after a successful registration (a failed run keeps it, so a retry resumes)."""

    pvc_name: str | None = None
    size: str = "20Gi"
    storage_class: str | None = None
    mount_path: str = CHECKPOINT_MOUNT


def default_params_text(path: str | os.PathLike = "params.yaml") -> str:
    """params.yaml as one line of JSON: the ``params_json`` default compiled into the pipeline.

    Checked with the loader every verb uses, so a bad file fails at compile time, not in a
    task. One line because kfp copies parameter defaults into the YAML header comment, where a
    multi-line string would end the comment and corrupt the file.
    """
    from masksam.components.params import load_params, read_params_file

    load_params(path)
    return json.dumps(read_params_file(path), separators=(",", ":"))


def _compares(params_text: str) -> bool:
    """Whether the compiled params name a baseline (``compare.baselines``): the comparison steps
    are part of the compiled DAG (like the image and the training mode), not a runtime branch."""
    from masksam.components.params import params_from_dict

    return params_from_dict(json.loads(params_text), "compiled params").compare.enabled


def _resources(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """CPU and memory requests (what the scheduler reserves) and limits of ``task``."""
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[name]
    return task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)


@dataclass
class _Dag:
    """The steps of one compiled pipeline: its components, MLflow access, accelerators and
    where training keeps its checkpoints (``local_checkpoints``: a folder, for run-local)."""

    c: Components
    mlflow_secret: str | None
    mlflow_secret_keys: tuple[str, ...]
    accelerators: AcceleratorOptions = AcceleratorOptions()
    checkpoints: CheckpointOptions = CheckpointOptions()
    local_checkpoints: str | None = None
    compare: bool = False                              # compiled params name a baseline
    created_pvcs: list = field(default_factory=list)   # CreatePVC tasks of this run

    def with_mlflow(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """Expose the MLflow secret's keys as environment variables of ``task`` (if a secret is set)."""
        if self.mlflow_secret:
            kubernetes.use_secret_as_env(task, secret_name=self.mlflow_secret,
                                         secret_key_to_env={k: k for k in self.mlflow_secret_keys})
        return task

    def accelerate(self, task: dsl.PipelineTask, step: str, accelerator_type) -> dsl.PipelineTask:
        """Ask for the compile-time number of accelerators for evaluate / export (none when 0)."""
        if self.accelerators.count(step):
            task.set_accelerator_type(accelerator_type).set_accelerator_limit(self.accelerators.count(step))
        return task

    def retry(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """Retry a step that reaches the network (not locally, where kfp.local sleeps the backoff)."""
        if self.local_checkpoints is None:
            task.set_retry(DATA_RETRIES, backoff_duration="30s")
        return task

    def data_steps(self, resolved):
        """data -> validate -> preprocess; returns (raw dataset, preprocessed dataset).

        The data step is cached on the data spec alone (see the module docstring); one task for
        both sources, because kfp.local (2.17) cannot resolve dsl.OneOf of If/Else branches.
        """
        data = self.c.data(data_spec=resolved.outputs["data_spec"])
        self.retry(data).set_caching_options(True)
        _resources(data, "data")
        raw = data.outputs["dataset"]

        validate = self.c.validate_data(raw=raw)
        self.retry(validate).set_caching_options(True)
        _resources(validate, "validate-data")

        prep = self.c.preprocess(raw=raw, params=resolved.outputs["params"]).after(validate)
        prep.set_caching_options(True)
        _resources(prep, "preprocess")
        return raw, prep.outputs["preprocessed"]

    def model_steps(self, trained, preprocessed, raw, params, accelerator_type):
        """export -> evaluate (the exported ONNX model: what is registered is what is scored)
        -> register; returns the register task."""
        model = trained.outputs["model"]
        ex = self.c.export(model=model, data=preprocessed, params=params)
        self.with_mlflow(ex).set_caching_options(True)
        self.accelerate(_resources(ex, "export"), "export", accelerator_type)

        ev = self.c.evaluate(model=ex.outputs["onnx_model"], data=preprocessed, raw=raw, params=params)
        self.with_mlflow(ev).set_caching_options(True)
        self.accelerate(_resources(ev, "evaluate"), "evaluate", accelerator_type)

        reg = self.c.register(model=model, onnx_model=ex.outputs["onnx_model"],
                              evaluation=ev.outputs["evaluation"], params=params)
        self.with_mlflow(reg).set_caching_options(False)
        _resources(reg, "register")
        return reg, ev

    def comparison_steps(self, evaluated, preprocessed, raw, params, accelerator_type) -> None:
        """nnU-Net v2 on the same split, in parallel with MaskSAM's training (it needs only the
        preprocessed split), then the paired comparison once MaskSAM's evaluation is in."""
        base = self.c.baseline(raw=raw, data=preprocessed, params=params)
        self.with_mlflow(base).set_caching_options(True)
        self.accelerate(_resources(base, "baseline"), "train", accelerator_type)  # train's accelerators
        cmp = self.c.compare(evaluation=evaluated.outputs["evaluation"], baseline=base.outputs["evaluation"],
                             params=params)
        self.with_mlflow(cmp).set_caching_options(True)
        _resources(cmp, "compare")

    def run(self, inputs: dict, make_train, accelerator_type) -> None:
        """The whole DAG; ``make_train(preprocessed, raw, params)`` adds the training task; the
        claims the run created are deleted once register succeeded."""
        resolved = self.c.resolve(**inputs)
        self.retry(resolved).set_caching_options(False)
        _resources(resolved, "resolve")
        params = resolved.outputs["params"]
        raw, preprocessed = self.data_steps(resolved)
        trained = self.with_mlflow(make_train(preprocessed, raw, params))
        trained.set_caching_options(True)
        reg, evaluated = self.model_steps(trained, preprocessed, raw, params, accelerator_type)
        if self.compare:
            self.comparison_steps(evaluated, preprocessed, raw, params, accelerator_type)
        for pvc in self.created_pvcs:
            kubernetes.DeletePVC(pvc_name=pvc.outputs["name"]).after(reg).set_caching_options(False)

    def train_task(self, data, raw, params, accelerator_type, accelerator_count) -> dsl.PipelineTask:
        """Training in one pod: accelerators, /dev/shm in memory, checkpoints on a volume."""
        root = self.local_checkpoints or self.checkpoints.mount_path
        task = self.c.train(data=data, raw=raw, params=params, checkpoint_root=root)
        _resources(task, "train")
        task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
        if self.local_checkpoints is None:
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=SHM_SIZE)
            self.mount_checkpoints(task)
        return task

    def mount_checkpoints(self, task: dsl.PipelineTask) -> None:
        """Mount the checkpoint claim on ``task``: the named one, or one this run creates."""
        opts = self.checkpoints
        if opts.pvc_name:
            kubernetes.mount_pvc(task, pvc_name=opts.pvc_name, mount_path=opts.mount_path)
            return
        # no storage_class_name: the cluster's default StorageClass provisions the volume
        extra = {"storage_class_name": opts.storage_class} if opts.storage_class else {}
        pvc = kubernetes.CreatePVC(pvc_name_suffix="-masksam-checkpoints", access_modes=["ReadWriteOnce"],
                                   size=opts.size, **extra)
        pvc.set_caching_options(False)
        kubernetes.mount_pvc(task, pvc_name=pvc.outputs["name"], mount_path=opts.mount_path)
        self.created_pvcs.append(pvc)


def _typed_inputs(params_json, overrides, data_repo_url, data_rev, data_path, train_steps, train_lr,
                  model_variant) -> dict:
    return dict(params_json=params_json, overrides=overrides, data_repo_url=data_repo_url, data_rev=data_rev,
                data_path=data_path, train_steps=train_steps, train_lr=train_lr, model_variant=model_variant)


def build_pipeline(
    image: str | None = None,
    params_text: str | None = None,
    mlflow_secret: str | None = None,
    mlflow_secret_keys: Sequence[str] = DEFAULT_SECRET_KEYS,
    trainjob: TrainJobOptions | None = None,
    accelerators: AcceleratorOptions | None = None,
    checkpoints: CheckpointOptions | None = None,
    local_checkpoints: str | None = None,
) -> Callable:
    """The pipeline function (decorated with ``dsl.pipeline``) for these compile-time choices.

    ``image``: the project image (required; ``MASKSAM_IMAGE`` is the fallback). ``params_text``
    is the params.yaml the run uses unless the ``params_json`` parameter is given; the typed
    parameters (``train_steps``, ``train_lr``, ``model_variant``; 0 or empty = params' value)
    and then ``overrides`` (JSON of ``section.key: value``) adjust it per run. ``mlflow_secret``
    names a Kubernetes Secret whose keys become the MLflow environment of the steps that talk
    to MLflow. ``local_checkpoints``: build for kfp.local (lightweight components, checkpoints
    in that folder, no volumes).
    """
    kind = "lightweight" if local_checkpoints else "container"
    image = image if local_checkpoints else resolve_image(image)
    dag = _Dag(make_components(image, kind), mlflow_secret, tuple(mlflow_secret_keys),
               accelerators or AcceleratorOptions(), checkpoints or CheckpointOptions(), local_checkpoints)
    params_default = params_text if params_text is not None else default_params_text()
    dag.compare = _compares(params_default)
    if trainjob is None:
        return _single_node_pipeline(dag, params_default)
    return _trainjob_pipeline(dag, params_default, image, trainjob)


def _single_node_pipeline(dag: _Dag, params_default: str) -> Callable:
    """Training as one task asking for ``accelerator_count`` accelerators."""
    acc = dag.accelerators

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def masksam_pipeline(
        params_json: str = params_default,
        overrides: str = "{}",
        data_repo_url: str = "",
        data_rev: str = "",
        data_path: str = "data/raw",
        train_steps: int = 0,
        train_lr: float = 0.0,
        model_variant: str = "",
        accelerator_type: str = acc.kind,
        accelerator_count: int = acc.count("train"),
    ):
        def make_train(data, raw, params):
            return dag.train_task(data, raw, params, accelerator_type, accelerator_count)

        inputs = _typed_inputs(params_json, overrides, data_repo_url, data_rev, data_path, train_steps,
                               train_lr, model_variant)
        dag.run(inputs, make_train, accelerator_type)

    return masksam_pipeline


def _trainjob_pipeline(dag: _Dag, params_default: str, image: str, trainjob: TrainJobOptions) -> Callable:
    """Training as a Kubeflow Trainer TrainJob over ``num_nodes`` x ``gpus_per_node``."""
    acc = dag.accelerators

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0] + " (training as a TrainJob)")
    def masksam_trainjob_pipeline(
        params_json: str = params_default,
        overrides: str = "{}",
        data_repo_url: str = "",
        data_rev: str = "",
        data_path: str = "data/raw",
        train_steps: int = 0,
        train_lr: float = 0.0,
        model_variant: str = "",
        accelerator_type: str = acc.kind,
        num_nodes: int = 1,
        gpus_per_node: int = 1,
    ):
        def make_train(data, raw, params):
            task = dag.c.train_trainjob(
                data=data, raw=raw, params=params, image=image,
                num_nodes=num_nodes, gpus_per_node=gpus_per_node, pvc_name=trainjob.pvc_name,
                runtime=trainjob.runtime, mlflow_secret=dag.mlflow_secret or "",
                mlflow_secret_keys=",".join(dag.mlflow_secret_keys),
            )
            _resources(task, "train-trainjob")
            kubernetes.mount_pvc(task, pvc_name=trainjob.pvc_name, mount_path=TRAINJOB_MOUNT)
            return task

        inputs = _typed_inputs(params_json, overrides, data_repo_url, data_rev, data_path, train_steps,
                               train_lr, model_variant)
        dag.run(inputs, make_train, accelerator_type)

    return masksam_trainjob_pipeline


def compile_pipeline(
    out: str | os.PathLike = "pipeline.yaml",
    image: str | None = None,
    params_path: str | os.PathLike = "params.yaml",
    mlflow_secret: str | None = None,
    mlflow_secret_keys: Sequence[str] = DEFAULT_SECRET_KEYS,
    trainjob: TrainJobOptions | None = None,
    accelerators: AcceleratorOptions | None = None,
    checkpoints: CheckpointOptions | None = None,
) -> Path:
    """Compile the pipeline to KFP IR YAML at ``out`` (written atomically; a folder there is
    refused before anything is built)."""
    from masksam.components._io import atomic_path

    out = Path(out)
    with atomic_path(out, kind="file") as tmp:  # tmp keeps the .yaml suffix
        func = build_pipeline(image=image, params_text=default_params_text(params_path),
                              mlflow_secret=mlflow_secret, mlflow_secret_keys=mlflow_secret_keys,
                              trainjob=trainjob, accelerators=accelerators, checkpoints=checkpoints)
        compiler.Compiler().compile(func, package_path=str(tmp))
    return out
