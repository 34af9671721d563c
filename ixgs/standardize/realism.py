"""Realistic C-arm radiographs from a CT-like volume (HU), for paired training data and benchmarks.

The forward model of the reconstruction is monochromatic and clean; a real C-arm image is not.
Starting from the two material path lengths of :mod:`.target` (water-equivalent mm, bone mm), one
view goes through, in the order the photons do:

1. polychromatic beam: a Kramers spectrum at ``kvp`` filtered by ``filtration_mm_al`` of aluminium,
   in energy bins, seen by an energy-integrating detector, so bone hardens the beam;
2. heel effect (a linear ramp of the tube output across the field) and flat-field non-uniformity
   (a smooth random gain map);
3. scatter: the photons removed from the primary beam (scatter arises in the object, not in air),
   blurred by a wide kernel and scaled so that the median scatter-to-primary ratio behind the object
   is ``scatter_to_primary`` (an anti-scatter grid keeps it near 0.1-1; behind the thickest parts it
   is higher, in thin parts lower);
4. collimator: shutters or an iris that let only ``collimator_leak`` of the beam through outside;
5. quantum noise: Poisson counts at ``i0`` photons per unattenuated pixel;
6. detector blur (Gaussian, ``blur_px``);
7. C-arm display processing (optional): -log, window/level on percentiles, gamma, edge
   enhancement (unsharp mask), optional inversion (bright = air), 12-bit quantization.

:func:`detector_counts` stops after 6 (a transmission image); :func:`engine_view` returns what the
engine's standardization receives: -log(counts / i0) or the display image. All parameters are
randomized by :func:`random_realism`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..geometry import Roi
from ..phantom import MU_WATER_PER_MM, hu_to_attenuation
from ..scan import write_scan
from ..simulate import bone_roi, fitting_pixel_spacing, random_c_arm_poses, reference_volume
from ..volume import Volume
from .target import MU_BONE_PER_MM, material_path_lengths

# Mass attenuation (cm2/g, NIST XCOM) at the bin energies (keV): water, cortical bone (ICRU 44), aluminium.
ENERGIES_KEV = np.array([30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 120.0])
_WATER_CM2_G = np.array([0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1614])
_BONE_CM2_G = np.array([1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1654])
_ALUMINIUM_CM2_G = np.array([1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1536])
# Linear coefficients (1/mm), scaled so that 60 keV equals the engine's (and the target's) values.
MU_WATER_BY_ENERGY = _WATER_CM2_G * MU_WATER_PER_MM / _WATER_CM2_G[3]
MU_BONE_BY_ENERGY = _BONE_CM2_G * MU_BONE_PER_MM / _BONE_CM2_G[3]
MU_ALUMINIUM_BY_ENERGY = _ALUMINIUM_CM2_G * 2.699 / 10.0
DISPLAY_LEVELS = 4095  # 12-bit display images


@dataclass(frozen=True)
class RealismSettings:
    """One view's acquisition and processing; units in the names (kVp, mm, photons, pixels)."""

    kvp: float = 80.0
    filtration_mm_al: float = 3.0
    i0: float = 2e4                  # photons per unattenuated pixel
    heel: float = 0.1                # relative output change across the field
    heel_angle_deg: float = 0.0      # direction of the anode-cathode axis in the image
    flat_field: float = 0.02         # standard deviation of the smooth gain map
    scatter_to_primary: float = 0.3  # median scatter / primary behind the object
    scatter_sigma: float = 0.2       # scatter kernel width / image size
    collimator: str = "none"         # "none", "shutters" or "iris"
    collimator_size: float = 0.9     # open fraction of the field (shutters: per axis; iris: diameter)
    collimator_leak: float = 0.03
    blur_px: float = 0.6
    display: bool = False            # apply C-arm display processing (step 7)
    window: tuple[float, float] = (1.0, 99.5)  # percentiles of -log (central field) mapped to black / white
    gamma: float = 1.0
    edge_enhancement: float = 0.5
    edge_sigma_px: float = 2.0
    invert: bool = False             # display bright = air (fluoroscopy look)

    def validate(self) -> None:
        checks = {
            "kvp": ENERGIES_KEV[0] < self.kvp <= 150.0, "filtration_mm_al": self.filtration_mm_al >= 0,
            "i0": self.i0 > 0, "heel": 0 <= self.heel < 1, "flat_field": 0 <= self.flat_field < 0.5,
            "scatter_to_primary": self.scatter_to_primary >= 0, "scatter_sigma": self.scatter_sigma > 0,
            "collimator": self.collimator in ("none", "shutters", "iris"),
            "collimator_size": 0 < self.collimator_size <= 1.5, "collimator_leak": 0 < self.collimator_leak <= 1,
            "blur_px": self.blur_px >= 0, "window": 0 <= self.window[0] < self.window[1] <= 100,
            "gamma": self.gamma > 0, "edge_enhancement": self.edge_enhancement >= 0,
            "edge_sigma_px": self.edge_sigma_px > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"realism setting '{name}' is out of range: {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["window"] = list(self.window)
        return values


def random_realism(rng: np.random.Generator, display_probability: float = 0.6) -> RealismSettings:
    """A random C-arm: beam, exposure, scatter, detector and display all drawn independently."""
    collimator = str(rng.choice(["none", "shutters", "iris"], p=[0.5, 0.25, 0.25]))
    return RealismSettings(
        kvp=float(rng.uniform(60.0, 115.0)),
        filtration_mm_al=float(rng.uniform(2.0, 5.0)),
        i0=float(np.exp(rng.uniform(np.log(2e3), np.log(1e5)))),
        heel=float(rng.uniform(0.0, 0.2)),
        heel_angle_deg=float(rng.uniform(0.0, 360.0)),
        flat_field=float(rng.uniform(0.0, 0.04)),
        scatter_to_primary=float(rng.uniform(0.1, 1.0)),
        scatter_sigma=float(rng.uniform(0.1, 0.3)),
        collimator=collimator,
        collimator_size=float(rng.uniform(0.8, 0.97) if collimator == "shutters" else rng.uniform(0.95, 1.2)),
        collimator_leak=float(rng.uniform(0.01, 0.08)),
        blur_px=float(rng.uniform(0.3, 1.2)),
        display=bool(rng.random() < display_probability),
        window=(float(rng.uniform(0.0, 5.0)), float(rng.uniform(95.0, 100.0))),
        gamma=float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))),
        edge_enhancement=float(rng.uniform(0.0, 1.5)),
        edge_sigma_px=float(rng.uniform(1.0, 4.0)),
        invert=bool(rng.random() < 0.3),
    )


