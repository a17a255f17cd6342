"""The `masksam` command: every verb is listed, a verb loads only its own module, and user
errors print one line and exit 2 (no traceback)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from masksam.cli import main

VERBS_IN_ORDER = VERBS = ["data", "preprocess", "train", "evaluate", "baseline", "compare", "predict", "export", "register", "pull",
         "serve", "deploy", "pipeline"]


def test_help_lists_every_verb_in_the_order_users_run_them(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    positions = [out.index(f"    {verb} ") for verb in VERBS]
    assert positions == sorted(positions), out


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert f"usage: masksam {verb}" in capsys.readouterr().out


def test_top_level_help_imports_no_step_module() -> None:
    """`masksam --help` is printed from the verb table: no torch, MLflow, kfp, nor any step."""
    code = ("import sys\nfrom masksam.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kfp', 'mlflow', 'monai', "
            "'SimpleITK') or m.startswith(('masksam.components.', 'masksam.pipelines.'))), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: masksam" in proc.stdout
    assert proc.stderr.strip() == "[]"


def test_verb_table_matches_the_modules() -> None:
    """The table the fast help is printed from says what each module's own parser says, and every
    module that defines a verb is in it (so the table cannot drift from the code)."""
    import importlib
    import pkgutil

    from masksam.cli import VERBS, build_parser

    assert list(VERBS) == VERBS_IN_ORDER
    for verb, (module_name, short) in VERBS.items():
        parser = build_parser(verb)
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        real = next(c for c in action._choices_actions if c.dest == verb)
        assert real.help == short, verb
        assert hasattr(importlib.import_module(module_name), "register_cli")
    defining = set()
    for pkg_name in ("masksam.components", "masksam.pipelines"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            name = f"{pkg_name}.{info.name}"
            if not info.name.startswith("_") and hasattr(importlib.import_module(name), "register_cli"):
                defining.add(name)
    assert defining == {module for module, _ in VERBS.values()}


@pytest.mark.parametrize("verb", ["data", "pipeline", "evaluate", "predict"])
def test_help_has_no_restructuredtext_markup(verb: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and ":class:" not in out, out


def test_plain_strips_markup_but_keeps_paragraphs() -> None:
    from masksam.cli import plain

    text = "Run ``masksam data``; see :func:`~masksam.components.data.phantom.generate`::\n\n    example\n"
    assert plain(text) == "Run `masksam data`; see masksam.components.data.phantom.generate:\n\n    example\n"


def test_data_verb_does_not_import_the_heavy_frameworks() -> None:
    code = ("import sys\nfrom masksam.cli import build_parser\nbuild_parser('data')\n"
            "print(sorted(m for m in ('torch', 'kfp', 'mlflow', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys: pytest.CaptureFixture) -> None:
    status = main(["data", "validate", str(tmp_path / "missing"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip() == f"masksam data: error: {tmp_path / 'missing'}: dataset folder not found"


def test_option_then_params_then_default(tmp_path, monkeypatch) -> None:
    """Every verb's rule: CLI option > params.yaml (null = unset) > built-in default; an explicit
    --params that does not exist is an error, an absent default params.yaml is not."""
    from masksam.components.params import ExportParams, load_params_or_default, pick
    from masksam.errors import UserError

    monkeypatch.chdir(tmp_path)
    assert load_params_or_default(None).export == ExportParams()
    with pytest.raises(UserError, match="parameters file not found"):
        load_params_or_default(tmp_path / "missing.yaml")
    (tmp_path / "params.yaml").write_text("export:\n  opset: 17\n  fp16: null\nregister:\n")
    params = load_params_or_default(None)
    ex = params.export
    assert params.register == params.register.__class__()
    assert pick(None, ex.opset) == 17
    assert pick(19, ex.opset) == 19
    assert pick(None, ex.fp16) is False
    assert pick(None, ex.atol) == 1e-3
    assert load_params_or_default(None, ["export.opset=16"]).export.opset == 16


def test_no_progress_silences_mlflow_and_library_bars(tmp_path, monkeypatch) -> None:
    """--no-progress reaches MLflow's artifact bar and any tqdm bar of a library, not only ours."""
    import os

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    main(["data", "validate", str(tmp_path / "missing")])
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    main(["data", "validate", str(tmp_path / "missing"), "--no-progress"])
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    assert os.environ["TQDM_DISABLE"] == "1"
