"""Build the bundled analytic plan: `python scripts/build_analytic_plan.py OUT.plan`.

Model grid 120x120x80 at 2 mm (240x240x160 mm, BraTS-like field of view), rigid then B-spline
(20 mm control spacing), the paper's solver schedules; "networks" are SSD Gauss-Newton flows.
"""
import sys

from msode_export.analytic import build_analytic_plan
from msode_sdk.transforms import Grid

out = sys.argv[1] if len(sys.argv) > 1 else "sdk/msode_sdk/models/analytic_ssd.plan"
build_analytic_plan(out, Grid((120, 120, 80), (2.0, 2.0, 2.0)), stages=("rigid", "bspline"),
                    control_spacing_mm=(20.0, 20.0, 20.0), name="analytic_ssd")
print(out)
