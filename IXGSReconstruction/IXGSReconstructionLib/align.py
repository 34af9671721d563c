"""'Align to anatomy': a rigid transform that turns the result so axial slices follow the patient.

Two sources of the patient axes: the principal axes of the bone mask (no user input; the signed
permutation of the axes closest to the current orientation is chosen, so the turn is the smallest
one that straightens the anatomy), or three points the user places (inferior, superior, anterior).
The transform is returned as a 4x4 RAS matrix (and set on a linear transform node) rotating about
the anatomy's centre; the data is not resampled, so the user can harden or undo it.
"""
from __future__ import annotations

import itertools

import numpy as np
import slicer
import vtk

from .nodes import segment_mask


def _signed_permutations() -> list[np.ndarray]:
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[list(perm), list(range(3))] = signs
            out.append(matrix)
    return out


def principal_axes_alignment(mask_kji: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """4x4 RAS transform mapping the mask's principal axes onto the world axes, about its centroid."""
    indices = np.argwhere(np.asarray(mask_kji) > 0)[:, ::-1].astype(float)  # (i, j, k)
    if len(indices) < 4:
        raise ValueError("the bone mask has fewer than 4 voxels; lower the threshold")
    points = indices @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
    centre = points.mean(axis=0)
    _, axes = np.linalg.eigh(np.cov((points - centre).T))
    axes = axes[:, ::-1]  # largest variance first
    # Among the proper (det +1) signed reorderings of the axes, the one nearest identity is the smallest turn.
    candidates = [axes @ perm for perm in _signed_permutations()]
    best = max((basis for basis in candidates if np.linalg.det(basis) > 0), key=np.trace)
    return _rotation_about(best.T, centre)


def landmark_alignment(inferior_ras, superior_ras, anterior_ras) -> np.ndarray:
    """4x4 RAS transform from three user points: inferior->superior becomes S, the anterior point A."""
    inferior, superior, anterior = (np.asarray(p, float) for p in (inferior_ras, superior_ras, anterior_ras))
    s_axis = superior - inferior
    if np.linalg.norm(s_axis) < 1e-6:
        raise ValueError("inferior and superior points coincide")
    s_axis /= np.linalg.norm(s_axis)
    centre = 0.5 * (inferior + superior)
    a_axis = anterior - centre
    a_axis -= (a_axis @ s_axis) * s_axis
    if np.linalg.norm(a_axis) < 1e-6:
        raise ValueError("the anterior point lies on the inferior-superior line")
    a_axis /= np.linalg.norm(a_axis)
    r_axis = np.cross(a_axis, s_axis)
    basis = np.stack([r_axis, a_axis, s_axis], axis=1)  # columns: patient R, A, S in current RAS
    return _rotation_about(basis.T, centre)


def _rotation_about(rotation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre
    return matrix


def alignment_from_segmentation(segmentation_node, volume_node) -> np.ndarray:
    """Principal-axes alignment of the 'Bone' segment, on the volume's grid."""
    mask = segment_mask(segmentation_node, volume_node)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return principal_axes_alignment(mask, slicer.util.arrayFromVTKMatrix(ijk_to_ras))


def apply_alignment(matrix_ras: np.ndarray, nodes: list, transform_node=None, name: str = "IXGS anatomy alignment"):
    """Put ``matrix_ras`` on a linear transform node and make ``nodes`` its children."""
    if transform_node is None:
        transform_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    transform_node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix_ras))
    for node in nodes:
        if node is not None:
            node.SetAndObserveTransformNodeID(transform_node.GetID())
    return transform_node
