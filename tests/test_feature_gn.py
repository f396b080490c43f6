"""Multi-contrast Gauss-Newton fields: MIND-SSC and learned tissue features (msode_export.analytic,
msode_train.tissue), and the bundled multi-contrast plan."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MODEL_GRID, affine_from, render
from msode_export.analytic import (
    BSplineLKField,
    BSplineSSDField,
    DenseGNField,
    DenseSplineField,
    MINDSSC,
    RigidSSDField,
    build_analytic_plan,
)
from msode_sdk import Registrar
from msode_sdk.transforms import BSplineLattice, Grid


class _Duplicate(torch.nn.Module):
    """The image twice (two identical channels): the Gauss-Newton step must not change."""

    def forward(self, img):
        return torch.cat((img, img), dim=1)


def _smooth_random(shape, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(1, 1, *shape, generator=g)
    for _ in range(3):
        v = F.avg_pool3d(F.pad(v, (1,) * 6, mode="replicate"), 3, stride=1)
    return v


def test_mind_is_invariant_to_affine_intensity_changes():
    img = _smooth_random((12, 14, 16), 0)
    m = MINDSSC(1, 1)
    a, b = m(img), m(2.0 - 3.0 * img)  # a decreasing affine map: T1 vs an inverted contrast
    assert a.shape == (1, 12, 12, 14, 16)
    assert float(a.max()) <= 1.0 + 1e-6 and float(a.min()) > 0.0
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_mind_differs_for_different_structure():
    a = MINDSSC(1, 1)(_smooth_random((12, 14, 16), 0))
    b = MINDSSC(1, 1)(_smooth_random((12, 14, 16), 1))
    assert float((a - b).abs().mean()) > 0.05


@pytest.mark.parametrize("kind", ["rigid", "bspline"])
def test_gn_step_is_invariant_to_duplicated_feature_channels(kind):
    grid = Grid((14, 12, 10), (3.0, 3.0, 3.0))
    w, f = _smooth_random(grid.shape_dhw, 2), _smooth_random(grid.shape_dhw, 3)
    t = torch.zeros(1)
    if kind == "rigid":
        one, two = RigidSSDField(grid), RigidSSDField(grid, features=_Duplicate())
    else:
        lat = BSplineLattice(grid, (12.0, 12.0, 12.0))
        one, two = BSplineSSDField(grid, lat), BSplineSSDField(grid, lat, features=_Duplicate())
    a, b = one(w, f, t), two(w, f, t)
    assert float(a.abs().max()) > 0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_feature_fields_script_and_export(tmp_path):
    from msode_export.pack import export_onnx, export_torchscript

    grid = Grid((14, 12, 10), (4.0, 4.0, 4.0))
    lat = BSplineLattice(grid, (16.0, 16.0, 16.0))
    w, f, t = _smooth_random(grid.shape_dhw, 4), _smooth_random(grid.shape_dhw, 5), torch.zeros(1)
    for net in (
        RigidSSDField(grid, features=MINDSSC(1, 1)),
        BSplineSSDField(grid, lat, features=MINDSSC(1, 1)),
        DenseGNField(Grid((16, 12, 10), (4.0, 4.0, 4.0)), block_mm=8.0, window_blocks=1.0, features=MINDSSC(1, 1)),
        BSplineLKField(
            Grid((16, 12, 10), (4.0, 4.0, 4.0)),
            BSplineLattice(Grid((16, 12, 10), (4.0, 4.0, 4.0)), (16.0, 16.0, 16.0)),
            block_mm=8.0,
            window_blocks=1.0,
            features=MINDSSC(1, 1),
        ),
        DenseSplineField(
            Grid((16, 12, 10), (4.0, 4.0, 4.0)),
            BSplineLattice(Grid((16, 12, 10), (4.0, 4.0, 4.0)), (16.0, 16.0, 16.0)),
            block_mm=8.0,
            window_blocks=1.0,
            features=MINDSSC(1, 1),
        ),
    ):
        if isinstance(net, DenseGNField):  # its grid needs sizes divisible by the 2-voxel block
            grid = net.residual.grid
            w, f = _smooth_random(grid.shape_dhw, 4), _smooth_random(grid.shape_dhw, 5)
        ref = net(w, f, t)
        ts = torch.jit.load(io.BytesIO(export_torchscript(net)))
        torch.testing.assert_close(ts(w, f, t), ref, rtol=1e-5, atol=1e-6)
        onnx_bytes = export_onnx(net, grid)
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        out = sess.run(None, dict(zip(names, (w.numpy(), f.numpy(), t.numpy()))))[0]
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_mind_plan_recovers_rigid_motion_across_contrasts(tmp_path, phantom):
    """Contrast 'b' of the conftest phantom inverts its blobs' amplitudes: intensity SSD is meaningless,
    MIND-SSC Gauss-Newton must still recover a known rigid motion."""
    from msode_sdk.transforms import rigid_matrix

    plan = build_analytic_plan(
        tmp_path / "mind.plan", MODEL_GRID, stages=("rigid",), features="mind", formats=("torchscript",)
    )
    reg = Registrar.load(plan, device="cpu", backend="torch")
    c0 = phantom.centre.numpy()
    m = rigid_matrix(torch.tensor([[0.10, -0.08, 0.12, 5.0, -4.0, 3.0]], dtype=torch.float64))[0].numpy()
    truth = np.eye(4)
    truth[:3, :3] = m[:3, :3]
    truth[:3, 3] = m[:3, 3] + c0 - m[:3, :3] @ c0
    shape = MODEL_GRID.shape_xyz
    aff = affine_from(MODEL_GRID.spacing_xyz, (0, 0, 0), shape, c0)
    apply = lambda w, p: p @ torch.from_numpy(w[:3, :3].T) + torch.from_numpy(w[:3, 3])  # noqa: E731
    fixed = render(phantom, shape, aff, lambda p: apply(truth, p), contrast="a")
    moving = render(phantom, shape, aff, contrast="b")
    res = reg.register((moving, aff), (fixed, aff))
    pts = torch.from_numpy(np.stack(np.meshgrid(*[np.linspace(-40, 40, 9)] * 3, indexing="ij"), -1).reshape(-1, 3) + c0)
    err = float(((apply(res.matrix, pts) - apply(truth, pts)) ** 2).sum(-1).mean().sqrt())
    before = float(((apply(truth, pts) - pts) ** 2).sum(-1).mean().sqrt())
    assert before > 8.0
    assert err < 0.3 * MODEL_GRID.spacing_xyz[0], (before, err)


def test_pooled_field_is_the_field_on_the_averaged_grid():
    grid = Grid((16, 12, 10), (2.0, 2.0, 2.0))
    w, f, t = _smooth_random(grid.shape_dhw, 6), _smooth_random(grid.shape_dhw, 7), torch.zeros(1)
    pooled = RigidSSDField(grid, pool=2)(w, f, t)
    coarse = RigidSSDField(grid.downsampled(2))(F.avg_pool3d(w, 2), F.avg_pool3d(f, 2), t)
    torch.testing.assert_close(pooled, coarse)
    lat = BSplineLattice(grid, (8.0, 8.0, 8.0))
    torch.testing.assert_close(
        BSplineSSDField(grid, lat, pool=2)(w, f, t),
        BSplineSSDField(grid.downsampled(2), lat)(F.avg_pool3d(w, 2), F.avg_pool3d(f, 2), t),
    )
    with pytest.raises(ValueError, match="divisible"):
        RigidSSDField(Grid((15, 12, 10), (2.0, 2.0, 2.0)), pool=2)


def _dense_gn_step(net, w, f, hessian_pool=1):
    """-gain z, z the solution of the dense system (B_h^T S_h B_h + mu D) z = B^T sum_c r_c g_c of ``net``
    (an :class:`BSplineSSDField` in float64), built explicitly from Kronecker products of the per-axis
    basis matrices: B at the voxels for the gradient, B_h and S_h (the structure tensor summed over
    ``hessian_pool``^3 blocks) at the block centres for the metric."""
    r, gx, gy, gz = net.residual(w, f)  # each (1, C, Z, Y, X)
    g = torch.stack((gx, gy, gz), dim=2)  # (1, C, 3, Z, Y, X)
    b = torch.kron(torch.kron(net.bz, net.by), net.bx)  # (Z*Y*X, cz*cy*cx), x fastest
    nv, nk = b.shape
    gv = g[0].reshape(g.shape[1], 3, nv)  # (C, 3, voxels)
    rv = r[0].reshape(r.shape[1], nv)
    s = torch.einsum("civ,cjv->ijv", gv, gv).reshape(9, *r.shape[2:])  # (3x3, Z, Y, X)
    k = hessian_pool
    if k > 1:
        s = F.avg_pool3d(s[None], k)[0] * k**3
        bh = torch.kron(torch.kron(net.hz, net.hy), net.hx)
    else:
        bh = b
    t_vox = s.reshape(3, 3, -1).permute(2, 0, 1)  # (blocks, 3, 3)
    h = torch.zeros(3 * nk, 3 * nk, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            h[i * nk : (i + 1) * nk, j * nk : (j + 1) * nk] = bh.T @ (t_vox[:, i, j, None] * bh)
    diag = bh.T @ (t_vox[:, 0, 0] + t_vox[:, 1, 1] + t_vox[:, 2, 2])
    diag = diag + 1e-3 * diag.mean() + 1e-12
    rhs = torch.cat([b.T @ (rv * gv[:, i]).sum(0) for i in range(3)])
    z = torch.linalg.solve(h + net.damping * torch.diag(diag.repeat(3)), rhs)
    return (-net.gain * z).reshape(1, 3, net.bz.shape[1], net.by.shape[1], net.bx.shape[1])


@pytest.mark.parametrize("hessian_pool", [1, 2])
def test_bspline_gn_step_solves_its_normal_equations(hessian_pool):
    """Known answer: with enough CG iterations the field is the solution of its dense normal equations
    (float64 throughout): the exact metric, and the block quadrature of ``hessian_pool=2``."""
    grid = Grid((10, 8, 8), (4.0, 4.0, 4.0))
    lat = BSplineLattice(grid, (16.0, 16.0, 16.0))
    net = BSplineSSDField(
        grid, lat, gain=2.0, damping=0.05, cg_iters=400, features=MINDSSC(1, 1), hessian_pool=hessian_pool
    ).double()
    w, f = _smooth_random(grid.shape_dhw, 8).double(), _smooth_random(grid.shape_dhw, 9).double()
    out = net(w, f, torch.zeros(1, dtype=torch.float64))  # (1, 3, cz, cy, cx)
    want = _dense_gn_step(net, w, f, hessian_pool)
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))
    if hessian_pool > 1:  # an approximation of the exact metric's step, not the same step
        exact = _dense_gn_step(net, w, f, 1)
        rel = float((want - exact).norm() / exact.norm())
        assert 1e-4 < rel < 0.3, rel


def test_bspline_hessian_pool_needs_divisible_sizes():
    grid = Grid((9, 8, 8), (4.0, 4.0, 4.0))
    with pytest.raises(ValueError, match="divisible"):
        BSplineSSDField(grid, BSplineLattice(grid, (16.0, 16.0, 16.0)), hessian_pool=2)


@pytest.mark.parametrize("dilation,radius,neighbourhood", [(1, 1, "six"), (2, 1, "six"), (1, 2, "ssc")])
def test_mind_slabs_compute_the_whole_volume_descriptor(dilation, radius, neighbourhood):
    """The CPU slab loop (slabs of 3 z-rows and a remainder) gives the whole-volume descriptor, borders
    included (replicate padding at the volume's ends only), for a batch, and its gradient."""
    g = torch.Generator().manual_seed(4)
    img = torch.rand(2, 1, 11, 9, 10, generator=g, dtype=torch.float64)
    whole = MINDSSC(radius, dilation, neighbourhood, slab_voxels=0)
    slabs = MINDSSC(radius, dilation, neighbourhood, slab_voxels=3 * 9 * 10)
    a = img.clone().requires_grad_(True)
    b = img.clone().requires_grad_(True)
    out_a, out_b = whole(a), slabs(b)
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-14)
    wts = torch.rand(out_a.shape, generator=g, dtype=torch.float64)
    (out_a * wts).sum().backward()
    (out_b * wts).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.jit.script(slabs)(img), out_a.detach(), rtol=1e-12, atol=1e-14)


