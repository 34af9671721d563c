"""Compare a reconstruction with a reference CT: optional rigid registration, then 3D metrics.

Metrics are the engine's (:func:`ixgs.metrics.evaluate`: PSNR, SSIM, bone Dice on the CT's grid),
so numbers in Slicer match ``report.json`` and the benchmarks. A CT in Hounsfield units is converted
to 1/mm with the engine's :func:`ixgs.phantom.hu_to_attenuation` first.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer

from ixgs.metrics import evaluate
from ixgs.phantom import hu_to_attenuation
from ixgs.volume import Volume

from .nodes import FLIP3, volume_from_node

# Below this a CT holds Hounsfield units (air -1000), not 1/mm (never negative).
HU_DETECTION_MINIMUM = -200.0
METRIC_COLUMNS = ("reconstruction", "reference", "registered", "psnr_db", "ssim", "dice", "bone_threshold_per_mm")


def reference_attenuation(reference: Volume) -> Volume:
    """The reference in 1/mm; Hounsfield units are recognised by their air values."""
    if float(np.min(reference.array)) < HU_DETECTION_MINIMUM:
        array = hu_to_attenuation(np.asarray(reference.array, np.float32)).astype(np.float32)
        return Volume(array, reference.origin, reference.spacing, reference.direction)
    return reference


def rigid_registration(fixed: Volume, moving: Volume, iterations: int = 100) -> sitk.Euler3DTransform:
    """Euler (rigid) transform mapping ``fixed`` LPS points onto ``moving`` ones (ITK's convention).

    Mattes mutual information tolerates the intensity differences of a sparse-view reconstruction.
    """
    fixed_image = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    moving_image = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=0)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed_image, moving_image)
    return sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0))


def transform_matrix_lps(transform: sitk.Euler3DTransform) -> np.ndarray:
    """4x4 of ``y = A (x - c) + c + t``."""
    A = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3] = A
    matrix[:3, 3] = c + t - A @ c
    return matrix


def lps_to_ras_transform(matrix_lps: np.ndarray) -> np.ndarray:
    flip = np.diag([*np.diag(FLIP3), 1.0])
    return flip @ matrix_lps @ flip


def compare_volumes(reconstruction: Volume, reference: Volume, register: bool = False,
                    bone_threshold: float | None = None) -> tuple[dict, np.ndarray | None]:
    """Metrics of ``reconstruction`` against ``reference`` (CT grid), and, when registering, the
    4x4 RAS transform that brings the reconstruction onto the CT (Slicer's "to parent")."""
    reference = reference_attenuation(reference)
    if not register:
        return evaluate(reconstruction, reference, bone_threshold), None
    transform = rigid_registration(reference, reconstruction)  # CT points -> reconstruction points
    resampled = sitk.Resample(reconstruction.to_sitk(), reference.to_sitk(), transform, sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    registered = Volume(sitk.GetArrayFromImage(resampled), reference.origin, reference.spacing, reference.direction)
    to_ct_lps = np.linalg.inv(transform_matrix_lps(transform))
    return evaluate(registered, reference, bone_threshold), lps_to_ras_transform(to_ct_lps)


def compare_nodes(reconstruction_node, reference_node, register: bool = False, bone_threshold: float | None = None,
                  table_node=None):
    """Compare two volume nodes, append a row to a metrics table node, and (when registering) put the
    reconstruction under a new transform node that aligns it with the CT. Returns (metrics, table, transform)."""
    metrics, matrix_ras = compare_volumes(volume_from_node(reconstruction_node), volume_from_node(reference_node),
                                          register, bone_threshold)
    transform_node = None
    if matrix_ras is not None:
        transform_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode",
                                                            f"{reconstruction_node.GetName()} to CT")
        transform_node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix_ras))
        reconstruction_node.SetAndObserveTransformNodeID(transform_node.GetID())
    table_node = append_metrics_row(metrics, reconstruction_node.GetName(), reference_node.GetName(), register,
                                    table_node)
    return metrics, table_node, transform_node


def append_metrics_row(metrics: dict, reconstruction_name: str, reference_name: str, registered: bool,
                       table_node=None):
    """One row per comparison in a ``vtkMRMLTableNode`` (created with its columns when None)."""
    if table_node is None:
        table_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "IXGS metrics")
    if table_node.GetNumberOfColumns() == 0:
        for name in METRIC_COLUMNS:
            table_node.AddColumn().SetName(name)
    values = (reconstruction_name, reference_name, "yes" if registered else "no", f"{metrics['psnr']:.3f}",
              f"{metrics['ssim']:.4f}", f"{metrics['dice']:.4f}", f"{metrics['bone_threshold']:.5f}")
    row = table_node.AddEmptyRow()
    for column, value in enumerate(values):
        table_node.SetCellText(row, column, value)
    return table_node
