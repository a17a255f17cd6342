"""`masksam compare`: paired statistics between two evaluations of the same test cases.

Two summary.json files written by ``masksam evaluate`` (one per method, e.g. MaskSAM and the
nnU-Net baseline of ``masksam baseline``) scored the same cases; this step answers "is A better
than B here, and is the difference real?". For every class and for the foreground mean, and for
Dice, HD95 and NSD, it reports

- ``mean_a``, ``mean_b``: the means over the cases used (see below);
- ``diff``: the mean paired difference A - B (positive: A scores higher; for HD95, where lower
  is better, positive means A is *worse*);
- ``ci95``: a percentile bootstrap 95% confidence interval of that mean difference (cases
  resampled with replacement, ``bootstrap`` resamples, numpy's ``default_rng(seed)``: the same
  inputs and seed give the same interval);
- ``p_wilcoxon``: the two-sided Wilcoxon signed-rank p-value, ``scipy.stats.wilcoxon(a, b)``
  with scipy's default options (zero differences dropped, exact distribution for small n);
- ``n``: the number of case pairs used.

Conventions, written into ``compare_meta.json`` too:

- A metric undefined for a case (NaN/null in the summary: the class is absent from reference
  and prediction, so Dice, HD95 and NSD are all undefined) in A *or* B drops that case's pair
  for that class and metric; ``n`` counts the pairs kept, ``n_dropped`` the pairs dropped.
- The foreground mean of a case is the mean over its classes with a defined value, for each
  method on its own (as each summary's own means ignore NaN), then paired over cases.
- When every paired difference is zero (all ties), scipy's answer is reported: scipy 1.17
  returns p = 1.0 (statistic 0); no difference is the honest reading.
- With fewer than 6 non-zero differences no two-sided p below 0.05 is reachable (the exact
  test's smallest p is 2 / 2**n): such entries carry a ``note`` saying so, and so does the table.

Outputs in ``--out DIR``: ``compare.json`` (class name -> metric -> the keys above, the
foreground mean under ``foreground_mean``), ``compare.md`` (a Markdown table), ``compare.csv``,
``paired.png`` (per-case lines A -> B of the foreground mean, and per-class differences with
their intervals) and ``compare_meta.json`` (inputs, names, seed, resamples, conventions).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from masksam.components._io import atomic_path, ensure_writable_dir, read_json, write_json
from masksam.errors import UserError

log = logging.getLogger(__name__)

COMPARED_METRICS = ("Dice", "HD95", "NSD")
FOREGROUND = "foreground_mean"
#: Fewest non-zero paired differences for which a two-sided exact Wilcoxon p < 0.05 exists.
MIN_N_FOR_SIGNIFICANCE = 6
_BOOTSTRAP_CHUNK = 1000


# ----------------------------------------------------------------------------- inputs


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Read an evaluate summary.json into ``{"labels": {id: name}, "cases": {case: {id: {metric:
    float}}}, "conventions": {...}}``, nulls (NaN written by evaluate) as NaN.

    A file that is not a summary of ``masksam evaluate`` is a UserError naming what is missing.
    """
    path = Path(path)
    data = read_json(path, "summary file")
    if not isinstance(data, dict) or not isinstance(data.get("metric_per_case"), list) \
            or not isinstance(data.get("labels"), dict):
        raise UserError(f"{path} is not a summary.json of `masksam evaluate` (it needs 'metric_per_case' "
                        "and 'labels'); give the summary.json written by masksam evaluate or masksam baseline")
    labels = {str(k): str(v) for k, v in data["labels"].items()}
    cases: dict[str, dict[str, dict[str, float]]] = {}
    for entry in data["metric_per_case"]:
        case = entry.get("case")
        if case in cases:
            raise UserError(f"{path}: case {case!r} is listed twice in metric_per_case")
        scores = entry.get("metrics") or {}
        cases[case] = {
            label: {m: _as_float((scores.get(label) or {}).get(m), path, case, label, m) for m in COMPARED_METRICS}
            for label in labels
        }
    if not cases:
        raise UserError(f"{path}: metric_per_case is empty; nothing to compare")
    runs = {k: str(data[k]) for k in ("train_run_id", "mlflow_run_id") if data.get(k)}
    return {"labels": labels, "cases": cases, "conventions": data.get("conventions") or {}, "runs": runs}


