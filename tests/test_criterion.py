"""SetCriterion: each loss term against a dense / library reference, weighting, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou, masks_to_boxes

import masksam.model.criterion as criterion_mod
from masksam.model.box_ops import giou_loss, masks_to_boxes_normalized
from masksam.model.criterion import LossWeights, SetCriterion
from masksam.model.point_sampling import pixel_centre_coords

B, T, Q, K, H, W, h, w = 2, 2, 5, 3, 16, 16, 8, 8


def _target() -> torch.Tensor:
    target = torch.zeros(B, T, H, W, dtype=torch.int64)
    target[0, 0, 2:9, 3:12] = 1
    target[0, 0, 10:15, 5:9] = 2
    target[0, 1, 4:12, 4:12] = 2
    target[1, 0, 0:6, 0:16] = 1
    target[1, 1, 8:16, 1:3] = 1
    target[1, 1, 3:7, 9:14] = 2
    return target


def _outputs(seed: int = 0, grad: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {
        "pred_logits": torch.randn(B, T, Q, K + 1, generator=gen),
        "pred_masks": 2 * torch.randn(B, T, Q, H, W, generator=gen),
        "aux_masks": 2 * torch.randn(B, T, Q, h, w, generator=gen),
        "aux_boxes": torch.rand(B, T, Q, 4, generator=gen),
    }
    return {k: v.requires_grad_(grad) for k, v in out.items()}


def _dense_mask_losses(masks: torch.Tensor, target: torch.Tensor, match, num: float):
    """BCE / Dice over every pixel of the matched masks (targets resized by nearest)."""
    n_q = masks.reshape(-1, Q, *masks.shape[-2:])
    src = n_q[match.slice_idx, match.query_idx]
    labels = target.reshape(-1, H, W)[match.slice_idx]
    tgt = (labels == match.target_class[:, None, None]).float()
    if tgt.shape[-2:] != src.shape[-2:]:
        tgt = F.interpolate(tgt[:, None], size=src.shape[-2:], mode="bilinear",
                            align_corners=False)[:, 0]
    src, tgt = src.flatten(1), tgt.flatten(1)
    bce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none").mean(1).sum() / num
    p = src.sigmoid()
    dice = (1 - (2 * (p * tgt).sum(1) + 1) / (p.sum(1) + tgt.sum(1) + 1)).sum() / num
    return bce, dice


def _pixel_centres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the criterion sample every pixel centre: point losses become the dense ones."""
    def centres(logits, num_points, oversample_ratio, importance_sample_ratio):
        c = pixel_centre_coords(*logits.shape[-2:], device=logits.device)
        return c.expand(logits.shape[0], -1, -1)
    monkeypatch.setattr(criterion_mod, "get_uncertain_point_coords_with_randomness", centres)


def test_point_losses_at_pixel_centres_equal_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    _pixel_centres(monkeypatch)
    crit = SetCriterion(K, num_points=64)
    out, target = _outputs(), _target()
    losses = crit(out, target)
    match = crit.last_match
    num = float(match.num_targets)
    bce, dice = _dense_mask_losses(out["pred_masks"].detach(), target, match, num)
    assert float(losses["loss_mask"].detach()) == pytest.approx(float(bce), rel=1e-5)
    assert float(losses["loss_dice"].detach()) == pytest.approx(float(dice), rel=1e-5)
    # aux masks are 8x8; the target downsampled 2x by bilinear (= mean of 2x2 blocks)
    abce, adice = _dense_mask_losses(out["aux_masks"].detach(), target, match, num)
    assert float(losses["loss_aux_mask"].detach()) == pytest.approx(float(abce), rel=1e-5)
    assert float(losses["loss_aux_dice"].detach()) == pytest.approx(float(adice), rel=1e-5)


