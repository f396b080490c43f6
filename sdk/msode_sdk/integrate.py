"""ODE solvers and the multi-scale integrator of MS-ODENet.

A registration stage integrates ``d(theta)/dt = f_l(moving_l o phi_theta, fixed_l, t)`` over the
pyramid, coarse to fine: level ``l`` owns the time segment ``[t0_l, t1_l]`` (``[l-1, l]`` for the
paper's L = T = 3) and its own solver. The state ``theta`` carries from one level to the next
(:func:`msode_sdk.transforms.carry_state`).

Solvers are a registry (:data:`SOLVERS`); :class:`Solver` owns nothing but the interface,
:class:`FixedGridSolver` owns the fixed-step loop and its subclasses implement one step, the adaptive
solver owns its error-controlled loop. NFE (network evaluations) are counted exactly.

The fixed-step grid on ``[t0, t1]`` with requested step ``dt`` has ``n = ceil((t1 - t0) / dt)`` equal
steps of ``(t1 - t0) / n`` (``1e-6`` of slack absorbs decimal round-off, so ``dt = 0.1`` on ``[0, 1]``
gives exactly 10 steps). Training code must use :func:`fixed_step_grid` so that trained networks see
the same schedule at inference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Tuple

import torch

from .transforms import Grid, carry_state

from .errors import InputError

__all__ = [
    "Solver",
    "FixedGridSolver",
    "EulerSolver",
    "HeunSolver",
    "AdaptiveHeunSolver",
    "SOLVERS",
    "get_solver",
    "fixed_step_grid",
    "SegmentStats",
    "heun_step_control",
]

_log = logging.getLogger(__name__)

VectorField = Callable[[float, torch.Tensor], torch.Tensor]


@dataclass
class SegmentStats:
    """What one solver run over one time segment did."""

    solver: str
    t0: float
    t1: float
    nfe: int = 0
    steps: int = 0
    rejected: int = 0
    truncated: bool = False  # adaptive solver hit max_steps before t1
    step_sizes: list[float] = field(default_factory=list)


def fixed_step_grid(t0: float, t1: float, dt: float) -> list[float]:
    """Time points ``[t0, ..., t1]`` of the fixed-step schedule (see module docstring)."""
    if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
        raise InputError(f"time segment must satisfy t0 < t1, got [{t0}, {t1}]")
    if not (math.isfinite(dt) and dt > 0):
        raise InputError(f"step size must be positive, got {dt}")
    n = max(1, math.ceil((t1 - t0) / dt - 1e-6))
    h = (t1 - t0) / n
    return [t0 + i * h for i in range(n)] + [t1]


class Solver:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1``; returns ``(y1, stats)``."""

    name = ""

    def __init__(self, step_size: float | None = None, tol: float | None = None, max_steps: int = 1000):
        self.step_size = step_size
        self.tol = tol
        self.max_steps = max_steps

    def integrate(self, f: VectorField, y0: torch.Tensor, t0: float, t1: float) -> tuple[torch.Tensor, SegmentStats]:
        raise NotImplementedError


