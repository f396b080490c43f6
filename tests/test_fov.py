"""Fields of view (msode_sdk.loop, "Fields of view"): each input's field of view on the model grid, when it
cuts content, and the deformable stages' masking, which keeps a field of view that cuts the anatomy (a slab,
a head larger than the model grid) from driving spurious deformation."""

import numpy as np
import pytest
import torch

from msode_sdk import Registrar
from msode_sdk import world
from msode_sdk.loop import FOV_CONTENT, erode, fov_cuts_content, fov_margin
from msode_sdk.transforms import Grid


def test_fov_is_where_the_sample_had_the_native_voxel_box():
    """A native 20x16x12 image of 3 mm voxels stored with flipped x (LAS) and an offset origin, on a 2 mm
    model grid centred elsewhere: the field of view is 1 exactly at the model voxels whose world position
    lies inside the box spanned by the native voxel centres (none lies on its edge here), where the sample
    mixes in no padding; the resampled image is the same numbers resample_to_grid gives."""
    shape = (20, 16, 12)
    affine = np.diag([-3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [40.0, -21.0, -14.0]
    vol = torch.rand(1, 1, *shape, dtype=torch.float32, generator=torch.Generator().manual_seed(0)) + 1.0
    grid_shape, spacing, centre = [30, 24, 22], [2.0, 2.0, 2.0], torch.tensor([11.1, 0.3, 2.9], dtype=torch.float64)
    aff = torch.from_numpy(affine)
    out, fov = world.resample_to_grid_with_fov(vol, aff, grid_shape, spacing, centre)
    assert torch.equal(out, world.resample_to_grid(vol, aff, grid_shape, spacing, centre))
    coords = [
        (torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0) * s + c
        for n, s, c in zip(grid_shape, spacing, centre.tolist())
    ]
    corners = np.array([affine[:3, :3] @ [i, j, k] + affine[:3, 3] for i in (0, 19) for j in (0, 15) for k in (0, 11)])
    lo, hi = corners.min(0), corners.max(0)
    inside = [((c >= lo[a]) & (c <= hi[a])).double() for a, c in enumerate(coords)]
    want = inside[2][:, None, None] * inside[1][None, :, None] * inside[0][None, None, :]  # (D, H, W) = (z, y, x)
    assert fov.shape == (1, 1, 22, 24, 30) and fov.dtype == torch.float32
    assert 0 < float(want.mean()) < 1
    assert torch.equal(fov[0, 0].double(), want)
    assert float(out[0, 0][want == 1].min()) >= 1.0 - 1e-5  # full support: no padding mixed in (voxels >= 1)
    assert float(out[0, 0][want == 0].min()) == 0.0  # beyond the box, padding


def test_an_image_covering_the_grid_has_a_full_field_of_view():
    """An oblique native image larger than the model grid on every side: every model voxel is inside (the
    corner test's shortcut), as the voxel-wise test says."""
    affine = torch.eye(4, dtype=torch.float64)
    c, s_ = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    affine[:2, :2] = torch.tensor([[c, -s_], [s_, c]], dtype=torch.float64) * 2.0
    affine[2, 2] = 2.0
    shape = (90, 90, 60)
    affine[:3, 3] = -(affine[:3, :3] @ torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64))
    vol = torch.rand(1, 1, *shape)
    out, fov = world.resample_to_grid_with_fov(
        vol, affine, [40, 40, 30], [3.0, 3.0, 3.0], torch.zeros(3, dtype=torch.float64)
    )
    assert torch.equal(fov, torch.ones_like(out))
    _, flat = world.resample_to_grid_with_fov(
        vol, affine, [40, 40, 1], [3.0, 3.0, 3.0], torch.zeros(3, dtype=torch.float64)
    )
    assert flat.shape == (1, 1, 1, 40, 40) and bool((flat == 1).all())  # a grid one voxel thick
    _, part = world.resample_to_grid_with_fov(
        vol, affine, [80, 80, 50], [3.0, 3.0, 3.0], torch.zeros(3, dtype=torch.float64)
    )
    assert 0.3 < float(part.mean()) < 1.0  # a larger grid reaches beyond the image: the voxel-wise test


def test_erode_is_a_box_minimum_with_the_grid_border_outside():
    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[..., 3:13, 4:14, 2:12] = 1.0
    want = torch.zeros_like(mask)
    want[..., 5:11, 6:12, 4:10] = 1.0
    assert torch.equal(erode(mask, 2), want)
    ones = torch.ones(1, 1, 6, 7, 8)
    inner = torch.zeros_like(ones)
    inner[..., 1:5, 1:6, 1:7] = 1.0
    assert torch.equal(erode(ones, 1), inner)  # outside the grid counts as outside the field of view
    assert torch.equal(erode(mask, 0), mask)


def test_a_field_of_view_cuts_content_where_the_image_is_bright_at_its_edge():
    """A bright ball well inside the field of view cuts nothing; the same ball with the field of view ending
    through it does; a faint background (below FOV_CONTENT) at the edge does not count, nor does the model
    grid's own border (a head larger than the grid)."""
    grid = Grid((40, 40, 30), (2.0, 2.0, 2.0))
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (30, 40, 40)), indexing="ij")
    ball = (((x - 20) ** 2 + (y - 20) ** 2 + (z - 15) ** 2) < 8**2).float()[None, None]
    vol = 0.9 * ball + 0.5 * FOV_CONTENT
    fov = torch.ones_like(vol)
    assert fov_margin(grid) == 3
    margin = fov_margin(grid)
    assert not fov_cuts_content(vol, fov, margin)
    slab = fov.clone()
    slab[:, :, 18:] = 0.0  # the field of view ends 3 voxels above the ball's centre
    assert fov_cuts_content(vol * slab, slab, margin)
    shifted = torch.roll(ball, 13, dims=4)  # the ball crosses the grid's own x border
    assert not fov_cuts_content(0.9 * shifted, fov, margin)
    part = fov.clone()
    part[..., 36:] = 0.0  # ... unless the image's field of view ends inside the grid through it
    assert fov_cuts_content(0.9 * shifted * part, part, margin)
    assert torch.equal(erode(fov, 2, 1.0), fov) and not torch.equal(erode(fov, 2), fov)


