"""The registration loop: stages, pyramid levels, solver steps. One implementation, run eagerly by
:meth:`msode_sdk.Registrar.register_model_grid` and captured as CUDA graphs by :mod:`msode_sdk._cuda_graph`
(which hands it warps that never leave the device).

What one registration computes (model grid, tensors ``(N, 1, D, H, W)``, points in centre-relative mm):

1. the pyramid: each level grid of every stage, by repeated mm-exact factor-2 sampling of the model-grid
   images (:func:`downsample`);
2. for each stage in order, its levels coarse to fine, each integrating
   ``d(theta)/dt = f_l(moving_l o phi, fixed_l, t)`` over ``[t0_l, t1_l]`` with the level's solver, where
   ``phi = prior stages o own transform(theta)``; the state carries from level to level
   (:func:`msode_sdk.transforms.carry_state`);
3. a rigid stage may start from an initialiser (``init``): ``moments`` (the best of the identity and the
   4 principal-axes candidates by MI on the first level) or ``multistart`` (the first level integrated
   from all 5 starts as one batch, the end points scored by MI on the next level, the best continues),
   all on the device (:mod:`msode_sdk.initialize`);
4. a deformable stage may end with a *scale search* (plan stage parameter ``scale_search``, a list of
   factors): its final state times each factor, scored by MI between the fixed image and the moving image
   warped through the whole chain at every 3rd model-grid voxel of each axis (1/27 of a full warp's
   cost), the best kept, per pair. Why: the Gauss-Newton fields' fixed point carries a bias of the
   features between contrasts (MIND: 0.2-0.5 mm on purely rigid T2->T1 and FLAIR->T2 motions) that a
   second, intensity-statistics similarity does not share; on validation pairs, factors 0.25-1 took rigid
   motions through the bundled rigid+B-spline plan from 0.46 to 0.30 mm (T2->T1) and 0.85 to 0.45 mm
   (FLAIR->T2) and chose factor 1 on every hybrid pair (docs/formats.md, "Deformable scale search");
5. the final warp of the moving image through the whole chain.

Feature levels (plan format 2, a scale with ``features``): the level's feature network runs on the fixed
image once per level, not inside the vector field at every evaluation; the field takes
``(moving features, fixed features, t)`` on the level's feature grid. The moving features come, per the
scale's ``feature_warp``,

* ``false`` (exact, what the bundled plan uses): from the feature network applied to the warped moving
  image at every evaluation -- the same numbers as a field that computes both features itself;
* ``true`` (feature warping): from the moving level image resampled once, at the level's start,
  through the *level-start frame*, after which every evaluation warps those features with what the
  state adds to that frame:

  - deformable stages (B-spline, dense): frame = the prior stages (e.g. the rigid result); each
    evaluation warps the features by the stage's own transform (exact composition:
    ``moving o prior o own = (moving o prior) o own``);
  - rigid stages: frame = prior stages o own transform at the level's start ``M0``; each evaluation
    warps by the relative rigid map ``M0^-1 M(theta)`` (exact composition too), which keeps
    direction-dependent features (MIND's neighbour offsets) aligned with the fixed image's axes.

  For intensities that is exact up to one extra trilinear interpolation; for features that vary at the
  voxel scale it is not: warping MIND or the tissue encoders' probabilities instead of recomputing them
  moved the bundled plan's rigid stage from 0.20 to 4.8 mm RMSE(phi) on a held-out T2->T1 pair, and the
  B-spline stage from 0.83 to 0.94 mm median on 6 held-out pairs (2026-12-04), so it is for networks
  whose features are smooth at the level's voxel scale.

Fields of view (deformable stages): an image is zero outside its own field of view on the model grid, so
where a field of view cuts the anatomy (a slab, an oblique field of view through the head) one image shows an
edge the other does not, and a deformable stage deformed towards it (measured: a rigid pair whose fixed slab
cut the brain got up to 9.7 mm of spurious deformation, 2.4 % of brain voxels > 5 mm). When either image's own
field of view cuts content inside the model grid (:func:`fov_cuts_content`), :meth:`RegistrationLoop.pyramid`
keeps both images' field-of-view masks on the deformable (:data:`FOV_MASKED`) exact feature levels; each level
erodes them by :data:`FOV_MARGIN_MM` at its start (a feature that near the edge already sees the padding)
and at every evaluation replaces the moving features by the fixed ones outside the joint field of view (the
fixed mask times the moving mask, warped with the image in the same call): there the residual is zero and
nothing drives the deformation, inside nothing changes. Pairs whose fields of view cut nothing run exactly as
before (no mask is kept), as the latency benchmark's do. Rigid stages are not masked: replacing their features
the same way was worse, and cutting the warped moving image to the fixed field of view helped on half of 8
slab pairs and hurt badly on the other half. The scripted ``registrar.ts`` (C++) masks the same way in
``register_native``; its model-grid ``forward`` takes no masks.

Nothing here synchronises with the host except what a solver asks for (the adaptive solver's step
control) and the eager path's per-stage timing and finiteness checks; with fixed-step solvers the whole
of :meth:`RegistrationLoop.run_stage` is capturable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import torch

from .integrate import LevelSchedule, SegmentStats, Solver, get_solver
from .initialize import candidate_thetas, choose_start, mutual_information
from .transforms import (
    Grid,
    MatrixTransform,
    TransformChain,
    carry_state,
    initial_state,
    make_transform,
    rigid_inverse,
    rigid_matrix,
)
from .warp import warp_chain
from .warp._reference import sample_points

__all__ = [
    "LevelRun",
    "StageRun",
    "RegistrationLoop",
    "downsample",
    "halves",
    "INIT_MODES",
    "Warp",
    "SCALE_SEARCH_STRIDE",
    "scale_search",
    "similarity",
]

#: a field of view's edge "cuts content" where the normalised image exceeds this within the margin of it
#: (normalised background is ~0; a cut through scalp or brain is > 0.3)
FOV_CONTENT = 0.1
#: mm by which the joint field of view shrinks on a level before features count, at least one voxel: a
#: feature that close to the edge already sees the padding (MIND's patch and neighbour offsets). Chosen on
#: cropped held-out pairs: 6 mm (1/2/3 voxels at 8/4/2 mm) beat 24 mm (0.22-0.27 vs 0.25-0.32 mm median)
FOV_MARGIN_MM = 6.0


def fov_margin(grid: Grid) -> int:
    """Voxels of ``grid`` by which the joint field of view shrinks (:data:`FOV_MARGIN_MM`, at least 1)."""
    return max(1, int(math.ceil(FOV_MARGIN_MM / min(grid.spacing_xyz) - 1e-6)))


#: the stage kinds whose feature levels mask by the fields of view
FOV_MASKED = ("bspline", "dense")

# the scale search scores every 3rd model-grid voxel of each axis (1/27 of them; measured on validation pairs:
# the same choices as every 2nd, at a third of the sampling cost)
SCALE_SEARCH_STRIDE = 3

_log = logging.getLogger("msode_sdk")

INIT_MODES = ("none", "moments", "multistart")

#: ``warp(volume, src_grid, chain, out_grid)``: :func:`msode_sdk.warp.warp_chain` or a capture-safe variant
Warp = Callable[[torch.Tensor, Grid, TransformChain, Grid], torch.Tensor]


def _dispatching_warp(volume, src_grid, chain, out_grid):
    return warp_chain(volume, src_grid, chain, out_grid)  # looked up per call (tests may replace it)


def halves(src: Grid, dst: Grid) -> bool:
    """Whether ``dst`` is ``src`` at half the resolution with every size of ``src`` even: its voxel
    centres are then the centres of ``src``'s 2x2x2 blocks, where trilinear sampling is the blocks'
    average (``avg_pool3d``, a tenth of a warp's cost on CPU)."""
    return dst == src.downsampled(2) and all(n % 2 == 0 for n in src.shape_xyz)


def downsample(vol: torch.Tensor, grid: Grid, level_grid: Grid, warp: Warp = _dispatching_warp) -> torch.Tensor:
    """Pyramid level by repeated factor-2 steps; each step samples the finer level at the coarser voxel
    centres (mm-exact; 2x2x2 averages where :func:`halves`)."""
    cur_grid, cur = grid, vol
    while cur_grid.spacing_xyz[0] * 1.5 < level_grid.spacing_xyz[0]:
        nxt = cur_grid.downsampled(2)
        if halves(cur_grid, nxt):
            cur = torch.nn.functional.avg_pool3d(cur, 2)
        else:
            cur = warp(cur, cur_grid, TransformChain(), nxt)
        cur_grid = nxt
    if cur_grid != level_grid:
        cur = warp(cur, cur_grid, TransformChain(), level_grid)
    return cur


def erode(mask: torch.Tensor, radius: int, outside: float = 0.0) -> torch.Tensor:
    """Binary erosion of ``(N, 1, D, H, W)`` {0, 1} ``mask`` by a cube of ``2 radius + 1`` voxels; beyond the
    grid the mask is ``outside`` (0: the grid's own border erodes too). Per axis, a voxel stays where the
    window's count (a difference of prefix sums: 40x faster than ``max_pool3d`` on CPU) is full."""
    if radius <= 0:
        return mask
    out = mask
    width = 2 * radius + 1
    for dim in (2, 3, 4):
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)] = radius + 1  # one more in front: the prefix sum's zero
        pad[2 * (4 - dim) + 1] = radius
        padded = torch.nn.functional.pad(out, pad, value=outside)
        start = [0, 0, 0, 0, 0, 0]
        start[2 * (4 - dim)] = 1
        ones_front = torch.nn.functional.pad(padded.narrow(dim, 1, padded.shape[dim] - 1), start, value=0.0)
        csum = ones_front.cumsum(dim)
        n = out.shape[dim]
        count = csum.narrow(dim, width, n) - csum.narrow(dim, 0, n)
        out = (count > width - 0.5).to(mask.dtype)
    return out


