"""Principal-axes initialiser: candidates contain the true rotation, MI picks it, registrar wiring."""

import math

import pytest
import torch

from msode_sdk.errors import InputError
from msode_sdk.initialize import (
    foreground_moments,
    moments_initial_theta,
    mutual_information,
    principal_axes_candidates,
)
from msode_sdk.transforms import Grid, RigidTransform, TransformChain, euler_to_rigid, rigid_matrix
from msode_sdk.warp import warp_chain

GRID = Grid((40, 40, 32), (4.0, 4.0, 4.0))


def _blob():
    """An anisotropic, asymmetric textured ellipsoid (distinct principal axes, no mirror symmetry)."""
    p = GRID.points()
    r = ((p - torch.tensor([4.0, -2.0, 0.0])) / torch.tensor([60.0, 40.0, 25.0])).pow(2).sum(-1)
    bump = torch.exp(-((p - torch.tensor([30.0, 15.0, 5.0])) ** 2).sum(-1) / 200.0)
    tex = 0.5 + 0.3 * torch.sin(p[..., 0] / 7.0) * torch.cos(p[..., 1] / 5.0)
    return (torch.where(r < 1, tex, torch.zeros_like(tex)) + 0.5 * bump)[None, None]


def test_foreground_moments_of_a_box():
    vol = torch.zeros(1, 1, *GRID.shape_dhw)
    vol[:, :, 10:20, 5:15, 8:30] = 1.0  # z 10..19, y 5..14, x 8..29
    c, cov = foreground_moments(vol, GRID)
    expect_x = ((8 + 29) / 2 - (40 - 1) / 2) * 4.0
    assert abs(float(c[0, 0]) - expect_x) < 1e-6
    assert cov[0, 0, 0] > cov[0, 1, 1] > 0


def test_separable_moments_equal_the_moments_of_the_points():
    """The moments summed axis by axis equal the centroid and central covariance of the voxel centres above
    the threshold, on an anisotropic grid with a random, off-centre foreground (two volumes in a batch)."""
    grid = Grid((9, 7, 5), (1.5, 2.0, 3.0))
    g = torch.Generator().manual_seed(4)
    vol = torch.rand(2, 1, *grid.shape_dhw, generator=g) * torch.linspace(0, 1, 9)  # denser towards +x
    c, cov = foreground_moments(vol, grid, threshold=0.3)
    pts = grid.points(torch.float64).reshape(-1, 3)
    for i in range(2):
        sel = pts[vol[i, 0].reshape(-1) > 0.3]
        ref_c = sel.mean(0)
        d = sel - ref_c
        torch.testing.assert_close(c[i], ref_c, rtol=0, atol=1e-9)
        torch.testing.assert_close(cov[i], d.T @ d / len(sel), rtol=0, atol=1e-9 * float((d * d).sum(1).max()))


@pytest.mark.parametrize("angles", [(0.5, -0.9, 1.1), (-1.2, 0.3, -0.6)])
def test_candidates_contain_truth_and_mi_selects_it(angles):
    fixed = _blob()
    theta = euler_to_rigid(torch.tensor([angles]), torch.tensor([[6.0, -4.0, 3.0]]))
    # moving(phi(x)) = fixed(x) <=> moving = fixed o phi^-1
    inv = torch.linalg.inv(rigid_matrix(theta.double())).float()
    from msode_sdk.transforms import matrix_to_rigid

    moving = warp_chain(fixed, GRID, TransformChain([RigidTransform(matrix_to_rigid(inv))]), GRID)
    cands = principal_axes_candidates(moving, fixed, GRID)
    truth = rigid_matrix(theta.double())[0]
    errs = [float(torch.linalg.norm(cands[0, k, :3, :3] - truth[:3, :3])) for k in range(4)]
    assert min(errs) < 0.1
    est = moments_initial_theta(moving, fixed, GRID)
    angle_err = math.degrees(
        float(torch.linalg.norm(matrix_to_rigid((rigid_matrix(est.double()).inverse() @ truth[None]))[0, :3]))
    )
    assert angle_err < 6.0


def test_mutual_information_is_maximal_at_alignment():
    fixed = _blob()
    shifted = warp_chain(fixed, GRID, TransformChain([RigidTransform(torch.tensor([[0, 0, 0, 8.0, 0, 0]]))]), GRID)
    assert float(mutual_information(fixed, fixed)) > float(mutual_information(shifted, fixed))


def test_registrar_init_option(analytic_plan):
    from msode_sdk import Registrar

    reg = Registrar.load(analytic_plan, device="cpu", backend="torch")
    x = torch.rand(1, 1, 40, 56, 48)
    with pytest.raises(InputError, match="init"):
        reg.register_model_grid(x, x, init="pca")


