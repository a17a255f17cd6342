"""HungarianMatcher: optimal per-slice assignment, cost terms, target handling."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import masksam.model.matcher as matcher_mod
from masksam.model.matcher import HungarianMatcher, check_targets, pairwise_mask_costs
from masksam.model.point_sampling import (pixel_centre_coords, point_sample,
                                          sample_label_masks, sample_label_masks_all)


def _random_case(gen: torch.Generator, b: int, t: int, q: int, k: int, h: int = 12, w: int = 10):
    outputs = {
        "pred_logits": torch.randn(b, t, q, k + 1, generator=gen),
        "pred_masks": 3 * torch.randn(b, t, q, h, w, generator=gen),
    }
    target = torch.randint(0, k, (b, t, h, w), generator=gen)
    return outputs, target


def _brute_force_min(cost: torch.Tensor) -> float:
    """Minimum total cost over all injective assignments of the smaller side."""
    q, m = cost.shape
    best = float("inf")
    if q >= m:
        for rows in itertools.permutations(range(q), m):
            best = min(best, sum(float(cost[r, c]) for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(m), q):
            best = min(best, sum(float(cost[r, c]) for r, c in enumerate(cols)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matcher_total_cost_equals_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = 2 + seed % 5            # 2..6 queries, fewer or more than the targets
    k = 2 + seed % 3            # 2..4 classes
    outputs, target = _random_case(gen, b=2, t=2, q=q, k=k)
    target[0, 1] = 0            # one slice with background only
    matcher = HungarianMatcher(num_points=64)
    torch.manual_seed(seed)
    cost = matcher.cost_matrices(outputs, target)
    torch.manual_seed(seed)     # the same random points again
    match = matcher(outputs, target)
    for n in range(4):
        present = match.present[n]
        expect = torch.unique(target.reshape(4, -1)[n])
        assert torch.equal(present, expect)
        rows, cols = match.indices[n]
        assert len(rows) == min(q, len(present))
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        sub = cost[n][:, present]
        got = float(sub[rows, cols].sum())
        assert got == pytest.approx(_brute_force_min(sub), abs=1e-5)
    # the flattened view agrees with the per-slice lists
    for m in range(len(match.slice_idx)):
        n, qi, cls = (int(match.slice_idx[m]), int(match.query_idx[m]),
                      int(match.target_class[m]))
        rows, cols = match.indices[n]
        j = rows.tolist().index(qi)
        assert int(match.present[n][cols[j]]) == cls
    assert match.num_targets == sum(len(p) for p in match.present)


ALL_COSTS = {"cost_class": 0.7, "cost_mask": 1.2, "cost_dice": 0.9, "cost_aux_mask": 0.5,
             "cost_aux_dice": 0.8, "cost_box_l1": 1.5, "cost_giou": 0.6}


def _order(box: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])])


def _reference_cost(outputs, target, costs, n: int, i: int, c: int) -> float:
    """The paper's matching cost of query i against class c in slice n, from dense pixel terms
    and torchvision's boxes and GIoU (independent of the matcher's batched code)."""
    from torchvision.ops import generalized_box_iou, masks_to_boxes

    q, h, w = outputs["pred_masks"].shape[2], *target.shape[-2:]
    logits = outputs["pred_logits"].reshape(-1, q, outputs["pred_logits"].shape[-1])[n, i]
    tgt = (target.reshape(-1, h, w)[n] == c).float()
    total = costs["cost_class"] * -float(logits.softmax(-1)[c])
    for key, bce_w, dice_w in (("pred_masks", "cost_mask", "cost_dice"),
                               ("aux_masks", "cost_aux_mask", "cost_aux_dice")):
        m = outputs[key].reshape(-1, q, h, w)[n, i].flatten()
        total += costs[bce_w] * float(F.binary_cross_entropy_with_logits(m, tgt.flatten()))
        p = m.sigmoid()
        total += costs[dice_w] * float(1 - (2 * (p * tgt.flatten()).sum() + 1) / (p.sum() + tgt.sum() + 1))
    tgt_box = (masks_to_boxes(tgt[None].bool())[0] + torch.tensor([0.0, 0.0, 1.0, 1.0])) \
        / torch.tensor([w, h, w, h], dtype=torch.float32)
    box = _order(outputs["aux_boxes"].reshape(-1, q, 4)[n, i])
    total += costs["cost_box_l1"] * float((box - tgt_box).abs().sum())
    total += costs["cost_giou"] * -float(generalized_box_iou(box[None], tgt_box[None])[0, 0])
    return total


@pytest.mark.parametrize("seed", range(4))
def test_matcher_with_all_costs_equals_brute_force(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Class, mask BCE/Dice, aux-mask BCE/Dice, box L1 and GIoU costs, all weighted: the
    matcher's assignment has the brute-force minimum of the independently computed cost."""
    h = w = 8
    monkeypatch.setattr(matcher_mod, "_matching_points",
                        lambda num_points, device: pixel_centre_coords(h, w, device))
    gen = torch.Generator().manual_seed(100 + seed)
    q, k = 2 + seed % 4, 2 + seed % 3
    outputs, target = _random_case(gen, b=2, t=2, q=q, k=k, h=h, w=w)
    outputs["aux_masks"] = 3 * torch.randn(2, 2, q, h, w, generator=gen)
    outputs["aux_boxes"] = torch.rand(2, 2, q, 4, generator=gen)  # corners in any order
    target[1, 0] = 0
    target[1, 0, 2:5, 3:7] = k - 1  # a slice with one small organ
    matcher = HungarianMatcher(num_points=h * w, **ALL_COSTS)
    terms = matcher.cost_terms(outputs, target)
    assert set(terms) == {"class", "mask", "dice", "aux_mask", "aux_dice", "box_l1", "giou"}
    match = matcher(outputs, target)
    for n in range(4):
        present = match.present[n].tolist()
        ref = torch.tensor([[_reference_cost(outputs, target, ALL_COSTS, n, i, c) for c in present]
                            for i in range(q)])
        assert torch.allclose(matcher.cost_matrices(outputs, target)[n][:, present], ref, atol=1e-4)
        rows, cols = match.indices[n]
        got = float(ref[rows, cols].sum())
        assert got == pytest.approx(_brute_force_min(ref), abs=1e-4)


