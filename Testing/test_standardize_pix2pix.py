"""Pix2Pix standardization: architecture, any image size, training and resume, shipped weights
(checksum, quality on held-out phantoms), scans with unchanged geometry, refusals."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ring_of_matrices

from ixgs.metrics import ssim
from ixgs.scan import read_scan, write_scan
from ixgs.standardize import classical
from ixgs.standardize.pairs_data import TRAINING_PHANTOM_SEED_START, generate_pairs, make_standardization_data
from ixgs.standardize.pix2pix import (
    DEFAULT_WEIGHTS,
    PatchDiscriminator,
    TrainSettings,
    UnetGenerator,
    checksum_path,
    load_generator,
    pad_to_multiple,
    run_generator,
    standardize_image,
    standardize_scan_pix2pix,
    standardize_scan_with,
    train_standardizer,
)
from ixgs.standardize.target import TARGET_SCALE

# Shipped weights on held-out phantoms: mean SSIM to the target must beat identity and classical by this.
SSIM_MARGIN = 0.1


def affine_fit(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Best ``a * image + b`` (least squares): identity and classical are judged on structure, not scale."""
    design = np.stack([image.ravel(), np.ones(image.size)], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design, target.ravel().astype(np.float64), rcond=None)
    return (design @ coefficients).reshape(image.shape)


def test_generator_keeps_odd_sizes_and_discriminator_sees_70_pixels():
    torch.manual_seed(0)
    generator = UnetGenerator(ngf=4, depth=7).eval()
    for shape in ((37, 53), (3, 5), (130, 129)):
        image = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
        [out] = run_generator(generator, [image])
        assert out.shape == shape and np.all(np.abs(out) <= 1.0)
    padded, size = pad_to_multiple(torch.arange(15.0).reshape(1, 1, 3, 5), 128)
    assert tuple(padded.shape) == (1, 1, 128, 128) and size == (3, 5)
    np.testing.assert_array_equal(padded[0, 0, :3, :5].numpy(), np.arange(15.0).reshape(3, 5))
    # The PatchGAN's receptive field: the input pixels that can change one output logit span 70 x 70.
    discriminator = PatchDiscriminator(2, ndf=4).eval()
    x = torch.randn(1, 2, 128, 128, requires_grad=True)
    logits = discriminator(x)
    logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
    rows, cols = np.nonzero(x.grad.abs().sum(dim=(0, 1)).numpy())
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
    # The full-size model is small enough to ship (the paper's ngf = 64 unet_128 is ~167 MB).
    assert sum(p.numel() for p in UnetGenerator(ngf=16).parameters()) * 4 < 30e6


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_standardization_data(tmp_path_factory.mktemp("pairs") / "data", 4, seed=1, detector_px=32,
                                     views_per_phantom=2, voxel_size_mm=4.0)


def _losses(weights) -> list[dict]:
    with open(f"{weights}.csv") as handle:
        return list(csv.DictReader(handle))


def test_training_lowers_the_loss_and_resumes_exactly(tiny_data, tmp_path):
    # A tiny model on 32 x 32 pairs; a larger learning rate than the paper's so 20 steps show progress.
    settings = TrainSettings(epochs=10, batch_size=2, ngf=8, ndf=8, depth=5, lr=1e-3, checkpoint_every=1, seed=3,
                             device="cpu")
    straight = tmp_path / "straight" / "g.pt"
    train_standardizer(tiny_data, straight, settings)
    rows = _losses(straight)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 11))
    assert float(rows[-1]["loss_g_l1"]) < 0.8 * float(rows[0]["loss_g_l1"])

    class Interrupted(Exception):
        pass

    def stop_after_three(epoch, epochs, row):
        if epoch == 3:
            raise Interrupted

    resumed = tmp_path / "resumed" / "g.pt"
    with pytest.raises(Interrupted):
        train_standardizer(tiny_data, resumed, settings, progress=stop_after_three)
    train_standardizer(tiny_data, resumed, settings, resume=True)
    assert [int(r["epoch"]) for r in _losses(resumed)] == list(range(1, 11))
    a, b = load_generator(straight, "cpu").state_dict(), load_generator(resumed, "cpu").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no checkpoint"):
        train_standardizer(tiny_data, tmp_path / "none" / "g.pt", settings, resume=True)


