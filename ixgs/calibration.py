"""Geometric calibration of each view from a phantom of radio-opaque beads.

The C-arm's reported pose (DICOM angles, or a nominal orbit) is only roughly right. Imaging a
phantom whose bead positions are known fixes each view's projection matrix:

1. detect the beads with sub-pixel centroids (white top-hat, threshold at a robust noise level,
   intensity-weighted centroid in a window around each blob);
2. match them to the layout: the beads projected with the rough matrix are aligned to the
   detections by the 2D similarity with the most inliers (a vote over all bead-detection pairs for
   a few rotations and scales), then paired by an assignment (Hungarian) within a gate; RANSAC on
   the DLT removes wrong pairs;
3. solve the matrix by the normalised DLT and refine K (5), R (3), t (3) by Levenberg-Marquardt
   on the reprojection error, re-pairing beads with the refined matrix;
4. report the reprojection error per view and refuse a view with too few beads or a large error.

The world frame of the result is the phantom's (LPS mm); see ``docs/geometry.md``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_dilation
from scipy.optimize import least_squares, linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from skimage.measure import label as label_regions, regionprops
from skimage.morphology import disk, white_tophat

from .geometry import Roi, compose_projection_matrix, normalize_projection_matrix, project_points, view_rays
from .scan import decompose_projection_matrix, read_scan, write_scan
from .volume import json_text, read_json_object

LAYOUT_FORMAT = "ixgs.bead_layout"
MIN_BEADS = 8  # beads needed to solve 11 unknowns with redundancy against one wrong pair
DETECTION_SIGMAS = 6.0  # threshold above the robust noise level of the top-hat image
RANSAC_ITERATIONS = 300
RANSAC_THRESHOLD_PX = 2.0
ALIGN_ROTATIONS_DEG = (-8.0, -4.0, 0.0, 4.0, 8.0)
ALIGN_SCALES = (0.92, 1.0, 1.08)


@dataclass(frozen=True)
class BeadLayout:
    """Bead centres (n, 3) in the phantom frame (LPS mm) and the bead diameter (mm)."""

    positions_mm: np.ndarray
    diameter_mm: float
    name: str = "custom"

    @property
    def roi(self) -> Roi:
        lower, upper = self.positions_mm.min(axis=0), self.positions_mm.max(axis=0)
        return Roi(tuple(0.5 * (lower + upper)), tuple(upper - lower + 2 * self.diameter_mm))

    def to_dict(self) -> dict:
        return {"format": LAYOUT_FORMAT, "version": 1, "name": self.name, "bead_diameter_mm": self.diameter_mm,
                "beads_mm": self.positions_mm.tolist()}


def helix_layout(n_beads: int = 24, radius_mm: float = 40.0, height_mm: float = 120.0, turns: float = 2.0,
                 diameter_mm: float = 3.0) -> BeadLayout:
    """The default phantom: beads evenly spaced along a helix about the z (head-foot) axis.

    24 steel balls of 3 mm on a 40 mm radius, 120 mm tall, two-turn helix (in an acrylic
    cylinder of about 90 mm diameter): every view around the patient axis sees them spread out, not coplanar.
    """
    t = np.arange(n_beads) / (n_beads - 1)
    angle = 2 * np.pi * turns * t
    positions = np.stack([radius_mm * np.cos(angle), radius_mm * np.sin(angle), height_mm * (t - 0.5)], axis=1)
    return BeadLayout(positions, float(diameter_mm), "helix")


def layout_source(spec: str | os.PathLike) -> Path | None:
    """The file a layout is read from (None for the built-in helix)."""
    return None if str(spec) == "helix" else Path(spec)


def load_layout(spec: str | os.PathLike) -> BeadLayout:
    """``"helix"`` (the default phantom) or a JSON file:
    ``{"format": "ixgs.bead_layout", "version": 1, "bead_diameter_mm": 3, "beads_mm": [[x, y, z], ...]}``."""
    if str(spec) == "helix":
        return helix_layout()
    path = Path(spec)
    meta = read_json_object(path, "bead layout not found (give 'helix' or a JSON file)")
    if meta.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {LAYOUT_FORMAT!r}")
    try:
        beads = np.asarray(meta.get("beads_mm"), dtype=np.float64)
        diameter = float(meta.get("bead_diameter_mm"))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'beads_mm' must be a list of [x, y, z] and 'bead_diameter_mm' a number") from None
    if beads.ndim != 2 or beads.shape[1] != 3 or len(beads) < MIN_BEADS or not np.all(np.isfinite(beads)):
        raise ValueError(f"{path}: 'beads_mm' must hold at least {MIN_BEADS} finite [x, y, z] positions")
    if not diameter > 0:
        raise ValueError(f"{path}: 'bead_diameter_mm' must be positive, got {diameter}")
    return BeadLayout(beads, diameter, str(meta.get("name", path.stem)))


def render_beads(positions_mm: np.ndarray, diameter_mm: float, projection_matrix: np.ndarray,
                 shape: tuple[int, int], attenuation_per_mm: float = 0.5, supersample: int = 3) -> np.ndarray:
    """Exact line integrals (float32) of solid balls: attenuation x chord length, averaged over
    ``supersample``^2 sub-pixels. For simulated calibration images."""
    rows, cols = shape
    # Sub-pixel (a, b) of pixel (u, v) sits at u + (a + 0.5) / s - 0.5: the inverse of the binning transform.
    s = int(supersample)
    to_fine = np.array([[s, 0.0, 0.5 * (s - 1)], [0.0, s, 0.5 * (s - 1)], [0.0, 0.0, 1.0]])
    rays = view_rays(to_fine @ np.asarray(projection_matrix, float), (rows * s, cols * s), dtype=torch.float64)
    directions = rays.directions.numpy()
    source = rays.source.numpy()
    radius = 0.5 * diameter_mm
    image = np.zeros((rows * s, cols * s))
    for center in np.asarray(positions_mm, float):
        offset = center - source
        along = directions @ offset
        distance2 = offset @ offset - along ** 2
        image += 2.0 * np.sqrt(np.clip(radius ** 2 - distance2, 0.0, None))
    return (attenuation_per_mm * image.reshape(rows, s, cols, s).mean(axis=(1, 3))).astype(np.float32)


def expected_radius_px(projection_matrix: np.ndarray, layout: BeadLayout) -> float:
    """Bead radius (pixels) at the layout's centre: radius x focal length (px) / depth (mm)."""
    P = normalize_projection_matrix(projection_matrix, layout.positions_mm.mean(axis=0))
    depth = project_points(P, layout.positions_mm.mean(axis=0))[2]
    focal = np.sqrt(np.linalg.norm(P[0, :3]) * np.linalg.norm(P[1, :3]))
    return float(0.5 * layout.diameter_mm * focal / depth)


