"""The standardization target: a bone-enhanced DRR, defined here and nowhere else.

Every CT voxel (HU) is split into two basis materials, water-like soft tissue and cortical bone,
so that at the engine's reference energy (~60 keV) their attenuation adds up to exactly
:func:`ixgs.phantom.hu_to_attenuation`::

    bone  = max(HU, 0) / CORTICAL_BONE_HU                 (volume fraction of cortical bone)
    water = 1 + min(HU, 0) / 1000 - bone, never negative   (water-equivalent density fraction)
    mu_60 = MU_WATER * water + MU_BONE * bone = MU_WATER * (1 + HU / 1000)

The realism simulator uses the same two path lengths (water-equivalent mm, bone mm) with
energy-dependent coefficients; the target uses them at 60 keV with soft tissue weighted down and
bone weighted up::

    target = SOFT_TISSUE_WEIGHT * MU_WATER * water_mm + BONE_WEIGHT * MU_BONE * bone_mm

Scale (what the reconstruction gets): the target is the exact line integral (mm x 1/mm) of the
*bone-enhanced attenuation* volume :func:`target_attenuation` (1/mm), which is linear in the CT. So a
standardized scan is consistent with the forward model, and reconstructing it yields that volume:
soft tissue at half, bone at 1.5 times its 60 keV attenuation. Evaluate such a reconstruction against
``target_attenuation(CT)``; compare against the plain attenuation only knowing the weights differ.
Every view is normalized the same way (a fixed constant, :data:`TARGET_SCALE`), never per image, so
views keep agreeing with each other.
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import normalize_projection_matrix, view_rays
from ..phantom import MU_WATER_PER_MM
from ..projector import forward_project
from ..volume import Volume

# Cortical bone (ICRU 44, 1.92 g/cm3) at 60 keV: 0.3148 cm2/g -> 1/mm; water: the engine's value.
MU_BONE_PER_MM = 0.3148 * 1.92 / 10.0
CORTICAL_BONE_HU = 1000.0 * (MU_BONE_PER_MM / MU_WATER_PER_MM - 1.0)  # about 1934 HU

SOFT_TISSUE_WEIGHT = 0.5
BONE_WEIGHT = 1.5
# Line integral (mm x 1/mm) mapped to the top of the network's output range; targets of the
# generated data stay below about 6 (a lateral view through a 33 cm torso).
TARGET_SCALE = 8.0


def material_fractions(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(water, bone) volume fractions of CT voxels (HU); see the module docstring."""
    hu = np.asarray(hu, dtype=np.float32)
    bone = np.maximum(hu, 0.0) / np.float32(CORTICAL_BONE_HU)
    water = np.maximum(1.0 + np.minimum(hu, 0.0) / 1000.0 - bone, 0.0)
    return water.astype(np.float32), bone.astype(np.float32)


def target_from_path_lengths(water_mm: np.ndarray, bone_mm: np.ndarray) -> np.ndarray:
    """Bone-enhanced line integrals (float32, mm x 1/mm) from water-equivalent and bone path lengths (mm)."""
    target = SOFT_TISSUE_WEIGHT * MU_WATER_PER_MM * np.asarray(water_mm, np.float64) \
        + BONE_WEIGHT * MU_BONE_PER_MM * np.asarray(bone_mm, np.float64)
    return target.astype(np.float32)


def target_attenuation(hu: np.ndarray) -> np.ndarray:
    """The bone-enhanced attenuation (1/mm) whose line integrals are the target (same shape as ``hu``)."""
    water, bone = material_fractions(hu)
    return (SOFT_TISSUE_WEIGHT * MU_WATER_PER_MM * water + BONE_WEIGHT * MU_BONE_PER_MM * bone).astype(np.float32)


def target_volume(ct: Volume) -> Volume:
    """:func:`target_attenuation` of a CT (HU) on the same grid: the reference for standardized reconstructions."""
    return Volume(target_attenuation(ct.array), ct.origin, ct.spacing, ct.direction)


def material_path_lengths(ct: Volume, projection_matrix: np.ndarray, shape: tuple[int, int],
                          device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Water-equivalent and bone path lengths (mm, float32 ``shape``) through an axis-aligned CT (HU)."""
    if not np.allclose(np.asarray(ct.direction, float), np.eye(3), atol=1e-6):
        raise ValueError("the CT must be axis-aligned (identity direction); resample it first")
    grid = ct.grid
    P = normalize_projection_matrix(projection_matrix, np.asarray(grid.roi.center))
    rays = view_rays(P, shape, device=device)
    lengths = []
    with torch.no_grad():
        for fraction in material_fractions(ct.array):
            volume = torch.as_tensor(fraction, device=device)
            lengths.append(forward_project(volume, grid, rays).cpu().numpy().astype(np.float32))
    return lengths[0], lengths[1]


def bone_enhanced_drr(ct: Volume, projection_matrix: np.ndarray, shape: tuple[int, int], device="cpu") -> np.ndarray:
    """The target view (float32 ``shape``, mm x 1/mm) of a CT (HU) for one projection matrix."""
    return target_from_path_lengths(*material_path_lengths(ct, projection_matrix, shape, device))


def normalize_target(target: np.ndarray) -> np.ndarray:
    """Line integrals to the network's range [-1, 1] with the fixed :data:`TARGET_SCALE` (same for every view)."""
    return (np.clip(np.asarray(target, np.float32) / TARGET_SCALE, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def denormalize_target(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize_target`: [-1, 1] back to non-negative line integrals (mm x 1/mm)."""
    return ((np.clip(np.asarray(values, np.float32), -1.0, 1.0) + 1.0) * 0.5 * TARGET_SCALE).astype(np.float32)
