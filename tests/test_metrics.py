"""Metric numbers checked against independent implementations: medpy, MONAI, DeepMind surface-distance.

Masks are smooth random blobs (Gaussian-filtered noise, thresholded) plus edge cases, always with
anisotropic spacing, so an axis-order or spacing mistake shows up as a wrong number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from masksam.components import metrics as M

medpy_binary = pytest.importorskip("medpy.metric.binary")

# The reference packages' own deprecation noise (MONAI's get_mask_edges, surface-distance's
# scipy.ndimage.filters imports), not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Please import .* from the `scipy.ndimage` namespace:DeprecationWarning"),
]

SPACING = (0.7, 0.9, 3.0)
SHAPE = (30, 34, 14)
TOL = 1e-6


def blob(seed: int, shape=SHAPE, sigma=2.5, level=0.5) -> np.ndarray:
    """A smooth random blob: Gaussian-filtered noise above ``level`` standard deviations."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    smooth = ndimage.gaussian_filter(noise, sigma)
    return smooth > level * smooth.std()


def pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(pred, gt) pairs: overlapping blobs, shifted copies, border-touching, single voxels."""
    out = {}
    for seed in range(3):
        gt = blob(seed)
        pred = ndimage.binary_dilation(gt, iterations=1) ^ (blob(seed + 50) & ~gt)
        out[f"blobs{seed}"] = (pred, gt)
    gt = blob(7)
    out["shifted"] = (np.roll(gt, 2, axis=0), gt)
    touching = np.zeros(SHAPE, bool)
    touching[:, :10, :5] = True  # touches three faces of the image
    other = np.zeros(SHAPE, bool)
    other[2:, 3:12, :] = True
    out["border"] = (touching, other)
    one = np.zeros(SHAPE, bool)
    one[5, 6, 7] = True
    far = np.zeros(SHAPE, bool)
    far[20, 30, 2] = True
    out["single_voxels"] = (one, far)
    out["single_in_blob"] = (one, ndimage.binary_dilation(one, iterations=3))
    out["identical"] = (gt, gt.copy())
    return out


PAIRS = pairs()


def medpy_directed(a, b, spacing, connectivity):
    return getattr(medpy_binary, "__surface_distances")(a, b, spacing, connectivity)


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("connectivity", [1, 3])
def test_dice_hd95_match_medpy(name, connectivity):
    pred, gt = PAIRS[name]
    got = M.score_binary(pred, gt, SPACING, connectivity=connectivity)
    assert got["Dice"] == pytest.approx(medpy_binary.dc(pred, gt), abs=TOL)
    want = medpy_binary.hd95(pred, gt, voxelspacing=SPACING, connectivity=connectivity)
    assert got["HD95"] == pytest.approx(want, abs=TOL)
    tp = int(np.sum(pred & gt))
    assert (got["TP"], got["FP"], got["FN"]) == (tp, int(pred.sum()) - tp, int(gt.sum()) - tp)
    assert (got["n_pred"], got["n_ref"]) == (int(pred.sum()), int(gt.sum()))


@pytest.mark.parametrize("name", ["blobs0", "border", "single_in_blob"])
def test_cropped_surface_distances_equal_whole_image(name):
    """Cropping to the bounding box plus one voxel changes no distance."""
    pred, gt = PAIRS[name]
    d_pg, d_gp = M.surface_distances(pred, gt, SPACING)
    np.testing.assert_allclose(np.sort(d_pg), np.sort(medpy_directed(pred, gt, SPACING, 1)), atol=TOL)
    np.testing.assert_allclose(np.sort(d_gp), np.sort(medpy_directed(gt, pred, SPACING, 1)), atol=TOL)


def _onehot(mask):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_monai_convention_and_nsd_match_monai(name):
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, gt = PAIRS[name]
    got = M.score_binary(pred, gt, SPACING, tolerance_mm=2.0, hd_convention="monai")
    hd = monai_metrics.compute_hausdorff_distance(_onehot(pred), _onehot(gt), percentile=95, spacing=SPACING)
    nsd = monai_metrics.compute_surface_dice(
        _onehot(pred), _onehot(gt), class_thresholds=[2.0], spacing=SPACING, use_subvoxels=False
    )
    # MONAI computes in float32: compare with a relative tolerance of 1e-6.
    assert got["HD95"] == pytest.approx(hd.item(), rel=TOL, abs=TOL)
    assert got["NSD"] == pytest.approx(nsd.item(), rel=TOL, abs=TOL)


def test_hd95_conventions_differ_as_documented():
    """Pooled (medpy) vs max of directed percentiles (MONAI): MONAI's is never smaller, and an
    outlier island worth ~8% of one border but ~4% of the pooled borders separates them."""
    gt = np.zeros((40, 40, 12), bool)
    gt[5:25, 5:25, 2:10] = True
    pred = gt.copy()
    pred[32:36, 32:36, 2:10] = True  # far island: present in the pred->gt direction only
    medpy_style = M.score_binary(pred, gt, SPACING, hd_convention="medpy")["HD95"]
    monai_style = M.score_binary(pred, gt, SPACING, hd_convention="monai")["HD95"]
    d_pg, d_gp = M.surface_distances(pred, gt, SPACING)
    assert 0.05 < np.mean(d_pg > 0) and np.mean(np.concatenate([d_pg, d_gp]) > 0) < 0.05
    assert medpy_style == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=SPACING), abs=TOL)
    assert monai_style > medpy_style + 5.0
    for pred, gt in PAIRS.values():
        a = M.score_binary(pred, gt, SPACING, hd_convention="medpy")["HD95"]
        b = M.score_binary(pred, gt, SPACING, hd_convention="monai")["HD95"]
        assert b >= a - TOL


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_nsd_against_deepmind_surfels(name):
    """DeepMind weights surfels by their area; we weight border voxels by 1 (see metrics.py).

    They agree exactly where every distance is 0 (identical masks) or beyond the tolerance
    (distant single voxels). On the smooth blobs (hundreds of voxels, 3 mm slices) they differ by
    up to 0.07 (measured: 0.011 to 0.068); on a structure of a few voxels (one voxel inside a
    3-voxel ball) by 0.23, because the voxel count and the surfel area of a tiny object disagree.
    """
    sd = pytest.importorskip("surface_distance")
    pred, gt = PAIRS[name]
    ours = M.score_binary(pred, gt, SPACING, tolerance_mm=2.0)["NSD"]
    ref = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(gt, pred, SPACING), 2.0)
    if name in ("identical", "single_voxels"):
        assert ours == pytest.approx(ref, abs=TOL)
    elif name == "single_in_blob":
        assert 0.15 < abs(ours - ref) < 0.3
    else:
        assert abs(ours - ref) < 0.08


def test_nsd_tolerance_monotone_and_bounds():
    pred, gt = PAIRS["blobs1"]
    values = [M.score_binary(pred, gt, SPACING, tolerance_mm=t)["NSD"] for t in (0.0, 1.0, 2.0, 5.0, 100.0)]
    assert values == sorted(values)
    assert values[-1] == 1.0 and 0.0 <= values[0] < 1.0


def test_empty_conventions():
    gt = PAIRS["blobs0"][1]
    empty = np.zeros_like(gt)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING)))
    both = M.score_binary(empty, empty, SPACING)
    assert all(math.isnan(both[k]) for k in ("Dice", "HD95", "NSD"))
    assert (both["TP"], both["FP"], both["FN"]) == (0, 0, 0)
    for pred, ref in ((empty, gt), (gt, empty)):
        one = M.score_binary(pred, ref, SPACING)
        assert one["Dice"] == 0.0 and one["NSD"] == 0.0
        assert one["HD95"] == pytest.approx(diagonal, abs=TOL)
    assert M.score_binary(empty, gt, SPACING)["FN"] == int(gt.sum())


def test_score_case_multilabel_matches_binary_on_whole_image():
    """score_case crops each label to its own box; compare against uncropped medpy per label."""
    gt = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    gt[blob(1)] = 1
    pred[ndimage.binary_erosion(blob(1))] = 1
    gt[:, :8, :4] = 2  # touches the border
    pred[:, :9, :3] = 2
    gt[20, 20, 7] = 3  # in gt only
    pred[10, 30, 10] = 4  # in pred only
    labels = [1, 2, 3, 4, 5]  # 5: in neither
    got = M.score_case(pred, gt, SPACING, labels, tolerance_mm=1.5)
    assert list(got) == ["1", "2", "3", "4", "5"]
    for label in (1, 2):
        p, g = pred == label, gt == label
        assert got[str(label)]["Dice"] == pytest.approx(medpy_binary.dc(p, g), abs=TOL)
        assert got[str(label)]["HD95"] == pytest.approx(medpy_binary.hd95(p, g, SPACING), abs=TOL)
        assert got[str(label)] == M.score_binary(p, g, SPACING, tolerance_mm=1.5)
    diagonal = M.image_diagonal_mm(SHAPE, SPACING)
    assert got["3"]["Dice"] == 0.0 and got["3"]["HD95"] == pytest.approx(diagonal) and got["3"]["FN"] == 1
    assert got["4"]["NSD"] == 0.0 and got["4"]["FP"] == 1
    assert math.isnan(got["5"]["Dice"]) and got["5"]["n_ref"] == 0
    background = M.score_case(pred, gt, SPACING, [0])["0"]
    assert background["Dice"] == pytest.approx(medpy_binary.dc(pred == 0, gt == 0), abs=TOL)


def test_score_case_is_fast_on_a_large_volume_with_small_organs():
    """Cropping keeps a 2-organ case on a 160x256x256 grid well under the whole-image cost."""
    import time

    shape = (160, 256, 256)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    gt[40:70, 100:140, 90:130] = 1
    pred[42:70, 101:141, 90:128] = 1
    gt[100:110, 10:30, 200:240] = 2
    pred[100:111, 10:31, 200:239] = 2
    start = time.perf_counter()
    got = M.score_case(pred, gt, SPACING, [1, 2])
    elapsed = time.perf_counter() - start
    assert 0.8 < got["1"]["Dice"] < 1.0 and 0.8 < got["2"]["Dice"] < 1.0
    assert elapsed < 5.0, f"score_case took {elapsed:.1f} s"


def test_bad_inputs_raise():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        M.score_case(a, np.zeros((4, 4, 5), np.uint8), (1, 1, 1), [1])
    with pytest.raises(ValueError, match="spacing"):
        M.score_case(a, a, (1, 1), [1])
    with pytest.raises(ValueError, match="spacing"):
        M.score_case(a, a, (1, 0, 1), [1])
    with pytest.raises(ValueError, match="non-integer"):
        M.score_case(a + 0.5, a, (1, 1, 1), [1])
    with pytest.raises(ValueError, match="negative"):
        M.score_case(a.astype(np.int16) - 1, a, (1, 1, 1), [1])
    with pytest.raises(ValueError, match="convention"):
        M.score_binary(a, a, (1, 1, 1), hd_convention="nnunet")
    with pytest.raises(ValueError, match="tolerance"):
        M.score_binary(a, a, (1, 1, 1), tolerance_mm=-1)




def test_real_ct_labels_match_medpy():
    """41 real organ labels on a real CT grid: per-label scores equal medpy's on the whole image."""
    import SimpleITK as sitk

    from _shared import real_ct_dir

    path = real_ct_dir() / "example_seg.nii.gz"
    image = sitk.ReadImage(str(path))
    gt = sitk.GetArrayFromImage(image)
    spacing = image.GetSpacing()[::-1]
    pred = np.roll(gt, 1, axis=1)  # a one-voxel shift, as a slightly misregistered prediction
    pred[ndimage.binary_dilation(gt == 5, iterations=2)] = 5
    labels = M.labels_present(gt)
    assert len(labels) == 41
    got = M.score_case(pred, gt, spacing, labels)
    for label in labels[::6] + [5]:
        p, g = pred == label, gt == label
        assert got[str(label)]["Dice"] == pytest.approx(medpy_binary.dc(p, g), abs=TOL)
        assert got[str(label)]["HD95"] == pytest.approx(medpy_binary.hd95(p, g, spacing), abs=TOL)
