# syntax=docker/dockerfile:1
# The image every Kubeflow step runs in: CUDA runtime, Python 3.11, the GPU stack, the project.
# The install mirrors the README's (a venv, torch first, then the project's pinned dependencies)
# with two GPU swaps: torch/torchvision come from the CUDA wheel index at the same versions, and
# onnxruntime-gpu replaces onnxruntime (never both in one environment). tests/test_dockerfile.py
# keeps the pins here equal to pyproject.toml's and lints this file with hadolint.
#
#   docker build -t masksam:0.1.0 .                       (TensorRT included)
#   docker build --build-arg WITH_TENSORRT=0 -t masksam:0.1.0-notrt .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG WITH_TENSORRT=1
ARG USER_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    MPLBACKEND=Agg

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (jammy-updates) and git (DVC imports a dataset from a git repository).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "${VIRTUAL_ENV}" \
    && pip install pip==25.2

# The GPU build of the torch pair, same versions as pyproject.toml.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

# pyproject.toml's dependencies, onnxruntime swapped for onnxruntime-gpu (same version range).
RUN pip install \
        "segment-anything==1.0" \
        "SimpleITK>=2.5,<2.6" \
        "numpy>=1.26" \
        "scipy>=1.11" \
        "kfp==2.17.3" \
        "kfp-kubernetes==2.17.3" \
        "protobuf<7" \
        "mlflow==3.17.2" \
        "dvc>=3.67,<3.68" \
        "onnx>=1.23,<1.24" \
        "onnxscript>=0.5" \
        "onnxruntime-gpu>=1.20" \
        "safetensors>=0.4" \
        "tqdm>=4.66" \
        "pyyaml>=6" \
        "matplotlib>=3.8" \
        "jsonschema>=4.20" \
        "monai>=1.4"

# Optional TensorRT engine export (masksam export --tensorrt).
RUN if [ "${WITH_TENSORRT}" = "1" ]; then pip install "tensorrt-cu12==11.4.0.106"; fi

# The project itself; --no-deps keeps the CPU onnxruntime of pyproject.toml out of the image.
WORKDIR /opt/masksam
COPY pyproject.toml README.md ./
COPY masksam/ masksam/
COPY model/ model/
COPY components/ components/
COPY pipelines/ pipelines/
RUN pip install --no-deps . \
    && if pip show onnxruntime >/dev/null 2>&1; then echo "CPU onnxruntime must not be installed" >&2; exit 1; fi \
    && python -c "import masksam.cli, torch, torchvision, onnxruntime, kfp; print(torch.__version__)"

# Run as an unprivileged user; the working directory holds outputs and the default mlflow.db.
RUN useradd --create-home --uid "${USER_UID}" --shell /bin/bash masksam \
    && mkdir -p /workspace && chown masksam:masksam /workspace
USER ${USER_UID}
WORKDIR /workspace

HEALTHCHECK --interval=5m --timeout=60s --start-period=30s --retries=1 \
    CMD ["python", "-c", "import masksam, torch, onnxruntime"]

ENTRYPOINT ["masksam"]
CMD ["--help"]
