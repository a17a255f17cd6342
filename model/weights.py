"""Weight files: SAM's official weights (strict about SAM's keys, size-adapted) and MaskSAM's own.

In this project "checkpoint" means only the resume state of a training run
(``checkpoint_last.pt``, components/_checkpoint.py); what a training starts from is "SAM weights",
and what it ends with is a "training directory". SAM's weights (``sam_vit_{b,l,h}_*.pth``) are
plain state dicts written by
segment-anything; they are read with ``torch.load(weights_only=True)`` (tensors only, no code
execution). Every SAM key must match a parameter of the model by name and shape: a missing,
unexpected or mis-shaped key raises :class:`WeightsError` naming them (the public reference
code's non-strict load hid such errors). MaskSAM's own additions are reported as freshly
initialised.

Input sizes other than 1024 change the token grid from 64x64 to g = img_size/16, so two
position tables are adapted (as SAM-Med2D / MedSAM-style adaptations do):

- the absolute position embedding ``[1, 64, 64, D]`` is resampled bicubically to
  ``[1, g, g, D]``: it is a smooth function of the patch position, and bicubic resampling keeps
  its low frequencies (what the pretrained attention relies on) better than bilinear;
- the relative position tables of the *global*-attention blocks, ``[2*64-1, head_dim]``, are
  linearly resampled to ``[2g-1, head_dim]`` (the same interpolation SAM's ``get_rel_pos``
  applies on the fly), so each relative offset keeps the embedding of the same *fraction* of
  the image. Windowed blocks keep theirs: a 14x14 window is 14x14 at any input size.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MaskSAMConfig
from .params import is_new_parameter

log = logging.getLogger(__name__)

_MAX_LISTED = 20


class WeightsError(ValueError):
    """A checkpoint that does not fit the model; ``missing``/``unexpected``/``mismatched``
    hold every offending key (the message lists the first ones)."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


@dataclass
class LoadReport:
    """What :func:`load_sam_weights` did."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    new_parameters: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for logs."""
        return (
            f"{self.path}: loaded {len(self.loaded)} SAM tensors; adapted {self.adapted or 'none'}; "
            f"{len(self.new_parameters)} MaskSAM tensors freshly initialised; missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, mismatched {len(self.mismatched)}"
        )


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``; unwrap ``{"model": ...}`` /
    ``{"state_dict": ...}`` containers. Raises FileNotFoundError / WeightsError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM weights {path} does not exist; give the path of a sam_vit_*.pth file")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects other than tensors: refused, none of it ran
        raise WeightsError(
            f"SAM weights {path} holds Python objects other than tensors and was refused (it is read with "
            "torch.load(weights_only=True), which runs no pickled code); give a state dict of tensors "
            "such as an official sam_vit_*.pth") from e
    except Exception as e:  # truncated zip, not a torch file ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise WeightsError(f"SAM weights {path} cannot be read as a torch state dict ({type(e).__name__}: {first})") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"SAM weights {path} does not hold a state dict (name -> tensor)")
    return dict(obj)


