"""Radiographs as MRML nodes, standardized by the engine, written back as a scan.

A view is shown as a single-slice scalar volume (pixel = 1 x 1 mm, an image, not a place in the
patient); its projection matrix (LPS, the engine's) and origin travel as node attributes, so
standardized nodes can be written as a scan with the same geometry.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import slicer

from ixgs.scan import read_scan, transmission_to_attenuation, write_scan
from ixgs.standardize import ClassicalSettings, standardize_image

PROJECTION_MATRIX_ATTRIBUTE = "IXGS.ProjectionMatrixLPS"
SCAN_ATTRIBUTE = "IXGS.Scan"
METHODS = ("classical", "pix2pix")


def available_methods() -> list[str]:
    """Methods this engine provides: pix2pix only when its module is installed."""
    learned = importlib.util.find_spec("ixgs.standardize.pix2pix") is not None
    return ["classical", "pix2pix"] if learned else ["classical"]


def radiograph_nodes_from_scan(scan_path: str | os.PathLike) -> list:
    """One single-slice volume node per view (attenuation line integrals), geometry in attributes."""
    scan = read_scan(scan_path)
    nodes = []
    for index, view in enumerate(scan.views):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                  f"{Path(scan.path).name} view {index:03d}")
        slicer.util.updateVolumeFromArray(node, view.image[np.newaxis].astype(np.float32))
        # Column i towards the patient's left and row j towards posterior: the axial view then shows
        # the image as stored (row 0 at the top, column 0 at the left), not mirrored.
        node.SetIJKToRASDirections(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
        node.SetAttribute(PROJECTION_MATRIX_ATTRIBUTE, json.dumps(np.asarray(view.projection_matrix).tolist()))
        node.SetAttribute(SCAN_ATTRIBUTE, str(scan.path))
        node.CreateDefaultDisplayNodes()
        nodes.append(node)
    return nodes


def node_image(node) -> np.ndarray:
    """The 2D image of a single-slice volume node."""
    array = slicer.util.arrayFromVolume(node)
    if array.ndim != 3 or array.shape[0] != 1:
        raise ValueError(f"node {node.GetName()!r} is not a 2D radiograph (shape {array.shape})")
    return np.asarray(array[0], dtype=np.float32)


def standardize_array(image: np.ndarray, method: str, settings: ClassicalSettings | None = None,
                      intensity: str = "attenuation") -> np.ndarray:
    """One radiograph through the chosen method; ``intensity="transmission"`` applies -log first."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if intensity == "transmission":
        image = transmission_to_attenuation(image, None, "radiograph")
    elif intensity != "attenuation":
        raise ValueError(f"intensity must be 'attenuation' or 'transmission', got {intensity!r}")
    if method == "classical":
        return standardize_image(image, settings or ClassicalSettings())
    if method not in available_methods():
        raise ValueError("pix2pix standardization is not installed in this engine; use 'classical'")
    learned = importlib.import_module("ixgs.standardize.pix2pix")
    return np.asarray(learned.standardize_image(image), dtype=np.float32)


def standardize_nodes(nodes: list, method: str = "classical", settings: ClassicalSettings | None = None,
                      intensity: str = "attenuation") -> list:
    """New nodes '<name> standardized' next to the originals, keeping their geometry attributes.

    Every image is computed before any node is added, so a failure leaves the scene unchanged.
    """
    images = [standardize_array(node_image(node), method, settings, intensity) for node in nodes]
    outputs = []
    for node, image in zip(nodes, images):
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{node.GetName()} standardized")
        slicer.util.updateVolumeFromArray(output, image[np.newaxis])
        output.CopyOrientation(node)
        for attribute in (PROJECTION_MATRIX_ATTRIBUTE, SCAN_ATTRIBUTE):
            if node.GetAttribute(attribute):
                output.SetAttribute(attribute, node.GetAttribute(attribute))
        output.CreateDefaultDisplayNodes()
        outputs.append(output)
    return outputs


def write_scan_from_nodes(nodes: list, output_path: str | os.PathLike) -> Path:
    """A scan (attenuation) from radiograph nodes that carry projection matrices; ROI from their source scan."""
    matrices = []
    for node in nodes:
        text = node.GetAttribute(PROJECTION_MATRIX_ATTRIBUTE)
        if not text:
            raise ValueError(f"node {node.GetName()!r} has no projection matrix; load its views from a scan folder")
        matrices.append(np.asarray(json.loads(text), dtype=np.float64))
    sources = {node.GetAttribute(SCAN_ATTRIBUTE) for node in nodes if node.GetAttribute(SCAN_ATTRIBUTE)}
    roi = read_scan(sources.pop()).roi if len(sources) == 1 else None
    return write_scan(output_path, [node_image(node) for node in nodes], matrices, intensity="attenuation", roi=roi)
