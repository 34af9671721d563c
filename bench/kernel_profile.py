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
    python bench/kernel_profile.py --compare-kernels --write  # one iteration per kernel: bench/results/kernels-cpu.*

``--kernel`` (torch, numba, triton, auto) picks the renderer's and voxelizer's pair kernels for the
pieces. ``--compare-kernels`` times one training iteration (render forward + backward + TV patch)
with every kernel that runs on the device, the minimum over ``--repeats`` after a warm-up call (the
machine is shared: the load average is recorded before and after), the numba JIT compilation
separately (a fresh process with an empty cache, then one with that cache), and prints as its last
line one JSON object ``{"case", "ms_per_iteration": {kernel: ms}, "speedup"}`` (speedup = plain torch
over the fastest).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ixgs.gaussians import GaussianModel
from ixgs.kernels.choice import KERNELS, resolve_kernel
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
    extra["kernel"] = args.kernel
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
        patch = voxelize(model, tv_grid, region=tuple(slice(c, c + s) for c, s in zip(corner, size)), kernel=args.kernel)
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


def available_kernels(device: torch.device) -> list[str]:
    """The kernels that run on ``device`` (Triton on a CPU only interpreted: not worth timing)."""
    names = []
    for name in KERNELS[1:]:
        try:
            resolve_kernel(name, device)
        except ValueError:
            continue
        if name != "triton" or device.type == "cuda":
            names.append(name)
    return names


JIT_PROBE = """
import json, time, torch
from ixgs.gaussians import GaussianModel
from ixgs.geometry import Roi, view_rays
from ixgs.simulate import c_arm_projection_matrix
from ixgs.splat import render
from ixgs.voxelize import voxelize
started = time.perf_counter()
roi = Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0))
model = GaussianModel.random(roi, 50, torch.Generator().manual_seed(0))
rays = view_rays(c_arm_projection_matrix(20.0, 5.0, 1000.0, 600.0, (16, 16), (3.0, 3.0)), (16, 16))
render(model, rays, kernel="numba").sum().backward()
voxelize(model, roi.grid(4.0), region=(slice(0, 4),) * 3, kernel="numba").sum().backward()
print(json.dumps(time.perf_counter() - started))
"""


