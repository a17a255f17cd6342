"""Training as a Kubeflow Trainer (v2) TrainJob, for runs that outgrow one GPU.

The pipeline's train task then only launches: it copies the preprocessed dataset onto a shared
PersistentVolumeClaim, creates a ``trainer.kubeflow.org/v1alpha1`` TrainJob that runs
``torchrun -m masksam train ...`` on ``numNodes`` nodes with ``nvidia.com/gpu`` GPUs each
(the ``torch-distributed`` ClusterTrainingRuntime sets torchrun's rendezvous environment),
waits for it, and copies the training directory back as the task's Model artifact.

The manifest follows the Trainer v2.2 API (``spec.runtimeRef``, ``spec.trainer``, and
``spec.runtimePatches`` to mount the volume in the runtime's ``node`` container). It is checked
against ``TRAINJOB_SCHEMA`` (written from the CRD's fields and validation markers) before it is
sent, so a malformed job fails in the pipeline with a readable message, not in the cluster.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from masksam.errors import UserError

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
NODE_CONTAINER = "node"          # the trainer container / replicated job of torch-distributed
PATCH_MANAGER = "masksam.pipelines"
VOLUME_NAME = "masksam-workspace"
NAME_RE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0},
                       {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"}]}
_ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "value": {"type": "string"},
        "valueFrom": {
            "type": "object",
            "properties": {"secretKeyRef": {
                "type": "object", "required": ["name", "key"],
                "properties": {"name": {"type": "string", "minLength": 1}, "key": {"type": "string", "minLength": 1},
                               "optional": {"type": "boolean"}},
            }},
        },
    },
}
_STRINGS = {"type": "array", "maxItems": 128, "items": {"type": "string", "maxLength": 65536}}

# JSON schema of the TrainJob fields this module writes (Trainer v2.2 CRD, trainjob_types.go):
# required fields, types, the name rule, list bounds. Unknown fields are refused so a typo in a
# field name is caught here instead of being pruned silently by the API server.
TRAINJOB_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "TrainJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": NAME_RE, "maxLength": 63},
                "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["runtimeRef", "trainer"],
            "additionalProperties": False,
            "properties": {
                "runtimeRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "apiGroup": {"type": "string", "maxLength": 253},
                        "kind": {"enum": ["ClusterTrainingRuntime", "TrainingRuntime"]},
                    },
                },
                "trainer": {
                    "type": "object",
                    "required": ["image", "command", "numNodes", "resourcesPerNode"],
                    "additionalProperties": False,
                    "properties": {
                        "image": {"type": "string", "minLength": 1, "maxLength": 500},
                        "command": {**_STRINGS, "minItems": 1},
                        "args": _STRINGS,
                        "env": {"type": "array", "maxItems": 128, "items": _ENV_VAR},
                        "numNodes": {"type": "integer", "minimum": 1},
                        "resourcesPerNode": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "limits": {"type": "object", "additionalProperties": _QUANTITY},
                                "requests": {"type": "object", "additionalProperties": _QUANTITY},
                            },
                        },
                    },
                },
                "runtimePatches": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {
                        "type": "object",
                        "required": ["manager"],
                        "properties": {
                            "manager": {"type": "string", "minLength": 1, "maxLength": 253},
                            "trainingRuntimeSpec": {"type": "object"},
                        },
                    },
                },
                "suspend": {"type": "boolean"},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            },
        },
    },
}


def train_command(params: str, data_dir: str, out_dir: str, raw_dir: str | None = None,
                  extra: Sequence[str] = ()) -> list[str]:
    """``torchrun -m masksam train ...``: torchrun reads nodes/rank/master from the runtime's env."""
    raw = ["--raw", raw_dir] if raw_dir else []
    return ["torchrun", "--module", "masksam", "train", "--params", params, "--preprocessed", data_dir,
            *raw, "--out", out_dir, "--no-progress", *extra]


