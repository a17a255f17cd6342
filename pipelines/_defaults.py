"""Defaults shared by the pipeline modules and the CLI, importable without kfp.

The `masksam` CLI imports every pipelines module's ``register_cli`` on each call; keeping kfp
out of that path keeps every verb fast and free of kfp's import-order sensitivity.
"""

from __future__ import annotations

import os

from masksam.errors import UserError

# The image every step runs in has no default: a placeholder that does not exist would only
# fail on the cluster (ImagePullBackOff). `--image` or this environment variable names it.
IMAGE_ENV = "MASKSAM_IMAGE"
# Image name of the lightweight components run-local builds (kfp.local runs them in this
# Python, never pulls it).
LOCAL_IMAGE = "masksam-local"
# Keys of the MLflow secret, each exposed as the environment variable of the same name.
DEFAULT_SECRET_KEYS = ("MLFLOW_TRACKING_URI",)


def resolve_image(image: str | None) -> str:
    """The image the pipeline's steps run in: ``image``, else ``$MASKSAM_IMAGE``; neither is a UserError."""
    image = (image or os.environ.get(IMAGE_ENV, "")).strip()
    if not image:
        raise UserError(f"no container image: give --image REGISTRY/masksam:TAG (the image built from the "
                        f"Dockerfile and pushed where the cluster can pull it) or set {IMAGE_ENV}")
    return image
