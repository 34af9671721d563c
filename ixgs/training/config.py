"""The presets a user picks from, and the trainer's hyperparameters: one frozen record, written to
report.json as ``training_config``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


# Per preset: iterations, initial Gaussians, cap on Gaussians (reached only with densification on).
# The lattice start fitted to the true spine in 3D holds 20.3 / 21.5 / 23.8 / 26.5 dB at 30k / 70k / 150k /
# 400k Gaussians (bench/results/quality-lattice-150k.md): the count bounds what a run can reach; 150k
# beat 70k at the default budget (spine +-60: 19.63 vs 19.27 dB, knee 27.08 vs 26.74). Under a time budget
# (every run not asked for a count) the iterations are a cap: the standard preset's 1000 ended the
# default run on 2 cores before its budget once steps got faster (spine / knee +-60, 170 s: 1000 steps
# 20.32 / 28.32 dB; with 3000, to the plateau, 1400 / 1220 steps 20.24 / 28.59, Dice +0.01 / +0.01).
PRESETS = {
    "fast": {"iterations": 400, "gaussians": 70_000, "max_gaussians": 140_000},
    "standard": {"iterations": 3000, "gaussians": 150_000, "max_gaussians": 300_000},
    "high": {"iterations": 3000, "gaussians": 400_000, "max_gaussians": 800_000},
}


def _learning_rates() -> dict[str, float]:
    # R2-Gaussian's position rate; scale, rotation and density 2.5-4x below its rates because the run
    # starts from a fit to SART, not at random. Measured on the spine (20 views, +-60 deg): from 30k
    # Gaussians the old rates (2e-3, 5e-3, 1e-3, 2e-2) undo the start (SSIM 0.66 -> 0.32 in 100 steps,
    # 18.47 dB after 400; a quarter of them 19.13). With the clipped TV (spine / knee +-60, 170 s),
    # scale and density at 1e-3 / 2.5e-3: 20.26 / 27.71 dB; 2e-3 / 5e-3 20.30 / 27.88. With the faster
    # numba steps: 2e-3 / 5e-3 20.38 / 28.02; scale 4e-3 20.32 / 28.32 (Dice +0.02 / +0.01); density
    # 1e-2 20.20 / 28.05; both 19.94 / 28.29; scale 8e-3 19.30 on the spine.
    return {"position": 2e-4, "scale": 4e-3, "rotation": 2.5e-4, "density": 5e-3}


@dataclass(frozen=True)
class TrainingConfig:
    """What the trainer does with the settings a user chooses; defaults are the tested ones."""

    # Adam learning rates per Gaussian parameter (normalised units, see ixgs.gaussians).
    learning_rates: dict[str, float] = field(default_factory=_learning_rates)
    final_lr_fraction: float = 0.1  # the decayed learning rates fall exponentially to this fraction over the run
    # R2-Gaussian decays every group; measured (spine, 20 views of 96 px, 100 steps) that cost 0.4 dB here.
    decayed_groups: tuple[str, ...] = ("position", "outer", "poses")
    outer_lr: float = 5e-4  # 1/mm per step
    outer_cells: int = 40  # voxels along each side of the outer volume
    # The outer volume is projected along the views binned this many times, the image then upsampled
    # bilinearly: its 11 mm cells span several pixels (a smooth outer volume's image within 0.3 %). A knee
    # step 4.7 -> 1.4 ms forward (and as much in the adjoint), ~7 % more steps a second. Spine / knee +-60,
    # 170 s: 1 20.40 / 28.52 dB (1100 steps, plateau / 1187, budget); 2 20.32 / 28.62 (1343 / 1220).
    outer_binning: int = 2
    dssim_weight: float = 0.25
    # With the clip below, 0.1 helped the knee and cost the spine (+-60, 170 s: knee 27.71 -> 27.88 dB,
    # 0.2 27.79; spine 20.26 -> 20.10, Dice 0.63 -> 0.59).
    tv_weight: float = 0.05
    # TV at the output resolution: a grid 2x coarser cannot see a 1 mm cortical shell and flattens it.
    # Spine / knee +-60, 170 s: 16^3 patches 2x coarser 19.82 / 27.33 dB, Dice 0.49 / 0.56; 32^3 at the
    # output resolution 19.93 / 27.38, Dice 0.53 / 0.59 (SSIM 0.72 -> 0.69 / 0.84 -> 0.83); 16^3 there
    # 19.56 dB / SSIM 0.56, 24^3 of weight 0.1 19.68; no TV at all 19.31 / SSIM 0.43 / Dice 0.56.
    tv_patch: int = 32  # voxels per side of the random TV patch
    tv_coarsening: int = 1  # TV grid spacing / support grid spacing
    # TV sees the attenuation clipped at this multiple of the warm start's median (the soft-tissue level),
    # so a bone edge costs no more than a soft-tissue step: TV flattens soft tissue and leaves cortical
    # shells their contrast. None: plain TV. Spine / knee +-60, 170 s: plain 19.93 / 27.38 dB, Dice
    # 0.53 / 0.59; clipped at 1.3x 20.26 / 27.71, Dice 0.63 / 0.65 (SSIM 0.69 -> 0.73 / 0.83 -> 0.84).
    tv_clip_factor: float | None = 1.3
    # Render each pixel as the mean over its area (a Gaussian of the pixel box's variance across the
    # ray, ixgs.splat.pixel_footprint_mm2), as the views are, rather than as its central ray's line
    # integral. Off: with 1.7 mm pixels at the isocentre (0.86 mm voxels) it widened the footprints,
    # ~18 % fewer steps, and sharpened nothing (spine / knee +-60, 170 s: 20.26 -> 20.17 / 27.71 ->
    # 27.50 dB; bone-edge and halo means unchanged within 0.0002 1/mm).
    pixel_footprint: bool = False
    outer_tv_weight: float = 0.0  # TV of the whole outer volume, same units as the Gaussians' TV
    # Adaptive density control (clone/split/prune). Off: from the SART-fitted 30k lattice it lowered SSIM
    # over every densification window measured (spine, 20 views, +-60 deg, 1000 steps: 0.52 -> 0.39
    # between steps 250 and 500), and a larger lattice without it did better (150k: 19.59 dB after 600
    # steps against 19.12 after 1000 densified from 30k); on for the paper's random start.
    densify: bool = False
    # Rounds spread evenly over the densification window, however long the run (at least densify_every
    # steps apart); None: a round every densify_every steps. Measured on spine, 20 views of 96 px, 100
    # steps: 10 rounds cost 0.4 dB with today's split (and 3.7 dB with every learning rate decaying).
    densify_rounds: int | None = None
    densify_every: int = 50  # steps
    densify_from: float = 0.1  # fractions of the run
    densify_until: float = 0.6
    # Densify the Gaussians with the largest mean positional gradient: the top densify_fraction each
    # round (gradients of all Gaussians are of one order here, so a fixed threshold clones all or none).
    densify_fraction: float = 0.1
    # Split (mass-conserving) a Gaussian whose largest sigma exceeds split_voxels output voxels, else clone;
    # prune one whose mass is below min_mass_voxels voxels' worth of min_attenuation (1/mm).
    split_voxels: float = 1.0
    min_attenuation: float = 2e-3
    min_mass_voxels: float = 0.5
    min_level_pixels: int = 32  # coarsest level: the smaller image side stays at least this
    # Binned coarse levels re-blur a start fitted to SART (spine, 150k Gaussians: 19.06 vs 18.87 dB after
    # 300 steps with one level or three, 19.46 vs 19.42 after 600); kept for the random start.
    max_levels: int = 1
    coarse_fraction: float = 0.4  # of the run spent on the coarse levels, equally
    final_stage_fraction: float = 0.15  # of a time budget, kept for the final voxelization and re-projections
    pose_lr: float = 0.1  # mm (and mm of arc at the ROI's half side) per step of the view's own Adam state
    pose_from: float = 0.1  # fraction of the run: poses move once the coarse shape has formed
    # The loss plateau stops a run only from this fraction of it on: the decayed learning rates flatten
    # the loss long before the volume stops improving (spine / knee +-60, 170 s: stopped at 701 steps,
    # 19.61 / 27.08 dB; run to the budget 19.80 / 27.34). The random start watches from densification's end.
    plateau_from: float = 0.8
    plateau_window: int = 50  # steps, at least; rounded up to whole passes over the views (two at least)
    plateau_tolerance: float = 0.002  # relative fall of the windowed mean loss below which the run stops
    # With held-out views: their re-projection error (full resolution, mean L1) is measured every pass
    # over the fitted views; the run stops once it has not improved for held_out_patience measurements
    # after densification, and the best state is returned.
    held_out_patience: int = 3
    # SART passes of the warm start (numba: ~7 s each for 20 views of 128 px). Spine / knee +-60, 170 s,
    # run to the budget: 2 passes 19.80 / 27.34 dB, 4 passes 19.92 / 27.41 (Dice +0.03 / +0.00); spine,
    # 8 passes 19.72; 4 passes of SART+TV (alpha 0.2) 19.87.
    warm_start_iterations: int = 4
    warm_start_budget_fraction: float = 0.25  # of a time budget, at most

    def to_dict(self) -> dict:
        values = asdict(self)
        values["decayed_groups"] = list(self.decayed_groups)
        return values


def default_config(init: str) -> TrainingConfig:
    """The tested hyperparameters for a start: ``"sart"`` (the default, a fitted lattice refined with
    small steps) or ``"random"`` (the paper's: larger steps, coarse-to-fine levels, densification)."""
    if init == "random":
        return TrainingConfig(learning_rates={"position": 2e-3, "scale": 5e-3, "rotation": 1e-3, "density": 2e-2},
                              densify=True, max_levels=3, plateau_from=0.0, tv_patch=16, tv_coarsening=2,
                              tv_clip_factor=None)
    return TrainingConfig()
