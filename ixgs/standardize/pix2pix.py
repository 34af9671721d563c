"""Learned standardization: Pix2Pix (Isola et al. 2017) from a real radiograph to a bone-enhanced DRR.

As in the paper: a U-Net generator with skip connections (``unet_128``: 7 down-sampling steps,
batch norm, dropout 0.5 in the three innermost decoder blocks), a conditional 70x70 PatchGAN
discriminator on (input, output) pairs, the GAN loss plus ``lambda_l1 = 100`` times L1, Adam with
lr 2e-4 and beta1 0.5, constant then linearly decaying learning rate. Departures, for 2 CPU cores
and a < 30 MB file: ``ngf = ndf = 16`` filters instead of 64 (16x fewer parameters), mini-batches
of 4 (the paper used 1), and inference in eval mode (running batch-norm statistics, no dropout) so
it is deterministic.

Scales: the input is normalized per image (robust 0.5-99.5 percentile range to [-1, 1]), because
real radiographs arrive in arbitrary units (raw -log, display images, inverted or not). The output
is on the fixed target scale of :mod:`.target` (:func:`~.target.denormalize_target`), i.e. line
integrals of the bone-enhanced attenuation, the same for every view: what the reconstruction expects.

Any image size: the image is padded (reflection, then edge replication) to a multiple of 128 and
the result cropped back. The network was trained on 128 x 128 views whose pixels are about 1 mm at
the isocentre; very different resolutions should be resampled, or the model fine-tuned.
"""
from __future__ import annotations

import csv
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..scan import read_scan, write_scan
from ..volume import Volume, atomic_path
from .classical import standardize_scan as standardize_scan_classical
from .pairs_data import read_pairs
from .target import BONE_WEIGHT, SOFT_TISSUE_WEIGHT, TARGET_SCALE, denormalize_target, normalize_target

WEIGHTS_FORMAT = "ixgs.pix2pix"
WEIGHTS_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "Resources" / "Weights" / "pix2pix_standardizer.pt"
INPUT_PERCENTILES = (0.5, 99.5)
METHODS = ("pix2pix", "classical")


# --- networks ---

class UnetBlock(nn.Module):
    """One U-Net level: down-sample, the inner levels, up-sample, concatenated with its input (skip)."""

    def __init__(self, outer: int, inner: int, submodule: nn.Module | None = None, input_channels: int | None = None,
                 outermost: bool = False, dropout: bool = False, output_channels: int | None = None):
        super().__init__()
        self.outermost = outermost
        input_channels = outer if input_channels is None else input_channels
        down = nn.Conv2d(input_channels, inner, kernel_size=4, stride=2, padding=1, bias=False)
        if outermost:
            up = nn.ConvTranspose2d(inner * 2, output_channels, kernel_size=4, stride=2, padding=1)
            layers = [down, submodule, nn.ReLU(True), up, nn.Tanh()]
        elif submodule is None:  # innermost: 1 x 1 bottleneck, no normalization on the way down
            up = nn.ConvTranspose2d(inner, outer, kernel_size=4, stride=2, padding=1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, nn.BatchNorm2d(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, kernel_size=4, stride=2, padding=1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, nn.BatchNorm2d(inner), submodule,
                      nn.ReLU(True), up, nn.BatchNorm2d(outer)] + ([nn.Dropout(0.5)] if dropout else [])
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], dim=1)