def test_shipped_weights_beat_identity_and_classical_on_held_out_phantoms():
    payload = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    assert DEFAULT_WEIGHTS.stat().st_size < 30e6 and payload["training"]["data_seed"] == 0
    # Phantom seeds 0.. are never used for training (training starts at TRAINING_PHANTOM_SEED_START).
    inputs, targets, metadata = generate_pairs(8, seed=11, views_per_phantom=2, first_phantom_seed=0)
    assert all(m["phantom_seed"] < TRAINING_PHANTOM_SEED_START for m in metadata)
    scores = {"identity": [], "classical": [], "pix2pix": []}
    for image, target in zip(inputs, targets):
        output = standardize_image(image)
        assert output.shape == target.shape and output.min() >= 0.0 and output.max() <= TARGET_SCALE
        scores["pix2pix"].append(ssim(output, target))
        scores["identity"].append(ssim(affine_fit(image, target), target))
        scores["classical"].append(ssim(affine_fit(classical.standardize_image(image), target), target))
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    print(means)
    assert means["pix2pix"] > means["identity"] + SSIM_MARGIN
    assert means["pix2pix"] > means["classical"] + SSIM_MARGIN


def test_missing_or_corrupt_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="nope.pt: pix2pix weights file not found"):
        load_generator(tmp_path / "nope.pt")
    copy = tmp_path / "w.pt"
    shutil.copy(DEFAULT_WEIGHTS, copy)
    with pytest.raises(ValueError, match="w.pt: checksum file"):
        load_generator(copy)
    shutil.copy(checksum_path(DEFAULT_WEIGHTS), checksum_path(copy))
    load_generator(copy, "cpu")  # an intact copy loads
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="w.pt: checksum mismatch"):
        load_generator(copy)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    checksum_path(garbage).write_text(f"{__import__('hashlib').sha256(b'not a torch file').hexdigest()}  garbage.pt\n")
    with pytest.raises(ValueError, match="garbage.pt: cannot be read"):
        load_generator(garbage)
    with pytest.raises(ValueError, match="radiograph.*NaN"):
        standardize_image(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="radiograph.*2D"):
        standardize_image(np.zeros(16, np.float32))


def test_standardized_scan_keeps_geometry_and_is_on_the_target_scale(tmp_path, small_roi):
    shape = (40, 48)
    matrices = ring_of_matrices(3, shape=shape)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    images = [(1.5 + np.exp(-((rows - 20) ** 2 + (cols - 24 - k) ** 2) / 200.0)
               + 1.0 * (np.abs(cols - 24 - k) < 3)).astype(np.float32) for k in range(3)]
    source = write_scan(tmp_path / "raw", [np.exp(-i) * 1000 for i in images], matrices, intensity="transmission",
                        i0=1000.0, roi=small_roi)
    out = standardize_scan_pix2pix(source, tmp_path / "std")
    assert json.loads((out / "scan.json").read_text())["intensity"] == "attenuation"
    before, after = read_scan(source), read_scan(out)
    for a, b in zip(before.views, after.views):
        np.testing.assert_allclose(b.projection_matrix, a.projection_matrix, atol=1e-9)
        assert b.image.shape == shape and 0.0 <= b.image.min() and b.image.max() <= TARGET_SCALE
        np.testing.assert_allclose(b.image, standardize_image(a.image), atol=1e-5)
    np.testing.assert_allclose(after.roi.center, before.roi.center, atol=1e-9)
    classical_out = standardize_scan_with("classical", source, tmp_path / "classical")
    assert len(read_scan(classical_out).views) == 3
    with pytest.raises(ValueError, match="method must be one of"):
        standardize_scan_with("magic", source, tmp_path / "x")
    with pytest.raises(ValueError, match="--weights applies to the pix2pix"):
        standardize_scan_with("classical", source, tmp_path / "y", weights=DEFAULT_WEIGHTS)
    with pytest.raises(ValueError, match="is the input"):
        standardize_scan_pix2pix(source, source)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
