"""Multi-contrast Gauss-Newton fields: MIND-SSC and learned tissue features (msode_export.analytic,
msode_train.tissue), and the bundled multi-contrast plan."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MODEL_GRID, affine_from, render
from msode_export.analytic import BSplineSSDField, MINDSSC, RigidSSDField, build_analytic_plan
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
    for net in (RigidSSDField(grid, features=MINDSSC(1, 1)), BSplineSSDField(grid, lat, features=MINDSSC(1, 1))):
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


def test_bspline_gn_step_solves_its_normal_equations():
    """Known answer: with enough CG iterations the field is -gain * z, z the solution of the dense system
    (B^T (sum_c g_c g_c^T) B + mu D) z = B^T sum_c r_c g_c, built here explicitly from the Kronecker
    product of the per-axis basis matrices (a few hundred unknowns); float64 throughout."""
    grid = Grid((10, 9, 8), (4.0, 4.0, 4.0))
    lat = BSplineLattice(grid, (16.0, 16.0, 16.0))
    net = BSplineSSDField(grid, lat, gain=2.0, damping=0.05, cg_iters=400, features=MINDSSC(1, 1)).double()
    w, f = _smooth_random(grid.shape_dhw, 8).double(), _smooth_random(grid.shape_dhw, 9).double()
    out = net(w, f, torch.zeros(1, dtype=torch.float64))  # (1, 3, cz, cy, cx)
    r, gx, gy, gz = net.residual(w, f)  # each (1, C, Z, Y, X)
    g = torch.stack((gx, gy, gz), dim=2)  # (1, C, 3, Z, Y, X)
    b = torch.kron(torch.kron(net.bz, net.by), net.bx)  # (Z*Y*X, cz*cy*cx), x fastest
    nv, nk = b.shape
    gv = g[0].reshape(g.shape[1], 3, nv)  # (C, 3, voxels)
    rv = r[0].reshape(r.shape[1], nv)
    t_vox = torch.einsum("civ,cjv->vij", gv, gv)  # (voxels, 3, 3)
    h = torch.zeros(3 * nk, 3 * nk, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            h[i * nk : (i + 1) * nk, j * nk : (j + 1) * nk] = b.T @ (t_vox[:, i, j, None] * b)
    diag = b.T @ (gv * gv).sum(dim=(0, 1))
    diag = diag + 1e-3 * diag.mean() + 1e-12
    rhs = torch.cat([b.T @ (rv * gv[:, i]).sum(0) for i in range(3)])
    z = torch.linalg.solve(h + 0.05 * torch.diag(diag.repeat(3)), rhs)
    want = (-2.0 * z).reshape(3, *out.shape[2:])[None]
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))
