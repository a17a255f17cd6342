"""What each Kubeflow task runs inside the project image: a `masksam` verb, then its report.

The kfp component bodies (``pipelines/components.py``) are thin: they import this module (the
image has the project installed) and call one function here. Each function runs the step
through the ``masksam`` command line, in-process, so the pipeline depends only on the verbs'
options, exactly as ``dvc.yaml`` does, and then turns the step's output files into what the
Kubeflow UI shows: artifact metadata, scalar metrics and a Markdown/HTML report.

Parameters reach the verbs the way they do under DVC: a ``params.yaml`` (the one the pipeline
was compiled with, carried as a pipeline parameter) with dotted-key overrides applied, written
to a temporary file and passed as ``--params``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from masksam.components.params import Params, apply_overrides, load_params, params_from_dict
from masksam.errors import UserError
from masksam.pipelines import reports

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# parameters


def parse_overrides(overrides: str | dict | None) -> dict[str, Any]:
    """Dotted-key overrides (``{"train.steps": 2}``) from a JSON string or dict."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    try:
        value = json.loads(overrides)
    except json.JSONDecodeError as exc:
        raise UserError(f"pipeline parameter 'overrides' is not valid JSON ({exc}): {overrides!r}") from exc
    if not isinstance(value, dict):
        raise UserError(f"pipeline parameter 'overrides' must be a JSON object of section.key: value, got {overrides!r}")
    return value


