"""The paper's Table 1 protocol on held-out synthetic pairs, MS-ODENet plans side by side with classical tools.

Pairs (:func:`test_pairs`): subjects of the ``test`` split (seeds 10000.., never seen in training) from
the cached bank at ``spacing_mm``; for pair ``i`` subject ``i mod n_subjects``, a contrast pair
(``pairs``: a list of ``[moving, fixed]`` used in turn, or ``random``), and a motion of ``motion``
(rigid | bspline | hybrid, the paper's distributions) from ``numpy.random.default_rng(seed)``; ground
truth exact by construction (:func:`msode_train.data.make_pair`).

Methods, each run on the same pairs:

* every plan given (label -> path) through ``msode_sdk.Registrar.register`` from ``(array, affine)``
  inputs (so the timing is end to end: resampling to the model grid, normalisation, the ODE, world
  outputs); the estimated map is the result's model-grid chain (the pair's grid and the plan's model
  frame share their centre);
* ``sitk``: SimpleITK multi-resolution (shrink 4/2/1, smoothing 2/1/0 voxels) Mattes MI (32 bins, 10 %
  random samples) rigid (Euler3D, geometric-centre initialiser, regular-step gradient descent), and
  for deformable motions a B-spline stage after it (mesh of ``sitk_bspline_mesh_mm`` mm, LBFGSB, 2
  levels); its map is sampled exactly with ``TransformToDisplacementField``;
* ``ants``: ANTsPy (``Rigid``, or ``SyNRA`` for deformable motions) when ``ants`` is importable; its map
  is read back by warping coordinate images (linear), exact inside the moving field of view;
* ``identity``: no registration (the starting error).

Both classical tools see the images in the model frame (identity direction, origin at minus half the
extent), so their fixed->moving maps are directly comparable with the SDK's chains.

Metrics per pair and method (the paper's, plus the tissue classes): Dice of the whole-tumour mask
(labels 4-6) and mean Dice of CSF/GM/WM, moving labels warped by the estimated map (one-hot, trilinear,
arg-max) vs the fixed labels; RMSE(x) of the moving image warped by the estimate vs warped by the truth
(intensities in [0, 1], over the fixed brain); RMSE(phi) in mm over the fixed brain
(:func:`msode_train.data.rmse_phi`); wall time in seconds. The summary gives mean (std), and for
RMSE(phi) also the median, the worst pair and the fraction below 2 mm.

Outputs in ``out_dir``: ``results.json`` (protocol, per-pair rows, summary), ``table.md``,
``fig_examples.png`` (fixed / moving / warped and error maps of the first pairs), ``fig_bars.png``
(bar charts with std error bars, like the paper's Figure 4), ``fig_rmse_phi.png`` (per-pair
RMSE(phi) of every method).

Ablations (paper Fig. 4a) are separate plans trained with config overrides and evaluated together:
``--set loss.sim=mi`` (no learned content loss), ``--set model.levels=1`` (single scale), ``--set
loss.lambda_self=0`` (no self-supervision); e.g. ``msode-eval --plan full=a.plan --plan mi=b.plan``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msode_sdk.errors import PlanError
from msode_sdk.registrar import resolve_plan_path
from msode_sdk.transforms import Grid, TransformChain, jacobian_determinant
from msode_sdk.warp import sample_points

from . import data as D

__all__ = [
    "EvalConfig",
    "test_pairs",
    "evaluate_plans",
    "pair_metrics",
    "run_sitk",
    "run_ants",
    "PairedComparison",
    "paired_comparison",
    "shift_estimate",
    "NonInferiority",
    "non_inferiority",
    "main",
]

_log = logging.getLogger("msode_train.evaluate")

TISSUES = (1, 2, 3)


@dataclass
class EvalConfig:
    motion: str = "rigid"
    motion_kwargs: dict = field(default_factory=dict)  # e.g. {"max_rot_deg": 40}
    n_pairs: int = 8
    spacing_mm: float = 2.0
    fov_mm: tuple = tuple(D.FOV_MM)
    bank_dir: str = "~/.cache/msode/bank"
    n_subjects: int | None = None  # default min(n_pairs, 50)
    pairs: object = (("t2", "t1"),)  # [[moving, fixed], ...] or "random"
    contrasts: tuple = tuple(D.CONTRASTS)
    baselines: tuple = ("sitk",)  # sitk, ants
    device: str = "cpu"
    backend: str = "auto"
    seed: int = 2021
    stages: tuple | None = None
    figures: bool = True
    sitk_bspline_mesh_mm: float = 40.0
    threads: int | None = None


# ------------------------------------------------------------------------------------------- pairs


def test_pairs(cfg: EvalConfig) -> list:
    """The held-out pairs of the protocol (deterministic in ``cfg``)."""
    n_sub = int(cfg.n_subjects or min(cfg.n_pairs, 50))
    bank = D.SubjectBank.for_split(
        Path(cfg.bank_dir).expanduser(),
        "test",
        n_sub,
        spacing=float(cfg.spacing_mm),
        grid_shape=tuple(int(v) for v in cfg.fov_mm),
        contrasts=tuple(cfg.contrasts),
    )
    rng = np.random.default_rng(int(cfg.seed))
    out = []
    for i in range(int(cfg.n_pairs)):
        if cfg.pairs == "random":
            a, b = rng.choice(len(cfg.contrasts), 2, replace=False)
            mc, fc = cfg.contrasts[a], cfg.contrasts[b]
        else:
            mc, fc = list(cfg.pairs)[i % len(cfg.pairs)]
        subj = bank[i % n_sub]
        chain = D.sample_motion(rng, cfg.motion, subj.grid, 1, **dict(cfg.motion_kwargs))
        pair = D.make_pair(subj, mc, fc, chain)
        pair.affine = subj.affine
        out.append(pair)
    return out


def _nifti_array(t: torch.Tensor) -> np.ndarray:
    """``(1, 1, D, H, W)`` tensor -> NIfTI ``(X, Y, Z)`` float32 array."""
    return np.ascontiguousarray(t[0, 0].permute(2, 1, 0).cpu().numpy().astype(np.float32))


# ----------------------------------------------------------------------------------------- metrics


def warp_labels(labels: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Labels ``(1, 1, D, H, W)`` pulled back through a point map (one-hot, trilinear, arg-max)."""
    n_cls = int(labels.max()) + 1
    oh = F.one_hot(labels[:, 0].long(), n_cls).permute(0, 4, 1, 2, 3).float()
    w = sample_points(oh, grid, points.float())
    lab = w.argmax(1, keepdim=True)
    return torch.where(w.sum(1, keepdim=True) < 0.5, torch.zeros_like(lab), lab).to(torch.uint8)


