"""End to end through Registrar with the analytic SSD plan: recovery of known motions, world geometry,
outputs read back by SimpleITK, bundled plans, selection errors."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MODEL_GRID, affine_from, render, voxel_world_points
from msode_sdk import BackendUnavailable, InputError, PlanError, Registrar, bundled_plans
from msode_sdk.transforms import BSplineLattice, BSplineTransform, RigidTransform, TransformChain, rigid_matrix

ROT = (0.12, -0.18, 0.22)  # rad, about the phantom centre
TRANS = (7.0, -5.0, 6.0)  # mm


def _world_rigid(c0):
    m = rigid_matrix(torch.tensor([[*ROT, *TRANS]], dtype=torch.float64))[0].numpy()
    w = np.eye(4)
    w[:3, :3] = m[:3, :3]
    w[:3, 3] = m[:3, 3] + c0 - m[:3, :3] @ c0
    return w


def _apply(w, pts):
    return pts @ torch.from_numpy(w[:3, :3].T) + torch.from_numpy(w[:3, 3])


@pytest.fixture(scope="module")
def rigid_case(phantom):
    """Oblique anisotropic fixed, axis-aligned differently sized moving, known world rigid map."""
    truth = _world_rigid(phantom.centre.numpy())
    f_shape, f_aff = (60, 66, 44), affine_from((3.0, 2.8, 3.6), (0.0, 8.0, 20.0), (60, 66, 44), (4.0, -6.0, 2.0))
    m_shape, m_aff = (72, 64, 60), affine_from((2.5, 3.0, 2.4), (0.0, 0.0, 0.0), (72, 64, 60), (10.0, -2.0, 9.0))
    fixed = render(phantom, f_shape, f_aff, lambda p: _apply(truth, p))
    moving = render(phantom, m_shape, m_aff)
    return (moving, m_aff), (fixed, f_aff), truth


@pytest.fixture(scope="module")
def registrar(analytic_plan):
    return Registrar.load(analytic_plan, device="cpu", backend="torch")


def _map_rmse(matrix_or_disp, truth, pts):
    est = _apply(matrix_or_disp, pts) if isinstance(matrix_or_disp, np.ndarray) else matrix_or_disp
    return float(((est - _apply(truth, pts)) ** 2).sum(-1).mean().sqrt())


def _brain_points(phantom, shape, affine):
    pts = voxel_world_points(shape, affine).reshape(-1, 3)
    r = (((pts - phantom.centre) / phantom.radii) ** 2).sum(-1)
    return pts[r < 0.8]


def test_rigid_recovery_world_space(registrar, rigid_case, phantom):
    moving, fixed, truth = rigid_case
    res = registrar.register(moving, fixed, stages=["rigid"])
    pts = _brain_points(phantom, fixed[0].shape, fixed[1])
    before = float(((_apply(truth, pts) - pts) ** 2).sum(-1).mean().sqrt())
    err = _map_rmse(res.matrix, truth, pts)
    assert before > 10.0
    assert err < 0.3 * MODEL_GRID.spacing_xyz[0], (before, err)  # sub-voxel of the 3.5 mm model grid
    # the displacement field agrees with the matrix when there is only a rigid stage
    d = np.asarray(res.displacement.dataobj)[:, :, :, 0, :].astype(np.float64)
    d[..., :2] *= -1  # LPS -> RAS
    p = voxel_world_points(fixed[0].shape, fixed[1]).numpy()
    q = p @ res.matrix[:3, :3].T + res.matrix[:3, 3]
    np.testing.assert_allclose(p + d, q, atol=2e-3)
    assert res.stages[0].nfe > 0 and res.timings["total"] > 0


def test_multimodal_is_not_claimed_by_analytic_plan(registrar):
    assert registrar.plan.manifest.analytic is True


def _bspline_case(phantom, seed=1, std=3.0):
    """Fixed = phantom pulled back through a rigid + B-spline map defined in the fixed model frame."""
    g = torch.Generator().manual_seed(seed)
    lat = BSplineLattice(MODEL_GRID, (21.0, 21.0, 21.0))
    coeffs = torch.randn(1, *lat.coeff_shape, generator=g, dtype=torch.float64) * std
    theta = torch.tensor([[0.05, -0.04, 0.08, 3.0, -2.0, 2.5]], dtype=torch.float64)
    chain = TransformChain([RigidTransform(theta), BSplineTransform(coeffs, lat)])
    shape = MODEL_GRID.shape_xyz
    aff = affine_from(MODEL_GRID.spacing_xyz, (0, 0, 0), shape, phantom.centre.numpy())
    c = torch.from_numpy(aff[:3, :3] @ ((np.asarray(shape) - 1) / 2) + aff[:3, 3])
    # the moving grid is centred on the same point, so model frame = world - c for both images
    world_map = lambda p: chain.map_points((p - c)[None])[0] + c  # noqa: E731
    fixed = render(phantom, shape, aff, world_map)
    moving = render(phantom, shape, aff)
    return (moving, aff), (fixed, aff), chain, c


def test_rigid_bspline_recovery(registrar, phantom):
    moving, fixed, chain, c = _bspline_case(phantom)
    res = registrar.register(moving, fixed)
    pts = _brain_points(phantom, fixed[0].shape, fixed[1])
    truth = chain.map_points((pts - c)[None])[0] + c
    d = np.asarray(res.displacement.dataobj)[:, :, :, 0, :].astype(np.float64).reshape(-1, 3)
    d[:, :2] *= -1
    allp = voxel_world_points(fixed[0].shape, fixed[1]).reshape(-1, 3)
    r = (((allp - phantom.centre) / phantom.radii) ** 2).sum(-1)
    est = allp[r < 0.8] + torch.from_numpy(d[(r < 0.8).numpy()])
    before = float(((truth - pts) ** 2).sum(-1).mean().sqrt())
    err = float(((est - truth) ** 2).sum(-1).mean().sqrt())
    assert err < 0.5 * MODEL_GRID.spacing_xyz[0], (before, err)  # sub-voxel
    assert err < 0.4 * before
    assert set(res.nfe) == {"rigid", "bspline"} and res.nfe["bspline"] == 5 + 5 + 4  # F(.2)-F(.2)-F(.25)


def test_save_outputs_and_simpleitk_reproduces_warped(registrar, rigid_case, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    moving, fixed, _ = rigid_case
    res = registrar.register(moving, fixed)
    files = res.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["warped.nii.gz", "transform.tfm", "displacement.nii.gz", "report.json"]
    )
    report = json.loads(files["report"].read_text())
    assert report["plan"] == registrar.name and report["analytic_plan"] is True
    assert set(report["nfe"]) == {"rigid", "bspline"} and report["backend"] == "torch"
    jac = report["jacobian_determinant"]  # a deformable stage ran: folding is reported
    det = res.model_grid.jacobian_determinant(MODEL_GRID)
    assert "model grid" in jac["domain"] and float(det.min()) == pytest.approx(jac["min"]) and jac["min"] < 1.0
    assert jac["fraction_nonpositive"] == pytest.approx(float((det <= 0).double().mean()))
    assert "jacobian_determinant" not in registrar.register(moving, fixed, stages=["rigid"]).report()
    disp = nib.load(str(files["displacement"]))
    assert disp.shape == fixed[0].shape + (1, 3) and disp.header["intent_code"] == 1007
    warped = nib.load(str(files["warped"]))
    np.testing.assert_allclose(warped.affine, fixed[1], atol=1e-5)
    # the displacement (float noise: incompressible) is a stored gzip stream, the warped image compressed;
    # no time stamp or name in the gzip header: the same result saves to the same bytes
    import gzip

    raw_disp, raw_warped = (files[k].read_bytes() for k in ("displacement", "warped"))
    assert len(raw_disp) >= len(gzip.decompress(raw_disp)) and len(raw_warped) < len(gzip.decompress(raw_warped))
    assert res.save(tmp_path / "again")["displacement"].read_bytes() == raw_disp
    for img in (warped, disp):  # world outputs say their unit (an unknown unit is metres to some tools)
        assert img.header.get_xyzt_units()[0] == "mm"
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1

    mov_path = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(moving[0], moving[1]), str(mov_path))
    fix_path = tmp_path / "fixed.nii.gz"
    nib.save(nib.Nifti1Image(fixed[0], fixed[1]), str(fix_path))
    mov_s, fix_s = sitk.ReadImage(str(mov_path)), sitk.ReadImage(str(fix_path))
    ours = np.asarray(warped.dataobj, dtype=np.float64).ravel()

    # 1) total displacement field as an ITK DisplacementFieldTransform
    field = sitk.ReadImage(str(files["displacement"]), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    out = sitk.Resample(mov_s, fix_s, tx, sitk.sitkLinear, 0.0)
    theirs = sitk.GetArrayFromImage(out).transpose(2, 1, 0).ravel()
    assert np.corrcoef(ours, theirs)[0, 1] > 0.99

    # 2) rigid part as an ITK affine text transform (rigid-only registration: it is the whole map)
    rig = registrar.register(moving, fixed, stages=["rigid"])
    rig.save(tmp_path / "rig")
    tfm = sitk.ReadTransform(str(tmp_path / "rig" / "transform.tfm"))
    out2 = sitk.Resample(mov_s, fix_s, tfm, sitk.sitkLinear, 0.0)
    theirs2 = sitk.GetArrayFromImage(out2).transpose(2, 1, 0).ravel()
    ours2 = np.asarray(rig.warped.dataobj, dtype=np.float64).ravel()
    assert np.corrcoef(ours2, theirs2)[0, 1] > 0.99


def test_itk_affine_file_round_trip(tmp_path):
    from msode_sdk.io import read_itk_affine, write_itk_affine

    m = np.eye(4)
    m[:3, :3] = rigid_matrix(torch.tensor([[0.3, -0.2, 0.1, 0, 0, 0]], dtype=torch.float64))[0, :3, :3].numpy()
    m[:3, 3] = [4.0, -7.0, 2.5]
    write_itk_affine(tmp_path / "t.tfm", m)
    np.testing.assert_allclose(read_itk_affine(tmp_path / "t.tfm"), m, atol=1e-12)
    # LPS in the file: x and y of the translation flip sign
    line = [l for l in (tmp_path / "t.tfm").read_text().splitlines() if l.startswith("Parameters:")][0]
    assert [float(v) for v in line.split()[-3:]] == pytest.approx([-4.0, 7.0, 2.5])


def test_preview_png(registrar, rigid_case, tmp_path):
    pytest.importorskip("matplotlib")
    moving, fixed, _ = rigid_case
    res = registrar.register(moving, fixed, stages=["rigid"])
    files = res.save(tmp_path, preview=True)
    assert files["preview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inputs_as_paths_and_nibabel_images(registrar, rigid_case, tmp_path):
    moving, fixed, _ = rigid_case
    mp = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(moving[0], moving[1]), str(mp))
    a = registrar.register(str(mp), nib.Nifti1Image(fixed[0], fixed[1]), stages=["rigid"])
    b = registrar.register(moving, fixed, stages=["rigid"])
    np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-4)


def test_same_input_same_output_bits(registrar, rigid_case):
    moving, fixed, _ = rigid_case
    a = registrar.register(moving, fixed)
    b = registrar.register(moving, fixed)
    assert np.array_equal(np.asarray(a.warped.dataobj), np.asarray(b.warped.dataobj))
    assert np.array_equal(a.matrix, b.matrix)


def test_stage_selection_errors(registrar, rigid_case):
    moving, fixed, _ = rigid_case
    with pytest.raises(InputError, match="rigid"):
        registrar.register(moving, fixed, stages=["affine"])


def test_model_grid_shape_is_checked(registrar):
    with pytest.raises(InputError, match="model grid"):
        registrar.register_model_grid(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))


def test_bundled_plan_by_name():
    assert "analytic_ssd.plan" in bundled_plans()
    reg = Registrar.load("analytic_ssd", device="cpu")
    assert reg.name == "analytic_ssd" and reg.stage_names == ["rigid", "bspline"]
    with pytest.raises(PlanError, match="bundled"):
        Registrar.load("no_such_plan.plan")


def test_device_and_backend_errors(analytic_plan):
    with pytest.raises(InputError, match="valid"):
        Registrar.load(analytic_plan, backend="tensorflow")
    with pytest.raises(InputError, match="device"):
        Registrar.load(analytic_plan, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            Registrar.load(analytic_plan, device="cuda")


def test_auto_backend_falls_back_when_a_backend_fails_to_load(analytic_plan, monkeypatch, caplog):
    from msode_sdk import registrar as R
    from msode_sdk.backends import BACKENDS, Backend

    class Broken(Backend):
        name = "broken"
        formats = ("torchscript",)

        def _load_impl(self, data, member, plan, kind):
            raise BackendUnavailable(f"cannot build an engine for {member}")

    monkeypatch.setitem(BACKENDS, "broken", Broken)
    monkeypatch.setitem(R._AUTO_ORDER, "cpu", ("broken", "torch"))
    reg = Registrar.load(analytic_plan, device="cpu", backend="auto")
    assert reg.backend.name == "torch"
    assert "broken failed to load" in caplog.text
    with pytest.raises(BackendUnavailable, match="cannot build"):
        Registrar.load(analytic_plan, device="cpu", backend="broken")


@pytest.mark.parametrize("grid_kind", ["aligned_flipped_permuted", "oblique"])
@pytest.mark.parametrize("chain_kind", ["rigid", "bspline", "rigid+bspline", "dense", "rigid+dense", "bspline+rigid"])
def test_world_outputs_match_the_chain_point_by_point(registrar, grid_kind, chain_kind):
    """_to_world's displacement and warped image at every native fixed voxel equal the chain applied to
    that voxel's world point (computed here point by point, float64): the separable aligned path, the
    oblique path (half-spacing B-spline samples) and the generic path of other chains."""
    from msode_sdk import io as sdk_io

    g = torch.Generator().manual_seed(3)
    lat = BSplineLattice(MODEL_GRID, (21.0, 21.0, 21.0))
    rig = RigidTransform(torch.tensor([[0.2, -0.15, 0.3, 4.0, -3.0, 2.0]]))
    bsp = BSplineTransform(torch.randn(1, *lat.coeff_shape, generator=g) * 3.0, lat)
    from msode_sdk.transforms import DenseTransform

    coarse = MODEL_GRID.downsampled(4)
    dense = DenseTransform(torch.randn(1, 3, *coarse.shape_dhw, generator=g) * 2.0, coarse)
    parts = {"rigid": rig, "bspline": bsp, "dense": dense}
    chain = TransformChain([parts[k] for k in chain_kind.split("+")])
    if grid_kind == "oblique":
        f_shape, f_aff = (30, 34, 22), affine_from((6.0, 5.6, 7.2), (10.0, -20.0, 35.0), (30, 34, 22), (3.0, -2.0, 1.0))
    else:  # axes parallel to RAS, permuted and flipped
        f_shape = (22, 30, 34)
        f_aff = np.array([[0.0, -6.0, 0.0, 80.0], [0.0, 0.0, 5.6, -90.0], [7.2, 0.0, 0.0, -70.0], [0, 0, 0, 1.0]])
    m_shape = (40, 44, 36)
    m_aff = affine_from((4.5, 4.0, 4.8), (0.0, 0.0, 15.0), m_shape, (6.0, 4.0, -3.0))
    moving = sdk_io.Image(np.random.default_rng(0).random(m_shape, dtype=np.float32), m_aff, "m")
    fixed = sdk_io.Image(np.zeros(f_shape, dtype=np.float32), f_aff, "f")
    c_m, c_f = np.array([5.0, -3.0, 2.0]), np.array([-1.0, 2.0, 4.0])
    warped, matrix, disp = registrar._to_world(chain, moving, c_m, fixed, c_f)
    # reference: every fixed voxel's world point through the chain, float64 (B-splines by their 64-term sum)
    pts = voxel_world_points(f_shape, f_aff).reshape(-1, 3)  # (P, 3), NIfTI voxel order
    x = (pts - torch.from_numpy(c_f))[None]
    phi = chain.map_points(x.float()).double()[0]
    q = phi + torch.from_numpy(c_m)
    d_ref = (q - pts) * torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    d = torch.from_numpy(np.asarray(disp.dataobj)[:, :, :, 0, :].astype(np.float64))  # (X, Y, Z, 3)
    d = d.reshape(-1, 3)
    tol = 0.05 if (grid_kind == "oblique" and "bspline" in chain_kind) or chain_kind == "bspline+rigid" else 2e-3
    assert float((d - d_ref).abs().max()) <= tol, float((d - d_ref).abs().max())
    # warped = moving sampled at q (trilinear, zeros outside)
    ref = sdk_io.sample_image_at_world(sdk_io.array_to_tensor(moving.array).double(), m_aff, q)[0, 0]
    w = torch.from_numpy(np.asarray(warped.dataobj).astype(np.float64)).reshape(-1)
    assert float((w - ref).abs().max()) <= (0.02 if tol > 2e-3 else 2e-3)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 4099, 300_000])
def test_quantiles_equal_torch_quantile(n):
    """msode_sdk.world.quantiles (tails by topk, the middle by a sort) is torch.quantile's linear
    interpolation on the float64 copy, with ties and at both ends."""
    from msode_sdk.world import quantiles

    g = torch.Generator().manual_seed(n)
    for x in (torch.rand(n, generator=g) * 1000.0, torch.randint(0, 4, (n,), generator=g).float()):
        qs = [0.0, 0.001, 0.005, 0.02, 0.37, 0.5, 0.995, 0.9999, 1.0]
        want = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64)).tolist()
        assert quantiles(x, qs) == pytest.approx(want, rel=1e-15, abs=0.0)


def test_lerp_is_trilinear_sampling_with_border_extension_along_one_axis():
    """The separable world output of a dense field (msode_sdk.world.lerp_rows / lerp_axis0) samples as
    grid_sample with padding_mode="border" does, inside the field's grid, between nodes and beyond both
    ends, and for a grid of one node."""
    from msode_sdk.world import lerp_axis0, lerp_rows

    n, spacing = 7, 2.5
    values = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coords = torch.linspace(-14.0, 14.0, 57, dtype=torch.float64)  # the grid spans +-7.5 mm
    rows = values.reshape(n, 1)
    mine = lerp_axis0(rows, *lerp_rows(rows, coords, n, spacing)).reshape(-1)
    norm = coords / (spacing * (n - 1) / 2.0)  # align_corners=True: the end nodes at -1 and 1
    grid = torch.stack((norm, torch.zeros_like(norm), torch.zeros_like(norm)), dim=-1).reshape(1, 1, 1, -1, 3)
    vol = values.reshape(1, 1, 1, 1, n)
    want = F.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True).reshape(-1)
    torch.testing.assert_close(mine, want, rtol=0, atol=1e-12)
    assert float(mine[0]) == pytest.approx(float(values[0])) and float(mine[-1]) == pytest.approx(float(values[-1]))
    one = values[:1].reshape(1, 1)
    torch.testing.assert_close(lerp_axis0(one, *lerp_rows(one, coords, 1, spacing)), one.expand(len(coords), 1))


@pytest.mark.parametrize("kind", ["dense", "bspline"])
def test_world_outputs_scripted_equal_eager(kind):
    """registrar.ts runs msode_sdk.world.world_outputs compiled by TorchScript: on a native grid parallel to
    the model axes (permuted, flipped: the separable paths) the compiled function computes what the eager
    one does."""
    from msode_sdk import world as W

    g = torch.Generator().manual_seed(5)
    field, fparams, coeffs, bparams = None, [], None, []
    if kind == "dense":
        field, fparams = torch.randn(1, 3, 10, 12, 14, generator=g), [14.0, 12.0, 10.0, 4.0, 4.0, 4.0]
    else:
        coeffs, bparams = torch.randn(1, 3, 6, 7, 8, generator=g), [12.0, 12.0, 12.0, 8.0, 7.0, 6.0]
    fix_aff = torch.tensor(
        [[0.0, -3.0, 0.0, 20.0], [0.0, 0.0, 2.5, -30.0], [3.5, 0.0, 0.0, -10.0], [0, 0, 0, 1.0]], dtype=torch.float64
    )
    mov_aff = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    mov_aff[:3, 3] = -30.0
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = torch.from_numpy(rigid_matrix(torch.tensor([[0.1, -0.05, 0.2, 0, 0, 0]]))[0, :3, :3].numpy())
    matrix[:3, 3] = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    mov = torch.rand(1, 1, 20, 22, 18, generator=g)
    args = (matrix, coeffs, bparams, field, fparams, mov, mov_aff, c, [16, 18, 12], fix_aff, c, [2.0, 2.0, 2.0])
    eager = W.world_outputs(*args)
    scripted = torch.jit.script(W.world_outputs)(*args)
    assert float(eager[1].abs().max()) > 1.0
    for a, b in zip(eager, scripted):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_report_similarity_before_and_after_each_stage(registrar, rigid_case):
    """report.json's similarity: MI between the fixed image and the warped moving one on the model grid,
    'start' (centres aligned) then after each stage. Known answers: 'start' is the MI of the two prepared
    model-grid images themselves at every 3rd voxel (offset 1), computed here directly; registering a
    known rigid motion raises it well above the start; a result without the images reports none."""
    from msode_sdk.initialize import mutual_information
    from msode_sdk.registrar import ModelGridResult

    moving, fixed, _ = rigid_case
    res = registrar.register(moving, fixed)
    sim = res.report()["similarity"]
    assert list(sim) == ["metric", "start", *registrar.stage_names]
    m, f = registrar.prepare(moving, "moving")[2], registrar.prepare(fixed, "fixed")[2]
    want = float(mutual_information(m[:, :, 1::3, 1::3, 1::3], f[:, :, 1::3, 1::3, 1::3])[0])
    assert sim["start"] == pytest.approx(want, rel=1e-3)
    assert sim[registrar.stage_names[0]] > 1.5 * sim["start"], sim
    bare = ModelGridResult(res.model_grid.chain, m, res.stages)
    assert bare.similarity(registrar.model_grid) is None


def test_a_registration_that_lowers_the_similarity_is_flagged(registrar, rigid_case, caplog):
    """A pair registered to itself: no warning (interpolation costs it a little MI); the same result with its
    map replaced by a 15 mm shift: the similarity after the stage is far below the start and a warning says
    so."""
    import dataclasses
    import logging

    from msode_sdk.registrar import ModelGridResult

    _, fixed, _ = rigid_case
    res = registrar.register(fixed, fixed, stages=["rigid"])
    shift = TransformChain([RigidTransform(torch.tensor([[0.0, 0.0, 0.0, 15.0, 0.0, 0.0]]))])
    mg = res.model_grid
    bad = dataclasses.replace(res, model_grid=ModelGridResult(shift, mg.warped, mg.stages, images=mg.images))
    with caplog.at_level(logging.WARNING, logger="msode_sdk"):
        good = res.report()["similarity"]
        assert not any("lowered" in r.getMessage() for r in caplog.records)  # aligned: a tiny loss, no warning
        sim = bad.report()["similarity"]
        again = bad.report()  # computed once per result: the same values, no second warning
        again["similarity"]["rigid"] = -1.0  # and a caller's edit does not reach the next report
    assert sim["rigid"] < 0.9 * sim["start"] and good["rigid"] >= 0.9 * good["start"]
    assert sum("lowered" in r.getMessage() for r in caplog.records) == 1
    assert bad.report()["similarity"] == sim


def test_loading_leaves_a_thread_holding_an_openmp_team(analytic_plan, monkeypatch):
    """Registrar construction runs one parallel op on a long-lived preparation thread, once per process (why:
    msode_sdk.registrar._hold_openmp_team; libgomp's spin-waiting made registrations 2-10x slower on busy
    cores)."""
    import threading

    import msode_sdk.registrar as registrar_module

    ran = []
    monkeypatch.setattr(registrar_module, "_TEAM_HELD", False)
    monkeypatch.setattr(registrar_module, "_team_op", lambda: ran.append(threading.current_thread()))
    Registrar.load(analytic_plan, device="cpu")
    Registrar.load(analytic_plan, device="cpu")
    assert len(ran) == 1 and ran[0].name.startswith("msode-prepare") and ran[0].is_alive()
