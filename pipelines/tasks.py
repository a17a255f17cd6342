"""One definition per pipeline step, run two ways: in a container (cluster) or in-process (kfp.local).

Each entry of :data:`TASKS` takes the step's inputs by name (artifact paths and parameter
values, the names of the component's signature in ``pipelines/components.py``) and returns a
:class:`TaskResult`: metadata for its output artifacts, scalar metrics, output parameters.

- On a cluster every step is a ``dsl.container_component`` whose command is
  ``masksam pipeline task STEP --NAME VALUE ...`` (placeholders filled by the KFP launcher);
  :func:`run_cli_task` runs the step and writes the metadata and metrics into the executor
  output file the launcher reads (``{{$.outputs.output_file}}``), output parameters into their
  files.
- Under ``kfp.local`` (which runs only lightweight Python components) each component body is
  one line, ``tasks.run_lightweight(STEP, locals())``, which runs the same entry and puts the
  result on kfp's artifact objects.

This module imports no kfp: the container entry point runs without it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from masksam.errors import UserError

CONTAINER_COMMAND = ("masksam", "pipeline", "task")


@dataclass
class TaskResult:
    """What a step hands back to the orchestrator besides its files."""

    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)   # output artifact -> metadata
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # Metrics output -> scalars
    parameters: dict[str, str] = field(default_factory=dict)           # output parameter -> value


class StepFailed(Exception):
    """A step failed with a message already printed (the verb's one line): exit without a traceback."""


# ---------------------------------------------------------------------------------------------
# the steps (inputs by name -> TaskResult)


def _resolve(params_json: str, overrides: str, data_repo_url: str, data_rev: str, data_path: str,
             train_steps: int, train_lr: float, model_variant: str, params: str, data_spec: str) -> TaskResult:
    from masksam.pipelines import steps

    effective, spec = steps.resolve_inputs(
        params_json, overrides, typed={"train.steps": train_steps, "train.lr": train_lr, "model.variant": model_variant},
        repo_url=data_repo_url, rev=data_rev, path=data_path)
    return TaskResult(parameters={"params": effective, "data_spec": spec})


def _data(data_spec: str, dataset: str) -> TaskResult:
    from masksam.pipelines import steps

    return TaskResult(metadata={"dataset": steps.fetch_data(data_spec, dataset)})


def _validate_data(raw: str, report: str, dataset_sha256: str) -> TaskResult:
    from masksam.pipelines import steps

    identity = steps.validate_data(raw, report)
    return TaskResult(parameters={"dataset_sha256": identity["dataset_sha256"]})


def _preprocess(raw: str, params: str, preprocessed: str, report: str) -> TaskResult:
    from masksam.pipelines import steps

    info = steps.preprocess(raw, preprocessed, params, "{}", report)
    info["dataset_sha256"] = steps.dataset_identity(raw)["dataset_sha256"]
    return TaskResult(metadata={"preprocessed": info})


def _model_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))}
    meta["framework"] = "pytorch"
    return meta


def _train(data: str, raw: str, params: str, checkpoint_root: str, model: str, metrics: str,
           report: str) -> TaskResult:
    from masksam.pipelines import steps

    summary = steps.train(data, raw, model, params, "{}", report, checkpoint_root=checkpoint_root)
    return TaskResult(metadata={"model": _model_metadata(summary)},
                      metrics={"metrics": steps.scalar_metrics(summary)})


def _export(model: str, data: str, params: str, onnx_model: str, metrics: str) -> TaskResult:
    from masksam.pipelines import steps

    summary = steps.export(model, data, onnx_model, params, "{}")
    return TaskResult(metadata={"onnx_model": {"framework": "onnx"}},
                      metrics={"metrics": steps.scalar_metrics(summary.get("parity", summary))})


def _evaluate(model: str, data: str, raw: str, params: str, evaluation: str, metrics: str,
              report: str) -> TaskResult:
    from masksam.pipelines import steps

    summary = steps.evaluate(model, data, raw, evaluation, params, "{}", report)
    names = summary.get("labels", {})
    scalars: dict[str, float] = {}
    for label, values in summary.get("mean", {}).items():
        for metric, value in steps.scalar_metrics(values).items():
            scalars[f"{metric}.{names.get(label, label)}"] = value
    for metric, value in steps.scalar_metrics(summary.get("foreground_mean", {})).items():
        scalars[f"{metric}.foreground_mean"] = value
    return TaskResult(metrics={"metrics": scalars})


def _register(model: str, onnx_model: str, evaluation: str, params: str, report: str, model_uri: str) -> TaskResult:
    from masksam.pipelines import steps

    info = steps.register(model, onnx_model, evaluation, params, "{}", report)
    return TaskResult(parameters={"model_uri": info["model_uri"]})


def _baseline(raw: str, data: str, params: str, evaluation: str, report: str) -> TaskResult:
    from masksam.pipelines import steps

    summary = steps.baseline(raw, data, evaluation, params, report)
    return TaskResult(metrics={}, metadata={"evaluation": {"method": str(summary.get("method"))}})


def _compare(evaluation: str, baseline: str, params: str, comparison: str, metrics: str, report: str) -> TaskResult:
    from masksam.pipelines import steps

    results = steps.compare(evaluation, baseline, comparison, params, report)
    scalars = {f"{m}.{key}": float(v) for m, s in results.get("foreground_mean", {}).items()
               for key, v in (("diff", s.get("diff")), ("p_wilcoxon", s.get("p_wilcoxon"))) if v is not None}
    return TaskResult(metrics={"metrics": scalars})