def test_bspline_field_slabs_and_moments():
    """The slab loop of the field's Gauss-Newton moments equals the products of the whole-volume residual
    and gradient, and the field is the same with and without slabs."""
    grid = Grid((12, 10, 11), (2.0, 2.0, 2.0))
    lat = BSplineLattice(grid, (8.0, 8.0, 8.0))
    g = torch.Generator().manual_seed(5)
    w = torch.rand(2, 3, *grid.shape_dhw, generator=g, dtype=torch.float64)
    f = torch.rand(2, 3, *grid.shape_dhw, generator=g, dtype=torch.float64)
    net = BSplineSSDField(grid, lat, cg_iters=5, slab_voxels=4 * 10 * 12).double()
    r, gx, gy, gz = net.residual(w, f)
    want = torch.stack(
        [
            (a * b).sum(1)
            for a, b in [(r, gx), (r, gy), (r, gz), (gx, gx), (gy, gy), (gz, gz), (gx, gy), (gx, gz), (gy, gz)]
        ],
        dim=1,
    )
    grad, tensor = net.residual.moments(w, f, 4 * 10 * 12)
    torch.testing.assert_close(torch.cat((grad, tensor), dim=1), want, rtol=1e-12, atol=1e-14)
    whole = BSplineSSDField(grid, lat, cg_iters=5, slab_voxels=0).double()
    t = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(net(w, f, t), whole(w, f, t), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- dense Gauss-Newton


def _interp_matrix(n_blocks: int, k: int) -> torch.Tensor:
    """(n_blocks * k, n_blocks): linear interpolation between block centres at the voxel centres (voxel i
    sits at block coordinate (i + 0.5) / k - 0.5), constant beyond the first and last centres."""
    m = torch.zeros(n_blocks * k, n_blocks, dtype=torch.float64)
    for i in range(n_blocks * k):
        c = min(max((i + 0.5) / k - 0.5, 0.0), n_blocks - 1.0)
        lo = int(np.floor(c))
        hi = min(lo + 1, n_blocks - 1)
        m[i, lo] += 1.0 - (c - lo)
        m[i, hi] += c - lo
    return m


def _dense_gn_reference(net: DenseGNField, w, f, block: int, sigma: float, damping: float, gain: float):
    """The field's definition written out (float64): per-voxel moments from the residual and gradient,
    block means, a Gaussian window over the block grid with clamped (replicated) borders as explicit
    weighted sums, one damped 3x3 solve per block, linear interpolation back to the voxels per axis."""
    r, gx, gy, gz = net.residual(w, f)
    g = torch.stack((gx, gy, gz), dim=2)[0]  # (C, 3, Z, Y, X)
    rhs = torch.einsum("cizyx,czyx->izyx", g, r[0])  # (3, Z, Y, X)
    hess = torch.einsum("cizyx,cjzyx->ijzyx", g, g)  # (3, 3, Z, Y, X)
    z, y, x = rhs.shape[1:]
    bz, by, bx = z // block, y // block, x // block

    def block_mean(v):
        return v.reshape(*v.shape[:-3], bz, block, by, block, bx, block).mean(dim=(-5, -3, -1))

    rhs, hess = block_mean(rhs), block_mean(hess)
    rad = max(int(np.ceil(2.5 * sigma)), 1)
    gauss = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    # the module's taps (float32 values): the damped 3x3 solves amplify a 1e-8 change of the weights to 1e-4
    taps = net.wx[0].flatten().tolist()
    np.testing.assert_allclose(taps, gauss / gauss.sum(), rtol=1e-6)

    def window(v):
        out = torch.zeros_like(v)
        for a in range(bz):
            for b in range(by):
                for c in range(bx):
                    acc = 0.0
                    for i, ti in enumerate(taps):
                        for j, tj in enumerate(taps):
                            for k, tk in enumerate(taps):
                                aa = min(max(a + i - rad, 0), bz - 1)
                                bb = min(max(b + j - rad, 0), by - 1)
                                cc = min(max(c + k - rad, 0), bx - 1)
                                acc = acc + ti * tj * tk * v[..., aa, bb, cc]
                    out[..., a, b, c] = acc
        return out

    rhs, hess = window(rhs), window(hess)
    tr = torch.einsum("iizyx->zyx", hess) / 3.0
    lift = damping * tr + 1e-3 * tr.mean() + 1e-12
    a_mat = hess.permute(2, 3, 4, 0, 1) + lift[..., None, None] * torch.eye(3, dtype=torch.float64)
    v = torch.linalg.solve(a_mat, rhs.permute(1, 2, 3, 0)[..., None])[..., 0].permute(3, 0, 1, 2)  # (3, bz, by, bx)
    if block > 1:
        v = torch.einsum(
            "czyx,Zz,Yy,Xx->cZYX", v, _interp_matrix(bz, block), _interp_matrix(by, block), _interp_matrix(bx, block)
        )
    return (-gain * v)[None]


@pytest.mark.parametrize("block,sigma", [(1, 0.75), (2, 1.0), (2, 1.5)])
def test_dense_gn_field_is_its_definition(block, sigma):
    """Known answer: the field equals its definition written out by hand (float64, MIND features)."""
    grid = Grid((8, 6, 10), (2.0, 2.0, 2.0))
    net = DenseGNField(
        grid, gain=3.0, block_mm=2.0 * block, window_blocks=sigma, damping=0.05, features=MINDSSC(1, 1, "six")
    ).double()
    w, f = _smooth_random(grid.shape_dhw, 10).double(), _smooth_random(grid.shape_dhw, 11).double()
    out = net(w, f, torch.zeros(1, dtype=torch.float64))
    want = _dense_gn_reference(net, w, f, block, sigma, 0.05, 3.0)
    assert out.shape == (1, 3, *grid.shape_dhw) and float(want.abs().max()) > 0
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


def test_dense_gn_field_recovers_a_small_translation():
    """A smooth image and its copy shifted by s (mm): the undamped field (intensities, gain 1) is -(-s) =
    the displacement d = s that aligns them (W(x) = F(x - s) -> W(x + d) = F(x)), to first order."""
    grid = Grid((24, 24, 24), (2.0, 2.0, 2.0))
    zs, ys, xs = torch.meshgrid(*(torch.arange(24.0, dtype=torch.float64) * 2.0 - 23.0,) * 3, indexing="ij")

    def image(s):
        x, y, z = xs - s[0], ys - s[1], zs - s[2]
        return (torch.sin(x / 5.0) * torch.cos(y / 7.0) + torch.sin(z / 6.0 + x / 9.0) + 0.3 * torch.cos(y / 4.0))[
            None, None
        ]

    s = (0.4, -0.3, 0.2)
    net = DenseGNField(grid, gain=1.0, block_mm=8.0, window_blocks=1.0, damping=0.0).double()
    v = net(image(s), image((0.0, 0.0, 0.0)), torch.zeros(1, dtype=torch.float64))
    inner = v[0, :, 6:18, 6:18, 6:18].reshape(3, -1)
    torch.testing.assert_close(inner.mean(dim=1), torch.tensor(s, dtype=torch.float64), rtol=0, atol=0.02)
    assert float((inner - torch.tensor(s, dtype=torch.float64)[:, None]).abs().max()) < 0.05


def test_dense_gn_field_batches_independently_and_checks_its_grid():
    grid = Grid((8, 8, 8), (4.0, 4.0, 4.0))
    net = DenseGNField(grid, block_mm=8.0, window_blocks=1.0, features=MINDSSC(1, 1, "six"))
    w = torch.cat([_smooth_random(grid.shape_dhw, s) for s in (12, 13)])
    f = torch.cat([_smooth_random(grid.shape_dhw, s) for s in (14, 15)])
    both = net(w, f, torch.zeros(1))
    for i in range(2):
        one = net(w[i : i + 1], f[i : i + 1], torch.zeros(1))
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-5, atol=1e-6 * float(one.abs().max()))
    with pytest.raises(ValueError, match="divisible"):
        DenseGNField(Grid((9, 8, 8), (4.0, 4.0, 4.0)), block_mm=8.0)


