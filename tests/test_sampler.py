"""Slab sampling: nnU-Net's batch rule for foreground oversampling (per batch, per rank, per
micro-batch, through the real DataLoader) and padding equal to inference's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from masksam.components._sampler import SlabDataset, StepSampler, forced_count, make_case
from masksam.components._sliding_window import _pad_to


def _case(shape=(12, 48, 48), seed: int = 0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[5:7, 30:33, 10:13] = 1  # a tiny organ: uniform slabs rarely see it
    label[2:3, 3:5, 40:43] = 2
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    image[1] += 5.0  # channels with different minima
    return make_case("c", image, label)


def _batches(ds: SlabDataset, start_step: int, steps: int, grad_accum: int = 1):
    """What train() iterates: a DataLoader over StepSampler, batch_size = the dataset's."""
    per_step = ds.batch_size * grad_accum
    loader = torch.utils.data.DataLoader(
        ds, batch_size=ds.batch_size, sampler=StepSampler(start_step * per_step, (start_step + steps) * per_step))
    return list(loader)


@pytest.mark.parametrize("batch,fraction", [(1, 0.33), (2, 0.33), (3, 0.33), (4, 0.66), (5, 0.5), (4, 0.0),
                                            (3, 1.0)])
def test_batch_rule_forces_exactly_the_last_ceil_bp_of_every_batch(batch: int, fraction: float) -> None:
    ds = SlabDataset([_case()], 2, 16, fraction, seed=1, augmentation=None, foreground_rule="batch",
                     batch_size=batch)
    want = math.ceil(batch * fraction - 1e-9)
    expected = torch.tensor([False] * (batch - want) + [True] * want)
    # grad accumulation (3 micro-batches per step) and a resumed start (step 2) keep the rule
    for micro in _batches(ds, start_step=2, steps=3, grad_accum=3):
        assert torch.equal(micro["forced"], expected)
        for forced, label in zip(micro["forced"], micro["label"]):
            if forced:
                assert (label > 0).any()  # centred on an organ voxel


def test_batch_rule_splits_the_global_batch_over_ranks_like_nnunet() -> None:
    """The paper's setting: batch 2 as 2 ranks x 1 at p = 0.33 -> rank 1 forced, rank 0 not
    (nnU-Net's _set_batch_size_and_oversample); 2 ranks x 3 at p = 0.5 -> the last 3 of 6."""
    for world, batch, fraction, forced_ranks in ((2, 1, 0.33, [[False], [True]]),
                                                 (2, 3, 0.5, [[False] * 3, [True] * 3]),
                                                 (3, 2, 0.33, [[False, False], [False, False], [True, True]])):
        for rank in range(world):
            ds = SlabDataset([_case()], 2, 16, fraction, seed=1, rank=rank, augmentation=None,
                             foreground_rule="batch", batch_size=batch, world_size=world)
            for micro in _batches(ds, 0, 4):
                assert micro["forced"].tolist() == forced_ranks[rank], (world, batch, rank)
    assert [forced_count(2, 0.33), forced_count(3, 1 / 3), forced_count(4, 0.66), forced_count(7, 0.0)] == [1, 1, 3, 0]


def test_coin_rule_is_a_per_sample_draw() -> None:
    ds = SlabDataset([_case()], 2, 16, 0.5, seed=4, augmentation=None, foreground_rule="coin", batch_size=4)
    flags = torch.cat([b["forced"] for b in _batches(ds, 0, 100)]).reshape(-1, 4)
    assert 0.4 < flags.float().mean() < 0.6
    assert len({tuple(row.tolist()) for row in flags}) > 4  # not tied to the batch position
    with pytest.raises(ValueError, match="foreground_rule"):
        SlabDataset([_case()], 2, 16, 0.5, foreground_rule="always")


@pytest.mark.parametrize("fraction", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(3, 10, 11), (5, 9, 16), (2, 16, 7)])
def test_small_volumes_are_padded_exactly_as_inference_pads_them(shape, fraction: float) -> None:
    """A case smaller than the slab in some axes: the training slab equals _pad_to's padded
    volume (centred, each channel's minimum), with or without foreground forcing."""
    case = _case(shape, seed=2)
    case.label[...] = 0
    case.label[shape[0] // 2, 1:3, 2:4] = 1
    case = make_case("small", case.image, case.label)
    depth, patch = 4, 16
    padded, lows = _pad_to(case.image, (depth, patch, patch))
    assert padded.shape[1:] == (max(depth, shape[0]), patch, patch)
    ds = SlabDataset([case], depth, patch, fraction, seed=0, augmentation=None, foreground_rule="batch")
    label = np.zeros(padded.shape[1:], np.int64)
    label[lows[0]:lows[0] + shape[0], lows[1]:lows[1] + shape[1], lows[2]:lows[2] + shape[2]] = case.label
    for i in range(5):
        sample = ds[i]
        # an axis deeper than the slab is sampled, not padded: the slab is some T slices of it
        z = next(z for z in range(padded.shape[1] - depth + 1)
                 if np.array_equal(sample["image"].numpy(), padded[:, z:z + depth]))
        assert np.array_equal(sample["label"].numpy(), label[z:z + depth])
    # channel 1's padding is its own minimum, not 0 or channel 0's
    assert float(ds[0]["image"][1].min()) == pytest.approx(float(case.image[1].min()))


def test_padding_with_augmentation_context_matches_too() -> None:
    """With augmentation the crop is 1.5x larger and centre-cropped back: with every random
    transform off, the slab is still exactly the inference padding."""
    from masksam.components._augment import AugmentConfig

    off = AugmentConfig(p_spatial=0, p_noise=0, p_blur=0, p_brightness=0, p_shift=0, p_gamma=0, p_mirror=0)
    case = _case((4, 13, 10), seed=3)
    padded, _ = _pad_to(case.image, (4, 32, 32))
    ds = SlabDataset([case], 4, 32, 0.0, seed=0, augmentation=off)
    assert ds.crop_hw == 48
    assert np.allclose(ds[0]["image"].numpy(), padded, atol=1e-6)


def test_slab_outside_a_large_volume_is_filled_with_the_channel_minimum() -> None:
    """A foreground-centred slab at the volume's edge reaches outside: that part is each
    channel's minimum (as inference pads), the label background."""
    shape = (8, 40, 40)
    label = np.zeros(shape, np.uint8)
    label[3:5, 0:2, 0:2] = 1  # an organ in the corner
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32) + 3.0
    case = make_case("edge", image, label)
    ds = SlabDataset([case], 2, 16, 1.0, seed=0, augmentation=None, foreground_rule="batch")
    sample = ds[0]
    assert bool(sample["forced"])
    img = sample["image"][0].numpy()
    assert np.isclose(img[:, 0, 0], image.min()).all()  # the top-left corner lies outside
    assert (sample["label"][:, 0, 0] == 0).all()