def effective_params(params_json: str, overrides: str | dict | None) -> tuple[dict[str, Any], Params]:
    """The compiled-in params text plus overrides: the raw mapping and its checked Params.

    Checked here, with the loader every verb uses, so a bad key or value fails in the first
    task (or before submitting), named as a pipeline parameter.
    """
    try:  # JSON (what the pipeline carries) is YAML too, so a pasted params.yaml also works
        raw = yaml.safe_load(params_json) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"pipeline parameter 'params_json' is neither JSON nor YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserError("pipeline parameter 'params_json' must hold a mapping (params.yaml's content)")
    raw = apply_overrides(raw, parse_overrides(overrides))
    return raw, params_from_dict(raw, "pipeline parameters params_json + overrides")


def write_params(params_json: str, overrides: str | dict | None, directory: str | os.PathLike) -> Path:
    """Write the effective params.yaml (compiled-in text plus overrides, checked) into ``directory``."""
    raw, _ = effective_params(params_json, overrides)
    path = Path(directory) / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# running verbs


def run_verb(argv: Sequence[str]) -> str:
    """Run ``masksam ARGV`` in a fresh interpreter; return what it printed; a failure raises.

    A subprocess without ``_KFP_RUNTIME``: KFP sets that variable in the task, and with it kfp
    loads only its runtime half, so the CLI's verb discovery (which imports the pipeline
    modules, hence ``kfp.compiler``) fails with a circular import in-process or in a child that
    inherits it. stdout is echoed (the step's log in the KFP UI); stderr passes through.
    """
    argv = [str(a) for a in argv]
    log.info("masksam %s", " ".join(argv))
    env = {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}
    proc = subprocess.run([sys.executable, "-m", "masksam", *argv], stdout=subprocess.PIPE, text=True, env=env)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        raise RuntimeError(f"`masksam {' '.join(argv)}` failed with exit status {proc.returncode} "
                           "(its message is above)")
    return proc.stdout


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def scalar_metrics(data: Any, prefix: str = "") -> dict[str, float]:
    """Flatten the finite numbers of a JSON-like dict into ``a.b.c -> float`` (bools excluded)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(scalar_metrics(value, f"{prefix}{key}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data):
        out[prefix.rstrip(".")] = float(data)
    return out


# ---------------------------------------------------------------------------------------------
# data


def dataset_identity(raw_dir: str | os.PathLike) -> dict[str, Any]:
    """Metadata naming a raw dataset: its manifest hash, file count and labels."""
    raw = Path(raw_dir)
    manifest = _read_json(raw / "manifest.json")
    if manifest is None:
        raise UserError(f"{raw}/manifest.json missing: the data step must write the manifest")
    meta = _read_json(raw / "dataset.json") or {}
    return {
        "dataset_sha256": manifest["dataset_sha256"],
        "num_files": manifest.get("num_files"),
        "num_training": meta.get("numTraining"),
        "labels": meta.get("labels"),
        "name": meta.get("name"),
    }


def phantom_data(out_dir: str, params_json: str, overrides: str) -> dict[str, Any]:
    """Generate the phantom dataset into ``out_dir`` and write its manifest.

    Only when the params ask for it: a real ``data.source`` without a DVC repository is
    refused, never silently replaced by generated data.
    """
    _, params = effective_params(params_json, overrides)
    if params.data.source != "phantom":
        raise UserError(
            f"data.source is {params.data.source!r}, but no DVC repository was given: set the pipeline "
            "parameters data_repo_url (and data_path, data_rev) to the DVC-tracked raw dataset, or "
            "data.source: phantom for the generated demo data")
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        run_verb(["data", "phantom", "--params", params, "--out", out_dir, "--no-progress"])
    run_verb(["data", "manifest", out_dir, "--no-progress"])
    return {"source": "phantom", **dataset_identity(out_dir)}


def fetch_dvc_dataset(repo_url: str, rev: str, path: str, out_dir: str | os.PathLike) -> str:
    """Materialise the DVC-tracked folder ``path`` of ``repo_url`` at ``rev``; return the commit.

    Uses ``dvc.api.DVCFileSystem`` (what ``dvc get`` uses): files come from the repository's
    DVC remote, or its cache for a local repository. ``rev`` empty means the default branch;
    the commit it resolved to is returned so the run records exactly what it trained on.
    """
    from dvc.api import DVCFileSystem

    out = Path(out_dir)
    fs = None
    try:
        fs = DVCFileSystem(repo_url, rev=rev or None)
        commit = fs.repo.get_rev()  # resolving the revision is lazy: a bad one fails here
    except Exception as exc:  # dvc/scmrepo raise many types for bad URLs and revisions
        if fs is not None:
            fs.close()
        raise UserError(f"cannot open DVC repository {repo_url!r} at revision {rev or 'HEAD'!r}: {exc}") from exc
    try:
        if not fs.exists(path):
            raise UserError(f"{repo_url}@{rev or 'HEAD'}: no path {path!r} (give the DVC-tracked raw dataset folder)")
        if out.exists():
            shutil.rmtree(out)
        fs.get(path.rstrip("/") + "/", str(out), recursive=True)
    finally:
        fs.close()
    if not (out / "dataset.json").is_file():
        raise UserError(f"{repo_url}@{commit[:12]}:{path} has no dataset.json: it is not an nnU-Net raw dataset folder")
    return commit


def import_data(out_dir: str, repo_url: str, rev: str, path: str) -> dict[str, Any]:
    """Fetch the user's DVC-tracked raw dataset, (re)write its manifest, return its identity."""
    commit = fetch_dvc_dataset(repo_url, rev, path, out_dir)
    run_verb(["data", "manifest", out_dir, "--no-progress"])
    return {"source": "dvc", "repo_url": repo_url, "rev": rev or "HEAD", "commit": commit, "path": path,
            **dataset_identity(out_dir)}


def validate_data(raw_dir: str, report_path: str) -> dict[str, Any]:
    """Validate the raw dataset (a failure stops the pipeline); write its Markdown report."""
    text = run_verb(["data", "validate", raw_dir, "--no-progress"])
    identity = dataset_identity(raw_dir)
    md = [
        "# Dataset validation",
        "",
        f"dataset sha256 `{identity['dataset_sha256']}`, {identity['num_training']} training cases",
        "",
        markdown_labels(identity.get("labels") or {}),
        "",
        "```",
        text.strip(),
        "```",
    ]
    Path(report_path).write_text("\n".join(md) + "\n")
    return identity


def markdown_labels(labels: dict[str, int]) -> str:
    """The label table of dataset.json."""
    return reports.markdown_table(["label", "value"], sorted(labels.items(), key=lambda kv: kv[1]))


# ---------------------------------------------------------------------------------------------
# preprocess / train / evaluate / export / register


def preprocess(raw_dir: str, out_dir: str, params_json: str, overrides: str, report_path: str) -> dict[str, Any]:
    """Preprocess the raw dataset into ``out_dir``; report the plan."""
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        run_verb(["preprocess", "--params", params, "--raw", raw_dir, "--out", out_dir])
    plan = _read_json(Path(out_dir) / "plan.json") or {}
    splits = _read_json(Path(out_dir) / "splits.json") or {}
    rows = [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in plan.items()
            if k in ("target_spacing_xyz", "target_spacing", "orientation", "normalization", "normalisation")]
    md = ["# Preprocessing plan", "", reports.markdown_table(["setting", "value"], rows), "",
          f"folds: {len(splits.get('folds', []))}, test cases: {len(splits.get('test', []))}"]
    Path(report_path).write_text("\n".join(md) + "\n")
    return {"num_cases": len(list((Path(out_dir) / "cases").glob("*.npz")))}


def read_train_summary(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``train_summary.json`` of a checkpoint directory; missing means training did not finish."""
    summary = _read_json(Path(model_dir) / "train_summary.json")
    if summary is None:
        raise RuntimeError(f"{model_dir}/train_summary.json missing: training did not finish")
    return summary


def train_report_html(model_dir: str | os.PathLike, summary: dict[str, Any]) -> str:
    """The training page: summary table and learning curve."""
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
    parts = [reports.html_table(["key", "value"], rows)]
    curve = Path(model_dir) / "learning_curve.png"
    if curve.is_file():
        parts.append(reports.html_image(curve, "learning curve"))
    return reports.html_page("Training", parts)


def train(data_dir: str, raw_dir: str, out_dir: str, params_json: str, overrides: str,
          report_path: str) -> dict[str, Any]:
    """Train on the preprocessed dataset; return the summary; report the curve."""
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        run_verb(["train", "--params", params, "--preprocessed", data_dir, "--raw", raw_dir,
                  "--out", out_dir, "--no-progress"])
    summary = read_train_summary(out_dir)
    Path(report_path).write_text(train_report_html(out_dir, summary))
    return summary


def evaluate(model_dir: str, data_dir: str, raw_dir: str, out_dir: str, params_json: str, overrides: str,
             report_path: str) -> dict[str, Any]:
    """Predict the held-out test cases with ``model_dir`` (the exported ONNX folder: what is
    registered is what is scored), score them; report per-class Dice with the plots."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        run_verb(["evaluate", "--params", params, "--model", model_dir, "--raw", raw_dir, "--preprocessed",
                  data_dir, "--out-dir", out, "--workers", "1", "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    names = summary.get("labels", {})
    mean = summary.get("mean", {})
    metric_names = sorted({m for v in mean.values() for m in v})
    rows = [[names.get(label, label), *[v.get(m) if v.get(m) is not None else "n/a" for m in metric_names]]
            for label, v in mean.items()]
    fg = summary.get("foreground_mean", {})
    rows.append(["foreground mean", *[fg.get(m) if fg.get(m) is not None else "n/a" for m in metric_names]])
    parts = [f"<p>{summary['n_cases']} held-out test cases</p>", reports.html_table(["class", *metric_names], rows)]
    for png in sorted((out / "plots").glob("*.png")):
        parts.append(reports.html_image(png, png.stem))
    Path(report_path).write_text(reports.html_page("Evaluation", parts))
    return summary


def export(model_dir: str, data_dir: str, out_dir: str, params_json: str, overrides: str) -> dict[str, Any]:
    """Export the trained model to ONNX; the export itself refuses a graph that fails parity."""
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        run_verb(["export", "--params", params, "--train", model_dir, "--data", data_dir, "--out", out_dir])
    sidecar = _read_json(Path(out_dir) / "model.onnx.json")
    if sidecar is None:
        raise RuntimeError(f"{out_dir}/model.onnx.json missing after export")
    return sidecar


def register(model_dir: str, onnx_dir: str, eval_dir: str, params_json: str, overrides: str,
             report_path: str) -> dict[str, Any]:
    """Register the trained model (with its export and evaluation) in MLflow under name and alias."""
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        text = run_verb(["register", "--params", params, "--train", model_dir, "--export", onnx_dir,
                         "--eval", Path(eval_dir) / "summary.json"])
        reg = load_params(params).register
    name, alias = reg.model_name, reg.alias
    Path(report_path).write_text(f"# Model registry\n\n`models:/{name}@{alias}`\n\n```\n{text.strip()}\n```\n")
    return {"model_uri": f"models:/{name}@{alias}"}
