"""File helpers every step uses: atomic writes, image reading with clear errors, params.

A step either finishes or leaves its previous outputs intact, so every output is written to a
temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from masksam.errors import UserError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and directories (a directory target is replaced whole). The temporary name
    keeps the target's suffixes so writers that choose a format by extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        elif tmp.exists():
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so memory stays flat (ViT-H exports are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or malformed file into a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from exc


def image_suffix(path: str | os.PathLike) -> str | None:
    """The image suffix of ``path`` (``.nii.gz`` counts as one), or None."""
    name = str(path).lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def read_image(path: str | os.PathLike, expect_dim: int | None = 3):
    """Read an image with SimpleITK; unreadable or wrong-dimensional files raise UserError."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "rror" in ln), first[-1] if first else "")
        raise UserError(f"{path}: cannot be read as an image ({detail.strip()[:300]})") from exc
    if expect_dim is not None and image.GetDimension() != expect_dim:
        raise UserError(
            f"{path}: expected a {expect_dim}D image, got {image.GetDimension()}D "
            f"(size {image.GetSize()})"
        )
    return image


def write_image(image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a SimpleITK image atomically."""
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def load_params(path: str | os.PathLike = "params.yaml", section: str | None = None) -> dict:
    """Load params.yaml (or one section of it); a missing file or section is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"parameters file not found: {path} (run from the project root or pass --params)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from exc
    if section is None:
        return params
    if section not in params:
        raise UserError(f"{path} has no '{section}:' section")
    return params[section] or {}


def params_or_default(path: str | os.PathLike | None) -> dict:
    """The whole params file for a verb's ``--params``: an explicit path must exist; without
    one, ``params.yaml`` in the working directory is read when present, else nothing."""
    if path is None:
        return load_params("params.yaml") if Path("params.yaml").is_file() else {}
    return load_params(path)


def section(params: dict, name: str) -> dict:
    """``params[name]`` or ``{}`` (a missing or empty section means "all defaults")."""
    value = params.get(name)
    return value if isinstance(value, dict) else {}


def pick_option(cli_value: Any, params: dict, key: str, default: Any = None) -> Any:
    """One rule for every verb: an explicit CLI option overrides params.yaml, which overrides
    the built-in default (a ``null`` in params.yaml means "use the default")."""
    if cli_value is not None:
        return cli_value
    value = params.get(key)
    return default if value is None else value