def fov_cuts_content(vol: torch.Tensor, fov: torch.Tensor, margin: int, content: float = FOV_CONTENT) -> bool:
    """Whether a model-grid image ``vol`` (normalised) has content (> ``content``) within ``margin``
    voxels (:func:`fov_margin` of the model grid) of the edge of its own field of view ``fov``. The model
    grid's border does not count: a head that merely extends beyond the grid (the phantoms' necks) ran as
    well or better unmasked (6 held-out pairs per set: hybrid T2 -> T1 0.50 / 0.55 mm unmasked vs 0.52 /
    0.63 masked, other contrasts 0.55 / 0.74 vs 0.57 / 0.86). Host sync. TorchScript-compatible
    (``registrar.ts`` runs it)."""
    if bool((fov > 0.5).all().item()):  # the image covers the grid (the common case): no edge inside it
        return False
    band = fov - erode(fov, margin, 1.0)
    return bool(((vol * band).amax() > content).item())


#: a pair whose smaller image holds less than this fraction of the larger one's content (:func:`content_ratio`)
#: gets a warning: on a held-out T2 -> T1 pair at a paper-range rotation, central crops of 64 and 96 mm (ratio
#: 0.07-0.31) failed by 41-63 mm, 128 mm (0.57-0.66) by 4-23 mm, 160 mm (0.79-0.90) registered (0.3-0.5 mm);
#: a skull-stripped brain against a whole head is ~0.4
CONTENT_RATIO_WARNING = 0.35


