"""The tiny MaskSAM, randomly initialised, overfits one phantom-like slab with SetCriterion.

This exercises matcher + criterion + network together: if the losses or their gradients were
wrong, one slab could not be fitted. The slab is built here (model tests do not depend on
components/): a body ellipse with three organ-shaped blobs of distinct intensities whose size
changes along the slab, plus noise.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from masksam.model import MaskSAMConfig, build_masksam
from masksam.model.criterion import SetCriterion

K = 4            # background + 3 organs
SIZE = 64
DEPTH = 4
TERMS_FITTED = ("ce", "mask", "dice", "box_l1", "giou")
TERMS_AUX = ("aux_mask", "aux_dice")


def phantom_slab(size: int = SIZE, depth: int = DEPTH, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A CT-like slab ``[1, 1, T, S, S]`` (z-scored-looking intensities) and labels ``[1, T, S, S]``."""
    gen = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(torch.arange(depth).float(), torch.arange(size).float(),
                             torch.arange(size).float(), indexing="ij")
    labels = torch.zeros(depth, size, size, dtype=torch.int64)
    body = ((y - size / 2) / (0.45 * size)) ** 2 + ((x - size / 2) / (0.4 * size)) ** 2 < 1
    image = torch.where(body, 0.0, -2.0)
    # (centre y, centre x, radius y, radius x) as fractions of the slice; intensity per organ
    organs = [(0.33, 0.38, 0.27, 0.21), (0.66, 0.40, 0.21, 0.24), (0.50, 0.72, 0.18, 0.15)]
    intensity = [1.5, -1.0, 2.5]
    for c, ((cy, cx, ry, rx), value) in enumerate(zip(organs, intensity), start=1):
        grow = 1 + 0.15 * torch.sin(z / depth * math.pi)
        inside = ((y - cy * size) / (ry * size * grow)) ** 2 + ((x - cx * size) / (rx * size)) ** 2 < 1
        labels[inside] = c
        image = torch.where(inside, torch.tensor(value), image)
    image = image + 0.2 * torch.randn(depth, size, size, generator=gen)
    return image[None, None], labels[None]


def foreground_dice(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    out = []
    for c in range(1, K):
        a, b = pred == c, target == c
        out.append(float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1)))
    return out


def weighted(losses: dict[str, torch.Tensor], crit: SetCriterion, names) -> float:
    return sum(getattr(crit.weights, n) * float(losses[f"loss_{n}"]) for n in names)


def train(steps: int, lr: float) -> dict:
    """Train the tiny model on the phantom slab; returns loss history and final Dice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the CI/dev machines are small and shared: one thread is fastest
    try:
        torch.manual_seed(0)
        image, labels = phantom_slab()
        cfg = MaskSAMConfig(variant="tiny", img_size=SIZE, slab_depth=DEPTH, num_classes=K,
                            freeze_sam=False)
        model = build_masksam(cfg).train()
        crit = SetCriterion(K, num_points=2048)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                weight_decay=1e-4)
        history = []
        start = time.perf_counter()
        for _ in range(steps):
            losses = crit(model(image), labels)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
        model.eval()
        with torch.no_grad():
            pred = model.class_probs(image).argmax(1)
        return {"history": history, "dice": foreground_dice(pred, labels), "crit": crit,
                "seconds": time.perf_counter() - start}
    finally:
        torch.set_num_threads(threads)


def _ratio(history: list[dict], crit: SetCriterion, names) -> float:
    first = weighted(history[0], crit, names)
    last = sum(weighted(h, crit, names) for h in history[-5:]) / 5
    return first / last


def test_a_few_steps_reduce_the_loss() -> None:
    """Fast check (seconds): 20 steps already lower the fitted and the auxiliary terms."""
    run = train(steps=20, lr=3e-3)
    hist = run["history"]
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] / 1.3
    assert _ratio(hist, run["crit"], TERMS_FITTED) > 1.5
    assert _ratio(hist, run["crit"], TERMS_AUX) > 2.0  # the prompt generator's masks learn


@pytest.mark.slow
def test_tiny_masksam_overfits_one_slab() -> None:
    """Dice >= 0.9 on the slab; the total loss (auxiliary mask terms included) falls >= 5x,
    and so do the class, mask, Dice and box terms (about 15 s on one thread)."""
    run = train(steps=120, lr=3e-3)
    hist, crit = run["history"], run["crit"]
    assert min(run["dice"]) >= 0.9, run["dice"]
    total = hist[0]["loss"] / (sum(h["loss"] for h in hist[-5:]) / 5)
    assert total >= 5.0, total
    assert _ratio(hist, crit, TERMS_FITTED) >= 5.0
    # the prompt generator's auxiliary masks fit too (they were stuck at Dice loss ~0.7)
    assert _ratio(hist, crit, TERMS_AUX) >= 3.0
