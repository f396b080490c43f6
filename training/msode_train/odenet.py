"""MS-ODENet forward pass for training, with exactly the SDK's inference semantics.

A stage (rigid, B-spline or dense) integrates ``d(theta)/dt = f_l(moving_l o phi_theta, fixed_l, t)``
over the pyramid, coarse to fine, level ``l`` over ``[l - 1, l]``; stages cascade (the B-spline stage
warps through ``[rigid_final, bspline_state]``). Everything that defines the result is the SDK's own
code, so a network trained here computes at inference what it computed in training:

* pyramid: ``msode_sdk.Registrar._downsample`` (repeated mm-exact factor-2 sampling);
* state: ``msode_sdk.transforms.initial_state`` / ``make_transform`` / ``carry_state``;
* warps: ``msode_sdk.warp.warp_chain`` (trilinear, zeros outside; differentiable in the image and
  in the sampling points);
* network input: ``(warped, fixed_l, t)`` with ``t`` a float32 ``(N,)`` tensor, as ``NetworkRunner``
  passes it;
* fixed-step levels: the time grid ``msode_sdk.integrate.fixed_step_grid(t0, t1, dt)``.

Two integrators (``integrator=``):

``"torchdiffeq"`` (default)
    ``torchdiffeq.odeint`` per level. Fixed-step levels pass the SDK's time grid as ``t`` with method
    ``euler`` (SDK ``euler``) or ``heun2`` (SDK ``heun``, the explicit trapezoid: same tableau), so
    the schedule and the arithmetic are identical to inference (measured difference ~1e-6).
    Adaptive levels use torchdiffeq's ``adaptive_heun`` with ``rtol = atol = tol`` and
    ``first_step`` = the plan's initial step: the same Heun-Euler pair, but torchdiffeq's step-size
    controller differs in detail from the SDK's (norm, growth factors), so adaptive levels are close
    to, not bit-equal with, inference. ``adjoint=True`` uses ``torchdiffeq.odeint_adjoint`` (memory
    O(1) in the number of steps; gradients reach the current stage's network parameters only: the
    images and the previous stages are treated as constants).

``"sdk"``
    The SDK's own solvers (``msode_sdk.integrate.get_solver(...).integrate``) run with autograd on:
    bit-for-bit the inference schedule at every level, adaptive ones included (the step-size
    decisions are not differentiated, as in any adaptive solver without the adjoint).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from msode_export.pack import LevelSolver, StageDef, level_grids
from msode_sdk.integrate import fixed_step_grid, get_solver
from msode_sdk.loop import scale_search
from msode_sdk.registrar import Registrar
from msode_sdk.transforms import (
    BSplineTransform,
    DenseTransform,
    Grid,
    RigidTransform,
    TransformChain,
    carry_state,
    initial_state,
    make_transform,
)
from msode_sdk.warp import warp_chain

from .models import DEFAULT_ARCH, build_network

__all__ = ["TrainStage", "MSODENet", "ODEOutput", "TORCHDIFFEQ_METHODS", "INTEGRATORS", "downsample", "detach_chain"]

# The SDK's adaptive solver reads its error ratio with float(): harmless under autograd (step-size
# decisions are not differentiated), but torch warns once per call.
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")

#: SDK solver name -> torchdiffeq method
TORCHDIFFEQ_METHODS = {"euler": "euler", "heun": "heun2", "adaptive_heun": "adaptive_heun"}
INTEGRATORS = ("torchdiffeq", "sdk")


def downsample(vol: torch.Tensor, grid: Grid, level_grid: Grid) -> torch.Tensor:
    """One pyramid level of ``vol``, exactly as the SDK builds it (``Registrar._downsample``)."""
    if level_grid == grid:
        return vol
    return Registrar._downsample(vol, grid, level_grid)


@dataclass
class TrainStage:
    """One stage of a model being trained: transform kind, parameters, per-level solvers (coarse first),
    and the network architecture (a name registered in :data:`msode_train.models.ARCHITECTURES`).
    Training-side only: :meth:`stage_def` gives what a plan is built from (``msode_export.pack.StageDef``),
    and a plan's manifest describes its stages with ``msode_sdk.plan.StageSpec``."""

    name: str
    transform: str
    schedule: Sequence[LevelSolver]
    params: dict = field(default_factory=dict)
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.schedule = tuple(s if isinstance(s, LevelSolver) else LevelSolver(**s) for s in self.schedule)
        if self.arch is None:
            self.arch = DEFAULT_ARCH[self.transform]

    @property
    def levels(self) -> int:
        return len(self.schedule)

    def stage_def(self) -> StageDef:
        return StageDef(self.name, self.transform, self.schedule, dict(self.params))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "transform": self.transform,
            "params": dict(self.params),
            "schedule": [
                {"solver": s.solver, "step_size": s.step_size, "tol": s.tol, "max_steps": s.max_steps}
                for s in self.schedule
            ],
            "arch": {"name": self.arch, "kwargs": dict(self.arch_kwargs)},
        }


