"""Sliding-window volume inference (numpy, torch-free) against a per-voxel predictor whose
answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from masksam.components._sliding_window import (compute_steps, gaussian_importance_map,
                                                sliding_window_inference)

K = 3


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def voxelwise(x: np.ndarray) -> np.ndarray:
    """Per-voxel soft class maps ``[B, C, T, H, W]`` -> ``[B, K, T, H, W]`` (no context)."""
    a = x[:, 0].astype(np.float64)
    b = x[:, -1].astype(np.float64)
    return _softmax(np.stack([a, 2 * b - a, -a * b], axis=1) * 3, axis=1).astype(np.float32)


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _direct(volume: np.ndarray) -> np.ndarray:
    return voxelwise(volume[None])[0]


@pytest.mark.parametrize("shape", [
    (1, 3, 5, 7),        # smaller than the window in every axis
    (1, 8, 16, 16),      # exactly one window
    (2, 19, 37, 23),     # larger in every axis, two channels
    (1, 5, 40, 9),       # mixed: pad Z and X, tile Y
])
@pytest.mark.parametrize("mirror_axes", [(), (1, 2), (0, 1, 2)])
def test_sliding_window_equals_per_voxel_answer(shape, mirror_axes) -> None:
    volume = _volume(shape)
    seen: list[tuple[int, ...]] = []

    def predict(x: np.ndarray) -> np.ndarray:
        seen.append(tuple(x.shape))
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
        return voxelwise(x)

    probs, labels = sliding_window_inference(
        predict, volume, slab_depth=8, img_size=16, num_classes=K, mirror_axes=mirror_axes,
        batch_size=1)
    expect = _direct(volume)
    assert probs.dtype == np.float32 and probs.shape == (K, *shape[1:])
    assert labels.dtype == np.uint8 and labels.shape == shape[1:]
    np.testing.assert_allclose(probs, expect, atol=1e-5)
    np.testing.assert_array_equal(labels, expect.argmax(0))
    assert all(s == (1, shape[0], 8, 16, 16) for s in seen)
    assert len(seen) % (2 ** len(mirror_axes)) == 0


def test_batches_and_no_probs() -> None:
    volume = _volume((1, 21, 30, 45), seed=1)
    calls: list[int] = []

    def predict(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape[0])
        return voxelwise(x)

    p1, l1 = sliding_window_inference(predict, volume, slab_depth=8, img_size=16,
                                      num_classes=K, batch_size=1)
    n_windows = len(calls)
    calls.clear()
    p3, l3 = sliding_window_inference(predict, volume, slab_depth=8, img_size=16,
                                      num_classes=K, batch_size=3)
    assert max(calls) == 3 and sum(calls) == n_windows and len(calls) == -(-n_windows // 3)
    np.testing.assert_allclose(p3, p1, atol=1e-6)
    np.testing.assert_array_equal(l3, l1)
    none, l0 = sliding_window_inference(predict, volume, slab_depth=8, img_size=16,
                                        num_classes=K, batch_size=2, return_probs=False)
    assert none is None
    np.testing.assert_array_equal(l0, l1)


def test_gaussian_blending_of_disagreeing_windows() -> None:
    """Each window answers a constant: the result is the Gaussian-weighted mean of windows."""
    volume = np.zeros((1, 8, 16, 24), dtype=np.float32)
    volume[0, :, :, :] = np.arange(24, dtype=np.float32)       # x coordinate as intensity

    def predict(x: np.ndarray) -> np.ndarray:
        first_x = x[:, 0, 0, 0, 0].reshape(-1, 1, 1, 1, 1)      # the window's start
        return np.broadcast_to(first_x, (x.shape[0], 1, 8, 16, 16)).copy()

    probs, _ = sliding_window_inference(predict, volume, slab_depth=8, img_size=16,
                                        num_classes=1, overlap=0.5)
    g = gaussian_importance_map((8, 16, 16))[0, 0]              # profile along x
    # windows start at x = 0 and 8; x in [8, 16) sees both
    for x in range(24):
        w0 = g[x] if x < 16 else 0.0
        w1 = g[x - 8] if x >= 8 else 0.0
        expect = (w0 * 0 + w1 * 8) / (w0 + w1)
        assert probs[0, 3, 5, x] == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("window", [1, 3, 8, 16])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_windows_cover_every_voxel(window: int, overlap: float) -> None:
    for size in range(window, window * 5 + 3):
        steps = compute_steps(size, window, overlap)
        assert steps[0] == 0 and steps[-1] + window == size
        assert steps == sorted(set(steps))
        covered = np.zeros(size, dtype=bool)
        for s in steps:
            covered[s:s + window] = True
        assert covered.all()
        if len(steps) > 1:
            gaps = np.diff(steps)
            assert gaps.max() <= max(1, int(np.ceil(window * (1 - overlap))))
    with pytest.raises(ValueError):
        compute_steps(3, 4, 0.5)
    with pytest.raises(ValueError):
        compute_steps(8, 4, 1.0)


def test_gaussian_importance_map() -> None:
    g = gaussian_importance_map((8, 16, 16), 0.125)
    assert g.shape == (8, 16, 16) and g.dtype == np.float32
    assert float(g.max()) == pytest.approx(1.0) and float(g.min()) > 0
    assert np.array_equal(g, g[::-1]) and np.array_equal(g, g[:, ::-1]) and np.array_equal(g, g[:, :, ::-1])
    # separable: the product of its 1-D profiles; sigma = scale * size per axis
    gz, gy, gx = g[:, 7, 7] / g[3, 7, 7], g[3, :, 7] / g[3, 7, 7], g[3, 7, :] / g[3, 7, 7]
    outer = gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    np.testing.assert_allclose(g / g.max(), outer / outer.max(), rtol=1e-5)
    x = np.arange(16, dtype=np.float64) - 7.5
    profile = np.exp(-0.5 * (x / 2.0) ** 2)
    np.testing.assert_allclose(gx.astype(np.float64), profile / profile[7], rtol=1e-5)


def test_bad_inputs_are_rejected() -> None:
    vol = _volume((1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[C, Z, Y, X\]"):
        sliding_window_inference(voxelwise, vol[0], slab_depth=2, img_size=4, num_classes=K)
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_inference(voxelwise, vol, slab_depth=2, img_size=4, num_classes=K,
                                 mirror_axes=(3,))
    with pytest.raises(ValueError, match="predict_slab returned shape"):
        sliding_window_inference(voxelwise, vol, slab_depth=2, img_size=4, num_classes=K + 1)


def test_same_result_as_the_former_torch_implementation() -> None:
    """The numpy port keeps the algorithm: compared with a direct torch re-computation of one
    blended window pair (Gaussian weights, padding, rolling band) on a random predictor."""
    torch = pytest.importorskip("torch")
    volume = _volume((1, 11, 20, 27), seed=4)
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(K, 1)).astype(np.float32)

    def linear(x: np.ndarray) -> np.ndarray:  # context-free but not a softmax: blending shows
        return np.einsum("kc,bcthw->bkthw", weights, x).astype(np.float32)

    probs, _ = sliding_window_inference(linear, volume, slab_depth=4, img_size=16, num_classes=K)
    # reference: accumulate every window with torch, no rolling band
    g = torch.from_numpy(gaussian_importance_map((4, 16, 16)))
    acc = torch.zeros(K, 11, 20, 27)
    wsum = torch.zeros(11, 20, 27)
    for z in compute_steps(11, 4, 0.5):
        for y in compute_steps(20, 16, 0.5):
            for x in compute_steps(27, 16, 0.5):
                win = torch.from_numpy(linear(volume[None, :, z:z + 4, y:y + 16, x:x + 16].copy()))[0]
                acc[:, z:z + 4, y:y + 16, x:x + 16] += win * g
                wsum[z:z + 4, y:y + 16, x:x + 16] += g
    np.testing.assert_allclose(probs, (acc / wsum).numpy(), atol=1e-5)
