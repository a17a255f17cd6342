"""``masksam pull``: download a registered model and verify all of it before anyone uses it.

``models:/masksam@champion`` (or ``models:/masksam/3``) is resolved to its version in the
registry, downloaded into a temporary folder beside the destination, and checked against the
registry's record: the version's ``manifest_sha256`` tag fixes ``masksam_manifest.json``, which
fixes the sha256 of every file of the model (ONNX graph and external data, sidecar, shipped code,
MLmodel, environment files), with no file missing or added. Only then is the folder renamed into
place, so a refused pull leaves nothing behind that ``predict`` or ``mlflow.pyfunc.load_model``
could pick up.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from masksam.components._loading import MODEL_MANIFEST, download_model, is_mlflow_uri
from masksam.errors import UserError


def pull(uri: str, dst: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Download ``uri`` into ``dst`` once verified; return the ONNX path and ``{file: sha256}``
    of every file checked (the manifest first)."""
    if not is_mlflow_uri(uri):
        raise UserError(f"{uri}: not an MLflow model URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    import mlflow

    from masksam.components import _tracking

    mlflow.set_tracking_uri(_tracking.tracking_uri())
    return download_model(uri, Path(dst))


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pull", help="download a registered model (e.g. models:/masksam@champion) and verify it",
        description="Download a registered MaskSAM model from MLflow (MLFLOW_TRACKING_URI) and verify "
        "every file against the registry's record (manifest_sha256 tag -> masksam_manifest.json -> "
        "each file, none missing or added) before moving it into place; a refused pull leaves "
        "nothing behind. The folder can then be given to `masksam predict --model "
        "DIR/artifacts/model.onnx` or to `mlflow.pyfunc.load_model(DIR)`.")
    p.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("dir", help="destination folder (new or empty)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    onnx_path, files = pull(args.uri, args.dir)
    print(f"verified {MODEL_MANIFEST} sha256 {files[MODEL_MANIFEST]} against the registry's manifest_sha256 tag")
    for name, digest in files.items():
        if name != MODEL_MANIFEST:
            print(f"verified {name} sha256 {digest}")
    print(f"masksam pull: {args.uri} -> {args.dir}: {len(files) - 1} files verified, none missing or "
          f"added (ONNX: {onnx_path})")
    return 0