# Every step that runs a `masksam` verb, by component function name (see components.py).
TASKS: dict[str, Callable[..., TaskResult]] = {
    "resolve": _resolve,
    "data": _data,
    "validate_data": _validate_data,
    "preprocess": _preprocess,
    "train": _train,
    "export": _export,
    "evaluate": _evaluate,
    "register": _register,
    "baseline": _baseline,
    "compare": _compare,
}


def run_task(step: str, values: dict[str, Any]) -> TaskResult:
    """Run ``step`` with its inputs and output paths by name; output folders' parents exist after."""
    if step not in TASKS:
        raise UserError(f"unknown pipeline step {step!r}; known: {', '.join(sorted(TASKS))}")
    for value in values.values():
        if isinstance(value, str) and os.path.isabs(value) and not Path(value).parent.exists():
            Path(value).parent.mkdir(parents=True, exist_ok=True)
    return TASKS[step](**values)


def _fail_quietly(exc: BaseException) -> StepFailed:
    """Print a step's failure as one line (a verb's own message is already above)."""
    if isinstance(exc, UserError):
        print(f"masksam pipeline: error: {exc}", file=sys.stderr, flush=True)
    elif not isinstance(exc, StepFailed):
        print(f"masksam pipeline: error: {exc}", file=sys.stderr, flush=True)
    return StepFailed(str(exc))


# ---------------------------------------------------------------------------------------------
# in-process (kfp.local lightweight components)


def run_lightweight(step: str, arguments: dict[str, Any]) -> None:
    """The body of a lightweight component: run ``step``, set metadata/metrics on kfp's artifacts.

    A failure prints one line and exits 1 (no traceback: the failing verb has said what is wrong).
    """
    import inspect

    names = inspect.signature(TASKS[step]).parameters  # locals() also holds the body's imports
    arguments = {k: v for k, v in arguments.items() if k in names}
    values = {k: getattr(v, "path", v) for k, v in arguments.items()}
    try:
        result = run_task(step, values)
    except (UserError, StepFailed, RuntimeError) as exc:
        _fail_quietly(exc)
        raise SystemExit(1) from None
    for name, meta in result.metadata.items():
        arguments[name].metadata.update(meta)
    for name, scalars in result.metrics.items():
        for key, value in scalars.items():
            arguments[name].log_metric(key, value)
        _write_metrics_file(values[name], scalars)
    for name, value in result.parameters.items():
        Path(values[name]).write_text(value)


def _write_metrics_file(path: str, scalars: dict[str, float]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(scalars, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# in a container (`masksam pipeline task STEP --NAME VALUE ...`)


def parse_task_args(argv: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """``["--raw", "/p", "--params", "{...}", "--executor-output", "/f"]`` -> (values, executor output path)."""
    values: dict[str, str] = {}
    if len(argv) % 2:
        raise UserError(f"task arguments come in --NAME VALUE pairs, got {list(argv)!r}")
    for flag, value in zip(argv[::2], argv[1::2]):
        if not flag.startswith("--"):
            raise UserError(f"task argument {flag!r}: expected --NAME")
        values[flag[2:].replace("-", "_")] = value
    executor_output = values.pop("executor_output", None)
    return values, executor_output


def executor_output(result: TaskResult, output_names: Sequence[str]) -> dict[str, Any]:
    """The ExecutorOutput message (JSON) carrying artifact metadata and metrics to the orchestrator."""
    artifacts: dict[str, Any] = {}
    for name in output_names:
        meta = dict(result.metadata.get(name, {}))
        meta.update(result.metrics.get(name, {}))
        if meta:
            artifacts[name] = {"artifacts": [{"metadata": meta}]}
    return {"artifacts": artifacts}


def run_cli_task(step: str, argv: Sequence[str]) -> int:
    """``masksam pipeline task STEP ...``: run the step; write metrics, parameters and the executor output."""
    values, output_file = parse_task_args(argv)
    try:
        result = run_task(step, _typed(step, values))
    except (StepFailed, RuntimeError) as exc:
        _fail_quietly(exc)
        return 1
    for name, scalars in result.metrics.items():
        _write_metrics_file(values[name], scalars)
    for name, value in result.parameters.items():
        Path(values[name]).parent.mkdir(parents=True, exist_ok=True)
        Path(values[name]).write_text(value)
    if output_file:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        outputs = [*result.metadata, *result.metrics]
        Path(output_file).write_text(json.dumps(executor_output(result, outputs)))
    return 0


def _typed(step: str, values: dict[str, str]) -> dict[str, Any]:
    """Command-line strings to the types the step's signature declares (int / float parameters)."""
    import inspect

    sig = inspect.signature(TASKS[step])
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in sig.parameters:
            raise UserError(f"pipeline step {step!r} has no input {name!r}; it takes {', '.join(sig.parameters)}")
        kind = sig.parameters[name].annotation
        try:
            out[name] = int(value) if kind in (int, "int") else float(value) if kind in (float, "float") else value
        except ValueError as exc:
            raise UserError(f"pipeline step {step!r}: --{name} must be a {kind}, got {value!r}") from exc
    return out
