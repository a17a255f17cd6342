"""Slab sampling with nnU-Net-style foreground oversampling.

A training sample is a slab ``[C, T, P, P]`` (T consecutive slices, a P x P in-plane window)
cut from one preprocessed case. With probability ``foreground_oversample`` the slab is centred
on a random voxel of a random class present in the case (nnU-Net forces a third of each batch
this way so small organs are seen often); otherwise its position is uniform.

Sample ``i`` of rank ``r`` is drawn from ``numpy.random.default_rng([seed, r, i])``: the data a
step sees depends only on (seed, rank, step), so runs repeat, ``--resume`` continues exactly
and data-loader workers need no further seeding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from masksam.components._augment import AugmentConfig, augment, build_augmentation

# Foreground voxels kept per class and case to draw centres from (nnU-Net keeps 10 000).
_MAX_LOCATIONS = 10_000


@dataclass
class Case:
    """One preprocessed case in memory, with the foreground locations per class."""

    name: str
    image: np.ndarray  # [C, Z, Y, X] float32
    label: np.ndarray  # [Z, Y, X] uint8
    locations: dict[int, np.ndarray]  # class -> [N, 3] (z, y, x) voxel indices


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
    """Wrap arrays as a :class:`Case`, computing its foreground locations."""
    return Case(name, np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8),
                foreground_locations(label))


def _crop(array: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """Crop the last ``len(size)`` axes of ``array`` at ``start`` (may lie outside), zero-padding."""
    lead = array.ndim - len(size)
    src, dst, pad = [slice(None)] * lead, [slice(None)] * lead, [(0, 0)] * lead
    for s, n, dim in zip(start, size, array.shape[lead:]):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(hi, lo)))
        pad.append((lo - s, s + n - max(hi, lo)))
    return np.pad(array[tuple(src)], pad)


class SlabDataset(Dataset):
    """Index ``i`` -> an augmented slab ``{"image": [C,T,P,P] float32, "label": [T,P,P] int64}``.

    The dataset is unbounded in effect: any non-negative index gives a fresh random sample,
    reproducible from ``(seed, rank, index)``.
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
    ) -> None:
        if not cases:
            raise ValueError("SlabDataset needs at least one case")
        self.cases = cases
        self.depth, self.patch = int(slab_depth), int(patch_size)
        self.fg = float(foreground_oversample)
        self.seed, self.rank = int(seed), int(rank)
        self.augmentation = augmentation
        # Crop 1.5x larger in-plane when augmenting so rotated corners hold real anatomy.
        self.crop_hw = int(np.ceil(self.patch * 1.5)) if augmentation is not None else self.patch
        self.transform = (
            build_augmentation((self.depth, self.patch, self.patch), augmentation) if augmentation else None
        )

    def __len__(self) -> int:  # a large nominal length; sampling is by explicit index
        return 2**62

    def sample_position(self, rng: np.random.Generator) -> tuple[Case, tuple[int, int, int]]:
        """Pick a case and the (z, y, x) start of a crop of ``(T, crop, crop)``."""
        case = self.cases[int(rng.integers(len(self.cases)))]
        z, y, x = case.label.shape
        size = (self.depth, self.crop_hw, self.crop_hw)
        if case.locations and rng.random() < self.fg:
            cls = list(case.locations)[int(rng.integers(len(case.locations)))]
            locs = case.locations[cls]
            centre = locs[int(rng.integers(len(locs)))]
            start = [int(c) - n // 2 for c, n in zip(centre, size)]
        else:
            # Uniform over positions that keep the patch (not the context margin) inside the
            # volume when it fits; volumes smaller than the patch are centred and padded.
            start = []
            for dim, n, inner in zip((z, y, x), size, (self.depth, self.patch, self.patch)):
                margin = (n - inner) // 2
                lo, hi = -margin, dim - inner - margin
                start.append(int(rng.integers(lo, hi + 1)) if hi >= lo else (dim - n) // 2)
        # Keep the slab's T slices inside the volume where the volume is deep enough.
        if z >= self.depth:
            start[0] = min(max(start[0], 0), z - self.depth)
        return case, (start[0], start[1], start[2])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        case, start = self.sample_position(rng)
        size = (self.depth, self.crop_hw, self.crop_hw)
        image = _crop(case.image, start, size)
        label = _crop(case.label, start, size)
        if self.transform is not None:
            img, lab = augment(self.transform, image, label, rng)
        else:
            img, lab = torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))
        return {"image": img, "label": lab}


class StepSampler(Sampler[int]):
    """Yields sample indices ``start, start+1, ...`` up to ``stop`` (resume starts mid-way)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)
