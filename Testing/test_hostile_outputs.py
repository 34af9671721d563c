"""Hostile output paths (issue 13, "must not lose data"): every command refuses to replace what is not
provably its own earlier output, never replaces its input, cleans up on SIGTERM, sweeps what a killed
run left, refuses a concurrent run, and tells bad input (exit 2) from a bug (exit 1).

Each case builds the setup in a temporary folder and checks the exit status, the one-line message
(naming the folder or file), no traceback, that nothing else in the folder changed (a hash of the
tree before and after) and that no hidden partial folder or lock file is left.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ring_of_matrices
from test_calibration import POSES, phantom_image, true_and_prior
from test_peers import write_r2_scene

from ixgs.calibration import helix_layout
from ixgs.cli import main
from ixgs.geometry import Roi
from ixgs.scan import write_scan

MARKER = ".ixgs-output"
FAST = ["--method", "sart", "--iterations", "1", "--voxel-size", "4", "--progress", "none", "--device", "cpu"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file contents hashed, folders and links named."""
    digest = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            digest[key] = "dir"
        else:
            digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def leftovers(root: Path) -> list[str]:
    """Hidden partial folders, aside folders and lock files of ours anywhere under ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*")
                  if any(tag in p.name for tag in ("ixgs-partial", "ixgs-old", "ixgs-lock", ".partial")))


def user_scan(folder: Path, views: int = 4) -> Path:
    """A scan as a user (or an older ixgs) made it: no output marker."""
    images = [np.full((24, 30), 0.5, np.float32) for _ in range(views)]
    for image in images:
        image[8:16, 10:20] = 2.0
    write_scan(folder, images, ring_of_matrices(views, shape=(24, 30), focal_px=90.0),
               roi=Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)))
    (folder / MARKER).unlink(missing_ok=True)
    return folder


def phantom_scan(folder: Path) -> Path:
    """Images of the helix bead phantom that calibrate cleanly."""
    layout, rng = helix_layout(), np.random.default_rng(2)
    priors, images = [], []
    for primary, secondary in POSES[:3]:
        true, prior = true_and_prior(primary, secondary)
        priors.append(prior)
        images.append(phantom_image(layout, true, rng))
    return write_scan(folder, images, priors)


def _run(capsys, argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- refusals: (setup in tmp_path, returns argv and the fragments the message must hold) --------------

def _demo_over_user_folder(d):
    (d / "thesis").mkdir()
    (d / "thesis" / "notes.txt").write_text("two years of work")
    return ["demo", "-o", d / "thesis"], [str(d / "thesis"), "is not an ixgs output", "notes.txt"]


def _reconstruct_into_its_scan(d):
    scan = user_scan(d / "scan")
    (scan / "report.json").write_text("{}")  # looked like an output to the old check
    return ["reconstruct", scan, "-o", scan, *FAST], [str(scan), "is the input"]


def _reconstruct_into_the_scans_parent(d):
    scan = user_scan(d / "patients" / "scan")
    (d / "patients" / "report.json").write_text("{}")
    return ["reconstruct", scan, "-o", d / "patients", *FAST], [str(d / "patients"), "contains the input"]


def _standardize_into_the_scans_parent(d):
    study = user_scan(d / "study")  # a scan with a cropped scan kept inside it, and notes
    scan = user_scan(study / "crop")
    (study / "notes.txt").write_text("patient notes")
    return (["standardize", scan, "-o", study, "--method", "classical"], [str(study), "contains the input"])


def _calibrate_onto_its_input(d):
    scan = phantom_scan(d / "phantom")
    return ["calibrate", scan, "-o", scan], [str(scan), "is the input"]


def _import_peer_over_a_user_scan(d):
    write_r2_scene(d / "scene")
    scan = user_scan(d / "existing")
    return (["import-peer", d / "scene", "--format", "r2gaussian", "-o", scan],
            [str(scan), "is not an ixgs output", "scan.json"])


def _reconstruct_over_our_output_with_user_files(d, capsys):
    scan = user_scan(d / "scan")
    assert main(["reconstruct", str(scan), "-o", str(d / "out"), *FAST]) == 0
    capsys.readouterr()
    (d / "out" / "my_measurements.csv").write_text("1,2,3")
    return ["reconstruct", scan, "-o", d / "out", *FAST], [str(d / "out"), "did not write", "my_measurements.csv"]


def _reconstruct_over_our_scan(d):
    scan = user_scan(d / "scan")
    other = write_scan(d / "other", [np.ones((24, 30), np.float32)] * 2, ring_of_matrices(2, shape=(24, 30)))
    return ["reconstruct", scan, "-o", other, *FAST], [str(other), "is an ixgs scan output, not a reconstruction"]


def _reconstruct_onto_a_link(d):
    (d / "mine").mkdir()
    (d / "mine" / "data.txt").write_text("mine")
    (d / "link").symlink_to(d / "mine")
    scan = user_scan(d / "scan")
    return ["reconstruct", scan, "-o", d / "link", *FAST], [str(d / "link"), "symbolic link"]


@pytest.mark.parametrize("setup", [
    _demo_over_user_folder, _reconstruct_into_its_scan, _reconstruct_into_the_scans_parent,
    _standardize_into_the_scans_parent, _calibrate_onto_its_input, _import_peer_over_a_user_scan,
    _reconstruct_over_our_output_with_user_files, _reconstruct_over_our_scan, _reconstruct_onto_a_link,
], ids=lambda f: f.__name__.strip("_"))
def test_refused_outputs_change_nothing(tmp_path, capsys, setup):
    argv, fragments = setup(tmp_path, capsys) if "capsys" in setup.__code__.co_varnames else setup(tmp_path)
    before = tree_digest(tmp_path)
    started = time.perf_counter()
    status, out, err = _run(capsys, argv)
    line = _one_line(err)
    assert status == 2 and line.startswith("ixgs: error: ")
    assert all(fragment in line for fragment in fragments), line
    assert tree_digest(tmp_path) == before
    assert leftovers(tmp_path) == []
    assert time.perf_counter() - started < 10  # refused before any work (the demo alone takes minutes)


# --- replacing our own output ---------------------------------------------------------------------------

def test_our_own_output_is_replaced_and_kept_until_the_new_one_is_complete(tmp_path, capsys):
    from ixgs.output_folder import output_folder

    scan = user_scan(tmp_path / "scan")
    out = tmp_path / "out"
    assert main(["reconstruct", str(scan), "-o", str(out), *FAST, "--seed", "1"]) == 0
    first = tree_digest(out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "reconstruction" and marker["format"] == "ixgs.output"
    assert sorted(marker["files"]) == sorted(k for k, v in first.items() if v != "dir" and k != MARKER)
    assert main(["reconstruct", str(scan), "-o", str(out), *FAST, "--iterations", "2"]) == 0
    capsys.readouterr()
    second = json.loads((out / "report.json").read_text())
    assert second["settings"]["iterations"] == 2 and leftovers(tmp_path) == []
    # What every writer does: while the new output is being written the old one is untouched.
    old = tree_digest(out)
    with output_folder(out, "reconstruction") as temporary:
        (temporary / "volume.nrrd").write_text("new")
        assert tree_digest(out) == old
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "volume.nrrd"]
    assert leftovers(tmp_path) == []


# --- real processes: SIGTERM, SIGKILL and a concurrent run ---------------------------------------------

def _engine(*argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ixgs", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(predicate, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _partial_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if "partial" in p.name]


def test_sigterm_during_the_write_leaves_nothing(tmp_path):
    """The demo writes into its hidden partial folder from the start: SIGTERM it there."""
    demo = _engine("demo", "-o", tmp_path / "demo", "--device", "cpu")
    try:
        _wait_for(lambda: _partial_folders(tmp_path), demo)
        demo.send_signal(signal.SIGTERM)
        _, err = demo.communicate(timeout=120)
    finally:
        demo.kill()
    assert demo.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "ixgs: cancelled" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_cancel_whose_exception_was_lost_still_stops_the_run(tmp_path, small_roi, capsys):
    """Python ignores a signal handler's exception raised while a finaliser runs (CI once saw a run go on
    after its parent closed stdin): the request is a flag the reconstruction polls, not only an exception."""
    import threading

    from ixgs import cli

    images = [np.random.default_rng(k).random((24, 24), dtype=np.float32) for k in range(4)]
    scan = write_scan(tmp_path / "scan", images, ring_of_matrices(4, shape=(24, 24)), roi=small_roi)

    def request_once_running():
        while not (tmp_path / ".out.ixgs-lock").exists():
            time.sleep(0.02)
        time.sleep(1.0)  # into the reconstruction
        cli._cancel_request.signum = signal.SIGTERM  # what the handler records before its exception is lost

    requester = threading.Thread(target=request_once_running, daemon=True)
    requester.start()
    started = time.monotonic()
    status = main(["reconstruct", str(scan), "-o", str(tmp_path / "out"), "--preset", "fast", "--device", "cpu",
                   "--voxel-size", "6", "--iterations", "1000000", "--no-plateau-stop", "--time-budget", "90",
                   "--progress", "none"])
    requester.join(timeout=5)
    assert status == 128 + signal.SIGTERM and time.monotonic() - started < 60
    assert capsys.readouterr().err.strip().splitlines()[-1] == "ixgs: cancelled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


def test_sigterm_while_replacing_our_own_output_keeps_the_old_one(tmp_path):
    from ixgs.output_folder import output_folder

    with output_folder(tmp_path / "demo", "demo") as temporary:  # an earlier demo output
        (temporary / "metrics.json").write_text("{}")
    before = tree_digest(tmp_path)
    demo = _engine("demo", "-o", tmp_path / "demo", "--device", "cpu")
    try:
        _wait_for(lambda: _partial_folders(tmp_path), demo)
        assert tree_digest(tmp_path / "demo") == {k[5:]: v for k, v in before.items() if k.startswith("demo/")}
        demo.send_signal(signal.SIGTERM)
        _, err = demo.communicate(timeout=120)
    finally:
        demo.kill()
    assert demo.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert tree_digest(tmp_path) == before


def test_a_killed_runs_partial_folder_and_lock_are_swept_by_the_next_run(tmp_path, capsys):
    scan = user_scan(tmp_path / "scan")
    demo = _engine("demo", "-o", tmp_path / "out", "--device", "cpu")
    try:
        _wait_for(lambda: _partial_folders(tmp_path), demo)
    finally:
        demo.kill()  # SIGKILL: no cleanup at all
        demo.communicate()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(left) == 2 and left[0] == ".out.ixgs-lock" and "ixgs-partial" in left[1]  # their owner is dead
    before = tree_digest(scan)
    status, _, err = _run(capsys, ["reconstruct", scan, "-o", tmp_path / "out", *FAST])
    assert status == 0, err
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / MARKER).is_file()
    assert tree_digest(scan) == before


def test_an_output_left_aside_by_an_interrupted_swap_is_put_back(tmp_path, capsys):
    """A crash between 'old output aside' and 'new output in' leaves the old one under its aside name."""
    from ixgs.output_folder import reserve

    scan = user_scan(tmp_path / "scan")
    assert main(["reconstruct", str(scan), "-o", str(tmp_path / "out"), *FAST]) == 0
    capsys.readouterr()
    old = tree_digest(tmp_path / "out")
    (tmp_path / "out").rename(tmp_path / ".out.ixgs-old-0123abcd")
    with reserve(tmp_path / "out", "reconstruction"):
        assert tree_digest(tmp_path / "out") == old
    assert leftovers(tmp_path) == []


def test_a_concurrent_run_to_the_same_output_is_refused(tmp_path, capsys):
    """Two processes: a demo writing ``out`` and this one, asked to reconstruct into ``out`` meanwhile."""
    scan = user_scan(tmp_path / "scan")
    first = _engine("demo", "-o", tmp_path / "out", "--device", "cpu")
    try:
        _wait_for(lambda: (tmp_path / ".out.ixgs-lock").exists(), first)
        status, _, err = _run(capsys, ["reconstruct", scan, "-o", tmp_path / "out", *FAST])
        assert first.poll() is None  # the first run was still going
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        first.kill()
    line = _one_line(err)
    assert status == 2
    assert str(tmp_path / "out") in line and "another ixgs run is writing it" in line and f"pid {first.pid}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


# --- exit codes -------------------------------------------------------------------------------------------

def test_an_internal_error_is_exit_1_with_the_traceback_in_a_log(tmp_path, capsys, monkeypatch):
    """A ValueError raised inside numpy (not a refusal of ours) is a bug, not the user's input."""
    import ixgs.scan

    def broken_reader(path):
        return np.zeros(3).reshape(2, 2)

    scan = user_scan(tmp_path / "scan")
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    monkeypatch.setattr(ixgs.scan, "read_scan", broken_reader)
    before = tree_digest(scan)
    status, _, err = _run(capsys, ["reconstruct", scan, "-o", tmp_path / "out", *FAST])
    line = _one_line(err)
    assert status == 1 and "a bug in ixgs" in line and "ValueError: cannot reshape" in line
    [log] = logs.iterdir()
    assert str(log) in line and "Traceback" in log.read_text() and "broken_reader" in log.read_text()
    assert tree_digest(scan) == before and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_our_own_refusals_stay_exit_2(tmp_path, capsys):
    status, _, err = _run(capsys, ["reconstruct", tmp_path / "missing", "-o", tmp_path / "out"])
    assert status == 2 and "no scan.json" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


def _make_unwritable(folder: Path) -> None:
    """chmod for a user; root writes anywhere, but not into an immutable folder."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no folder is unwritable")


def _make_writable(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


def test_an_unwritable_output_parent_is_refused_before_any_work_naming_the_output(tmp_path):
    """The lock is the first thing written next to the output: its failure names ``-o``, not a hidden path."""
    scan = user_scan(tmp_path / "scan")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    before = tree_digest(tmp_path)
    _make_unwritable(readonly)
    try:
        process = subprocess.run([sys.executable, "-m", "ixgs", "reconstruct", str(scan), "-o", str(readonly / "out"),
                                  "--method", "sart", "--iterations", "1", "--device", "cpu", "--progress", "json"],
                                 capture_output=True, text=True, timeout=120)
    finally:
        _make_writable(readonly)
    line = _one_line(process.stderr)
    assert process.returncode == 2 and line.startswith(f"ixgs: error: {readonly / 'out'}: ")
    assert "cannot write in its folder" in line and "partial" not in line
    assert process.stdout == ""  # no progress record: refused before the reconstruction started
    assert tree_digest(tmp_path) == before
