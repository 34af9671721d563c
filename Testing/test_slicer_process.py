"""The background reconstruction process: arguments, JSON progress, success, failure and cancel.

The contract side is played by a tiny real Python script (the engine's CLI is tested by its own
tests; a run of the real CLI is added when ``python -m ixgs`` is available).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs PyPI slicer-core (pip install slicer-core)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "IXGSReconstruction"))

from IXGSReconstructionLib.process import (  # noqa: E402
    ReconstructionProcess,
    ReconstructionSettings,
    format_progress,
    parse_progress,
)
from ixgs.cli import PARENT_WATCH_ENV, _settings_from, build_parser, settings_arguments  # noqa: E402
from ixgs.geometry import Roi  # noqa: E402

CONTRACT_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from ixgs.volume import Volume
    out, mode = Path(sys.argv[1]), sys.argv[2]
    print("loading scan", flush=True)
    for i in range(1, 4):
        print(json.dumps({"iteration": i, "total": 3, "loss": 1.0 / i, "elapsed_s": 0.1 * i,
                          "eta_s": 0.1 * (3 - i), "stage": "optimize"}), flush=True)
        if mode == "hang":
            time.sleep(60)
    if mode == "fail":
        print("warning: something", file=sys.stderr)
        print("error: view 2 (views/002.nrrd): image has NaN pixels", file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True)
    volume = Volume(np.ones((2, 3, 4), np.float32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for name in ("volume", "bone", "coverage"):
        volume.write(out / f"{name}.nrrd")
    (out / "report.json").write_text(json.dumps({"bone_threshold": 0.5}))
''')


def _run(tmp_path: Path, mode: str) -> ReconstructionProcess:
    script = tmp_path / "contract.py"
    script.write_text(CONTRACT_SCRIPT)
    run = ReconstructionProcess([sys.executable, str(script), "{output}", mode], output_root=tmp_path)
    run.start()
    return run


def test_settings_become_cli_arguments():
    settings = ReconstructionSettings(method="sart", preset="fast", init="sart", device="cpu", seed=7,
                                      voxel_size_mm=1.5, roi=Roi((1.0, 2.0, 3.0), (40.0, 50.0, 60.0)))
    args = settings_arguments(settings)
    assert args[args.index("--roi") + 1:args.index("--roi") + 7] == ["1.0", "2.0", "3.0", "40.0", "50.0", "60.0"]
    assert args[args.index("--voxel-size") + 1] == "1.5" and args[args.index("--seed") + 1] == "7"
    # Every setting the module can choose survives the trip through the command line.
    chosen = ReconstructionSettings(preset="high", iterations=123, gaussians=4567, time_budget_s=30.0, seed=3,
                                    refine_poses=True, views_per_step=2, stop_on_plateau=False,
                                    compile=True, memory_budget_mib=512.0,
                                    roi=Roi((1.0, 2.0, 3.0), (40.0, 50.0, 60.0)))
    parsed = build_parser().parse_args(["reconstruct", "scan", "-o", "out", *settings_arguments(chosen)])
    assert _settings_from(parsed) == chosen
    with pytest.raises(ValueError, match="device"):
        settings_arguments(ReconstructionSettings(device="tpu"))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        settings_arguments(ReconstructionSettings(voxel_size_mm=0.0))
    with pytest.raises(ValueError, match="scan.json"):
        ReconstructionProcess.for_scan("/nonexistent/scan", ReconstructionSettings())


def test_progress_lines_are_parsed_and_other_output_is_kept():
    record = parse_progress('{"iteration": 120, "total": 400, "loss": 0.0123, "eta_s": 42.4, "stage": "optimize"}')
    assert record["iteration"] == 120
    assert format_progress(record) == "optimize 120/400  loss 0.0123  ETA 0:42"
    assert parse_progress("Loading scan ...") is None
    assert parse_progress('{"unrelated": 1}') is None
    assert parse_progress("{not json") is None


def test_background_run_reports_progress_and_outputs(tmp_path):
    run = _run(tmp_path, "ok")
    records = []
    deadline = time.monotonic() + 30
    while not run.finished and time.monotonic() < deadline:
        records += run.poll()
        time.sleep(0.05)
    assert run.returncode == 0 and run.error == ""
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert run.last_progress["loss"] == pytest.approx(1 / 3)
    assert "loading scan" in run.log
    assert (run.output_path / "volume.nrrd").is_file()
    run.discard()
    assert not run.output_path.parent.exists()


def test_failure_reports_the_engine_error_and_leaves_nothing(tmp_path):
    run = _run(tmp_path, "fail")
    assert run.wait(timeout_s=30) == 2
    assert run.error == "error: view 2 (views/002.nrrd): image has NaN pixels"
    assert run.output_path is None
    assert list(tmp_path.glob("ixgs-run-*")) == []


def test_cancel_kills_the_process_and_leaves_nothing(tmp_path):
    run = _run(tmp_path, "hang")
    deadline = time.monotonic() + 30
    while run.last_progress is None and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    assert run.running and run.last_progress["iteration"] == 1
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 5.0
    assert run.finished and run.cancelled and run.error == "cancelled by the user"
    assert run.output_path is None
    assert list(tmp_path.glob("ixgs-run-*")) == []


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "ixgs" / "__main__.py").is_file(),
                    reason="the engine CLI (python -m ixgs) is not there yet")
def test_real_engine_cli_runs_in_the_background(tmp_path, small_roi):
    from conftest import ring_of_matrices
    from ixgs.scan import write_scan

    shape = (24, 24)
    images = [np.random.default_rng(k).random(shape, dtype=np.float32) for k in range(4)]
    scan = write_scan(tmp_path / "scan", images, ring_of_matrices(4, shape=shape), roi=small_roi)
    settings = ReconstructionSettings(method="sart", preset="fast", device="cpu", voxel_size_mm=6.0, iterations=2)
    run = ReconstructionProcess.for_scan(scan, settings, output_root=tmp_path)
    run.start()
    assert run.wait(timeout_s=120) == 0, run.error
    assert run.last_progress is not None and run.last_progress["total"] >= 1
    for name in ("volume.nrrd", "bone.nrrd", "coverage.nrrd", "report.json"):
        assert (run.output_path / name).is_file()

    # Loaded into MRML, the volume sits exactly where the engine's NRRD says (LPS -> RAS).
    import SimpleITK as sitk
    import slicer
    import vtk
    from IXGSReconstructionLib.results import load_results
    from ixgs.geometry import LPS_RAS_FLIP

    slicer.mrmlScene = slicer.vtkMRMLScene()
    result = load_results(run.output_path, volume_rendering=False)
    image = sitk.ReadImage(str(run.output_path / "volume.nrrd"))
    matrix = vtk.vtkMatrix4x4()
    result.volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    size = image.GetSize()
    for index in [(0, 0, 0), (size[0] - 1, 0, 0), (0, size[1] - 1, size[2] - 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((ijk_to_ras @ [*index, 1.0])[:3], LPS_RAS_FLIP[:3, :3] @ lps, atol=1e-6)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.volume_node), sitk.GetArrayFromImage(image))
    run.discard()


PARENT_SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from IXGSReconstructionLib.process import ReconstructionProcess, ReconstructionSettings
    settings = ReconstructionSettings(method="gaussian", preset="fast", device="cpu", voxel_size_mm=6.0,
                                      iterations=10 ** 6, stop_on_plateau=False)
    run = ReconstructionProcess.for_scan(sys.argv[1], settings, output_root=sys.argv[2])
    run.start()
    print(run.pid, flush=True)
    time.sleep(600)
''')


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL of the parent")
def test_the_engine_does_not_outlive_a_killed_slicer(tmp_path, small_roi):
    """Slicer killed mid-run: its end of the engine's stdin closes, and the engine cancels itself and
    cleans up instead of running on as an orphan."""
    from conftest import ring_of_matrices
    from ixgs.scan import write_scan

    images = [np.random.default_rng(k).random((24, 24), dtype=np.float32) for k in range(4)]
    scan = write_scan(tmp_path / "scan", images, ring_of_matrices(4, shape=(24, 24)), roi=small_roi)
    runs = tmp_path / "runs"
    runs.mkdir()
    lib = Path(__file__).resolve().parents[1] / "IXGSReconstruction"
    slicer_process = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, str(scan), str(runs), str(lib)],
                                      stdout=subprocess.PIPE, text=True)
    try:
        engine = int(slicer_process.stdout.readline())
        deadline = time.monotonic() + 120
        while not list(runs.glob("ixgs-run-*/.out.ixgs-lock")):  # the engine holds its output: it runs
            assert _alive(engine) and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        slicer_process.kill()
        slicer_process.wait()
    deadline = time.monotonic() + 60
    while _alive(engine):
        assert time.monotonic() < deadline, "the engine outlived its parent"
        time.sleep(0.1)
    [run_folder] = runs.iterdir()
    assert list(run_folder.iterdir()) == []  # no lock, no partial output left


def test_runs_started_for_a_scan_watch_their_parent(tmp_path, small_roi):
    run = ReconstructionProcess.for_scan(Path(__file__).parent / "nowhere.json", ReconstructionSettings())
    assert run.environment[PARENT_WATCH_ENV] == "stdin"


def test_the_engine_cancels_itself_when_its_stdin_closes_even_when_silent(tmp_path, small_roi):
    """The watch itself: no progress is printed (so no broken stdout pipe would stop the run)."""
    from conftest import ring_of_matrices
    from ixgs.scan import write_scan

    images = [np.random.default_rng(k).random((24, 24), dtype=np.float32) for k in range(4)]
    scan = write_scan(tmp_path / "scan", images, ring_of_matrices(4, shape=(24, 24)), roi=small_roi)
    with open(tmp_path / "log.txt", "w") as log:
        engine = subprocess.Popen([sys.executable, "-m", "ixgs", "reconstruct", str(scan), "-o", str(tmp_path / "out"),
                                   "--preset", "fast", "--device", "cpu", "--voxel-size", "6", "--iterations",
                                   "1000000", "--no-plateau-stop", "--progress", "none"],
                                  stdin=subprocess.PIPE, stdout=log, stderr=log,
                                  env={**os.environ, PARENT_WATCH_ENV: "stdin"})
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / ".out.ixgs-lock").exists():
                assert engine.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            engine.stdin.close()  # what the parent's death does
            assert engine.wait(timeout=60) == 128 + 15
        finally:
            engine.kill()
    assert (tmp_path / "log.txt").read_text().strip().splitlines()[-1] == "ixgs: cancelled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "scan"]
