"""Build the bundled analytic plan: `python scripts/build_analytic_plan.py [OUT.plan] [--no-registrar-ts]`.

Model grid 120x120x80 at 2 mm (240x240x160 mm, BraTS-like field of view), rigid then B-spline
(20 mm control spacing), the paper's solver schedules; "networks" are SSD Gauss-Newton flows. The plan
also carries `registrar.ts`, the whole loop as one TorchScript module for C++ embedding
(msode_export.scripted). Same as `msode export --analytic --model-grid 120,120,80 --spacing 2
--control-spacing 20 --name analytic_ssd -o OUT.plan`.
"""
import argparse

from msode_export.analytic import build_analytic_plan
from msode_sdk.transforms import Grid

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out", nargs="?", default="sdk/msode_sdk/models/analytic_ssd.plan")
ap.add_argument("--no-registrar-ts", action="store_true", help="do not embed registrar.ts")
args = ap.parse_args()
build_analytic_plan(args.out, Grid((120, 120, 80), (2.0, 2.0, 2.0)), stages=("rigid", "bspline"),
                    control_spacing_mm=(20.0, 20.0, 20.0), name="analytic_ssd",
                    registrar_ts=not args.no_registrar_ts)
print(args.out)
