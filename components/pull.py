"""``masksam pull``: download a registered model and verify its files before anyone uses them.

``models:/masksam@champion`` (or ``models:/masksam/3``, ``runs:/<id>/model``) is downloaded with
``mlflow.artifacts.download_artifacts``; the ONNX files are checked against the sidecar's sha256,
and the sidecar's ONNX hash against the registry's ``onnx_sha256`` tag, so a model altered in the
artifact store after registration is refused.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from masksam.components._loading import download_model, is_mlflow_uri
from masksam.errors import UserError


def pull(uri: str, dst: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Download ``uri`` into ``dst``; return the verified ONNX path and ``{file: sha256}``."""
    if not is_mlflow_uri(uri):
        raise UserError(f"{uri}: not an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN_ID/model)")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst}: exists and is not empty; pull into a new folder")
    dst.mkdir(parents=True, exist_ok=True)
    import mlflow

    from masksam.components import _tracking

    mlflow.set_tracking_uri(_tracking.tracking_uri())
    return download_model(uri, dst)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pull", help="download a registered model (e.g. models:/masksam@champion) and verify it",
        description="Download a registered MaskSAM model from MLflow (MLFLOW_TRACKING_URI) and verify "
        "its sha256 against the sidecar and the registry tag. The folder can then be given to "
        "`masksam predict --model DIR/.../model.onnx` or to `mlflow.pyfunc.load_model(DIR)`.")
    p.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    p.add_argument("dir", help="destination folder (new or empty)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    onnx_path, files = pull(args.uri, args.dir)
    for name, digest in files.items():
        print(f"verified {name} sha256 {digest}")
    print(f"masksam pull: {args.uri} -> {onnx_path.parent.parent} (ONNX: {onnx_path})")
    return 0