class FixedGridSolver(Solver):
    """Template: the base owns the loop over :func:`fixed_step_grid`; subclasses implement ``step``."""

    nfe_per_step = 1

    def __init__(self, step_size: float | None = None, tol: float | None = None, max_steps: int = 1000):
        if step_size is None:
            raise InputError(f"solver {self.name!r} needs a step_size")
        super().__init__(step_size, tol, max_steps)

    def step(self, f: VectorField, t: float, dt: float, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def integrate(self, f, y0, t0, t1):
        stats = SegmentStats(self.name, t0, t1)
        grid = fixed_step_grid(t0, t1, self.step_size)
        y = y0
        for ta, tb in zip(grid[:-1], grid[1:]):
            y = self.step(f, ta, tb - ta, y)
            stats.steps += 1
            stats.nfe += self.nfe_per_step
            stats.step_sizes.append(tb - ta)
        return y, stats


class EulerSolver(FixedGridSolver):
    """Forward Euler, order 1: ``y + dt f(t, y)``."""

    name = "euler"
    nfe_per_step = 1

    def step(self, f, t, dt, y):
        return y + dt * f(t, y)


class HeunSolver(FixedGridSolver):
    """Heun's method (explicit trapezoid), order 2."""

    name = "heun"
    nfe_per_step = 2

    def step(self, f, t, dt, y):
        k1 = f(t, y)
        k2 = f(t + dt, y + dt * k1)
        return y + 0.5 * dt * (k1 + k2)


def heun_step_control(err: torch.Tensor, y: torch.Tensor, y_new: torch.Tensor, tol: float) -> Tuple[float, float]:
    """The adaptive Heun-Euler controller, one step: ``(ratio, factor)``. ``ratio`` is the RMS of
    ``err / (tol + tol * max(|y|, |y_new|))`` (the step is accepted when it is <= 1; ``nan``/``inf`` when
    the estimate is not finite), ``factor`` the next step's multiplier ``clip(0.9 ratio^-1/2, 0.2, 5)``.
    TorchScript-compatible: ``registrar.ts`` runs this very function (one controller, not two copies)."""
    safety, fac_min, fac_max = 0.9, 0.2, 5.0  # locals: TorchScript takes no float globals
    scale = tol + tol * torch.maximum(y.abs(), y_new.abs())
    ratio = float(torch.sqrt(torch.mean((err / scale) ** 2)))
    if ratio == 0.0:
        return ratio, fac_max
    if not math.isfinite(ratio):
        return ratio, fac_min
    return ratio, min(fac_max, max(fac_min, safety * ratio**-0.5))


class AdaptiveHeunSolver(Solver):
    """Heun-Euler embedded pair with error control (the paper's A(tol)).

    Local error estimate ``0.5 * dt * (k2 - k1)``; a step is accepted when the RMS of
    ``err / (tol + tol * max(|y|, |y_new|))`` is <= 1 (``rtol = atol = tol``, as torchdiffeq's
    ``adaptive_heun`` with both tolerances set to ``tol``). The next step is
    ``dt * clip(0.9 * ratio^(-1/2), 0.2, 5)``. The first step is ``step_size`` or a tenth of the
    segment. Each attempted step costs 2 NFE. After ``max_steps`` attempts the segment stops early,
    a warning is logged and ``stats.truncated`` is set.
    """

    name = "adaptive_heun"

    def __init__(self, step_size: float | None = None, tol: float | None = None, max_steps: int = 1000):
        if tol is None or not (0 < tol < 1):
            raise InputError(f"adaptive_heun needs a tolerance in (0, 1), got {tol}")
        super().__init__(step_size, tol, max_steps)

    def integrate(self, f, y0, t0, t1):
        stats = SegmentStats(self.name, t0, t1)
        span = t1 - t0
        dt = min(self.step_size or span / 10.0, span)
        t, y = t0, y0
        k1 = None
        eps = span * 1e-9
        while t1 - t > eps:
            if stats.steps + stats.rejected >= self.max_steps:
                stats.truncated = True
                _log.warning(
                    "adaptive_heun stopped at t=%.4g of [%.4g, %.4g] after %d attempts (max_steps)",
                    t,
                    t0,
                    t1,
                    self.max_steps,
                )
                break
            dt = min(dt, t1 - t)
            if k1 is None:
                k1 = f(t, y)
                stats.nfe += 1
            y_new_euler = y + dt * k1
            k2 = f(t + dt, y_new_euler)
            stats.nfe += 1
            y_new = y + 0.5 * dt * (k1 + k2)
            ratio, factor = heun_step_control(0.5 * dt * (k2 - k1), y, y_new, self.tol)
            if not math.isfinite(ratio):
                raise FloatingPointError(f"adaptive_heun: non-finite error estimate at t={t:.4g}")
            if ratio <= 1.0:
                t = t + dt if t1 - (t + dt) > eps else t1
                y = y_new
                k1 = None  # Heun-Euler is not FSAL: the next step evaluates f at (t, y) afresh
                stats.steps += 1
                stats.step_sizes.append(dt)
            else:
                stats.rejected += 1
            dt = dt * factor
        return y, stats


SOLVERS: dict[str, type[Solver]] = {
    EulerSolver.name: EulerSolver,
    HeunSolver.name: HeunSolver,
    AdaptiveHeunSolver.name: AdaptiveHeunSolver,
}


def get_solver(name: str, step_size: float | None = None, tol: float | None = None, max_steps: int = 1000) -> Solver:
    """Instantiate a solver by name; unknown names raise :class:`InputError` listing the valid ones."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise InputError(f"unknown solver {name!r}; valid: {sorted(SOLVERS)}") from None
    return cls(step_size=step_size, tol=tol, max_steps=max_steps)


# --------------------------------------------------------------------------------------- multi-scale

LevelField = Callable[[int], VectorField]


@dataclass(frozen=True)
class LevelSchedule:
    """One pyramid level of a stage: its grid and its solver over ``[t0, t1]``."""

    grid: Grid
    solver: Solver
    t0: float
    t1: float


def integrate_multiscale(
    kind: str, levels: list[LevelSchedule], make_field: LevelField, y0: torch.Tensor
) -> tuple[torch.Tensor, list[SegmentStats]]:
    """Integrate a stage over its levels, coarse to fine.

    ``make_field(i)`` returns the vector field ``f(t, state)`` of level ``i`` (it closes over that
    level's images and network); ``y0`` is the state on ``levels[0].grid``. The state is carried
    to each next level with :func:`msode_sdk.transforms.carry_state`. Returns the final state (on the
    finest level's grid) and per-level statistics.
    """
    y = y0
    stats: list[SegmentStats] = []
    for i, lv in enumerate(levels):
        if i > 0:
            y = carry_state(kind, y, levels[i - 1].grid, lv.grid)
        y, st = lv.solver.integrate(make_field(i), y, lv.t0, lv.t1)
        stats.append(st)
    return y, stats
