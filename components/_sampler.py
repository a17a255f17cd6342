"""Slab sampling with nnU-Net-style foreground oversampling.

A training sample is a slab ``[C, T, P, P]`` (T consecutive slices, a P x P in-plane window)
cut from one preprocessed case. A sample "forced onto foreground" is centred on a random voxel
of a random class present in the case (so small organs are seen often); the others are placed
uniformly. Which samples are forced (``foreground_rule``):

- ``batch`` (nnU-Net's rule, its data loader's ``get_do_oversample``): in every batch the last
  ``ceil(G * p)`` samples are forced, where the batch is the global one of a micro-step,
  ``G = world_size * batch_size``, as nnU-Net's DDP trainer splits it
  (``_set_batch_size_and_oversample``): rank ``r`` holds positions ``r*B .. r*B+B-1``. With the
  paper's batch 2 on 2 GPUs and p = 0.33, rank 1's sample is forced and rank 0's is not.
  (nnU-Net counts ``G - round(G * (1 - p))``, the same number except for ties and one-sample
  batches, where it forces none for p < 0.5 and this rule forces one.)
- ``coin``: each sample independently with probability p.

The DataLoader batches consecutive indices (``StepSampler`` starts at a multiple of the batch
size), so sample ``i`` is at position ``i % batch_size`` of its micro-batch.

Padding equals inference's (``components._sliding_window._pad_to``): an axis shorter than the
patch is centred in it, and everything outside the volume is each channel's minimum (label 0),
so the network never sees at training a border it would not see at inference.

Sample ``i`` of rank ``r`` is drawn from ``numpy.random.default_rng([seed, r, i])``: the data a
step sees depends only on (seed, rank, step), so runs repeat, ``--resume`` continues exactly
and data-loader workers need no further seeding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from masksam.components._augment import AugmentConfig, augment, build_augmentation

FOREGROUND_RULES = ("batch", "coin")

# Foreground voxels kept per class and case to draw centres from (nnU-Net keeps 10 000).
_MAX_LOCATIONS = 10_000


@dataclass
class Case:
    """One preprocessed case in memory, with the foreground locations per class."""

    name: str
    image: np.ndarray  # [C, Z, Y, X] float32
    label: np.ndarray  # [Z, Y, X] uint8
    locations: dict[int, np.ndarray]  # class -> [N, 3] (z, y, x) voxel indices
    # per channel: the value outside the volume (its minimum, as inference pads)
    fill: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def foreground_locations(label: np.ndarray, seed: int = 1234) -> dict[int, np.ndarray]:
    """Up to ``_MAX_LOCATIONS`` random voxel indices of each foreground class in ``label``."""
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for cls in np.unique(label):
        if cls == 0:
            continue
        idx = np.argwhere(label == cls)
        if len(idx) > _MAX_LOCATIONS:
            idx = idx[rng.choice(len(idx), _MAX_LOCATIONS, replace=False)]
        out[int(cls)] = idx
    return out


def make_case(name: str, image: np.ndarray, label: np.ndarray) -> Case:
    """Wrap arrays as a :class:`Case`, computing its foreground locations and padding values."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    fill = image.reshape(image.shape[0], -1).min(axis=1) if image.size else np.zeros(image.shape[0], np.float32)
    return Case(name, image, np.ascontiguousarray(label, dtype=np.uint8), foreground_locations(label),
                fill.astype(np.float32))


def _crop(array: np.ndarray, start: tuple[int, ...], size: tuple[int, ...],
          fill: np.ndarray | float = 0) -> np.ndarray:
    """Crop the last ``len(size)`` axes of ``array`` at ``start`` (may lie outside).

    Outside the array: ``fill``, a scalar or one value per leading index (``[C]`` for an image
    ``[C, Z, Y, X]``: each channel's own padding value).
    """
    lead = array.ndim - len(size)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for s, n, dim in zip(start, size, array.shape[lead:]):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out = np.empty(array.shape[:lead] + tuple(size), dtype=array.dtype)
    out[...] = np.reshape(fill, np.shape(fill) + (1,) * len(size)) if np.ndim(fill) else fill
    out[tuple(dst)] = array[tuple(src)]
    return out


