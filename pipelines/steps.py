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

import dataclasses
import hashlib
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

from masksam.components.params import Params, apply_overrides, params_from_dict
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
    try:  # JSON (what the pipeline carries) first: YAML 1.1 reads JSON's 1e-08 as a string
        raw = json.loads(params_json) if params_json.strip() else {}
    except json.JSONDecodeError:
        try:  # a pasted params.yaml also works
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
        raise VerbFailed(f"`masksam {' '.join(argv)}` failed with exit status {proc.returncode} "
                         "(its message is above)")
    return proc.stdout


class VerbFailed(RuntimeError):
    """A `masksam` verb exited non-zero; it has printed its own one-line message."""


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


# Typed pipeline parameters (name in params.yaml -> value); 0 / 0.0 / "" mean "params.yaml's value".
UNSET = (None, "", 0, 0.0)


def resolve_inputs(params_json: str, overrides: str | dict | None, typed: dict[str, Any], repo_url: str,
                   rev: str, path: str) -> tuple[str, str]:
    """The run's effective params and what defines its raw data, both as canonical JSON.

    Effective params: the compiled-in params text, then the typed pipeline parameters that are
    set, then the free-form overrides (last wins), checked with the loader every verb uses.
    The data spec names the data and nothing else, so the (cached) data step's cache key
    changes exactly when the data would: for a DVC dataset the repository, the path and the
    commit the revision resolves to now (a moved branch is new data); for the phantom the
    ``data`` section of the params. A real ``data.source`` without a DVC repository is refused,
    never silently replaced by generated data.
    """
    merged = {k: v for k, v in typed.items() if v not in UNSET}
    merged.update(parse_overrides(overrides))
    raw, params = effective_params(params_json, merged)
    effective = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    if repo_url:
        commit = resolve_dvc_commit(repo_url, rev, path)
        spec = {"source": "dvc", "repo_url": repo_url, "rev": rev or "HEAD", "commit": commit, "path": path}
    elif params.data.source != "phantom":
        raise UserError(
            f"data.source is {params.data.source!r}, but no DVC repository was given: set the pipeline "
            "parameters data_repo_url (and data_path, data_rev) to the DVC-tracked raw dataset, or "
            "data.source: phantom for the generated demo data")
    else:
        data = {k: v for k, v in dataclasses.asdict(params.data).items() if k not in ("out", "src")}
        spec = {"source": "phantom", "data": data}
    return effective, json.dumps(spec, sort_keys=True, separators=(",", ":"))


