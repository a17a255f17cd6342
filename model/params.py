"""Which parameters train: the paper's freezing policy, and a parameter count report.

SAM's own parameters keep SAM's names (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``); MaskSAM's additions are recognised by name (``is_new_parameter``). With
``freeze_sam`` all of SAM's weights are frozen and only the additions train (the paper).
SAM parameters that never contribute to the output (IoU head, multimask hypernetworks, point
and no-mask embeddings) are frozen in either case.
"""

from __future__ import annotations

import re

from torch import nn

_NEW = re.compile(
    r"^(stem\.|prompt_generator\.|mask_upsampler\.|image_encoder\.temporal_embed$|"
    r"image_encoder\.blocks\.\d+\.(adapter|attn_adapter|mlp_adapter)\.|prompt_encoder\.temporal_embed$|"
    r"mask_decoder\.cls_token\.|mask_decoder\.cls_head\.|"
    r"mask_decoder\.(image_adapter|token_adapters|block_adapters|final_adapter)\.)"
)
_UNUSED = re.compile(
    r"^(mask_decoder\.(iou_prediction_head\.|output_hypernetworks_mlps\.[1-9]\d*\.)|"
    r"prompt_encoder\.(point_embeddings\.[01]\.|not_a_point_embed\.|no_mask_embed\.))"
)
_BOX_CORNERS = re.compile(r"^prompt_encoder\.point_embeddings\.[23]\.")


def is_new_parameter(name: str) -> bool:
    """True for MaskSAM's additions (not in a SAM checkpoint), False for SAM's own keys."""
    return bool(_NEW.match(name))


def is_unused_sam_parameter(name: str, use_boxes: bool = True) -> bool:
    """SAM parameters MaskSAM's forward never uses: the IoU head and multimask MLPs (one mask
    per query), the point/no-mask embeddings (prompts are always a mask and a box), and the box
    corner embeddings when box prompts are switched off."""
    return bool(_UNUSED.match(name)) or (not use_boxes and bool(_BOX_CORNERS.match(name)))


def apply_freezing(model: nn.Module, freeze_sam: bool, use_boxes: bool = True) -> None:
    """Set ``requires_grad``: additions always train; SAM's weights train only if not frozen
    (and never the ones the forward does not use, so optimisers see no dead parameters)."""
    for name, p in model.named_parameters():
        if is_new_parameter(name):
            p.requires_grad_(True)
        else:
            p.requires_grad_(not freeze_sam and not is_unused_sam_parameter(name, use_boxes))


def parameter_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts, overall and per top-level part.

    Returns ``{"total": int, "trainable": int, "parts": {part: {"total", "trainable"}},
    "new": int}`` where ``new`` counts MaskSAM's additions (the freshly initialised ones).
    """
    parts: dict[str, dict[str, int]] = {}
    total = trainable = new = 0
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        d = parts.setdefault(part, {"total": 0, "trainable": 0})
        n = p.numel()
        d["total"] += n
        total += n
        if p.requires_grad:
            d["trainable"] += n
            trainable += n
        if is_new_parameter(name):
            new += n
    return {"total": total, "trainable": trainable, "new": new, "parts": parts}


def format_parameter_report(report: dict) -> str:
    """Human-readable table of :func:`parameter_report`'s result (millions)."""
    lines = [f"{'part':<18}{'trainable':>12}{'total':>12}"]
    for part, d in report["parts"].items():
        lines.append(f"{part:<18}{d['trainable'] / 1e6:>11.3f}M{d['total'] / 1e6:>11.3f}M")
    lines.append(f"{'all':<18}{report['trainable'] / 1e6:>11.3f}M{report['total'] / 1e6:>11.3f}M")
    return "\n".join(lines)
