"""``masksam pipeline compile|run-local|submit``: the Kubeflow pipeline from the command line.

- ``compile`` writes the KFP IR YAML (the image, the MLflow secret, the training mode, the
  accelerators of evaluate/export and the checkpoint volume are fixed at compile time);
- ``run-local`` runs the whole pipeline on this machine with ``kfp.local`` (every step a
  subprocess of this Python, no cluster, no Docker, cached steps reused), MLflow from
  ``MLFLOW_TRACKING_URI``;
- ``submit`` sends a compiled (or freshly compiled) pipeline to a Kubeflow Pipelines endpoint;
- ``task`` runs one step inside the pipeline's containers (what the compiled YAML calls).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from masksam.errors import UserError

log = logging.getLogger(__name__)

PARAM_HELP = ("pipeline parameter NAME=VALUE (repeatable; VALUE parsed as YAML): data_repo_url, data_rev, "
              "data_path, train_steps, train_lr, model_variant (0 or empty: params.yaml's value), "
              "accelerator_type, accelerator_count (or num_nodes, gpus_per_node with --trainjob)")
SET_HELP = ("override one params.yaml value for this run, SECTION.KEY=VALUE (repeatable; VALUE parsed as "
            "YAML; applied after the typed parameters), e.g. --set train.val_every=10")
# The smallest whole run: a few tiny phantom cases, 2 folds, a 32-px model, 4 training steps.
# Shown by `run-local --help` and run as written by tests/test_pipeline_local.py.
RUN_LOCAL_EXAMPLE = (
    "--root", ".kfp-local", "--param", "train_steps=4",
    "--set", "data.cases=6", "--set", "data.size=[48,48,16]", "--set", "preprocess.folds=2",
    "--set", "preprocess.test_fraction=0.34", "--set", "model.img_size=32", "--set", "model.slab_depth=4",
    "--set", "train.val_every=2", "--set", "train.batch_size=1", "--set", "train.device=cpu",
)


# ---------------------------------------------------------------------------------------------
# compile


def _trainjob_options(args: argparse.Namespace):
    from masksam.pipelines.pipeline import TrainJobOptions

    if not args.trainjob:
        return None
    if not args.trainjob_pvc:
        raise UserError("--trainjob needs --trainjob-pvc NAME: a ReadWriteMany PersistentVolumeClaim that the "
                        "pipeline's train task and every TrainJob node mount to exchange data and checkpoints")
    return TrainJobOptions(pvc_name=args.trainjob_pvc, runtime=args.trainjob_runtime)


def _secret_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise UserError("--mlflow-secret-keys is empty: give e.g. MLFLOW_TRACKING_URI")
    return keys


def parse_gpus(items: Sequence[str], default_train: int = 1) -> dict[str, int]:
    """``["train=2", "evaluate=1"]`` (or ``all=N``) -> accelerator counts of train, evaluate, export."""
    from masksam.pipelines.pipeline import ACCELERATED_STEPS

    counts = {"train": default_train, "evaluate": 0, "export": 0}
    for item in items:
        step, sep, raw = item.partition("=")
        step = step.strip()
        if not sep or (step not in ACCELERATED_STEPS and step != "all") or not raw.strip().isdigit():
            raise UserError(f"--gpus {item!r}: expected STEP=N with STEP one of {', '.join(ACCELERATED_STEPS)} "
                            "or all, and N a whole number, e.g. --gpus evaluate=1")
        for name in (ACCELERATED_STEPS if step == "all" else (step,)):
            counts[name] = int(raw)
    return counts


def _compile_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The compile-time choices of ``compile`` and ``submit`` from their options."""
    from masksam.pipelines.pipeline import AcceleratorOptions, CheckpointOptions

    return dict(image=args.image, params_path=args.params, mlflow_secret=args.mlflow_secret,
                mlflow_secret_keys=_secret_keys(args.mlflow_secret_keys), trainjob=_trainjob_options(args),
                accelerators=AcceleratorOptions(kind=args.accelerator, counts=parse_gpus(args.gpus)),
                checkpoints=CheckpointOptions(pvc_name=args.checkpoint_pvc, size=args.checkpoint_size,
                                              storage_class=args.checkpoint_storage_class))


