"""Analytic phantoms: sums of constant-density ellipsoids and finite elliptic cylinders, LPS mm.

They exist so that simulated scans carry no inverse crime: a view's pixel is the exact line
integral (sum over primitives of density x chord length, a closed form), averaged over sub-rays
spread over the pixel, not the trilinear ray marcher that SART inverts. The reference volume is
the exact mean density of each voxel (sub-voxel samples where a voxel straddles a surface).

Densities are additive (Shepp-Logan style): a cortical shell is an outer primitive at
``cortex - background`` plus an inner one at ``marrow - cortex``. Attenuation in 1/mm.
Axes (LPS): x towards the patient's left, y posterior, z superior.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .geometry import Grid, Roi, binning_matrix, project_points, view_rays
from .phantom import (DISC_HU, FAT_HU, MUSCLE_HU, PHANTOMS, SOFT_TISSUE_HU, hu_to_attenuation)
from .volume import Volume

AIR = 0.0
FAT = float(hu_to_attenuation(FAT_HU))
SOFT = float(hu_to_attenuation(SOFT_TISSUE_HU))
MUSCLE = float(hu_to_attenuation(MUSCLE_HU))
DISC = float(hu_to_attenuation(DISC_HU))
# Bone takes the voxel phantoms' HU too: cortex 1200-1550, trabecular marrow 200-300, fatty shaft marrow 60.


def _bone(hu: float) -> float:
    return float(hu_to_attenuation(hu))


def _frame(axis) -> np.ndarray:
    """A rotation (columns: local x, y, z) whose local z is ``axis``."""
    z = np.asarray(axis, float) / np.linalg.norm(axis)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


@dataclass(frozen=True)
class Primitive:
    """An ellipsoid (``kind`` "ellipsoid": semi-axes ``radii``) or a finite elliptic cylinder
    ("cylinder": ``radii[:2]`` across, half-length ``radii[2]`` along local z), centred at ``center``
    (mm) with local axes the columns of ``rotation``; ``density`` (1/mm) is added inside."""

    kind: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    density: float
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def _local(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) in the primitive's frame, scaled so the surface has radius 1 (and z=+-1)."""
        return ((points - np.asarray(self.center)) @ self.rotation) / np.asarray(self.radii)

    def chords(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entry and exit distances (mm along unit ``directions``) of rays (..., 3); empty: t0 >= t1."""
        o = self._local(origins)
        d = (directions @ self.rotation) / np.asarray(self.radii)
        if self.kind == "ellipsoid":
            return _quadratic_interval((d * d).sum(-1), (o * d).sum(-1), (o * o).sum(-1) - 1.0)
        t0, t1 = _quadratic_interval((d[..., :2] ** 2).sum(-1), (o[..., :2] * d[..., :2]).sum(-1),
                                     (o[..., :2] ** 2).sum(-1) - 1.0)
        s0, s1 = _slab_interval(o[..., 2], d[..., 2], -1.0, 1.0)
        return np.maximum(t0, s0), np.minimum(t1, s1)

    def inside(self, points: np.ndarray, margin_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(certainly inside, certainly outside) for balls of radius ``margin_mm`` around the points;
        with no margin, inside and its complement. Bound: scaled radius q changes by at most
        |dx| / min radius, so |q - 1| min radius > margin decides the ball."""
        q = self._local(points)
        r_min = float(min(self.radii[:2] if self.kind == "cylinder" else self.radii))
        if self.kind == "ellipsoid":
            radius = np.sqrt((q * q).sum(-1))
            return (1.0 - radius) * r_min > margin_mm, (radius - 1.0) * r_min > margin_mm
        radius = np.sqrt((q[..., :2] ** 2).sum(-1))
        z_margin = (1.0 - np.abs(q[..., 2])) * self.radii[2]
        inside = ((1.0 - radius) * r_min > margin_mm) & (z_margin > margin_mm)
        outside = ((radius - 1.0) * r_min > margin_mm) | (-z_margin > margin_mm)
        return inside, outside

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (lower, upper), mm."""
        scaled = self.rotation * np.asarray(self.radii)  # columns: local axes times their radius
        if self.kind == "ellipsoid":
            half = np.sqrt((scaled ** 2).sum(axis=1))
        else:
            half = np.abs(scaled[:, 2]) + np.sqrt((scaled[:, :2] ** 2).sum(axis=1))
        return np.asarray(self.center) - half, np.asarray(self.center) + half


def _quadratic_interval(a, b, c):
    """Roots of a t^2 + 2 b t + c = 0 as an interval (empty when none; all t when a = 0 and c < 0)."""
    disc = b * b - a * c
    hit = (disc > 0) & (a > 1e-300)
    root = np.sqrt(np.where(hit, disc, 0.0))
    safe_a = np.where(hit, a, 1.0)
    parallel_inside = (a <= 1e-300) & (c < 0)
    t0 = np.where(hit, (-b - root) / safe_a, np.where(parallel_inside, -np.inf, 0.0))
    t1 = np.where(hit, (-b + root) / safe_a, np.where(parallel_inside, np.inf, 0.0))
    return t0, t1


def _slab_interval(o, d, low, high):
    """The t where low <= o + t d <= high (per component arrays)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ta, tb = (low - o) / d, (high - o) / d
    parallel = d == 0
    inside = (o >= low) & (o <= high)
    t0 = np.where(parallel, np.where(inside, -np.inf, np.inf), np.minimum(ta, tb))
    t1 = np.where(parallel, np.where(inside, np.inf, -np.inf), np.maximum(ta, tb))
    return t0, t1


def box_interval(origins, directions, box: Roi) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances of rays through an axis-aligned box."""
    t0, t1 = np.full(origins.shape[:-1], -np.inf), np.full(origins.shape[:-1], np.inf)
    for axis in range(3):
        a, b = _slab_interval(origins[..., axis], directions[..., axis], box.lower[axis], box.upper[axis])
        t0, t1 = np.maximum(t0, a), np.minimum(t1, b)
    return t0, t1


def ellipsoid(center, radii, density, axis=None) -> Primitive:
    return Primitive("ellipsoid", tuple(map(float, center)), tuple(map(float, radii)), float(density),
                     np.eye(3) if axis is None else _frame(axis))


def cylinder(center, radii_xy, half_length, density, axis=None) -> Primitive:
    """Elliptic cylinder along ``axis`` (default z)."""
    return Primitive("cylinder", tuple(map(float, center)), (float(radii_xy[0]), float(radii_xy[1]), float(half_length)),
                     float(density), np.eye(3) if axis is None else _frame(axis))


def rod(a, b, radius, density) -> Primitive:
    """Circular cylinder from point ``a`` to point ``b`` (mm)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return cylinder(0.5 * (a + b), (radius, radius), 0.5 * np.linalg.norm(b - a), density, axis=b - a)


def shell(outer: Primitive, cortex_mm: float, cortex: float, marrow: float, background: float,
          open_ends: bool = False) -> list[Primitive]:
    """A bone: ``outer`` at cortex attenuation over ``background``, its inside shrunk by ``cortex_mm``
    (every radius, and both ends of a cylinder unless ``open_ends``: a shaft running into an
    epiphysis) at marrow attenuation."""
    inner_radii = tuple(r - cortex_mm for r in outer.radii)
    if open_ends:
        inner_radii = inner_radii[:2] + outer.radii[2:]
    if min(inner_radii) <= 0:
        raise ValueError(f"cortex {cortex_mm} mm is thicker than the bone {outer.radii}")
    return [Primitive(outer.kind, outer.center, outer.radii, cortex - background, outer.rotation),
            Primitive(outer.kind, outer.center, inner_radii, marrow - cortex, outer.rotation)]


@dataclass(frozen=True)
class AnalyticPhantom:
    """A sum of primitives (attenuation, 1/mm), optionally restricted to a ``crop`` box."""

    primitives: tuple[Primitive, ...]
    crop: Roi | None = None

    def cropped(self, box: Roi) -> "AnalyticPhantom":
        """The same phantom with nothing outside ``box``: an object wholly inside a field of view, or
        (box = the Gaussians' support) the views an exact model of the outside would leave."""
        return AnalyticPhantom(self.primitives, box)

    def bounds(self) -> Roi:
        """Bounding box of the attenuating object (its crop box when cropped)."""
        if self.crop is not None:
            return self.crop
        lowers, uppers = zip(*(p.bounds() for p in self.primitives))
        lower, upper = np.min(lowers, axis=0), np.max(uppers, axis=0)
        return Roi(tuple(0.5 * (lower + upper)), tuple(upper - lower))

    def _lengths(self, primitive: Primitive, origins, directions, window) -> np.ndarray:
        """Chord lengths (mm) of rays through ``primitive``, from the source on, inside the crop window."""
        t0, t1 = primitive.chords(origins, directions)
        t0 = np.maximum(t0, 0.0)  # rays start at the source
        if window is not None:
            t0, t1 = np.maximum(t0, window[0]), np.minimum(t1, window[1])
        return np.maximum(t1 - t0, 0.0)

    def line_integrals(self, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Exact line integrals along rays (origins and unit directions (..., 3), mm): each primitive's
        chord (clipped to the crop box) times its density."""
        origins, directions = np.asarray(origins, float), np.asarray(directions, float)
        window = box_interval(origins, directions, self.crop) if self.crop is not None else None
        total = np.zeros(origins.shape[:-1])
        for primitive in self.primitives:
            total += primitive.density * self._lengths(primitive, origins, directions, window)
        return total

    def project(self, projection_matrix: np.ndarray, shape: tuple[int, int], supersample: int = 3) -> np.ndarray:
        """A view (rows, cols): each pixel the mean line integral of ``supersample``^2 sub-rays spread
        evenly over it (a finite pixel). ``projection_matrix`` normalised as for
        :func:`~ixgs.geometry.view_rays`. Each primitive is traced only over the pixels its
        bounding box projects to."""
        rows, cols = shape
        n = int(supersample)
        # Sub-pixel rays: the pixel centres of an n-times finer image tile each pixel evenly.
        fine = np.linalg.inv(binning_matrix(n)) @ np.asarray(projection_matrix, float)
        rays = view_rays(fine, (rows * n, cols * n), dtype=torch.float64)
        directions = rays.directions.numpy()
        origins = np.broadcast_to(rays.source.numpy(), directions.shape)
        window = box_interval(origins, directions, self.crop) if self.crop is not None else None
        image = np.zeros((rows * n, cols * n))
        for primitive in self.primitives:
            block = _footprint(primitive, fine, image.shape)
            clipped = None if window is None else (window[0][block], window[1][block])
            image[block] += primitive.density * self._lengths(primitive, origins[block], directions[block], clipped)
        return image.reshape(rows, n, cols, n).mean(axis=(1, 3))

    def density(self, points: np.ndarray) -> np.ndarray:
        """Attenuation (1/mm) at points (..., 3)."""
        points = np.asarray(points, float)
        values = np.zeros(points.shape[:-1])
        for primitive in self.primitives:
            values += primitive.density * primitive.inside(points)[0]
        if self.crop is not None:
            values *= self.crop.contains(points)
        return values

    def reference(self, grid: Grid, subsamples: int = 4) -> Volume:
        """Mean attenuation of each voxel of ``grid``: exact where a voxel lies wholly inside or outside
        a primitive, else the mean of ``subsamples``^3 samples spread evenly over the voxel."""
        spacing = np.asarray(grid.spacing, float)
        half_diagonal = 0.5 * float(np.linalg.norm(spacing))
        n = int(subsamples)
        offsets = ((np.arange(n) + 0.5) / n - 0.5)
        sub = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3) * spacing
        volume = np.zeros(grid.shape)
        origin, shape_xyz = np.asarray(grid.origin, float), np.asarray(grid.shape[::-1])
        boxes = [p.bounds() for p in self.primitives]
        for primitive, (lower, upper) in zip(self.primitives, boxes):
            start = np.clip(np.floor((lower - half_diagonal - origin) / spacing), 0, shape_xyz).astype(int)
            stop = np.clip(np.ceil((upper + half_diagonal - origin) / spacing) + 1, 0, shape_xyz).astype(int)
            if np.any(stop <= start):
                continue
            axes = [origin[a] + spacing[a] * np.arange(start[a], stop[a]) for a in range(3)]
            z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
            centers = np.stack([x, y, z], -1)
            certainly_in, certainly_out = primitive.inside(centers, half_diagonal)
            fraction = certainly_in.astype(float)
            edge = ~(certainly_in | certainly_out)
            if edge.any():
                samples = centers[edge][:, None, :] + sub[None]
                fraction[edge] = primitive.inside(samples)[0].mean(axis=1)
            volume[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]] += primitive.density * fraction
        if self.crop is not None:
            volume *= _box_fraction(grid, self.crop)
        return Volume.on_grid(volume.astype(np.float32), grid)


def box_corners(lower, upper) -> np.ndarray:
    """The 8 corners (8, 3) of an axis-aligned box."""
    return np.array([[lower[a] if (k >> a) & 1 == 0 else upper[a] for a in range(3)] for k in range(8)])


def _footprint(primitive: Primitive, projection_matrix: np.ndarray, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Image rows and columns that can see ``primitive``: the projection of its bounding box's corners
    (the whole image when a corner is not in front of the source)."""
    uvw = project_points(projection_matrix, box_corners(*primitive.bounds()))
    if np.any(uvw[:, 2] <= 0):
        return slice(0, shape[0]), slice(0, shape[1])
    low = np.floor(uvw[:, :2].min(axis=0)).astype(int) - 1
    high = np.ceil(uvw[:, :2].max(axis=0)).astype(int) + 2
    return (slice(int(np.clip(low[1], 0, shape[0])), int(np.clip(high[1], 0, shape[0]))),
            slice(int(np.clip(low[0], 0, shape[1])), int(np.clip(high[0], 0, shape[1]))))


def _box_fraction(grid: Grid, box: Roi) -> np.ndarray:
    """Fraction of each voxel inside an axis-aligned box (exact: a product of 1D overlaps)."""
    parts = []
    for axis, n in zip(range(3), grid.shape[::-1]):
        centers = grid.origin[axis] + grid.spacing[axis] * np.arange(n)
        low, high = centers - 0.5 * grid.spacing[axis], centers + 0.5 * grid.spacing[axis]
        overlap = np.clip(np.minimum(high, box.upper[axis]) - np.maximum(low, box.lower[axis]), 0.0, None)
        parts.append(overlap / grid.spacing[axis])
    return parts[2][:, None, None] * parts[1][None, :, None] * parts[0][None, None, :]


def _jitter(rng: np.random.Generator, scale: float = 0.03) -> float:
    return float(rng.uniform(1.0 - scale, 1.0 + scale))


def _vertebra(yc: float, zc: float, s: float, cortex: float, marrow: float) -> list[Primitive]:
    """A lumbar vertebra with its body centred at (0, yc, zc): body, pedicles, laminae, transverse
    and articular processes, spinous process, each a cortical shell around marrow (in soft tissue)."""
    parts = shell(cylinder((0.0, yc, zc), (24 * s, 17 * s), 13 * s, 0.0), 1.5, cortex, marrow, SOFT)
    for side in (-1.0, 1.0):
        for a, b, radius in (
                ((side * 14 * s, yc + 15 * s, zc + 3 * s), (side * 17 * s, yc + 29 * s, zc + 3 * s), 5.0 * s),   # pedicle
                ((side * 15 * s, yc + 33 * s, zc + 2 * s), (side * 3 * s, yc + 42 * s, zc - 4 * s), 4.0 * s),    # lamina
                ((side * 22 * s, yc + 30 * s, zc + 2 * s), (side * 45 * s, yc + 33 * s, zc + 4 * s), 3.5 * s),   # transverse
                ((side * 19 * s, yc + 34 * s, zc + 8 * s), (side * 20 * s, yc + 36 * s, zc + 17 * s), 3.5 * s),  # superior facet
                ((side * 14 * s, yc + 37 * s, zc - 8 * s), (side * 15 * s, yc + 38 * s, zc - 17 * s), 3.5 * s)):  # inferior facet
            parts += shell(rod(a, b, radius, 0.0), 1.2, cortex, marrow, SOFT)
    parts += shell(ellipsoid((0.0, yc + 58 * s, zc - 5 * s), (3.5 * s, 13 * s, 9 * s), 0.0), 1.2, cortex, marrow, SOFT)
    return parts


def spine_phantom(seed: int = 0) -> AnalyticPhantom:
    """Lumbar spine in a 320 x 240 mm torso 300 mm long, like :func:`ixgs.phantom.spine_phantom`:
    five vertebrae (the outer two beyond the ROI, so views are truncated), discs, muscles, vessels
    and bowel gas; middle vertebral body at the origin."""
    rng = np.random.default_rng(seed)
    sx, sy = _jitter(rng), _jitter(rng)
    half_length = 150.0
    parts = [cylinder((0.0, -30 * sy, 0.0), (160 * sx, 120 * sy), half_length, FAT),
             cylinder((0.0, -32 * sy, 0.0), (140 * sx, 102 * sy), half_length, SOFT - FAT)]
    for side in (-1, 1):
        parts.append(cylinder((side * 30 * sx, 58 * sy, 0.0), (20 * sx, 22 * sy), half_length, MUSCLE - SOFT))  # erector
        parts.append(cylinder((side * 44 * sx, -6 * sy, 0.0), (13 * sx, 16 * sy), half_length, MUSCLE - SOFT))  # psoas
    parts.append(cylinder((14.0, -34 * sy, 0.0), (10.0, 10.0), half_length, float(hu_to_attenuation(45.0)) - SOFT))
    parts.append(cylinder((-21.0, -32 * sy, 0.0), (11.0, 9.0), half_length, 0.0))  # vena cava: soft tissue
    for _ in range(10):  # bowel gas and mesenteric fat, anterior to the spine, inside the soft tissue
        center = (rng.uniform(-90, 90), rng.uniform(-115, -65) * sy, rng.uniform(-100, 100))
        radii = rng.uniform(6, 16, size=3)
        parts.append(ellipsoid(center, radii, (AIR if rng.random() < 0.5 else FAT) - SOFT))
    pitch = 37.0 * _jitter(rng)
    levels = []
    for level in range(-2, 3):
        y_lordosis = 0.0 if level == 0 else 1.5 * level * level + rng.uniform(-1, 1)
        levels.append((y_lordosis, level * pitch, _jitter(rng), _bone(rng.uniform(1200, 1500)), _bone(rng.uniform(200, 300))))
    for (y0, z0, s0, *_), (y1, z1, s1, *_) in zip(levels[:-1], levels[1:]):
        gap = 0.5 * (z1 - z0) - 13.0 * max(s0, s1)
        if gap > 0.5:
            parts.append(cylinder((0.0, 0.5 * (y0 + y1), 0.5 * (z0 + z1)), (24 * s0, 17 * s0), gap, DISC - SOFT))
    for yc, zc, s, cortex, marrow in levels:
        parts += _vertebra(yc, zc, s, cortex, marrow)
    return AnalyticPhantom(tuple(parts))


def knee_phantom(seed: int = 0) -> AnalyticPhantom:
    """A right knee with the joint space at the origin, like :func:`ixgs.phantom.knee_phantom`:
    thigh and calf (fat around muscle), femur with condyles, tibia with its plateau, fibula and
    patella, each a cortex around marrow (thicker cortex and fatty marrow along the shafts)."""
    rng = np.random.default_rng(seed)
    s = [_jitter(rng) for _ in range(6)]
    parts = []
    for zc, widen in ((100.0, 1.1), (-100.0, 1.0)):  # thigh, calf (200 mm each)
        parts.append(cylinder((0.0, 2.0, zc), (63 * s[0] * widen, 60 * s[1] * widen), 100.0, FAT))
        parts.append(cylinder((0.0, 3.0, zc), (55 * s[0] * widen, 51 * s[1] * widen), 100.0, MUSCLE - FAT))
    parts.append(ellipsoid((0.0, 36.0, 10.0), (18.0, 12.0, 32.0), FAT - MUSCLE))   # popliteal fossa
    parts.append(ellipsoid((0.0, -32.0, -8.0), (15.0, 8.0, 10.0), FAT - MUSCLE))   # Hoffa's fat pad
    parts.append(rod((0.0, -47.0, 4.0), (0.0, -36.0, -32.0), 4.0, float(hu_to_attenuation(90.0)) - MUSCLE))  # patellar tendon
    cortex = [_bone(rng.uniform(1300, 1550)) for _ in range(4)]
    trabecular, shaft_marrow = _bone(250.0), _bone(60.0)
    parts += shell(ellipsoid((0.0, 4.0, 27.0), (35 * s[2], 25 * s[3], 25.0), 0.0), 1.5, cortex[0], trabecular, MUSCLE)
    parts += shell(cylinder((0.0, 3.0, 118.0), (14 * s[2], 14 * s[2]), 72.0, 0.0), 4.0, cortex[0], shaft_marrow, MUSCLE,
                   open_ends=True)
    parts += shell(cylinder((0.0, 4.0, -12.0), (37 * s[4], 26 * s[5]), 9.0, 0.0), 1.5, cortex[1], trabecular, MUSCLE)
    parts += shell(ellipsoid((0.0, 4.0, -42.0), (27 * s[4], 21 * s[5], 21.0), 0.0), 1.5, cortex[1], trabecular, MUSCLE)
    parts += shell(cylinder((0.0, 3.0, -122.0), (15 * s[4], 15 * s[4]), 68.0, 0.0), 4.0, cortex[1], shaft_marrow, MUSCLE,
                   open_ends=True)
    parts += shell(ellipsoid((-31.0, 18.0, -25.0), (9.0, 9.0, 10.0), 0.0), 1.5, cortex[2], _bone(200.0), MUSCLE)
    parts += shell(rod((-32.0, 20.0, -36.0), (-34.0, 22.0, -195.0), 7.0, 0.0), 2.0, cortex[2], _bone(200.0), MUSCLE)
    parts += shell(ellipsoid((0.0, -42.0, 22.0), (21 * s[0], 9.0, 19 * s[1]), 0.0), 2.0, cortex[3], trabecular, MUSCLE)
    return AnalyticPhantom(tuple(parts))


def make_analytic_phantom(name: str, seed: int = 0) -> AnalyticPhantom:
    """The analytic phantom called ``name`` ("spine" or "knee")."""
    makers = {"spine": spine_phantom, "knee": knee_phantom}
    if name not in makers:
        raise ValueError(f"phantom name must be one of {PHANTOMS}, got {name!r}")
    return makers[name](seed=seed)