def centred_start(dim: int, inner: int) -> int:
    """Start of a window of ``inner`` over an axis of ``dim < inner`` voxels, centred as
    inference pads it (``_pad_to``: ``(inner - dim) // 2`` padding before the volume)."""
    return -((inner - dim) // 2)


def forced_count(batch: int, fraction: float) -> int:
    """How many samples of a batch of ``batch`` the batch rule forces: ``ceil(batch * p)``
    (with a tolerance, so 3 x 0.33... does not become 2 by rounding noise)."""
    return min(batch, max(0, math.ceil(batch * fraction - 1e-9)))


class SlabDataset(Dataset):
    """Index ``i`` -> an augmented slab ``{"image": [C,T,P,P] float32, "label": [T,P,P] int64,
    "forced": bool}`` (``forced``: the sample was centred on foreground).

    ``foreground_rule`` defaults to ``coin`` here, which needs no batch geometry; training
    passes ``train.foreground_rule`` (``batch`` by default) with its batch size and world size.

    The dataset is unbounded in effect: any non-negative index gives a fresh random sample,
    reproducible from ``(seed, rank, index)``. ``batch_size`` and ``world_size`` must be the
    DataLoader's batch size and the number of ranks for the ``batch`` rule to hold per batch.
    """

    def __init__(
        self,
        cases: list[Case],
        slab_depth: int,
        patch_size: int,
        foreground_oversample: float = 0.33,
        seed: int = 0,
        rank: int = 0,
        augmentation: AugmentConfig | None = AugmentConfig(),
        *,
        foreground_rule: str = "coin",
        batch_size: int = 1,
        world_size: int = 1,
    ) -> None:
        if not cases:
            raise ValueError("SlabDataset needs at least one case")
        if foreground_rule not in FOREGROUND_RULES:
            raise ValueError(f"foreground_rule must be one of {FOREGROUND_RULES}, got {foreground_rule!r}")
        if batch_size < 1 or (foreground_rule == "batch" and not 0 <= rank < world_size):
            raise ValueError(f"the batch rule needs batch_size >= 1 and 0 <= rank < world_size, got "
                             f"{batch_size}, {rank}, {world_size}")
        self.cases = cases
        self.depth, self.patch = int(slab_depth), int(patch_size)
        self.fg = float(foreground_oversample)
        self.seed, self.rank = int(seed), int(rank)
        self.rule, self.batch_size, self.world_size = foreground_rule, int(batch_size), int(world_size)
        self.augmentation = augmentation
        # Crop 1.5x larger in-plane when augmenting so rotated corners hold real anatomy.
        self.crop_hw = int(np.ceil(self.patch * 1.5)) if augmentation is not None else self.patch
        self.transform = (
            build_augmentation((self.depth, self.patch, self.patch), augmentation) if augmentation else None
        )

    def __len__(self) -> int:  # a large nominal length; sampling is by explicit index
        return 2**62

    def forced_by_rule(self, index: int) -> bool:
        """The batch rule: is sample ``index`` among the last ``ceil(G * p)`` of its global batch?"""
        global_batch = self.batch_size * self.world_size
        position = self.rank * self.batch_size + int(index) % self.batch_size
        return position >= global_batch - forced_count(global_batch, self.fg)

    def sample_position(self, rng: np.random.Generator, index: int = 0
                        ) -> tuple[Case, tuple[int, int, int], bool]:
        """Pick a case and the (z, y, x) start of a crop of ``(T, crop, crop)``; and whether it
        is centred on foreground."""
        case = self.cases[int(rng.integers(len(self.cases)))]
        size = (self.depth, self.crop_hw, self.crop_hw)
        inner = (self.depth, self.patch, self.patch)
        wanted = self.forced_by_rule(index) if self.rule == "batch" else bool(rng.random() < self.fg)
        forced = wanted and bool(case.locations)
        if forced:
            cls = list(case.locations)[int(rng.integers(len(case.locations)))]
            locs = case.locations[cls]
            centre = locs[int(rng.integers(len(locs)))]
            start = [int(c) - n // 2 for c, n in zip(centre, size)]
        else:
            # Uniform over positions that keep the patch (not the context margin) inside the
            # volume where it fits.
            start = []
            for dim, n, k in zip(case.label.shape, size, inner):
                margin = (n - k) // 2
                start.append(int(rng.integers(-margin, dim - k - margin + 1)) if dim >= k else 0)
        for axis, (dim, n, k) in enumerate(zip(case.label.shape, size, inner)):
            if dim <= k:  # the whole axis fits: centred as inference pads it
                start[axis] = centred_start(dim, k) - (n - k) // 2
        # Keep the slab's T slices inside the volume where the volume is deep enough.
        if case.label.shape[0] >= self.depth:
            start[0] = min(max(start[0], 0), case.label.shape[0] - self.depth)
        return case, (start[0], start[1], start[2]), forced

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        case, start, forced = self.sample_position(rng, int(index))
        size = (self.depth, self.crop_hw, self.crop_hw)
        image = _crop(case.image, start, size, case.fill if case.fill.size else 0.0)
        label = _crop(case.label, start, size, 0)
        if self.transform is not None:
            img, lab = augment(self.transform, image, label, rng)
        else:
            img, lab = torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))
        return {"image": img, "label": lab, "forced": torch.tensor(forced)}


class StepSampler(Sampler[int]):
    """Yields sample indices ``start, start+1, ...`` up to ``stop`` (resume starts mid-way)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)