def infer_sam_variant(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Guess vit_b / vit_l / vit_h from embedding width and block count (None if unknown)."""
    pe = sd.get("image_encoder.pos_embed")
    if pe is None:
        return None
    depth = len({k.split(".")[2] for k in sd if k.startswith("image_encoder.blocks.")})
    return {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}.get((int(pe.shape[-1]), depth))


def adapt_position_tables(
    sd: dict[str, torch.Tensor], grid: int, global_attn_indexes: tuple[int, ...], pos_embed: str = "interpolate"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resample ``pos_embed`` (bicubic; or, with ``pos_embed="crop"``, keep its top-left
    ``grid x grid`` part, as the paper's encoder does) and global blocks' ``rel_pos_{h,w}``
    (linear) to a ``grid x grid`` token grid (see the module docstring). Returns the new dict
    and the keys changed."""
    out = dict(sd)
    changed: list[str] = []
    pe = sd.get("image_encoder.pos_embed")
    if pe is not None and pe.dim() == 4 and pe.shape[1] != grid and pos_embed == "crop":
        if pe.shape[1] < grid or pe.shape[2] < grid:
            raise WeightsError(
                f"pos_embed: crop needs a token grid of at most {pe.shape[1]}x{pe.shape[2]} (SAM's), got "
                f"{grid}x{grid}; use pos_embed: interpolate for inputs above {pe.shape[1] * 16} px")
        out["image_encoder.pos_embed"] = pe[:, :grid, :grid].contiguous()
        changed.append("image_encoder.pos_embed")
    elif pe is not None and pe.dim() == 4 and pe.shape[1] != grid:
        x = pe.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
        out["image_encoder.pos_embed"] = x.permute(0, 2, 3, 1).to(pe.dtype).contiguous()
        changed.append("image_encoder.pos_embed")
    for i in global_attn_indexes:
        for axis in ("h", "w"):
            k = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            rp = sd.get(k)
            if rp is None or rp.shape[0] == 2 * grid - 1:
                continue
            r = F.interpolate(rp.float().t().unsqueeze(0), size=2 * grid - 1, mode="linear", align_corners=False)
            out[k] = r.squeeze(0).t().to(rp.dtype).contiguous()
            changed.append(k)
    return out, changed


def load_sam_weights(model: nn.Module, path: str | os.PathLike, allow_missing: bool = False) -> LoadReport:
    """Load a segment-anything checkpoint into MaskSAM's SAM parts (strict unless allowed).

    Every key of the checkpoint must be one of the model's SAM keys with the same shape (after
    the position-table adaptation) and every SAM key of the model must be present; otherwise
    :class:`WeightsError` lists the offending names (``allow_missing=True`` loads what fits
    and only reports). MaskSAM's additions are left as initialised and listed in the report.
    """
    path = os.fspath(path)
    sd = read_state_dict(path)
    cfg: MaskSAMConfig = model.cfg  # type: ignore[assignment]
    glob = tuple(model.image_encoder.global_attn_indexes)  # type: ignore[union-attr]
    sd, adapted = adapt_position_tables(sd, cfg.img_size // cfg.patch_size, glob, getattr(cfg, "pos_embed", "interpolate"))
    own = model.state_dict()
    sam_keys = [k for k in own if not is_new_parameter(k)]
    new_keys = [k for k in own if is_new_parameter(k)]
    missing = [k for k in sam_keys if k not in sd]
    unexpected = [k for k in sd if k not in own or is_new_parameter(k)]
    mismatched = [
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in sam_keys
        if k in sd and sd[k].shape != own[k].shape
    ]
    report = LoadReport(path, missing=missing, unexpected=unexpected, mismatched=mismatched,
                        new_parameters=new_keys, adapted=adapted)
    if (missing or unexpected or mismatched) and not allow_missing:
        guess = infer_sam_variant(sd)
        hint = f" The checkpoint looks like SAM {guess}; the model is {cfg.variant}." if guess and guess != cfg.variant else ""
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_names(mismatched)}")
        raise WeightsError(
            f"SAM weights {path} does not match MaskSAM {cfg.variant} at img_size {cfg.img_size}: "
            + "; ".join(parts) + "." + hint + " Use the sam_vit_* file of the configured variant.",
            missing, unexpected, mismatched,
        )
    bad = {m.split(" ", 1)[0] for m in mismatched}
    load = {k: v for k, v in sd.items() if k in own and not is_new_parameter(k) and k not in bad}
    result = model.load_state_dict(load, strict=False)
    leftover = [k for k in result.missing_keys if not is_new_parameter(k) and k not in missing and k not in bad]
    if leftover or result.unexpected_keys:  # defensive: the key sets above must agree with torch's
        raise WeightsError(f"SAM weights {path}: internal key mismatch {leftover + list(result.unexpected_keys)}")
    report.loaded = sorted(load)
    log.info(report.summary())
    return report


def save_masksam_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict as safetensors, with its config as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg: MaskSAMConfig = model.cfg  # type: ignore[assignment]
    save_file(tensors, os.fspath(path), metadata={"masksam_config": json.dumps(cfg.to_dict())})


def read_masksam_config(path: str | os.PathLike) -> MaskSAMConfig:
    """The config stored in a file written by :func:`save_masksam_state`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "masksam_config" not in meta:
        raise WeightsError(f"{path} carries no MaskSAM config (not written by save_masksam_state)")
    return MaskSAMConfig.from_dict(json.loads(meta["masksam_config"]))


def load_masksam_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a MaskSAM state dict (safetensors, or a torch file read with weights_only=True),
    strictly: any missing or unexpected key raises :class:`WeightsError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MaskSAM weights {path} do not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except Exception as e:
            raise WeightsError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from e
    else:
        sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} ({tuple(sd[k].shape)} vs {tuple(own[k].shape)})" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"MaskSAM weights {path} do not fit this model: missing ({len(missing)}): {_names(missing)}; "
            f"unexpected ({len(unexpected)}): {_names(unexpected)}; mismatched: {_names(mismatched)}",
            missing, unexpected, mismatched,
        )
    model.load_state_dict(sd, strict=True)
