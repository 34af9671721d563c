"""Projective geometry of one X-ray view and of the reconstruction box.

Conventions used everywhere in the engine (see ``docs/SCAN_FORMAT.md``):

* World frame: LPS, millimetres (DICOM/ITK). Slicer's RAS is converted at the edges
  (:func:`ras_to_lps_matrix`).
* A view is a 3x4 projection matrix ``P``: for a world point ``X`` (homogeneous),
  ``P @ X = w * (u, v, 1)`` with ``u`` the column and ``v`` the row of the image array,
  integer ``(u, v)`` at pixel centres. The X-ray source is the null vector of ``P``.
* Matrices are normalised so that ``w > 0`` in front of the source (towards the detector),
  which makes ``w`` the depth along the principal axis in the units of ``P``'s last row.
* Volumes are numpy arrays indexed ``[k, j, i]`` (z, y, x), like SimpleITK's
  ``GetArrayFromImage``; ``origin`` is the world position of voxel ``(0, 0, 0)``'s centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Flips x and y: the same matrix maps LPS to RAS and back.
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps_matrix(projection_matrix_ras: np.ndarray) -> np.ndarray:
    """Re-express a projection matrix that acts on RAS points as one acting on LPS points."""
    return np.asarray(projection_matrix_ras, dtype=np.float64) @ LPS_RAS_FLIP


def compose_projection_matrix(intrinsics: np.ndarray, world_to_camera: np.ndarray) -> np.ndarray:
    """P = K [R | t] from a 3x3 intrinsic matrix and a 4x4 (or 3x4) world-to-camera transform."""
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    world_to_camera = np.asarray(world_to_camera, dtype=np.float64)
    return intrinsics @ world_to_camera[:3, :4]


def source_position(projection_matrix: np.ndarray) -> np.ndarray:
    """X-ray source (mm): the finite null vector of P, i.e. ``-M^-1 p4`` with ``P = [M | p4]``."""
    P = np.asarray(projection_matrix, dtype=np.float64)
    return -np.linalg.solve(P[:, :3], P[:, 3])


def binning_matrix(factor: float) -> np.ndarray:
    """3x3 pixel transform from full to ``factor``-binned images, keeping pixel centres exact.

    A binned pixel ``u'`` covers full pixels ``factor*u' .. factor*u' + factor - 1``, so its centre
    is ``u = factor*u' + (factor - 1)/2``.
    """
    f = float(factor)
    shift = 0.5 / f - 0.5
    return np.array([[1.0 / f, 0.0, shift], [0.0, 1.0 / f, shift], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Roi:
    """Axis-aligned box in the world frame (LPS, mm)."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]

    @property
    def lower(self) -> np.ndarray:
        return np.asarray(self.center, float) - 0.5 * np.asarray(self.size, float)

    @property
    def upper(self) -> np.ndarray:
        return np.asarray(self.center, float) + 0.5 * np.asarray(self.size, float)

    def grid(self, voxel_size_mm: float) -> "Grid":
        """The voxel grid that tiles this box with (near-)cubic voxels of ``voxel_size_mm``."""
        size = np.asarray(self.size, float)
        shape_xyz = np.maximum(1, np.round(size / voxel_size_mm)).astype(int)
        spacing = size / shape_xyz
        origin = self.lower + 0.5 * spacing
        return Grid(shape=tuple(int(n) for n in shape_xyz[::-1]), origin=tuple(origin), spacing=tuple(spacing))

    def expanded(self, factor: float) -> "Roi":
        """The same centre with every side multiplied by ``factor``."""
        return Roi(self.center, tuple(float(s) * factor for s in self.size))

    def contains(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, float)
        return np.all((points >= self.lower) & (points <= self.upper), axis=-1)

    def to_dict(self) -> dict:
        return {"center": [float(c) for c in self.center], "size": [float(s) for s in self.size]}


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` is (nz, ny, nx), ``origin`` the LPS centre of voxel (0, 0, 0) in mm,
    ``spacing`` (sx, sy, sz) in mm; axes are aligned with the world axes."""

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]

    def voxel_centers(self) -> np.ndarray:
        """World positions (mm) of all voxel centres, shape ``shape + (3,)`` as (x, y, z)."""
        nz, ny, nx = self.shape
        axes = [self.origin[a] + self.spacing[a] * np.arange(n) for a, n in enumerate((nx, ny, nz))]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return np.stack([x, y, z], axis=-1)

    def padded(self, pad_voxels: tuple[int, int, int]) -> "Grid":
        """The same lattice grown by ``pad_voxels`` (x, y, z) on every side; crop back with :meth:`inner`."""
        pad = np.asarray(pad_voxels, int)
        shape = tuple(int(n + 2 * p) for n, p in zip(self.shape, pad[::-1]))
        origin = tuple(np.asarray(self.origin) - pad * np.asarray(self.spacing))
        return Grid(shape, origin, self.spacing)

    def inner(self, pad_voxels: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        """Array slices (z, y, x) of this grid that hold the grid it was padded from."""
        return tuple(slice(p, n - p) for n, p in zip(self.shape, tuple(pad_voxels)[::-1]))

    @property
    def roi(self) -> Roi:
        spacing = np.asarray(self.spacing)
        extent = spacing * np.asarray(self.shape[::-1])
        center = np.asarray(self.origin) + 0.5 * (extent - spacing)
        return Roi(tuple(center), tuple(extent))


def normalize_projection_matrix(projection_matrix: np.ndarray, point_in_front: np.ndarray) -> np.ndarray:
    """Scale P so that its last row's direction part has unit norm and ``w > 0`` at ``point_in_front``.

    Then ``w`` is the distance (mm) from the source along the principal axis, which lets depth
    tests and footprints be computed the same way for every view.
    """
    P = np.asarray(projection_matrix, dtype=np.float64)
    P = P / np.linalg.norm(P[2, :3])
    w = P[2] @ np.append(np.asarray(point_in_front, float), 1.0)
    return -P if w < 0 else P


def project_points(projection_matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(u, v, w) for world points of shape (..., 3)."""
    P = np.asarray(projection_matrix, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    uvw = points @ P[:, :3].T + P[:, 3]
    w = uvw[..., 2:3]
    return np.concatenate([uvw[..., :2] / w, w], axis=-1)


@dataclass
class ViewRays:
    """The cone-beam rays of one view as torch tensors on the compute device.

    ``source`` (3,) in mm; ``directions`` (rows, cols, 3) unit vectors from the source through each
    pixel centre; ``projection_matrix`` (3, 4), normalised as above.
    """

    source: torch.Tensor
    directions: torch.Tensor
    projection_matrix: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.directions.shape[:2])


def view_rays(projection_matrix: np.ndarray, shape: tuple[int, int], device="cpu", dtype=torch.float32) -> ViewRays:
    """Rays of a ``shape = (rows, cols)`` image whose normalised projection matrix is given."""
    P = np.asarray(projection_matrix, dtype=np.float64)
    rows, cols = shape
    v, u = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1)
    directions = pixels @ np.linalg.inv(P[:, :3]).T
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    return ViewRays(
        source=torch.as_tensor(source_position(P), dtype=dtype, device=device),
        directions=torch.as_tensor(directions, dtype=dtype, device=device),
        projection_matrix=torch.as_tensor(P, dtype=dtype, device=device),
    )


def closest_point_to_lines(points: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Least-squares point nearest to the lines ``points + t directions`` (unit directions), e.g. the
    isocentre where the principal rays of a C-arm's views (nearly) meet."""
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for point, direction in zip(points, directions):
        projector = np.eye(3) - np.outer(direction, direction)
        A += projector
        b += projector @ point
    return np.linalg.lstsq(A, b, rcond=None)[0]


def common_field_of_view(projection_matrices: list[np.ndarray], shapes: list[tuple[int, int]],
                         resolution: int = 48) -> Roi | None:
    """Bounding box of the region every view sees, or None when no point is seen by all views.

    The search box is centred on the least-squares intersection of the principal rays (the
    isocentre of a C-arm) and reaches half-way to the nearest source, so sources are never inside.
    """
    sources = np.array([source_position(P) for P in projection_matrices])
    axes = []
    for P in projection_matrices:
        axis = np.asarray(P, float)[2, :3]
        axes.append(axis / np.linalg.norm(axis))
    isocentre = closest_point_to_lines(sources, np.array(axes))
    half = 0.5 * np.min(np.linalg.norm(sources - isocentre, axis=1))
    search = Roi(tuple(isocentre), (2 * half,) * 3)
    for _ in range(2):  # coarse search, then a finer one around the box found (one cell wider)
        cell = max(search.size) / resolution
        found = _seen_box(projection_matrices, shapes, isocentre, search.grid(cell))
        if found is None:
            return None
        search = Roi(found.center, tuple(s + 2 * cell for s in found.size))
    return found


def views_seeing(projection_matrices, shapes, points: np.ndarray, point_in_front) -> np.ndarray:
    """For world points (..., 3), how many views see each: in front of the source and inside the image."""
    points = np.asarray(points, float)
    count = np.zeros(points.shape[:-1], dtype=np.int32)
    for P, shape in zip(projection_matrices, shapes):
        P = normalize_projection_matrix(P, point_in_front)
        u, v, w = np.moveaxis(points @ P[:, :3].T + P[:, 3], -1, 0)
        count += sees(u, v, w, shape)
    return count


def sees(u: np.ndarray, v: np.ndarray, w: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Whether homogeneous image points ``w (u/w, v/w, 1)`` of a normalised matrix lie in front of the
    source and inside a ``shape = (rows, cols)`` image (no division: cheap on large arrays)."""
    rows, cols = shape
    return (w > 0) & (u >= -0.5 * w) & (u <= (cols - 0.5) * w) & (v >= -0.5 * w) & (v <= (rows - 0.5) * w)


def _seen_box(projection_matrices, shapes, point_in_front, grid: Grid) -> Roi | None:
    """Bounding box of the grid's voxel centres that project inside every image."""
    points = grid.voxel_centers().reshape(-1, 3)
    seen = views_seeing(projection_matrices, shapes, points, point_in_front) == len(projection_matrices)
    if not seen.any():
        return None
    inside = points[seen]
    lower, upper = inside.min(axis=0), inside.max(axis=0)
    return Roi(tuple(0.5 * (lower + upper)), tuple(upper - lower))