def test_each_new_cost_can_decide_the_match() -> None:
    """Two queries identical in class and final mask: only the aux-mask or the box cost tells
    which one should get the organ, and each of them alone does."""
    h = w = 16
    target = torch.zeros(1, 1, h, w, dtype=torch.int64)
    target[0, 0, 2:8, 3:9] = 1
    logits = torch.zeros(1, 1, 2, 3)
    masks = torch.zeros(1, 1, 2, h, w)
    organ = torch.where(target[0, 0] == 1, 8.0, -8.0)
    aux = torch.stack([-organ, organ])[None, None]  # query 1's aux mask is the organ
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [3 / 16, 2 / 16, 9 / 16, 8 / 16]])[None, None]
    outputs = {"pred_logits": logits, "pred_masks": masks, "aux_masks": aux, "aux_boxes": boxes}
    for cost in ("cost_aux_mask", "cost_aux_dice", "cost_box_l1", "cost_giou"):
        m = HungarianMatcher(cost_class=0.0, cost_mask=0.0, cost_dice=0.0, num_points=256, **{cost: 1.0})
        match = m(outputs, target)
        assert dict(zip(match.target_class.tolist(), match.query_idx.tolist()))[1] == 1, cost
    plain = HungarianMatcher(num_points=256).cost_terms(outputs, target)
    assert set(plain) == {"class", "mask", "dice"}  # the new costs default to off
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(cost_class=0.0, cost_mask=0.0, cost_dice=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        HungarianMatcher(cost_giou=-1.0)


def test_matcher_finds_the_planted_assignment() -> None:
    """Queries that predict exactly the target masks and classes get those targets."""
    k, q, h, w = 3, 5, 16, 16
    target = torch.zeros(1, 1, h, w, dtype=torch.int64)
    target[0, 0, 2:8, 3:9] = 1
    target[0, 0, 10:15, 1:14] = 2
    perm = [4, 0, 2]            # class c is predicted by query perm[c]
    logits = torch.full((1, 1, q, k + 1), -5.0)
    logits[..., k] = 5.0
    masks = torch.full((1, 1, q, h, w), -8.0)
    for c, qi in enumerate(perm):
        logits[0, 0, qi, c] = 8.0
        masks[0, 0, qi] = torch.where(target[0, 0] == c, 8.0, -8.0)
    match = HungarianMatcher(num_points=200)({"pred_logits": logits, "pred_masks": masks}, target)
    got = dict(zip(match.target_class.tolist(), match.query_idx.tolist()))
    assert got == {0: 4, 1: 0, 2: 2}


def test_pairwise_costs_equal_looped_losses() -> None:
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 4, 50, generator=gen)
    tgt = torch.rand(2, 3, 50, generator=gen).round()
    bce, dice = pairwise_mask_costs(pred, tgt)
    for n in range(2):
        for i in range(4):
            for j in range(3):
                ref = F.binary_cross_entropy_with_logits(pred[n, i], tgt[n, j])
                assert float(bce[n, i, j]) == pytest.approx(float(ref), rel=1e-5)
                p = pred[n, i].sigmoid()
                ref_d = 1 - (2 * (p * tgt[n, j]).sum() + 1) / (p.sum() + tgt[n, j].sum() + 1)
                assert float(dice[n, i, j]) == pytest.approx(float(ref_d), rel=1e-5)


