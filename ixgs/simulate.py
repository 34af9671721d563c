"""C-arm poses and simulated scans of a phantom (attenuation or noisy transmission images).

Detector orientation (every view): the image is displayed as seen from the detector side looking
towards the source, like a conventional radiograph. At primary = secondary = 0 (AP: source
posterior, detector anterior) image columns run towards the patient's left (+x) and rows towards
the feet (-z), so image up is the head and the patient's right is on the viewer's left. Other poses
rotate that frame with the C-arm: by the primary angle about the patient's long axis, then by the
secondary angle (cranial/caudal) about the column axis.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from skimage.filters import gaussian

from .analytic import AnalyticPhantom, box_corners
from .geometry import Roi, normalize_projection_matrix, project_points, view_rays
from .limits import check_memory, simulation_needs
from .phantom import hu_to_attenuation
from .projector import forward_project, sample_volume
from .scan import write_scan
from .volume import Volume

# Detector field of view at the isocentre / the ROI's largest side: a 30 cm flat panel (or a 9-inch
# intensifier) sees about 180 mm at the isocentre, around a 110 mm region of interest.
FIELD_OF_VIEW_FACTOR = 1.6
BONE_HU = 300.0


def beam_direction(primary_deg: float, secondary_deg: float) -> np.ndarray:
    """Unit source-to-detector direction in LPS (DICOM positioner angles)."""
    a, b = np.radians(primary_deg), np.radians(secondary_deg)
    return np.array([np.sin(a) * np.cos(b), -np.cos(a) * np.cos(b), np.sin(b)])


def c_arm_projection_matrix(primary_deg: float, secondary_deg: float, source_to_detector_mm: float,
                            source_to_isocenter_mm: float, detector_shape: tuple[int, int],
                            pixel_spacing_mm: tuple[float, float], isocenter=(0.0, 0.0, 0.0),
                            detector_offset_px: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Normalised 3x4 LPS projection matrix of an ideal C-arm view.

    DICOM angles: primary 0 = detector anterior (beam P->A), +90 = LAO (detector at the patient's
    left); secondary +90 = detector cranial. ``detector_shape`` is (rows, cols), ``pixel_spacing_mm``
    (row spacing, column spacing) at the detector; the isocentre projects to the detector centre
    shifted by ``detector_offset_px`` = (rows, cols). Image orientation: see the module docstring.
    """
    if not 0 < source_to_isocenter_mm < source_to_detector_mm:
        raise ValueError(f"need 0 < source_to_isocenter_mm ({source_to_isocenter_mm}) < "
                         f"source_to_detector_mm ({source_to_detector_mm})")
    if min(pixel_spacing_mm) <= 0 or min(detector_shape) < 1:
        raise ValueError(f"bad detector: shape {detector_shape}, pixel spacing {pixel_spacing_mm} mm")
    a, b = np.radians(primary_deg), np.radians(secondary_deg)
    beam = beam_direction(primary_deg, secondary_deg)
    column_axis = np.array([np.cos(a), np.sin(a), 0.0])
    row_axis = np.array([np.sin(a) * np.sin(b), -np.cos(a) * np.sin(b), -np.cos(b)])
    isocenter = np.asarray(isocenter, float)
    source = isocenter - source_to_isocenter_mm * beam
    rotation = np.stack([column_axis, row_axis, beam])
    rows, cols = detector_shape
    intrinsics = np.array([
        [source_to_detector_mm / pixel_spacing_mm[1], 0.0, 0.5 * (cols - 1) + detector_offset_px[1]],
        [0.0, source_to_detector_mm / pixel_spacing_mm[0], 0.5 * (rows - 1) + detector_offset_px[0]],
        [0.0, 0.0, 1.0],
    ])
    P = intrinsics @ np.hstack([rotation, (-rotation @ source)[:, None]])
    return normalize_projection_matrix(P, isocenter)


@dataclass(frozen=True)
class CArmPose:
    """One C-arm position: DICOM angles (degrees) and source distances (mm)."""

    primary_deg: float
    secondary_deg: float
    source_to_detector_mm: float
    source_to_isocenter_mm: float

    def projection_matrix(self, detector_shape, pixel_spacing_mm, isocenter=(0.0, 0.0, 0.0)) -> np.ndarray:
        return c_arm_projection_matrix(self.primary_deg, self.secondary_deg, self.source_to_detector_mm,
                                       self.source_to_isocenter_mm, detector_shape, pixel_spacing_mm, isocenter)


