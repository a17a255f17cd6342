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


# MaskSAM's additions by role, in the order the dry-run report lists them (issue 10, item 4).
GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("stem", re.compile(r"^stem\.")),
    ("encoder_adapters", re.compile(r"^image_encoder\.blocks\.\d+\.(adapter|attn_adapter|mlp_adapter)\.")),
    ("temporal_embeddings", re.compile(r"^(image_encoder|prompt_encoder)\.temporal_embed$")),
    ("prompt_generator", re.compile(r"^prompt_generator\.")),
    ("decoder_additions", re.compile(r"^mask_decoder\.(image_adapter|token_adapters|block_adapters|final_adapter)\.")),
    ("upsampler", re.compile(r"^mask_upsampler\.")),
    ("classifier_head", re.compile(r"^mask_decoder\.(cls_token|cls_head)\.")),
)


def parameter_group(name: str) -> str:
    """The role of parameter ``name``: one of :data:`GROUPS`' names for MaskSAM's additions,
    ``sam`` for SAM's own weights."""
    for group, pattern in GROUPS:
        if pattern.match(name):
            return group
    return "sam"


def parameter_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts, overall, per top-level part and per role.

    Returns ``{"total": int, "trainable": int, "new": int, "parts": {part: {"total",
    "trainable"}}, "groups": {group: {"total", "trainable"}}}`` where ``new`` counts MaskSAM's
    additions (the freshly initialised ones) and ``groups`` splits the parameters by role:
    stem, encoder adapters, temporal embeddings, prompt generator, decoder additions (its
    adapters), upsampler, classifier head (token and linear head), and ``sam`` (SAM's own, which
    train only without ``freeze_sam``). Works on a model built on the meta device (counts only).
    """
    parts: dict[str, dict[str, int]] = {}
    groups: dict[str, dict[str, int]] = {g: {"total": 0, "trainable": 0} for g, _ in GROUPS}
    groups["sam"] = {"total": 0, "trainable": 0}
    total = trainable = new = 0
    for name, p in model.named_parameters():
        n = p.numel()
        for d in (parts.setdefault(name.split(".", 1)[0], {"total": 0, "trainable": 0}),
                  groups[parameter_group(name)]):
            d["total"] += n
            d["trainable"] += n if p.requires_grad else 0
        total += n
        trainable += n if p.requires_grad else 0
        new += n if is_new_parameter(name) else 0
    return {"total": total, "trainable": trainable, "new": new, "parts": parts, "groups": groups}


def format_parameter_report(report: dict) -> str:
    """Human-readable table of :func:`parameter_report`'s result (millions): per part, then
    per role of the trainable parameters."""
    lines = [f"{'part':<22}{'trainable':>12}{'total':>12}"]
    for part, d in report["parts"].items():
        lines.append(f"{part:<22}{d['trainable'] / 1e6:>11.3f}M{d['total'] / 1e6:>11.3f}M")
    lines.append(f"{'all':<22}{report['trainable'] / 1e6:>11.3f}M{report['total'] / 1e6:>11.3f}M")
    if report.get("groups"):
        lines.append(f"{'by role':<22}{'trainable':>12}{'total':>12}")
        for group, d in report["groups"].items():
            lines.append(f"{group:<22}{d['trainable'] / 1e6:>11.3f}M{d['total'] / 1e6:>11.3f}M")
    return "\n".join(lines)
