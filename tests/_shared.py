"""Where the team's shared test data lives: ``shared/`` beside the checkout (as CI lays it out),
or the workplace's /work/shared."""

from __future__ import annotations

from pathlib import Path

import pytest

_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg-example",
    Path("/work/shared/data/totalseg-example"),
)
REAL_CT_DIR = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


def real_ct_dir() -> Path:
    """The small real abdominal CT (TotalSegmentator example, 41 labels); skip if absent."""
    if not (REAL_CT_DIR / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"shared test data not found at {REAL_CT_DIR} (expected shared/ beside the checkout)")
    return REAL_CT_DIR


def eval_summary_for(export_dir: Path, dice: float = 0.5, **extra) -> dict:
    """A minimal `masksam evaluate` summary of the ONNX model in ``export_dir`` (register refuses
    a summary that did not score the very file it registers)."""
    import json

    sidecar = json.loads((Path(export_dir) / "model.onnx.json").read_text())
    return {"foreground_mean": {"Dice": dice}, "n_cases": 1, "metric_per_case": [{"case": "case_000"}],
            "test_set_id": "0" * 64, "model_sha256": {"model.onnx": sidecar["files"]["model.onnx"]}, **extra}