def _as_float(value: Any, path: Path, case: str, label: str, metric: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{path}: case {case!r} label {label} {metric} is {value!r}, not a number")
    return float(value)


def check_comparable(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str, name_b: str) -> None:
    """Refuse two summaries of different cases, classes or scoring conventions, naming the difference."""
    only_a = sorted(set(a["cases"]) - set(b["cases"]))
    only_b = sorted(set(b["cases"]) - set(a["cases"]))
    if only_a or only_b:
        raise UserError(
            f"{name_a} and {name_b} do not score the same cases: only in {name_a}: {_few(only_a)}; "
            f"only in {name_b}: {_few(only_b)}. A paired comparison needs the same test cases: "
            "evaluate both methods on the same splits.json test set"
        )
    if a["labels"] != b["labels"]:
        raise UserError(f"{name_a} and {name_b} score different classes ({a['labels']} vs {b['labels']}); "
                        "compare evaluations of the same dataset")
    if FOREGROUND in a["labels"].values():
        raise UserError(f"a class is named {FOREGROUND!r}, which compare.json uses for the foreground mean; "
                        "rename the class in dataset.json")
    for key in ("hd_convention", "nsd_tolerance_mm", "surface_connectivity"):
        va, vb = a["conventions"].get(key), b["conventions"].get(key)
        if va is not None and vb is not None and va != vb:
            raise UserError(f"{name_a} and {name_b} were scored with different {key} ({va} vs {vb}); "
                            "re-run masksam evaluate on one of them with the other's setting")


def _few(items: Sequence[str], k: int = 10) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(diffs: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``diffs`` (cases resampled with
    replacement), from ``numpy.random.default_rng(seed)``; NaN for no data."""
    diffs = np.asarray(diffs, dtype=float)
    if diffs.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        stop = min(resamples, start + _BOOTSTRAP_CHUNK)
        idx = rng.integers(0, diffs.size, size=(stop - start, diffs.size))
        means[start:stop] = diffs[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """``scipy.stats.wilcoxon(a, b).pvalue`` with scipy's defaults; NaN when there is no pair.
    All-zero differences give scipy's own answer (1.0 in scipy 1.17), its warning silenced."""
    from scipy.stats import wilcoxon

    if len(a) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            return float(wilcoxon(a, b).pvalue)
        except ValueError:
            return math.nan


def paired_stats(a: Sequence[float], b: Sequence[float], resamples: int, seed: int) -> dict[str, Any]:
    """The statistics of one class and metric over paired per-case values (NaN pairs dropped)."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    d = a_arr - b_arr
    n, nonzero = int(d.size), int(np.count_nonzero(d))
    stats: dict[str, Any] = {
        "mean_a": float(a_arr.mean()) if n else math.nan,
        "mean_b": float(b_arr.mean()) if n else math.nan,
        "diff": float(d.mean()) if n else math.nan,
        "ci95": list(bootstrap_ci(d, resamples, seed)),
        "p_wilcoxon": wilcoxon_p(a_arr, b_arr),
        "n": n,
        "n_dropped": int((~keep).sum()),
        "n_nonzero": nonzero,
    }
    note = small_n_note(n, nonzero)
    if note:
        stats["note"] = note
    return stats


def small_n_note(n: int, nonzero: int) -> str | None:
    """A plain sentence when the Wilcoxon test cannot mean anything at this n, else None."""
    if n == 0:
        return "no case has this metric defined in both: nothing to compare"
    if nonzero == 0:
        return "every paired difference is zero (all ties): no difference to test"
    if nonzero < MIN_N_FOR_SIGNIFICANCE:
        return (f"only {nonzero} non-zero paired differences: the smallest reachable two-sided p is "
                f"{2.0 / 2 ** nonzero:.3g}, so p < 0.05 is impossible; the test cannot mean anything here "
                f"(use {MIN_N_FOR_SIGNIFICANCE} or more test cases)")
    return None


def per_case_values(summary: Mapping[str, Any], cases: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """``{class name or foreground_mean: {metric: [value per case in ``cases`` order]}}``."""
    labels = summary["labels"]
    out: dict[str, dict[str, list[float]]] = {FOREGROUND: {m: [] for m in COMPARED_METRICS}}
    for label, name in labels.items():
        out[name] = {m: [summary["cases"][c][label][m] for c in cases] for m in COMPARED_METRICS}
    for case in cases:
        for m in COMPARED_METRICS:
            values = [summary["cases"][case][label][m] for label in labels]
            defined = [v for v in values if not math.isnan(v)]
            out[FOREGROUND][m].append(float(np.mean(defined)) if defined else math.nan)
    return out


def compare_summaries(a: Mapping[str, Any], b: Mapping[str, Any], *, resamples: int = 10000,
                      seed: int = 0) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Any]]:
    """``(results, values)``: results as compare.json holds them (class -> metric -> stats, the
    foreground mean first) and the paired per-case values behind them (for the plot)."""
    cases = sorted(a["cases"])
    va, vb = per_case_values(a, cases), per_case_values(b, cases)
    results = {
        name: {m: paired_stats(va[name][m], vb[name][m], resamples, seed) for m in COMPARED_METRICS}
        for name in va
    }
    return results, {"cases": cases, "a": va, "b": vb}


# ----------------------------------------------------------------------------- outputs


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _rows(results: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, per_metric in results.items():
        for m, s in per_metric.items():
            rows.append([name, m, s["n"], s["mean_a"], s["mean_b"], s["diff"], s["ci95"][0], s["ci95"][1],
                         s["p_wilcoxon"], s["n_dropped"], s.get("note", "")])
    return rows


def write_markdown(results: Mapping[str, Any], path: Path, name_a: str, name_b: str, n_cases: int,
                   resamples: int, seed: int) -> Path:
    """The comparison as a Markdown table, with the conventions and small-n warnings spelled out."""
    lines = [
        f"# {name_a} vs {name_b}: paired comparison on {n_cases} cases",
        "",
        f"diff = mean over cases of ({name_a} - {name_b}); for HD95 (mm, lower is better) a positive "
        f"diff means {name_a} is worse. 95% CI: percentile bootstrap of the mean difference "
        f"({resamples} resamples, seed {seed}). p: two-sided Wilcoxon signed-rank test "
        "(scipy.stats.wilcoxon, default options). n: cases with the metric defined in both.",
        "",
        f"| class | metric | n | {name_a} | {name_b} | diff | 95% CI | p (Wilcoxon) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    notes: dict[str, list[str]] = {}  # one line per distinct reason, naming the rows it applies to
    for name, metric, n, ma, mb, d, lo, hi, p, _dropped, note in _rows(results):
        mark = " *" if note else ""
        lines.append(f"| {name} | {metric} | {n}{mark} | {_fmt(ma)} | {_fmt(mb)} | {_fmt(d)} | "
                     f"[{_fmt(lo)}, {_fmt(hi)}] | {_fmt(p, 3)} |")
        if note:
            notes.setdefault(note, []).append(f"{name} {metric}")
    if notes:
        lines += ["", "\\* Where the Wilcoxon test cannot tell anything:", "",
                  *(f"- {', '.join(rows)}: {note}" for note, rows in notes.items())]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def write_csv(results: Mapping[str, Any], path: Path) -> Path:
    """One row per class and metric (long format, ready for pandas)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "metric", "n", "mean_a", "mean_b", "diff", "ci95_low", "ci95_high",
                         "p_wilcoxon", "n_dropped", "note"])
        for row in _rows(results):
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return path


