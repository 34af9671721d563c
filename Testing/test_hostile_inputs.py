"""Hostile and malformed input (issue 13): every command refuses it before any work, with one line
naming the file, view or field, exit status 2, no traceback, nothing changed and nothing left behind.

Each case builds its input in ``tmp_path`` and runs the real command line in-process.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ring_of_matrices

from ixgs.cli import main
from ixgs.geometry import Roi
from ixgs.scan import read_scan, write_scan
from ixgs.volume import Volume

SHAPE = (24, 30)


def _blob_images(n=4):
    images = [np.full(SHAPE, 0.5, np.float32) for _ in range(n)]
    for image in images:
        image[8:16, 10:20] = 2.0
    return images


def _scan(tmp_path, images=None, matrices=None, roi=Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)), reference=None):
    images = _blob_images() if images is None else images
    matrices = ring_of_matrices(len(images), shape=SHAPE, focal_px=90.0) if matrices is None else matrices
    return write_scan(tmp_path / "scan", images, matrices, roi=roi, reference=reference)


def _edit_scan(folder: Path, edit) -> None:
    meta = json.loads((folder / "scan.json").read_text())
    edit(meta)
    (folder / "scan.json").write_text(json.dumps(meta))


def _outside_file(tmp_path) -> Path:
    """A readable file outside the scan folder that a scan must not pull into its outputs."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    secret = tmp_path / "outside" / "secret.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full(SHAPE, 7.0, np.float32)), str(secret))
    return secret


def _reconstruct(scan, tmp_path, *extra):
    return ["reconstruct", str(scan), "-o", str(tmp_path / "out"), "--method", "sart", "--iterations", "1",
            "--voxel-size", "8", "--progress", "json", *extra]


# ----- item 8: paths must stay inside the scan ----------------------------------------------------
def absolute_image_path(tmp_path):
    scan, secret = _scan(tmp_path), _outside_file(tmp_path)
    _edit_scan(scan, lambda meta: meta["views"][0].__setitem__("image", str(secret)))
    return _reconstruct(scan, tmp_path), r"view 0 .*field 'image'.*points outside"


def dotdot_image_path(tmp_path):
    scan = _scan(tmp_path)
    _outside_file(tmp_path)
    _edit_scan(scan, lambda meta: meta["views"][1].__setitem__("image", "../outside/secret.nrrd"))
    return _reconstruct(scan, tmp_path), r"view 1 .*field 'image'.*points outside"


def symlinked_image(tmp_path):
    scan, secret = _scan(tmp_path), _outside_file(tmp_path)
    (scan / "views" / "002.nrrd").unlink()
    (scan / "views" / "002.nrrd").symlink_to(secret)
    return _reconstruct(scan, tmp_path), r"view 2 .*field 'image'.*points outside"


