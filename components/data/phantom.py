"""Generated abdominal CT phantoms in the nnU-Net raw layout: the pipeline's embedded demo data.

Each case is an abdomen in physical millimetres: a body outline with subcutaneous fat, muscle
wall, spine, ribs and lung bases; liver, spleen, kidneys, aorta, stomach and pancreas in their
anatomical places (plus unlabelled IVC, gallbladder, bowel and a CT table as distractors). Organs
are signed-distance shapes displaced by a smooth random deformation field, so no two cases share
a shape. Tissue is rendered on sub-slices and averaged over the slice thickness (partial volume),
then a contrast phase, a smooth bias field, correlated noise and the scanner's in-plane blur are
applied. Spacing (in-plane 0.6-1.0 mm, slices 2-5 mm), origin and direction vary per case;
kidney or pancreas is absent in about 15 % of cases. The anatomy is defined at adult scale and
shrunk to fit small fields of view (a 160x160 grid gives an infant-sized abdomen, 512x512 an
adult). Everything is drawn from ``numpy.random.default_rng([seed, case_index])``: the same seed
gives byte-identical arrays whatever the number of workers.

Body frame (millimetres, standard adult): x to the patient's left, y posterior, z superior
(DICOM LPS axes), origin at the centre of the abdominal cross-section at the renal hilum level.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from masksam.components._io import owned_output_dir, write_json
from masksam.components._workers import kill_workers, spawn_pool, stop_on_signals
from masksam.errors import UserError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"

LABELS: dict[str, int] = {
    "background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4,
    "aorta": 5, "stomach": 6, "pancreas": 7,
}

# Tissue classes rendered before intensities; each maps to one label.
TISSUES = [
    ("air", 0), ("fat", 0), ("muscle", 0), ("cavity_fat", 0), ("bowel", 0), ("gas", 0),
    ("lung", 0), ("heart", 0), ("bone", 0), ("cortical_bone", 0), ("disc", 0), ("csf", 0),
    ("cartilage", 0), ("ivc", 0), ("gallbladder", 0), ("table", 0), ("sinus", 0),
    ("liver", 1), ("spleen", 2), ("kidney_r_cortex", 3), ("kidney_r_medulla", 3),
    ("kidney_l_cortex", 4), ("kidney_l_medulla", 4), ("aorta", 5), ("stomach_wall", 6),
    ("stomach_fluid", 6), ("stomach_gas", 6), ("pancreas", 7),
]
T = {name: i for i, (name, _) in enumerate(TISSUES)}
TISSUE_LABEL = np.array([lab for _, lab in TISSUES], np.uint8)
# Organs are painted only over these (never over bone, the body wall or outside the body).
_HOLDS_ORGAN = np.zeros(len(TISSUES), bool)
_HOLDS_ORGAN[[T[n] for n in ("cavity_fat", "bowel", "gas", "lung", "ivc", "gallbladder", "sinus")]] = True
_HOLDS_ORGAN[TISSUE_LABEL > 0] = True
_CAVITY = np.zeros(len(TISSUES), bool)
_CAVITY[[T[n] for n in ("cavity_fat", "bowel", "gas")]] = True

BODY_A, BODY_B_ANT, BODY_B_POST = 160.0, 115.0, 100.0   # standard adult half-axes, mm
ANATOMY_Z = (-100.0, 125.0)                              # kidney lower pole .. liver dome


# --------------------------------------------------------------------------------------------
# Per-case parameters
# --------------------------------------------------------------------------------------------

@dataclass
class CaseParams:
    """Everything random about one case, drawn up front from its own generator."""

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    direction: np.ndarray          # 3x3, columns are the index axes in LPS
    origin_xyz: tuple[float, float, float]
    shift: np.ndarray              # body-frame position (mm) of the grid centre is -shift
    scale: float                   # anatomy scale (1 = adult)
    body_factor: np.ndarray        # per-axis body size factors (x, y, z)
    fat: tuple[float, float, float]   # subcutaneous fat: lateral, anterior, posterior (std mm)
    muscle: float                  # abdominal wall muscle thickness (std mm)
    phase: str                     # native | arterial | venous
    hu: np.ndarray                 # mean HU per tissue
    present: dict[str, bool]
    jitter: dict[str, np.ndarray]  # per organ: centre offset (3) and size factor (3)
    deform_mm: float
    noise_hu: float
    psf_sigma: float               # in-plane blur, voxels
    gas_depth: float               # stomach gas cap depth, std mm (0 = none)
    substeps: int                  # sub-slices rendered per slice (odd)


_PHASE_HU = {  # (low, high) HU per tissue, by contrast phase
    "venous": {"liver": (60, 110), "spleen": (50, 115), "kidney_cortex": (140, 185),
               "kidney_medulla": (125, 175), "aorta": (170, 230), "ivc": (130, 180),
               "heart": (120, 170), "bowel": (35, 55), "pancreas": (70, 110)},
    "arterial": {"liver": (55, 75), "spleen": (70, 130), "kidney_cortex": (190, 250),
                 "kidney_medulla": (70, 110), "aorta": (250, 350), "ivc": (60, 110),
                 "heart": (200, 300), "bowel": (35, 50), "pancreas": (90, 130)},
    "native": {"liver": (50, 65), "spleen": (40, 52), "kidney_cortex": (25, 38),
               "kidney_medulla": (22, 34), "aorta": (35, 50), "ivc": (35, 50),
               "heart": (35, 50), "bowel": (25, 40), "pancreas": (35, 50)},
}
_FIXED_HU = {  # (low, high) HU for tissues that do not depend on contrast
    "air": (-1000, -1000), "fat": (-115, -90), "muscle": (40, 60), "cavity_fat": (-105, -80),
    "gas": (-950, -850), "lung": (-880, -820), "bone": (300, 450), "cortical_bone": (800, 1000),
    "disc": (70, 100), "csf": (5, 15), "cartilage": (100, 140), "gallbladder": (0, 15),
    "table": (80, 150), "sinus": (-100, -60), "stomach_wall": (40, 70),
    "stomach_fluid": (5, 20), "stomach_gas": (-950, -850),
}

_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "aorta", "stomach", "pancreas", "gallbladder")


def sample_case_params(rng: np.random.Generator, size_xyz: Sequence[int]) -> CaseParams:
    """Draw one case's geometry, anatomy variation, contrast and acquisition parameters."""
    nx, ny, nz = (int(s) for s in size_xyz)
    sxy = float(np.round(rng.uniform(0.6, 1.0), 4))
    sz = float(rng.choice([2.0, 2.5, 3.0, 4.0, 5.0]))
    spacing = (sxy, sxy, sz)

    kind = rng.random()
    flip = np.diag([-1.0, -1.0, 1.0])  # the RAS-on-disk NIfTI convention of many converters
    direction = np.eye(3) if kind < 0.55 else flip.copy()
    if rng.random() < 0.15:            # gantry-like tilt about the left-right axis
        t = np.deg2rad(rng.uniform(3, 10) * rng.choice([-1, 1]))
        tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        direction = tilt @ direction

    body_factor = rng.uniform([0.88, 0.85, 0.9], [1.12, 1.15, 1.1])
    fov = np.array([nx * sxy, ny * sxy, nz * sz])
    fill = rng.uniform(0.78, 0.92)
    scale = float(min(1.0, fill * fov[0] / (2 * BODY_A * body_factor[0]),
                      fill * fov[1] / ((BODY_B_ANT + BODY_B_POST) * body_factor[1])))
    zc_std = 0.5 * (ANATOMY_Z[0] + ANATOMY_Z[1])
    cover_std = fov[2] / (scale * body_factor[2])
    zc_std += rng.uniform(-0.1, 0.1) * min(cover_std, ANATOMY_Z[1] - ANATOMY_Z[0])
    y_centre_std = 0.5 * (BODY_B_POST - BODY_B_ANT)
    body_centre = np.array([
        rng.uniform(-0.04, 0.04) * fov[0],
        rng.uniform(-0.03, 0.03) * fov[1] + y_centre_std * body_factor[1] * scale,
        zc_std * body_factor[2] * scale,
    ])
    # the grid centre sits at body-frame point `body_centre`; p_body = D (idx - c) s - shift
    shift = -body_centre
    world_centre = np.array([rng.uniform(-20, 20), rng.uniform(-40, 40), rng.uniform(-700, -100)])
    c_idx = (np.array([nx, ny, nz]) - 1) / 2.0
    origin = world_centre - direction @ (c_idx * np.array(spacing))

    phase = str(rng.choice(["venous", "arterial", "native"], p=[0.7, 0.2, 0.1]))
    hu = np.zeros(len(TISSUES), np.float32)
    ranges = dict(_FIXED_HU)
    ph = _PHASE_HU[phase]
    ranges.update({k: ph[k] for k in ("liver", "spleen", "aorta", "ivc", "heart", "bowel", "pancreas")})
    for side in ("r", "l"):
        ranges[f"kidney_{side}_cortex"] = ph["kidney_cortex"]
        ranges[f"kidney_{side}_medulla"] = ph["kidney_medulla"]
    for name, (lo, hi) in ranges.items():
        hu[T[name]] = rng.uniform(lo, hi)
    hu[T["kidney_l_cortex"]] = hu[T["kidney_r_cortex"]] + rng.normal(0, 3)
    hu[T["kidney_l_medulla"]] = hu[T["kidney_r_medulla"]] + rng.normal(0, 3)

    present = {name: True for name in _ORGANS}
    if rng.random() < 0.08:            # nephrectomy
        present[str(rng.choice(["kidney_left", "kidney_right"]))] = False
    if rng.random() < 0.08:            # (partial) pancreatectomy / not visualised
        present["pancreas"] = False
    if rng.random() < 0.15:            # cholecystectomy
        present["gallbladder"] = False
    jitter = {name: np.concatenate([rng.normal(0, 5, 3), rng.uniform(0.85, 1.15, 3)]) for name in _ORGANS}

    substeps = 3 if sz >= 3.0 else 1
    return CaseParams(
        size_xyz=(nx, ny, nz), spacing_xyz=spacing, direction=direction,
        origin_xyz=tuple(float(o) for o in origin), shift=shift, scale=scale,
        body_factor=body_factor,
        fat=(rng.uniform(10, 35), rng.uniform(10, 40), rng.uniform(8, 25)),
        muscle=rng.uniform(8, 14), phase=phase, hu=hu, present=present, jitter=jitter,
        deform_mm=rng.uniform(4, 9), noise_hu=rng.uniform(8, 25), psf_sigma=rng.uniform(0.5, 0.8),
        gas_depth=rng.uniform(8, 30) if rng.random() < 0.6 else 0.0, substeps=substeps,
    )


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------

