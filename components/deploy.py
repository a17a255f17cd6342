"""``masksam deploy``: a KServe ``InferenceService`` that serves a registered model on Kubeflow.

The predictor is the project's own image running ``masksam serve`` (the guarded MLflow scoring
server: same ``/invocations`` JSON protocol, 413 for oversized requests, every model file
verified against the registry's record before it loads) as a KServe custom container on port
8080, with ``/ping`` as readiness probe. CPU, memory (requests = limits: the model's peak
memory is known, a pod that is throttled or OOM-killed mid-request helps nobody) and, when
asked, GPUs are set; the tracking server comes from ``--tracking-uri`` or the environment. The
manifest is written as YAML for ``kubectl apply -f``; nothing is sent to a cluster.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from masksam.errors import UserError

API_VERSION = "serving.kserve.io/v1beta1"
PORT = 8080
# a Kubernetes object name: lowercase RFC 1123 label (KServe also prefixes it into host names)
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,51}[a-z0-9])?$")
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")


def inference_service(model_uri: str, image: str, *, name: str = "masksam", namespace: str | None = None,
                      tracking_uri: str | None = None, cpu: str = "4", memory: str = "16Gi", gpus: int = 0,
                      max_voxels: int | None = None, min_replicas: int = 1, max_replicas: int = 1,
                      timeout_s: int = 600) -> dict[str, Any]:
    """The ``InferenceService`` manifest (a dict) serving ``model_uri`` with ``image``."""
    _check(model_uri, image, name, cpu, memory, gpus, min_replicas, max_replicas, timeout_s)
    env = [{"name": "MASKSAM_DEVICE", "value": "cuda" if gpus else "cpu"}]
    if tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking_uri})
    if max_voxels is not None:
        env.append({"name": "MASKSAM_MAX_VOXELS", "value": str(int(max_voxels))})
    resources: dict[str, dict[str, Any]] = {"requests": {"cpu": cpu, "memory": memory},
                                            "limits": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = str(gpus)
    container = {
        "name": "kserve-container",
        "image": image,
        "command": ["masksam", "serve"],
        "args": ["--model", model_uri, "--host", "0.0.0.0", "--port", str(PORT)],
        "env": env,
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ping", "port": PORT}, "initialDelaySeconds": 15,
                           "periodSeconds": 10},
        "resources": resources,
    }
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "masksam"},
                                "annotations": {"masksam/model-uri": model_uri}}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": {"minReplicas": min_replicas, "maxReplicas": max_replicas,
                               "timeout": timeout_s, "containers": [container]}},
    }


def _check(model_uri: str, image: str, name: str, cpu: str, memory: str, gpus: int, min_replicas: int,
           max_replicas: int, timeout_s: int) -> None:
    if not model_uri.startswith("models:/"):
        raise UserError(f"--model {model_uri}: give a registered model, models:/NAME@ALIAS or models:/NAME/VERSION "
                        "(the server verifies it against the registry's record)")
    if not image or any(c.isspace() for c in image):
        raise UserError(f"--image {image!r}: give the project image the cluster pulls, e.g. "
                        "registry.example.org/masksam:0.1.0 (build it from the Dockerfile)")
    if not NAME_RE.match(name):
        raise UserError(f"--name {name!r}: a Kubernetes name is lowercase letters, digits and '-', "
                        "starting with a letter, at most 53 characters")
    for flag, value in (("--cpu", cpu), ("--memory", memory)):
        if not QUANTITY_RE.match(str(value)):
            raise UserError(f"{flag} {value!r}: not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    if gpus < 0 or min_replicas < 0 or max_replicas < max(1, min_replicas) or timeout_s < 1:
        raise UserError("need --gpus >= 0, --min-replicas >= 0, --max-replicas >= max(1, --min-replicas) and "
                        "--timeout >= 1")


def write_manifest(manifest: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the manifest as YAML (atomically)."""
    import yaml

    from masksam.components._io import atomic_path

    path = Path(path)
    with atomic_path(path, "file") as tmp:
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy", help="write a KServe InferenceService manifest serving a registered model",
        description="Write a KServe InferenceService (serving.kserve.io/v1beta1) that runs `masksam serve` "
        "on a registered model in the project image, for `kubectl apply -f`. Nothing is sent to a cluster.")
    p.add_argument("-m", "--model", required=True, help="registered model to serve: models:/NAME@ALIAS or "
                   "models:/NAME/VERSION")
    p.add_argument("--image", required=True, help="the project image (built from the Dockerfile) the "
                   "cluster pulls")
    p.add_argument("-o", "--out", required=True, help="manifest file to write (YAML)")
    p.add_argument("--name", default="masksam", help="InferenceService name (default masksam)")
    p.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's current one)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow server the pod pulls the model from, as the pod reaches it (default: "
                   "$MLFLOW_TRACKING_URI); without it the image's environment must set it")
    p.add_argument("--cpu", default="4", help="CPU request and limit (default 4)")
    p.add_argument("--memory", default="16Gi", help="memory request and limit (default 16Gi: a 512x512x300 "
                   "CT needs a few GB)")
    p.add_argument("--gpus", type=int, default=0, help="NVIDIA GPUs per pod (default 0: CPU)")
    p.add_argument("--max-voxels", type=int, help="largest request in voxel values (MASKSAM_MAX_VOXELS)")
    p.add_argument("--min-replicas", type=int, default=1, help="replicas kept running (default 1; 0 "
                   "scales to zero)")
    p.add_argument("--max-replicas", type=int, default=1, help="most replicas under load (default 1)")
    p.add_argument("--timeout", type=int, default=600, help="seconds a request may take (default 600)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    manifest = inference_service(
        args.model, args.image, name=args.name, namespace=args.namespace, tracking_uri=args.tracking_uri,
        cpu=args.cpu, memory=args.memory, gpus=args.gpus, max_voxels=args.max_voxels,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas, timeout_s=args.timeout)
    path = write_manifest(manifest, args.out)
    print(f"masksam deploy: wrote {path}; apply it with `kubectl apply -f {path}`")
    return 0