def content_ratio(
    moving: torch.Tensor, fixed: torch.Tensor, content: float = FOV_CONTENT
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ratio (N,) float64, moving_smaller (N,) bool)``: the smaller over the larger of the two model-grid
    images' content (voxels whose normalised intensity is above ``content``), ``(N, 1, D, H, W)`` each, 0 when
    one has none, and whether the moving image is the smaller. How much of the anatomy a small field of view
    leaves to register. TorchScript-compatible (``registrar.ts``)."""
    cm = (moving > content).flatten(1).sum(1).to(torch.float64)
    cf = (fixed > content).flatten(1).sum(1).to(torch.float64)
    return torch.minimum(cm, cf) / torch.maximum(cm, cf).clamp(min=1.0), cm < cf


def checked_velocity(net, v: torch.Tensor, state: torch.Tensor, transform: str) -> torch.Tensor:
    """A network's output as the state's velocity: same shape as the state (else ``PlanError``)."""
    if v.shape != state.shape:
        from .errors import PlanError

        raise PlanError(
            f"network {net.member} returned shape {tuple(v.shape)}, "
            f"expected {tuple(state.shape)} for a {transform} state"
        )
    return v.to(state.dtype)


@dataclass(frozen=True)
class LevelRun:
    """One level of one stage, ready to run: schedule, network, optional feature network and its grid."""

    schedule: LevelSchedule
    level: int
    network: Callable
    features: Callable | None = None
    feature_grid: Grid | None = None
    feature_warp: bool = False

    @property
    def grid(self) -> Grid:
        return self.schedule.grid

    @property
    def solver(self) -> Solver:
        return self.schedule.solver


@dataclass(frozen=True)
class StageRun:
    """A stage of the plan with its levels and the initialiser it starts from (rigid stages)."""

    name: str
    transform: str
    params: dict
    levels: tuple[LevelRun, ...]
    init: str = "none"


def _resolve_init(st, index: int, init: str | None) -> str:
    mode = init or st.params.get("init", "none")
    if st.transform != "rigid":
        return "none"
    if mode == "multistart" and index > 0:
        _log.warning(
            "init='multistart' needs the rigid stage first; stage %r follows %d transform(s): using init='moments'",
            st.name,
            index,
        )
        return "moments"
    return mode


def stage_runs(reg, stage_defs: Sequence, init: str | None = None) -> list[StageRun]:
    """The :class:`StageRun` s of ``stage_defs`` (plan stages) with ``reg``'s loaded networks."""
    out = []
    for k, st in enumerate(stage_defs):
        levels = []
        for sc in st.scales:
            sched = LevelSchedule(
                Grid(sc.shape_xyz, sc.spacing_xyz_mm),
                get_solver(sc.solver, step_size=sc.step_size, tol=sc.tol, max_steps=sc.max_steps),
                sc.t0,
                sc.t1,
            )
            feats = reg._features.get((st.name, sc.level))
            fgrid = Grid(*sc.feature_grid) if sc.feature_grid is not None else None
            levels.append(LevelRun(sched, sc.level, reg._networks[(st.name, sc.level)], feats, fgrid, sc.feature_warp))
        out.append(StageRun(st.name, st.transform, dict(st.params), tuple(levels), _resolve_init(st, k, init)))
    return out


