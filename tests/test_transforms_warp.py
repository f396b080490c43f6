"""Transforms and reference warps against independent computations (scipy, direct sums, by hand)."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from msode_sdk.errors import InputError
from msode_sdk.transforms import (
    BSplineLattice,
    BSplineTransform,
    DenseTransform,
    Grid,
    RigidTransform,
    TransformChain,
    bspline_kernel,
    carry_state,
    euler_to_rigid,
    matrix_to_rigid,
    rigid_matrix,
)
from msode_sdk.warp import sample_points, warp_chain

torch.manual_seed(0)


def _scipy_warp(vol_dhw, grid, points_xyz):
    """map_coordinates reference: mm points -> voxel indices (z, y, x), trilinear, zero outside
    with interpolation towards zero in the last half voxel (grid-constant)."""
    idx = []
    for a in (2, 1, 0):
        n, s = grid.shape_xyz[a], grid.spacing_xyz[a]
        idx.append(points_xyz[..., a] / s + (n - 1) / 2.0)
    return map_coordinates(vol_dhw, np.stack(idx), order=1, mode="grid-constant", cval=0.0)


def test_grid_points_layout_and_centre():
    g = Grid((5, 4, 3), (1.0, 2.0, 3.0))
    p = g.points()
    assert p.shape == (3, 4, 5, 3)  # (D, H, W, xyz)
    assert torch.allclose(p.mean(dim=(0, 1, 2)), torch.zeros(3), atol=1e-6)
    assert p[0, 0, 1, 0] - p[0, 0, 0, 0] == 1.0 and p[0, 1, 0, 1] - p[0, 0, 0, 1] == 2.0
    assert p[1, 0, 0, 2] - p[0, 0, 0, 2] == 3.0


def test_rigid_matrix_by_hand():
    th = torch.tensor([[0.0, 0.0, math.pi / 2, 1.0, 2.0, 3.0]])
    m = rigid_matrix(th)[0]
    # phi(x) = R (x + t), 90 degrees about z: (x, y, z) -> (-y, x, z); (1,0,0) + t = (2,2,3) -> (-2,2,3)
    p = m[:3, :3] @ torch.tensor([1.0, 0.0, 0.0]) + m[:3, 3]
    assert torch.allclose(p, torch.tensor([-2.0, 2.0, 3.0]), atol=1e-6)
    assert torch.allclose(m[:3, :3] @ m[:3, :3].T, torch.eye(3), atol=1e-6)
    assert abs(float(torch.det(m[:3, :3])) - 1) < 1e-6


def test_rigid_round_trip_including_small_and_near_pi_angles():
    axis = torch.randn(300, 3, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True)
    angle = torch.cat(
        [
            torch.rand(100, dtype=torch.float64) * math.pi * 0.999,
            torch.full((100,), 1e-7, dtype=torch.float64),
            math.pi - torch.rand(100, dtype=torch.float64) * 1e-3,
        ]
    )
    th = torch.cat([axis * angle[:, None], torch.randn(300, 3, dtype=torch.float64) * 20], 1)
    assert torch.allclose(matrix_to_rigid(rigid_matrix(th)), th, atol=1e-6)
    m = rigid_matrix(th)
    assert torch.allclose(
        m[:, :3, :3] @ m[:, :3, :3].transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(300, 3, 3), atol=1e-12
    )
    with pytest.raises(InputError):
        rigid_matrix(torch.zeros(6))


def test_rotation_vector_by_hand_and_euler_conversion():
    # a rotation vector is axis * angle: 90 degrees about (1, 1, 1)/sqrt(3) cycles x -> y -> z
    r = torch.full((1, 3), (2 * math.pi / 3) / math.sqrt(3), dtype=torch.float64)
    m = rigid_matrix(torch.cat([r, torch.zeros(1, 3, dtype=torch.float64)], 1))[0, :3, :3]
    assert torch.allclose(
        m @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
        atol=1e-12,
    )
    # Euler R = Rz(c) Ry(b) Rx(a), written out independently
    a, b, c = 0.3, -1.2, 2.0
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]], dtype=torch.float64)
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]], dtype=torch.float64)
    th = euler_to_rigid(
        torch.tensor([[a, b, c]], dtype=torch.float64), torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    )
    assert torch.allclose(rigid_matrix(th)[0, :3, :3], rz @ ry @ rx, atol=1e-12)
    assert torch.allclose(rigid_matrix(th)[0, :3, 3], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), atol=1e-12)


def test_bspline_kernel_partition_of_unity_and_values():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    total = sum(bspline_kernel(u - k) for k in range(-2, 4))
    assert torch.allclose(total, torch.ones_like(u))
    assert abs(float(bspline_kernel(torch.tensor(0.0))) - 2 / 3) < 1e-7
    assert abs(float(bspline_kernel(torch.tensor(1.0))) - 1 / 6) < 1e-7
    assert float(bspline_kernel(torch.tensor(2.0))) == 0.0


def test_bspline_lattice_covers_grid():
    g = Grid((20, 16, 10), (2.0, 2.0, 3.0))
    lat = BSplineLattice(g, (10.0, 8.0, 9.0))
    assert lat.shape_xyz == (math.ceil(38 / 10) + 3, math.ceil(30 / 8) + 3, math.ceil(27 / 9) + 3)
    # a constant coefficient field is a pure translation everywhere on the grid (full support)
    c = torch.zeros(1, *lat.coeff_shape)
    c[:, 0] = 2.5
    d = lat.displacement_on(c, g)
    assert torch.allclose(d[:, 0], torch.full_like(d[:, 0], 2.5), atol=1e-5)
    assert d[:, 1:].abs().max() < 1e-6


def test_bspline_separable_equals_direct_sum():
    g = Grid((9, 7, 6), (3.0, 2.5, 4.0))
    lat = BSplineLattice(g, (7.0, 6.0, 9.0))
    c = torch.randn(2, *lat.coeff_shape, dtype=torch.float64)
    sep = lat.displacement_on(c, g).permute(0, 2, 3, 4, 1)
    # direct triple sum, written independently of both implementations
    pts = g.points(torch.float64)
    direct = torch.zeros(2, *pts.shape, dtype=torch.float64)
    cz, cy, cx = lat.coeff_shape[1:]
    px, py, pz = (lat.control_coords(a, torch.float64) for a in range(3))
    for k in range(cz):
        wz = bspline_kernel((pts[..., 2] - pz[k]) / 9.0)
        for l in range(cy):
            wy = bspline_kernel((pts[..., 1] - py[l]) / 6.0)
            for m in range(cx):
                w = wz * wy * bspline_kernel((pts[..., 0] - px[m]) / 7.0)
                direct += w[None, ..., None] * c[:, :, k, l, m][:, None, None, None, :]
    assert torch.allclose(sep, direct, atol=1e-10)
    pts_b = pts.unsqueeze(0).expand(2, *pts.shape)
    assert torch.allclose(lat.displacement_at(c, pts_b), direct, atol=1e-10)
    # random off-grid points, including outside the support (zero there)
    rnd = (torch.rand(2, 500, 3, dtype=torch.float64) - 0.5) * 80
    at = lat.displacement_at(c, rnd, chunk=77)
    far = (rnd.abs() > 60).any(-1)
    assert torch.all(at[far] == 0)


def test_sample_points_matches_scipy_random():
    g = Grid((13, 11, 9), (1.5, 2.0, 2.5))
    vol = torch.rand(1, 1, *g.shape_dhw, dtype=torch.float64)
    pts = (torch.rand(1, 4, 5, 6, 3, dtype=torch.float64) - 0.5) * torch.tensor([24.0, 26.0, 28.0], dtype=torch.float64)
    ours = sample_points(vol, g, pts)[0, 0].numpy()
    ref = _scipy_warp(vol[0, 0].numpy(), g, pts[0].numpy())
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_tiny_hand_computed_warp():
    g = Grid((2, 2, 2), (1.0, 1.0, 1.0))
    vol = torch.arange(8, dtype=torch.float64).reshape(1, 1, 2, 2, 2)  # value = 4z + 2y + x
    # centre of the cube -> mean 3.5; a voxel centre -> its value; x shifted half a voxel outside -> half
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, -0.5, -0.5]], dtype=torch.float64).reshape(
        1, 1, 1, 3, 3
    )
    out = sample_points(vol, g, pts).flatten().tolist()
    assert out == pytest.approx([3.5, 7.0, 0.5])


@pytest.mark.parametrize("kinds", [("rigid",), ("bspline",), ("dense",), ("rigid", "bspline"), ("rigid", "dense")])
def test_warp_chain_matches_scipy(kinds):
    g = Grid((14, 12, 10), (2.0, 2.0, 2.5))
    vol = torch.rand(2, 1, *g.shape_dhw, dtype=torch.float64)
    ts = []
    for k in kinds:
        if k == "rigid":
            th = torch.cat([torch.randn(2, 3) * 0.3, torch.randn(2, 3) * 3], 1).double()
            ts.append(RigidTransform(th))
        elif k == "bspline":
            lat = BSplineLattice(g, (8.0, 8.0, 8.0))
            ts.append(BSplineTransform(torch.randn(2, *lat.coeff_shape, dtype=torch.float64) * 2, lat))
        else:
            ts.append(DenseTransform(torch.randn(2, 3, *g.shape_dhw, dtype=torch.float64), g))
    chain = TransformChain(ts)
    out = warp_chain(vol, g, chain, g)
    # reference: map every voxel point by composing the transforms' point maps by hand
    pts = g.points(torch.float64).unsqueeze(0).expand(2, *g.points().shape)
    for t in reversed(ts):
        pts = t.map_points(pts)
    for b in range(2):
        ref = _scipy_warp(vol[b, 0].numpy(), g, pts[b].numpy())
        np.testing.assert_allclose(out[b, 0].numpy(), ref, atol=1e-9)


def test_rigid_then_bspline_is_R_of_x_plus_t_plus_u():
    g = Grid((8, 8, 8), (2.0, 2.0, 2.0))
    lat = BSplineLattice(g, (6.0, 6.0, 6.0))
    c = torch.randn(1, *lat.coeff_shape, dtype=torch.float64)
    th = torch.tensor([[0.1, -0.2, 0.3, 1.0, -2.0, 0.5]], dtype=torch.float64)
    chain = TransformChain([RigidTransform(th), BSplineTransform(c, lat)])
    pts = g.points(torch.float64)[None]
    u = lat.displacement_on(c, g).permute(0, 2, 3, 4, 1)
    m = rigid_matrix(th)[0]
    expect = (pts + u + th[0, 3:]) @ m[:3, :3].T
    assert torch.allclose(expect, (pts + u) @ m[:3, :3].T + m[:3, 3], atol=1e-10)
    assert torch.allclose(chain.map_grid(g, 1, torch.float64), expect, atol=1e-10)
    assert torch.allclose(chain.map_points(pts), expect, atol=1e-10)
    assert torch.allclose(chain.affine_part(), rigid_matrix(th))


def test_identity_warp_is_identity():
    g = Grid((10, 9, 8), (1.0, 1.2, 1.5))
    vol = torch.rand(1, 1, *g.shape_dhw)
    chain = TransformChain([RigidTransform(torch.zeros(1, 6))])
    assert torch.allclose(warp_chain(vol, g, chain, g), vol, atol=1e-5)


def test_carry_dense_state_preserves_smooth_field_in_mm():
    coarse, fine = Grid((8, 8, 8), (2.0, 2.0, 2.0)), Grid((16, 16, 16), (1.0, 1.0, 1.0))
    # a linear field d(x) = A x is reproduced exactly by trilinear resampling inside the coarse grid
    a = torch.tensor([[0.1, 0.0, 0.02], [0.0, -0.05, 0.0], [0.03, 0.0, 0.1]])
    field_c = (coarse.points() @ a.T).permute(3, 0, 1, 2)[None]
    up = carry_state("dense", field_c, coarse, fine)
    expect = (fine.points() @ a.T).permute(3, 0, 1, 2)[None]
    inside = (fine.points().abs() <= 7.0).all(-1)
    assert torch.allclose(up[0][:, inside], expect[0][:, inside], atol=1e-5)
    assert torch.equal(carry_state("rigid", torch.ones(1, 6), coarse, fine), torch.ones(1, 6))


@pytest.mark.parametrize("shape_xyz", [(12, 10, 8), (12, 11, 8), (9, 9, 7)])
def test_pyramid_levels_sample_the_coarse_voxel_centres(shape_xyz):
    """msode_sdk.loop.downsample (2x2x2 averages for even sizes, warps otherwise) equals trilinear sampling
    of the fine volume at the coarse grid's voxel centres, two factor-2 steps deep (the warps' sampling
    coordinates are float32: 1e-6)."""
    from msode_sdk.loop import downsample
    from msode_sdk.transforms import TransformChain

    grid = Grid(shape_xyz, (1.5, 1.5, 1.5))
    vol = torch.rand(2, 1, *grid.shape_dhw, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    half = grid.downsampled(2)
    want = warp_chain(vol, grid, TransformChain(), half)
    torch.testing.assert_close(downsample(vol, grid, half), want, rtol=0, atol=1e-6)
    quarter = half.downsampled(2)
    want2 = warp_chain(want, half, TransformChain(), quarter)
    torch.testing.assert_close(downsample(vol, grid, quarter), want2, rtol=0, atol=1e-6)


def test_jacobian_determinant_known_maps():
    """Linear maps: det(A) at every voxel (finite differences are exact); a reflection is negative; a
    shear wave x + a sin(k y) e_x keeps det 1; x + a sin(k x) e_x has det 1 + a k cos(k x) (central
    differences: to O(h^2)) and folds where a k cos(k x) < -1, which evaluate.folding_fraction counts."""
    from msode_sdk.transforms import jacobian_determinant
    from msode_train.evaluate import folding_fraction

    grid = Grid((20, 16, 12), (2.0, 1.5, 3.0))
    pts = grid.points(torch.float64)[None]  # (1, D, H, W, 3)
    a = torch.tensor([[1.2, 0.1, -0.3], [0.05, 0.9, 0.2], [0.1, -0.2, 1.1]], dtype=torch.float64)
    det = jacobian_determinant(pts @ a.T + 5.0, grid.spacing_xyz)
    torch.testing.assert_close(det, torch.full_like(det, float(torch.linalg.det(a))))
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    assert bool((jacobian_determinant(pts @ flip, grid.spacing_xyz) < 0).all())
    shear = pts.clone()
    shear[..., 0] += 3.0 * torch.sin(0.2 * pts[..., 1])
    torch.testing.assert_close(jacobian_determinant(shear, grid.spacing_xyz), torch.ones_like(det))
    k, amp = 0.2, 7.5  # a k = 1.5: folds where cos(k x) < -2/3 (x spans +-19 mm: k x up to +-3.8 rad)
    wave = pts.clone()
    wave[..., 0] += amp * torch.sin(k * pts[..., 0])
    det = jacobian_determinant(wave, grid.spacing_xyz)
    want = 1.0 + amp * k * torch.cos(k * pts[..., 0])
    inner = (slice(None), slice(None), slice(None), slice(1, -1))
    assert float((det[inner] - want[inner]).abs().max()) < 0.06  # a k (k h)^2 / 6 = 0.04 at h = 2 mm
    frac = folding_fraction(wave, grid, torch.ones(grid.shape_dhw, dtype=torch.bool))
    assert frac == pytest.approx(float((det <= 0).double().mean())) and 0.05 < frac < 0.5
