"""Per-view pose refinement: small rigid corrections (6 DoF) learned from the images themselves.

A C-arm's poses are known only roughly (encoder angles, a sagging gantry). Each view ``v`` gets a
rigid motion ``T_v`` of the world (LPS, mm) about the ROI centre ``c``:

    T_v X = R_v (X - c) + c + t_v,        corrected projection matrix  P_v' = P_v T_v,

so the corrected view sees at a pixel what the calibrated view saw of the moved point. The rotation
is parametrised by a rotation vector scaled to millimetres at ``lever_mm`` from the centre (an arc
length), so one learning rate suits both halves of the 6-vector.

A motion shared by all views (the patient moving as a whole) changes nothing in the images but moves
the reconstruction, so it cannot be learned: :meth:`PoseCorrections.remove_common_motion` keeps the
mean correction at zero, and the reconstruction stays in the frame of the calibrated poses.

The corrections are learned jointly with the Gaussians (:func:`ixgs.splat.render` takes the pose;
the trainer in :mod:`ixgs.reconstruct`). Each view's correction is its own parameter, so an
optimiser that skips parameters without a gradient updates only the view just rendered.
"""
from __future__ import annotations

import math
import numpy as np
import torch
from torch import nn

from .geometry import ViewRays, project_points



def skew(vectors: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) cross-product matrices of (..., 3) vectors."""
    zero = torch.zeros_like(vectors[..., 0])
    x, y, z = vectors.unbind(-1)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*vectors.shape[:-1], 3, 3)


class PoseCorrections(nn.Module):
    """Rigid corrections of ``n_views`` views about ``center`` (mm), all zero to begin with."""

    def __init__(self, n_views: int, center, lever_mm: float):
        super().__init__()
        if n_views < 1:
            raise ValueError(f"pose corrections need at least one view, got {n_views}")
        if not lever_mm > 0:
            raise ValueError(f"lever_mm must be positive, got {lever_mm}")
        self.lever_mm = float(lever_mm)
        # Per view (6,): rotation vector x lever (mm of arc), translation (mm).
        self.per_view = nn.ParameterList([nn.Parameter(torch.zeros(6)) for _ in range(n_views)])
        self.register_buffer("center", torch.as_tensor(np.asarray(center, float), dtype=torch.float32))

    def __len__(self) -> int:
        return len(self.per_view)

    @property
    def parameters_mm(self) -> torch.Tensor:
        """(n, 6) all corrections: rotation vector x lever (mm of arc), translation (mm)."""
        return torch.stack(list(self.per_view))

    @property
    def rotation_vectors(self) -> torch.Tensor:
        """(n, 3) rotation vectors in radians."""
        return self.parameters_mm[:, :3] / self.lever_mm

    @property
    def translations_mm(self) -> torch.Tensor:
        return self.parameters_mm[:, 3:]

    def matrix(self, index: int) -> torch.Tensor:
        """(4, 4) ``T_v`` of view ``index``, differentiable in its parameters."""
        values = self.per_view[index]
        rotation = torch.linalg.matrix_exp(skew(values[:3] / self.lever_mm))
        translation = self.center + values[3:] - rotation @ self.center
        top = torch.cat([rotation, translation[:, None]], dim=1)
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=top.dtype, device=top.device)
        return torch.cat([top, bottom], dim=0)

    @torch.no_grad()
    def remove_common_motion(self) -> None:
        """Keep the mean correction at zero (the motion all views share is not observable)."""
        if len(self) > 1:
            mean = self.parameters_mm.mean(dim=0)
            for values in self.per_view:
                values -= mean

    @torch.no_grad()
    def corrected_matrix(self, index: int, projection_matrix: np.ndarray) -> np.ndarray:
        """``P_v T_v`` (3, 4), float64."""
        return np.asarray(projection_matrix, float) @ self.matrix(index).double().cpu().numpy()

    @torch.no_grad()
    def report(self) -> list[dict]:
        """Per view: rotation vector and angle (degrees), translation (mm) and the largest
        displacement (mm) the correction gives a point ``lever_mm`` from the centre."""
        rows = []
        for rotation, translation in zip(self.rotation_vectors.cpu().double(), self.translations_mm.cpu().double()):
            angle = float(rotation.norm())
            rows.append({
                "rotation_deg": [round(math.degrees(float(r)), 4) for r in rotation],
                "angle_deg": round(math.degrees(angle), 4),
                "translation_mm": [round(float(t), 4) for t in translation],
                "max_displacement_mm": round(float(translation.norm()) + angle * self.lever_mm, 4),
            })
        return rows


def transform_rays(rays: ViewRays, pose: torch.Tensor) -> ViewRays:
    """The rays of ``P @ pose`` in the world: ``pose^-1`` applied to the source and the directions.

    Differentiable in ``pose``; used to look through a voxel volume with a corrected view."""
    pose = pose.to(rays.directions.device, rays.directions.dtype)
    rotation, translation = pose[:3, :3], pose[:3, 3]
    return ViewRays(
        source=rotation.T @ (rays.source - translation),
        directions=rays.directions @ rotation,  # rows: R^T d
        projection_matrix=rays.projection_matrix @ pose.detach(),
    )


def projection_displacement_px(projection_matrix: np.ndarray, other: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (pixels) between the projections of ``points`` (n, 3) by two matrices: how far
    apart two poses put the anatomy on the detector, the pose error that matters for reconstruction."""
    first = project_points(projection_matrix, points)[:, :2]
    second = project_points(other, points)[:, :2]
    return float(np.linalg.norm(first - second, axis=1).mean())