def _world_errors(res, points, truth, brain):
    """|p + d(p) - truth(p)| over the brain (mm): the displacement file read as ITK/ANTs do (LPS)."""
    d = res.displacement.get_fdata()[..., 0, :] * np.array([-1.0, -1.0, 1.0])
    return np.linalg.norm(points + d - truth, axis=-1)[brain]


@pytest.fixture(scope="module")
def slab_pair(tmp_path_factory):
    """A held-out subject moved by a rigid motion (the paper's distribution scaled to 40 %, a 20-30 degree
    motion), T2 -> T1, the fixed image cut to a slab through the brain (z 20-85 % of the head's grid): the
    pair (moving, fixed as (array, affine)), the fixed voxels' world points, the true moving points, brain."""
    from msode_train import data as D

    subj = D.SubjectBank.for_split(tmp_path_factory.mktemp("bank"), "test", 1, spacing=2.0)[0]
    chain = D.sample_motion(np.random.default_rng(0), "rigid", subj.grid)
    chain.transforms[0].state = chain.transforms[0].state * 0.4
    pair = D.make_pair(subj, "t2", "t1", chain)
    to_np = lambda t: t[0, 0].permute(2, 1, 0).numpy()  # (1,1,D,H,W) -> (X,Y,Z)  # noqa: E731
    aff = np.asarray(subj.affine, dtype=np.float64)
    moving, fixed = to_np(pair.moving), to_np(pair.fixed)
    nz = fixed.shape[2]
    z0, z1 = int(0.2 * nz), int(0.85 * nz)
    aff_slab = aff.copy()
    aff_slab[:3, 3] += aff[:3, 2] * z0
    slab = np.ascontiguousarray(fixed[:, :, z0:z1])
    brain = torch.as_tensor(np.asarray(pair.fixed_brain)).reshape(pair.grid.shape_dhw)
    brain = brain.permute(2, 1, 0).numpy().astype(bool)[:, :, z0:z1]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in slab.shape], indexing="ij"), -1).astype(np.float64)
    points = idx @ aff_slab[:3, :3].T + aff_slab[:3, 3]
    centre = aff[:3, :3] @ ((np.array(fixed.shape) - 1) / 2.0) + aff[:3, 3]  # the motion's frame origin
    with torch.no_grad():
        rel = torch.as_tensor((points - centre)[None], dtype=torch.float32)
        truth = pair.chain.map_points(rel)[0].double().numpy() + centre
    return ((moving, aff), (slab, aff_slab)), points, truth, brain


@pytest.mark.parametrize("plan", ["rigid_bspline.plan", "rigid_dense.plan"])
def test_a_slab_cutting_the_brain_drives_no_spurious_deformation(slab_pair, plan, monkeypatch):
    """Through the whole plan, on a purely rigid motion whose fixed image is a slab: with the masks the
    deformable stage keeps to what the rigid stage found (measured: rigid alone 0.23 / 0.52 mm median / max
    over the slab's brain; B-spline 0.20 / 0.49, dense 0.22 / 0.69); without them it deformed towards the
    slab's edges (0.48 / 6.8 mm, dense 0.41 / 8.7)."""
    import msode_sdk.registrar as registrar_module

    reg = Registrar.load(plan, device="cpu", backend="torch")
    (moving, fixed), points, truth, brain = slab_pair
    res = reg.register(moving, fixed)
    deformable = reg.stage_names[-1]
    fov = res.report()["fields_of_view"]
    assert fov["cut_content"] is True and fov["masked_stages"] == [deformable]
    assert 0.35 < fov["content_ratio"] < 0.9  # the slab holds most of the head's anatomy: no warning
    masked = _world_errors(res, points, truth, brain)
    rigid = _world_errors(reg.register(moving, fixed, stages=["rigid"]), points, truth, brain)
    monkeypatch.setattr(registrar_module, "fov_cuts_content", lambda vol, fov, margin: False)
    unmasked = _world_errors(reg.register(moving, fixed), points, truth, brain)
    assert np.median(rigid) < 0.4 and rigid.max() < 1.0, (np.median(rigid), rigid.max())
    assert np.median(masked) < np.median(rigid) + 0.1 and masked.max() < 1.2, (np.median(masked), masked.max())
    assert unmasked.max() > 3.0, unmasked.max()  # what the masks prevent (the test's own premise)


