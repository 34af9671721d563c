"""The command line: bad input gives one line, exit status 2 and no output folder; commands chain."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ring_of_matrices

from ixgs.cli import main
from ixgs.geometry import Roi
from ixgs.scan import write_scan
from ixgs.volume import Volume


def _run(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def tiny_scan(tmp_path):
    """Four views of a uniform ball-ish blob: enough to exercise the command line quickly."""
    images = [np.full((24, 30), 0.5, np.float32) for _ in range(4)]
    for image in images:
        image[8:16, 10:20] = 2.0
    return write_scan(tmp_path / "scan", images, ring_of_matrices(4, shape=(24, 30), focal_px=90.0),
                      roi=Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)))


@pytest.mark.parametrize("make_argv, message", [
    (lambda d: ["reconstruct", str(d / "missing"), "-o", str(d / "out")], "no scan.json"),
    (lambda d: ["reconstruct", str(d / "scan"), "-o", str(d / "out"), "--voxel-size", "-2"], "voxel_size_mm"),
    (lambda d: ["reconstruct", str(d / "scan"), "-o", str(d / "out"), "--iterations", "0"], "iterations"),
    (lambda d: ["reconstruct", str(d / "scan"), "-o", str(d / "out"), "--roi", "0", "0", "0", "10", "0", "10"],
     "--roi: sizes must be positive"),
    (lambda d: ["evaluate", str(d / "nothing.nrrd"), str(d / "nothing.nrrd")], "no such volume file"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, tiny_scan, capsys, make_argv, message):
    status, out, err = _run(capsys, *make_argv(tmp_path))
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ixgs: error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_broken_view_is_named(tmp_path, tiny_scan, capsys):
    (tiny_scan / "views" / "002.nrrd").write_bytes(b"garbage")
    status, _, err = _run(capsys, "reconstruct", str(tiny_scan), "-o", str(tmp_path / "out"))
    assert status == 2 and "view 2 (views/002.nrrd): image cannot be read" in err
    assert not (tmp_path / "out").exists()


def test_reconstruct_refuses_foreign_output_folder(tmp_path, tiny_scan, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    status, _, err = _run(capsys, "reconstruct", str(tiny_scan), "-o", str(tmp_path / "out"), "--method", "sart")
    assert status == 2 and "is not an ixgs output" in err and "thesis.tex" in err
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_reconstruct_writes_outputs_and_json_progress(tmp_path, tiny_scan, capsys):
    out = tmp_path / "out"
    status, stdout, _ = _run(capsys, "reconstruct", str(tiny_scan), "-o", str(out), "--iterations", "6",
                             "--gaussians", "300", "--voxel-size", "4", "--progress", "json", "--device", "cpu")
    assert status == 0
    records = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["iteration"] for r in records if r["stage"] == "gaussian"] == list(range(1, 7))
    assert all(r["total"] == 6 for r in records if r["stage"] == "gaussian")
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["iterations"] == 6 and report["stop_reason"] == "completed"
    assert len(report["loss_curve"]) == 6
    volume = Volume.read(out / "volume.nrrd")
    assert volume.array.shape == (10, 10, 10) and volume.spacing == pytest.approx((4.0, 4.0, 4.0))
    assert volume.origin == pytest.approx((-18.0, -18.0, -18.0))
    assert Volume.read(out / "bone.nrrd").array.dtype == np.uint8
    coverage = Volume.read(out / "coverage.nrrd").array
    assert coverage.max() <= 4 and coverage.min() >= 0
    assert (out / "report.html").is_file() and (out / "previews" / "slices_center.png").is_file()


def test_evaluate_prints_metrics(tmp_path, capsys):
    values = np.random.default_rng(0).uniform(0, 0.05, (8, 9, 10)).astype(np.float32)
    Volume(values, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).write(tmp_path / "a.nrrd")
    Volume(values * 1.1, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).write(tmp_path / "b.nrrd")
    status, out, _ = _run(capsys, "evaluate", str(tmp_path / "a.nrrd"), str(tmp_path / "b.nrrd"))
    result = json.loads(out)
    assert status == 0 and set(result) == {"psnr", "ssim", "dice", "bone_threshold"}
    assert 15 < result["psnr"] < 40


def test_console_script_runs_as_module(tmp_path):
    """``python -m ixgs`` (what the Slicer module starts) gives the same refusal and status."""
    process = subprocess.run([sys.executable, "-m", "ixgs", "reconstruct", str(tmp_path / "none"), "-o",
                              str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.strip().startswith("ixgs: error:") and len(process.stderr.strip().splitlines()) == 1


def test_simulate_writes_a_readable_scan_with_reference(tmp_path, capsys):
    from ixgs.scan import read_scan

    status, out, _ = _run(capsys, "simulate", "--phantom", "knee", "--views", "3", "--detector", "32", "--seed",
                          "2", "--transmission", "--progress", "none", "-o", str(tmp_path / "knee"))
    assert status == 0 and out.strip() == str(tmp_path / "knee")
    meta = json.loads((tmp_path / "knee" / "scan.json").read_text())
    assert meta["intensity"] == "transmission" and meta["i0"] > 0
    scan = read_scan(tmp_path / "knee")
    assert len(scan.views) == 3 and scan.views[0].shape == (32, 32)
    assert max(view.image.max() for view in scan.views) > 1.0  # bone and soft tissue attenuate
    assert Volume.read(scan.reference_volume).array.max() > 0.03  # cortical bone, 1/mm
