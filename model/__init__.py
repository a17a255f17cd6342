"""MaskSAM network: prompt-free, mask-classification SAM over slabs of slices.

Pure PyTorch + segment-anything; no file I/O beyond weight files.
"""

from .build import VARIANTS, build_masksam
from .weights import (
    WeightsError,
    load_masksam_state,
    load_sam_weights,
    read_masksam_config,
    save_masksam_state,
)
from .config import MaskSAMConfig
from .masksam import ClassProbs, MaskSAM
from .params import format_parameter_report, parameter_report

__all__ = [
    "MaskSAMConfig", "build_masksam", "MaskSAM", "ClassProbs", "VARIANTS", "parameter_report",
    "format_parameter_report", "WeightsError", "load_sam_weights", "save_masksam_state",
    "load_masksam_state", "read_masksam_config",
]
