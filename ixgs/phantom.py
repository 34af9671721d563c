"""Seeded procedural anatomy (HU) on an LPS grid, for simulated scans and tests.

Shapes are approximate signed distance functions (mm) combined with smooth minima, painted
with a one-voxel soft edge (partial volume) and only inside each part's bounding box, so a full
phantom at 1 mm takes about a second. Bones get a cortical shell (offset of the distance field)
around a textured marrow. Sizes and positions vary by a few percent with the seed.

Axes (LPS): x towards the patient's left, y posterior, z superior.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import gaussian

from .geometry import Grid, Roi
from .volume import Volume

MU_WATER_PER_MM = 0.0206  # linear attenuation of water at ~60 keV (1/mm)
AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
MUSCLE_HU = 55.0
DISC_HU = 80.0

PHANTOMS = ("spine", "knee")


def hu_to_attenuation(hu):
    """Linear attenuation (1/mm) at ~60 keV: ``mu_water * (1 + HU/1000)``, never negative.

    Accepts numbers, numpy arrays and torch tensors.
    """
    mu = MU_WATER_PER_MM * (1.0 + hu / 1000.0)
    return mu.clamp(min=0.0) if hasattr(mu, "clamp") else np.maximum(mu, 0.0)


def attenuation_to_hu(attenuation):
    """Inverse of :func:`hu_to_attenuation` (without the clamp): HU from 1/mm."""
    return 1000.0 * (attenuation / MU_WATER_PER_MM - 1.0)


def default_roi(phantom_name: str) -> Roi:
    """The box of interest of a phantom (LPS mm): the vertebrae, or the knee joint."""
    if phantom_name == "spine":
        # Vertebral bodies span y -17..17 mm, spinous processes reach y ~ 70 mm.
        return Roi((0.0, 20.0, 0.0), (110.0, 110.0, 110.0))
    if phantom_name == "knee":
        return Roi((0.0, 0.0, 0.0), (110.0, 110.0, 110.0))
    raise ValueError(f"phantom_name must be one of {PHANTOMS}, got {phantom_name!r}")


# --- signed distance functions (mm, negative inside); points are broadcastable (x, y, z) ---

def _ellipsoid(p, center, radii):
    """Approximate distance to an ellipsoid (exact on the axes, good near the surface)."""
    q = [(p[a] - center[a]) / radii[a] for a in range(3)]
    k0 = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    k1 = np.sqrt((q[0] / radii[0]) ** 2 + (q[1] / radii[1]) ** 2 + (q[2] / radii[2]) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def _ellipse(x, y, center, radii):
    """Approximate 2D distance to an ellipse in the x-y plane; radii may vary with z (arrays)."""
    qx, qy = (x - center[0]) / radii[0], (y - center[1]) / radii[1]
    k0 = np.sqrt(qx ** 2 + qy ** 2)
    k1 = np.sqrt((qx / radii[0]) ** 2 + (qy / radii[1]) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def _elliptic_cylinder(p, center, radii_xy, half_height):
    """Ellipse cross-section extruded along z over ``center[2] +- half_height``."""
    d_xy = _ellipse(p[0], p[1], center, radii_xy)
    d_z = np.abs(p[2] - center[2]) - half_height
    outside = np.sqrt(np.maximum(d_xy, 0.0) ** 2 + np.maximum(d_z, 0.0) ** 2)
    return outside + np.minimum(np.maximum(d_xy, d_z), 0.0)


def _capsule(p, a, b, radius_a, radius_b=None):
    """Segment a-b with a radius tapering linearly from ``radius_a`` to ``radius_b``."""
    radius_b = radius_a if radius_b is None else radius_b
    ba = [float(b[i] - a[i]) for i in range(3)]  # Python floats keep float32 coordinates float32
    pa = [p[i] - float(a[i]) for i in range(3)]
    h = np.clip((pa[0] * ba[0] + pa[1] * ba[1] + pa[2] * ba[2]) / sum(c * c for c in ba), 0.0, 1.0)
    distance = np.sqrt((pa[0] - ba[0] * h) ** 2 + (pa[1] - ba[1] * h) ** 2 + (pa[2] - ba[2] * h) ** 2)
    return distance - (float(radius_a) + float(radius_b - radius_a) * h)


def _smooth_union(*distances, k: float):
    """Polynomial smooth minimum: unions with fillets of about ``k`` mm."""
    result = distances[0]
    for d in distances[1:]:
        h = np.maximum(k - np.abs(result - d), 0.0) / k
        result = np.minimum(result, d) - h * h * k * 0.25
    return result


def _subtract(d, cut):
    return np.maximum(d, -cut)


@dataclass
class _Canvas:
    """An HU array with voxel-centre coordinates, painted part by part inside bounding boxes."""

    hu: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    grid: Grid
    rng: np.random.Generator

    @property
    def voxel_mm(self) -> float:
        return float(min(self.grid.spacing))

    @classmethod
    def empty(cls, box: Roi, voxel_size_mm: float, rng: np.random.Generator) -> "_Canvas":
        if voxel_size_mm <= 0:
            raise ValueError(f"voxel_size_mm must be positive, got {voxel_size_mm}")
        counts = np.maximum(1, np.round(np.asarray(box.size) / voxel_size_mm)).astype(int)
        origin = np.asarray(box.center) - 0.5 * (counts - 1) * voxel_size_mm
        grid = Grid(tuple(int(n) for n in counts[::-1]), tuple(float(o) for o in origin), (float(voxel_size_mm),) * 3)
        axes = [(grid.origin[a] + grid.spacing[a] * np.arange(n)).astype(np.float32)
                for a, n in enumerate(grid.shape[::-1])]
        hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
        return cls(hu, *axes, grid=grid, rng=rng)

    def window(self, lower, upper):
        """Array slices (z, y, x) and broadcastable coordinates of the voxels inside a box (mm)."""
        ranges = []
        for coords, lo, hi in zip((self.x, self.y, self.z), lower, upper):
            start = int(np.searchsorted(coords, lo - self.voxel_mm))
            stop = int(np.searchsorted(coords, hi + self.voxel_mm, side="right"))
            ranges.append(slice(start, stop))
        slices = (ranges[2], ranges[1], ranges[0])
        points = (self.x[ranges[0]][None, None, :], self.y[ranges[1]][None, :, None], self.z[ranges[2]][:, None, None])
        return slices, points

    def occupancy(self, distance):
        """Fraction of each voxel inside the shape (one-voxel linear edge)."""
        return np.clip(0.5 - distance / self.voxel_mm, 0.0, 1.0)

    def paint(self, slices, distance, value) -> None:
        region = self.hu[slices]
        occupancy = self.occupancy(distance)
        region += (occupancy * (value - region)).astype(np.float32)

    def texture(self, shape, amplitude_hu: float, sigma_mm: float = 1.5) -> np.ndarray:
        """Seeded smooth noise (zero mean, ``amplitude_hu`` standard deviation), like trabeculae."""
        noise = gaussian(self.rng.standard_normal(shape), sigma=sigma_mm / self.voxel_mm, preserve_range=True)
        return amplitude_hu * noise / max(float(noise.std()), 1e-9)

    def paint_bone(self, slices, distance, cortex_hu, marrow_hu, cortex_mm) -> None:
        """Cortical shell of ``cortex_mm`` (scalar or array) around a textured marrow."""
        region = self.hu[slices]
        outer = self.occupancy(distance)
        inner = self.occupancy(distance + cortex_mm)
        marrow = marrow_hu + self.texture(region.shape, 40.0)
        region[...] = region * (1 - outer) + cortex_hu * (outer - inner) + marrow * inner


def _jitter(rng: np.random.Generator, scale: float = 0.03) -> float:
    return float(rng.uniform(1.0 - scale, 1.0 + scale))


def _paint_ellipsoid(canvas: _Canvas, center, radii, value) -> None:
    center, radii = np.asarray(center, float), np.asarray(radii, float)
    slices, p = canvas.window(center - radii, center + radii)
    canvas.paint(slices, _ellipsoid(p, center, radii), value)


def _paint_torso(canvas: _Canvas, s: np.ndarray) -> None:
    """Cross-section of a lumbar torso (same for every z): fat, muscles, vessels, bowel gas."""
    rng = canvas.rng
    # Paint the first slice only, then copy it along z.
    slices, p = canvas.window((canvas.x[0], canvas.y[0], canvas.z[0]), (canvas.x[-1], canvas.y[-1], canvas.z[0]))
    slices, p = (slice(0, 1),) + slices[1:], (p[0], p[1], p[2][:1])
    center = (0.0, -30.0 * s[1])
    canvas.paint(slices, _ellipse(p[0], p[1], center, (160 * s[0], 120 * s[1])), FAT_HU)
    canvas.paint(slices, _ellipse(p[0], p[1], (0.0, -32.0 * s[1]), (140 * s[0], 102 * s[1])), SOFT_TISSUE_HU)
    for side in (-1, 1):
        canvas.paint(slices, _ellipse(p[0], p[1], (side * 27 * s[0], 50 * s[1]), (22 * s[0], 24 * s[1])), MUSCLE_HU)
        canvas.paint(slices, _ellipse(p[0], p[1], (side * 42 * s[0], -4 * s[1]), (14 * s[0], 17 * s[1])), MUSCLE_HU)
    canvas.paint(slices, _ellipse(p[0], p[1], (14.0, -30 * s[1]), (10.0, 10.0)), 45.0)   # aorta
    canvas.paint(slices, _ellipse(p[0], p[1], (-20.0, -28 * s[1]), (11.0, 9.0)), 40.0)   # vena cava
    canvas.hu[1:] = canvas.hu[:1]
    for _ in range(10):  # bowel gas and mesenteric fat, anterior to the spine
        center3 = (rng.uniform(-100, 100), rng.uniform(-130, -60) * s[1], rng.uniform(-60, 60))
        radii = rng.uniform(6, 18, size=3)
        _paint_ellipsoid(canvas, center3, radii, AIR_HU if rng.random() < 0.5 else -80.0)


def _vertebra_distance(p, yc, zc, s):
    """Distance field of one lumbar vertebra whose body is centred at (0, yc, zc)."""
    half_height = 13.0 * s
    waist = 1.0 - 0.06 * (1.0 - np.clip((p[2] - zc) / half_height, -1, 1) ** 2)
    body = _elliptic_cylinder(p, (0.0, yc, zc), (24.0 * s * waist, 17.0 * s * waist), half_height)
    body = _subtract(body, _ellipse(p[0], p[1], (0.0, yc + 21.0 * s), (9.0 * s, 6.0 * s)))
    parts = [body]
    for side in (-1.0, 1.0):
        parts += [
            _capsule(p, (side * 13 * s, yc + 12 * s, zc + 3 * s), (side * 17 * s, yc + 30 * s, zc + 3 * s), 5.0 * s),
            _capsule(p, (side * 17 * s, yc + 30 * s, zc + 6 * s), (side * 2 * s, yc + 42 * s, zc + 1 * s), 4.0 * s),
            _capsule(p, (side * 17 * s, yc + 30 * s, zc - 4 * s), (side * 2 * s, yc + 42 * s, zc - 9 * s), 4.0 * s),
            _capsule(p, (side * 18 * s, yc + 28 * s, zc + 2 * s), (side * 45 * s, yc + 33 * s, zc + 4 * s), 4.5 * s, 3.0 * s),
            _capsule(p, (side * 19 * s, yc + 33 * s, zc + 4 * s), (side * 20 * s, yc + 36 * s, zc + 16 * s), 4.5 * s),
            _capsule(p, (side * 14 * s, yc + 36 * s, zc - 6 * s), (side * 15 * s, yc + 38 * s, zc - 18 * s), 4.0 * s),
        ]
    parts.append(_ellipsoid(p, (0.0, yc + 56 * s, zc - 5 * s), (3.5 * s, 16 * s, 10 * s)))
    return _smooth_union(*parts, k=3.0)


def spine_phantom(seed: int = 0, voxel_size_mm: float = 1.0) -> Volume:
    """Lumbar spine in a 320 x 240 x 160 mm torso (HU, LPS); middle vertebral body at the origin.

    Three full vertebrae (plus the edges of their neighbours) with discs, in a torso much wider
    than the spine so that X-ray views centred on the spine are truncated.
    """
    rng = np.random.default_rng(seed)
    canvas = _Canvas.empty(Roi((0.0, -30.0, 0.0), (330.0, 250.0, 160.0)), voxel_size_mm, rng)
    torso_scale = np.array([_jitter(rng), _jitter(rng)])
    _paint_torso(canvas, torso_scale)
    pitch = 37.0 * _jitter(rng)
    levels = []
    for level in range(-2, 3):  # three whole vertebrae and the ends of two more
        y_lordosis = 0.0 if level == 0 else 1.5 * level * level + rng.uniform(-1, 1)
        levels.append((y_lordosis, level * pitch, _jitter(rng), rng.uniform(1200, 1500), rng.uniform(200, 300)))
    for (y0, z0, s0, *_), (y1, z1, s1, *_) in zip(levels[:-1], levels[1:]):
        center = (0.0, 0.5 * (y0 + y1), 0.5 * (z0 + z1))
        half_height = 0.5 * (z1 - z0) - 12.0 * min(s0, s1)
        radii = (25.0 * s0, 18.0 * s0)
        slices, p = canvas.window((-radii[0], center[1] - radii[1], center[2] - half_height),
                                  (radii[0], center[1] + radii[1], center[2] + half_height))
        canvas.paint(slices, _elliptic_cylinder(p, center, radii, half_height), DISC_HU)
    for yc, zc, s, cortex_hu, marrow_hu in levels:
        slices, p = canvas.window((-50 * s, yc - 20 * s, zc - 22 * s), (50 * s, yc + 74 * s, zc + 22 * s))
        if canvas.hu[slices].size:
            canvas.paint_bone(slices, _vertebra_distance(p, yc, zc, s), cortex_hu, marrow_hu, 1.5)
    return _to_volume(canvas)


def _bone_profile(z, z_start: float, z_end: float, epiphysis: float, shaft: float):
    """A value going from its epiphysis value to its shaft value between two heights (mm)."""
    t = np.clip((z - z_start) / (z_end - z_start), 0.0, 1.0)
    return epiphysis + (shaft - epiphysis) * t


def knee_phantom(seed: int = 0, voxel_size_mm: float = 1.0) -> Volume:
    """A right knee (HU, LPS) with the joint space at the origin; leg about 125 x 120 mm across.

    Distal femur with condyles, proximal tibia with its plateau, patella and fibular head, each
    with a cortex (thicker along the shafts) around fatty-to-trabecular marrow.
    """
    rng = np.random.default_rng(seed)
    canvas = _Canvas.empty(Roi((0.0, 0.0, 0.0), (160.0, 150.0, 180.0)), voxel_size_mm, rng)
    s = np.array([_jitter(rng) for _ in range(6)])
    slices, p = canvas.window((canvas.x[0], canvas.y[0], canvas.z[0]), (canvas.x[-1], canvas.y[-1], canvas.z[-1]))
    leg = 1.0 + 0.12 * np.clip(p[2] / 90.0, 0.0, 1.0)  # the thigh is wider than the calf
    canvas.paint(slices, _ellipse(p[0], p[1], (0.0, 2.0), (63 * s[0] * leg, 60 * s[1] * leg)), FAT_HU)
    canvas.paint(slices, _ellipse(p[0], p[1], (0.0, 3.0), (55 * s[0] * leg, 51 * s[1] * leg)), MUSCLE_HU)
    _paint_ellipsoid(canvas, (0.0, 38.0, 8.0), (20.0, 14.0, 35.0), FAT_HU)          # popliteal fossa
    _paint_ellipsoid(canvas, (0.0, -32.0, -6.0), (17.0, 9.0, 12.0), FAT_HU)         # Hoffa's fat pad
    slices, p = canvas.window((-8, -52, -40), (8, -28, 12))
    canvas.paint(slices, _capsule(p, (0, -47, 6), (0, -33, -35), 4.5), 90.0)      # patellar tendon

    slices, p = canvas.window((-45, -30, -2), (45, 35, 95))
    femur = _smooth_union(
        _capsule(p, (0.0, 3.0, 120.0), (0.0, 3.0, 40.0), 14.0 * s[2]),
        _ellipsoid(p, (0.0, 4.0, 30.0), (31.0 * s[2], 21.0 * s[3], 22.0)),
        _ellipsoid(p, (20.0 * s[2], 5.0, 19.0), (15.0 * s[2], 27.0 * s[3], 16.0)),
        _ellipsoid(p, (-20.0 * s[2], 5.0, 19.0), (16.0 * s[2], 26.0 * s[3], 16.0)),
        k=8.0,
    )
    femur = _subtract(femur, _ellipsoid(p, (0.0, 18.0, 6.0), (7.0, 16.0, 12.0)))  # intercondylar notch
    canvas.paint_bone(slices, femur, rng.uniform(1300, 1550), _bone_profile(p[2], 35, 65, 250, 60),
                      _bone_profile(p[2], 35, 65, 1.5, 4.0))

    slices, p = canvas.window((-42, -32, -95), (42, 32, 2))
    tibia = _smooth_union(
        _elliptic_cylinder(p, (0.0, 4.0, -12.0), (38.0 * s[4], 26.0 * s[5]), 9.0),
        _ellipsoid(p, (0.0, 4.0, -3.0), (6.0, 8.0, 4.0)),                     # intercondylar eminence
        _ellipsoid(p, (0.0, 4.0, -30.0), (30.0 * s[4], 23.0 * s[5], 25.0)),
        _ellipsoid(p, (0.0, -20.0, -36.0), (10.0, 7.0, 12.0)),                  # tibial tuberosity
        _capsule(p, (0.0, 3.0, -40.0), (0.0, 3.0, -120.0), 15.0 * s[4]),
        k=8.0,
    )
    canvas.paint_bone(slices, tibia, rng.uniform(1300, 1550), _bone_profile(-p[2], 35, 65, 250, 60),
                      _bone_profile(-p[2], 35, 65, 1.5, 4.0))

    slices, p = canvas.window((-42, 7, -95), (-19, 30, -13))
    fibula = _smooth_union(
        _ellipsoid(p, (-30.0, 18.0, -25.0), (10.0, 10.0, 11.0)),
        _capsule(p, (-31.0, 20.0, -30.0), (-33.0, 22.0, -120.0), 7.0),
        k=6.0,
    )
    canvas.paint_bone(slices, fibula, rng.uniform(1200, 1500), 200.0, 2.0)

    slices, p = canvas.window((-23, -53, 1), (23, -31, 43))
    patella = _ellipsoid(p, (0.0, -42.0, 22.0), (22.0 * s[0], 10.0, 20.0 * s[1]))
    canvas.paint_bone(slices, patella, rng.uniform(1200, 1500), 250.0, 2.0)
    return _to_volume(canvas)


def _to_volume(canvas: _Canvas) -> Volume:
    return Volume.on_grid(canvas.hu, canvas.grid)


def make_phantom(name: str, seed: int = 0, voxel_size_mm: float = 1.0) -> Volume:
    """The phantom called ``name`` ("spine" or "knee")."""
    makers = {"spine": spine_phantom, "knee": knee_phantom}
    if name not in makers:
        raise ValueError(f"phantom name must be one of {PHANTOMS}, got {name!r}")
    return makers[name](seed=seed, voxel_size_mm=voxel_size_mm)