def render_trainjob(
    *,
    name: str,
    image: str,
    command: Sequence[str],
    num_nodes: int,
    gpus_per_node: int,
    namespace: str | None = None,
    runtime: str = "torch-distributed",
    pvc_name: str | None = None,
    mount_path: str = "/mnt/masksam",
    mlflow_secret: str | None = None,
    mlflow_secret_keys: Sequence[str] = ("MLFLOW_TRACKING_URI",),
    cpu_per_node: str | None = None,
    memory_per_node: str | None = None,
    deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest (a dict ready for the Kubernetes API) for a torchrun training run."""
    if num_nodes < 1 or gpus_per_node < 0:
        raise UserError(f"TrainJob needs num_nodes >= 1 and gpus_per_node >= 0 (got {num_nodes}, {gpus_per_node})")
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if gpus_per_node:
        limits["nvidia.com/gpu"] = int(gpus_per_node)
    if cpu_per_node:
        limits["cpu"] = requests["cpu"] = cpu_per_node
    if memory_per_node:
        limits["memory"] = requests["memory"] = memory_per_node
    resources: dict[str, Any] = {"limits": limits}
    if requests:
        resources["requests"] = requests
    trainer: dict[str, Any] = {
        "image": image,
        "command": [str(c) for c in command],
        "numNodes": int(num_nodes),
        "resourcesPerNode": resources,
    }
    if mlflow_secret:
        trainer["env"] = [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow_secret, "key": key}}}
            for key in mlflow_secret_keys
        ]
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "masksam",
                                                          "app.kubernetes.io/component": "train"}}
    if namespace:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
        "trainer": trainer,
    }
    if pvc_name:
        pod_spec = {
            "volumes": [{"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": pvc_name}}],
            "containers": [{"name": NODE_CONTAINER,
                            "volumeMounts": [{"name": VOLUME_NAME, "mountPath": mount_path}]}],
        }
        spec["runtimePatches"] = [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": NODE_CONTAINER,
                "template": {"spec": {"template": {"spec": pod_spec}}},
            }]}}},
        }]
    if deadline_seconds:
        spec["activeDeadlineSeconds"] = int(deadline_seconds)
    return {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": metadata, "spec": spec}


def validate_trainjob(manifest: dict[str, Any]) -> None:
    """Check ``manifest`` against ``TRAINJOB_SCHEMA`` and the runtime-patch shape; UserError lists every problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(TRAINJOB_SCHEMA)
    problems = [
        f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    ]
    for i, patch in enumerate(manifest.get("spec", {}).get("runtimePatches", []) or []):
        jobs = (patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {})
                .get("replicatedJobs", []))
        for job in jobs:
            if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", str(job.get("name", ""))):
                problems.append(f"spec/runtimePatches/{i}: replicated job name {job.get('name')!r} is not a DNS label")
            pod = job.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            volumes = {v.get("name") for v in pod.get("volumes", [])}
            for c in pod.get("containers", []):
                for m in c.get("volumeMounts", []):
                    if m.get("name") not in volumes:
                        problems.append(f"spec/runtimePatches/{i}: container {c.get('name')!r} mounts "
                                        f"unknown volume {m.get('name')!r}")
                    if not str(m.get("mountPath", "")).startswith("/"):
                        problems.append(f"spec/runtimePatches/{i}: mountPath must be absolute")
    if problems:
        raise UserError("invalid TrainJob manifest:\n  " + "\n  ".join(problems))


def in_cluster_namespace(default: str = "kubeflow") -> str:
    """The namespace of the pod this runs in (the pipeline's namespace), else ``default``."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else default


def custom_objects_api():
    """A CustomObjectsApi for the cluster this runs in (or the local kubeconfig)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as exc:
            raise UserError(f"no Kubernetes access to create the TrainJob (not in a pod, no kubeconfig): {exc}") from exc
    return client.CustomObjectsApi()


def trainjob_state(obj: dict[str, Any]) -> tuple[str | None, str]:
    """``("Complete"|"Failed"|None, message)`` from a TrainJob's status conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return None, ""


def _get(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The TrainJob ``name``, or None when the API server has none (HTTP 404)."""
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return None
        raise


def _delete_and_wait(api: Any, namespace: str, name: str, poll_s: float, sleep: Callable[[float], None],
                     timeout_s: float = 600) -> None:
    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    waited = 0.0
    while _get(api, namespace, name) is not None:
        if waited >= timeout_s:
            raise RuntimeError(f"TrainJob {namespace}/{name} still there {timeout_s:.0f} s after deleting it")
        sleep(poll_s)
        waited += poll_s