class UnetGenerator(nn.Module):
    """pix2pix U-Net with ``depth`` down-sampling steps; inputs must be multiples of ``2 ** depth``."""

    def __init__(self, ngf: int = 16, depth: int = 7, channels: int = 1, dropout: bool = True):
        super().__init__()
        if depth < 5:
            raise ValueError(f"depth must be at least 5, got {depth}")
        self.depth = depth
        block = UnetBlock(ngf * 8, ngf * 8)
        for _ in range(depth - 5):
            block = UnetBlock(ngf * 8, ngf * 8, block, dropout=dropout)
        for scale in (4, 2, 1):
            block = UnetBlock(ngf * scale, ngf * scale * 2, block)
        self.model = UnetBlock(channels, ngf, block, input_channels=channels, outermost=True, output_channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (3 strided layers): one real/fake logit per overlapping 70 x 70 patch."""

    def __init__(self, input_channels: int = 2, ndf: int = 16, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(channels, out, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _init_weights(module: nn.Module) -> None:
    """The paper's initialization: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --- sizes and scales ---

def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right to multiples of ``multiple``; returns the padded batch and (H, W).

    Reflection keeps the image statistics natural; where the image is too small to reflect that far,
    the rest is edge replication.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    while pad_h or pad_w:
        step_h, step_w = min(pad_h, images.shape[-2] - 1), min(pad_w, images.shape[-1] - 1)
        if step_h == 0 and step_w == 0:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
            break
        images = F.pad(images, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return images, (height, width)


def normalize_input(image: np.ndarray) -> np.ndarray:
    """A radiograph in any units to [-1, 1] by its robust range (0.5-99.5 percentiles), float32."""
    image = np.asarray(image, np.float32)
    low, high = np.percentile(image, INPUT_PERCENTILES)
    if high - low <= 1e-12 * max(abs(float(high)), 1.0):
        return np.zeros_like(image)
    return (np.clip((image - low) / (high - low), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def _check_image(image, label: str) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 2:
        raise ValueError(f"{label}: must be a 2D image of at least 2 x 2 pixels, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{label}: has NaN or Inf pixels")
    return image


# --- weights files ---

def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(weights_path: str | os.PathLike) -> Path:
    return Path(f"{weights_path}.sha256")


def save_weights(generator: UnetGenerator, path: str | os.PathLike, ngf: int, training: dict) -> Path:
    """The generator (fp32 state dict plus its hyper-parameters) and ``<path>.sha256``, both atomically."""
    path = Path(path)
    payload = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "ngf": ngf, "depth": generator.depth,
               "target": {"soft_tissue_weight": SOFT_TISSUE_WEIGHT, "bone_weight": BONE_WEIGHT,
                          "scale": TARGET_SCALE},
               "training": training,
               "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()}}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    with atomic_path(checksum_path(path)) as temporary:
        temporary.write_text(f"{sha256_of(path)}  {path.name}\n")
    return path


def load_generator(weights: str | os.PathLike | None = None, device=None) -> UnetGenerator:
    """A generator in eval mode from a weights file (default: the shipped one), checksum verified.

    The checksum file ``<weights>.sha256`` must exist; a missing, corrupt or foreign file is refused
    with a ValueError naming it. Nothing is downloaded.
    """
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{path}: pix2pix weights file not found (train one with 'ixgs train-standardizer')")
    checksum_file = checksum_path(path)
    if not checksum_file.is_file():
        raise ValueError(f"{path}: checksum file {checksum_file.name} not found; cannot verify the weights")
    expected = checksum_file.read_text().split()[:1]
    if expected != [sha256_of(path)]:
        raise ValueError(f"{path}: checksum mismatch (corrupt or replaced weights file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise ValueError(f"{path}: cannot be read as pix2pix weights ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not an {WEIGHTS_FORMAT!r} weights file")
    if payload.get("version") != WEIGHTS_VERSION:
        raise ValueError(f"{path}: weights version {payload.get('version')!r}, expected {WEIGHTS_VERSION}")
    target = payload.get("target") if isinstance(payload.get("target"), dict) else {}
    if target.get("scale") != TARGET_SCALE:
        raise ValueError(f"{path}: trained for target scale {target.get('scale')!r}, not {TARGET_SCALE}")
    try:
        generator = UnetGenerator(ngf=int(payload["ngf"]), depth=int(payload["depth"]))
        generator.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise ValueError(f"{path}: weights do not fit the generator they declare") from None
    return generator.to(_device(device)).eval()


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --- inference ---

_CACHE: dict[tuple, UnetGenerator] = {}


def _cached_generator(weights, device) -> UnetGenerator:
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_mtime_ns if stat else None, stat.st_size if stat else None, str(_device(device)))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_generator(path, device)
    return _CACHE[key]


def run_generator(generator: UnetGenerator, images: list[np.ndarray]) -> list[np.ndarray]:
    """Normalized inputs (each 2D, [-1, 1]) to normalized outputs, one image at a time, any size."""
    device = next(generator.parameters()).device
    outputs = []
    with torch.no_grad():
        for image in images:
            batch = torch.as_tensor(image, device=device)[None, None]
            padded, (height, width) = pad_to_multiple(batch, 2 ** generator.depth)
            outputs.append(generator(padded)[0, 0, :height, :width].cpu().numpy())
    return outputs


def standardize_image(image: np.ndarray, weights: str | os.PathLike | None = None, device=None) -> np.ndarray:
    """One radiograph (attenuation-like, any units and size) to the bone-enhanced DRR scale
    (float32, same shape, mm x 1/mm, >= 0); ``weights`` defaults to the shipped file."""
    image = _check_image(image, "radiograph")
    generator = _cached_generator(weights, device)
    return denormalize_target(run_generator(generator, [normalize_input(image)])[0])


def standardize_scan_pix2pix(scan_path: str | os.PathLike, output_path: str | os.PathLike,
                             weights: str | os.PathLike | None = None, device=None) -> Path:
    """Standardize every view of a scan; same geometry, ROI and reference, ``"intensity": "attenuation"``."""
    scan = read_scan(scan_path)
    generator = _cached_generator(weights, device)
    for view in scan.views:
        _check_image(view.image, f"{scan.path}: view {view.name}")
    outputs = run_generator(generator, [normalize_input(view.image) for view in scan.views])
    images = [denormalize_target(output) for output in outputs]
    reference = Volume.read(scan.reference_volume) if scan.reference_volume is not None else None
    return write_scan(output_path, images, scan.projection_matrices, intensity="attenuation",
                      roi=scan.roi, reference=reference, inputs=[scan_path, weights])


def standardize_scan_with(method: str, scan_path: str | os.PathLike, output_path: str | os.PathLike,
                          weights: str | os.PathLike | None = None, device=None) -> Path:
    """``ixgs standardize``: "pix2pix" (learned, default) or "classical" (no weights)."""
    if method == "pix2pix":
        return standardize_scan_pix2pix(scan_path, output_path, weights, device)
    if method == "classical":
        if weights is not None:
            raise ValueError("--weights applies to the pix2pix method only")
        return standardize_scan_classical(scan_path, output_path)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --- training ---

@dataclass
class TrainSettings:
    """Paper hyper-parameters except ``ngf``/``ndf`` and ``batch_size`` (see the module docstring)."""

    epochs: int = 100
    decay_epochs: int | None = None  # epochs of linear decay at the end (default: half)
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 100.0
    ngf: int = 16
    ndf: int = 16
    depth: int = 7
    seed: int = 0
    checkpoint_every: int = 5  # epochs
    device: str = "auto"
    init_weights: str | None = None  # start the generator from these (fine-tuning on a site's pairs)

    def validate(self) -> None:
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "beta1": 0 <= self.beta1 < 1, "lambda_l1": self.lambda_l1 >= 0, "ngf": self.ngf >= 1,
                  "ndf": self.ndf >= 1, "checkpoint_every": self.checkpoint_every >= 1,
                  "decay_epochs": self.decay_epochs is None or 0 <= self.decay_epochs <= self.epochs}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"training setting '{name}' is out of range: {getattr(self, name)!r}")


CSV_FIELDS = ("epoch", "steps", "loss_d", "loss_g_gan", "loss_g_l1", "lr", "elapsed_s")


def _batches(shapes: list[tuple[int, int]], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled mini-batches of pairs that share one image shape."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index in torch.randperm(len(shapes), generator=generator).tolist():
        by_shape.setdefault(shapes[index], []).append(index)
    batches = [indices[i:i + batch_size] for indices in by_shape.values() for i in range(0, len(indices), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def _dihedral(batch: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations (k in 0..7): C-arm views come in any orientation."""
    batch = torch.rot90(batch, k % 4, dims=(-2, -1))
    return torch.flip(batch, dims=(-1,)) if k >= 4 else batch


def train_standardizer(data_dir: str | os.PathLike, weights_path: str | os.PathLike,
                       settings: TrainSettings | None = None, resume: bool = False,
                       progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train pix2pix on a pairs folder and write the generator to ``weights_path`` (+ ``.sha256``).

    Beside it: ``<weights>.ckpt`` (full state every ``checkpoint_every`` epochs and at the end,
    for ``resume``) and ``<weights>.csv`` (per-epoch mean losses). Each epoch's shuffling,
    augmentation and dropout are seeded by ``seed`` and the epoch, so a resumed run continues the
    same sequence. ``progress(epoch, epochs, row)`` after each epoch. Returns the last CSV row.
    """
    settings = settings or TrainSettings()
    settings.validate()
    weights_path = Path(weights_path)
    checkpoint = Path(f"{weights_path}.ckpt")
    log_path = Path(f"{weights_path}.csv")
    inputs, targets, manifest = read_pairs(data_dir)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    device = _device(settings.device)
    inputs = [torch.as_tensor(normalize_input(image)) for image in inputs]
    targets = [torch.as_tensor(normalize_target(image)) for image in targets]
    shapes = [tuple(image.shape) for image in inputs]

    torch.manual_seed(settings.seed)
    generator = UnetGenerator(settings.ngf, settings.depth).to(device)
    discriminator = PatchDiscriminator(2, settings.ndf).to(device)
    generator.apply(_init_weights)
    discriminator.apply(_init_weights)
    if settings.init_weights is not None:
        generator.load_state_dict(load_generator(settings.init_weights, device).state_dict())
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=(settings.beta1, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=settings.lr, betas=(settings.beta1, 0.999))
    decay = settings.epochs // 2 if settings.decay_epochs is None else settings.decay_epochs
    start_epoch, elapsed_before = 1, 0.0
    if resume:
        if not checkpoint.is_file():
            raise ValueError(f"{checkpoint}: no checkpoint to resume from")
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            generator.load_state_dict(state["generator"])
            discriminator.load_state_dict(state["discriminator"])
            optimizer_g.load_state_dict(state["optimizer_g"])
            optimizer_d.load_state_dict(state["optimizer_d"])
        except Exception as error:
            raise ValueError(f"{checkpoint}: cannot resume from this checkpoint ({type(error).__name__})") from None
        start_epoch, elapsed_before = int(state["epoch"]) + 1, float(state["elapsed_s"])
    elif log_path.exists():
        log_path.unlink()

    started = time.perf_counter()
    row: dict = {}
    for epoch in range(start_epoch, settings.epochs + 1):
        lr = settings.lr * min(1.0, (settings.epochs - epoch + 1) / (decay + 1)) if decay else settings.lr
        for optimizer in (optimizer_g, optimizer_d):
            for group in optimizer.param_groups:
                group["lr"] = lr
        shuffle = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        torch.manual_seed(settings.seed * 100_003 + epoch)  # dropout
        generator.train()
        discriminator.train()
        sums = np.zeros(3)
        batches = _batches(shapes, settings.batch_size, shuffle)
        for indices in batches:
            k = int(torch.randint(8, (1,), generator=shuffle))
            x = _dihedral(torch.stack([inputs[i] for i in indices])[:, None].to(device), k)
            y = _dihedral(torch.stack([targets[i] for i in indices])[:, None].to(device), k)
            sums += _train_step(generator, discriminator, optimizer_g, optimizer_d, x, y, settings.lambda_l1)
        elapsed = elapsed_before + time.perf_counter() - started
        means = sums / max(len(batches), 1)
        row = {"epoch": epoch, "steps": epoch * len(batches), "loss_d": float(means[0]), "loss_g_gan": float(means[1]),
               "loss_g_l1": float(means[2]), "lr": lr, "elapsed_s": round(elapsed, 1)}
        _append_csv(log_path, row)
        if epoch % settings.checkpoint_every == 0 or epoch == settings.epochs:
            training = {"data": str(data_dir), "pairs": len(inputs), "data_seed": manifest.get("seed"),
                        **asdict(settings), "epochs_done": epoch, "elapsed_s": round(elapsed, 1)}
            save_weights(generator, weights_path, settings.ngf, training)
            with atomic_path(checkpoint) as temporary:
                torch.save({"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                            "optimizer_g": optimizer_g.state_dict(), "optimizer_d": optimizer_d.state_dict(),
                            "epoch": epoch, "elapsed_s": elapsed}, temporary)
        if progress is not None:
            progress(epoch, settings.epochs, row)
    return row


def _train_step(generator, discriminator, optimizer_g, optimizer_d, x, y, lambda_l1: float) -> np.ndarray:
    """One pix2pix update on a batch; returns (loss_d, loss_g_gan, loss_g_l1) for the log."""
    x, (height, width) = pad_to_multiple(x, 2 ** generator.depth)
    y, _ = pad_to_multiple(y, 2 ** generator.depth)
    fake = generator(x)
    # Discriminator: real (input, target) pairs vs (input, generated) pairs, averaged as in the paper.
    optimizer_d.zero_grad()
    logits_fake = discriminator(torch.cat([x, fake.detach()], 1))
    logits_real = discriminator(torch.cat([x, y], 1))
    loss_d = 0.5 * (F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
                    + F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real)))
    loss_d.backward()
    optimizer_d.step()
    # Generator: fool the discriminator and stay close to the target (L1 on the unpadded image).
    optimizer_g.zero_grad()
    logits = discriminator(torch.cat([x, fake], 1))
    loss_gan = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss_l1 = F.l1_loss(fake[..., :height, :width], y[..., :height, :width])
    (loss_gan + lambda_l1 * loss_l1).backward()
    optimizer_g.step()
    return np.array([loss_d.item(), loss_gan.item(), loss_l1.item()])


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
