"""Profile one training iteration's pieces: footprints, pair enumeration, render forward/backward, TV.

The case is the trainer's at the "standard" preset: 30k Gaussians spread in a 110 mm ROI (random
start, scale ~1.8 mm), 128 x 128 px C-arm views, and the 3D TV on a random 16^3 patch of the grid
twice as coarse as the 128^3 output. Each piece is timed as the median of ``--repeats`` calls (after
one warm-up call); then, in a second pass, its peak memory above the memory held before the call
(on a CPU the resident set sampled every millisecond, with glibc told to return freed blocks at once
so that it follows the live tensors: a lower bound; ``max_memory_allocated`` on CUDA).

    python bench/kernel_profile.py --threads 1 --label "after, 1 thread"
    python bench/kernel_profile.py --threads 2 --write      # appends a section to bench/results/profile-cpu.md
    python bench/kernel_profile.py --pixels 512 --gaussians 300000 --repeats 1 --pieces forward,backward  # memory
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ixgs.gaussians import GaussianModel
from ixgs.geometry import Roi, view_rays
from ixgs.losses import total_variation_3d
from ixgs.pairs import box_pairs
from ixgs.simulate import fitting_pixel_spacing, random_c_arm_poses
from ixgs.splat import count_pairs, footprints, render

try:  # the flat pairs and memory-sized chunks the renderer uses; absent before they were added
    from ixgs.splat import chunk_pairs
    PAIR_OPTIONS = dict(flat=True)
except ImportError:
    chunk_pairs, PAIR_OPTIONS = (lambda device, dtype: 2_000_000), {}
from ixgs.voxelize import voxelize

RESULTS = Path(__file__).resolve().parent / "results"
ROI = Roi((0.0, 0.0, 0.0), (110.0, 110.0, 110.0))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def seconds_of(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` after one warm-up call (allocator, caches, compilation)."""
    fn()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def peak_memory_mib(fn, device: torch.device) -> float | None:
    """Peak memory of one ``fn()`` above what was held before it, MiB: CUDA ``max_memory_allocated``;
    on a CPU the resident set sampled every millisecond, a lower bound (None where it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    if not os.path.exists("/proc/self/statm"):
        return None
    base, peak, stop = _rss_bytes(), [0], threading.Event()
    # torch ops keep the GIL: switch often, or the sampler misses the short-lived chunk tensors.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes() - base)
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    stop.set()
    sampler.join()
    sys.setswitchinterval(interval)
    return peak[0] / 2 ** 20


def build_case(gaussians: int, pixels: int, views: int, device: torch.device, seed: int = 0):
    """The model, the views' rays and the TV grid of the profiled case."""
    generator = torch.Generator().manual_seed(seed)
    model = GaussianModel.random(ROI, gaussians, generator, device=device)
    rng = np.random.default_rng(seed)
    poses = random_c_arm_poses(views, rng)
    spacing = fitting_pixel_spacing(poses, ROI, pixels)
    rays = [view_rays(pose.projection_matrix((pixels, pixels), (spacing, spacing)), (pixels, pixels), device=device)
            for pose in poses]
    tv_grid = ROI.grid(2 * max(ROI.size) / 128)
    return model, rays, tv_grid


def profile(args) -> list[tuple[str, float, float | None]]:
    device = torch.device(args.device)
    model, rays, tv_grid = build_case(args.gaussians, args.pixels, args.views, device)
    extra = dict(kv.split("=", 1) for kv in args.render_option)
    extra = {k: (v == "true" if v in ("true", "false") else int(v) if v.isdigit() else v) for k, v in extra.items()}
    weights = torch.randn(rays[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
    state = {"view": 0}

    def next_rays():
        state["view"] = (state["view"] + 1) % len(rays)
        return rays[state["view"]]

    def fwd():
        with torch.no_grad():
            render(model, next_rays(), **extra)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        image, _ = render(model, next_rays(), return_radii=True, **extra)
        (image * weights).sum().backward()

    def fp():
        footprints(model, rays[0].projection_matrix, rays[0].shape, 3.0)

    def pairs():
        lower, extent, _ = footprints(model, rays[0].projection_matrix, rays[0].shape, 3.0)
        for _ in box_pairs(lower, extent, rays[0].shape, chunk_pairs(device, torch.float32), **PAIR_OPTIONS):
            pass

    region_generator = torch.Generator().manual_seed(2)

    def tv():
        size = [min(16, n) for n in tv_grid.shape]
        corner = [int(torch.randint(0, n - s + 1, (1,), generator=region_generator)) for n, s in zip(tv_grid.shape, size)]
        patch = voxelize(model, tv_grid, region=tuple(slice(c, c + s) for c, s in zip(corner, size)))
        total_variation_3d(patch * model.half_extent).backward()

    def iteration():
        fwd_bwd()
        tv()

    rows = [("pairs per view (mean)", float(np.mean([count_pairs(model, r) for r in rays])), None)]
    pieces = {"footprints": ("footprints", fp), "pairs": ("footprints + box_pairs", pairs),
              "forward": ("render forward (no grad)", fwd), "backward": ("render forward + backward", fwd_bwd),
              "tv": ("TV: voxelize 16^3 patch + backward", tv), "iteration": ("iteration (render fwd+bwd + TV)", iteration)}
    chosen = [pieces[key] for key in args.pieces.split(",")]
    if args.memory_pass:
        for _, fn in chosen:
            fn()  # warm-up
        return [(name, None, peak_memory_mib(fn, device)) for name, fn in chosen]
    seconds = [seconds_of(fn, device, args.repeats) for _, fn in chosen]
    return rows + [(name, s, None) for (name, _), s in zip(chosen, seconds)]


def memory_pass() -> dict[str, float | None]:
    """Peak memory per piece from a second process in which glibc returns every block of 64 KiB or
    more to the system when it is freed, so that the resident set follows the live tensors (in the
    timing process freed memory stays resident and hides the peak; the setting slows allocation)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    # The same command line again (sys.orig_argv: also right when a launcher ran this file).
    out = subprocess.run([*sys.orig_argv, "--memory-pass"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=30_000)
    parser.add_argument("--pixels", type=int, default=128)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pieces", default="footprints,pairs,forward,backward,tv,iteration",
                        help="comma-separated subset of footprints,pairs,forward,backward,tv,iteration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label", default="")
    parser.add_argument("--render-option", action="append", default=[],
                        help="extra keyword for render, e.g. compile=true (repeatable)")
    parser.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="append the table to bench/results/profile-<device>.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = profile(args)
    if args.memory_pass:
        print(json.dumps({name: peak for name, _, peak in rows}))
        return
    peaks = memory_pass() if args.device == "cuda" or os.path.exists("/proc/self/statm") else {}
    rows = [(name, value, peaks.get(name)) for name, value, _ in rows]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    lines = [f"### {args.label or 'run'}", "",
             f"{device_name}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
             f"{args.gaussians} Gaussians, {args.pixels} x {args.pixels} px, median of {args.repeats}"
             + (f", render options {args.render_option}" if args.render_option else ""), "",
             "| piece | time (ms) | peak extra memory (MiB) |", "|---|---:|---:|"]
    for name, value, peak in rows:
        if name.startswith("pairs"):
            lines.append(f"| {name} | {value:,.0f} pairs | |")
        else:
            lines.append(f"| {name} | {1000 * value:.0f} | {'' if peak is None else f'{peak:.0f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / f"profile-{args.device}.md", "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