def test_label_sampling_matches_bilinear_one_hot() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 7, 9), generator=gen)
    coords = torch.rand(3, 40, 2, generator=gen)
    coords[:, 0] = 0.0          # corners: border padding
    coords[:, 1] = 1.0
    one_hot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    every = sample_label_masks_all(labels, coords, 4)
    # an independent bilinear read at one interior point
    x, y = 0.37, 0.61
    px, py = x * 9 - 0.5, y * 7 - 0.5
    x0, y0 = int(px), int(py)
    fx, fy = px - x0, py - y0
    oh = one_hot[1]
    manual = ((1 - fx) * (1 - fy) * oh[:, y0, x0] + fx * (1 - fy) * oh[:, y0, x0 + 1]
              + (1 - fx) * fy * oh[:, y0 + 1, x0] + fx * fy * oh[:, y0 + 1, x0 + 1])
    one = sample_label_masks_all(labels[1:2], torch.tensor([[[x, y]]]), 4)
    assert torch.allclose(one[0, :, 0], manual, atol=1e-6)
    assert torch.allclose(every.sum(1), torch.ones(3, 40), atol=1e-5)  # a partition of unity
    idx = torch.tensor([2, 0, 1])
    cls = torch.tensor([3, 1, 0])
    picked = sample_label_masks(labels, coords[idx], idx, cls)
    assert torch.allclose(picked, every[idx, cls], atol=1e-6)
    # at pixel centres sampling reads the pixels themselves
    centres = pixel_centre_coords(7, 9)
    exact = sample_label_masks_all(labels, centres, 4)
    assert torch.allclose(exact, one_hot.reshape(3, 4, -1), atol=1e-6)
    logits = torch.randn(3, 7, 9, generator=gen)
    assert torch.allclose(point_sample(logits, centres), logits.reshape(3, -1), atol=1e-6)


def test_bad_targets_are_rejected() -> None:
    outputs, target = _random_case(torch.Generator().manual_seed(0), 1, 2, 3, 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        HungarianMatcher(num_points=16)(outputs, target + 5)
    with pytest.raises(ValueError, match="integer label slab"):
        check_targets(target.float(), 3)
    with pytest.raises(ValueError, match="does not match"):
        HungarianMatcher(num_points=16)(outputs, target[:, :1])


def test_matcher_is_gradient_free_and_cheap_on_the_demo_shape() -> None:
    """B=2, T=8, Q=16 at 128 px: one pass builds all costs; nothing needs grad."""
    gen = torch.Generator().manual_seed(1)
    outputs, target = _random_case(gen, b=2, t=8, q=16, k=5, h=128, w=128)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    match = HungarianMatcher(num_points=4096)(outputs, target)
    assert not match.slice_idx.requires_grad
    assert len(match.indices) == 16 and match.num_targets == 16 * 5


def test_fixed_matcher_ties_query_to_class() -> None:
    """FixedMatcher gives query c the mask of class c wherever class c is present."""
    from masksam.model.criterion import SetCriterion
    from masksam.model.matcher import FixedMatcher

    gen = torch.Generator().manual_seed(3)
    outputs, target = _random_case(gen, b=2, t=3, q=6, k=4)
    target[0, 1] = 0
    target[0, 1, :3, :3] = 2  # slice (0, 1) holds background and class 2 only
    match = FixedMatcher()(outputs, target)
    assert torch.equal(match.query_idx, match.target_class)
    pairs = set(zip(match.slice_idx.tolist(), match.target_class.tolist()))
    expected = {(n, int(c)) for n in range(6) for c in target.reshape(6, -1)[n].unique()}
    assert pairs == expected and match.num_targets == len(expected)
    assert match.present[1].tolist() == [0, 2]
    # the criterion runs on it unchanged; queries 4, 5 (no class) are always "no object"
    losses = SetCriterion(4, matcher=FixedMatcher(), num_points=30)(outputs, target)
    assert torch.isfinite(losses["loss"])
    with pytest.raises(ValueError, match="num_queries >= num_classes"):
        FixedMatcher()({k: v[:, :, :3] for k, v in outputs.items()}, target)