def fetch_data(data_spec: str, out_dir: str) -> dict[str, Any]:
    """Materialise the raw dataset a :func:`resolve_inputs` spec names; return its identity.

    Deterministic for a given spec (the phantom is seeded; a DVC dataset is read at a fixed
    commit), which is what lets the cached data step stand for the data it names.
    """
    spec = json.loads(data_spec)
    if spec["source"] == "dvc":
        fetch_dvc_dataset(spec["repo_url"], spec["commit"], spec["path"], out_dir)
        run_verb(["data", "manifest", out_dir, "--no-progress"])
        lineage = {k: spec[k] for k in ("repo_url", "rev", "commit", "path")}
        return {"source": "dvc", **lineage, **dataset_identity(out_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump({"data": spec["data"]}, sort_keys=False))
        run_verb(["data", "phantom", "--params", params, "--out", out_dir, "--no-progress"])
    run_verb(["data", "manifest", out_dir, "--no-progress"])
    return {"source": "phantom", **dataset_identity(out_dir)}


def _open_dvc(repo_url: str, rev: str):
    """A ``DVCFileSystem`` of ``repo_url`` at ``rev`` and the commit it resolved to."""
    from dvc.api import DVCFileSystem

    fs = None
    try:
        fs = DVCFileSystem(repo_url, rev=rev or None)
        return fs, fs.repo.get_rev()  # resolving the revision is lazy: a bad one fails here
    except Exception as exc:  # dvc/scmrepo raise many types for bad URLs and revisions
        if fs is not None:
            fs.close()
        raise UserError(f"cannot open DVC repository {repo_url!r} at revision {rev or 'HEAD'!r}: {exc}") from exc


def resolve_dvc_commit(repo_url: str, rev: str, path: str) -> str:
    """The commit ``rev`` of ``repo_url`` points at now, checking that ``path`` exists there."""
    fs, commit = _open_dvc(repo_url, rev)
    try:
        if not fs.exists(path):
            raise UserError(f"{repo_url}@{rev or 'HEAD'}: no path {path!r} (give the DVC-tracked raw dataset folder)")
    finally:
        fs.close()
    return commit


def fetch_dvc_dataset(repo_url: str, rev: str, path: str, out_dir: str | os.PathLike) -> str:
    """Materialise the DVC-tracked folder ``path`` of ``repo_url`` at ``rev``; return the commit.

    Uses ``dvc.api.DVCFileSystem`` (what ``dvc get`` uses): files come from the repository's
    DVC remote, or its cache for a local repository. ``rev`` empty means the default branch;
    the commit it resolved to is returned so the run records exactly what it trained on.
    """
    out = Path(out_dir)
    fs, commit = _open_dvc(repo_url, rev)
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
    """``train_summary.json`` of a training directory; missing means training did not finish."""
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


def training_key(params_text: str, data_dir: str | os.PathLike) -> str:
    """What names one training: the effective params and the preprocessed data's plan, split and
    case files. A retried or restarted task computes the same key, so it finds its checkpoints."""
    data = Path(data_dir)
    h = hashlib.sha256(params_text.encode())
    for name in ("plan.json", "splits.json"):
        if (data / name).is_file():
            h.update(b"\0" + (data / name).read_bytes())
    for case in sorted((data / "cases").glob("*.npz")):
        h.update(f"\0{case.name}:{case.stat().st_size}".encode())
    return h.hexdigest()[:16]


# Left on the checkpoint volume, not copied into the Model artifact (only a resume needs them).
RESUME_ONLY = ("checkpoint_last.pt", "checkpoint_best.pt")


def train(data_dir: str, raw_dir: str, out_dir: str, params_json: str, overrides: str,
          report_path: str, checkpoint_root: str = "") -> dict[str, Any]:
    """Train on the preprocessed dataset; return the summary; report the curve.

    With ``checkpoint_root`` (a persistent volume on a cluster) training writes into
    ``checkpoint_root/<training_key>/``, resuming with ``--resume`` when a checkpoint is there:
    a restarted pod or a retried task continues from its last checkpoint, not from step 0. The
    finished directory, less the resume-only checkpoints, becomes ``out_dir`` (the artifact).
    """
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        work = Path(out_dir)
        if checkpoint_root:
            work = Path(checkpoint_root) / training_key(params.read_text() + "\0" + raw_dir_identity(raw_dir),
                                                        data_dir)
        resume = ["--resume"] if (work / "checkpoint_last.pt").is_file() else []
        if resume:
            log.info("resuming the training in %s", work)
        run_verb(["train", "--params", params, "--preprocessed", data_dir, "--raw", raw_dir,
                  "--out", work, "--no-progress", *resume])
    if work != Path(out_dir):
        if Path(out_dir).exists():
            shutil.rmtree(out_dir)
        shutil.copytree(work, out_dir, ignore=shutil.ignore_patterns(*RESUME_ONLY, ".masksam-*"))
    summary = read_train_summary(out_dir)
    Path(report_path).write_text(train_report_html(out_dir, summary))
    return summary


def raw_dir_identity(raw_dir: str | os.PathLike) -> str:
    """The raw dataset's manifest hash ('' when it has none): part of the training key."""
    manifest = _read_json(Path(raw_dir) / "manifest.json") or {}
    return str(manifest.get("dataset_sha256", ""))


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


def baseline(raw_dir: str, data_dir: str, out_dir: str, params_json: str, report_path: str) -> dict[str, Any]:
    """Train and evaluate nnU-Net v2 on the same split and test cases (``masksam baseline``);
    logged to MLflow beside MaskSAM's runs."""
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, "{}", tmp)
        run_verb(["baseline", "--params", params, "--raw", raw_dir, "--preprocessed", data_dir, "--out", out_dir,
                  "--mlflow", "--no-progress"])
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    fg = summary.get("foreground_mean", {})
    Path(report_path).write_text(f"# nnU-Net baseline\n\n{summary.get('method')}: {summary.get('n_cases')} test cases, "
                                 f"foreground mean Dice {fg.get('Dice')}, HD95 {fg.get('HD95')} mm, NSD {fg.get('NSD')}\n")
    return summary


def compare(eval_dir: str, baseline_dir: str, out_dir: str, params_json: str, report_path: str) -> dict[str, Any]:
    """MaskSAM's evaluation against the baseline's, paired per case (``masksam compare``)."""
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, "{}", tmp)
        run_verb(["compare", str(Path(eval_dir) / "summary.json"), str(Path(baseline_dir) / "summary.json"),
                  "--out", out_dir, "--names", "MaskSAM", "nnU-Net", "--params", params, "--mlflow"])
    Path(report_path).write_text((Path(out_dir) / "compare.md").read_text())
    return json.loads((Path(out_dir) / "compare.json").read_text())


def register(model_dir: str, onnx_dir: str, eval_dir: str, params_json: str, overrides: str,
             report_path: str) -> dict[str, Any]:
    """Register the trained model (with its export and evaluation) in MLflow under name and alias."""
    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(params_json, overrides, tmp)
        result = Path(tmp) / "register.json"
        text = run_verb(["register", "--params", params, "--train", model_dir, "--export", onnx_dir,
                         "--eval", Path(eval_dir) / "summary.json", "--result", str(result)])
        decision = json.loads(result.read_text())
    # the version this run registered and the alias it really got (challenger below the Dice
    # floor or behind the champion), not the alias the params asked for
    uri, alias = decision["model_uri"], decision["alias"]
    Path(report_path).write_text(f"# Model registry\n\n`{uri}` -> `@{alias}` ({decision['reason']})\n\n"
                                 f"```\n{text.strip()}\n```\n")
    return {"model_uri": uri, "alias": alias}