def cmd_compile(args: argparse.Namespace) -> int:
    from masksam.pipelines.pipeline import compile_pipeline

    out = compile_pipeline(out=args.out, **_compile_kwargs(args))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# run-local


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["accelerator_count=2", "data_rev=v1"]`` -> dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--param {item!r}: expected NAME=VALUE")
        value = yaml.safe_load(raw) if raw.strip() else ""
        out[key.strip()] = "" if value is None else value
    return out


def run_local(
    root: str | os.PathLike,
    params_path: str | os.PathLike = "params.yaml",
    overrides: dict[str, Any] | None = None,
    arguments: dict[str, Any] | None = None,
) -> Path:
    """Run the whole pipeline with kfp.local's SubprocessRunner; return the pipeline root.

    Every step runs as a subprocess of this interpreter (``use_venv=False``: nothing is
    installed), so the project must be installed here. Resource requests, retries' backoff and
    Kubernetes settings do not apply locally (kfp warns); caching does (kfp.local's cache under
    the pipeline root: a second run with the same inputs reuses every step but register), and
    training checkpoints go to ``ROOT/checkpoints`` (an interrupted run resumes). A failing
    step has printed its one-line message; the run then stops with a UserError naming it.
    """
    from kfp import local

    from masksam.pipelines._defaults import LOCAL_IMAGE
    from masksam.pipelines.pipeline import build_pipeline, default_params_text
    from masksam.pipelines.steps import parse_overrides, write_params

    params_text = default_params_text(params_path)
    with tempfile.TemporaryDirectory() as tmp:  # fail here, not in the first task, on bad --set
        write_params(params_text, json.dumps(overrides or {}), tmp)
    root = Path(root).resolve()
    pipeline_root = root / "pipeline_root"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True, enable_caching=True)
    func = build_pipeline(image=LOCAL_IMAGE, params_text=params_text, local_checkpoints=str(root / "checkpoints"))
    kwargs = dict(arguments or {})
    kwargs["overrides"] = json.dumps(parse_overrides(overrides or {}))
    unknown = set(kwargs) - set(func.component_spec.inputs or {})
    if unknown:
        raise UserError(f"unknown pipeline parameter(s) {sorted(unknown)}; "
                        f"known: {sorted(func.component_spec.inputs or {})}")
    try:
        func(**kwargs)
    except RuntimeError as exc:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # kfp colours its messages
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"{reason} (the step's own message is above; the finished steps' artifacts are "
                        f"under {pipeline_root}, and a rerun reuses them)") from None
    return pipeline_root


def cmd_run_local(args: argparse.Namespace) -> int:
    from masksam.components.params import parse_set_options

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        log.warning("MLFLOW_TRACKING_URI is not set: the steps use MLflow's default store in %s", Path.cwd())
    root = run_local(args.root, args.params, parse_set_options(args.set), parse_params(args.param))
    print(f"pipeline finished; artifacts under {root}")
    return 0


# ---------------------------------------------------------------------------------------------
# submit


def package_parameters(package: str | os.PathLike) -> dict[str, Any]:
    """The pipeline parameters a compiled package declares (name -> spec)."""
    path = Path(package)
    if not path.is_file():
        raise UserError(f"pipeline package not found: {path} (run `masksam pipeline compile` first)")
    try:
        spec = yaml.safe_load(path.read_text())
        return dict(spec["root"]["inputDefinitions"]["parameters"])
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a compiled KFP pipeline (no root.inputDefinitions): {exc}") from exc


