"""Paired data for the learned standardization: (realistic view, bone-enhanced DRR) on one geometry.

A data folder holds ``manifest.json`` and two folders of float32 NRRD images::

    {"format": "ixgs.standardization-pairs", "version": 1, "seed": 0,
     "target": {"soft_tissue_weight": 0.5, "bone_weight": 1.5, "unit": "mm x 1/mm"},
     "pairs": [{"input": "inputs/000.nrrd", "target": "targets/000.nrrd", ...metadata}, ...]}

``input`` is what standardization receives (attenuation-like: -log of a raw view or a display
image), ``target`` the bone-enhanced DRR of :mod:`.target` in line-integral units. Generated data
come from seeded random phantoms x random C-arm poses x random realism; a site's own pairs (real
views of a scan and DRRs of its registered CT) use the same format (:func:`pairs_from_scan`), so the
same trainer fine-tunes on them.

Phantom seeds of generated data start at :data:`TRAINING_PHANTOM_SEED_START`; evaluation
(tests, benchmark) uses seeds below it, so it never sees a training phantom.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..geometry import Roi
from ..phantom import PHANTOMS, default_roi, make_phantom
from ..scan import read_scan
from ..simulate import fitting_pixel_spacing, random_c_arm_poses
from ..output_folder import output_folder
from ..volume import Volume, read_json_object
from .realism import random_realism, realistic_view
from .target import BONE_WEIGHT, SOFT_TISSUE_WEIGHT, bone_enhanced_drr, material_path_lengths, target_from_path_lengths

FORMAT = "ixgs.standardization-pairs"
VERSION = 1
MANIFEST = "manifest.json"
KIND = "standardization-pairs"  # the output-folder kind (ixgs.output_folder)
TRAINING_PHANTOM_SEED_START = 1000


def _write_image(image: np.ndarray, path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(image, np.float32)), str(path), True)


def _target_metadata() -> dict:
    return {"definition": "ixgs.standardize.target", "soft_tissue_weight": SOFT_TISSUE_WEIGHT,
            "bone_weight": BONE_WEIGHT, "unit": "mm x 1/mm"}


def _write_pairs(out_dir: Path, inputs: list[np.ndarray], targets: list[np.ndarray], metadata: list[dict],
                 extra: dict, read_from=()) -> Path:
    """Write images and manifest atomically (a failure leaves nothing at ``out_dir``); ``read_from``
    are the input paths, never replaced."""
    entries = []
    with output_folder(out_dir, KIND, read_from) as temporary:
        (temporary / "inputs").mkdir()
        (temporary / "targets").mkdir()
        for index, (image, target, meta) in enumerate(zip(inputs, targets, metadata)):
            entry = {"input": f"inputs/{index:04d}.nrrd", "target": f"targets/{index:04d}.nrrd", **meta}
            _write_image(image, temporary / entry["input"])
            _write_image(target, temporary / entry["target"])
            entries.append(entry)
        manifest = {"format": FORMAT, "version": VERSION, **extra, "target": _target_metadata(), "pairs": entries}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def generate_pairs(n_pairs: int, seed: int = 0, detector_px: int = 128, views_per_phantom: int = 12,
                   voxel_size_mm: float = 1.5, first_phantom_seed: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list, list, list]:
    """``n_pairs`` (input, target, metadata) triples in memory: phantoms (spine and knee alternating,
    seeds counting up from ``first_phantom_seed``, default :data:`TRAINING_PHANTOM_SEED_START` +
    10000 ``seed``) x ``views_per_phantom`` random poses x random realism.

    Each phantom's ROI is jittered by up to 15 mm and its detector zoom by 0.8-1.25 so views vary
    in position and scale. ``progress(done, total)`` is called after each pair.
    """
    if n_pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {n_pairs}")
    if views_per_phantom < 1 or detector_px < 16:
        raise ValueError(f"need views_per_phantom >= 1 and detector_px >= 16, got {views_per_phantom}, {detector_px}")
    if first_phantom_seed is None:
        first_phantom_seed = TRAINING_PHANTOM_SEED_START + 10_000 * seed
    rng = np.random.default_rng(seed)
    shape = (detector_px, detector_px)
    inputs, targets, metadata = [], [], []
    phantom_index = 0
    while len(inputs) < n_pairs:
        name = PHANTOMS[phantom_index % len(PHANTOMS)]
        phantom_seed = first_phantom_seed + phantom_index
        phantom_index += 1
        ct = make_phantom(name, seed=phantom_seed, voxel_size_mm=voxel_size_mm)
        base = default_roi(name)
        roi = Roi(tuple(float(c) for c in np.asarray(base.center) + rng.uniform(-15.0, 15.0, 3)), base.size)
        poses = random_c_arm_poses(min(views_per_phantom, n_pairs - len(inputs)), rng)
        spacing = fitting_pixel_spacing(poses, roi, detector_px) * float(rng.uniform(0.8, 1.25))
        for pose in poses:
            P = pose.projection_matrix(shape, (spacing, spacing), roi.center)
            water_mm, bone_mm = material_path_lengths(ct, P, shape)
            settings = random_realism(rng)
            inputs.append(realistic_view(water_mm, bone_mm, settings, rng))
            targets.append(target_from_path_lengths(water_mm, bone_mm))
            metadata.append({"phantom": name, "phantom_seed": phantom_seed, "projection_matrix": P.tolist(),
                             "pose": {"primary_deg": pose.primary_deg, "secondary_deg": pose.secondary_deg,
                                      "source_to_detector_mm": pose.source_to_detector_mm,
                                      "source_to_isocenter_mm": pose.source_to_isocenter_mm},
                             "realism": settings.to_dict()})
            if progress is not None:
                progress(len(inputs), n_pairs)
    return inputs, targets, metadata


def make_standardization_data(out_dir: str | os.PathLike, n_pairs: int, seed: int = 0, detector_px: int = 128,
                              views_per_phantom: int = 12, voxel_size_mm: float = 1.5,
                              progress: Callable[[int, int], None] | None = None) -> Path:
    """``ixgs make-standardization-data``: :func:`generate_pairs` with training phantoms, written to a folder."""
    inputs, targets, metadata = generate_pairs(n_pairs, seed, detector_px, views_per_phantom, voxel_size_mm,
                                               progress=progress)
    extra = {"seed": seed, "source": "generated", "detector_px": detector_px, "voxel_size_mm": voxel_size_mm}
    return _write_pairs(Path(out_dir), inputs, targets, metadata, extra)


def pairs_from_scan(scan_path: str | os.PathLike, ct_path: str | os.PathLike, out_dir: str | os.PathLike,
                    device="cpu") -> Path:
    """A site's own pairs: each view of a real scan with the bone-enhanced DRR of the registered CT (HU,
    same LPS frame, axis-aligned) at that view's projection matrix."""
    scan = read_scan(scan_path)
    ct = Volume.read(ct_path)
    targets = []
    for view in scan.views:
        try:
            targets.append(bone_enhanced_drr(ct, view.projection_matrix, view.shape, device))
        except ValueError as error:
            raise ValueError(f"{ct_path}: {error}") from None
    metadata = [{"scan_view": view.name, "projection_matrix": view.projection_matrix.tolist()} for view in scan.views]
    extra = {"source": "scan", "scan": str(scan.path), "ct": str(ct_path)}
    return _write_pairs(Path(out_dir), [view.image for view in scan.views], targets, metadata, extra,
                        [scan_path, ct_path])


