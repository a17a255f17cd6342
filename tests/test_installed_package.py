"""The package as the container installs it: a wheel, installed non-editable, runs every step.

The Dockerfile runs ``pip install --no-deps .``; code that reads the source checkout (rather than
the imported package) works in an editable install and fails there. This test builds the wheel,
installs it with ``--no-deps`` into a fresh virtual environment whose other packages come from
the test environment's site-packages (added by a ``.pth`` line, so the checkout's editable
finder is not loaded), and runs the pipeline from that install, outside the checkout:
data -> validate -> preprocess -> train -> export -> evaluate (the ONNX) -> register -> pull -> predict
from ``models:/NAME@champion``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding masksam installed from its wheel, non-editable; returns its bin folder."""
    base = tmp_path_factory.mktemp("installed")
    src = base / "src"  # a copy of what the Dockerfile copies, so no build files land in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("masksam", "model", "components", "pipelines"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(wheels), str(src)], base, dict(os.environ))
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    purelib = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    purelib.mkdir(parents=True, exist_ok=True)
    # the dependencies (torch, mlflow, ...) from the test environment, without its .pth files
    (purelib / "_masksam_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("masksam-*.whl"))
    # the new environment's own python runs pip (found through the .pth line), so the package and
    # its `masksam` script land in that environment, as `pip install --no-deps .` does in the image
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
         base, {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    return env_dir / "bin"


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(cases=5, size=[64, 64, 16])
    params["preprocess"].update(target_spacing=[3.0, 3.0, 6.0], test_fraction=0.2, folds=3)
    params["model"].update(img_size=32, slab_depth=4, num_queries=8)
    params["train"].update(steps=4, val_every=4, batch_size=1)
    params["register"]["min_dice"] = 0.0  # 4 steps learn little: let it become champion to be pulled
    return params


def test_wheel_install_runs_the_whole_pipeline(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(_tiny_params(), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{installed}{os.pathsep}{env['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    python = str(installed / "python")

    where = _run([python, "-c", "import masksam, masksam.model, masksam.components.register as r; "
                  "print(masksam.__file__); print(masksam.model.__file__); print(r.__file__)"], work, env)
    for line in where.strip().splitlines():
        assert str(installed.parent) in line and str(ROOT) not in line, f"not the installed package: {line}"

    masksam = str(installed / "masksam")
    steps = [
        [masksam, "data", "fetch", "--params", "params.yaml", "--no-progress"],
        [masksam, "data", "validate", "data/raw", "--no-progress"],
        [masksam, "preprocess", "--params", "params.yaml", "--raw", "data/raw", "--out", "data/preprocessed",
         "--no-progress"],
        [masksam, "train", "--params", "params.yaml", "--preprocessed", "data/preprocessed", "--out",
         "data/train", "--no-progress"],
        [masksam, "export", "--params", "params.yaml", "--train", "data/train", "--data", "data/preprocessed",
         "--out", "data/export"],
        [masksam, "evaluate", "--params", "params.yaml", "--model", "data/export", "--raw", "data/raw",
         "--preprocessed", "data/preprocessed", "--out-dir", "data/eval", "--no-progress"],
        [masksam, "register", "--params", "params.yaml", "--train", "data/train", "--export", "data/export",
         "--eval", "data/eval/summary.json"],
    ]
    for cmd in steps:
        _run(cmd, work, env)

    pulled = _run([masksam, "pull", "models:/masksam@champion", "pulled"], work, env)
    assert "verified" in pulled
    scan = sorted((work / "data/raw/imagesTr").glob("*_0000.nii.gz"))[0]
    _run([masksam, "predict", "-i", str(scan), "-o", "pred", "--model", "models:/masksam@champion",
          "--no-progress"], work, env)
    case = scan.name[: -len("_0000.nii.gz")]
    summary = json.loads((work / "pred" / f"{case}.json").read_text())
    assert summary["model"] == "models:/masksam@champion"
    assert (work / "pred" / f"{case}.nii.gz").is_file()

    # the registered model's shipped code is the installed package's, not a checkout's
    shipped = sorted((work / "pulled").rglob("masksam/components/_pyfunc.py"))
    assert shipped, "the pulled model ships no masksam code"