def _fit_regulariser(m: torch.Tensor, fit_smoothing: float) -> torch.Tensor:
    """BSplineLKField's per-axis regulariser, written out from its definition (float64)."""
    gram = m.T @ m
    n = gram.shape[0]
    diag = torch.diagonal(gram)
    if fit_smoothing == 0:
        return 1e-3 * diag.mean() * torch.eye(n, dtype=torch.float64)
    deficit = 1.0 - diag / diag.max()
    reg = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n - 1):  # (c_k - c_k+1)^2 weighted by the less constrained point's deficit^8
        w = max(float(deficit[k]), float(deficit[k + 1]), 0.0) ** 8
        reg[k, k] += w
        reg[k + 1, k + 1] += w
        reg[k, k + 1] -= w
        reg[k + 1, k] -= w
    return fit_smoothing * diag.mean() * reg + 1e-6 * diag.mean() * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("fit_smoothing", [0.0, 1.0])
def test_bspline_lk_field_is_the_least_squares_fit_of_the_block_solutions(fit_smoothing):
    """Known answer: the B-spline coefficients are the regularised least-squares fit of the dense field's
    block solutions by the cubic B-spline at the block centres, solved here as one dense float64 system."""
    grid = Grid((12, 8, 10), (2.0, 2.0, 2.0))
    lattice = BSplineLattice(grid, (8.0, 8.0, 8.0))
    net = BSplineLKField(
        grid,
        lattice,
        gain=2.0,
        block_mm=4.0,
        window_blocks=1.0,
        features=MINDSSC(1, 1, "six"),
        fit_smoothing=fit_smoothing,
    )
    net = net.double()
    w, f = _smooth_random(grid.shape_dhw, 16).double(), _smooth_random(grid.shape_dhw, 17).double()
    out = net(w, f, torch.zeros(1, dtype=torch.float64))
    v = net.block_solution(w, f)[0]  # (3, bz, by, bx)
    blocks = grid.downsampled(2)
    bx, by, bz = (lattice.basis_matrix(blocks.axis_coords(a), a).double() for a in range(3))
    b = torch.kron(torch.kron(bz, by), bx)  # (blocks, controls), x fastest
    # regularised per axis: (G_z + R_z) x (G_y + R_y) x (G_x + R_x), as the field defines it
    grams = [m.T @ m + _fit_regulariser(m, fit_smoothing) for m in (bz, by, bx)]
    normal = torch.kron(torch.kron(grams[0], grams[1]), grams[2])
    want = torch.stack([torch.linalg.solve(normal, b.T @ v[c].reshape(-1)) for c in range(3)])
    want = (-2.0 * want).reshape(1, 3, bz.shape[1], by.shape[1], bx.shape[1])
    assert out.shape == want.shape and float(want.abs().max()) > 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    if fit_smoothing:
        return  # below: the plain ridge's fit of a displacement the spline represents (outer ring included)
    # the field's per-axis projections reproduce a displacement the spline represents exactly (small ridge;
    # the coefficients themselves are not unique where control points outnumber blocks)
    from msode_export.analytic import _separable_adjoint

    gen = torch.Generator().manual_seed(3)
    c_true = torch.randn(3, bz.shape[1], by.shape[1], bx.shape[1], generator=gen, dtype=torch.float64)
    smooth = torch.stack([(b @ c_true[c].reshape(-1)).reshape(v.shape[1:]) for c in range(3)])
    fit = _separable_adjoint(smooth[None], net.px, net.py, net.pz)[0]
    refit = torch.stack([(b @ fit[c].reshape(-1)).reshape(v.shape[1:]) for c in range(3)])
    assert float((refit - smooth).abs().max()) < 0.02 * float(smooth.abs().max())