def spectrum_weights(kvp: float, filtration_mm_al: float) -> np.ndarray:
    """Detected energy fraction per bin: Kramers (kVp - E), aluminium filter, energy-integrating detector."""
    widths = np.gradient(ENERGIES_KEV)
    photons = np.clip(kvp - ENERGIES_KEV, 0.0, None) * widths * np.exp(-MU_ALUMINIUM_BY_ENERGY * filtration_mm_al)
    energy = photons * ENERGIES_KEV
    return energy / energy.sum()


def polychromatic_transmission(water_mm: np.ndarray, bone_mm: np.ndarray, kvp: float,
                               filtration_mm_al: float) -> np.ndarray:
    """Fraction of the detected energy that crosses the object (0..1), beam hardening included."""
    weights = spectrum_weights(kvp, filtration_mm_al)
    water_mm, bone_mm = np.asarray(water_mm, np.float64), np.asarray(bone_mm, np.float64)
    result = np.zeros_like(water_mm)
    for weight, mu_water, mu_bone in zip(weights, MU_WATER_BY_ENERGY, MU_BONE_BY_ENERGY):
        if weight > 0:
            result += weight * np.exp(-mu_water * water_mm - mu_bone * bone_mm)
    return result


def _unit_coordinates(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates in [-1, 1] (pixel centres)."""
    rows, cols = shape
    v, u = np.meshgrid(np.linspace(-1.0, 1.0, rows), np.linspace(-1.0, 1.0, cols), indexing="ij")
    return v, u


def tube_output(shape: tuple[int, int], settings: RealismSettings, rng: np.random.Generator) -> np.ndarray:
    """Relative unattenuated intensity per pixel: heel ramp times a smooth flat-field gain (mean ~1)."""
    v, u = _unit_coordinates(shape)
    angle = np.radians(settings.heel_angle_deg)
    gain = 1.0 + 0.5 * settings.heel * (np.cos(angle) * u + np.sin(angle) * v)
    if settings.flat_field > 0:
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 0.15 * max(shape), mode="wrap")
        gain *= 1.0 + settings.flat_field * field / max(float(field.std()), 1e-12)
    return np.clip(gain, 0.05, None)


def collimator_mask(shape: tuple[int, int], settings: RealismSettings) -> np.ndarray:
    """Beam fraction per pixel: 1 in the open field, ``collimator_leak`` behind the blades (soft edge)."""
    if settings.collimator == "none":
        return np.ones(shape)
    v, u = _unit_coordinates(shape)
    if settings.collimator == "shutters":
        outside = np.maximum(np.abs(u), np.abs(v)) - settings.collimator_size
    else:
        outside = np.hypot(u, v) - settings.collimator_size
    edge = 2.0 / max(shape)  # about one pixel of penumbra
    open_fraction = np.clip(0.5 - outside / edge, 0.0, 1.0)
    return settings.collimator_leak + (1.0 - settings.collimator_leak) * open_fraction


def detector_counts(water_mm: np.ndarray, bone_mm: np.ndarray, settings: RealismSettings,
                    rng: np.random.Generator) -> np.ndarray:
    """Steps 1-6: detected photons per pixel (float32), unattenuated level ``settings.i0``."""
    settings.validate()
    water_mm = np.asarray(water_mm, np.float64)
    if water_mm.ndim != 2 or np.shape(bone_mm) != water_mm.shape:
        raise ValueError(f"path lengths must be two 2D arrays of one shape, got {water_mm.shape} and {np.shape(bone_mm)}")
    shape = water_mm.shape
    flood = settings.i0 * tube_output(shape, settings, rng)
    primary = flood * polychromatic_transmission(water_mm, bone_mm, settings.kvp, settings.filtration_mm_al)
    scattered = ndimage.gaussian_filter(flood - primary, settings.scatter_sigma * max(shape), mode="nearest")
    behind_object = primary < 0.9 * flood
    typical = float(np.median(scattered[behind_object] / primary[behind_object])) if behind_object.any() else 0.0
    scatter = settings.scatter_to_primary * scattered / typical if typical > 0 else np.zeros(shape)
    expected = (primary + scatter) * collimator_mask(shape, settings)
    counts = rng.poisson(np.maximum(expected, 0.0)).astype(np.float64)
    if settings.blur_px > 0:
        counts = ndimage.gaussian_filter(counts, settings.blur_px, mode="nearest")
    return counts.astype(np.float32)


def log_image(counts: np.ndarray, i0: float) -> np.ndarray:
    """-log(counts / i0) with counts floored at half a photon (dimensionless, float32)."""
    return (-np.log(np.maximum(np.asarray(counts, np.float64), 0.5) / i0)).astype(np.float32)


def display_image(counts: np.ndarray, settings: RealismSettings) -> np.ndarray:
    """Step 7: a C-arm display image in [0, 1] (bright = dense unless ``invert``), 12-bit quantized."""
    image = log_image(counts, settings.i0).astype(np.float64)
    # Like automatic exposure and windowing, measure in the central field, away from the collimator.
    rows, cols = image.shape
    central = image[rows // 5: rows - rows // 5, cols // 5: cols - cols // 5]
    low, high = np.percentile(central, settings.window)
    image = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0) ** settings.gamma
    if settings.edge_enhancement > 0:
        background = ndimage.gaussian_filter(image, settings.edge_sigma_px, mode="nearest")
        image = np.clip(image + settings.edge_enhancement * (image - background), 0.0, 1.0)
    if settings.invert:
        image = 1.0 - image
    return (np.round(image * DISPLAY_LEVELS) / DISPLAY_LEVELS).astype(np.float32)


def engine_view(counts: np.ndarray, settings: RealismSettings) -> np.ndarray:
    """What standardization receives: the display image, or -log(counts / i0) for a raw view."""
    return display_image(counts, settings) if settings.display else log_image(counts, settings.i0)


def realistic_view(water_mm: np.ndarray, bone_mm: np.ndarray, settings: RealismSettings,
                   rng: np.random.Generator) -> np.ndarray:
    """Steps 1-7 in one call: path lengths (mm) in, the engine's view of a real C-arm image out."""
    return engine_view(detector_counts(water_mm, bone_mm, settings, rng), settings)


@dataclass
class ScanGeometry:
    """C-arm views of one CT: projection matrices (LPS) and the material path lengths (mm) of every view."""

    roi: Roi
    projection_matrices: list[np.ndarray]
    water_mm: list[np.ndarray]
    bone_mm: list[np.ndarray]


def scan_geometry(ct: Volume, n_views: int = 20, detector_px: int = 128, seed: int = 0, roi: Roi | None = None,
                  device="cpu") -> ScanGeometry:
    """Poses and detector as :func:`ixgs.simulate.simulate_scan` draws them (same seed, same poses), with
    the path lengths through the CT (HU) that both the realistic views and the targets need."""
    rng = np.random.default_rng(seed)
    roi = bone_roi(ct) if roi is None else roi
    poses = random_c_arm_poses(n_views, rng)
    spacing = fitting_pixel_spacing(poses, roi, detector_px)
    shape = (detector_px, detector_px)
    geometry = ScanGeometry(roi, [], [], [])
    for pose in poses:
        P = pose.projection_matrix(shape, (spacing, spacing), roi.center)
        water_mm, bone_mm = material_path_lengths(ct, P, shape, device)
        geometry.projection_matrices.append(P)
        geometry.water_mm.append(water_mm)
        geometry.bone_mm.append(bone_mm)
    return geometry


def write_realistic_scan(out_dir: str | os.PathLike, geometry: ScanGeometry, settings: RealismSettings,
                         seed: int = 0, reference: Volume | None = None, exposure_jitter: float = 0.3) -> Path:
    """A scan from one realistic C-arm: each view's ``i0`` varies by up to ``exposure_jitter`` (automatic
    exposure control), flat field and noise differ per view. Raw settings write a transmission scan
    calibrated with the nominal ``i0`` (so exposure changes stay in the data), display settings an
    attenuation scan of display images."""
    settings.validate()
    rng = np.random.default_rng(seed)
    images = []
    for water_mm, bone_mm in zip(geometry.water_mm, geometry.bone_mm):
        view = replace(settings, i0=settings.i0 * float(rng.uniform(1 - exposure_jitter, 1 + exposure_jitter)))
        counts = detector_counts(water_mm, bone_mm, view, rng)
        images.append(display_image(counts, view) if settings.display else counts)
    return write_scan(out_dir, images, geometry.projection_matrices,
                      intensity="attenuation" if settings.display else "transmission",
                      i0=None if settings.display else settings.i0, roi=geometry.roi, reference=reference)


def simulate_realistic_scan(ct: Volume, out_dir: str | os.PathLike, settings: RealismSettings,
                            n_views: int = 20, detector_px: int = 128, seed: int = 0, roi: Roi | None = None,
                            device="cpu") -> Path:
    """:func:`scan_geometry` then :func:`write_realistic_scan`, with the CT's attenuation on the ROI as the
    reference volume (as :func:`ixgs.simulate.simulate_scan` writes it)."""
    geometry = scan_geometry(ct, n_views, detector_px, seed, roi, device)
    attenuation = hu_to_attenuation(torch.as_tensor(np.asarray(ct.array, np.float32), device=device))
    reference = reference_volume(attenuation, ct.grid, geometry.roi, max(1.0, float(min(ct.grid.spacing))))
    return write_realistic_scan(out_dir, geometry, settings, seed, reference)