def pair_metrics(pair, points: torch.Tensor) -> dict:
    """Metrics of an estimated point map ``(1, D, H, W, 3)`` mm (model frame) on a pair."""
    g = pair.grid
    gt = pair.gt_points().float()
    brain = pair.fixed_brain
    warped = sample_points(pair.moving, g, points.float())
    truth = sample_points(pair.moving, g, gt)
    wl = warp_labels(pair.moving_labels, g, points)
    fl = pair.fixed_labels
    tum = lambda lab: np.isin(lab.cpu().numpy(), D.TUMOUR_LABELS)  # noqa: E731
    tissue = [D.dice(wl == c, fl == c) for c in TISSUES]
    return {
        "dice_tumour": D.dice(tum(wl), tum(fl)),
        "dice_tissue": float(np.mean(tissue)),
        "dice_csf": tissue[0],
        "dice_gm": tissue[1],
        "dice_wm": tissue[2],
        "rmse_x": D.rmse_x(warped, truth, brain),
        "rmse_phi_mm": float(D.rmse_phi(points, pair.chain, g, mask=brain)),
        "folding_frac": folding_fraction(points, g, brain),
    }


def folding_fraction(points: torch.Tensor, grid: Grid, mask: torch.Tensor) -> float:
    """Fraction of the voxels in ``mask`` (``[1, 1,] D, H, W``) where the point map ``(1, D, H, W, 3)`` mm
    on ``grid`` has a Jacobian determinant <= 0 (folds)."""
    det = jacobian_determinant(points.float(), list(grid.spacing_xyz))[0].cpu()
    inside = mask.reshape(det.shape).to(torch.bool).cpu()
    return float((det[inside] <= 0).double().mean()) if bool(inside.any()) else 0.0