def _rigid_plan(tmp_path, levels=2):
    from msode_export.analytic import build_analytic_plan
    from msode_export.pack import LevelSolver

    sched = {"rigid": (LevelSolver("adaptive_heun", 0.1, tol=1e-3),) * (levels - 1) + (LevelSolver("euler", 0.2),)}
    return build_analytic_plan(
        tmp_path / "rigid.plan", GRID, stages=("rigid",), schedules=sched, formats=("torchscript",)
    )


def test_multistart_recovers_a_rotation_the_identity_start_misses(tmp_path, caplog):
    """A 150 deg rotation about z: the SSD flow from the identity stalls; multistart starts from the
    principal-axes candidates too, and MI after the coarse level keeps the right one."""
    from msode_sdk import Registrar

    reg = Registrar.load(_rigid_plan(tmp_path), device="cpu", backend="torch")
    fixed = _blob()
    theta = torch.tensor([[0.0, 0.0, math.radians(150.0), 5.0, -3.0, 2.0]])
    inv = torch.linalg.inv(rigid_matrix(theta.double())).float()
    from msode_sdk.transforms import matrix_to_rigid

    moving = warp_chain(fixed, GRID, TransformChain([RigidTransform(matrix_to_rigid(inv))]), GRID)
    pts = GRID.points().reshape(1, -1, 3)[:, ::7]

    def err(res):
        est = res.chain.map_points(pts)
        ref = TransformChain([RigidTransform(theta)]).map_points(pts)
        return float(((est - ref) ** 2).sum(-1).mean().sqrt())

    plain = err(reg.register_model_grid(moving, fixed, init="none"))
    with caplog.at_level("INFO", logger="msode_sdk"):
        res = reg.register_model_grid(moving, fixed, init="multistart")
    assert plain > 20.0, plain
    assert err(res) < 0.5 * GRID.spacing_xyz[0], err(res)  # sub-voxel
    assert any("multistart: start" in r.message for r in caplog.records)
    assert res.stages[0].nfe > 0 and len(res.stages[0].levels) == 2


def test_multistart_falls_back_when_rigid_is_not_first(tmp_path, caplog):
    from msode_export.analytic import build_analytic_plan
    from msode_sdk import Registrar

    plan = build_analytic_plan(
        tmp_path / "br.plan",
        GRID,
        stages=("bspline", "rigid"),
        control_spacing_mm=(40.0,) * 3,
        formats=("torchscript",),
    )
    reg = Registrar.load(plan, device="cpu", backend="torch")
    x = _blob()
    with caplog.at_level("WARNING", logger="msode_sdk"):
        reg.register_model_grid(x, x, init="multistart")
    assert any("multistart" in r.message and "moments" in r.message for r in caplog.records)


@pytest.mark.parametrize("mode", ["moments", "multistart"])
def test_registrar_ts_runs_the_plans_init_like_the_sdk(tmp_path, mode):
    """A plan whose rigid stage asks for an initialiser: registrar.ts (the C++ path) runs the same
    initialiser and gives the SDK's result bit for bit."""
    import io as _io
    from msode_export.analytic import analytic_network
    from msode_export.pack import LevelSolver, StageDef, build_plan, level_grids
    from msode_export.scripted import build_registrar_ts
    from msode_sdk import Registrar
    from msode_sdk.transforms import matrix_to_rigid

    sched = (LevelSolver("adaptive_heun", 0.1, tol=1e-3), LevelSolver("euler", 0.2))
    nets = {("rigid", lv): analytic_network("rigid", g, GRID, {}) for lv, g in enumerate(level_grids(GRID, 2), 1)}
    plan = build_plan(
        tmp_path / "init.plan",
        "init",
        GRID,
        [StageDef("rigid", "rigid", sched, {"init": mode})],
        nets,
        formats=("torchscript",),
    )
    fixed = _blob()
    theta = torch.tensor([[0.0, 0.0, math.radians(150.0), 5.0, -3.0, 2.0]])
    inv = torch.linalg.inv(rigid_matrix(theta.double())).float()
    moving = warp_chain(fixed, GRID, TransformChain([RigidTransform(matrix_to_rigid(inv))]), GRID)
    ref = Registrar.load(plan, device="cpu", backend="torch").register_model_grid(moving, fixed)
    ts = torch.jit.load(_io.BytesIO(build_registrar_ts(plan)))
    warped, disp, matrix = ts(moving, fixed)
    assert torch.equal(warped, ref.warped)
    pts = GRID.points().reshape(1, -1, 3)[:, ::7]
    est = ref.chain.map_points(pts)
    err = float(((est - TransformChain([RigidTransform(theta)]).map_points(pts)) ** 2).sum(-1).mean().sqrt())
    assert err < 0.5 * GRID.spacing_xyz[0], err