@dataclass
class ODEOutput:
    """``chain``: the cascaded transforms (model frame, fixed -> moving, mm); ``states``: final state per
    stage; ``nfe``: network evaluations per stage and level."""

    chain: TransformChain
    states: dict
    nfe: dict


def detach_chain(chain: TransformChain, copy: bool = False) -> TransformChain:
    """The same chain with every state detached from the autograd graph (``copy``: copied as well, e.g.
    states made under ``torch.inference_mode``, which autograd may not save)."""
    out = []
    for t in chain.transforms:
        state = t.state.detach().clone() if copy else t.state.detach()
        if isinstance(t, RigidTransform):
            out.append(RigidTransform(state))
        elif isinstance(t, BSplineTransform):
            out.append(BSplineTransform(state, t.lattice))
        elif isinstance(t, DenseTransform):
            out.append(DenseTransform(state, t.grid))
        else:  # pragma: no cover - no other kinds exist
            raise TypeError(f"unknown transform {type(t).__name__}")
    return TransformChain(out)


class _LevelField(nn.Module):
    """``f(t, state)`` of one level: warp the moving level image through ``prior + T(state)``, run the
    network on ``(warped, fixed, t)``. An ``nn.Module`` so that ``odeint_adjoint`` finds the network
    parameters."""

    def __init__(
        self,
        net: nn.Module,
        transform: str,
        params: dict,
        model_grid: Grid,
        level_grid: Grid,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        prior: TransformChain,
    ):
        super().__init__()
        self.net = net
        self.transform = transform
        self.params = params
        self.model_grid = model_grid
        self.level_grid = level_grid
        self.moving = moving
        self.fixed = fixed
        self.prior = prior
        self.nfe = 0
        # fields that compare features (msode_export.analytic.DenseGNField and its B-spline fit): the fixed
        # image's features once per level, as a plan's feature members run at inference (same numbers)
        self.fixed_features = net.image_features(fixed) if hasattr(net, "field_on_features") else None

    def forward(self, t, state: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        tr = make_transform(self.transform, state, self.params, self.model_grid, self.level_grid)
        warped = warp_chain(self.moving, self.level_grid, self.prior.then(tr), self.level_grid)
        if self.fixed_features is not None:
            shape = [int(n) for n in warped.shape[2:]]
            return self.net.field_on_features(self.net.image_features(warped), self.fixed_features, shape).to(
                state.dtype
            )
        tf = float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
        tt = torch.full((state.shape[0],), tf, dtype=torch.float32, device=state.device)
        v = self.net(warped, self.fixed, tt)
        return v.to(state.dtype)


class MSODENet(nn.Module):
    """The cascaded multi-scale neural ODE: one network per (stage, level).

    ``networks`` are kept in ``self.nets[f"{stage}_L{level}"]`` (levels 1 = coarse .. L = model grid).
    """

    def __init__(
        self, model_grid: Grid, stages: Sequence[TrainStage], integrator: str = "torchdiffeq", adjoint: bool = False
    ):
        super().__init__()
        if integrator not in INTEGRATORS:
            raise ValueError(f"unknown integrator {integrator!r}; valid: {list(INTEGRATORS)}")
        if adjoint and integrator != "torchdiffeq":
            raise ValueError("the adjoint method needs integrator='torchdiffeq'")
        self.model_grid = model_grid
        self.stages = list(stages)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names {names}")
        self.integrator = integrator
        self.adjoint = bool(adjoint)
        self.nets = nn.ModuleDict()
        for st in self.stages:
            for lv, lg in enumerate(level_grids(model_grid, st.levels), start=1):
                self.nets[f"{st.name}_L{lv}"] = build_network(st.arch, lg, model_grid, st.params, **st.arch_kwargs)

    # ------------------------------------------------------------------------------------ helpers

    def network(self, stage: str, level: int) -> nn.Module:
        return self.nets[f"{stage}_L{level}"]

    def plan_networks(self) -> dict:
        """``{(stage, level): module}`` as :func:`msode_export.pack.build_plan` wants them."""
        return {(st.name, lv): self.network(st.name, lv) for st in self.stages for lv in range(1, st.levels + 1)}

    def stage_defs(self) -> list[StageDef]:
        return [st.stage_def() for st in self.stages]

    def stage(self, name: str) -> TrainStage:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def stage_parameters(self, names: Iterable[str]) -> list[nn.Parameter]:
        names = set(names)
        return [
            p
            for st in self.stages
            if st.name in names
            for lv in range(1, st.levels + 1)
            for p in self.network(st.name, lv).parameters()
        ]

    def pyramid(self, vol: torch.Tensor, grids: Iterable[Grid]) -> dict:
        return {g: downsample(vol, self.model_grid, g) for g in grids}

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        stages: Sequence[str] | None = None,
        prior: TransformChain | None = None,
        grad_stages: Iterable[str] | None = None,
    ) -> ODEOutput:
        """Register ``moving`` to ``fixed`` (``(N, 1, D, H, W)`` on the model grid, intensities as the SDK
        normalises them). ``stages``: subset to run (default all, in order); ``prior``: a chain to
        start from (default identity); ``grad_stages``: stages whose computation is recorded for
        backpropagation (default all); the others run under ``no_grad``."""
        run = self.stages if stages is None else [self.stage(s) for s in stages]
        grad_set = {s.name for s in run} if grad_stages is None else set(grad_stages)
        chain = prior if prior is not None else TransformChain()
        n = moving.shape[0]
        grids = {g for st in run for g in level_grids(self.model_grid, st.levels)}
        pyr_m, pyr_f = self.pyramid(moving, grids), self.pyramid(fixed, grids)
        states, nfe = {}, {}
        for st in run:
            with torch.set_grad_enabled(torch.is_grad_enabled() and st.name in grad_set):
                y, counts = self._integrate_stage(st, pyr_m, pyr_f, chain, n, moving.dtype, moving.device)
            states[st.name] = y
            nfe[st.name] = counts
            chain = chain.then(
                make_transform(st.transform, y, st.params, self.model_grid, level_grids(self.model_grid, st.levels)[-1])
            )
        return ODEOutput(chain, states, nfe)

    def _integrate_stage(self, st: TrainStage, pyr_m, pyr_f, prior: TransformChain, n: int, dtype, device):
        grids = level_grids(self.model_grid, st.levels)
        prior_c = detach_chain(prior) if self.adjoint else prior  # the adjoint differentiates params only
        y = initial_state(st.transform, st.params, self.model_grid, grids[0], n, dtype, device)
        counts = []
        for i, (lg, sched) in enumerate(zip(grids, st.schedule)):
            if i > 0:
                y = carry_state(st.transform, y, grids[i - 1], lg)
            field_fn = _LevelField(
                self.network(st.name, i + 1),
                st.transform,
                st.params,
                self.model_grid,
                lg,
                pyr_m[lg],
                pyr_f[lg],
                prior_c,
            )
            t0, t1 = float(i), float(i + 1)
            if self.integrator == "sdk":
                solver = get_solver(sched.solver, step_size=sched.step_size, tol=sched.tol, max_steps=sched.max_steps)
                y, _ = solver.integrate(field_fn, y, t0, t1)
            else:
                y = self._odeint(field_fn, y, t0, t1, sched)
            counts.append(field_fn.nfe)
        scales = st.params.get("scale_search")
        if scales and st.transform != "rigid":  # as the SDK loop ends such a stage (msode_sdk.loop.scale_search)
            y = scale_search(
                st.transform, st.params, self.model_grid, y, pyr_m[grids[-1]], pyr_f[grids[-1]], prior_c, scales
            )[0]
        return y, counts

    def _odeint(self, field_fn: _LevelField, y: torch.Tensor, t0: float, t1: float, sched: LevelSolver):
        import torchdiffeq

        method = TORCHDIFFEQ_METHODS[sched.solver]
        if sched.solver == "adaptive_heun":
            t = torch.tensor([t0, t1], dtype=torch.float64, device=y.device)
            opts = {"max_num_steps": int(sched.max_steps)}
            if sched.step_size is not None:
                opts["first_step"] = float(sched.step_size)
            kw = dict(method=method, rtol=float(sched.tol), atol=float(sched.tol), options=opts)
        else:
            t = torch.tensor(fixed_step_grid(t0, t1, sched.step_size), dtype=torch.float64, device=y.device)
            kw = dict(method=method)
        try:
            if self.adjoint and torch.is_grad_enabled():
                params = tuple(p for p in field_fn.net.parameters() if p.requires_grad)
                sol = torchdiffeq.odeint_adjoint(field_fn, y, t, adjoint_params=params, **kw)
            else:
                sol = torchdiffeq.odeint(field_fn, y, t, **kw)
        except (AssertionError, RuntimeError) as exc:
            if sched.solver != "adaptive_heun" or "max_num_steps" not in str(exc):
                raise
            # torchdiffeq gives up after max_num_steps; the SDK truncates the segment instead (and so
            # does inference): do what inference does
            field_fn.nfe = 0
            solver = get_solver(sched.solver, step_size=sched.step_size, tol=sched.tol, max_steps=sched.max_steps)
            return solver.integrate(field_fn, y, t0, t1)[0]
        return sol[-1]
