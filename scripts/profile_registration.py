#!/usr/bin/env python
"""Where a GPU registration's time goes: torch.profiler over the benchmark's CUDA registration.

    python scripts/profile_registration.py [--shape 240 240 160] [--rows 30] [--trace trace.json]

Builds the plan the benchmark times (``msode_sdk.bench.build_fixed_step_plan``: analytic rigid F(0.1) x3
+ B-spline on a 1 mm grid of ``--shape`` (x, y, z) voxels), registers its synthetic pair once to warm up, then profiles
one eager registration per stage and prints the kernels by device time (self), plus each stage's wall
time. Eager, because a replayed CUDA graph shows as one opaque launch.
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
from msode_sdk.bench import build_fixed_step_plan, synthetic_pair
from msode_sdk.transforms import Grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(240, 240, 160), metavar=("X", "Y", "Z"))
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
    grid = Grid(tuple(args.shape), (1.0, 1.0, 1.0))
    with tempfile.TemporaryDirectory() as tmp:
        plan = build_fixed_step_plan(Path(tmp) / "p.plan", grid)
        reg = Registrar.load(plan, device=args.device, backend="torch")
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
        print(f"\n=== {'rigid only' if stage == 'rigid' else 'rigid + B-spline'}: wall {wall:.1f} ms under the "
              f"profiler, NFE {nfe}, stage seconds {[(s.name, round(s.seconds * 1e3, 1)) for s in res.stages]}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=args.rows, max_name_column_width=70))
        if args.trace and stage == "bspline":
            prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
