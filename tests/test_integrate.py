"""Solvers on analytic problems: order of convergence, tolerance, exact NFE counts."""

import math

import pytest
import torch

from msode_sdk.errors import InputError
from msode_sdk.integrate import SOLVERS, fixed_step_grid, get_solver, integrate_multiscale, LevelSchedule
from msode_sdk.transforms import Grid


def _decay(k):
    calls = []

    def f(t, y):
        calls.append(t)
        return -k * y

    return f, calls


def _error(solver_name, dt, k=2.0):
    y0 = torch.tensor([1.0], dtype=torch.float64)
    f, _ = _decay(k)
    y1, _ = get_solver(solver_name, step_size=dt).integrate(f, y0, 0.0, 1.0)
    return abs(float(y1) - math.exp(-k))


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2)])
def test_observed_order_of_convergence(name, order):
    errs = [_error(name, dt) for dt in (0.1, 0.05, 0.025, 0.0125)]
    observed = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(o - order) < 0.15 for o in observed), observed


def test_time_dependent_problem_heun_order():
    # dy/dt = cos(t) y  ->  y = exp(sin t)
    def err(dt):
        y1, _ = get_solver("heun", step_size=dt).integrate(
            lambda t, y: math.cos(t) * y, torch.tensor([1.0], dtype=torch.float64), 0.0, 2.0
        )
        return abs(float(y1) - math.exp(math.sin(2.0)))

    e1, e2 = err(0.02), err(0.01)
    assert abs(math.log2(e1 / e2) - 2) < 0.15


@pytest.mark.parametrize("name,per_step", [("euler", 1), ("heun", 2)])
def test_fixed_nfe_exact(name, per_step):
    f, calls = _decay(1.0)
    _, stats = get_solver(name, step_size=0.1).integrate(f, torch.ones(3), 0.0, 1.0)
    assert stats.steps == 10 and stats.nfe == 10 * per_step == len(calls)


def test_fixed_step_grid_schedule():
    assert len(fixed_step_grid(0.0, 1.0, 0.1)) == 11
    assert len(fixed_step_grid(2.0, 3.0, 0.25)) == 5
    g = fixed_step_grid(1.0, 2.0, 0.3)  # 4 equal steps of 0.25
    assert len(g) == 5 and g[-1] == 2.0 and abs(g[1] - g[0] - 0.25) < 1e-12
    with pytest.raises(InputError):
        fixed_step_grid(1.0, 1.0, 0.1)
    with pytest.raises(InputError):
        fixed_step_grid(0.0, 1.0, 0.0)


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-5])
def test_adaptive_heun_meets_tolerance(tol):
    k = 3.0
    f, calls = _decay(k)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    y1, stats = get_solver("adaptive_heun", tol=tol).integrate(f, y0, 0.0, 1.0)
    exact = y0 * math.exp(-k)
    err = float((y1 - exact).abs().max())
    assert err < 10 * tol, (err, tol)
    assert stats.nfe == len(calls)
    assert not stats.truncated
    assert abs(sum(stats.step_sizes) - 1.0) < 1e-9


def test_adaptive_heun_tighter_tolerance_costs_more():
    nfes = []
    for tol in (1e-2, 1e-4, 1e-6):
        f, _ = _decay(2.0)
        _, st = get_solver("adaptive_heun", tol=tol).integrate(f, torch.ones(1, dtype=torch.float64), 0.0, 1.0)
        nfes.append(st.nfe)
    assert nfes[0] < nfes[1] < nfes[2]


def test_adaptive_heun_nfe_counts_every_call():
    f, calls = _decay(5.0)
    _, st = get_solver("adaptive_heun", tol=1e-4, step_size=0.9).integrate(
        f, torch.ones(1, dtype=torch.float64), 0.0, 1.0
    )
    assert st.rejected > 0  # a 0.9 first step is too large at this tolerance
    assert st.nfe == len(calls)


def test_adaptive_heun_max_steps_truncates_and_flags(caplog):
    f, _ = _decay(1.0)
    _, st = get_solver("adaptive_heun", tol=1e-8, max_steps=5).integrate(
        f, torch.ones(1, dtype=torch.float64), 0.0, 1.0
    )
    assert st.truncated
    assert "max_steps" in caplog.text


def test_unknown_solver_lists_valid_names():
    with pytest.raises(InputError) as e:
        get_solver("rk4", step_size=0.1)
    for name in SOLVERS:
        assert name in str(e.value)


def test_fixed_solver_requires_step():
    with pytest.raises(InputError):
        get_solver("euler")
    with pytest.raises(InputError):
        get_solver("adaptive_heun", tol=None)


def test_multiscale_schedule_and_carry():
    # constant velocity 1 over three unit segments -> y(3) = 3 exactly, for any solver
    levels = [
        LevelSchedule(Grid((4, 4, 4), (1, 1, 1)), get_solver("euler", step_size=0.25), 0.0, 1.0),
        LevelSchedule(Grid((4, 4, 4), (1, 1, 1)), get_solver("heun", step_size=0.5), 1.0, 2.0),
        LevelSchedule(Grid((4, 4, 4), (1, 1, 1)), get_solver("adaptive_heun", tol=1e-3), 2.0, 3.0),
    ]
    seen = []

    def make_field(i):
        def f(t, y):
            seen.append((i, t))
            return torch.ones_like(y)

        return f

    y, stats = integrate_multiscale("rigid", levels, make_field, torch.zeros(1, 6))
    assert torch.allclose(y, torch.full((1, 6), 3.0))
    assert [s.nfe for s in stats][:2] == [4, 4]
    assert all(0 <= t <= 1 for i, t in seen if i == 0) and all(2 <= t <= 3 for i, t in seen if i == 2)


def test_dense_state_is_upsampled_across_levels():
    coarse, fine = Grid((4, 4, 4), (2, 2, 2)), Grid((8, 8, 8), (1, 1, 1))
    levels = [
        LevelSchedule(coarse, get_solver("euler", step_size=1.0), 0.0, 1.0),
        LevelSchedule(fine, get_solver("euler", step_size=1.0), 1.0, 2.0),
    ]
    y, _ = integrate_multiscale("dense", levels, lambda i: lambda t, y: torch.ones_like(y), torch.zeros(1, 3, 4, 4, 4))
    assert y.shape == (1, 3, 8, 8, 8)
    assert torch.allclose(y, torch.full_like(y, 2.0))
