"""Reading a preprocessed dataset (``plan.json`` and ``cases/{case}.npz``) with numpy alone.

Kept apart from ``preprocess`` so that training, which only reads preprocessed arrays, needs
neither SimpleITK nor the resampling code (a training node or a GPU worker image can skip them).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from masksam.components._io import read_json
from masksam.errors import UserError

PLAN_VERSION = 1


def load_plan(directory: str | os.PathLike) -> dict:
    """The plan of a preprocessed dataset (``DIR/plan.json``)."""
    plan = read_json(Path(directory) / "plan.json", "preprocessing plan")
    if plan.get("version") != PLAN_VERSION:
        raise UserError(f"{Path(directory) / 'plan.json'} has plan version {plan.get('version')}, this "
                        f"masksam reads version {PLAN_VERSION}: rerun `masksam preprocess`")
    return plan


def load_case(directory: str | os.PathLike, case: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """``(image [C,Z,Y,X] float32, label [Z,Y,X] uint8 or None, properties)`` of one case."""
    base = Path(directory) / "cases"
    npz = base / f"{case}.npz"
    if not npz.is_file():
        raise UserError(f"preprocessed case not found: {npz} (is '{case}' in plan.json's cases?)")
    try:
        with np.load(npz, allow_pickle=False) as data:
            image = data["image"]
            label = data["label"] if "label" in data.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{npz} is not a readable preprocessed case ({exc}); rerun `masksam preprocess`") from exc
    return image, label, read_json(base / f"{case}.json", "case properties")
