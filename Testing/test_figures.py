"""Figures: expected sizes, real content, anatomical orientation on screen, and the off-screen 3D render."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import ring_of_matrices
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from ixgs import figures
from ixgs.geometry import Roi
from ixgs.scan import read_scan, write_scan
from ixgs.volume import Volume

# An 80 mm box, 4 mm voxels (20^3): soft tissue, a "bone" ball and a bright marker at the patient's
# left-anterior-superior corner region (x > 0, y < 0, z > 0 in LPS).
MARKER_MM = (26.0, -26.0, 26.0)


def _phantom() -> Volume:
    grid = Roi((0.0, 0.0, 0.0), (80.0, 80.0, 80.0)).grid(4.0)
    centers = grid.voxel_centers()
    values = np.full(grid.shape, 0.02, np.float32)
    values[np.linalg.norm(centers - [-8.0, 4.0, 0.0], axis=-1) < 14] = 0.05
    values[np.all(np.abs(centers - MARKER_MM) < 5, axis=-1)] = 0.08  # 3 voxels a side
    return Volume.on_grid(values, grid)


def _pixels(figure) -> np.ndarray:
    return imread(io.BytesIO(figures.png_bytes(figure)))


def _size_px(figure) -> tuple[int, int]:
    width, height = figure.get_size_inches() * figures.DPI
    return int(round(height)), int(round(width))


@pytest.fixture(scope="module")
def ring_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("figures") / "scan"
    images = [np.ones((32, 40), np.float32) + k for k in range(4)]
    for image in images:
        image[10:20, 12:28] += 1.5
    write_scan(folder, images, ring_of_matrices(4), roi=Roi((0.0, 0.0, 0.0), (80.0, 80.0, 80.0)))
    return read_scan(folder)


def test_slice_planes_are_shown_in_anatomical_orientation():
    """On screen: axial has the patient's left on the right and anterior up (radiological), coronal
    left on the right and superior up, sagittal anterior on the left and superior up; the marker
    voxel is drawn where the axes say it is."""
    volume = _phantom()
    figure = figures.slices_figure(volume, MARKER_MM, "marker")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(float)
    height = pixels.shape[0]
    axes = figure.axes[:3]
    expected = {"axial": ((0, +1), (1, -1)), "coronal": ((0, +1), (2, +1)), "sagittal": ((1, +1), (2, +1))}
    for ax, plane in zip(axes, figures.PLANES):
        assert plane.name in ax.get_title()
        (h_axis, h_sign), (v_axis, v_sign) = expected[plane.name]
        assert (plane.horizontal, plane.vertical) == (h_axis, v_axis)
        origin = np.array([ax.get_xlim()[0], ax.get_ylim()[0]])
        step = ax.transData.transform(origin + [10.0, 0.0]) - ax.transData.transform(origin)
        assert np.sign(step[0]) == h_sign  # display x grows to the right
        step = ax.transData.transform(origin + [0.0, 10.0]) - ax.transData.transform(origin)
        assert np.sign(step[1]) == v_sign  # display y grows upwards
        marker = np.array([MARKER_MM[h_axis], MARKER_MM[v_axis]])
        mirrored = -marker
        bright, dark = (ax.transData.transform(point) for point in (marker, mirrored))
        value = lambda xy: pixels[int(height - xy[1]), int(xy[0])].mean()  # noqa: E731 (display y is upwards)
        assert value(bright) > 200 and value(dark) < 120, plane.name
    letters = {plane.name: plane.letters for plane in figures.PLANES}
    assert letters == {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"),
                       "sagittal": ("A", "P", "S", "I")}


def test_slices_figure_with_reference_has_difference_row():
    volume = _phantom()
    reference = Volume(volume.array * 0.9, volume.origin, volume.spacing)
    figure = figures.slices_figure(volume, figures.densest_point(volume), "densest", reference)
    pixels = _pixels(figure)
    assert pixels.shape[:2] == _size_px(figure) == (3 * 390, 1300)
    assert pixels[..., :3].std() > 0.1
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert sum(t.startswith("difference") for t in titles) == 3 and sum(t.startswith("reference") for t in titles) == 3
    labels = [bar.get_ylabel() for ax in figure.axes for bar in ax.child_axes]  # the colour bars
    assert labels.count(figures.ATTENUATION_LABEL) == 2 and labels.count(figures.DIFFERENCE_LABEL) == 1
    # The densest point is inside the marker (0.08 1/mm), not the ball (0.05 1/mm).
    np.testing.assert_allclose(figures.densest_point(volume), MARKER_MM)


def test_coverage_figure_outlines_under_constrained_region():
    volume = _phantom()
    counts = np.full(volume.array.shape, 4, np.uint8)
    counts[:, :, :5] = 1  # the patient's right side is seen by one view
    coverage = Volume(counts, volume.origin, volume.spacing)
    figure = figures.coverage_figure(volume, coverage, 2, figures.roi_center(volume))
    pixels = _pixels(figure)
    assert pixels.shape[:2] == _size_px(figure) == (430, 1300)
    assert "25.0 %" in figure.get_suptitle()
    contours = [c for ax in figure.axes for c in ax.collections]
    assert contours  # axial and coronal cut the region (the sagittal slice at x = 0 does not)
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
    assert red.sum() > 100


def test_views_figure_shows_measured_rendered_residual_and_psnr(ring_scan):
    reprojections = {0: ring_scan.views[0].image * 1.05, 3: ring_scan.views[3].image + 0.1}
    figure = figures.views_figure(ring_scan, reprojections)
    pixels = _pixels(figure)
    assert pixels.shape[:2] == _size_px(figure) == (720, 1200)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert len(titles) == 6 and sum("PSNR" in t and "dB" in t for t in titles) == 2
    assert pixels[..., :3].std() > 0.1


def test_loss_figure_marks_stages_densification_and_stop():
    rows = [[i, 1.0 / (1 + i), 2.0 + 0.5 * i] for i in range(60)]
    report = {"loss_curve": rows, "stop_reason": "plateau",
              "stages": [{"name": "warm start (SART)", "start_s": 0.0, "end_s": 2.0},
                         {"name": "level 1/2 (64 px)", "start_s": 2.0, "end_s": 17.0},
                         {"name": "level 2/2 (128 px)", "start_s": 17.0, "end_s": 31.5}],
              "densification": [{"iteration": 20, "elapsed_s": 12.0, "cloned": 5, "split": 3, "pruned": 2,
                                 "total": 1006}]}
    figure = figures.loss_figure(report)
    axes = [ax for ax in figure.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in axes] == ["iteration", "wall time (s)"]
    for ax in axes:
        assert ax.get_yscale() == "log"
        # One shaded span per stage; the warm start ends before iteration 0, so not on the iteration axis.
        assert len(ax.patches) == (2 if ax.get_xlabel() == "iteration" else 3)
        vertical = sorted(line.get_xdata()[0] for line in ax.get_lines() if np.ptp(line.get_xdata()) == 0)
        assert vertical == ([20, 59] if ax.get_xlabel() == "iteration" else [12.0, 31.5])  # densification, stop
    assert "plateau" in figure.get_suptitle()
    pixels = _pixels(figure)
    assert pixels.shape[:2] == _size_px(figure) == (460, 1300) and pixels[..., :3].std() > 0.05


def test_loss_figure_of_old_reports_and_sart():
    figure = figures.loss_figure({"loss_curve": [[0, 1.0], [1, 0.5], [2, 0.2]]})  # 2 columns: no wall time
    assert [ax.get_xlabel() for ax in figure.axes] == ["iteration"]
    assert figures.loss_figure({"loss_curve": []}) is None
    assert figures.loss_figure({}) is None


def test_bone_renders_off_screen_from_three_sides_with_sources(ring_scan):
    pytest.importorskip("vtk")
    from ixgs import render3d

    volume = _phantom()
    sources = np.array([view.source for view in ring_scan.views])
    images = render3d.render_bone_views(volume, 0.035, sources, size=(160, 120))
    assert len(images) == 4
    background = np.round(255 * np.asarray(render3d.BACKGROUND_RGB)).astype(int)
    for name, image in images.items():
        assert image.shape == (120, 160, 3) and image.dtype == np.uint8, name
        differs = np.abs(image.astype(int) - background).max(axis=-1) > 30
        least = 0.02 if name in render3d.CLOSE_UPS else 0.003  # the overview's bone and sources are small
        assert least < differs.mean() < 0.9, name  # bone (or sources) drawn, background around it
        assert (np.abs(image[0, 0].astype(int) - background) <= 2).all(), name
    # The AP view looks from the front: the ball (patient's right, x < 0) is left of the marker (x > 0).
    ap = images[next(iter(render3d.CLOSE_UPS))]
    columns = np.nonzero((np.abs(ap.astype(int) - background).max(axis=-1) > 30).any(axis=0))[0]
    assert columns.min() < 50 and columns.max() > 110
    figure = figures.bone_3d_figure(images, 0.035)
    assert _pixels(figure).shape[:2] == _size_px(figure) == (460, 1600)


def test_a_vtk_that_cannot_render_does_not_end_the_caller(monkeypatch):
    """VTK's OSMesa window ends its process when libOSMesa is missing: rendering runs in a child, so
    the caller gets images (OSMesa present) or RenderUnavailable with the reason, and lives on."""
    pytest.importorskip("vtk")
    from ixgs import render3d

    monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    try:
        images = render3d.render_bone_views(_phantom(), 0.035, size=(40, 30))
    except render3d.RenderUnavailable as error:
        assert "VTK could not render off-screen" in str(error) and "libEGL" in str(error)
    else:
        assert len(images) == 3 and all(image.shape == (30, 40, 3) for image in images.values())


def test_no_bone_surface_is_refused():
    from ixgs.render3d import bone_surface

    volume = _phantom()
    with pytest.raises(ValueError, match="no voxel above the bone threshold"):
        bone_surface(volume, 1.0)
    points, faces, normals = bone_surface(volume, 0.035)
    assert faces.max() < len(points) and np.allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-3)
    assert points.min(axis=0)[0] < -15 and points.max(axis=0)[0] > 25  # ball and marker, in LPS mm


def test_extension_icon_and_screenshot_are_files_in_the_repository():
    """The Slicer catalogue URLs point at raw files of this repository's main branch: they must exist."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmake = (root / "CMakeLists.txt").read_text()
    for field in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = re.search(rf'set\({field} "([^"]+)"\)', cmake).group(1)
        prefix = "https://raw.githubusercontent.com/ixgs/ixgs/main/"
        assert url.startswith(prefix), url
        path = root / url[len(prefix):]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