def detect_beads(image: np.ndarray, radius_px: float) -> np.ndarray:
    """Sub-pixel bead centres (k, 2) as (u, v) = (column, row) in a line-integral image (beads bright)."""
    image = np.asarray(image, np.float64)
    footprint = disk(int(np.ceil(2 * radius_px + 2)))
    tophat = white_tophat(image, footprint)
    noise = 1.4826 * np.median(np.abs(tophat - np.median(tophat))) + 1e-12
    mask = tophat > np.median(tophat) + DETECTION_SIGMAS * noise
    area = np.pi * max(radius_px, 0.5) ** 2
    weights_image = np.clip(tophat - 2 * noise, 0.0, None)
    labels = label_regions(mask)
    centres = []
    for region in regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        if not 0.2 * area <= region.area <= 1.6 * area + 4:
            continue  # a noise speck, or anatomy, or beads overlapping (their centroid would be biased)
        if r0 == 0 or c0 == 0 or r1 == image.shape[0] or c1 == image.shape[1]:
            continue  # cut by the image border
        # The blob and a one-pixel rim, without its neighbours: weights symmetric about the centre.
        r0, c0, r1, c1 = max(r0 - 1, 0), max(c0 - 1, 0), r1 + 1, c1 + 1
        own = labels[r0:r1, c0:c1]
        window = np.where(binary_dilation(own == region.label) & ((own == 0) | (own == region.label)),
                          weights_image[r0:r1, c0:c1], 0.0)
        rr, cc = np.mgrid[r0:r1, c0:c1]
        total = window.sum()
        centres.append(((window * cc).sum() / total, (window * rr).sum() / total))
    return np.asarray(centres, float).reshape(-1, 2)