def test_uniform_point_losses_approach_dense() -> None:
    torch.manual_seed(0)
    crit = SetCriterion(K, num_points=40000, oversample_ratio=1.0, importance_sample_ratio=0.0)
    out, target = _outputs(seed=1), _target()
    # smooth logits: bilinear reads between pixel centres stay close to the pixels
    smooth = F.avg_pool2d(out["pred_masks"].detach().reshape(-1, 1, H, W), 5, 1, 2)
    out["pred_masks"] = smooth.reshape(B, T, Q, H, W)
    losses = crit(out, target)
    match = crit.last_match
    bce, dice = _dense_mask_losses(out["pred_masks"], target, match, float(match.num_targets))
    assert float(losses["loss_mask"].detach()) == pytest.approx(float(bce), rel=0.05)
    assert float(losses["loss_dice"].detach()) == pytest.approx(float(dice), rel=0.05)


def test_importance_sampling_favours_boundaries() -> None:
    from masksam.model.point_sampling import get_uncertain_point_coords_with_randomness
    torch.manual_seed(0)
    logits = torch.full((1, 64, 64), 10.0)
    logits[0, :, 30:34] = 0.0      # an uncertain band of 4 columns out of 64
    coords = get_uncertain_point_coords_with_randomness(logits, 400, 3.0, 0.75)
    assert coords.shape == (1, 400, 2)
    in_band = ((coords[0, :, 0] >= 30 / 64) & (coords[0, :, 0] < 34 / 64)).float().mean()
    assert in_band > 0.1           # uniform sampling would put ~6% there


def test_no_object_weighting() -> None:
    crit = SetCriterion(K, num_points=64, weights=LossWeights(no_object=0.1))
    out, target = _outputs(), _target()
    losses = crit(out, target)
    match = crit.last_match
    logits = out["pred_logits"].detach().reshape(-1, Q, K + 1)
    cls = torch.full((B * T, Q), K)
    cls[match.slice_idx, match.query_idx] = match.target_class
    nll = -logits.log_softmax(-1).gather(-1, cls[..., None])[..., 0]
    wts = torch.where(cls == K, 0.1, 1.0)
    ref = (wts * nll).sum() / wts.sum()
    assert float(losses["loss_ce"].detach()) == pytest.approx(float(ref), rel=1e-5)
    assert (cls == K).sum() == B * T * Q - len(match.query_idx)  # unmatched -> no object
    full = SetCriterion(K, num_points=64, weights=LossWeights(no_object=1.0))
    plain = full(out, target)["loss_ce"].detach()
    cls = torch.full((B * T, Q), K)
    m = full.last_match
    cls[m.slice_idx, m.query_idx] = m.target_class
    ref = F.cross_entropy(logits.reshape(-1, K + 1), cls.reshape(-1))  # unweighted mean
    assert float(plain) == pytest.approx(float(ref), rel=1e-5)