# ------------------------------------------------------------------------------------------ methods


def run_msode(registrar, pair, stages=None) -> tuple[torch.Tensor, float, dict]:
    mov = (_nifti_array(pair.moving), pair.affine)
    fix = (_nifti_array(pair.fixed), pair.affine)
    t0 = time.perf_counter()
    res = registrar.register(mov, fix, stages=stages)
    secs = time.perf_counter() - t0
    chain: TransformChain = res.model_grid.chain
    with torch.no_grad():
        pts = chain.map_grid(pair.grid, batch=1, dtype=torch.float32, device=torch.device(registrar.device)).cpu()
    return pts, secs, {"nfe": res.nfe, "timings": res.timings, "backend": res.backend}


def _sitk_image(t: torch.Tensor, grid: Grid):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(t[0, 0].cpu().numpy().astype(np.float32))  # (z, y, x) -> size (x, y, z)
    img.SetSpacing(tuple(float(s) for s in grid.spacing_xyz))
    img.SetOrigin(tuple(-(n - 1) / 2.0 * s for n, s in zip(grid.shape_xyz, grid.spacing_xyz)))
    img.SetDirection((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return img


def run_sitk(pair, deformable: bool, mesh_mm: float = 40.0, seed: int = 0) -> tuple[torch.Tensor, float, dict]:
    """SimpleITK Mattes-MI rigid (+ B-spline) in the model frame; returns the point map and seconds."""
    import SimpleITK as sitk

    g = pair.grid
    t0 = time.perf_counter()
    fixed, moving = _sitk_image(pair.fixed, g), _sitk_image(pair.moving, g)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=300, relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    levels = [f for f in (4, 2, 1) if min(g.shape_xyz) / f >= 8] or [1]  # tiny grids: fewer levels
    reg.SetShrinkFactorsPerLevel(levels)
    reg.SetSmoothingSigmasPerLevel([{4: 2, 2: 1, 1: 0}[f] for f in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg.SetInitialTransform(init, inPlace=False)
    rigid = reg.Execute(fixed, moving)
    tx = rigid
    if deformable:
        mesh = [max(1, int(round(e / mesh_mm))) for e in g.extent_xyz]
        bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        r2 = sitk.ImageRegistrationMethod()
        r2.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        r2.SetMetricSamplingStrategy(r2.RANDOM)
        r2.SetMetricSamplingPercentage(0.1, seed)
        r2.SetInterpolator(sitk.sitkLinear)
        r2.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5,
            numberOfIterations=100,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=500,
        )
        r2.SetShrinkFactorsPerLevel([2, 1])
        r2.SetSmoothingSigmasPerLevel([1, 0])
        r2.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        r2.SetMovingInitialTransform(rigid)
        r2.SetInitialTransform(bs, inPlace=True)
        r2.Execute(fixed, moving)
        tx = sitk.CompositeTransform([rigid, bs])  # x -> rigid(bspline(x))
    secs = time.perf_counter() - t0
    field = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
    )
    disp = torch.from_numpy(sitk.GetArrayFromImage(field)).float()  # (z, y, x, 3) as (x, y, z) mm
    pts = g.points(torch.float32) + disp
    return pts[None], secs, {}


def ants_available() -> bool:
    try:
        import ants  # noqa: F401

        return True
    except ImportError:
        return False


def run_ants(pair, deformable: bool) -> tuple[torch.Tensor, float, dict]:
    """ANTsPy ``Rigid`` (or ``SyNRA``) in the model frame; the map is read back by warping coordinate images."""
    import ants

    g = pair.grid
    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(g.shape_xyz, g.spacing_xyz))

    def img(arr_xyz):
        return ants.from_numpy(
            np.ascontiguousarray(arr_xyz, dtype=np.float32),
            origin=origin,
            spacing=tuple(g.spacing_xyz),
            direction=np.eye(3),
        )

    t0 = time.perf_counter()
    fixed, moving = img(_nifti_array(pair.fixed)), img(_nifti_array(pair.moving))
    out = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyNRA" if deformable else "Rigid")
    secs = time.perf_counter() - t0
    comps = []
    pts = g.points(torch.float64).numpy()  # (D, H, W, 3)
    for a in range(3):
        coord = img(np.ascontiguousarray(pts[..., a].transpose(2, 1, 0)))
        w = ants.apply_transforms(fixed=fixed, moving=coord, transformlist=out["fwdtransforms"], interpolator="linear")
        comps.append(torch.from_numpy(np.asarray(w.numpy()).transpose(2, 1, 0).copy()).float())
    return torch.stack(comps, -1)[None], secs, {}


# --------------------------------------------------------------------------------------------- main


def _summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("dice_tumour", "dice_tissue", "rmse_x", "rmse_phi_mm", "seconds", "folding_frac"):
        if not all(key in r for r in rows):  # rows of reports written before the key existed
            continue
        v = np.asarray([r[key] for r in rows], dtype=np.float64)
        out[key] = {
            "mean": float(v.mean()),
            "std": float(v.std()),
            "median": float(np.median(v)),
            "max": float(v.max()),
            "min": float(v.min()),
        }
    phi = np.asarray([r["rmse_phi_mm"] for r in rows])
    out["success_rmse_phi_lt_2mm"] = float((phi < 2.0).mean())
    out["n_pairs"] = len(rows)
    return out


@dataclass
class PairedComparison:
    """Method ``a`` against method ``b`` on the same pairs, for one per-pair ``metric`` (lower is better
    for RMSE and seconds, higher for Dice: ``higher_is_better``). ``diff`` = a - b per pair;
    ``a_better`` / ``b_better`` count pairs where one is better by more than ``tie_tol`` (metric units);
    ``p_wilcoxon``: two-sided Wilcoxon signed-rank test of the differences (``None`` without SciPy or
    when all differences are zero); ``p_sign``: two-sided exact sign test over the non-tied pairs;
    ``shift`` [``shift_lo``, ``shift_hi``]: Hodges-Lehmann estimate of a - b (metric units) and its
    distribution-free ``confidence`` interval."""

    a: str
    b: str
    metric: str
    n: int
    median_a: float
    median_b: float
    mean_a: float
    mean_b: float
    median_diff: float
    a_better: int
    b_better: int
    ties: int
    tie_tol: float
    higher_is_better: bool
    p_wilcoxon: float | None
    p_sign: float
    shift: float = float("nan")
    shift_lo: float = float("nan")
    shift_hi: float = float("nan")
    confidence: float = 0.95


def _signed_rank_cdf(n: int) -> np.ndarray:
    """P(T+ <= t), t = 0 .. n(n+1)/2, of the Wilcoxon signed-rank statistic under the null (no ties):
    every subset of the ranks 1..n is equally likely, counted exactly by dynamic programming."""
    counts = np.zeros(n * (n + 1) // 2 + 1, dtype=np.float64)
    counts[0] = 1.0
    for r in range(1, n + 1):
        counts[r:] = counts[r:] + counts[:-r].copy()
    return np.cumsum(counts) / 2.0**n


def shift_estimate(d, confidence: float = 0.95) -> tuple[float, float, float]:
    """Hodges-Lehmann estimate of the centre of paired differences ``d`` (the median of the Walsh
    averages (d_i + d_j) / 2, i <= j) and its distribution-free confidence interval, the one that
    inverts the two-sided Wilcoxon signed-rank test: [W_(c+1), W_(M-c)] of the M sorted Walsh averages,
    c the largest count with P(T+ <= c) <= (1 - confidence) / 2 (exact null distribution for n <= 300,
    normal approximation beyond; coverage >= ``confidence`` for continuous differences). Returns
    (estimate, lo, hi) in the units of ``d``; the bounds are -inf / inf when n is too small for the level."""
    d = np.asarray(d, dtype=np.float64).ravel()
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"shift_estimate needs finite differences; got {d.size} values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = d.size
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    m = walsh.size
    alpha_half = (1.0 - confidence) / 2.0
    if n <= 300:
        cdf = _signed_rank_cdf(n)
        c = int(np.searchsorted(cdf, alpha_half, side="right")) - 1  # largest t with cdf[t] <= alpha/2
    else:
        from statistics import NormalDist

        mu, sd = n * (n + 1) / 4.0, math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)
        c = int(math.floor(mu + sd * NormalDist().inv_cdf(alpha_half)))
    lo, hi = (float(walsh[c]), float(walsh[m - 1 - c])) if c >= 0 else (-math.inf, math.inf)
    return float(np.median(walsh)), lo, hi


def paired_comparison(
    report: dict, a: str, b: str, metric: str = "rmse_phi_mm", tie_tol: float | None = None, confidence: float = 0.95
) -> PairedComparison:
    """Compare methods ``a`` and ``b`` of one :func:`evaluate_plans` report pair by pair (the protocol
    gives every method the same pairs). ``tie_tol`` defaults to 0.05 mm for RMSE(phi), 0.005 for Dice
    and RMSE(x), 0 otherwise. ``shift`` [``shift_lo``, ``shift_hi``]: Hodges-Lehmann estimate of a - b
    per pair with its ``confidence`` interval (:func:`shift_estimate`), the number a non-inferiority
    margin is checked against."""
    rows = report["rows"]
    for m in (a, b):
        if m not in rows:
            raise KeyError(f"method {m!r} is not in the report; methods: {sorted(rows)}")
    ra, rb = rows[a], rows[b]
    if [r["pair"] for r in ra] != [r["pair"] for r in rb]:
        raise ValueError(f"methods {a!r} and {b!r} were not run on the same pairs")
    if tie_tol is None:
        tie_tol = {"rmse_phi_mm": 0.05, "dice_tumour": 0.005, "dice_tissue": 0.005, "rmse_x": 0.005}.get(metric, 0.0)
    va = np.asarray([r[metric] for r in ra], dtype=np.float64)
    vb = np.asarray([r[metric] for r in rb], dtype=np.float64)
    higher = metric.startswith("dice")
    d = va - vb
    gain = d if higher else -d  # > 0 where a is better
    a_better = int((gain > tie_tol).sum())
    b_better = int((gain < -tie_tol).sum())
    ties = len(d) - a_better - b_better
    k, m = min(a_better, b_better), a_better + b_better
    p_sign = min(1.0, 2.0 * sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m) if m else 1.0
    p_w = None
    if np.any(d != 0):
        try:
            from scipy.stats import wilcoxon

            p_w = float(wilcoxon(va, vb).pvalue)
        except ImportError:
            p_w = None
    # a non-finite metric (a failed method) leaves the shift undefined rather than failing the comparison
    shift, lo, hi = shift_estimate(d, confidence) if np.all(np.isfinite(d)) else (math.nan,) * 3
    return PairedComparison(
        a,
        b,
        metric,
        len(d),
        float(np.median(va)),
        float(np.median(vb)),
        float(va.mean()),
        float(vb.mean()),
        float(np.median(d)),
        a_better,
        b_better,
        ties,
        float(tie_tol),
        higher,
        p_w,
        float(p_sign),
        shift,
        lo,
        hi,
        float(confidence),
    )


@dataclass
class NonInferiority:
    """Is method family ``a`` at least as good as ``b`` within ``margin`` (metric units)? ``runs``: the
    (a, b) method pairs of one report (e.g. the two arms trained with seed 0, with seed 1); per test pair
    the difference a - b is averaged over the runs (training noise averaged out), its Hodges-Lehmann
    ``shift`` gets a ``confidence`` interval [``shift_lo``, ``shift_hi``], and ``holds`` when the worse
    end of that interval stays within the margin (``shift_hi <= margin`` where lower is better,
    ``shift_lo >= -margin`` where higher is better). ``diffs``: the run-averaged a - b per test pair;
    ``per_run``: each run's own comparison."""

    runs: list
    metric: str
    margin: float
    n: int
    shift: float
    shift_lo: float
    shift_hi: float
    confidence: float
    holds: bool
    diffs: list
    per_run: list


def non_inferiority(
    report: dict, runs, metric: str = "rmse_phi_mm", margin: float | None = None, confidence: float = 0.95
) -> NonInferiority:
    """Non-inferiority of a over b, pooling several training runs: ``runs`` = [(a_method, b_method), ...]
    in ``report`` (all on the protocol's same test pairs). ``margin`` defaults to the metric's tie
    tolerance of :func:`paired_comparison` (0.05 mm for RMSE(phi))."""
    runs = [tuple(r) for r in runs]
    if not runs:
        raise ValueError("non_inferiority needs at least one (a, b) pair of methods")
    per_run = [paired_comparison(report, a, b, metric, tie_tol=margin, confidence=confidence) for a, b in runs]
    margin = per_run[0].tie_tol
    higher = per_run[0].higher_is_better
    rows = report["rows"]
    d = np.mean([[ra[metric] - rb[metric] for ra, rb in zip(rows[a], rows[b])] for a, b in runs], axis=0)
    shift, lo, hi = shift_estimate(d, confidence)
    holds = bool(lo >= -margin) if higher else bool(hi <= margin)
    return NonInferiority(
        [list(r) for r in runs],
        metric,
        float(margin),
        int(d.size),
        shift,
        lo,
        hi,
        float(confidence),
        holds,
        [float(x) for x in d],
        [asdict(c) for c in per_run],
    )


def evaluate_plans(plans: dict, cfg: EvalConfig, out_dir=None, log=None) -> dict:
    """Run the protocol for ``plans`` (label -> path) and ``cfg.baselines``; write the outputs to
    ``out_dir`` (if given) and return the report dict."""
    log = log or _log.info
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    from msode_sdk import Registrar

    pairs = test_pairs(cfg)
    deformable = cfg.motion in ("bspline", "hybrid")
    methods: dict[str, object] = {"identity": None}
    for label, path in plans.items():
        methods[label] = Registrar.load(path, device=cfg.device, backend=cfg.backend)
    for b in cfg.baselines:
        if b == "ants" and not ants_available():
            log("ANTsPy is not importable: skipping the ants baseline")
            continue
        methods[b] = b
    rows: dict[str, list] = {m: [] for m in methods}
    examples = []
    for i, pair in enumerate(pairs):
        for m, obj in methods.items():
            extra = {}
            if obj is None:
                pts, secs = pair.grid.points(torch.float32)[None], 0.0
            elif obj == "sitk":
                pts, secs, extra = run_sitk(pair, deformable, cfg.sitk_bspline_mesh_mm, seed=cfg.seed + i)
            elif obj == "ants":
                pts, secs, extra = run_ants(pair, deformable)
            else:
                # warm-up: the first call of a registrar includes one-off costs (TorchScript optimisation)
                if i == 0:
                    run_msode(obj, pair, cfg.stages)
                pts, secs, extra = run_msode(obj, pair, cfg.stages)
            met = pair_metrics(pair, pts)
            row = {
                "pair": i,
                "subject": pair.subject_id,
                "moving": pair.moving_contrast,
                "fixed": pair.fixed_contrast,
                **met,
                "seconds": secs,
                **({"nfe": extra["nfe"]} if "nfe" in extra else {}),
            }
            rows[m].append(row)
            if i < 2:
                examples.append((i, m, pts))
            log(
                f"pair {i} {pair.moving_contrast}->{pair.fixed_contrast} {m:>12s}: RMSE(phi) {met['rmse_phi_mm']:6.2f} mm, "
                f"Dice tumour {100 * met['dice_tumour']:5.1f} %, {secs:6.2f} s"
            )
    summary = {m: _summary(r) for m, r in rows.items()}
    protocol = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    protocol["test_seeds"] = sorted({int(p.subject_id[5:]) for p in pairs})
    protocol["plans"] = {k: str(v) for k, v in plans.items()}
    report = {
        "protocol": protocol,
        "summary": summary,
        "rows": rows,
        "environment": {"torch": str(torch.__version__), "threads": torch.get_num_threads()},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=2))
        (out / "table.md").write_text(markdown_table(report))
        if cfg.figures:
            try:
                write_figures(out, pairs, examples, rows)
            except ImportError as exc:  # matplotlib missing
                log(f"figures skipped: {exc}")
    return report


