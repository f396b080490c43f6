"""Build the bundled free-form plan: `python scripts/build_rigid_dense_plan.py [OUT.plan]`.

The rigid stage is rigid_bspline.plan's, unchanged (scripts/build_rigid_bspline_plan.py: four levels,
learned tissue features at 16/8 mm, MIND at 4/2 mm, multistart). Then a DENSE displacement stage on the
same three levels and schedule as the B-spline stage (8/4/2 mm, F(0.2)-F(0.2)-F(0.25), NFE 14): each
level's field is msode_export.analytic.DenseGNField on MIND (6-neighbourhood; dilation 1, 1, 2 voxels):
the Gauss-Newton moments of the MIND residual averaged over 16 mm blocks, a Gaussian window over the
blocks of 2 / 1.5 / 0.75 blocks (sigma 32 / 24 / 12 mm, coarse to fine), one damped 3x3 solve per block
(damping 0.05), interpolated back to the level grid. The displacement is a sum of such block-smooth
increments; no pair of the held-out report folds.

Measured while choosing (2026-12-04, 6 held-out hybrid T2 -> T1 pairs, RMSE(phi) median / worst mm;
rigid_bspline.plan 0.81 / 1.02 on the same pairs): 8 mm blocks with one window everywhere 1.25-8.2 mm
(unstable at the coarse level, up to 4.9 % folded voxels at sigma 8 mm); one window of 16-20 mm 1.07-1.12;
the same window plus a membrane smoothness term solved by CG 1.03-2.4 (dropped); windows shrinking from
coarse to fine (32 / 24 / 16 mm) 0.83, (32 / 24 / 12 mm) 0.70 at damping 0.5, 0.64 at 0.25, 0.60 at 0.1,
0.595 / 0.66 at 0.05 (this plan); a fine window of 8 mm or 20 mm lost 0.01-0.08 mm. The same choice on 6
FLAIR/PD/T1/T2 pairs: 0.84 / 1.28 (rigid_bspline.plan 1.28 / 2.25); on 6 B-spline-only T2 -> T1 pairs 0.64 /
0.67 (0.84 / 1.04); on 6 purely rigid T2 -> T1 pairs through both stages 0.40 / 0.45 (0.52 / 0.67).

The dense stage ends with the B-spline stage's scale search (msode_sdk.loop; factors 0.25, 0.5, 0.75, 1 by
MI). On 4 validation pairs per set (2026-12-05): rigid motions through both stages T2 -> T1 0.47 -> 0.32 mm,
FLAIR -> T2 1.06 -> 0.57; hybrid pairs unchanged (factor 1 chosen on all). The B-spline stage's fine-level
retune of that day (MIND dilation 1, windows 1 / 0.5 blocks, damping 0.02) made this dense field worse
(hybrid T2 -> T1 0.78 -> 0.82, rigid 0.47 -> 0.63), so its levels are unchanged.
What is learned and what is not: as rigid_bspline.plan, the tissue encoders of the rigid stage are trained;
the dense stage is closed-form (MIND + Gauss-Newton), not the paper's UNet fields trained through the ODE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from build_rigid_bspline_plan import SCALE_SEARCH, build

from msode_train.tissue import DEFAULT_WEIGHTS

# per level, coarse to fine (see the docstring)
DENSE_FIELD = {"block_mm": 16.0, "window_blocks": (2.0, 1.5, 0.75), "damping": 0.05, "gain": 5.0}


def build_rigid_dense(out, weights=DEFAULT_WEIGHTS, metrics: dict | None = None, **kw) -> Path:
    return build(
        out,
        weights,
        deformable="dense",
        dense=dict(DENSE_FIELD),
        scale_search=SCALE_SEARCH,
        name="rigid_dense",
        metrics=metrics,
        builder="scripts/build_rigid_dense_plan.py",
        description=(
            "Rigid (4 levels) then a dense displacement field (3 levels) for multi-contrast brain MRI. "
            "Per-level fields: Gauss-Newton steps on the SSD of learned tissue-class features (coarse rigid "
            "levels) and MIND (fine rigid levels; dense levels by 16 mm-block local solves); multistart rigid "
            "init; see training.note."
        ),
        training_note=(
            "Trained: the contrast-agnostic tissue encoders of the rigid stage (msode_train.tissue; supervised "
            "on phantom tissue labels, random contrasts and orientations). Closed-form: the Gauss-Newton heads "
            "(rigid; dense: msode_export.analytic.DenseGNField), the multistart initialiser and MIND. Not the "
            "paper's end-to-end trained CNN fields."
        ),
        **kw,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="sdk/msode_sdk/models/rigid_dense.plan")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--metrics", help="JSON file with evaluation metrics to record in the manifest")
    ap.add_argument("--no-registrar-ts", action="store_true")
    ap.add_argument("--formats", default="torchscript,onnx")
    args = ap.parse_args(argv)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    p = build_rigid_dense(
        args.out,
        args.weights,
        metrics=metrics,
        registrar_ts=not args.no_registrar_ts,
        formats=tuple(args.formats.split(",")),
    )
    print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