def write_paired_plot(results: Mapping[str, Any], values: Mapping[str, Any], path: Path,
                      name_a: str, name_b: str) -> Path:
    """Top row: per-case lines A -> B of the foreground mean per metric. Bottom row: per-class
    paired differences (dots) with the mean and its bootstrap 95% interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = list(results)
    fig = Figure(figsize=(max(10.0, 0.5 * len(classes) * 3), 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(COMPARED_METRICS), squeeze=False)
    for j, m in enumerate(COMPARED_METRICS):
        ax = axes[0][j]
        for ya, yb in zip(values["a"][FOREGROUND][m], values["b"][FOREGROUND][m]):
            if not (math.isnan(ya) or math.isnan(yb)):
                ax.plot([0, 1], [ya, yb], "-o", color="tab:gray", alpha=0.6, markersize=3)
        s = results[FOREGROUND][m]
        ax.plot([0, 1], [s["mean_a"], s["mean_b"]], "-o", color="tab:red", linewidth=2, label="mean")
        ax.set_xticks([0, 1], [name_a, name_b])
        ax.set_xlim(-0.3, 1.3)
        ax.set_title(f"{m}, foreground mean per case (n={s['n']})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        _difference_panel(axes[1][j], results, values, m, name_a, name_b)
    return _save_png(fig, path)


def _difference_panel(ax, results: Mapping[str, Any], values: Mapping[str, Any], metric: str,
                      name_a: str, name_b: str) -> None:
    classes = list(results)
    for i, name in enumerate(classes):
        d = np.asarray(values["a"][name][metric]) - np.asarray(values["b"][name][metric])
        d = d[~np.isnan(d)]
        jitter = np.linspace(-0.15, 0.15, d.size) if d.size > 1 else np.zeros(d.size)
        ax.plot(i + jitter, d, ".", color="tab:gray", alpha=0.6)
        s = results[name][metric]
        if s["n"]:
            lo, hi = s["ci95"]
            ax.errorbar([i], [s["diff"]], yerr=[[s["diff"] - lo], [hi - s["diff"]]], fmt="o",
                        color="tab:red", capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric}: {name_a} - {name_b}")
    ax.grid(axis="y", alpha=0.3)


def _save_png(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ----------------------------------------------------------------------------- API


def compare(summary_a: str | os.PathLike, summary_b: str | os.PathLike, out_dir: str | os.PathLike, *,
            names: Sequence[str] | None = None, resamples: int = 10000, seed: int = 0,
            mlflow_log: bool = False, experiment: str = "masksam") -> dict[str, Any]:
    """Compare two evaluate summaries of the same cases; write compare.json, compare.md,
    compare.csv, paired.png and compare_meta.json into ``out_dir`` (and, with ``mlflow_log``,
    log them as an MLflow run linked to both methods' runs); return compare.json's content."""
    if resamples < 1:
        raise UserError(f"--bootstrap must be at least 1, got {resamples}")
    name_a, name_b = default_names(summary_a, summary_b) if not names else tuple(names)
    if name_a == name_b:
        raise UserError(f"--names gives both methods the name {name_a!r}; give two different names")
    a, b = read_summary(summary_a), read_summary(summary_b)
    check_comparable(a, b, name_a, name_b)
    out = ensure_writable_dir(Path(out_dir), "output folder (--out)")
    results, values = compare_summaries(a, b, resamples=resamples, seed=seed)
    n_cases = len(values["cases"])
    write_json(out / "compare.json", _json_safe(results))
    write_json(out / "compare_meta.json", {
        "a": {"name": name_a, "summary": str(summary_a)},
        "b": {"name": name_b, "summary": str(summary_b)},
        "cases": values["cases"],
        "bootstrap": resamples,
        "seed": seed,
        "diff": "mean over cases of (a - b)",
        "ci95": "percentile bootstrap (2.5, 97.5) of the mean paired difference, numpy default_rng(seed)",
        "p_wilcoxon": "scipy.stats.wilcoxon(a, b) with default options (two-sided, zero differences "
                      "dropped); all ties: scipy's value (1.0)",
        "nan": "a pair with the metric undefined (null) on either side is dropped; n counts the pairs used",
        "foreground_mean": "per case, each method's mean over its classes with a defined value; then paired",
        "conventions_a": a["conventions"],
    })
    write_markdown(results, out / "compare.md", name_a, name_b, n_cases, resamples, seed)
    write_csv(results, out / "compare.csv")
    write_paired_plot(results, values, out / "paired.png", name_a, name_b)
    for m in COMPARED_METRICS:
        s = results[FOREGROUND][m]
        log.info("%s foreground mean: %s %.4f vs %s %.4f, diff %.4f [%.4f, %.4f], p %.3g, n %d", m, name_a,
                 s["mean_a"], name_b, s["mean_b"], s["diff"], *s["ci95"], s["p_wilcoxon"], s["n"])
    if mlflow_log:
        run_id = log_comparison(results, out, a, b, name_a, name_b, experiment)
        log.info("logged the comparison as MLflow run %s", run_id)
    if any("note" in s for per in results.values() for s in per.values()):
        log.warning("some entries have too few cases for the Wilcoxon test to mean anything: see the notes "
                    "in %s", out / "compare.md")
    return _json_safe(results)


def log_comparison(results: Mapping[str, Any], out_dir: str | os.PathLike, a: Mapping[str, Any],
                   b: Mapping[str, Any], name_a: str, name_b: str, experiment: str = "masksam") -> str:
    """Log the comparison as its own MLflow run (every diff and p-value as a metric, the table and
    the plot as artifacts), linked both ways by tags to the two methods' runs where the summaries
    name them (``train_run_id`` of a MaskSAM evaluation, ``mlflow_run_id`` of a baseline).
    Returns the run id."""
    import mlflow
    from mlflow import MlflowClient

    from masksam.components._tracking import (ensure_experiment, metric_name, run_context_tags, tracking_uri,
                                              unique_metric_names)

    client = MlflowClient(tracking_uri(None))
    linked = {name: (summary.get("runs") or {}).get("train_run_id") or (summary.get("runs") or {}).get("mlflow_run_id")
              for name, summary in ((name_a, a), (name_b, b))}
    tags = {"step": "compare", "compare.a": name_a, "compare.b": name_b,
            **{f"compare.run.{metric_name(n)}": str(r) for n, r in linked.items() if r}}
    classes = unique_metric_names(results)
    metrics = {f"{classes[cls]}.{m}.{key}": float(v) for cls, per in results.items() for m, s in per.items()
               for key, v in (("diff", s["diff"]), ("p_wilcoxon", s["p_wilcoxon"]), ("n", s["n"]))
               if v is not None and v == v}
    exp_id = ensure_experiment(client, experiment)
    run = client.create_run(exp_id, run_name=f"compare-{metric_name(name_a)}-vs-{metric_name(name_b)}",
                            tags=run_context_tags("masksam compare", tags))
    run_id = run.info.run_id
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        for name in ("compare.json", "compare.md", "compare.csv", "paired.png"):
            if (Path(out_dir) / name).is_file():
                mlflow.log_artifact(str(Path(out_dir) / name))
    for name, other in linked.items():
        if other:
            try:
                client.set_tag(other, f"compare_run_id.{metric_name(name_b if name == name_a else name_a)}", run_id)
            except Exception as exc:  # a run in another store: the link from this side remains
                log.warning("cannot tag run %s of %s with the comparison (%s)", other, name, str(exc)[:200])
    return run_id


def default_names(summary_a: str | os.PathLike, summary_b: str | os.PathLike) -> tuple[str, str]:
    """The folders holding the two summaries (``data/eval``, ``data/baseline`` -> eval, baseline),
    or A and B when those are the same."""
    pa, pb = Path(summary_a).absolute().parent.name, Path(summary_b).absolute().parent.name
    return (pa, pb) if pa and pb and pa != pb else ("A", "B")


# ----------------------------------------------------------------------------- CLI


def _run_cli(args: argparse.Namespace) -> int:
    from masksam.components.params import params_from_args, pick

    params = params_from_args(args).compare
    resamples = int(pick(args.bootstrap, params.bootstrap))
    seed = int(pick(args.seed, params.seed))
    results = compare(args.summary_a, args.summary_b, args.out, names=args.names, resamples=resamples, seed=seed,
                      mlflow_log=args.mlflow, experiment=params_from_args(args).train.experiment)
    fg = results[FOREGROUND]["Dice"]
    print(f"foreground mean Dice diff {_fmt(fg['diff'])} (95% CI [{_fmt(fg['ci95'][0])}, {_fmt(fg['ci95'][1])}], "
          f"Wilcoxon p {_fmt(fg['p_wilcoxon'], 3)}, n {fg['n']}); wrote {args.out}/compare.md")
    if "note" in fg:
        print(f"note: {fg['note']}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` verb."""
    from masksam.components.params import add_params_arguments

    p = subparsers.add_parser(
        "compare",
        help="paired comparison of two evaluations of the same cases (bootstrap CI, Wilcoxon)",
        description="Compare two summary.json files of `masksam evaluate` (or `masksam baseline`) that "
        "scored the same cases: per class and for the foreground mean, for Dice, HD95 and NSD, the "
        "mean of A and of B, the mean paired difference A - B, its bootstrap 95%% confidence interval "
        "and the Wilcoxon signed-rank p-value (scipy.stats.wilcoxon), with the number of cases. "
        "Writes compare.json, compare.md, compare.csv, paired.png and compare_meta.json into --out.",
    )
    p.add_argument("summary_a", metavar="A.json", help="summary.json of method A (e.g. data/eval/summary.json)")
    p.add_argument("summary_b", metavar="B.json", help="summary.json of method B (e.g. data/baseline/summary.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), default=None,
                   help="names of the two methods in the table and plot (default: the folders "
                   "holding the two summaries)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help="bootstrap resamples of the confidence intervals (default: compare.bootstrap "
                   "of --params, 10000)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the bootstrap (default: compare.seed of --params, 0)")
    p.add_argument("--mlflow", action="store_true", help="also log the comparison as an MLflow run (experiment "
                   "train.experiment, server MLFLOW_TRACKING_URI), linked by tags to both methods' runs")
    add_params_arguments(p)
    p.set_defaults(func=_run_cli)
