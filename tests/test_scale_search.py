"""A deformable stage's scale search (plan parameter ``scale_search``, msode_sdk.loop): the final state
times the factor whose warped moving image has the highest MI with the fixed image. Known answers on a
stage that overshoots by construction, each pair of a batch on its own (registrar.ts parity:
tests/test_export.py)."""

from __future__ import annotations

import math

import torch

from msode_sdk.integrate import LevelSchedule, get_solver
from msode_sdk.loop import LevelRun, RegistrationLoop, StageRun
from msode_sdk.transforms import BSplineLattice, BSplineTransform, Grid, TransformChain
from msode_sdk.warp import warp_chain

GRID = Grid((32, 32, 24), (4.0, 4.0, 4.0))
CS = (32.0, 32.0, 32.0)


def _blobs(grid: Grid) -> torch.Tensor:
    """A smooth test image in [0, 1] ``(1, 1, D, H, W)``: a few Gaussian blobs of different brightness."""
    pts = grid.points()
    img = torch.zeros(pts.shape[:-1])
    for (cx, cy, cz), r, a in [((-20, 10, 0), 14, 0.9), ((18, -12, 8), 10, 0.6), ((4, 22, -10), 8, 0.35)]:
        d2 = (pts[..., 0] - cx) ** 2 + (pts[..., 1] - cy) ** 2 + (pts[..., 2] - cz) ** 2
        img = img + a * torch.exp(-0.5 * d2 / r**2)
    return img.clamp(0, 1)[None, None]


def _overshooting_stage(coeffs: torch.Tensor, scales) -> StageRun:
    """A one-level B-spline stage whose 'network' is the constant velocity ``coeffs`` over [0, 1] (Euler):
    it ends at exactly ``coeffs``, whatever the images say."""
    sched = LevelSchedule(GRID, get_solver("euler", step_size=0.5), 0.0, 1.0)
    level = LevelRun(sched, 1, lambda warped, fixed, t: coeffs.clone())
    params = {"control_spacing_mm": list(CS)}
    if scales is not None:
        params["scale_search"] = list(scales)
    return StageRun("bspline", "bspline", params, (level,))


def test_scale_search_recovers_the_true_deformation_from_a_stage_that_overshoots():
    lattice = BSplineLattice(GRID, CS)
    g = torch.Generator().manual_seed(0)
    truth = 2.5 * torch.randn((1, *lattice.coeff_shape), generator=g)  # mm
    fixed = _blobs(GRID)
    # moving such that moving o phi_truth ~ fixed: the fixed image pulled back through the inverse map is
    # not available in closed form, so build the pair the other way round: fixed := moving o phi_truth
    moving = fixed
    fixed = warp_chain(moving, GRID, TransformChain([BSplineTransform(truth, lattice)]), GRID)
    for factors, want in (((0.25, 0.5, 1.0), 0.5), ((0.5, 1.0, 2.0), 0.5), ((1.0 / 3.0, 2.0 / 3.0, 1.0), 1.0 / 3.0)):
        overshoot = truth / want  # the stage ends at truth / want: the right factor is `want`
        loop = RegistrationLoop([_overshooting_stage(overshoot, factors)], GRID)
        with torch.inference_mode():
            y, _ = loop.run_stage(0, loop.pyramid(moving, fixed), TransformChain(), 1)
        assert torch.allclose(y, truth, atol=1e-4 * float(truth.abs().max())), (factors, want)
    # without the parameter the stage's own end point stands
    loop = RegistrationLoop([_overshooting_stage(2 * truth, None)], GRID)
    with torch.inference_mode():
        y, _ = loop.run_stage(0, loop.pyramid(moving, fixed), TransformChain(), 1)
    assert torch.allclose(y, 2 * truth)


def test_scale_search_keeps_each_pair_of_a_batch_apart():
    lattice = BSplineLattice(GRID, CS)
    g = torch.Generator().manual_seed(1)
    truth = 2.0 * torch.randn((2, *lattice.coeff_shape), generator=g)
    moving = _blobs(GRID).expand(2, -1, -1, -1, -1).contiguous()
    fixed = warp_chain(moving, GRID, TransformChain([BSplineTransform(truth, lattice)]), GRID)
    # pair 0 overshoots 2x, pair 1 is exact: factors 0.5 and 1.0
    end = torch.stack([2 * truth[0], truth[1]])
    loop = RegistrationLoop([_overshooting_stage(end, (0.5, 1.0))], GRID)
    with torch.inference_mode():
        y, _ = loop.run_stage(0, loop.pyramid(moving, fixed), TransformChain(), 2)
    assert torch.allclose(y, truth, atol=1e-4 * float(truth.abs().max()))
    assert not math.isclose(float(y[0].abs().sum()), float(end[0].abs().sum()))


def test_mutual_information_counts_nonzero_bins_inside_the_mask():
    """MI counts the voxels where either image falls in a non-zero bin (float noise below half a bin in the
    background changes nothing), and with a mask only those inside it: masking a region equals cutting it out."""
    from msode_sdk.initialize import MI_BINS, mutual_information

    a = _blobs(GRID)
    b = torch.roll(a, 2, dims=-1)
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(0)) * (0.4 / (MI_BINS - 1))
    base = mutual_information(a, b)
    torch.testing.assert_close(mutual_information(a + noise * (a == 0), b + noise * (b == 0)), base)
    half = torch.zeros_like(a)
    half[..., : a.shape[-1] // 2] = 1.0
    masked = mutual_information(a, b, mask=half)
    cut = mutual_information(a[..., : a.shape[-1] // 2], b[..., : a.shape[-1] // 2])
    torch.testing.assert_close(masked, cut)
    assert not torch.allclose(masked, base)
    torch.testing.assert_close(mutual_information(a, b, mask=torch.ones_like(a)), base)


def test_similarity_counts_only_voxels_inside_both_fields_of_view():
    """loop.similarity with fields of view: a fixed image blanked outside its own view scores as the
    unblanked pair does over the same view, whatever the moving image holds outside it."""
    from msode_sdk.loop import SCALE_SEARCH_STRIDE, similarity

    moving = _blobs(GRID)
    fov_f = torch.zeros_like(moving)
    fov_f[:, :, 6:18] = 1.0  # a slab of the fixed grid
    fixed = moving * fov_f
    ones = torch.ones_like(moving)
    chain = TransformChain()
    inside = similarity(GRID, chain, moving, fixed, (ones, fov_f))
    k = SCALE_SEARCH_STRIDE
    from msode_sdk.initialize import mutual_information

    sub = (slice(None), slice(None), slice(k // 2, None, k), slice(k // 2, None, k), slice(k // 2, None, k))
    want = mutual_information(moving[sub], moving[sub], mask=fov_f[sub])
    torch.testing.assert_close(inside, want)
    assert float(similarity(GRID, chain, moving, fixed)) < float(inside)  # the blank counted as data