def dotdot_reference(tmp_path):
    scan = _scan(tmp_path)
    (tmp_path / "outside").mkdir()
    Volume(np.ones((4, 4, 4), np.float32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).write(tmp_path / "outside" / "ct.nrrd")
    _edit_scan(scan, lambda meta: meta.__setitem__("reference_volume", "../outside/ct.nrrd"))
    return _reconstruct(scan, tmp_path), r"reference_volume '\.\./outside/ct\.nrrd'.*points outside"


def _r2gaussian_scene(folder: Path, file_path=None) -> Path:
    """A minimal R2-Gaussian scene (metres): 4 projections about z."""
    folder.mkdir(parents=True)
    (folder / "proj").mkdir()
    entries = []
    for index in range(4):
        name = f"proj/{index}.npy"
        np.save(folder / name, np.full(SHAPE, 0.5, np.float32))
        entries.append({"file_path": name, "angle": index * np.pi / 4})
    if file_path is not None:
        entries[0]["file_path"] = file_path
    meta = {"scanner": {"mode": "cone", "DSD": 1.5, "DSO": 1.0, "nDetector": list(SHAPE), "sDetector": [0.24, 0.3],
                        "nVoxel": [8, 8, 8], "sVoxel": [0.08, 0.08, 0.08], "offOrigin": [0, 0, 0]},
            "proj_train": entries}
    (folder / "meta_data.json").write_text(json.dumps(meta))
    return folder


def r2gaussian_file_path_outside(tmp_path):
    (tmp_path / "outside").mkdir()
    np.save(tmp_path / "outside" / "secret.npy", np.full(SHAPE, 7.0, np.float32))
    scene = _r2gaussian_scene(tmp_path / "scene", "../outside/secret.npy")
    return (["import-peer", str(scene), "--format", "r2gaussian", "-o", str(tmp_path / "out")],
            r"proj_train\[0\]: field 'file_path': '\.\./outside/secret\.npy' points outside")


def tigre_symlink_outside(tmp_path):
    folder = tmp_path / "tigre"
    folder.mkdir()
    (tmp_path / "outside").mkdir()
    np.save(tmp_path / "outside" / "projections.npy", np.full((3,) + SHAPE, 0.5, np.float32))
    (folder / "projections.npy").symlink_to(tmp_path / "outside" / "projections.npy")
    np.save(folder / "angles.npy", np.array([0.0, 1.0, 2.0]))
    (folder / "geometry.json").write_text(json.dumps({"DSD": 1500.0, "DSO": 1000.0, "nDetector": list(SHAPE),
                                                      "dDetector": [1.0, 1.0], "nVoxel": [8, 8, 8],
                                                      "sVoxel": [80, 80, 80]}))
    return (["import-peer", str(folder), "--format", "tigre", "-o", str(tmp_path / "out")],
            r"projections\.npy: 'projections\.npy' points outside")


# ----- item 11: a bad reference volume fails before the reconstruction ----------------------------
def unreadable_reference(tmp_path):
    scan = _scan(tmp_path)
    (scan / "ct.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    _edit_scan(scan, lambda meta: meta.__setitem__("reference_volume", "ct.nrrd"))
    return _reconstruct(scan, tmp_path), r"reference_volume 'ct\.nrrd': cannot be read as an image"


def reference_2d(tmp_path):
    scan = _scan(tmp_path)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 6), np.float32)), str(scan / "ct.nrrd"))
    _edit_scan(scan, lambda meta: meta.__setitem__("reference_volume", "ct.nrrd"))
    return _reconstruct(scan, tmp_path), r"reference_volume 'ct\.nrrd': must be a 3D scalar volume, got 2D"



def truncated_reference(tmp_path):
    scan = _scan(tmp_path)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 8, 8), np.float32)), str(scan / "ct.nrrd"))
    (scan / "ct.nrrd").write_bytes((scan / "ct.nrrd").read_bytes()[:-100])  # header intact, data cut short
    _edit_scan(scan, lambda meta: meta.__setitem__("reference_volume", "ct.nrrd"))
    return _reconstruct(scan, tmp_path), r"reference_volume 'ct\.nrrd': its pixel data cannot be read"


# ----- item 12: DICOM import --------------------------------------------------------------------
def _dicom_folder(tmp_path, **bad_tags) -> Path:
    pytest.importorskip("pydicom")
    from test_dicom import write_xray

    folder = tmp_path / "dicom"
    for index, name in enumerate(("a.dcm", "b.dcm", "c.dcm")):
        tags = {"PositionerPrimaryAngle": -40.0 + 40 * index, "PositionerSecondaryAngle": 0.0,
                "DistanceSourceToDetector": 1000.0, "DistanceSourceToPatient": 700.0,
                "ImagerPixelSpacing": [0.5, 0.5], "InstanceNumber": index + 1}
        if name == "b.dcm":
            tags.update(bad_tags)
        write_xray(folder / name, np.full((16, 16), 1000, np.uint16), **tags)
    return folder


def _import_dicom(folder, tmp_path):
    return ["import-dicom", str(folder), "-o", str(tmp_path / "out")]


