"""The `masksam` command: every verb is listed, a verb loads only its own module, and user
errors print one line and exit 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from masksam.cli import main

VERBS = ["data", "preprocess", "train", "evaluate", "predict", "export", "register", "pull", "serve", "pipeline"]


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
    from masksam.components._io import params_or_default, pick_option, section
    from masksam.errors import UserError

    monkeypatch.chdir(tmp_path)
    assert params_or_default(None) == {}
    with pytest.raises(UserError, match="parameters file not found"):
        params_or_default(tmp_path / "missing.yaml")
    (tmp_path / "params.yaml").write_text("export:\n  opset: 17\n  fp16: null\nregister:\n")
    params = params_or_default(None)
    ex = section(params, "export")
    assert section(params, "register") == {} and section(params, "nope") == {}
    assert pick_option(None, ex, "opset", 18) == 17
    assert pick_option(19, ex, "opset", 18) == 19
    assert pick_option(None, ex, "fp16", False) is False
    assert pick_option(None, ex, "atol", 1e-3) == 1e-3