def submit(
    host: str,
    package: str | os.PathLike,
    arguments: dict[str, Any] | None = None,
    experiment: str = "masksam",
    run_name: str | None = None,
    namespace: str | None = None,
    wait: bool = False,
    timeout_s: int = 24 * 3600,
    client_factory: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Create a run of ``package`` on the Kubeflow Pipelines at ``host``; optionally wait for it.

    ``client_factory`` builds the client (``kfp.Client`` by default; tests inject a fake).
    Returns ``{"run_id", "url", "state"}``; a run that ends other than SUCCEEDED raises.
    """
    declared = package_parameters(package)
    arguments = dict(arguments or {})
    unknown = set(arguments) - set(declared)
    if unknown:
        raise UserError(f"{package} has no parameter(s) {sorted(unknown)}; it declares {sorted(declared)}")
    if client_factory is None:
        import kfp

        client_factory = kfp.Client
    try:
        client = client_factory(host=host, namespace=namespace) if namespace else client_factory(host=host)
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
            namespace=namespace,
        )
        run_id = result.run_id
        out = {"run_id": run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run_id}", "state": None}
        if wait:
            run = client.wait_for_run_completion(run_id, timeout=timeout_s)
            out["state"] = str(getattr(run, "state", None) or getattr(getattr(run, "run", None), "status", ""))
    except UserError:
        raise
    except Exception as exc:
        if _is_connection_error(exc):
            raise UserError(f"cannot reach Kubeflow Pipelines at {host}: {_short(exc)} "
                            "(check --host, the port-forward or ingress, and your credentials)") from exc
        raise
    if wait and out["state"] and out["state"].upper() not in ("SUCCEEDED", "SUCCESS"):
        raise UserError(f"run {run_id} ended {out['state']}: see {out['url']}")
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _is_connection_error(exc: BaseException) -> bool:
    import urllib3

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return True
        status = getattr(exc, "status", None)
        if isinstance(status, int) and status in (0, 401, 403, 404, 502, 503, 504):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def cmd_submit(args: argparse.Namespace) -> int:
    from masksam.pipelines.pipeline import compile_pipeline
    from masksam.components.params import apply_overrides, parse_set_options

    arguments = parse_params(args.param)
    if args.set:
        overrides = parse_set_options(args.set)
        apply_overrides({}, overrides)  # an unknown section or key fails here, not in the first task
        arguments["overrides"] = json.dumps(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package
        if package is None:
            package = compile_pipeline(Path(tmp) / "pipeline.yaml", **_compile_kwargs(args))
        out = submit(args.host, package, arguments, experiment=args.experiment, run_name=args.run_name,
                     namespace=args.namespace, wait=args.wait, timeout_s=args.timeout)
    print(f"run {out['run_id']}: {out['url']}" + (f" ({out['state']})" if out["state"] else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def cmd_task(args: argparse.Namespace) -> int:
    from masksam.pipelines.tasks import run_cli_task

    return run_cli_task(args.step, args.task_args)


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    from masksam.pipelines._defaults import DEFAULT_SECRET_KEYS, IMAGE_ENV

    p.add_argument("--image", default=None, metavar="IMAGE",
                   help=f"container image every step runs in, built from the Dockerfile and pushed where the "
                        f"cluster pulls from (required; default ${IMAGE_ENV})")
    p.add_argument("--accelerator", default="nvidia.com/gpu", metavar="TYPE",
                   help="accelerator resource name (default nvidia.com/gpu): the default of the accelerator_type "
                        "pipeline parameter")
    p.add_argument("--gpus", action="append", default=[], metavar="STEP=N",
                   help="accelerators for train, evaluate, export or all (repeatable; default train=1, none for "
                        "evaluate and export); train's count is the default of the accelerator_count parameter")
    p.add_argument("--checkpoint-pvc", metavar="NAME",
                   help="existing PersistentVolumeClaim for train's checkpoints (default: each run creates one "
                        "and deletes it after a successful registration)")
    p.add_argument("--checkpoint-size", default="20Gi", metavar="SIZE",
                   help="size of the checkpoint claim a run creates (default 20Gi)")
    p.add_argument("--checkpoint-storage-class", metavar="NAME",
                   help="StorageClass of that claim (default: the cluster's default)")
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="params.yaml compiled in as the default of the params_json pipeline parameter")
    p.add_argument("--mlflow-secret", metavar="NAME",
                   help="Kubernetes Secret whose keys become the MLflow environment of train, evaluate, export "
                        "and register (default: none, the tracking URI comes from the pod environment)")
    p.add_argument("--mlflow-secret-keys", default=",".join(DEFAULT_SECRET_KEYS), metavar="K1,K2",
                   help="keys of that secret, each exposed as the environment variable of the same name, e.g. "
                        "MLFLOW_TRACKING_URI,MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD")
    p.add_argument("--trainjob", action="store_true",
                   help="train as a Kubeflow Trainer TrainJob (torchrun over num_nodes x gpus_per_node GPUs) "
                        "instead of in the pipeline's own pod")
    p.add_argument("--trainjob-pvc", metavar="NAME",
                   help="with --trainjob: ReadWriteMany PersistentVolumeClaim shared by the launcher and the nodes")
    p.add_argument("--trainjob-runtime", default="torch-distributed", metavar="NAME",
                   help="with --trainjob: ClusterTrainingRuntime to use (default torch-distributed)")


def run_local_epilog() -> str:
    """``run-local --help``'s example: :data:`RUN_LOCAL_EXAMPLE`, shell-quoted, three options a line."""
    import shlex

    pairs = [" ".join(shlex.quote(a) for a in RUN_LOCAL_EXAMPLE[i:i + 2]) for i in range(0, len(RUN_LOCAL_EXAMPLE), 2)]
    lines = [" ".join(pairs[i:i + 3]) for i in range(0, len(pairs), 3)]
    return ("example: the smallest whole run (minutes on a laptop CPU); run it again and every step but\n"
            "register is reused from kfp.local's cache:\n\n  masksam pipeline run-local "
            + " \\\n      ".join(lines) + "\n")


def register_cli(subparsers) -> None:
    """Add ``masksam pipeline compile|run-local|submit``."""
    p = subparsers.add_parser("pipeline", help="compile, run locally or submit the Kubeflow pipeline",
                              description=__doc__)
    sub = p.add_subparsers(dest="pipeline_cmd", metavar="CMD", required=True)

    c = sub.add_parser("compile", help="write the KFP pipeline YAML")
    c.add_argument("--out", default="pipeline.yaml", metavar="FILE", help="output YAML (default pipeline.yaml)")
    _add_compile_options(c)
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run-local", help="run the whole pipeline here with kfp.local (no cluster)",
                       epilog=run_local_epilog())
    r.add_argument("--root", default=".kfp-local", metavar="DIR",
                   help="directory for the local pipeline root (artifacts of every step; default .kfp-local)")
    r.add_argument("--params", default="params.yaml", metavar="FILE", help="params.yaml to run with")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
    r.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help=PARAM_HELP)
    r.set_defaults(func=cmd_run_local)

    s = sub.add_parser("submit", help="submit the pipeline to a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True, metavar="URL", help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")
    s.add_argument("--package", metavar="FILE",
                   help="compiled pipeline YAML to submit (default: compile now with the options below)")
    s.add_argument("--experiment", default="masksam", help="experiment name (created if missing; default masksam)")
    s.add_argument("--run-name", metavar="NAME", help="run name (default: pipeline name and time)")
    s.add_argument("--namespace", metavar="NS", help="Kubeflow profile namespace (multi-user installs)")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help=PARAM_HELP)
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
    s.add_argument("--wait", action="store_true", help="wait for the run to finish; fail unless it succeeded")
    s.add_argument("--timeout", type=int, default=24 * 3600, metavar="S", help="with --wait: seconds to wait (default 1 day)")
    _add_compile_options(s)
    s.set_defaults(func=cmd_submit)

    t = sub.add_parser("task", help="run one pipeline step (what the compiled pipeline's containers call)")
    t.add_argument("step", metavar="STEP", help="the step: resolve, data, validate_data, preprocess, train, "
                                                "export, evaluate, register")
    t.add_argument("task_args", nargs=argparse.REMAINDER, metavar="--NAME VALUE",
                   help="the step's inputs, output paths and --executor-output FILE")
    t.set_defaults(func=cmd_task)