def test_boxes_and_giou_against_torchvision() -> None:
    target = _target()
    masks = torch.stack([target[0, 0] == 1, target[0, 0] == 2, target[1, 1] == 1])
    ours = masks_to_boxes_normalized(masks)
    tv = masks_to_boxes(masks)     # inclusive pixel indices
    scale = torch.tensor([W, H, W, H], dtype=torch.float32)
    assert torch.allclose(ours * scale, tv + torch.tensor([0.0, 0.0, 1.0, 1.0]))
    full = masks_to_boxes_normalized(torch.ones(1, 5, 7, dtype=torch.bool))
    assert torch.equal(full, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    empty = masks_to_boxes_normalized(torch.zeros(1, 5, 7, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(1, 4))
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(6, 2, generator=gen).sort(dim=1).values
    b_ = torch.rand(6, 2, generator=gen).sort(dim=1).values
    pred = torch.stack([a[:, 0], b_[:, 0], a[:, 1], b_[:, 1]], dim=1)
    ref = 1 - generalized_box_iou(pred, ours.repeat(2, 1)).diagonal()
    assert torch.allclose(giou_loss(pred, ours.repeat(2, 1)), ref, atol=1e-6)
    swapped = pred[:, [2, 3, 0, 1]]  # corners swapped: ordered before GIoU
    assert torch.allclose(giou_loss(swapped, ours.repeat(2, 1)), ref, atol=1e-6)


def test_box_terms_use_matched_target_boxes() -> None:
    crit = SetCriterion(K, num_points=64)
    out, target = _outputs(), _target()
    losses = crit(out, target)
    match = crit.last_match
    src = out["aux_boxes"].detach().reshape(-1, Q, 4)[match.slice_idx, match.query_idx]
    masks = target.reshape(-1, H, W)[match.slice_idx] == match.target_class[:, None, None]
    tgt = masks_to_boxes_normalized(masks)
    num = float(match.num_targets)
    assert float(losses["loss_box_l1"].detach()) == pytest.approx(float((src - tgt).abs().sum() / num),
                                                         rel=1e-5)
    ref = (1 - generalized_box_iou(giou_ord(src), tgt).diagonal()).sum() / num
    assert float(losses["loss_giou"].detach()) == pytest.approx(float(ref), rel=1e-5)


def giou_ord(boxes: torch.Tensor) -> torch.Tensor:
    lo = torch.minimum(boxes[:, :2], boxes[:, 2:])
    hi = torch.maximum(boxes[:, :2], boxes[:, 2:])
    return torch.cat([lo, hi], dim=1)


def test_aux_mask_loss_is_on_logits_not_double_sigmoid(monkeypatch) -> None:
    """Confident, correct aux logits give ~0 BCE; a double sigmoid would give >= 0.3."""
    _pixel_centres(monkeypatch)
    # a target made of 2x2 blocks, so the 8x8 aux grid represents it exactly
    target = _target()[..., ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1)
    logits = torch.full((B, T, Q, K + 1), -6.0)
    logits[..., K] = 6.0
    pred = torch.full((B, T, Q, H, W), -12.0)
    for c in range(K):              # query c predicts class c perfectly
        logits[:, :, c, c], logits[:, :, c, K] = 6.0, -6.0
        pred[:, :, c] = torch.where(target == c, 12.0, -12.0)
    aux = pred[..., ::2, ::2].clone()
    out = {"pred_logits": logits, "pred_masks": pred, "aux_masks": aux}
    crit = SetCriterion(K, num_points=64)
    losses = crit(out, target)
    match = crit.last_match
    assert torch.equal(match.query_idx, match.target_class)
    assert float(losses["loss_mask"]) < 1e-4
    assert float(losses["loss_aux_mask"]) < 1e-4
    doubled = F.binary_cross_entropy_with_logits(aux.sigmoid(), (aux > 0).float())
    assert float(doubled) > 0.3     # what the reference code's double sigmoid would report


def test_total_is_weighted_sum_and_missing_outputs_are_skipped() -> None:
    weights = LossWeights(ce=1.5, mask=2.0, dice=3.0, aux_mask=0.5, aux_dice=0.25,
                          box_l1=4.0, giou=0.75)
    crit = SetCriterion(K, weights=weights, num_points=64)
    out, target = _outputs(), _target()
    losses = crit(out, target)
    expect = sum(getattr(weights, name) * losses[f"loss_{name}"].detach() for name in
                 ("ce", "mask", "dice", "aux_mask", "aux_dice", "box_l1", "giou"))
    assert float(losses["loss"].detach()) == pytest.approx(float(expect), rel=1e-5)
    del out["aux_boxes"], out["aux_masks"]
    part = crit(out, target)
    assert set(part) == {"loss_ce", "loss_mask", "loss_dice", "loss"}
    expect = (1.5 * part["loss_ce"] + 2.0 * part["loss_mask"] + 3.0 * part["loss_dice"]).detach()
    assert float(part["loss"].detach()) == pytest.approx(float(expect), rel=1e-5)
    with pytest.raises(ValueError, match="loss weights"):
        LossWeights(giou=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(K + 1, num_points=8)(out, target)


TERMS = ("ce", "mask", "dice", "aux_mask", "aux_dice", "box_l1", "giou")


@pytest.mark.parametrize("zero", TERMS)
def test_each_weight_reaches_its_term_and_zero_removes_it(zero: str) -> None:
    """Doubling a weight doubles its share of the total; a zero weight removes the term from
    the dict and the total (it is not computed at all)."""
    base = dict(ce=0.2, mask=1.2, dice=1.2, aux_mask=0.5, aux_dice=0.5, box_l1=0.5, giou=0.2)
    out, target = _outputs(grad=False), _target()
    matcher = criterion_mod.HungarianMatcher(num_points=64)  # the same assignment for all runs

    def run(**over):
        torch.manual_seed(0)
        return SetCriterion(K, weights=LossWeights(**{**base, **over}), matcher=matcher,
                            num_points=64)(out, target)

    ref = run()
    assert {f"loss_{t}" for t in TERMS} | {"loss"} == set(ref)
    doubled = run(**{zero: 2 * base[zero]})
    gain = float(doubled["loss"] - ref["loss"])
    assert gain == pytest.approx(base[zero] * float(ref[f"loss_{zero}"]), rel=1e-4, abs=1e-6)
    removed = run(**{zero: 0.0})
    assert f"loss_{zero}" not in removed and set(removed) == set(ref) - {f"loss_{zero}"}
    expect = float(ref["loss"]) - base[zero] * float(ref[f"loss_{zero}"])
    assert float(removed["loss"]) == pytest.approx(expect, rel=1e-4, abs=1e-6)


def test_default_matcher_takes_the_loss_weights_as_costs() -> None:
    crit = SetCriterion(K, weights=LossWeights(ce=0.2, mask=1.2, dice=1.1, aux_mask=0.5, aux_dice=0.4,
                                               box_l1=0.3, giou=0.2), num_points=32)
    assert crit.matcher.weights == {"class": 0.2, "mask": 1.2, "dice": 1.1, "aux_mask": 0.5,
                                    "aux_dice": 0.4, "box_l1": 0.3, "giou": 0.2}
    m = LossWeights().matcher(32, cost_giou=0.0, cost_class=None)
    assert m.weights["giou"] == 0.0 and m.weights["class"] == 2.0 and m.num_points == 32
    with pytest.raises(ValueError, match="unknown matcher costs"):
        LossWeights().matcher(32, cost_bogus=1.0)
    with pytest.raises(ValueError, match="all 0"):
        LossWeights(ce=0, mask=0, dice=0, aux_mask=0, aux_dice=0, box_l1=0, giou=0)
    with pytest.raises(ValueError, match="oversample_ratio"):
        SetCriterion(K, num_points=32, oversample_ratio=0.5)


def test_point_sampling_ratios_reach_the_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = criterion_mod.get_uncertain_point_coords_with_randomness

    def spy(logits, num_points, oversample_ratio, importance_sample_ratio):
        seen.append((num_points, oversample_ratio, importance_sample_ratio))
        return real(logits, num_points, oversample_ratio, importance_sample_ratio)

    monkeypatch.setattr(criterion_mod, "get_uncertain_point_coords_with_randomness", spy)
    SetCriterion(K, num_points=48, oversample_ratio=2.0, importance_sample_ratio=0.6)(_outputs(), _target())
    assert seen and set(seen) == {(48, 2.0, 0.6)}


def test_normaliser_is_averaged_over_ranks(tmp_path) -> None:
    """Two gloo ranks with 3 and 5 targets both divide by 4 (Mask2Former's num_masks);
    without a process group the count is this process's own."""
    import torch.multiprocessing as mp

    assert criterion_mod.average_num_masks(3, torch.device("cpu")) == 3.0
    assert criterion_mod.average_num_masks(0, torch.device("cpu")) == 1.0
    mp.start_processes(_rank_normaliser, args=(str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["4.0", "4.0"]


def _rank_normaliser(rank: int, rdv: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    try:
        value = criterion_mod.average_num_masks([3, 5][rank], torch.device("cpu"))
        (__import__("pathlib").Path(out) / f"rank{rank}").write_text(str(value))
    finally:
        dist.destroy_process_group()


def test_gradients_reach_every_output() -> None:
    crit = SetCriterion(K, num_points=64)
    out, target = _outputs(), _target()
    crit(out, target)["loss"].backward()
    for key, value in out.items():
        assert value.grad is not None, key
        assert torch.isfinite(value.grad).all(), key
        assert value.grad.abs().sum() > 0, key


def test_bf16_outputs_give_float32_finite_losses() -> None:
    crit = SetCriterion(K, num_points=64)
    out = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in _outputs().items()}
    out["pred_masks"] = (out["pred_masks"].detach() * 40).requires_grad_()  # saturating logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = crit(out, _target())
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
    losses["loss"].backward()
    assert torch.isfinite(out["pred_masks"].grad.float()).all()
