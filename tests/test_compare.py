"""`masksam compare`: paired statistics checked against scipy on synthetic summaries with known
differences (ties, a class absent from some cases, NaN HD95), refused mismatched inputs, the
output files, and a summary written by the real evaluator."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import wilcoxon

from masksam.cli import main
from masksam.components import compare as C
from masksam.components.evaluate import evaluate_folders
from masksam.errors import UserError

LABELS = {"1": "liver", "2": "spleen", "3": "tumour"}
CASES = [f"case_{i:03d}" for i in range(10)]


def summary(values: dict[str, dict[str, list]], cases=CASES, conventions=None) -> dict:
    """An evaluate-shaped summary: ``values[label][metric]`` = per-case list (None = NaN)."""
    per_case = []
    for i, case in enumerate(cases):
        metrics = {label: {m: values[label][m][i] for m in C.COMPARED_METRICS} for label in LABELS}
        per_case.append({"case": case, "prediction_missing": False, "metrics": metrics})
    return {"metric_per_case": per_case, "labels": LABELS, "n_cases": len(cases),
            "conventions": conventions or {"hd_convention": "medpy", "nsd_tolerance_mm": 2.0}}


def make_pair(rng: np.random.Generator):
    """A and B with known structure per class:
    liver: A = B + 0.05 exactly plus noise (a clear difference);
    spleen: identical in A and B (all ties);
    tumour: absent (null) from cases 0-3 in both; HD95 null in A only for case 4 (empty mask)."""
    n = len(CASES)
    base = rng.uniform(0.6, 0.9, n)
    noise = rng.normal(0, 0.01, n)
    hd = rng.uniform(2, 20, n)
    a = {"liver": {"Dice": base + 0.05 + noise, "HD95": hd - 1.0, "NSD": base + 0.03},
         "spleen": {"Dice": base, "HD95": hd, "NSD": base},
         "tumour": {"Dice": rng.uniform(0.2, 0.6, n), "HD95": rng.uniform(5, 30, n), "NSD": rng.uniform(0.2, 0.6, n)}}
    b = {"liver": {"Dice": base, "HD95": hd, "NSD": base},
         "spleen": {"Dice": base.copy(), "HD95": hd.copy(), "NSD": base.copy()},
         "tumour": {"Dice": rng.uniform(0.2, 0.6, n), "HD95": rng.uniform(5, 30, n), "NSD": rng.uniform(0.2, 0.6, n)}}
    out = []
    for v in (a, b):
        lists = {}
        for name, per_metric in v.items():
            label = next(k for k, n_ in LABELS.items() if n_ == name)
            lists[label] = {m: [float(x) for x in arr] for m, arr in per_metric.items()}
            if name == "tumour":
                for m in C.COMPARED_METRICS:
                    lists[label][m][:4] = [None] * 4
        out.append(lists)
    out[0]["3"]["HD95"][4] = None  # A predicted nothing where B found something: HD95 undefined in A
    return out[0], out[1]


def write_summaries(tmp_path, a_values, b_values, b_cases=CASES, b_conventions=None):
    pa, pb = tmp_path / "masksam" / "summary.json", tmp_path / "nnunet" / "summary.json"
    for path, data in ((pa, summary(a_values)), (pb, summary(b_values, b_cases, b_conventions))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return pa, pb


def _finite(values):
    return np.asarray([math.nan if v is None else v for v in values], dtype=float)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One comparison (with its files) shared by the read-only tests below."""
    tmp_path = tmp_path_factory.mktemp("pair")
    a, b = make_pair(np.random.default_rng(0))
    pa, pb = write_summaries(tmp_path, a, b)
    results = C.compare(pa, pb, tmp_path / "out", resamples=2000, seed=0)
    return a, b, results, tmp_path / "out"