class _Grid:
    """The case's (sub-slice) voxel grid and the map from voxel indices to body-frame coordinates.

    The body is axis-aligned with the voxel grid up to the direction's axis flips (the sign
    pattern of the direction matrix), so every coordinate depends on one index only and stays a
    broadcast 1D array: no full coordinate volumes are ever built. A tilted direction therefore
    tilts the patient in world space, as a patient lying at a slight angle is. Standard body
    coordinates (adult mm) of index (i, j, k): q = (F (idx - c) s - shift) / (scale * body_factor).
    """

    def __init__(self, p: CaseParams):
        nx, ny, nz = p.size_xyz
        self.k = p.substeps
        self.shape = (nz * self.k, ny, nx)  # sub-slice grid, [Z, Y, X]
        self.s = np.array(p.spacing_xyz)
        self.c = (np.array(p.size_xyz) - 1) / 2.0
        self.flip = np.sign(np.diag(p.direction))
        kz = (np.arange(nz * self.k) + 0.5) / self.k - 0.5        # continuous slice index
        self.axes_mm = [(np.arange(nx) - self.c[0]) * self.s[0], (np.arange(ny) - self.c[1]) * self.s[1],
                        (kz - self.c[2]) * self.s[2]]
        div = p.scale * p.body_factor
        self.q = [((self.flip[r] * self.axes_mm[r] - p.shift[r]) / div[r]).astype(np.float32) for r in range(3)]
        self.shift, self.div = p.shift, div

    def coords(self, zs: slice = slice(None), ys: slice = slice(None), xs: slice = slice(None)) -> list[np.ndarray]:
        """Standard body coordinates (qx, qy, qz) over a box of the grid, as broadcast 1D arrays."""
        return [self.q[0][xs][None, None, :], self.q[1][ys][None, :, None], self.q[2][zs][:, None, None]]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Grid box (z, y, x slices) covering the standard-frame box [lo, hi], or None if outside."""
        sl = []
        for r in range(3):
            inside = np.nonzero((self.q[r] >= lo[r]) & (self.q[r] <= hi[r]))[0]
            if inside.size == 0:
                return None
            sl.append(slice(int(inside[0]), int(inside[-1]) + 1))
        return sl[2], sl[1], sl[0]


class _SmoothField:
    """Smooth unit-variance random field over a grid: separable Gaussian-RBF interpolation of
    random control values, evaluated in any box with three small matrix products (no full-size
    temporaries, no per-voxel interpolation)."""

    def __init__(self, rng: np.random.Generator, axes_mm: Sequence[np.ndarray], spacing_mm: float):
        self.weights = []
        for pos in axes_mm:  # x, y, z
            n_ctrl = int(np.ceil((pos.max() - pos.min()) / spacing_mm)) + 3
            ctrl = pos.min() - spacing_mm + spacing_mm * np.arange(n_ctrl)
            w = np.exp(-0.5 * ((pos[:, None] - ctrl[None, :]) / spacing_mm) ** 2)
            w /= np.sqrt((w ** 2).sum(1, keepdims=True))
            self.weights.append(w.astype(np.float32))
        self.coef = rng.standard_normal([w.shape[1] for w in self.weights[::-1]]).astype(np.float32)

    def __call__(self, zs: slice = slice(None), ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        wx, wy, wz = self.weights[0][xs], self.weights[1][ys], self.weights[2][zs]
        t = self.coef @ wx.T                               # (cz, cy, nx)
        t = np.matmul(wy, t)                               # (cz, ny, nx)
        return np.tensordot(wz, t, axes=(1, 0)).astype(np.float32, copy=False)  # (nz, ny, nx)


def _ellipsoid_sdf(q: Sequence[np.ndarray], centre, radii, rot: np.ndarray | None = None) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid, optionally rotated (rot: local->frame)."""
    d = [q[i] - np.float32(centre[i]) for i in range(3)]
    if rot is not None:
        d = [sum(np.float32(rot[i, r]) * d[i] for i in range(3)) for r in range(3)]
    k = np.sqrt(sum((d[i] / np.float32(radii[i])) ** 2 for i in range(3)))
    return (k - 1.0) * np.float32(min(radii))


