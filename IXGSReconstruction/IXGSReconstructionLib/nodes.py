"""Engine objects (LPS, numpy) to MRML nodes (RAS) and back, and how the results are displayed.

Slicer's world is RAS; the engine's is LPS. A point changes frame by negating x and y
(``LPS_RAS_FLIP``), so a volume's IJK-to-RAS matrix is ``diag(-1, -1, 1) @ direction @ diag(spacing)``
with origin ``(-x, -y, z)``. Everything here takes and returns MRML nodes and needs no Qt.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from ixgs import metrics
from ixgs.geometry import LPS_RAS_FLIP, Roi, project_points, source_position
from ixgs.volume import Volume

FLIP3 = LPS_RAS_FLIP[:3, :3]
BONE_SEGMENT_NAME = "Bone"
BONE_COLOR = (0.95, 0.92, 0.8)


def ijk_to_ras_matrix(volume: Volume) -> np.ndarray:
    """4x4 IJK-to-RAS matrix (mm) of an engine volume."""
    matrix = np.eye(4)
    matrix[:3, :3] = FLIP3 @ np.asarray(volume.direction, float) @ np.diag(np.asarray(volume.spacing, float))
    matrix[:3, 3] = FLIP3 @ np.asarray(volume.origin, float)
    return matrix


def volume_node_from_volume(volume: Volume, name: str, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``slicer.mrmlScene`` holding a copy of ``volume`` with its geometry."""
    node = slicer.mrmlScene.AddNewNodeByClass(node_class, name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_matrix(volume)))
    node.CreateDefaultDisplayNodes()
    return node


def volume_from_node(node) -> Volume:
    """The engine (LPS) view of a volume node; a parent transform, if any, is not applied."""
    if node is None or node.GetImageData() is None:
        raise ValueError("volume node is empty (no image data)")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_lps = LPS_RAS_FLIP @ slicer.util.arrayFromVTKMatrix(matrix)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    array = slicer.util.arrayFromVolume(node).copy()
    return Volume(array, tuple(ijk_to_lps[:3, 3]), tuple(spacing), direction)


def remove_nodes(nodes: list) -> None:
    """Remove nodes with their display nodes (bare MRML does not cascade), leaving the scene as before."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        display_nodes = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())] \
            if hasattr(node, "GetNumberOfDisplayNodes") else []
        for display in display_nodes:
            if display is not None:
                slicer.mrmlScene.RemoveNode(display)
        slicer.mrmlScene.RemoveNode(node)


def roi_node_from_roi(roi: Roi, node=None, name: str = "IXGS ROI"):
    """Show (or update) an axis-aligned LPS ROI as an editable markups ROI node."""
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    center = FLIP3 @ np.asarray(roi.center, float)
    node.SetCenter(*center)
    node.SetSize(*[float(s) for s in roi.size])
    return node


def roi_from_roi_node(node) -> Roi:
    """The LPS box of a markups ROI node (its world-axis-aligned bounds, so rotated ROIs stay covered)."""
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    lower_ras, upper_ras = np.array(bounds[0::2]), np.array(bounds[1::2])
    size = upper_ras - lower_ras
    if np.any(size <= 0):
        raise ValueError(f"ROI node {node.GetName()!r} has an empty size {size.tolist()}")
    center = FLIP3 @ (0.5 * (lower_ras + upper_ras))
    return Roi(tuple(center.tolist()), tuple(size.tolist()))


def otsu_threshold(volume_node) -> float:
    """The engine's Otsu bone threshold (1/mm) of a volume node."""
    values = slicer.util.arrayFromVolume(volume_node)
    if values.size < 2 or values.min() == values.max():
        raise ValueError(f"volume {volume_node.GetName()!r} has no contrast to threshold")
    return metrics.otsu_threshold(values)


def register_closed_surface_conversion() -> None:
    """Slicer registers these rules at startup; bare MRML (slicer-core, tests) needs them added once."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    names = {(rule.GetSourceRepresentationName(), rule.GetTargetRepresentationName())
             for rule in factory.GetConverterRules()}
    if ("Binary labelmap", "Closed surface") not in names:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    if ("Closed surface", "Binary labelmap") not in names:
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def bone_segmentation(volume_node, threshold: float, segmentation_node=None):
    """Segment ``volume >= threshold`` (1/mm) as one 'Bone' segment shown as a closed surface in 3D.

    Reusing ``segmentation_node`` replaces its 'Bone' segment, so a threshold slider can call this repeatedly.
    """
    register_closed_surface_conversion()
    mask = (slicer.util.arrayFromVolume(volume_node) >= threshold).astype(np.uint8)
    if segmentation_node is None:
        segmentation_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                               f"{volume_node.GetName()} bone")
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    old_id = segmentation.GetSegmentIdBySegmentName(BONE_SEGMENT_NAME)
    if old_id:
        segmentation.RemoveSegment(old_id)
    label_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", BONE_SEGMENT_NAME)
    try:
        slicer.util.updateVolumeFromArray(label_node, mask)
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(ijk_to_ras)
        label_node.SetIJKToRASMatrix(ijk_to_ras)
        before = {segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())}
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, segmentation_node):
            raise RuntimeError(f"could not segment {volume_node.GetName()!r} at {threshold} /mm")
    finally:
        slicer.mrmlScene.RemoveNode(label_node)
    added = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())
             if segmentation.GetNthSegmentID(n) not in before]
    if not added:  # an empty mask imports no segment: keep an empty one so the node stays usable
        added = [segmentation.AddEmptySegment(BONE_SEGMENT_NAME)]
    segment = segmentation.GetSegment(added[0])
    segment.SetName(BONE_SEGMENT_NAME)
    segment.SetColor(*BONE_COLOR)
    if not segmentation_node.CreateClosedSurfaceRepresentation():
        raise RuntimeError("closed surface conversion is unavailable in this Slicer build")
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetPreferredDisplayRepresentationName3D("Closed surface")
        display.SetVisibility3D(True)
    return segmentation_node


def segment_mask(segmentation_node, volume_node, segment_name: str = BONE_SEGMENT_NAME) -> np.ndarray:
    """The segment as a uint8 [k, j, i] array on ``volume_node``'s grid."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} has no {segment_name!r} segment")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    label_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__mask__")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, label_node, volume_node):
            raise RuntimeError(f"could not export segment {segment_name!r}")
        return (slicer.util.arrayFromVolume(label_node) > 0).astype(np.uint8)
    finally:
        slicer.mrmlScene.RemoveNode(label_node)


