"""Off-screen 3D pictures of the bone surface with VTK (optional: ``pip install "ixgs[render]"``).

The surface is scikit-image's marching cubes of the attenuation at the bone threshold, i.e. the
boundary of ``bone.nrrd``. VTK draws it without a display: its wheels pick the OpenGL window at
run time (X when a display is set, else EGL, else OSMesa); with no display we ask for EGL first,
which needs only the system's ``libEGL`` (Mesa's software renderer works).
"""
from __future__ import annotations

import os
import sys

import numpy as np
from skimage.measure import marching_cubes

from .volume import Volume

BONE_RGB = (0.93, 0.89, 0.80)
SOURCE_RGB = (1.0, 0.55, 0.1)
BACKGROUND_RGB = (0.08, 0.09, 0.13)
# Rendered at this multiple of the requested size and averaged down: anti-aliasing that works on
# every OpenGL (VTK's FXAA reads back black on Mesa's EGL).
SUPERSAMPLING = 2
# Camera directions (LPS, from the bone towards the camera): x = patient's left, y = posterior.
CLOSE_UPS = {
    "AP (from anterior; patient's right on the left)": (0.0, -1.0, 0.0),
    "lateral (from the patient's left; anterior on the left)": (1.0, 0.0, 0.0),
    "oblique (anterior-left, from above)": (0.6, -0.7, 0.4),
}
OVERVIEW = ("geometry: X-ray sources around the ROI", (0.55, -0.65, 0.55))


class RenderUnavailable(RuntimeError):
    """VTK is missing or cannot open an off-screen OpenGL context; the message says which."""


def bone_surface(volume: Volume, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (LPS mm), triangles (vertex indices) and unit normals of the surface μ = ``threshold``."""
    values = np.asarray(volume.array, np.float32)
    if not values.max() > threshold:
        raise ValueError(f"no voxel above the bone threshold {threshold:.4g} 1/mm: no bone surface to draw")
    spacing_zyx = tuple(float(s) for s in volume.spacing[::-1])
    vertices, faces, normals, _ = marching_cubes(values, level=float(threshold), spacing=spacing_zyx)
    direction = np.asarray(volume.direction, float)
    points = np.asarray(volume.origin, float) + vertices[:, ::-1] @ direction.T
    return points, faces, normals[:, ::-1] @ direction.T


def _import_vtk():
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    try:
        import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL implementations)
        from vtkmodules import vtkCommonCore, vtkCommonDataModel, vtkFiltersCore, vtkFiltersSources, vtkRenderingCore
        from vtkmodules.util import numpy_support
    except ImportError as error:
        raise RenderUnavailable(f"vtk is not installed ({error}); pip install \"ixgs[render]\"") from None
    return vtkCommonCore, vtkCommonDataModel, vtkFiltersCore, vtkFiltersSources, vtkRenderingCore, numpy_support


def render_bone_views(volume: Volume, threshold: float, sources_mm: np.ndarray | None = None,
                      size: tuple[int, int] = (420, 420)) -> dict[str, np.ndarray]:
    """RGB uint8 images (rows, cols, 3), ``size = (cols, rows)``, of the bone surface: AP, lateral and oblique close-ups, and,
    with ``sources_mm`` (n, 3) LPS, an overview with the sources as small markers, their central
    rays and the ROI box. Raises :class:`RenderUnavailable` when VTK cannot render here."""
    core, data, filters, shapes, rendering, numpy_support = _import_vtk()
    points, faces, normals = bone_surface(volume, threshold)
    surface = data.vtkPolyData()
    vtk_points = core.vtkPoints()
    vtk_points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, np.float32), deep=True))
    surface.SetPoints(vtk_points)
    triangles = data.vtkCellArray()
    offsets = np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64)
    triangles.SetData(numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
                      numpy_support.numpy_to_vtkIdTypeArray(np.ascontiguousarray(faces.ravel(), np.int64), deep=True))
    surface.SetPolys(triangles)
    vtk_normals = numpy_support.numpy_to_vtk(np.ascontiguousarray(normals, np.float32), deep=True)
    vtk_normals.SetName("Normals")
    surface.GetPointData().SetNormals(vtk_normals)
    bone = _actor(rendering, surface, BONE_RGB)
    bone.GetProperty().SetSpecular(0.3)
    bone.GetProperty().SetSpecularPower(20)

    window = rendering.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(SUPERSAMPLING * size[0], SUPERSAMPLING * size[1])
    if hasattr(window, "SupportsOpenGL") and not window.SupportsOpenGL():
        raise RenderUnavailable(f"{type(window).__name__}: no off-screen OpenGL context (on Linux without a "
                                "display, VTK needs the system's libEGL, e.g. apt-get install libegl1)")
    renderer = rendering.vtkRenderer()
    renderer.SetBackground(*BACKGROUND_RGB)
    window.AddRenderer(renderer)
    renderer.AddActor(bone)
    center = 0.5 * (points.min(axis=0) + points.max(axis=0))
    images = {name: _snapshot(window, renderer, rendering, center, direction, surface.GetBounds(), numpy_support)
              for name, direction in CLOSE_UPS.items()}
    if sources_mm is not None and len(sources_mm):
        sources_mm = np.asarray(sources_mm, float)
        roi = volume.grid.roi
        scene = max(float(np.ptp(np.vstack([sources_mm, roi.lower, roi.upper]), axis=0).max()), 1.0)
        for source in sources_mm:
            marker = shapes.vtkSphereSource()
            marker.SetCenter(*source)
            marker.SetRadius(0.012 * scene)
            renderer.AddActor(_actor(rendering, marker, SOURCE_RGB, port=True))
            ray = shapes.vtkLineSource()
            ray.SetPoint1(*source)
            ray.SetPoint2(*roi.center)
            line = _actor(rendering, ray, SOURCE_RGB, port=True)
            line.GetProperty().SetOpacity(0.35)
            renderer.AddActor(line)
        box = shapes.vtkOutlineSource()
        box.SetBounds(roi.lower[0], roi.upper[0], roi.lower[1], roi.upper[1], roi.lower[2], roi.upper[2])
        renderer.AddActor(_actor(rendering, box, (0.5, 0.8, 1.0), port=True))
        bounds = [f(values) for values in zip(*np.vstack([sources_mm, roi.lower, roi.upper])) for f in (min, max)]
        name, direction = OVERVIEW
        images[name] = _snapshot(window, renderer, rendering, np.asarray(roi.center), direction, bounds, numpy_support)
    window.Finalize()
    return images


def _actor(rendering, source, rgb, port: bool = False):
    mapper = rendering.vtkPolyDataMapper()
    if port:
        mapper.SetInputConnection(source.GetOutputPort())
    else:
        mapper.SetInputData(source)
    actor = rendering.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*rgb)
    return actor


def _snapshot(window, renderer, rendering, center, direction, bounds, numpy_support) -> np.ndarray:
    """Look at ``center`` from ``direction`` (LPS, superior up), frame ``bounds``, read back RGB."""
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*center)
    camera.SetPosition(*(np.asarray(center) + 1000.0 * direction))
    camera.SetViewUp(0.0, 0.0, 1.0)
    camera.SetViewAngle(25.0)
    renderer.ResetCamera(*bounds)
    renderer.ResetCameraClippingRange()
    window.Render()
    grab = rendering.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    cols, rows, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, cols, 3)[::-1]
    n = SUPERSAMPLING  # VTK's first row is the bottom one, hence the flip above
    blocks = pixels.reshape(rows // n, n, cols // n, n, 3).astype(np.float32).mean(axis=(1, 3))
    return np.round(blocks).astype(np.uint8)