def test_every_class_and_metric_matches_scipy_on_the_pairs_defined_in_both(pair) -> None:
    a, b, results, _ = pair
    for label, name in LABELS.items():
        for m in C.COMPARED_METRICS:
            xa, xb = _finite(a[label][m]), _finite(b[label][m])
            keep = ~(np.isnan(xa) | np.isnan(xb))
            s = results[name][m]
            assert s["n"] == keep.sum() and s["n_dropped"] == (~keep).sum()
            assert s["mean_a"] == pytest.approx(xa[keep].mean())
            assert s["mean_b"] == pytest.approx(xb[keep].mean())
            assert s["diff"] == pytest.approx((xa[keep] - xb[keep]).mean())
            with np.errstate(all="ignore"):
                expected_p = wilcoxon(xa[keep], xb[keep]).pvalue
            assert s["p_wilcoxon"] == pytest.approx(expected_p)


def test_known_difference_is_found_and_its_interval_holds_it(pair) -> None:
    _, _, results, _ = pair
    liver = results["liver"]["Dice"]
    assert liver["diff"] == pytest.approx(0.05, abs=0.01)
    assert liver["ci95"][0] < liver["diff"] < liver["ci95"][1]
    assert liver["ci95"][0] > 0.03 and liver["ci95"][1] < 0.07
    assert liver["p_wilcoxon"] < 0.01  # 10 of 10 positive differences: exact p = 2 / 2**10
    assert "note" not in liver
    hd = results["liver"]["HD95"]  # A is exactly 1 mm closer in every case
    assert hd["diff"] == pytest.approx(-1.0) and hd["ci95"] == pytest.approx([-1.0, -1.0])


def test_all_ties_give_scipys_p_and_say_so(pair) -> None:
    _, _, results, _ = pair
    spleen = results["spleen"]["Dice"]
    assert spleen["diff"] == 0.0 and spleen["ci95"] == [0.0, 0.0]
    assert spleen["p_wilcoxon"] == 1.0  # scipy 1.17's answer for all-zero differences
    assert spleen["n"] == 10 and spleen["n_nonzero"] == 0
    assert "all ties" in spleen["note"]


def test_absent_class_and_nan_hd95_drop_pairs_and_n_says_how_many(pair) -> None:
    _, _, results, _ = pair
    tumour = results["tumour"]
    assert tumour["Dice"]["n"] == 6 and tumour["Dice"]["n_dropped"] == 4
    assert tumour["HD95"]["n"] == 5 and tumour["HD95"]["n_dropped"] == 5
    assert "p < 0.05 is impossible" in tumour["HD95"]["note"]  # 5 pairs: smallest p 0.0625
    assert "note" not in tumour["Dice"] or "impossible" not in tumour["Dice"]["note"]


def test_foreground_mean_is_paired_over_per_case_means_of_the_defined_classes(pair) -> None:
    a, b, results, _ = pair
    for m in C.COMPARED_METRICS:
        per_case = []
        for values in (a, b):
            rows = np.stack([_finite(values[label][m]) for label in LABELS])
            per_case.append(np.nanmean(rows, axis=0))
        s = results["foreground_mean"][m]
        assert s["n"] == 10
        assert s["mean_a"] == pytest.approx(per_case[0].mean())
        assert s["diff"] == pytest.approx((per_case[0] - per_case[1]).mean())
        assert s["p_wilcoxon"] == pytest.approx(wilcoxon(per_case[0], per_case[1]).pvalue)


def test_bootstrap_is_seeded_and_matches_a_plain_numpy_bootstrap() -> None:
    d = np.random.default_rng(3).normal(0.02, 0.05, 12)
    assert C.bootstrap_ci(d, 3000, seed=7) == C.bootstrap_ci(d, 3000, seed=7)
    assert C.bootstrap_ci(d, 3000, seed=7) != C.bootstrap_ci(d, 3000, seed=8)
    rng = np.random.default_rng(7)
    means = [d[rng.integers(0, d.size, size=(1000, d.size))].mean(axis=1) for _ in range(3)]
    expected = np.percentile(np.concatenate(means), [2.5, 97.5])
    assert C.bootstrap_ci(d, 3000, seed=7) == pytest.approx(tuple(expected))
    se = d.std(ddof=1) / math.sqrt(d.size)  # roughly the normal interval
    lo, hi = C.bootstrap_ci(d, 3000, seed=7)
    assert lo == pytest.approx(d.mean() - 1.96 * se, abs=0.6 * se)
    assert hi == pytest.approx(d.mean() + 1.96 * se, abs=0.6 * se)