def truncated_dicom(tmp_path):
    folder = _dicom_folder(tmp_path)
    data = (folder / "c.dcm").read_bytes()
    (folder / "c.dcm").write_bytes(data[: len(data) // 3])
    return _import_dicom(folder, tmp_path), r"c\.dcm: .*(cannot be read|without PixelData)"


def nan_primary_angle(tmp_path):
    return (_import_dicom(_dicom_folder(tmp_path, PositionerPrimaryAngle=float("nan")), tmp_path),
            r"b\.dcm: PositionerPrimaryAngle \(0018,1510\) is nan, not a finite number")


def nan_secondary_angle(tmp_path):
    return (_import_dicom(_dicom_folder(tmp_path, PositionerSecondaryAngle=float("nan")), tmp_path),
            r"b\.dcm: PositionerSecondaryAngle \(0018,1511\) is nan")


def infinite_distance(tmp_path):
    return (_import_dicom(_dicom_folder(tmp_path, DistanceSourceToDetector=float("inf")), tmp_path),
            r"b\.dcm: DistanceSourceToDetector \(0018,1110\) is inf")


# ----- item 13: resources and deeply nested JSON --------------------------------------------------
def tiny_voxels(tmp_path):
    return (_reconstruct(_scan(tmp_path), tmp_path, "--voxel-size", "0.02"),
            r"0\.02 mm.* needs about .* change the voxel size \(--voxel-size")


def absurd_voxels(tmp_path):
    return (_reconstruct(_scan(tmp_path), tmp_path, "--voxel-size", "1e-4"),
            r"needs about .* change the voxel size \(--voxel-size")


def two_billion_gaussians(tmp_path):
    argv = _reconstruct(_scan(tmp_path), tmp_path, "--gaussians", "2000000000")
    argv[argv.index("sart")] = "gaussian"
    return argv, r"2e\+09 Gaussians needs about .* change the number of Gaussians \(--gaussians"


def huge_detector(tmp_path):
    return (["simulate", "--phantom", "knee", "--views", "2", "--detector", "100000", "--progress", "none",
             "-o", str(tmp_path / "out")], r"100000 x 100000 px .*needs about .* change the detector size")


def billion_views(tmp_path):
    return (["simulate", "--phantom", "knee", "--views", "1000000000", "--progress", "none",
             "-o", str(tmp_path / "out")], r"1000000000 views of 128 x 128 px needs about .*--views")


def _deep_json(path: Path) -> None:
    path.write_text("[" * 100000 + "]" * 100000)


def deep_scan_json(tmp_path):
    scan = _scan(tmp_path)
    _deep_json(scan / "scan.json")
    return _reconstruct(scan, tmp_path), r"scan\.json: not valid JSON \(nested too deeply\)"


def deep_r2gaussian_json(tmp_path):
    scene = _r2gaussian_scene(tmp_path / "scene")
    _deep_json(scene / "meta_data.json")
    return (["import-peer", str(scene), "--format", "r2gaussian", "-o", str(tmp_path / "out")],
            r"meta_data\.json: not valid JSON \(nested too deeply\)")


def deep_bead_layout(tmp_path):
    _deep_json(tmp_path / "layout.json")
    return (["calibrate", str(_scan(tmp_path)), "--phantom", str(tmp_path / "layout.json"), "-o",
             str(tmp_path / "out")], r"layout\.json: not valid JSON \(nested too deeply\)")


# ----- item 14: non-finite options ----------------------------------------------------------------
def nan_bone_threshold(tmp_path):
    return (_reconstruct(_scan(tmp_path), tmp_path, "--bone-threshold", "nan"),
            r"argument --bone-threshold: 'nan' is not a finite number")


def nan_evaluate_threshold(tmp_path):
    values = np.random.default_rng(0).uniform(0, 0.05, (8, 9, 10)).astype(np.float32)
    Volume(values, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).write(tmp_path / "a.nrrd")
    return (["evaluate", str(tmp_path / "a.nrrd"), str(tmp_path / "a.nrrd"), "--bone-threshold", "nan"],
            r"argument --bone-threshold: 'nan' is not a finite number")


def nan_max_error(tmp_path):
    return (["calibrate", str(_scan(tmp_path)), "--max-error", "nan", "-o", str(tmp_path / "out")],
            r"argument --max-error: 'nan' is not a finite number")


def nan_roi(tmp_path):
    return (_reconstruct(_scan(tmp_path), tmp_path, "--roi", "0", "0", "nan", "30", "30", "30"),
            r"argument --roi: 'nan' is not a finite number")


def infinite_assumed_distance(tmp_path):
    return (["import-dicom", str(_dicom_folder(tmp_path)), "--assume-sid", "inf", "-o", str(tmp_path / "out")],
            r"argument --assume-sid: 'inf' is not a finite number")


# ----- item 15: absurd geometry -------------------------------------------------------------------
def huge_matrix_entry(tmp_path):
    scan = _scan(tmp_path)

    def edit(meta):
        meta["views"][0]["projection_matrix"][0][3] = 1e308  # a source 1e308 mm away
    _edit_scan(scan, edit)
    return _reconstruct(scan, tmp_path), r"view 0 \(views/000\.nrrd\): projection matrix is singular or degenerate"


def far_away_roi(tmp_path):
    scan = _scan(tmp_path)
    _edit_scan(scan, lambda meta: meta.__setitem__("roi", {"center": [0.0, 0.0, 1e300], "size": [10.0, 10.0, 1e300]}))
    return _reconstruct(scan, tmp_path), r"field 'roi': reaches beyond 1e\+06 mm from the origin"


# ----- item 16: physically meaningless input ------------------------------------------------------
def blank_view(tmp_path):
    images = _blob_images()
    images[3][:] = 0.0
    return _reconstruct(_scan(tmp_path, images), tmp_path), r"view 3 \(views/003\.nrrd\): image is all zero"


def negative_views(tmp_path):
    images = [-image for image in _blob_images()]
    return (_reconstruct(_scan(tmp_path, images), tmp_path),
            r"view 0 \(views/000\.nrrd\): 100\.0 % of the pixels are clearly negative")


def negative_transmission(tmp_path):
    images = [np.where(image > 1, -500.0, 1000.0).astype(np.float32) for image in _blob_images()]
    scan = write_scan(tmp_path / "scan", images, ring_of_matrices(4, shape=SHAPE, focal_px=90.0),
                      intensity="transmission", roi=Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)))
    return _reconstruct(scan, tmp_path), r"view 0 .*transmission image: .* clearly negative; detector signals"


