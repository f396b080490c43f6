"""Build the bundled free-form plan: `python scripts/build_rigid_dense_plan.py [OUT.plan]`.

The rigid stage is rigid_bspline.plan's, unchanged (scripts/build_rigid_bspline_plan.py: four levels,
learned tissue features at 16/8 mm, MIND at 4/2 mm, multistart). Then a DENSE displacement stage on the
same three levels and schedule as the B-spline stage (8/4/2 mm, F(0.2)-F(0.2)-F(0.25), NFE 14), MIND
(6-neighbourhood) features, every level a local Gauss-Newton solve on blocks (the MIND moments averaged over
a block, a Gaussian window over the blocks, one damped 3x3 solve per block, damping 0.05):
* 8 and 4 mm (msode_export.analytic.DenseSplineField): 16 mm blocks, windows of 2 / 1 blocks (32 / 16 mm),
  gain 3, MIND dilation 1 (the B-spline stage's settings); the step is the block solutions' least-squares fit
  by the 40 mm cubic B-spline, sampled at every voxel of the level: at these levels a block's own solution is
  mostly noise below the lattice's scale;
* 2 mm (DenseGNField): free-form, 8 mm blocks, window 1.5 blocks (12 mm), gain 5, MIND dilation 2, the block
  solutions interpolated trilinearly.
The displacement is a sum of such smooth increments; no pair of the held-out report folds. The stage ends
with the B-spline stage's scale search (msode_sdk.loop; factors 0.25, 0.5, 0.75, 1 by MI).

Second build (2026-12-05, later), chosen on validation subjects (seeds 20000-20003, motions seed 99, 4 pairs
per set, RMSE(phi) median mm; first build -> this): hybrid T2 -> T1 0.78 -> 0.70, FLAIR -> T1 0.90 -> 0.80,
FLAIR -> T2 1.26 -> 1.18; rigid motions through both stages T2 -> T1 0.32 -> 0.33, FLAIR -> T2 0.57 -> 0.56;
four Gaussian bumps (sigma 8 mm, 4 mm peaks) on top of a hybrid motion, inside the bumps T2 -> T1 1.5-2.2
-> 1.3-2.0 mm. Alternatives measured there: the spline fit at 8/4 mm alone (16 mm blocks at 2 mm as before)
0.72 / 0.82 / 1.19; at all three levels, i.e. a B-spline stage stored densely, 0.59 / 0.54 / 0.85 but no
better than rigid_bspline.plan inside the bumps (1.8-2.5 mm: the 40 mm lattice cannot hold them), so not a
free-form plan; a 2 mm level whose step is the fit plus lambda times the free-form remainder: lambda 0.25
0.62 / 0.58 / 0.88, lambda 0.5 0.63-0.69 / 0.65 / 0.94-0.95, both no better than this inside the bumps (medians)
and worse on rigid motions (0.36-0.40); 2 mm windows of 1 block (8 mm) better inside the bumps (1.0-2.1) but
worse elsewhere (hybrid 0.78, rigid 0.48). On a purely local deformation the held-out test pair of
tests/test_bundled_plan.py (four bumps, no other motion) gives inside the bumps: identity 2.23 mm, this plan
1.25, the first build 1.43, rigid_bspline.plan 1.85.

First build (2026-12-04, 6 held-out hybrid T2 -> T1 pairs, RMSE(phi) median / worst mm; rigid_bspline.plan
then 0.81 / 1.02): 8 mm blocks with one window everywhere 1.25-8.2 mm (unstable at the coarse level, up to
4.9 % folded voxels at sigma 8 mm); one window of 16-20 mm 1.07-1.12; the same window plus a membrane
smoothness term solved by CG 1.03-2.4 (dropped); windows shrinking from coarse to fine (32 / 24 / 16 mm) 0.83,
(32 / 24 / 12 mm) 0.70 at damping 0.5, 0.64 at 0.25, 0.60 at 0.1, 0.595 / 0.66 at 0.05 (that build, trilinear
at every level).
What is learned and what is not: as rigid_bspline.plan, the tissue encoders of the rigid stage are trained;
the dense stage is closed-form (MIND + Gauss-Newton), not the paper's UNet fields trained through the ODE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from build_rigid_bspline_plan import SCALE_SEARCH, build

from msode_train.tissue import DEFAULT_WEIGHTS

# per level, coarse to fine (see the docstring): at 8 and 4 mm the block solutions' 40 mm B-spline fit sampled
# densely (DenseSplineField, the B-spline stage's settings), at 2 mm free-form on 8 mm blocks (DenseGNField)
DENSE_FIELD = {
    "spline_fit": (True, True, False),
    "block_mm": (16.0, 16.0, 8.0),
    "window_blocks": (2.0, 1.0, 1.5),
    "damping": 0.05,
    "gain": (3.0, 3.0, 5.0),
    "mind_dilation": (1, 1, 2),
}


def build_rigid_dense(
    out, weights=DEFAULT_WEIGHTS, metrics: dict | None = None, dense_checkpoint=None, name="rigid_dense", **kw
) -> Path:
    """The plan; ``dense_checkpoint``: the dense stage's features trained through the loop (``msode-train
    plan_v2_dense``: ``out/train/plan_v2_dense/dense.ckpt``) instead of MIND, its field settings as trained."""
    trained = dense_checkpoint is not None
    return build(
        out,
        weights,
        deformable="dense",
        dense=dict(DENSE_FIELD),
        dense_checkpoint=dense_checkpoint,
        scale_search=SCALE_SEARCH,
        name=name,
        metrics=metrics,
        builder="scripts/build_rigid_dense_plan.py",
        description=(
            "Rigid (4 levels) then a dense displacement field (3 levels) for multi-contrast brain MRI. "
            "Per-level fields: Gauss-Newton steps on the SSD of learned tissue-class features (coarse rigid "
            "levels) and MIND (fine rigid levels; dense levels by local block solves, spline-fitted at 8/4 mm, "
            "free-form at 2 mm"
            + ("; dense features trained through the loop" if trained else "")
            + "); multistart rigid init; see training.note."
        ),
        training_note=None  # build's note of a stage trained through the loop
        if trained
        else (
            "Trained: the contrast-agnostic tissue encoders of the rigid stage (msode_train.tissue; supervised "
            "on phantom tissue labels, random contrasts and orientations). Closed-form: the Gauss-Newton heads "
            "(rigid; dense: msode_export.analytic.DenseSplineField at 8/4 mm, DenseGNField at 2 mm), the multistart "
            "initialiser and MIND. Not the "
            "paper's end-to-end trained CNN fields."
        ),
        **kw,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="sdk/msode_sdk/models/rigid_dense.plan")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument(
        "--dense-checkpoint",
        help="dense stage trained through the loop (msode-train plan_v2_dense: out/train/plan_v2_dense/dense.ckpt): "
        "its learned features and field settings replace MIND on the dense levels",
    )
    ap.add_argument("--name", default=None, help="the plan's name (default: the output file's stem)")
    ap.add_argument("--metrics", help="JSON file with evaluation metrics to record in the manifest")
    ap.add_argument("--no-registrar-ts", action="store_true")
    ap.add_argument("--formats", default="torchscript,onnx")
    args = ap.parse_args(argv)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    p = build_rigid_dense(
        args.out,
        args.weights,
        metrics=metrics,
        dense_checkpoint=args.dense_checkpoint,
        name=args.name or Path(args.out).stem,
        registrar_ts=not args.no_registrar_ts,
        formats=tuple(args.formats.split(",")),
    )
    print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
