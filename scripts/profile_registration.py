#!/usr/bin/env python
"""Where a registration's time goes: torch.profiler over one model-grid registration.

    python scripts/profile_registration.py [--plan rigid_bspline.plan | --shape 240 240 160] [--rows 30] [--trace t.json]

Profiles the bundled plan on its model grid (default), or, with ``--shape X Y Z``, an analytic rigid +
B-spline plan with fixed steps (rigid F(0.1) x3, NFE 30; B-spline F(0.2)-F(0.2)-F(0.25), NFE 14) on a
1 mm grid of that many voxels. Registers the benchmark's synthetic pair once to warm up, then profiles
one eager registration per stage selection and prints the kernels by device time (self), plus each
stage's wall time. Eager, because a replayed CUDA graph shows as one opaque launch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from msode_sdk import Registrar
from msode_sdk.bench import synthetic_pair
from msode_sdk.transforms import Grid


def build_fixed_step_plan(path, grid: Grid):
    """The analytic rigid + B-spline plan with fixed-step schedules on ``grid`` (TorchScript members)."""
    from msode_export.analytic import build_analytic_plan
    from msode_export.pack import LevelSolver

    return build_analytic_plan(
        path,
        grid,
        stages=("rigid", "bspline"),
        schedules={"rigid": (LevelSolver("euler", 0.1),) * 3},
        formats=("torchscript",),
        name=f"analytic_fixed_step_{grid.shape_xyz[0]}",
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="rigid_bspline.plan", help="plan to profile (default: the bundled one)")
    ap.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="profile the analytic fixed-step plan on a 1 mm grid of this shape instead",
    )
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--trace", default=None, help="also write a Chrome trace here")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (host-side profile only, for a dry run)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("CUDA is not available: nothing to profile (--device cpu profiles the host side)", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if args.shape:
        with tempfile.TemporaryDirectory() as tmp:
            plan = build_fixed_step_plan(Path(tmp) / "p.plan", Grid(tuple(args.shape), (1.0, 1.0, 1.0)))
            reg = Registrar.load(plan, device=args.device, backend="torch")
    else:
        reg = Registrar.load(args.plan, device=args.device, backend="torch")
    grid = reg.model_grid
    moving, fixed = (t.to(args.device) for t in synthetic_pair(grid))
    reg.register_model_grid(moving, fixed)  # warm-up: cuDNN choices, kernel build, allocator
    sync()
    for stage in ("rigid", "bspline"):
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            res = reg.register_model_grid(moving, fixed, stages=[stage] if stage == "rigid" else None)
            sync()
        wall = (time.perf_counter() - t0) * 1e3
        nfe = {s.name: s.nfe for s in res.stages}
        print(
            f"\n=== {'rigid only' if stage == 'rigid' else 'rigid + B-spline'}: wall {wall:.1f} ms under the "
            f"profiler, NFE {nfe}, stage seconds {[(s.name, round(s.seconds * 1e3, 1)) for s in res.stages]}"
        )
        print(
            prof.key_averages().table(
                sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                row_limit=args.rows,
                max_name_column_width=70,
            )
        )
        if args.trace and stage == "bspline":
            prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
