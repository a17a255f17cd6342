"""Training checkpoints: atomic save, safe load (``weights_only=True``), RNG state capture.

A checkpoint must resume a run exactly, so it holds the model, optimizer, scheduler and
grad-scaler states plus the random states of torch, numpy and Python. ``torch.load`` with
``weights_only=True`` only unpickles tensors and plain containers, so numpy and Python RNG
states are converted to tensors and lists here (and back on restore).
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masksam.components._io import atomic_path
from masksam.errors import UserError


def rng_state() -> dict[str, Any]:
    """Capture the torch (CPU and CUDA), numpy and Python random states as loadable values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_s = state["numpy"]
    np.random.set_state(
        (np_s["kind"], np_s["keys"].numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"],
         np_s["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (a crash leaves the previous file)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing or broken file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (train without --resume to start a new run)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise UserError(
            f"checkpoint {path} cannot be loaded ({str(exc).splitlines()[0][:200]}); "
            "delete it and train without --resume, or restore it from a backup"
        ) from exc
    missing = {"model", "optimizer", "scheduler", "step", "rng"} - set(state)
    if missing:
        raise UserError(f"checkpoint {path} lacks {sorted(missing)}; it was not written by masksam train")
    return state