def unseen_roi(tmp_path):
    scan = _scan(tmp_path, roi=Roi((300.0, 300.0, 300.0), (10.0, 10.0, 10.0)))
    return _reconstruct(scan, tmp_path), r"field 'roi': no view sees the ROI"


def unseen_roi_option(tmp_path):
    return (_reconstruct(_scan(tmp_path), tmp_path, "--roi", "300", "300", "300", "10", "10", "10"),
            r"setting 'roi': no view sees the ROI")


CASES = [absolute_image_path, dotdot_image_path, symlinked_image, dotdot_reference, r2gaussian_file_path_outside,
         tigre_symlink_outside, unreadable_reference, reference_2d, truncated_reference, truncated_dicom, nan_primary_angle,
         nan_secondary_angle, infinite_distance, tiny_voxels, absurd_voxels, two_billion_gaussians, huge_detector,
         billion_views, deep_scan_json, deep_r2gaussian_json, deep_bead_layout, nan_bone_threshold,
         nan_evaluate_threshold, nan_max_error, nan_roi, infinite_assumed_distance, huge_matrix_entry, far_away_roi,
         blank_view, negative_views, negative_transmission, unseen_roi, unseen_roi_option]


def _tree_digest(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones too) with its content hash or link target."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            digest[key] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[key] = "dir"
    return digest