def _tube_sdf(q: Sequence[np.ndarray], points: np.ndarray, radii: np.ndarray, reach: float = 12.0) -> np.ndarray:
    """Signed distance (mm) to a tube of varying radius along a polyline (a smooth capsule chain).

    Each segment is evaluated only where it can be the nearest surface within ``reach`` mm of
    its own bounding box (elsewhere the distance is left at a large positive value), which keeps
    long tubes (aorta, stomach) cheap. ``q`` must be full-size (already displaced) coordinates.
    """
    best = np.full(q[0].shape, 1e4, np.float32)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        pad = max(ra, rb) + reach
        lo, hi = np.minimum(a, b) - pad, np.maximum(a, b) + pad
        sel = _bbox_of(q, lo, hi)
        if sel is None:
            continue
        qs = [c[sel] for c in q]
        ab = b - a
        L2 = float(ab @ ab)
        d = [qs[i] - np.float32(a[i]) for i in range(3)]
        t = np.clip(sum(d[i] * np.float32(ab[i] / L2) for i in range(3)), 0.0, 1.0)
        dist = np.sqrt(sum((d[i] - t * np.float32(ab[i])) ** 2 for i in range(3)))
        sdf = dist - (np.float32(ra) + t * np.float32(rb - ra))
        np.minimum(best[sel], sdf, out=best[sel])
    return best