def test_fields_of_view_that_cut_nothing_change_nothing():
    """Images whose content lies well inside both fields of view: the registration with the masks given is
    the registration without them, to the bit (the plain loop runs, as registrar.ts and CUDA graphs run it)."""
    reg = Registrar.load("rigid_bspline.plan", device="cpu", backend="torch")
    d, h, w = reg.model_grid.shape_dhw
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (d, h, w)), indexing="ij")

    def blob(cx, cy, cz):
        r2 = ((x - cx) / 25) ** 2 + ((y - cy) / 30) ** 2 + ((z - cz) / 20) ** 2
        return (torch.exp(-r2) * (1 + 0.3 * torch.sin(x / 3) * torch.cos(y / 4)))[None, None].clamp(0, 1)

    fixed, moving = blob(w / 2, h / 2, d / 2), blob(w / 2 + 3, h / 2 - 2, d / 2 + 1)
    ones = torch.ones_like(fixed)
    plain = reg.register_model_grid(moving, fixed)
    given = reg.register_model_grid(moving, fixed, fov=(ones, ones))
    for a, b in zip(plain.chain.transforms, given.chain.transforms):
        assert torch.equal(a.state, b.state)
    assert plain.fields_of_view is None  # none given: nothing to say
    assert given.fields_of_view == {"cut_content": False, "masked_stages": []}


def test_registrar_ts_masks_as_the_sdk_does(slab_pair):
    """registrar.ts's register_native (what the C++ library runs) computes the same fields of view, the same
    decision and the same masked loop: on the slab pair its displacement equals Registrar.register's (RMS
    within 0.01 mm, the C++ tests' tolerance), and differs clearly from the unmasked SDK result."""
    import io

    import msode_sdk.registrar as registrar_module
    from msode_sdk.plan import load_plan
    from msode_sdk.registrar import resolve_plan_path

    reg = Registrar.load("rigid_bspline.plan", device="cpu", backend="torch")
    (moving, fixed), points, truth, brain = slab_pair
    plan = load_plan(resolve_plan_path("rigid_bspline.plan"))
    module = torch.jit.load(io.BytesIO(plan.read("registrar.ts")), map_location="cpu")

    def native(image):
        arr, aff = image
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), torch.from_numpy(aff)

    _, disp_ts, _, measures = module.register_native_measured(*native(moving), *native(fixed))
    res = reg.register(moving, fixed)
    sdk = res.displacement.get_fdata()[..., 0, :]
    assert float(measures["content_ratio"]) == pytest.approx(res.report()["fields_of_view"]["content_ratio"], abs=2e-3)
    assert bool(measures["fov_cut"]) and not bool(measures["moving_content_smaller"])
    rms = float(np.sqrt(((disp_ts.numpy() - sdk) ** 2).sum(-1).mean()))
    assert rms <= 0.01, rms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registrar_module, "fov_cuts_content", lambda vol, fov, margin: False)
        unmasked = reg.register(moving, fixed).displacement.get_fdata()[..., 0, :]
    assert float(np.sqrt(((unmasked - sdk) ** 2).sum(-1).mean())) > 10 * rms + 0.05


def test_a_small_field_of_view_is_flagged(slab_pair, caplog):
    """A moving image cropped to a central box a fifth of the head on each axis holds a few % of the fixed
    image's anatomy: the registration says so (a warning naming the moving image, report.json's
    fields_of_view.content_ratio under the threshold); the slab pair (most of the head) gets no warning."""
    import logging

    from msode_sdk.loop import CONTENT_RATIO_WARNING

    reg = Registrar.load("rigid_bspline.plan", device="cpu", backend="torch")
    ((moving, aff), fixed), _, _, _ = slab_pair
    lo = [int(0.4 * n) for n in moving.shape]
    hi = [int(0.6 * n) for n in moving.shape]
    box = np.ascontiguousarray(moving[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    aff_box = aff.copy()
    aff_box[:3, 3] += aff[:3, :3] @ np.asarray(lo, dtype=np.float64)
    with caplog.at_level(logging.WARNING, logger="msode_sdk"):
        res = reg.register((box, aff_box), fixed, stages=["rigid"])
        small = [r.getMessage() for r in caplog.records if "field of view holds" in r.getMessage()]
        caplog.clear()
        reg.register((moving, aff), fixed, stages=["rigid"])
        assert not [r for r in caplog.records if "field of view holds" in r.getMessage()]
    ratio = res.report()["fields_of_view"]["content_ratio"]
    assert ratio < CONTENT_RATIO_WARNING and len(small) == 1 and "the moving image" in small[0], (ratio, small)