def test_bspline_lk_fit_keeps_the_outer_control_ring_bounded():
    """The bundled geometry (120x120x80 at 2 mm, 40 mm lattice, 16 mm blocks): the outer control ring is barely
    reached by any block. With the plain ridge (fit_smoothing 0) block noise of 1 mm made coefficients of
    thousands of mm there, i.e. displacements of hundreds of mm just beyond the field of view, where a native
    grid reaches; the default fit keeps them of the order of the block values, and reproduces a uniform
    translation exactly (first differences do not penalise constants)."""
    from msode_export.analytic import _separable_adjoint

    model = Grid((120, 120, 80), (2.0, 2.0, 2.0))
    lattice = BSplineLattice(model, (40.0, 40.0, 40.0))
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(1, 3, 10, 15, 15, generator=gen) * 2 - 1  # block solutions in [-1, 1] mm (16 mm blocks)
    wide = Grid((150, 150, 110), (2.0, 2.0, 2.0))  # 30 mm beyond the field of view on every side
    coeffs = {}
    for fs in (0.0, 1.0):
        net = BSplineLKField(model, lattice, block_mm=16.0, fit_smoothing=fs)
        coeffs[fs] = _separable_adjoint(v, net.px, net.py, net.pz)
    assert float(coeffs[0.0].abs().max()) > 100.0  # the defect the default removes
    assert float(coeffs[1.0].abs().max()) < 10.0
    assert float(lattice.displacement_on(coeffs[1.0], wide).abs().max()) < 5.0
    net = BSplineLKField(model, lattice, block_mm=16.0)
    shift = torch.tensor([1.5, -2.0, 0.5]).reshape(1, 3, 1, 1, 1).expand(1, 3, 10, 15, 15)
    c = _separable_adjoint(shift, net.px, net.py, net.pz)
    torch.testing.assert_close(c, shift[:, :, :1, :1, :1].expand_as(c), rtol=0, atol=1e-3)


