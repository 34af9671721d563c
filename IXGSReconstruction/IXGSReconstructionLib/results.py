"""Load a finished reconstruction into the scene (all or nothing), keep its files, find its report."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import slicer

from ixgs.volume import Volume

from .nodes import bone_segmentation, otsu_threshold, remove_nodes, show_volume_rendering, volume_node_from_volume

OUTPUT_FILES = ("volume.nrrd", "bone.nrrd", "coverage.nrrd", "report.json")


@dataclass
class ReconstructionResult:
    volume_node: object
    coverage_node: object
    segmentation_node: object
    bone_threshold: float
    report: dict

    @property
    def nodes(self) -> list:
        return [self.volume_node, self.coverage_node, self.segmentation_node]


def load_results(output_path: str | Path, name: str = "IXGS", volume_rendering: bool = True) -> ReconstructionResult:
    """Volume (1/mm), coverage map and thresholded bone segmentation from an ``ixgs reconstruct`` folder.

    The bone threshold starts at the engine's ``report.json`` ``bone_threshold`` (its Otsu value),
    or Otsu on the volume when the report has none. On any error the nodes added so far are removed,
    so a failed load leaves the scene as it was.
    """
    output_path = Path(output_path)
    missing = [f for f in OUTPUT_FILES if not (output_path / f).is_file()]
    if missing:
        raise ValueError(f"{output_path}: reconstruction output is incomplete, missing {', '.join(missing)}")
    report = json.loads((output_path / "report.json").read_text())
    volume = Volume.read(output_path / "volume.nrrd")
    coverage = Volume.read(output_path / "coverage.nrrd")
    added = []
    try:
        volume_node = volume_node_from_volume(volume, slicer.mrmlScene.GenerateUniqueName(name))
        added.append(volume_node)
        coverage_node = volume_node_from_volume(coverage, slicer.mrmlScene.GenerateUniqueName(f"{name} coverage"))
        added.append(coverage_node)
        threshold = report.get("bone_threshold")
        threshold = float(threshold) if threshold is not None else otsu_threshold(volume_node)
        segmentation_node = bone_segmentation(volume_node, threshold)
        added.append(segmentation_node)
        if volume_rendering:
            show_volume_rendering(volume_node, threshold)
    except Exception:
        remove_nodes(added)
        raise
    return ReconstructionResult(volume_node, coverage_node, segmentation_node, threshold, report)


def check_keep_destination(destination: str | Path) -> None:
    """Refuse, before a run, a folder that :func:`keep_outputs` may not replace (ixgs.output_folder)."""
    from ixgs.output_folder import check_output
    from ixgs.outputs import KIND

    check_output(destination, KIND)


def keep_outputs(output_path: str | Path, destination: str | Path) -> Path:
    """Copy all of the run's files, previews included, to a folder the user chose (the run's own
    folder is temporary): in one atomic step, replacing only an earlier IXGS output."""
    from ixgs.output_folder import MARKER, output_folder
    from ixgs.outputs import KIND

    with output_folder(destination, KIND) as temporary:
        shutil.copytree(output_path, temporary, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER))
    return Path(destination)


def report_path(output_path: str | Path) -> Path | None:
    """The run's ``report.html``, when the output folder has one."""
    path = Path(output_path) / "report.html"
    return path if path.is_file() else None