def numba_jit_seconds() -> dict[str, float]:
    """Seconds of the first numba render + voxelize (forward and backward, a tiny case) in a fresh
    process: with an empty cache (compilation) and again with the cache that run left."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [json.loads(subprocess.run([sys.executable, "-c", JIT_PROBE], env=env, check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for _ in range(2)]
    return {"cold_cache_s": round(runs[0], 2), "warm_cache_s": round(runs[1], 2)}


def compare_kernels(args) -> dict:
    """Minimum wall time (ms) of one training iteration per available kernel, same case and model."""
    device = torch.device(args.device)
    model, rays, tv_grid = build_case(args.gaussians, args.pixels, args.views, device)
    weights = torch.randn(rays[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
    size = [min(16, n) for n in tv_grid.shape]
    kernels = available_kernels(device)
    timings = {name: [] for name in kernels}
    cpu_timings = {name: [] for name in kernels}

    def iteration(kernel: str, view: int, corner) -> None:
        model.zero_grad(set_to_none=True)
        image, _ = render(model, rays[view % len(rays)], return_radii=True, kernel=kernel)
        patch = voxelize(model, tv_grid, region=tuple(slice(c, c + s) for c, s in zip(corner, size)), kernel=kernel)
        ((image * weights).sum() + total_variation_3d(patch * model.half_extent)).backward()

    generator = torch.Generator().manual_seed(2)
    corners = [[int(torch.randint(0, n - s + 1, (1,), generator=generator)) for n, s in zip(tv_grid.shape, size)]
               for _ in range(args.repeats)]
    load_before = os.getloadavg()
    for name in kernels:
        iteration(name, 0, corners[0])  # warm-up: allocator, caches, JIT (cached)
    for repeat in range(args.repeats):  # kernels interleaved: a change of load hits them alike
        for name in kernels:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, cpu_started = time.perf_counter(), time.process_time()
            iteration(name, repeat, corners[repeat])
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - started)
            cpu_timings[name].append(time.process_time() - cpu_started)
    load_after = os.getloadavg()
    ms = {name: round(1000 * min(values), 1) for name, values in timings.items()}
    median_ms = {name: round(1000 * statistics.median(values), 1) for name, values in timings.items()}
    pairs = float(np.mean([count_pairs(model, r) for r in rays]))
    result = {
        "case": f"{args.pixels} px, {args.gaussians} Gaussians, {pairs / 1e6:.2f} M pairs a view, TV 16^3 patch; "
                f"{device.type}, {torch.get_num_threads()} threads",
        "ms_per_iteration": ms,
        "speedup": round(ms["torch"] / min(ms.values()), 1),
        "median_ms_per_iteration": median_ms,
        # CPU time of this process (all its threads; idle OpenMP threads spin, so with more than one
        # thread it overstates the work): with one thread, the load-independent cost.
        "cpu_ms_per_iteration": {name: round(1000 * min(values), 1) for name, values in cpu_timings.items()},
        "repeats": args.repeats,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "torch": torch.__version__,
    }
    if "numba" in kernels:
        import numba

        result["numba"] = {"version": numba.__version__, "threads": numba.get_num_threads(), "jit": numba_jit_seconds()}
    return result


def write_comparison(result: dict, device: str) -> None:
    """bench/results/kernels-<device>.json and .md: one entry per thread count, this run's replacing its own."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"kernels-{device}.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[result["case"].rsplit(", ", 1)[-1]] = result
    path.write_text(json.dumps(runs, indent=1) + "\n")
    lines = [f"# One training iteration per kernel ({device})", "",
             "Made by `python bench/kernel_profile.py --compare-kernels --write [--threads N]`: render forward + "
             "backward + TV on a 16^3 patch, the minimum (and median) over interleaved repeats after a warm-up. The "
             "machine is shared: the load average (1, 5, 15 min) is recorded before and after each run."]
    for entry in runs.values():
        lines += ["", f"## {entry['case']}", "",
                  f"{entry['repeats']} repeats; load average {entry['loadavg_before']} before, "
                  f"{entry['loadavg_after']} after; torch {entry['torch']}.", "",
                  "| kernel | ms per iteration (min) | median | process CPU ms (min) | x plain torch |",
                  "|---|---:|---:|---:|---:|"]
        for name, ms in entry["ms_per_iteration"].items():
            lines.append(f"| {name} | {ms} | {entry['median_ms_per_iteration'][name]} | "
                         f"{entry['cpu_ms_per_iteration'][name]} | {entry['ms_per_iteration']['torch'] / ms:.1f} |")
        if "numba" in entry:
            jit = entry["numba"]["jit"]
            lines += ["", f"numba {entry['numba']['version']}, {entry['numba']['threads']} threads. First numba "
                      f"render + voxelize in a fresh process (JIT): {jit['cold_cache_s']} s with an empty cache, "
                      f"{jit['warm_cache_s']} s with the cache it left (imports included)."]
    (RESULTS / f"kernels-{device}.md").write_text("\n".join(lines) + "\n")


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
    parser.add_argument("--kernel", choices=KERNELS, default="torch", help="pair kernels of render and voxelize")
    parser.add_argument("--compare-kernels", action="store_true",
                        help="time one iteration with every available kernel; last line JSON")
    parser.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="append the table to bench/results/profile-<device>.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # before numba loads
    if args.compare_kernels:
        result = compare_kernels(args)
        if args.write:
            write_comparison(result, args.device)
        print(json.dumps(result))
        return
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
             f"{args.gaussians} Gaussians, {args.pixels} x {args.pixels} px, median of {args.repeats}, kernel {args.kernel}"
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