def create_and_wait(
    manifest: dict[str, Any],
    api: Any = None,
    timeout_s: float = 7 * 24 * 3600,
    poll_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    reuse_complete: bool = False,
) -> dict[str, Any]:
    """Validate, create the TrainJob and wait until it completes; a failure raises with its reason.

    The launcher's pod can be restarted while its job trains: a TrainJob of the same name (the
    name is the training's key) still running is waited on, not started twice. One that failed
    is deleted and created again (its command resumes from the checkpoint on the volume); one
    that completed is reused when ``reuse_complete`` (its output is still on the volume), else
    replaced.
    """
    validate_trainjob(manifest)
    api = api or custom_objects_api()
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"].get("namespace") or in_cluster_namespace()
    existing = _get(api, namespace, name)
    if existing is not None:
        state, message = trainjob_state(existing)
        if state is None or (state == "Complete" and reuse_complete):
            log.info("TrainJob %s/%s is already there (%s): waiting on it instead of starting another",
                     namespace, name, "complete" if state else "running")
        else:
            log.info("TrainJob %s/%s %s before (%s): replacing it", namespace, name, state.lower(), message)
            _delete_and_wait(api, namespace, name, poll_s, sleep)
            existing = None
    if existing is None:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        log.info("created TrainJob %s/%s", namespace, name)
    waited = 0.0
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state, message = trainjob_state(obj)
        if state == "Complete":
            log.info("TrainJob %s complete", name)
            return obj
        if state == "Failed":
            raise RuntimeError(f"TrainJob {namespace}/{name} failed: {message} "
                               f"(kubectl -n {namespace} describe trainjob {name}); running the pipeline "
                               "again resumes from its last checkpoint on the volume")
        if waited >= timeout_s:
            raise RuntimeError(f"TrainJob {namespace}/{name} not complete after {timeout_s:.0f} s")
        sleep(poll_s)
        waited += poll_s


def run_trainjob_step(
    *,
    data_dir: str,
    raw_dir: str | None = None,
    model_dir: str,
    params_json: str,
    overrides: str,
    image: str,
    num_nodes: int,
    gpus_per_node: int,
    pvc_name: str,
    runtime: str,
    mlflow_secret: str,
    mlflow_secret_keys: str,
    report_path: str,
    workspace: str = "/mnt/masksam",
    api: Any = None,
    poll_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """The pipeline's train task in TrainJob mode: stage data on the PVC, run the job, collect the model."""
    from masksam.pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        params_text = steps.write_params(params_json, overrides, tmp).read_text()
    # one training, one name: a restarted launcher finds its staged data, its checkpoints and its
    # job again (the same key as the single-node step's checkpoint folder)
    key = steps.training_key(params_text + "\0" + (steps.raw_dir_identity(raw_dir) if raw_dir else ""), data_dir)
    run_dir = Path(workspace) / f"masksam-{key}"
    staged_data, staged_out = run_dir / "preprocessed", run_dir / "train"
    _stage(Path(data_dir), staged_data, shutil.copytree)
    staged_raw = None
    if raw_dir:  # train records the raw dataset's identity: its manifest and dataset.json suffice
        staged_raw = run_dir / "raw"
        _stage(Path(raw_dir), staged_raw, _copy_identity)
    params = run_dir / "params.yaml"
    params.write_text(params_text)
    done_before = (staged_out / "train_summary.json").is_file()
    manifest = render_trainjob(
        name=f"masksam-train-{key}", image=image,
        command=train_command(str(params), str(staged_data), str(staged_out), str(staged_raw) if staged_raw else None,
                              extra=["--resume-if-present"]),
        num_nodes=num_nodes, gpus_per_node=gpus_per_node, runtime=runtime, pvc_name=pvc_name,
        mount_path=workspace, mlflow_secret=mlflow_secret or None,
        mlflow_secret_keys=[k for k in mlflow_secret_keys.split(",") if k],
    )
    create_and_wait(manifest, api=api, poll_s=poll_s, sleep=sleep, reuse_complete=done_before)
    shutil.copytree(staged_out, model_dir, ignore=shutil.ignore_patterns(*steps.RESUME_ONLY, ".masksam-*"))
    summary = steps.read_train_summary(model_dir)
    summary["trainjob"] = manifest["metadata"]["name"]
    Path(report_path).write_text(steps.train_report_html(model_dir, summary))
    shutil.rmtree(run_dir, ignore_errors=True)
    return summary


def _copy_identity(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in ("manifest.json", "dataset.json"):
        shutil.copy2(src / name, dst / name)


def _stage(src: Path, dst: Path, copy: Callable[[Path, Path], Any]) -> None:
    """Copy ``src`` to ``dst`` on the volume once: a copy a restarted launcher finished is kept,
    one it left half-done is made again (written beside, then renamed)."""
    if dst.is_dir():
        return
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    copy(src, partial)
    partial.rename(dst)