def _stratified(n: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """One uniform sample in each of ``n`` equal strata of [low, high]."""
    return low + (high - low) * (np.arange(n) + rng.random(n)) / n


def random_c_arm_poses(n_views: int, rng: np.random.Generator, primary_range=(-90.0, 90.0),
                       secondary_range=(-30.0, 30.0), sid_mm=(1000.0, 1200.0),
                       sod_mm=(600.0, 750.0)) -> list[CArmPose]:
    """Poses spread over the angle ranges (Latin hypercube: stratified and jittered).

    Primary angles come in increasing order (a sweep); secondary angles are stratified too but
    shuffled; source-detector and source-isocentre distances are uniform in their ranges.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    if sod_mm[1] >= sid_mm[0]:
        raise ValueError(f"source-isocentre distances {sod_mm} must stay below source-detector ones {sid_mm}")
    primary = _stratified(n_views, *primary_range, rng)
    secondary = rng.permutation(_stratified(n_views, *secondary_range, rng))
    sid = rng.uniform(*sid_mm, size=n_views)
    sod = rng.uniform(*sod_mm, size=n_views)
    return [CArmPose(float(a), float(b), float(d), float(o)) for a, b, d, o in zip(primary, secondary, sid, sod)]


def bone_roi(phantom: Volume, margin_mm: float = 10.0) -> Roi:
    """Bounding box of the bone (HU > 300) of a CT, grown by ``margin_mm`` on each side."""
    indices = np.argwhere(phantom.array > BONE_HU)[:, ::-1]  # (i, j, k)
    if len(indices) == 0:
        raise ValueError("the phantom has no bone (HU > 300); pass an roi")
    spacing, origin = np.asarray(phantom.spacing, float), np.asarray(phantom.origin, float)
    lower = origin + spacing * indices.min(axis=0) - margin_mm
    upper = origin + spacing * indices.max(axis=0) + margin_mm
    return Roi(tuple(float(c) for c in 0.5 * (lower + upper)), tuple(float(s) for s in upper - lower))


def fitting_pixel_spacing(poses: list[CArmPose], roi: Roi, detector_px: int,
                          field_of_view_factor: float = FIELD_OF_VIEW_FACTOR) -> float:
    """Square detector pixel spacing (mm) of one detector for all poses: ``field_of_view_factor``
    times the ROI's largest side spans the detector at the largest isocentre magnification (SID / SOD).

    Oblique views may clip the ROI's corners, as a real C-arm's fixed field of view does.
    """
    magnification = max(pose.source_to_detector_mm / pose.source_to_isocenter_mm for pose in poses)
    return max(roi.size) * field_of_view_factor * magnification / detector_px


def reference_volume(attenuation: torch.Tensor, grid, roi: Roi, voxel_size_mm: float) -> Volume:
    """The attenuation (1/mm) resampled (trilinear) onto the ROI's grid."""
    roi_grid = roi.grid(voxel_size_mm)
    points = torch.as_tensor(roi_grid.voxel_centers(), dtype=attenuation.dtype, device=attenuation.device)
    with torch.no_grad():
        values = sample_volume(attenuation, grid, points)
    return Volume.on_grid(values.cpu().numpy().astype(np.float32), roi_grid)


def object_pixel_spacing(poses: list[CArmPose], box: Roi, detector_px: int, isocenter) -> float:
    """Square detector pixel spacing (mm) at which every corner of ``box`` projects inside the
    detector in every view: an untruncated scan of an object inside ``box``."""
    corners = box_corners(box.lower, box.upper)
    half_extent_mm = 0.0  # farthest corner from the detector centre, on a detector of 1 mm pixels
    for pose in poses:
        P = pose.projection_matrix((detector_px, detector_px), (1.0, 1.0), isocenter)
        uv = project_points(P, corners)[:, :2]
        half_extent_mm = max(half_extent_mm, float(np.abs(uv - 0.5 * (detector_px - 1)).max()))
    return 1.01 * half_extent_mm / (0.5 * detector_px)


def simulate_scan(phantom: Volume | AnalyticPhantom, out_dir: str | os.PathLike, n_views: int = 20,
                  detector_px: int = 128, seed: int = 0, transmission: bool = False, i0: float = 1e4,
                  blur_px: float = 0.7, roi: Roi | None = None, progress: Callable[[int, int], None] | None = None,
                  device="cpu", field_of_view_factor: float = FIELD_OF_VIEW_FACTOR,
                  primary_range=(-90.0, 90.0), secondary_range=(-30.0, 30.0), field_of_view: str = "roi",
                  supersample: int = 3, reference_voxel_mm: float | None = None) -> Path:
    """Simulate C-arm views of a phantom and write them as a scan folder.

    ``phantom``: a CT (HU, projected by the trilinear ray marcher SART also uses: fine for tests,
    an inverse crime for benchmarks) or an :class:`~ixgs.analytic.AnalyticPhantom` (exact line
    integrals, ``supersample``^2 sub-rays per pixel). Poses spread over ``primary_range`` and
    ``secondary_range`` (degrees, DICOM). The ROI (default: the CT's bone bounding box) sits at the
    isocentre; with ``field_of_view`` "roi" the detector sees ``field_of_view_factor`` times its
    largest side (:func:`fitting_pixel_spacing`; 1.1 makes the ROI fill the detector) and the rest of
    the body is truncated, as in real intraoperative views; with "object" the pixel spacing makes the
    whole object (an analytic phantom's bounds, its crop box when cropped) fit every view.
    Attenuation scans hold line integrals; transmission scans hold ``Poisson(i0 exp(-line integral))``
    blurred by a Gaussian of ``blur_px`` pixels, with ``i0`` written. The ground truth attenuation on
    the ROI is written as the reference volume: a CT resampled at max(1 mm, its voxel), an analytic
    phantom's exact voxel means on a grid of ``reference_voxel_mm`` (default: the ROI's longest
    side / 128, the reconstruction's default grid). ``progress(done, total)`` is called after each view.
    """
    check_memory(simulation_needs(n_views, detector_px), device)
    analytic = isinstance(phantom, AnalyticPhantom)
    if not analytic and not np.allclose(np.asarray(phantom.direction, float), np.eye(3), atol=1e-6):
        raise ValueError("simulate_scan needs an axis-aligned phantom (identity direction)")
    if analytic and roi is None:
        raise ValueError("simulate_scan needs an roi for an analytic phantom")
    if transmission and i0 <= 0:
        raise ValueError(f"i0 must be positive for a transmission scan, got {i0}")
    if field_of_view not in ("roi", "object"):
        raise ValueError(f"field_of_view must be 'roi' or 'object', got {field_of_view!r}")
    for name, (low, high) in (("primary_range", primary_range), ("secondary_range", secondary_range)):
        if not -180.0 <= low <= high <= 180.0:
            raise ValueError(f"{name} must satisfy -180 <= min <= max <= 180 degrees, got {low} {high}")
    rng = np.random.default_rng(seed)
    roi = bone_roi(phantom) if roi is None else roi
    poses = random_c_arm_poses(n_views, rng, primary_range=primary_range, secondary_range=secondary_range)
    if field_of_view == "object":
        spacing = object_pixel_spacing(poses, phantom.bounds() if analytic else phantom.grid.roi, detector_px,
                                       roi.center)
    else:
        spacing = fitting_pixel_spacing(poses, roi, detector_px, field_of_view_factor)
    if not analytic:
        grid = phantom.grid
        attenuation = hu_to_attenuation(torch.as_tensor(np.asarray(phantom.array, dtype=np.float32), device=device))
    images, matrices = [], []
    for index, pose in enumerate(poses):
        P = pose.projection_matrix((detector_px, detector_px), (spacing, spacing), roi.center)
        if analytic:
            image = phantom.project(P, (detector_px, detector_px), supersample)
        else:
            with torch.no_grad():
                line_integrals = forward_project(attenuation, grid, view_rays(P, (detector_px, detector_px), device=device))
            image = line_integrals.cpu().numpy().astype(np.float64)
        if transmission:
            counts = rng.poisson(i0 * np.exp(-image)).astype(np.float64)
            image = gaussian(counts, sigma=blur_px, preserve_range=True) if blur_px > 0 else counts
        images.append(image.astype(np.float32))
        matrices.append(P)
        if progress is not None:
            progress(index + 1, n_views)
    if analytic:
        reference = phantom.reference(roi.grid(reference_voxel_mm or max(roi.size) / 128))
    else:
        reference = reference_volume(attenuation, grid, roi, reference_voxel_mm or max(1.0, float(min(grid.spacing))))
    return write_scan(out_dir, images, matrices, intensity="transmission" if transmission else "attenuation",
                      i0=i0 if transmission else None, roi=roi, reference=reference)