@pytest.mark.parametrize("nonzero,expect_note", [(5, True), (6, False)])
def test_small_n_is_said_plainly(nonzero: int, expect_note: bool) -> None:
    a = [0.5 + 0.01 * i for i in range(nonzero)] + [0.5, 0.5]
    b = [x - 0.1 for x in a[:nonzero]] + [0.5, 0.5]
    s = C.paired_stats(a, b, 100, 0)
    assert s["n"] == nonzero + 2 and s["n_nonzero"] == nonzero
    assert ("note" in s) is expect_note
    assert (s["p_wilcoxon"] < 0.05) is (not expect_note)  # every difference positive: the smallest p


def test_no_pair_defined_is_nan_not_a_crash() -> None:
    s = C.paired_stats([math.nan, 0.4], [0.3, math.nan], 100, 0)
    assert s["n"] == 0 and math.isnan(s["diff"]) and math.isnan(s["p_wilcoxon"]) and "nothing" in s["note"]


def test_mismatched_case_sets_are_refused_naming_the_cases(tmp_path) -> None:
    a, b = make_pair(np.random.default_rng(0))
    cases_b = CASES[:-1] + ["case_999"]
    pa, pb = write_summaries(tmp_path, a, b, b_cases=cases_b)
    with pytest.raises(UserError, match=r"only in A: case_009; only in B: case_999"):
        C.compare(pa, pb, tmp_path / "out", names=["A", "B"])
    assert not (tmp_path / "out").exists()


def test_different_scoring_conventions_are_refused(tmp_path) -> None:
    a, b = make_pair(np.random.default_rng(0))
    pa, pb = write_summaries(tmp_path, a, b, b_conventions={"hd_convention": "monai", "nsd_tolerance_mm": 2.0})
    with pytest.raises(UserError, match="hd_convention"):
        C.compare(pa, pb, tmp_path / "out")


def test_a_file_that_is_not_a_summary_is_refused(tmp_path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"foreground_mean": {}}))
    with pytest.raises(UserError, match="not a summary.json of `masksam evaluate`"):
        C.read_summary(bad)