def scale_search(
    kind: str,
    params: dict,
    model_grid: Grid,
    y: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    prior: TransformChain,
    scales: Sequence[float],
    fov: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A deformable stage's scale search (module docstring, point 4): its final state ``y`` (on the model
    grid, the stage's finest level) times the factor of ``scales`` whose chain ``prior o own(factor y)``
    gives the highest MI between ``fixed`` and the warped ``moving`` (``(N, 1, D, H, W)`` model-grid images),
    both at every ``SCALE_SEARCH_STRIDE``-th voxel of each axis. Returns ``(chosen state, index (N,),
    scores (N, K))``; device-side, no host sync (python scalars only: no host-to-device copy inside a CUDA
    graph capture). ``fov``: the (moving, fixed) fields of view on the model grid where they cut content:
    MI counts only voxels inside both (a slab's zeros outside its view are not data: unrestricted, a slab
    pair's search chose 1.0 over 0.5, 0.22 -> 0.37 mm median). The SDK loop and training
    (:mod:`msode_train.odenet`) both call it."""
    n = y.shape[0]
    candidates, scores = [], []
    for a in scales:
        ya = y * float(a)
        own = make_transform(kind, ya, params, model_grid, model_grid)
        candidates.append(ya.reshape(n, -1))
        scores.append(similarity(model_grid, prior.then(own), moving, fixed, fov))
    stacked = torch.stack(scores, 1)
    best, index = choose_start(torch.stack(candidates, 1), stacked)
    return best.reshape(y.shape), index, stacked


def similarity(
    model_grid: Grid,
    chain: TransformChain,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    fov: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mutual information ``(N,)`` float64 (nats; :func:`msode_sdk.initialize.mutual_information`, 32 bins)
    between ``fixed`` and ``moving`` warped by ``chain`` (fixed model frame -> moving model frame, mm), both
    ``(N, 1, D, H, W)`` model-grid images in [0, 1], at every ``SCALE_SEARCH_STRIDE``-th voxel of each axis:
    the scale search's score and the registration report's similarity. Device-side, no host sync."""
    k = SCALE_SEARCH_STRIDE
    xs, ys, zs = (model_grid.axis_coords(a, torch.float32, fixed.device)[k // 2 :: k] for a in range(3))
    pts = chain.map_axes(xs, ys, zs, batch=fixed.shape[0])
    mask = None
    if fov is not None:  # inside both fields of view (``fov``: moving, fixed on the model grid)
        inside_m = sample_points(fov[0], model_grid, pts) >= 0.999
        mask = inside_m & (fov[1][:, :, k // 2 :: k, k // 2 :: k, k // 2 :: k] > 0.5)
    return mutual_information(
        sample_points(moving, model_grid, pts), fixed[:, :, k // 2 :: k, k // 2 :: k, k // 2 :: k], mask=mask
    )


class RegistrationLoop:
    """The loop of one registration (module docstring). ``warp`` resamples volumes (default: the
    dispatching :func:`~msode_sdk.warp.warp_chain`); ``model_grid`` is the plan's."""

    def __init__(self, stages: Sequence[StageRun], model_grid: Grid, warp: Warp | None = None):
        self.stages = list(stages)
        self.grid = model_grid
        self.warp = warp if warp is not None else _dispatching_warp
        # the last run_stage's scale search (index (N,), scores (N, K)), None if it had none: the eager log line
        self.last_scale_search: tuple[torch.Tensor, torch.Tensor] | None = None
        # {deformable level grid: (moving fov, fixed fov)} while the pair's fields of view cut content, else None
        self.fov_levels: dict | None = None

    # ------------------------------------------------------------------------------- pieces

    def pyramid(
        self, moving: torch.Tensor, fixed: torch.Tensor, fov: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict:
        """``{level grid: (moving_l, fixed_l)}`` for every level of every stage. ``fov``: the images' fields
        of view on the model grid ``(N, 1, D, H, W)`` {0, 1}, given where they matter (:func:`fov_cuts_content`
        of either image): their levels are kept for the deformable stages (module docstring, "Fields of view")."""
        pyr = {self.grid: (moving, fixed)}
        for st in self.stages:
            for lv in st.levels:
                if lv.grid not in pyr:
                    pyr[lv.grid] = (
                        downsample(moving, self.grid, lv.grid, self.warp),
                        downsample(fixed, self.grid, lv.grid, self.warp),
                    )
        self.fov_levels = None
        if fov is not None:
            self.fov_levels = {}
            for st in self.stages:
                for lv in st.levels:
                    masked = st.transform in FOV_MASKED and lv.features is not None and not lv.feature_warp
                    if masked and lv.grid not in self.fov_levels:
                        # a level voxel is inside where all the model-grid voxels it averages are
                        self.fov_levels[lv.grid] = tuple(
                            (downsample(m, self.grid, lv.grid, self.warp) >= 0.999).to(m.dtype) for m in fov
                        )
        return pyr

    def fov_masks(self, st: StageRun) -> bool:
        """Whether stage ``st`` masks by the fields of view in this registration (after :meth:`pyramid`)."""
        return (
            self.fov_levels is not None
            and any(lv.grid in self.fov_levels for lv in st.levels)
            and (st.transform in FOV_MASKED)
        )

    def final_warp(self, moving: torch.Tensor, chain: TransformChain) -> torch.Tensor:
        return self.warp(moving, self.grid, chain, self.grid)

    def _transform(self, st: StageRun, state: torch.Tensor, level_grid: Grid):
        return make_transform(st.transform, state, st.params, self.grid, level_grid)

    def _field(
        self,
        st: StageRun,
        lv: LevelRun,
        y0: torch.Tensor,
        mov: torch.Tensor,
        fix: torch.Tensor,
        prior: TransformChain,
        repeat: int = 1,
    ):
        """The vector field ``f(t, state)`` of one level for states starting at ``y0``; ``mov``/``fix`` are
        the level images of the ``N`` pairs, each pair's state repeated ``repeat`` times in ``y0``."""
        warp, lg, net, kind = self.warp, lv.grid, lv.network, st.transform

        def rep(v):
            return v.repeat_interleave(repeat, 0) if repeat > 1 else v

        if lv.features is None:
            mov, fix = rep(mov), rep(fix)

            def f(t, state):
                warped = warp(mov, lg, prior.then(self._transform(st, state, lg)), lg)
                return checked_velocity(net, net(warped, fix, t), state, kind)

            return f
        fg = lv.feature_grid
        fix_feat = lv.features(rep(fix))  # on the repeated batch, as registrar.ts computes it (same bits)
        self._check_features(lv, fix_feat)
        if not lv.feature_warp:  # exact: features of the warped moving image at every evaluation
            features = lv.features
            fov = None if self.fov_levels is None or kind not in FOV_MASKED else self.fov_levels.get(lg)
            fov_fix = None
            if fov is None:
                src = rep(mov)
            else:  # outside the joint field of view, the fixed features (module docstring, "Fields of view")
                margin = fov_margin(lg)  # each mask shrinks once per level, the moving one then warped eroded
                src = rep(torch.cat((mov, erode(fov[0], margin)), 1))  # image and field of view: one warp
                fov_fix = rep(erode(fov[1], margin)) > 0.5
            pool = [a // b for a, b in zip(lg.shape_dhw, (fg or lg).shape_dhw)]

            def f_exact(t, state):
                warped = warp(src, lg, prior.then(self._transform(st, state, lg)), lg)
                mov_feat = features(warped if fov_fix is None else warped[:, :1].contiguous())
                if mov_feat.shape != fix_feat.shape:
                    self._check_features(lv, mov_feat)
                if fov_fix is not None:
                    inside = (warped[:, 1:] >= 0.999) & fov_fix
                    if pool != [1, 1, 1]:  # features on a pooled grid: inside where the whole pooled block is
                        inside = -torch.nn.functional.max_pool3d(-inside.to(mov_feat.dtype), pool) > 0.5
                    mov_feat = torch.where(inside, mov_feat, fix_feat)
                return checked_velocity(net, net(mov_feat, fix_feat, t), state, kind)

            return f_exact
        if kind == "rigid":  # level-start frame: prior o M0 (see the module docstring)
            m0_inv = rigid_inverse(rigid_matrix(y0))
            start = warp(rep(mov), lg, prior.then(self._transform(st, y0, lg)), lg)
        else:  # frame: the prior stages
            m0_inv = None
            start = rep(warp(mov, lg, prior, lg) if len(prior) else mov)
        mov_feat = lv.features(start)
        self._check_features(lv, mov_feat)

        def f_warped(t, state):
            if m0_inv is not None:
                rel = TransformChain([MatrixTransform(m0_inv @ rigid_matrix(state))])
            else:
                rel = TransformChain([self._transform(st, state, lg)])
            warped = warp(mov_feat, fg, rel, fg)
            return checked_velocity(net, net(warped, fix_feat, t), state, kind)

        return f_warped

    @staticmethod
    def _check_features(lv: LevelRun, feat: torch.Tensor) -> None:
        """Static shape check (no host sync): features live on the level's feature grid."""
        assert lv.feature_grid is not None
        want = lv.feature_grid.shape_dhw
        if tuple(feat.shape[2:]) != want:
            from .errors import PlanError

            raise PlanError(
                f"feature network {getattr(lv.features, 'member', '?')} returned {tuple(feat.shape)}, expected "
                f"(N, C, {', '.join(map(str, want))}) on the level's feature grid"
            )

    def _candidates(self, st: StageRun, pyr: dict, prior: TransformChain) -> torch.Tensor:
        """``(N, K, 6)`` rigid starts: the identity and the principal-axes candidates, from the images of the
        stage's *finest* level (after ``prior``): the foreground moments of 16 mm averages lose the head's shape
        (measured on 100 random-contrast pairs of U(+-75 deg) motions: best candidate's RMSE(phi) median 14 mm
        and > 20 mm on 29 from the 16 mm level, 6.5 mm and 10 from the 2 mm model grid)."""
        lv = st.levels[-1]
        mov, fix = pyr[lv.grid]
        mov_p = self.warp(mov, lv.grid, prior, lv.grid) if len(prior) else mov
        return candidate_thetas(mov_p, fix, lv.grid)

    def _start(self, st: StageRun, lv: LevelRun, pyr: dict, prior: TransformChain, n: int):
        """``moments`` start ``(N, 6)``: candidates scored by MI on the first level (device-side)."""
        mov, fix = pyr[lv.grid]
        thetas = self._candidates(st, pyr, prior)
        scores = torch.stack(
            [
                mutual_information(
                    self.warp(
                        mov, lv.grid, prior.then(self._transform(st, thetas[:, j].contiguous(), lv.grid)), lv.grid
                    ),
                    fix,
                )
                for j in range(thetas.shape[1])
            ],
            1,
        )  # (N, K)
        return choose_start(thetas, scores)[0]

    def _integrate(
        self, st: StageRun, i: int, y: torch.Tensor, pyr: dict, prior: TransformChain, repeat: int = 1
    ) -> tuple[torch.Tensor, SegmentStats]:
        lv = st.levels[i]
        mov, fix = pyr[lv.grid]
        f = self._field(st, lv, y, mov, fix, prior, repeat)
        return lv.solver.integrate(f, y, lv.schedule.t0, lv.schedule.t1)

    def run_stage(self, k: int, pyr: dict, prior: TransformChain, n: int) -> tuple[torch.Tensor, list[SegmentStats]]:
        """Integrate stage ``k`` after the chain ``prior``; returns its final state (on its finest level's
        grid) and per-level statistics."""
        st = self.stages[k]
        levels = st.levels
        stats: list[SegmentStats] = []
        y = initial_state(
            st.transform, st.params, self.grid, levels[0].grid, n, torch.float32, pyr[self.grid][0].device
        )
        first = 0
        if st.init == "moments":
            y = self._start(st, levels[0], pyr, prior, n)
        elif st.init == "multistart":
            y, stats0 = self._multistart(st, pyr, prior, n)
            stats.append(stats0)
            first = 1
        for i in range(first, len(levels)):
            if i > 0:
                y = carry_state(st.transform, y, levels[i - 1].grid, levels[i].grid)
            y, s = self._integrate(st, i, y, pyr, prior)
            stats.append(s)
        self.last_scale_search = None
        scales = st.params.get("scale_search")
        if scales and st.transform != "rigid":
            y = self._scale_search(st, y, pyr, prior, scales)
        return y, stats

    def _scale_search(self, st: StageRun, y: torch.Tensor, pyr: dict, prior: TransformChain, scales) -> torch.Tensor:
        mov, fix = pyr[self.grid]
        fov = None if self.fov_levels is None or st.transform not in FOV_MASKED else self.fov_levels.get(self.grid)
        best, index, scores = scale_search(st.transform, st.params, self.grid, y, mov, fix, prior, scales, fov)
        self.last_scale_search = (index, scores)  # for the eager path's log line (read after the run)
        return best

    def _multistart(self, st: StageRun, pyr: dict, prior: TransformChain, n: int):
        """The first level from the identity and the 4 principal-axes candidates as one batch; MI on the
        next level picks each pair's best end point (first level's NFE counts batched calls)."""
        lv0 = st.levels[0]
        thetas = self._candidates(st, pyr, prior)
        k = thetas.shape[1]
        y1, stats0 = self._integrate(st, 0, thetas.reshape(n * k, 6), pyr, prior, repeat=k)
        lv_s = st.levels[1] if len(st.levels) > 1 else lv0
        mov_s, fix_s = pyr[lv_s.grid]
        ys = carry_state(st.transform, y1, lv0.grid, lv_s.grid)
        warped = self.warp(
            mov_s.repeat_interleave(k, 0), lv_s.grid, prior.then(self._transform(st, ys, lv_s.grid)), lv_s.grid
        )
        scores = mutual_information(warped, fix_s.repeat_interleave(k, 0)).reshape(n, k)
        y, best = choose_start(y1.reshape(n, k, -1), scores)
        self.last_multistart = (best, scores)  # for the eager path's log line (read after the run)
        return y, stats0

    def chain_after(self, chain: TransformChain, k: int, y: torch.Tensor) -> TransformChain:
        st = self.stages[k]
        return chain.then(self._transform(st, y, st.levels[-1].grid))