def markdown_table(report: dict) -> str:
    p = report["protocol"]
    lines = [
        f"# MS-ODENet evaluation: {p['motion']} motions, {p['n_pairs']} held-out pairs",
        "",
        f"Synthetic test subjects (seeds {p['test_seeds'][0]}..{p['test_seeds'][-1]}) at {p['spacing_mm']:g} mm, "
        f"contrast pairs {p['pairs']}, protocol seed {p['seed']}, device {p['device']}. "
        "Mean (std); RMSE(phi) also median / worst; success = RMSE(phi) < 2 mm; folding = brain voxels where "
        "the map's Jacobian determinant is <= 0 (mean / worst pair).",
        "",
        "| Method | Dice tumour / % | Dice tissue / % | RMSE(x) x1e-2 | RMSE(phi) / mm | median / worst | success "
        "| folding / % | Time / s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in report["summary"].items():
        fold = s.get("folding_frac")
        folding = f"{100 * fold['mean']:.3f} / {100 * fold['max']:.3f}" if fold else "n/a"
        lines.append(
            f"| {m} | {100 * s['dice_tumour']['mean']:.1f} ({100 * s['dice_tumour']['std']:.1f}) "
            f"| {100 * s['dice_tissue']['mean']:.1f} ({100 * s['dice_tissue']['std']:.1f}) "
            f"| {100 * s['rmse_x']['mean']:.2f} ({100 * s['rmse_x']['std']:.2f}) "
            f"| {s['rmse_phi_mm']['mean']:.2f} ({s['rmse_phi_mm']['std']:.2f}) "
            f"| {s['rmse_phi_mm']['median']:.2f} / {s['rmse_phi_mm']['max']:.2f} "
            f"| {100 * s['success_rmse_phi_lt_2mm']:.0f} % "
            f"| {folding} "
            f"| {s['seconds']['mean']:.2f} ({s['seconds']['std']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def write_figures(out: Path, pairs, examples, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(rows)
    # 1. examples: per example pair, fixed / moving / warped per method, and |warped - truth|
    ex_pairs = sorted({i for i, _, _ in examples})
    fig, axes = plt.subplots(
        2 * len(ex_pairs), len(methods) + 2, figsize=(2.4 * (len(methods) + 2), 4.8 * len(ex_pairs)), squeeze=False
    )
    for r, i in enumerate(ex_pairs):
        p = pairs[i]
        z = p.grid.shape_dhw[0] // 2
        truth = sample_points(p.moving, p.grid, p.gt_points().float())
        ax = axes[2 * r]
        ax[0].imshow(p.fixed[0, 0, z].cpu().numpy(), cmap="gray", origin="lower")
        ax[0].set_title(f"fixed ({p.fixed_contrast})")
        ax[1].imshow(p.moving[0, 0, z].cpu().numpy(), cmap="gray", origin="lower")
        ax[1].set_title(f"moving ({p.moving_contrast})")
        axes[2 * r + 1][0].imshow(truth[0, 0, z].cpu().numpy(), cmap="gray", origin="lower")
        axes[2 * r + 1][0].set_title("moving o phi_true")
        axes[2 * r + 1][1].axis("off")
        for c, m in enumerate(methods):
            pts = [e[2] for e in examples if e[0] == i and e[1] == m][0]
            w = sample_points(p.moving, p.grid, pts.float())
            ax[c + 2].imshow(w[0, 0, z].cpu().numpy(), cmap="gray", origin="lower")
            ax[c + 2].set_title(f"{m}: warped")
            err = (w - truth).abs()[0, 0, z].cpu().numpy()
            axes[2 * r + 1][c + 2].imshow(err, cmap="magma", vmin=0, vmax=0.5, origin="lower")
            axes[2 * r + 1][c + 2].set_title(f"{m}: |error|")
        for a in list(axes[2 * r]) + list(axes[2 * r + 1]):
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "fig_examples.png", dpi=80)
    plt.close(fig)
    # 2. bars like Fig. 4
    keys = [
        ("dice_tumour", "Dice tumour", 100.0),
        ("dice_tissue", "Dice tissue", 100.0),
        ("rmse_x", "RMSE(x) x1e-2", 100.0),
        ("rmse_phi_mm", "RMSE(phi) / mm", 1.0),
        ("seconds", "time / s", 1.0),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    for ax, (k, title, f) in zip(axes, keys):
        vals = [f * np.mean([r[k] for r in rows[m]]) for m in methods]
        errs = [f * np.std([r[k] for r in rows[m]]) for m in methods]
        ax.bar(range(len(methods)), vals, yerr=errs, color=[f"C{i}" for i in range(len(methods))], capsize=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if k == "seconds":
            ax.set_yscale("symlog", linthresh=0.1)
    fig.tight_layout()
    fig.savefig(out / "fig_bars.png", dpi=90)
    plt.close(fig)
    # 3. per-pair RMSE(phi)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for j, m in enumerate(methods):
        ax.plot([r["pair"] for r in rows[m]], [r["rmse_phi_mm"] for r in rows[m]], "o-", label=m, ms=3)
    ax.set_xlabel("pair")
    ax.set_ylabel("RMSE(phi) / mm")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig_rmse_phi.png", dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="msode-eval", description="Table-1 protocol on held-out synthetic pairs.")
    ap.add_argument("--plan", action="append", default=[], metavar="[LABEL=]PATH", help="plan to evaluate (repeatable)")
    ap.add_argument("--motion", default="rigid", choices=["rigid", "bspline", "hybrid"])
    ap.add_argument("--max-rot-deg", type=float, help="rotation range U(-a, a) per axis (default: the paper's)")
    ap.add_argument("--max-trans-mm", type=float, help="translation range U(-a, a) mm (default: the paper's)")
    ap.add_argument("--pairs", default="t2:t1", help="'random' or comma-separated moving:fixed contrast pairs")
    ap.add_argument("--n", type=int, default=8, help="number of pairs")
    ap.add_argument("--spacing", type=float, default=2.0, help="test bank spacing in mm")
    ap.add_argument("--bank-dir", default="~/.cache/msode/bank")
    ap.add_argument("--baselines", default="sitk", help="comma-separated: sitk, ants (or 'none')")
    ap.add_argument("--stages", help="comma-separated plan stages to run (default all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--out", default="out/eval", help="output directory")
    args = ap.parse_args(argv)
    plans = {}
    for spec in args.plan:
        label, _, path = spec.rpartition("=")
        label = label or Path(path).stem
        try:  # a file, or a bundled plan's name (as Registrar.load takes it)
            plans[label] = str(resolve_plan_path(path))
        except PlanError as e:
            print(f"msode-eval: error: {e}", file=sys.stderr)
            return 2
    pairs = "random" if args.pairs == "random" else [tuple(p.split(":")) for p in args.pairs.split(",")]
    for p in [] if pairs == "random" else pairs:
        if len(p) != 2 or any(c not in D.CLASS_MEANS for c in p):
            print(
                f"msode-eval: error: bad contrast pair {':'.join(p)!r}; contrasts: {list(D.CLASS_MEANS)}",
                file=sys.stderr,
            )
            return 2
    baselines = () if args.baselines in ("", "none") else tuple(b.strip() for b in args.baselines.split(","))
    mk = {}
    if args.max_rot_deg is not None:
        mk["max_rot_deg"] = args.max_rot_deg
    if args.max_trans_mm is not None:
        mk["max_trans_mm"] = args.max_trans_mm
    cfg = EvalConfig(
        motion=args.motion,
        motion_kwargs=mk,
        n_pairs=args.n,
        spacing_mm=args.spacing,
        bank_dir=args.bank_dir,
        pairs=pairs,
        baselines=baselines,
        device=args.device,
        backend=args.backend,
        seed=args.seed,
        stages=tuple(args.stages.split(",")) if args.stages else None,
        figures=not args.no_figures,
        threads=args.threads,
    )
    try:
        report = evaluate_plans(plans, cfg, out_dir=args.out)
    except Exception as exc:
        _log.exception("evaluation failed")
        print(f"msode-eval: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(report))
    return 0
