"""Off-screen 3D pictures of the bone surface with VTK (optional: ``pip install "ixgs[render]"``).

The surface is scikit-image's marching cubes of the attenuation at the bone threshold, i.e. the
boundary of ``bone.nrrd``. VTK draws it without a display, in a child process: its wheels pick the
OpenGL window at run time (X when a display is set, else EGL, else OSMesa); with no display we ask
for EGL first, which needs only the system's ``libEGL`` (Mesa's software renderer works).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the render child imports only numpy and VTK: it starts in a fraction of a second
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
RENDER_TIMEOUT_S = 300


class RenderUnavailable(RuntimeError):
    """VTK is missing or cannot open an off-screen OpenGL context; the message says which."""


def bone_surface(volume: Volume, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (LPS mm), triangles (vertex indices) and unit normals of the surface μ = ``threshold``."""
    from skimage.measure import marching_cubes

    values = np.asarray(volume.array, np.float32)
    if not values.max() > threshold:
        raise ValueError(f"no voxel above the bone threshold {threshold:.4g} 1/mm: no bone surface to draw")
    spacing_zyx = tuple(float(s) for s in volume.spacing[::-1])
    vertices, faces, normals, _ = marching_cubes(values, level=float(threshold), spacing=spacing_zyx)
    direction = np.asarray(volume.direction, float)
    points = np.asarray(volume.origin, float) + vertices[:, ::-1] @ direction.T
    return points, faces, normals[:, ::-1] @ direction.T


def render_bone_views(volume: Volume, threshold: float, sources_mm: np.ndarray | None = None,
                      size: tuple[int, int] = (420, 420)) -> dict[str, np.ndarray]:
    """RGB uint8 images (rows, cols, 3), ``size = (cols, rows)``, of the surface μ = ``threshold``:
    AP, lateral and oblique close-ups, and, with ``sources_mm`` (n, 3) LPS, an overview with the
    sources as small markers, their central rays and the ROI box. Raises :class:`RenderUnavailable`
    (with the reason) when VTK is absent or cannot render here."""
    with BoneRender(volume, threshold, sources_mm, size) as render:
        return render.images()


class BoneRender:
    """:func:`render_bone_views` started in the background; :meth:`images` waits for it.

    VTK renders in a child process: an OpenGL that is missing can end a process outright (VTK's
    OSMesa window crashes when libOSMesa is absent), and a reconstruction must survive that. The
    caller can draw other figures meanwhile. Use as a context manager (it stops the child and
    removes its files)."""

    def __init__(self, volume: Volume, threshold: float, sources_mm: np.ndarray | None = None,
                 size: tuple[int, int] = (420, 420)):
        if importlib.util.find_spec("vtkmodules") is None:
            raise RenderUnavailable('vtk is not installed (pip install "ixgs[render]")')
        points, faces, normals = bone_surface(volume, threshold)
        roi = volume.grid.roi
        sources_mm = np.zeros((0, 3)) if sources_mm is None else np.asarray(sources_mm, float).reshape(-1, 3)
        self.folder = tempfile.TemporaryDirectory(prefix="ixgs-render-")
        scene, self.output = Path(self.folder.name) / "scene.npz", Path(self.folder.name) / "images.npz"
        np.savez(scene, points=points, faces=faces, normals=normals, sources=sources_mm, roi_lower=roi.lower,
                 roi_upper=roi.upper, size=np.asarray(size, int))
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.child = subprocess.Popen([sys.executable, "-m", "ixgs.render3d", str(scene), str(self.output)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def images(self) -> dict[str, np.ndarray]:
        try:
            _, stderr = self.child.communicate(timeout=RENDER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RenderUnavailable(f"VTK did not finish rendering within {RENDER_TIMEOUT_S} s") from None
        if self.child.returncode != 0 or not self.output.is_file():
            raise RenderUnavailable(f"VTK could not render off-screen (exit status {self.child.returncode}): "
                                    f"{_last_message(stderr)}")
        with np.load(self.output) as stored:
            names = [str(name) for name in stored["names"]]
            return {name: stored[f"image_{number}"] for number, name in enumerate(names)}

    def __enter__(self) -> "BoneRender":
        return self

    def __exit__(self, *exc) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.communicate()
        self.folder.cleanup()


def _last_message(stderr: str) -> str:
    """The last line VTK (or Python) printed, without colour codes; what went wrong, in one line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).split("| ")[-1].strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    hint = "on Linux without a display VTK needs the system's libEGL (Mesa: libegl1, libegl-mesa0)"
    return (lines[-1][-300:] + "; " + hint) if lines else hint


def _render_scene(scene: dict) -> dict[str, np.ndarray]:
    """The VTK side of :func:`render_bone_views` (runs in the child process)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL implementations)
    from vtkmodules import vtkCommonCore, vtkCommonDataModel, vtkFiltersSources, vtkRenderingCore as rendering
    from vtkmodules.util import numpy_support

    points, faces, normals = scene["points"], scene["faces"], scene["normals"]
    surface = vtkCommonDataModel.vtkPolyData()
    vtk_points = vtkCommonCore.vtkPoints()
    vtk_points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, np.float32), deep=True))
    surface.SetPoints(vtk_points)
    triangles = vtkCommonDataModel.vtkCellArray()
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

    cols, rows = (int(n) for n in scene["size"])
    window = rendering.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(SUPERSAMPLING * cols, SUPERSAMPLING * rows)
    renderer = rendering.vtkRenderer()
    renderer.SetBackground(*BACKGROUND_RGB)
    window.AddRenderer(renderer)
    renderer.AddActor(bone)
    center = 0.5 * (points.min(axis=0) + points.max(axis=0))
    images = {name: _snapshot(window, renderer, rendering, center, direction, surface.GetBounds(), numpy_support)
              for name, direction in CLOSE_UPS.items()}
    sources, lower, upper = scene["sources"], scene["roi_lower"], scene["roi_upper"]
    if len(sources):
        roi_center = 0.5 * (lower + upper)
        everything = np.vstack([sources, lower, upper])
        radius = 0.012 * max(float(np.ptp(everything, axis=0).max()), 1.0)
        for source in sources:
            marker = vtkFiltersSources.vtkSphereSource()
            marker.SetCenter(*source)
            marker.SetRadius(radius)
            renderer.AddActor(_actor(rendering, marker, SOURCE_RGB, port=True))
            ray = vtkFiltersSources.vtkLineSource()
            ray.SetPoint1(*source)
            ray.SetPoint2(*roi_center)
            line = _actor(rendering, ray, SOURCE_RGB, port=True)
            line.GetProperty().SetOpacity(0.35)
            renderer.AddActor(line)
        box = vtkFiltersSources.vtkOutlineSource()
        box.SetBounds(lower[0], upper[0], lower[1], upper[1], lower[2], upper[2])
        renderer.AddActor(_actor(rendering, box, (0.5, 0.8, 1.0), port=True))
        bounds = [value for axis in range(3) for value in (everything[:, axis].min(), everything[:, axis].max())]
        name, direction = OVERVIEW
        images[name] = _snapshot(window, renderer, rendering, roi_center, direction, bounds, numpy_support)
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


def _main(argv: list[str]) -> int:
    """``python -m ixgs.render3d SCENE.npz IMAGES.npz``: the child process of :func:`render_bone_views`."""
    scene_path, images_path = argv
    with np.load(scene_path) as stored:
        scene = {key: stored[key] for key in stored.files}
    images = _render_scene(scene)
    arrays = {f"image_{number}": image for number, image in enumerate(images.values())}
    np.savez(images_path, names=np.array(list(images)), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