def _run(capsys, argv):
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse refusals
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_hostile_input_is_refused_cleanly(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    argv, message = case(tmp_path)
    before = _tree_digest(tmp_path)
    capsys.readouterr()
    status, out, err = _run(capsys, argv)
    assert status == 2, err
    assert "Traceback" not in err and out == ""  # refused before any work: no progress, no result
    lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error: " in lines[0], err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert _tree_digest(tmp_path) == before  # nothing changed, nothing left (no output, no partial folder)
    assert not (tmp_path / "out").exists()


# ----- what is accepted, but must be said or written as strict JSON --------------------------------
def test_a_view_that_misses_the_roi_is_a_warning_in_stderr_and_report(tmp_path, capsys):
    matrices = ring_of_matrices(4, shape=SHAPE, focal_px=90.0)
    from conftest import look_at_projection_matrix

    matrices[3] = look_at_projection_matrix((0.0, -500.0, 0.0), target=(400.0, 0.0, 0.0), shape=SHAPE, focal_px=90.0)
    scan = _scan(tmp_path, matrices=matrices)
    status, _, err = _run(capsys, _reconstruct(scan, tmp_path))
    assert status == 0, err
    assert "ixgs: warning: " in err and "view 3 (views/003.nrrd) does not see the ROI" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["warnings"]) == 1 and "view 3 (views/003.nrrd) does not see the ROI" in report["warnings"][0]


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_evaluate_writes_strict_json_with_null_where_undefined(tmp_path, capsys):
    values = np.random.default_rng(0).uniform(0, 0.05, (8, 9, 10)).astype(np.float32)
    Volume(values, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).write(tmp_path / "a.nrrd")
    # Identical volumes: PSNR is infinite; a threshold above every voxel: Dice of two empty masks is undefined.
    status, out, _ = _run(capsys, ["evaluate", str(tmp_path / "a.nrrd"), str(tmp_path / "a.nrrd"),
                                   "--bone-threshold", "1"])
    result = _strict_json(out)
    assert status == 0 and result["psnr"] is None and result["dice"] is None and result["ssim"] == pytest.approx(1.0)


def test_report_json_is_strict(tmp_path, capsys):
    """A constant view has no reprojection PSNR: report.json says null, not NaN."""
    images = [np.full(SHAPE, 0.5, np.float32) for _ in range(4)]
    scan = _scan(tmp_path, images)
    status, _, err = _run(capsys, _reconstruct(scan, tmp_path))
    assert status == 0, err
    report = _strict_json((tmp_path / "out" / "report.json").read_text())
    assert report["reprojection_psnr"] is None


def test_a_matrix_scaled_by_1e300_is_the_same_projection_without_warnings(tmp_path):
    scan = _scan(tmp_path)
    _edit_scan(scan, lambda meta: [view.__setitem__("projection_matrix", (np.asarray(view["projection_matrix"])
                                                                          * 1e300).tolist())
                                   for view in meta["views"]])
    plain = write_scan(tmp_path / "plain", _blob_images(), ring_of_matrices(4, shape=SHAPE, focal_px=90.0),
                       roi=Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = read_scan(scan)
    for a, b in zip(scaled.views, read_scan(plain).views):
        np.testing.assert_allclose(a.projection_matrix, b.projection_matrix, rtol=1e-12, atol=1e-12)


def test_naf_pickle_cannot_run_code(tmp_path, capsys):
    """A pickle whose object runs a command when unpickled is refused (only arrays and plain values load)."""
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "scan.pickle").write_bytes(pickle.dumps({"mode": "cone", "train": Exploit()}))
    status, _, err = _run(capsys, ["import-peer", str(tmp_path / "scan.pickle"), "--format", "naf",
                                   "-o", str(tmp_path / "out")])
    assert status == 2 and "refusing to load posix.system" in err and not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_1e300_scaled_scan_reconstructs_with_warnings_as_errors(tmp_path):
    """The real command (``python -W error -m ixgs``): no numpy warning escapes anywhere on the way."""
    import subprocess
    import sys

    scan = _scan(tmp_path)
    _edit_scan(scan, lambda meta: [view.__setitem__("projection_matrix", (np.asarray(view["projection_matrix"])
                                                                          * 1e300).tolist())
                                   for view in meta["views"]])
    process = subprocess.run([sys.executable, "-W", "error", "-m", "ixgs", *_reconstruct(scan, tmp_path)],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0 and process.stderr == "", process.stderr
    assert (tmp_path / "out" / "volume.nrrd").is_file()


def test_memory_estimates_leave_ordinary_runs_alone(tmp_path):
    """The default 128^3 grid and preset fit easily; the estimate for SART grows with the views."""
    from ixgs.limits import available_bytes, check_memory, reconstruction_needs
    from ixgs.reconstruct import ReconstructionSettings

    scan = read_scan(_scan(tmp_path))
    for method in ("sart", "gaussian"):
        needs = reconstruction_needs(scan, ReconstructionSettings(method=method))
        assert 1e6 < sum(need.bytes for need in needs) < 2 ** 30
        check_memory(needs)
    assert available_bytes()[0] > 0