def test_output_files(pair) -> None:
    _, _, results, out = pair
    data = json.loads((out / "compare.json").read_text())
    assert list(data) == ["foreground_mean", "liver", "spleen", "tumour"]
    for per_metric in data.values():
        assert list(per_metric) == list(C.COMPARED_METRICS)
        for s in per_metric.values():
            assert {"mean_a", "mean_b", "diff", "ci95", "p_wilcoxon", "n"} <= set(s)
    with open(out / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3
    assert float(rows[3]["diff"]) == pytest.approx(results["liver"]["Dice"]["diff"])
    md = (out / "compare.md").read_text()
    assert "| class | metric | n | masksam | nnunet |" in md and "all ties" in md
    assert (out / "paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "compare_meta.json").read_text())
    assert meta["a"]["name"] == "masksam" and meta["bootstrap"] == 2000 and meta["cases"] == CASES


def test_cli_runs_and_help(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the built-in defaults
    a, b = make_pair(np.random.default_rng(1))
    pa, pb = write_summaries(tmp_path, a, b)
    rc = main(["compare", str(pa), str(pb), "--out", "cmp", "--names", "MaskSAM", "nnU-Net",
               "--bootstrap", "500", "--seed", "3"])
    assert rc == 0
    assert "foreground mean Dice diff" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cmp" / "compare_meta.json").read_text())
    assert meta["a"]["name"] == "MaskSAM" and meta["bootstrap"] == 500 and meta["seed"] == 3
    assert main(["compare", str(pa), str(pb), "--out", "cmp2", "--names", "x", "x"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    assert "usage: masksam compare" in capsys.readouterr().out


def _write_label(array: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.0, 1.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_reads_the_summary_the_real_evaluator_writes(tmp_path) -> None:
    """Two prediction folders scored by evaluate_folders, one of them missing spleen everywhere."""
    rng = np.random.default_rng(0)
    for i in range(3):
        gt = np.zeros((6, 16, 16), np.uint8)
        gt[1:5, 2 + i:10, 3:11] = 1
        if i != 1:
            gt[2:4, 11:14, 11:14] = 2
        _write_label(gt, tmp_path / "gt" / f"c{i}.nii.gz")
        good = gt.copy()
        good[rng.random(gt.shape) < 0.02] = 0
        _write_label(good, tmp_path / "good" / f"c{i}.nii.gz")
        _write_label(np.where(gt == 2, 0, gt), tmp_path / "nospleen" / f"c{i}.nii.gz")
    labels = {"background": 0, "liver": 1, "spleen": 2}
    for name in ("good", "nospleen"):
        evaluate_folders(tmp_path / name, tmp_path / "gt", labels, out_json=tmp_path / f"{name}.json",
                         mlflow_log=False)
    results = C.compare(tmp_path / "good.json", tmp_path / "nospleen.json", tmp_path / "out",
                        names=["good", "nospleen"], resamples=200)
    spleen = results["spleen"]
    assert spleen["Dice"]["n"] == 2 and spleen["Dice"]["n_dropped"] == 1  # c1 has no spleen anywhere
    assert spleen["Dice"]["mean_b"] == 0.0 and spleen["Dice"]["diff"] > 0.9
    assert "impossible" in spleen["Dice"]["note"]


def test_comparison_is_logged_to_mlflow_and_linked_to_both_runs(tmp_path, monkeypatch) -> None:
    """The comparison is its own MLflow run next to both methods' runs, linked by tags both ways."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a sqlite store writes ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("masksam")
    run_a = client.create_run(exp, run_name="train-fold0").info.run_id
    run_b = client.create_run(exp, run_name="baseline-nnunet-fold0").info.run_id
    a, b = make_pair(np.random.default_rng(1))
    pa, pb = write_summaries(tmp_path, a, b)
    for path, key, run in ((pa, "train_run_id", run_a), (pb, "mlflow_run_id", run_b)):
        path.write_text(json.dumps({**json.loads(path.read_text()), key: run}))
    results = C.compare(pa, pb, tmp_path / "out", names=("MaskSAM", "nnunet"), resamples=200, mlflow_log=True)
    (compare_run,) = [r for r in client.search_runs([exp]) if r.info.run_id not in (run_a, run_b)]
    tags, metrics = compare_run.data.tags, compare_run.data.metrics
    assert tags["compare.run.MaskSAM"] == run_a and tags["compare.run.nnunet"] == run_b
    assert client.get_run(run_a).data.tags["compare_run_id.nnunet"] == compare_run.info.run_id
    assert client.get_run(run_b).data.tags["compare_run_id.MaskSAM"] == compare_run.info.run_id
    assert metrics["foreground_mean.Dice.diff"] == pytest.approx(results[C.FOREGROUND]["Dice"]["diff"])
    artifacts = {f.path for f in client.list_artifacts(compare_run.info.run_id)}
    assert {"compare.md", "paired.png", "compare.json"} <= artifacts


def test_markdown_names_each_small_n_reason_once(tmp_path) -> None:
    """Five cases: every row gets the same warning; it is written once, naming the rows."""
    stat = {"n": 5, "mean_a": 0.7, "mean_b": 0.5, "diff": 0.2, "ci95": [0.1, 0.3], "p_wilcoxon": 0.0625,
            "n_dropped": 0, "note": C.small_n_note(5, 5)}
    results = {name: {m: dict(stat) for m in C.COMPARED_METRICS} for name in ("foreground_mean", "liver")}
    results["liver"]["NSD"]["note"] = C.small_n_note(5, 0)
    md = C.write_markdown(results, tmp_path / "compare.md", "a", "b", 5, 100, 0).read_text()
    warnings = [line for line in md.splitlines() if line.startswith("- ")]
    assert len(warnings) == 2, md
    assert warnings[0].startswith("- foreground_mean Dice, foreground_mean HD95, foreground_mean NSD, liver Dice, "
                                  "liver HD95: only 5 non-zero")
    assert warnings[1] == f"- liver NSD: {C.small_n_note(5, 0)}"