def bone_volume_property(threshold: float, maximum: float, node=None):
    """A bone transfer function (1/mm): transparent below ``threshold``, opaque ivory towards ``maximum``.

    Built here because Slicer's named presets need its share folder, which batch MRML lacks.
    """
    if not maximum > threshold:
        raise ValueError(f"volume maximum {maximum} must exceed the bone threshold {threshold}")
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumePropertyNode", "IXGS bone")
    opacity = vtk.vtkPiecewiseFunction()
    opacity.AddPoint(0.0, 0.0)
    opacity.AddPoint(threshold * 0.8, 0.0)
    opacity.AddPoint(threshold, 0.15)
    opacity.AddPoint(maximum, 0.85)
    color = vtk.vtkColorTransferFunction()
    color.AddRGBPoint(threshold * 0.8, 0.55, 0.25, 0.15)
    color.AddRGBPoint(threshold, 0.9, 0.82, 0.68)
    color.AddRGBPoint(maximum, 1.0, 1.0, 0.95)
    volume_property = node.GetVolumeProperty()
    volume_property.SetScalarOpacity(opacity)
    volume_property.SetColor(color)
    volume_property.ShadeOn()
    volume_property.SetInterpolationTypeToLinear()
    return node


def _volume_rendering_logic():
    """The application's logic in Slicer (its rendering method settings); a bare one on plain MRML."""
    module = getattr(getattr(slicer, "modules", None), "volumerendering", None)
    if module is not None:
        return module.logic()
    logic = slicer.vtkSlicerVolumeRenderingLogic()
    logic.SetMRMLScene(slicer.mrmlScene)
    return logic


def show_volume_rendering(volume_node, threshold: float):
    """Volume rendering of ``volume_node`` with the bone transfer function; returns the display node."""
    logic = _volume_rendering_logic()
    display = logic.GetFirstVolumeRenderingDisplayNode(volume_node)
    if display is None:
        display = logic.CreateDefaultVolumeRenderingNodes(volume_node)
    maximum = float(slicer.util.arrayFromVolume(volume_node).max())
    bone_volume_property(threshold, maximum, display.GetVolumePropertyNode())
    display.SetVisibility(True)
    return display


def view_poses_nodes(projection_matrices: list[np.ndarray], shapes: list[tuple[int, int]],
                     roi_center_lps: np.ndarray, name: str = "IXGS views"):
    """X-ray sources as a fiducial list and each detector as a quadrilateral in one model node (RAS).

    A detector is drawn where the image's corner rays reach twice the depth of the ROI centre, i.e. a
    virtual detector as far behind the object as the source is in front (a typical C-arm layout).
    Matrices must be normalised (``w`` = depth in mm), as :func:`ixgs.scan.read_scan` returns them.
    """
    sources = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} sources")
    points = vtk.vtkPoints()
    cells = vtk.vtkCellArray()
    for index, (matrix, (rows, cols)) in enumerate(zip(projection_matrices, shapes)):
        P = np.asarray(matrix, float)
        source = source_position(P)
        sources.AddControlPoint(FLIP3 @ source, f"S{index}")
        detector_depth_mm = 2.0 * float(project_points(P, np.asarray(roi_center_lps, float))[2])
        ids = []
        for u, v in ((-0.5, -0.5), (cols - 0.5, -0.5), (cols - 0.5, rows - 0.5), (-0.5, rows - 0.5)):
            direction = np.linalg.solve(P[:, :3], np.array([u, v, 1.0]))
            direction *= detector_depth_mm / (P[2, :3] @ direction)
            ids.append(points.InsertNextPoint(*(FLIP3 @ (source + direction))))
        cells.InsertNextCell(4, ids)
    polydata = vtk.vtkPolyData()
    polydata.SetPoints(points)
    polydata.SetPolys(cells)
    detectors = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLModelNode", f"{name} detectors")
    detectors.SetAndObservePolyData(polydata)
    detectors.CreateDefaultDisplayNodes()
    detectors.GetDisplayNode().SetOpacity(0.4)
    return sources, detectors