def read_pairs(data_dir: str | os.PathLike) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Inputs, targets (float32 2D, same shape per pair) and the manifest; refuses bad data naming the file."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    manifest = read_json_object(manifest_path, "no manifest (not a standardization data folder)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{manifest_path}: not a {FORMAT!r} version {VERSION} manifest")
    pairs = manifest.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(f"{manifest_path}: field 'pairs' must be a non-empty list")
    inputs, targets = [], []
    for index, entry in enumerate(pairs):
        label = f"{manifest_path}: pair {index}"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("input", "target")):
            raise ValueError(f"{label}: needs 'input' and 'target' paths")
        images = [_read_image(data_dir / entry[key], f"{label} ({entry[key]})") for key in ("input", "target")]
        if images[0].shape != images[1].shape:
            raise ValueError(f"{label}: input {images[0].shape} and target {images[1].shape} differ in shape")
        inputs.append(images[0])
        targets.append(images[1])
    return inputs, targets, manifest


def _read_image(path: Path, label: str) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{label}: image file not found")
    try:
        array = np.squeeze(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).astype(np.float32)
    except RuntimeError:
        raise ValueError(f"{label}: image cannot be read") from None
    if array.ndim != 2:
        raise ValueError(f"{label}: image must be 2D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{label}: image has NaN or Inf pixels")
    return array