def solve_dlt(points_mm: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """3x4 matrix from >= 6 correspondences by the DLT with Hartley normalisation."""
    points_mm, pixels = np.asarray(points_mm, float), np.asarray(pixels, float)
    T3, X = _normalizer(points_mm)
    T2, x = _normalizer(pixels)
    rows = []
    for (X1, X2, X3, X4), (u, v, _) in zip(X, x):
        Xh = np.array([X1, X2, X3, X4])
        rows.append(np.concatenate([Xh, np.zeros(4), -u * Xh]))
        rows.append(np.concatenate([np.zeros(4), Xh, -v * Xh]))
    P = np.linalg.svd(np.asarray(rows))[2][-1].reshape(3, 4)
    return np.linalg.solve(T2, P @ T3)


def refine_projection_matrix(projection_matrix: np.ndarray, points_mm: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Levenberg-Marquardt on the reprojection error over K (fu, fv, skew, cu, cv), R and t."""
    intrinsics, world_to_camera = decompose_projection_matrix(projection_matrix)
    rotation = Rotation.from_matrix(world_to_camera[:3, :3]).as_rotvec()
    start = np.concatenate([[intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 1], intrinsics[0, 2],
                             intrinsics[1, 2]], rotation, world_to_camera[:3, 3]])

    def matrix(params):
        K = np.array([[params[0], params[2], params[3]], [0.0, params[1], params[4]], [0.0, 0.0, 1.0]])
        Rt = np.hstack([Rotation.from_rotvec(params[5:8]).as_matrix(), params[8:11, None]])
        return compose_projection_matrix(K, Rt)

    def residuals(params):
        return (project_points(matrix(params), points_mm)[:, :2] - pixels).ravel()

    return matrix(least_squares(residuals, start, method="lm", x_scale="jac").x)


@dataclass
class ViewCalibration:
    projection_matrix: np.ndarray
    rms_px: float  # reprojection error of the matched beads
    max_px: float
    matched: int
    detected: int

    def to_dict(self) -> dict:
        return {"rms_px": self.rms_px, "max_px": self.max_px, "matched_beads": self.matched,
                "detected_blobs": self.detected}


def calibrate_view(image: np.ndarray, layout: BeadLayout, prior_matrix: np.ndarray, label: str = "view",
                   max_rms_px: float = 1.0) -> ViewCalibration:
    """The projection matrix (LPS, phantom frame) of one image of the phantom, from a rough prior matrix."""
    prior_matrix = normalize_projection_matrix(prior_matrix, layout.positions_mm.mean(axis=0))
    radius = expected_radius_px(prior_matrix, layout)
    detected = detect_beads(image, radius)
    if len(detected) < MIN_BEADS:
        raise ValueError(f"{label}: cannot be calibrated: {len(detected)} bead(s) detected, need {MIN_BEADS}")
    predicted = project_points(prior_matrix, layout.positions_mm)[:, :2]
    spacing = _typical_spacing(detected)
    aligned = _align_2d(predicted, detected, gate=0.3 * spacing)
    # Every detection near an aligned bead is a candidate pair; RANSAC keeps the consistent ones.
    pairs = _candidate_pairs(aligned, detected, radius=0.6 * spacing)
    if len(np.unique(pairs[:, 0])) < MIN_BEADS:
        raise ValueError(f"{label}: cannot be calibrated: only {len(np.unique(pairs[:, 0]))} bead(s) match the layout")
    matrix = _ransac_dlt(layout.positions_mm[pairs[:, 0]], detected[pairs[:, 1]], label)
    for gate in (0.4 * spacing, 3.0 * max(radius, 1.0), 1.5 * max(radius, 1.0)):
        reprojected = project_points(matrix, layout.positions_mm)[:, :2]
        candidate = _assign(reprojected, detected, gate=gate)
        if len(candidate) < MIN_BEADS:
            break
        pairs = candidate
        matrix = refine_projection_matrix(matrix, layout.positions_mm[pairs[:, 0]], detected[pairs[:, 1]])
    errors = _reprojection_errors(matrix, layout, detected, pairs)
    outliers = errors > 4.0 * np.median(errors)  # far in the tail of the centroid noise
    if outliers.any() and len(pairs) - outliers.sum() >= MIN_BEADS:  # e.g. a bead touching a spurious blob
        pairs = pairs[~outliers]
        matrix = refine_projection_matrix(matrix, layout.positions_mm[pairs[:, 0]], detected[pairs[:, 1]])
        errors = _reprojection_errors(matrix, layout, detected, pairs)
    rms = float(np.sqrt(np.mean(errors ** 2)))
    if len(pairs) < MIN_BEADS or rms > max_rms_px:
        raise ValueError(f"{label}: cannot be calibrated: {len(pairs)} matched beads, reprojection error "
                         f"{rms:.2f} px (limit {max_rms_px} px)")
    matrix = normalize_projection_matrix(matrix, layout.positions_mm.mean(axis=0))
    return ViewCalibration(matrix, rms, float(errors.max()), len(pairs), len(detected))


def calibrate_scan(images: str | os.PathLike, layout_spec: str | os.PathLike, out_scan: str | os.PathLike,
                   max_rms_px: float = 1.0) -> tuple[Path, dict]:
    """Calibrate every view of a scan folder or DICOM folder of phantom images (their matrices are
    the rough prior) and write the scan with the calibrated matrices plus ``calibration.json``.

    Any view that cannot be calibrated refuses the whole run, naming every such view.
    """
    if not (np.isfinite(max_rms_px) and max_rms_px > 0):
        raise ValueError(f"max_rms_px (--max-error) must be a positive number of pixels, got {max_rms_px}")
    layout = load_layout(layout_spec)
    images = Path(images)
    if (images / "scan.json").is_file() or images.suffix == ".json":
        scan = read_scan(images)
        views = [(view.image, view.projection_matrix, view.name) for view in scan.views]
    else:
        from .dicom import read_dicom_views

        views = [(view.image, view.projection_matrix, view.name) for view in read_dicom_views(images)]
    results, failures = [], []
    for image, prior, name in views:
        try:
            results.append(calibrate_view(image, layout, prior, f"{images}: {name}", max_rms_px))
        except ValueError as error:
            failures.append(str(error))
    if failures:
        raise ValueError("; ".join(failures))
    report = {"layout": layout.to_dict(), "max_rms_px": max_rms_px,
              "views": [{"image": name, **result.to_dict()} for (_, _, name), result in zip(views, results)]}
    path = write_scan(out_scan, [image for image, _, _ in views], [r.projection_matrix for r in results],
                      roi=layout.roi, inputs=[images, layout_source(layout_spec)],
                      extra_files={"calibration.json": json_text(report, indent=1)})
    return Path(path), report


def _reprojection_errors(matrix, layout: BeadLayout, detected: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.linalg.norm(project_points(matrix, layout.positions_mm[pairs[:, 0]])[:, :2] - detected[pairs[:, 1]],
                          axis=1)


def _normalizer(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity moving points to zero mean and sqrt(dim) mean distance, and the homogeneous points."""
    dim = points.shape[1]
    mean = points.mean(axis=0)
    scale = np.sqrt(dim) / np.mean(np.linalg.norm(points - mean, axis=1))
    T = np.eye(dim + 1)
    T[:dim, :dim] *= scale
    T[:dim, dim] = -scale * mean
    homogeneous = np.hstack([points, np.ones((len(points), 1))]) @ T.T
    return T, homogeneous


def _typical_spacing(points: np.ndarray) -> float:
    """Median distance (px) from a detection to its nearest neighbour."""
    distances = cKDTree(points).query(points, k=2)[0][:, 1]
    return float(np.median(distances))


def _align_2d(predicted: np.ndarray, detected: np.ndarray, gate: float) -> np.ndarray:
    """The predicted points moved by the similarity (rotation, scale about their centre, then a
    shift taking one predicted point onto one detection) that brings the most within ``gate``."""
    tree = cKDTree(detected)
    center = predicted.mean(axis=0)
    best, best_score = predicted, (-1, 0.0)
    for angle in np.radians(ALIGN_ROTATIONS_DEG):
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        for scale in ALIGN_SCALES:
            moved = center + scale * (predicted - center) @ rotation.T
            shifts = (detected[None, :, :] - moved[:, None, :]).reshape(-1, 2)
            candidates = moved[None, :, :] + shifts[:, None, :]
            distances = tree.query(candidates.reshape(-1, 2), distance_upper_bound=gate)[0].reshape(len(shifts), -1)
            inside = np.isfinite(distances)
            counts = inside.sum(axis=1)
            residual = np.where(inside, distances, 0.0).sum(axis=1)
            index = int(np.lexsort((residual, -counts))[0])
            score = (int(counts[index]), -float(residual[index]))
            if score > best_score:
                best_score, best = score, candidates[index]
    return best


def _candidate_pairs(predicted: np.ndarray, detected: np.ndarray, radius: float) -> np.ndarray:
    """All pairs (bead index, detection index) closer than ``radius``."""
    near = cKDTree(detected).query_ball_point(predicted, r=radius)
    pairs = [(bead, detection) for bead, detections in enumerate(near) for detection in detections]
    return np.asarray(pairs, int).reshape(-1, 2)


def _assign(predicted: np.ndarray, detected: np.ndarray, gate: float) -> np.ndarray:
    """Pairs (bead index, detection index) by minimum total distance, keeping those within ``gate``."""
    cost = np.linalg.norm(predicted[:, None, :] - detected[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(np.minimum(cost, 10 * gate))
    keep = cost[rows, cols] <= gate
    return np.stack([rows[keep], cols[keep]], axis=1)


def _ransac_dlt(points_mm: np.ndarray, pixels: np.ndarray, label: str) -> np.ndarray:
    """DLT on the largest set of pairs consistent with one matrix (seeded, so runs are repeatable)."""
    rng = np.random.default_rng(0)
    best_inliers = np.zeros(len(points_mm), bool)
    for _ in range(RANSAC_ITERATIONS):
        sample = rng.choice(len(points_mm), 6, replace=False)
        try:
            P = solve_dlt(points_mm[sample], pixels[sample])
        except np.linalg.LinAlgError:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):  # degenerate samples put points at infinity
            errors = np.linalg.norm(project_points(P, points_mm)[:, :2] - pixels, axis=1)
        inliers = errors < RANSAC_THRESHOLD_PX
        if inliers.sum() > best_inliers.sum():
            best_inliers = inliers
    if best_inliers.sum() < MIN_BEADS:
        raise ValueError(f"{label}: cannot be calibrated: no projection matrix fits {MIN_BEADS} matched beads")
    return solve_dlt(points_mm[best_inliers], pixels[best_inliers])
