"""Build the bundled analytic plan: `python scripts/build_analytic_plan.py [OUT.plan] [--no-registrar-ts]`.

Model grid 120x120x80 at 2 mm (240x240x160 mm, BraTS-like field of view), rigid then B-spline
(20 mm control spacing); "networks" are SSD Gauss-Newton flows. B-spline: the paper's schedule
F(0.2)-F(0.2)-F(0.25). Rigid: FOUR levels (16/8/4/2 mm), A(1e-3)-A(1e-3)-A(1e-3)-F(0.1): with the paper's
three levels (coarsest 8 mm) the SSD flow captured 3/6 held-out paper-range rigid motions (U(+-75 deg),
U(+-20 mm), T1->T1, msode-eval), with the 16 mm level 6/6 (RMSE(phi) <= 0.01 mm). The plan
also carries `registrar.ts`, the whole loop as one TorchScript module for C++ embedding
(msode_export.scripted). (`msode export --analytic` builds the same plan with the paper's 3-level rigid schedule.)
"""

import argparse

from msode_export.analytic import build_analytic_plan
from msode_export.pack import LevelSolver
from msode_sdk.transforms import Grid

ADAPTIVE = LevelSolver("adaptive_heun", step_size=0.1, tol=1e-3)
RIGID_SCHEDULE = (ADAPTIVE, ADAPTIVE, ADAPTIVE, LevelSolver("euler", 0.1))

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out", nargs="?", default="sdk/msode_sdk/models/analytic_ssd.plan")
ap.add_argument("--no-registrar-ts", action="store_true", help="do not embed registrar.ts")
args = ap.parse_args()
build_analytic_plan(
    args.out,
    Grid((120, 120, 80), (2.0, 2.0, 2.0)),
    stages=("rigid", "bspline"),
    control_spacing_mm=(20.0, 20.0, 20.0),
    name="analytic_ssd",
    schedules={"rigid": RIGID_SCHEDULE},
    registrar_ts=not args.no_registrar_ts,
)
print(args.out)
