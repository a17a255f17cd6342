"""Defaults shared by the pipeline modules and the CLI, importable without kfp.

The `masksam` CLI imports every pipelines module's ``register_cli`` on each call; keeping kfp
out of that path keeps every verb fast and free of kfp's import-order sensitivity.
"""

DEFAULT_IMAGE = "ghcr.io/masksam/masksam:0.1.0"
# Keys of the MLflow secret, each exposed as the environment variable of the same name.
DEFAULT_SECRET_KEYS = ("MLFLOW_TRACKING_URI",)
