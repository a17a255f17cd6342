"""MaskSAM network: prompt-free, mask-classification SAM over slabs of slices.

Pure PyTorch + segment-anything; no file I/O beyond loading a checkpoint path.
"""

from .build import VARIANTS, build_masksam
from .config import MaskSAMConfig
from .masksam import ClassProbs, MaskSAM
from .params import parameter_report

__all__ = ["MaskSAMConfig", "build_masksam", "MaskSAM", "ClassProbs", "VARIANTS", "parameter_report"]
