"""Checkpoints never destroy or run anything, refuse another run's state, and resume exactly."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from ixgs.cli import main
from ixgs.reconstruct import ReconstructionSettings, reconstruct
from ixgs.scan import read_scan
from ixgs.training.config import TrainingConfig

# Densify every 4 steps from the start, so a resume crosses densification rounds.
CONFIG = TrainingConfig(densify=True, densify_every=4, densify_from=0.0, densify_until=1.0)


def _settings(**overrides) -> ReconstructionSettings:
    values = dict(preset="fast", iterations=12, gaussians=300, voxel_size_mm=6.0, device="cpu", seed=0,
                  init="random", stop_on_plateau=False)
    values.update(overrides)
    return ReconstructionSettings(**values)


@pytest.fixture(scope="module")
def knee(small_knee_scan):
    return read_scan(small_knee_scan)


def _cli(capsys, *argv):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip().splitlines()


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_a_folder_as_checkpoint_is_refused_before_the_run(tmp_path, small_knee_scan, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    before = _tree(folder)
    status, lines = _cli(capsys, "reconstruct", small_knee_scan, "-o", tmp_path / "out", "--iterations", "5",
                         "--checkpoint", folder)
    assert status == 2 and len(lines) == 1 and "setting 'checkpoint'" in lines[0] and "is a folder" in lines[0]
    assert _tree(folder) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("make_path, message", [
    (lambda d: d / "missing" / "state.pt", "does not exist"),
    (lambda d: d / "scan.json", "not an IXGS checkpoint"),  # someone else's file is never overwritten
])
def test_unusable_checkpoint_paths_are_refused(tmp_path, small_knee_scan, capsys, make_path, message):
    (tmp_path / "scan.json").write_text("{}")
    status, lines = _cli(capsys, "reconstruct", small_knee_scan, "-o", tmp_path / "out", "--iterations", "5",
                         "--checkpoint", make_path(tmp_path))
    assert status == 2 and len(lines) == 1 and "setting 'checkpoint'" in lines[0] and message in lines[0]
    assert (tmp_path / "scan.json").read_text() == "{}" and not (tmp_path / "out").exists()


class _Payload:
    """Loading this with pickle would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("packaging", ["pickle", "torch.save"])
def test_a_crafted_checkpoint_does_not_run(tmp_path, small_knee_scan, capsys, packaging):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    if packaging == "pickle":
        evil.write_bytes(pickle.dumps({"format": "ixgs-checkpoint-1", "x": _Payload(marker)}))
    else:
        torch.save({"format": "ixgs-checkpoint-1", "x": _Payload(marker)}, evil)
    assert not marker.exists()
    status, lines = _cli(capsys, "reconstruct", small_knee_scan, "-o", tmp_path / "out", "--iterations", "5",
                         "--init", "random", "--resume", evil)
    assert status == 2 and len(lines) == 1 and str(evil) in lines[0] and "not a usable IXGS checkpoint" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_another_scans_or_settings_checkpoint_is_refused_naming_what_differs(knee, tmp_path):
    checkpoint = tmp_path / "state.pt"
    reconstruct(knee, _settings(iterations=4, checkpoint=checkpoint, checkpoint_every=4), config=CONFIG)
    with pytest.raises(ValueError, match=r"differs in setting 'gaussians' \(300 vs 400\)"):
        reconstruct(knee, _settings(gaussians=400, resume=checkpoint), config=CONFIG)
    with pytest.raises(ValueError, match="differs in grid"):
        reconstruct(knee, _settings(voxel_size_mm=5.0, resume=checkpoint), config=CONFIG)
    with pytest.raises(ValueError, match="differs in training configuration"):
        reconstruct(knee, _settings(resume=checkpoint), config=TrainingConfig())
    other = read_scan(knee.path)
    other.views[3].image[5, 5] += 0.5  # one pixel of one view
    with pytest.raises(ValueError, match=r"state\.pt: made for a different run; differs in scan content"):
        reconstruct(other, _settings(resume=checkpoint), config=CONFIG)


@pytest.mark.parametrize("init, refine_poses", [("random", False), ("sart", True)])
def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(knee, tmp_path, init, refine_poses):
    checkpoint = tmp_path / "state.pt"
    settings = dict(iterations=14, init=init, refine_poses=refine_poses, views_per_step=2)
    whole = reconstruct(knee, _settings(**settings, checkpoint=checkpoint, checkpoint_every=10), config=CONFIG)
    # The checkpoint holds step 10 (between densification rounds 8 and 12); the run went on to 14.
    resumed = reconstruct(knee, _settings(**settings, resume=checkpoint), config=CONFIG)
    assert [row[0] for row in resumed.loss_curve] == list(range(14))
    assert [row[1] for row in resumed.loss_curve] == [row[1] for row in whole.loss_curve]
    np.testing.assert_array_equal(resumed.volume.array, whole.volume.array)
    assert resumed.densification[-1]["total"] == whole.densification[-1]["total"] == len(whole.model)
    assert len(whole.densification) == 3 and [row["iteration"] for row in resumed.densification] == [4, 8, 12]
    assert resumed.pose_corrections == whole.pose_corrections
    # The warm start is in the checkpoint: the resumed run does not recompute it.
    assert "warm_start" in [s["name"] for s in whole.stages]
    assert "warm_start" not in [s["name"] for s in resumed.stages]