def test_dense_spline_field_is_the_lk_fit_sampled_on_the_level_grid():
    """Known answer: DenseSplineField's dense step equals BSplineLKField's coefficients (same settings)
    evaluated at every voxel by the SDK's own B-spline (BSplineLattice.displacement_on, exact FFD), here on
    a coarse level of a finer model grid (the lattice is the model grid's); a uniform translation of the block
    solutions stays uniform (the fit reproduces constants)."""
    model = Grid((24, 16, 20), (2.0, 2.0, 2.0))
    level = model.downsampled(2)
    lattice = BSplineLattice(model, (16.0, 16.0, 16.0))
    kw = dict(gain=2.0, block_mm=8.0, window_blocks=1.0, features=MINDSSC(1, 1, "six"))
    dense = DenseSplineField(level, lattice, **kw).double()
    lk = BSplineLKField(level, lattice, **kw).double()
    w, f = _smooth_random(level.shape_dhw, 20).double(), _smooth_random(level.shape_dhw, 21).double()
    t = torch.zeros(1, dtype=torch.float64)
    out = dense(w, f, t)
    want = lattice.displacement_on(lk(w, f, t), level)
    assert out.shape == (1, 3, *level.shape_dhw) and float(want.abs().max()) > 0
    # the field's basis matrices are float32 buffers (as every plan member's): float32 round-off
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    shift = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    blocks = shift.expand(1, 3, *level.downsampled(2).shape_dhw)
    uniform = dense._output(blocks, list(level.shape_dhw))
    torch.testing.assert_close(uniform, (-2.0 * shift).expand_as(out), rtol=0, atol=1e-3)