def _bbox_of(q: Sequence[np.ndarray], lo, hi) -> tuple[slice, slice, slice] | None:
    """Index box of the voxels whose (displaced) coordinates may fall in [lo, hi]."""
    mask = np.ones(q[0].shape, bool)
    for i in range(3):
        mask &= (q[i] >= lo[i]) & (q[i] <= hi[i])
    sl = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(mask.any(axis=other))[0]
        if idx.size == 0:
            return None
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation (degrees about x, then y, then z) mapping frame offsets to local axes."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _render_background(grid: _Grid, p: CaseParams, fields: dict, tissue: np.ndarray) -> None:
    """Body outline, fat, muscle wall, spine, ribs, lungs, bowel and table.

    Cross-sectional shapes are computed once as 2D maps and compared per slice with 1D profiles
    (girth along z, vertebral and rib periodicity), so the 3D work is a few comparisons a voxel.
    """
    qx, qy, qz = (a.reshape(-1) for a in grid.coords())
    X, Y = qx[None, :], qy[:, None]
    ant = Y < 0
    wob = 4.0 * fields["outline"][0]                 # (Y, X) mm
    girth = 1.0 + 0.04 * fields["girth"][:, 0, 0]    # (Z,) radius factor
    f_lat, f_ant, f_post = p.fat
    mus = p.muscle

    def rho(a: float, b_ant: float, b_post: float, grow) -> np.ndarray:
        """Shape radius: 1 on the outline; ellipse anteriorly, flatter superellipse behind."""
        xn = np.abs(X) / (a + grow)
        yn = np.abs(Y) / np.where(ant, b_ant + grow, b_post + grow)
        return np.where(ant, np.sqrt(xn * xn + yn * yn), np.cbrt(xn ** 3 + yn ** 3)).astype(np.float32)

    rho_body = rho(BODY_A, BODY_B_ANT, BODY_B_POST, wob)
    rho_wall = rho(BODY_A - f_lat, BODY_B_ANT - f_ant, BODY_B_POST - f_post, wob * 0.5)
    rho_cav = rho(BODY_A - f_lat - mus, BODY_B_ANT - f_ant - mus, BODY_B_POST - f_post - mus, 0.0)
    # restrict the 3D work to the body's bounding box (plus the table)
    rows = np.nonzero((rho_body <= girth.max()).any(1))[0]
    cols = np.nonzero((rho_body <= girth.max()).any(0))[0]
    if rows.size == 0 or cols.size == 0:
        return
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    tab = (Y > BODY_B_POST + 18.0) & (Y < BODY_B_POST + 30.0) & (np.abs(X) < 1.25 * BODY_A)
    tissue[:, tab] = T["table"]
    rho_body, rho_wall, rho_cav = rho_body[ys, xs], rho_wall[ys, xs], rho_cav[ys, xs]
    X, Y, ant = X[:, xs], Y[ys], ant[ys]

    peritoneal = Y < 22.0 + 0.15 * np.abs(X)       # behind it: retroperitoneal fat
    dome = 95.0 + 30.0 * np.exp(-((np.abs(X) - 65.0) / 45.0) ** 2) - 0.3 * Y
    heart = ((X - 10.0) / 60.0) ** 2 + ((Y + 15.0) / 55.0) ** 2
    vb = (X / 22.0) ** 2 + ((Y - 42.0) / 17.0) ** 2
    r_canal = np.sqrt(X * X + (Y - 68.0) ** 2)
    arch = (r_canal < 17.0) & (r_canal >= 10.0) & (Y > 60.0)
    spinous = (np.abs(X) < 4.5) & (Y > 76.0) & (Y < 96.0)
    transverse = (np.abs(Y - 60.0) < 5.0) & (np.abs(X) > 15.0) & (np.abs(X) < 42.0)
    ang = np.arctan2(np.abs(X), Y)                  # 0 posterior .. pi anterior
    rib_drop = 90.0 * (ang / np.pi) ** 1.3          # ribs descend towards the front
    psoas_d2 = [(X - sx * 30.0) ** 2 + (Y - 40.0) ** 2 for sx in (-1.0, 1.0)]
    paraspinal = ((np.abs(X) - 36.0) / 28.0) ** 2 + ((Y - 76.0) / 20.0) ** 2 < 1.0
    quadratus = ((np.abs(X) - 58.0) / 20.0) ** 2 + ((Y - 72.0) / 9.0) ** 2 < 1.0

    nzs = grid.shape[0]
    chunk = max(1, int(4e6 // max(rho_body.size, 1)))
    for z0 in range(0, nzs, chunk):
        zs = slice(z0, min(z0 + chunk, nzs))
        z = qz[zs][:, None, None]
        g = girth[zs][:, None, None]
        body = rho_body <= g
        wall = rho_wall <= g
        cav = rho_cav <= g
        t = np.where(body, np.uint8(T["fat"]), tissue[zs, ys, xs])
        t[wall] = T["muscle"]
        bowel = fields["bowel"](zs, ys, xs)
        cav_t = np.where((bowel > 0.25) & peritoneal, np.uint8(T["bowel"]), np.uint8(T["cavity_fat"]))
        cav_t[(bowel > 1.6) & peritoneal & (z < 60.0)] = T["gas"]
        above = z > dome
        cav_t[above] = T["lung"]
        cav_t[above & (heart + ((z - 180.0) / 75.0) ** 2 < 1.0)] = T["heart"]
        t[cav] = cav_t[cav]
        r_psoas = np.clip(5.0 - 0.12 * z, 0.0, 20.0) ** 2
        for d2 in psoas_d2:
            t[(d2 < r_psoas) & wall] = T["muscle"]
        t[paraspinal & wall] = T["muscle"]
        t[quadratus & (z < 25.0) & wall] = T["muscle"]
        # vertebral column: bodies with cortical rim and discs, canal, arch, processes
        phase = np.mod(z + 7.0, 34.0)
        disc = phase < 8.0
        t[(vb < 1.0) & ~disc] = T["bone"]
        t[(vb < 1.0) & disc] = T["disc"]
        t[(vb >= 0.72) & (vb < 1.0) & ~disc] = T["cortical_bone"]
        t[np.broadcast_to(arch | spinous, t.shape)] = T["cortical_bone"]
        t[np.broadcast_to(r_canal < 10.0, t.shape)] = T["csf"]
        t[transverse & (phase > 12.0) & (phase < 24.0)] = T["cortical_bone"]
        # ribs: sloping bands in the muscle ring; cartilage in front; none low and posterior
        ring = wall & ~cav & (z < 140.0)
        rib = ring & (np.mod(z + rib_drop, 32.0) < 11.0) & (ang > 0.35) & (z > -75.0 + 40.0 * (1.0 - ang / np.pi))
        t[rib & (ang < 2.35)] = T["cortical_bone"]
        t[rib & (ang >= 2.35) & (ang < 2.75)] = T["cartilage"]
        tissue[zs, ys, xs] = t


def _paint(grid: _Grid, tissue: np.ndarray, lo, hi, sdf_fn: Callable, fields: dict, p: CaseParams,
           name: str, amp: float) -> tuple | None:
    """Evaluate an organ's deformed SDF in its box; return (box, sdf, coords, allowed) or None."""
    margin = p.deform_mm * 3 + amp * 3 + 2
    box = grid.box(np.asarray(lo) - margin, np.asarray(hi) + margin)
    if box is None:
        return None
    q = list(np.broadcast_arrays(*grid.coords(*box)))
    for i, key in enumerate(("dx", "dy")):  # in-plane displacement; shape noise varies z too
        q[i] = q[i] + np.float32(p.deform_mm) * fields[key](*box)
    q[2] = np.ascontiguousarray(np.broadcast_to(q[2], q[0].shape))
    sdf = sdf_fn(q) + np.float32(amp) * fields[f"shape_{name}"](*box)
    allowed = _HOLDS_ORGAN[tissue[box]]
    return box, sdf, q, allowed


def _organs(grid: _Grid, p: CaseParams, fields: dict, tissue: np.ndarray) -> None:
    """Paint the organs in an order where the anatomically overlying one wins."""
    def jit(name: str, centre, radii):
        j = p.jitter[name]
        return np.asarray(centre, float) + j[:3], np.asarray(radii, float) * j[3:]

    def put(res, mask_tissue: list[tuple[np.ndarray, int]]):
        box, _, _, allowed = res
        view = tissue[box]
        for mask, value in mask_tissue:
            view[mask & allowed] = value

    # stomach: J-shaped tube from fundus to pylorus, wall, fluid and an anterior gas cap
    j = p.jitter["stomach"]
    pts = np.array([[62, 22, 100], [68, -20, 70], [50, -50, 35], [15, -62, 18], [-15, -52, 14]], float)
    pts = pts * j[3:] + j[:3]
    rad = np.array([30, 32, 26, 17, 10], float) * float(np.mean(j[3:]))
    res = _paint(grid, tissue, pts.min(0) - rad.max(), pts.max(0) + rad.max(),
                 lambda q: _tube_sdf(q, pts, rad), fields, p, "stomach", 3.0)
    if res is not None:
        box, sdf, q, _ = res
        inside = sdf < 0
        lumen = sdf < -4.0
        gas = lumen & (q[1] < float((pts[:, 1] - rad).min()) + 6.0 + p.gas_depth) if p.gas_depth else np.zeros_like(lumen)
        put(res, [(inside, T["stomach_wall"]), (lumen, T["stomach_fluid"]), (gas, T["stomach_gas"])])

    # spleen: left, posterior, superior; long axis along the ribs
    c, r = jit("spleen", (88, 50, 62), (22, 50, 46))
    R = _rot(az=35.0).T
    res = _paint(grid, tissue, c - r.max(), c + r.max(), lambda q: _ellipsoid_sdf(q, c, r, R), fields, p, "spleen", 4.0)
    if res is not None:
        put(res, [(res[1] < 0, T["spleen"])])

    # liver: right lobe plus a left lobe reaching across the midline, anterior-superior
    j = p.jitter["liver"]
    c1, r1 = np.array([-60, 0, 50]) * 1.0 + j[:3], np.array([64, 72, 78]) * j[3:]
    c2, r2 = np.array([8, -50, 62]) * 1.0 + j[:3], np.array([50, 24, 40]) * j[3:]
    lo = np.minimum(c1 - r1, c2 - r2)
    hi = np.maximum(c1 + r1, c2 + r2)
    res = _paint(grid, tissue, lo, hi, lambda q: _smooth_min(_ellipsoid_sdf(q, c1, r1), _ellipsoid_sdf(q, c2, r2), 18.0),
                 fields, p, "liver", 7.0)
    if res is not None:
        put(res, [(res[1] < 0, T["liver"])])

    # gallbladder (unlabelled) in the liver's inferior surface
    if p.present["gallbladder"]:
        c, r = jit("gallbladder", (-42, -48, 18), (14, 14, 32))
        R = _rot(ax=25.0).T
        res = _paint(grid, tissue, c - r.max(), c + r.max(), lambda q: _ellipsoid_sdf(q, c, r, R), fields, p, "gallbladder", 2.0)
        if res is not None:
            put(res, [(res[1] < 0, T["gallbladder"])])

    # IVC (unlabelled), right of the aorta, through the liver's bare area
    res = _paint(grid, tissue, (-40, 4, -130), (-5, 32, 100),
                 lambda q: _tube_sdf(q, np.array([[-22, 18, -130], [-22, 16, 30], [-24, 20, 100]], float),
                                     np.array([12, 13, 14], float)), fields, p, "ivc", 1.5)
    if res is not None:
        put(res, [(res[1] < 0, T["ivc"])])

    # pancreas: head by the duodenum, neck and body across the midline in front of the aorta,
    # tail towards the splenic hilum
    if p.present["pancreas"]:
        j = p.jitter["pancreas"]
        pts = np.array([[-26, 0, -44], [-32, -8, -26], [-5, -18, -12], [25, -16, -5], [58, 8, 4], [80, 28, 12]], float)
        pts = pts * np.array([j[3], 1.0, 1.0]) + j[:3] * 0.6
        rad = np.array([9, 15, 10, 9, 8, 7], float) * float(np.mean(j[3:]))
        res = _paint(grid, tissue, pts.min(0) - rad.max(), pts.max(0) + rad.max(),
                     lambda q: _tube_sdf(q, pts, rad), fields, p, "pancreas", 2.5)
        if res is not None:
            put(res, [(res[1] < 0, T["pancreas"])])

    # kidneys: paravertebral, right lower than left, hilum facing antero-medially
    for side, sign, cz in (("kidney_left", 1.0, -8.0), ("kidney_right", -1.0, -24.0)):
        if not p.present[side]:
            continue
        c, r = jit(side, (sign * 74.0, 44.0, cz), (25, 24, 54))
        R = _rot(ax=-12.0, ay=sign * 12.0, az=-sign * 25.0).T
        s_c = np.array([sign * -16.0, -6.0, 0.0]) + c
        key = "l" if sign > 0 else "r"
        res = _paint(grid, tissue, c - r.max() - 10, c + r.max() + 10, lambda q: _ellipsoid_sdf(q, c, r, R),
                     fields, p, side, 2.5)
        if res is None:
            continue
        box, sdf, q, allowed = res
        sinus = _ellipsoid_sdf(q, s_c, (11.0, 9.0, 26.0), R) < 0
        view = tissue[box]
        view[(sdf < 9.0) & _CAVITY[view]] = T["cavity_fat"]          # perirenal fat
        view[(sdf < 0) & allowed & ~sinus] = T[f"kidney_{key}_cortex"]
        view[(sdf < -5.0) & allowed & ~sinus] = T[f"kidney_{key}_medulla"]
        view[(sdf < 0) & allowed & sinus] = T["sinus"]

    # aorta: anterior-left of the vertebral body, from the hiatus down to the bifurcation
    j = p.jitter["aorta"]
    pts = np.array([[10, 4, 160], [12, 6, 60], [13, 8, -40], [12, 6, -115]], float) + j[:3] * np.array([0.4, 0.4, 1.0])
    rad = np.array([12, 11.5, 10.5, 9], float) * float(np.mean(j[3:]) ** 0.5)
    res = _paint(grid, tissue, pts.min(0) - 14, pts.max(0) + 14, lambda q: _tube_sdf(q, pts, rad), fields, p, "aorta", 1.0)
    if res is not None:
        put(res, [(res[1] < 0, T["aorta"])])


def render_case(p: CaseParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one case: int16 HU image and uint8 label, both [Z, Y, X]."""
    grid = _Grid(p)
    ax = grid.axes_mm
    cell = 40.0 * p.scale      # deformation control spacing: 4 cm of adult anatomy
    one = [np.zeros(1)]
    fields = {
        "outline": _SmoothField(rng, ax[:2] + one, 60.0 * p.scale)(),
        "girth": _SmoothField(rng, one + one + ax[2:], 80.0 * p.scale)(),
        "bowel": _SmoothField(rng, ax, 18.0 * p.scale),
        "dx": _SmoothField(rng, ax, cell), "dy": _SmoothField(rng, ax, cell),
    }
    for name in ("stomach", "spleen", "liver", "gallbladder", "ivc", "pancreas", "kidney_left", "kidney_right", "aorta"):
        fields[f"shape_{name}"] = _SmoothField(rng, ax, 30.0 * p.scale)
    tissue = np.zeros(grid.shape, np.uint8)
    _render_background(grid, p, fields, tissue)
    _organs(grid, p, fields, tissue)

    k = grid.k
    nz = p.size_xyz[2]
    label = TISSUE_LABEL[tissue[k // 2::k]]
    # partial volume: average the HU of the sub-slices of each slice
    hu_lut = p.hu
    image = hu_lut[tissue[0::k]]
    for j in range(1, k):
        image += hu_lut[tissue[j::k]]
    if k > 1:
        image *= np.float32(1.0 / k)
    del tissue

    out_axes = [ax[0], ax[1], (np.arange(nz) - grid.c[2]) * grid.s[2]]
    body = image > -500
    texture = _SmoothField(rng, out_axes, 15.0 * p.scale)()
    image += np.where(body, np.float32(5.0) * texture, np.float32(0.0))
    mult = _SmoothField(rng, out_axes, 150.0 * p.scale)()
    add = _SmoothField(rng, out_axes, 120.0 * p.scale)()
    image += 1000.0
    image *= 1.0 + np.float32(0.025) * mult
    image -= 1000.0
    image += np.where(body, np.float32(12.0) * add, np.float32(0.0))
    # correlated noise and the in-plane point spread function: blur after adding white noise,
    # scaled so the noise std after the blur is noise_hu
    kern = ndimage.gaussian_filter1d(np.eye(1, 31, 15, dtype=np.float64)[0], p.psf_sigma)
    per_axis = float(np.sqrt((kern ** 2).sum()))  # std factor of the blur along one axis
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += noise * np.float32(p.noise_hu / per_axis ** 2)
    del noise
    image = ndimage.gaussian_filter(image, sigma=(0, p.psf_sigma, p.psf_sigma), mode="nearest")
    np.clip(image, -1024, 3071, out=image)
    return np.rint(image).astype(np.int16), label


def make_images(p: CaseParams, image: np.ndarray, label: np.ndarray):
    """Wrap arrays as SimpleITK images sharing the case geometry exactly."""
    import SimpleITK as sitk

    out = []
    for arr in (image, label):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(p.spacing_xyz)
        im.SetOrigin(p.origin_xyz)
        im.SetDirection(tuple(float(v) for v in p.direction.flatten()))
        out.append(im)
    return out


def generate_case(seed: int, index: int, size_xyz: Sequence[int]) -> tuple[CaseParams, np.ndarray, np.ndarray]:
    """Parameters, image and label of case ``index`` of the dataset with ``seed``."""
    rng = np.random.default_rng([int(seed), int(index)])
    params = sample_case_params(rng, size_xyz)
    image, label = render_case(params, rng)
    return params, image, label


def case_id(index: int) -> str:
    return f"phantom_{index:03d}"


def _write_case(args: tuple) -> dict:
    import SimpleITK as sitk

    root, seed, index, size = args
    params, image, label = generate_case(seed, index, size)
    img, lab = make_images(params, image, label)
    cid = case_id(index)
    sitk.WriteImage(img, str(Path(root) / "imagesTr" / f"{cid}_0000.nii.gz"), useCompression=True)
    sitk.WriteImage(lab, str(Path(root) / "labelsTr" / f"{cid}.nii.gz"), useCompression=True)
    return {
        "case": cid, "spacing_xyz": list(params.spacing_xyz), "phase": params.phase,
        "scale": round(params.scale, 4), "absent": [k for k, v in params.present.items() if not v and k in LABELS],
    }


def generate_phantom(
    out: str | os.PathLike, cases: int = 24, seed: int = 0, size_xyz: Sequence[int] = (160, 160, 40),
    workers: int = 1, progress: bool = True, force: bool = False,
) -> Path:
    """Write a phantom CT dataset (nnU-Net raw layout, with manifest.json) to ``out``.

    The directory is built beside ``out`` and renamed into place, so ``out`` is either the
    complete new dataset or untouched. An existing ``out`` is replaced only if it is empty or a
    dataset an earlier `masksam data` run wrote (``force``: any folder).
    """
    from masksam.components.data.manifest import write_manifest

    out = Path(out)
    if cases < 1:
        raise UserError(f"--cases must be >= 1, got {cases}")
    size_xyz = tuple(int(s) for s in size_xyz)
    if len(size_xyz) != 3 or min(size_xyz[:2]) < 16 or size_xyz[2] < 4:
        raise UserError(f"--size must be three voxel counts X Y Z, at least 16 16 4; got {size_xyz}")
    with stop_on_signals("data phantom"), owned_output_dir(out, "data", force=force, what="--out") as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        jobs = [(str(tmp), seed, i, size_xyz) for i in range(cases)]
        bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
        if workers > 1:
            with spawn_pool(workers) as pool:
                info = []
                try:
                    for r in pool.map(_write_case, jobs):
                        info.append(r)
                        bar.update()
                except BaseException:
                    kill_workers(pool)  # before the temporary folder they write into is removed
                    raise
        else:
            info = []
            for job in jobs:
                info.append(_write_case(job))
                bar.update()
        bar.close()
        write_json(tmp / "dataset.json", {
            "name": "Phantom abdominal CT",
            "description": "Generated abdominal CT-like volumes (HU) with organ labels: the MaskSAM "
                           "pipeline's embedded demo dataset. Not real patients.",
            "source": f"masksam data phantom (generator v{GENERATOR_VERSION}), seed {seed}, "
                      f"size_xyz {list(size_xyz)}",
            "reference": "masksam.components.data.phantom",
            "licence": "CC0-1.0",
            "channel_names": {"0": "CT"},
            "labels": dict(LABELS),
            "numTraining": cases,
            "file_ending": ".nii.gz",
            "phantom_cases": info,
        })
        write_manifest(tmp, progress=False)
    log.info("phantom: %d cases written to %s", cases, out)
    return out

