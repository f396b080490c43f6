"""The bundled multi-contrast plans ``rigid_bspline.plan`` and ``rigid_dense.plan``: load by name right
after install, say what they are, match the committed encoder weights, their ONNX networks agree with
TorchScript, and they register multi-contrast pairs they have never seen (the sample pair, held-out
phantom subjects)."""

import hashlib
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from msode_sdk import Registrar, bundled_plans
from msode_sdk.transforms import RigidTransform, TransformChain

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


_LOADED: dict = {}


def _load(name: str) -> Registrar:
    if name not in _LOADED:
        _LOADED[name] = Registrar.load(name, device="cpu", backend="torch")
    return _LOADED[name]


@pytest.fixture(scope="module")
def reg():
    return _load("rigid_bspline.plan")


@pytest.fixture(scope="module")
def dense_reg():
    return _load("rigid_dense.plan")


@pytest.fixture(scope="module", params=["rigid_bspline.plan", "rigid_dense.plan", "rigid_bspline_v1.plan"])
def any_reg(request):
    return _load(request.param)


def test_loads_by_name_and_says_what_it_is(reg):
    assert "rigid_bspline.plan" in bundled_plans()
    m = reg.plan.manifest
    assert reg.stage_names == ["rigid", "bspline"]
    assert m.analytic is False and m.kind == "learned-features+gauss-newton"
    assert {"t1", "t2", "flair", "pd"} <= set(m.modalities)
    assert "not the paper's end-to-end trained cnn fields" in m.training["note"].lower()
    assert reg.plan.path and Path(reg.plan.path).stat().st_size <= 25 * 2**20
    # plan v2: B-spline levels fitted to local block solutions; the previous plan ships for comparison
    assert all("local block solutions" in v for k, v in m.training["features"].items() if k.startswith("bspline"))
    assert "rigid_bspline_v1.plan" in bundled_plans()


def test_rigid_dense_loads_by_name_and_says_what_it_is(dense_reg, reg):
    assert "rigid_dense.plan" in bundled_plans()
    m = dense_reg.plan.manifest
    assert dense_reg.stage_names == ["rigid", "dense"]
    assert m.analytic is False and m.kind == "learned-features+gauss-newton"
    assert "densegnfield" in m.training["note"].lower()
    assert "not the paper's end-to-end trained cnn fields" in m.training["note"].lower()
    assert dense_reg.plan.path and Path(dense_reg.plan.path).stat().st_size <= 25 * 2**20
    # the same rigid stage as rigid_bspline.plan: the same ONNX graphs and weights, byte for byte (the
    # TorchScript archives also carry their source text)
    rigid = {s.name: s for s in reg.plan.manifest.stages}["rigid"]
    rigid_d = {s.name: s for s in m.stages}["rigid"]
    assert len(rigid.scales) == len(rigid_d.scales) == 4
    for a, b in zip(rigid.scales, rigid_d.scales):
        assert reg.plan.read(a.networks["onnx"]) == dense_reg.plan.read(b.networks["onnx"])
        assert reg.plan.read(a.features["onnx"]) == dense_reg.plan.read(b.features["onnx"])


def test_plan_embeds_the_committed_encoder_weights(any_reg):
    from msode_train.tissue import DEFAULT_WEIGHTS

    enc = any_reg.plan.manifest.training["tissue_encoder"]
    assert enc["sha256"] == hashlib.sha256(Path(DEFAULT_WEIGHTS).read_bytes()).hexdigest()


def test_onnx_networks_match_torchscript(any_reg):
    """Every level's ONNX feature network and vector field agree with the TorchScript ones (the field fed
    the features of an image and of a shifted copy)."""
    ort = pytest.importorskip("onnxruntime")
    plan = any_reg.plan
    g = torch.Generator().manual_seed(0)

    def onnx_run(member, feeds):
        sess = ort.InferenceSession(plan.read(member), providers=["CPUExecutionProvider"])
        # the exporter drops inputs a network does not use (these fields ignore t)
        return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]

    def close(out, ref, what):
        scale = float(ref.abs().max())
        assert scale > 0
        np.testing.assert_allclose(out, ref.detach().numpy(), atol=2e-3 * scale, rtol=0, err_msg=what)

    for st in plan.manifest.stages:
        for sc in st.scales:
            if min(sc.spacing_xyz_mm) < 4.0:  # the 2 mm levels: same modules, just slower
                continue
            assert sc.features, f"{st.name} L{sc.level}: the bundled plan has a feature network per level"
            shape = (1, 1, *reversed(sc.shape_xyz))
            blob = torch.nn.functional.avg_pool3d(torch.rand(shape, generator=g), 3, 1, 1)
            images = (blob, torch.roll(blob, 1, dims=4))
            fts = torch.jit.load(io.BytesIO(plan.read(sc.features["torchscript"])))
            feats = [fts(x) for x in images]
            for x, ref in zip(images, feats):
                close(onnx_run(sc.features["onnx"], {"image": x.numpy()}), ref, f"{st.name} L{sc.level} features")
            w, f, t = feats[0], feats[1], torch.tensor([float(sc.t0)])
            ref = torch.jit.load(io.BytesIO(plan.network(st.name, sc.level, "torchscript")))(w, f, t)
            out = onnx_run(
                sc.networks["onnx"], {"warped": w.detach().numpy(), "fixed": f.detach().numpy(), "t": t.numpy()}
            )
            close(out, ref, f"{st.name} L{sc.level}")


def test_registers_the_t2_sample_to_t1(reg):
    truth = json.loads((SAMPLE / "truth.json").read_text())
    m_true = np.asarray(truth["fixed_to_moving_world_ras"])
    fixed = nib.load(str(SAMPLE / truth["fixed"]))
    res = reg.register(str(SAMPLE / "moving_t2.nii.gz"), fixed)
    arr = np.asarray(fixed.dataobj, dtype=np.float32)
    idx = np.argwhere(arr > np.percentile(arr, 60)).astype(np.float64)
    pts = idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    est = pts @ res.matrix[:3, :3].T + res.matrix[:3, 3]
    ref = pts @ m_true[:3, :3].T + m_true[:3, 3]
    err = np.sqrt(((est - ref) ** 2).sum(1))
    assert np.median(err) < 1.0, np.median(err)
    assert res.plan_kind == "learned-features+gauss-newton"


@pytest.mark.parametrize("moving,seed", [("t2", 0), ("flair", 0)])
def test_recovers_paper_range_rigid_motion_on_held_out_subject(reg, tmp_path_factory, moving, seed):
    """A held-out (test split) subject, the paper's rigid motion distribution, arrays + affines in,
    through Registrar.register's rigid stage: RMSE(phi) over the brain under the issue's 1.5 mm median
    (measured 0.1-0.2 mm; rigid + B-spline on the same kind of motion: 0.39 mm median on 12 pairs)."""
    from msode_train import data as D

    bank = D.SubjectBank.for_split(tmp_path_factory.mktemp("bank"), "test", 1, spacing=2.0)
    subj = bank[0]
    chain = D.sample_motion(np.random.default_rng(seed), "rigid", subj.grid)
    pair = D.make_pair(subj, moving, "t1", chain)
    aff = subj.affine
    to_np = lambda t: t[0, 0].permute(2, 1, 0).numpy()  # (1,1,D,H,W) -> (X,Y,Z)  # noqa: E731
    res = reg.register((to_np(pair.moving), aff), (to_np(pair.fixed), aff), stages=["rigid"])
    before = D.rmse_phi(
        TransformChain([RigidTransform(torch.zeros(1, 6))]), pair.chain, pair.grid, mask=pair.fixed_brain
    )
    assert before > 10.0
    err = D.rmse_phi(res.model_grid.chain, pair.chain, pair.grid, mask=pair.fixed_brain)
    assert err < 1.5, (moving, err, before)


def test_bspline_stage_leaves_a_purely_rigid_flair_to_t2_motion_nearly_rigid(reg, tmp_path_factory):
    """A held-out FLAIR -> T2 pair moved by a purely rigid motion, through both stages: what the B-spline
    stage adds over its own rigid stage's result stays small. Without the stage's scale search MIND's
    difference between the two contrasts (dark vs bright CSF) added ~0.5 mm of deformation to such pairs
    (this pair: 0.39 mm after the rigid stage, 0.91 through both stages without the search, 0.39 with it)."""
    from msode_train import data as D

    bank = D.SubjectBank.for_split(tmp_path_factory.mktemp("bank"), "test", 1, spacing=2.0)
    subj = bank[0]
    pair = D.make_pair(subj, "flair", "t2", D.sample_motion(np.random.default_rng(3), "rigid", subj.grid))
    to_np = lambda t: t[0, 0].permute(2, 1, 0).numpy()  # (1,1,D,H,W) -> (X,Y,Z)  # noqa: E731
    res = reg.register((to_np(pair.moving), subj.affine), (to_np(pair.fixed), subj.affine))
    chain = res.model_grid.chain
    assert [t.kind for t in chain.transforms] == ["rigid", "bspline"]
    rigid_only = TransformChain(chain.transforms[:1])
    err_rigid = float(D.rmse_phi(rigid_only, pair.chain, pair.grid, mask=pair.fixed_brain))
    err_both = float(D.rmse_phi(chain, pair.chain, pair.grid, mask=pair.fixed_brain))
    assert err_rigid < 1.0 and err_both - err_rigid < 0.2, (err_rigid, err_both)


def test_multistart_captures_a_rotation_whose_coarse_principal_axes_mislead(reg, tmp_path_factory):
    """A FLAIR -> T2 pair rotated 70 deg about an oblique axis (a training subject whose two smaller head
    extents differ by 4 %): the principal axes of its 16 mm averages are tens of degrees off, every start
    of the multistart then ended 27-107 mm from the truth and the rigid stage returned 107 mm; candidates from
    the finest level start 4 mm off and the stage captures it (measured 0.32 mm)."""
    from msode_train import data as D

    subj = D.SubjectBank.for_split(tmp_path_factory.mktemp("bank"), "train", 6, spacing=2.0)[5]
    theta = torch.tensor([[-0.67144, 0.657272, -0.792256, -10.296569, -16.971161, -3.686196]])
    pair = D.make_pair(subj, "flair", "t2", TransformChain([RigidTransform(theta)]))
    to_np = lambda t: t[0, 0].permute(2, 1, 0).numpy()  # (1,1,D,H,W) -> (X,Y,Z)  # noqa: E731
    res = reg.register((to_np(pair.moving), subj.affine), (to_np(pair.fixed), subj.affine), stages=["rigid"])
    err = D.rmse_phi(res.model_grid.chain, pair.chain, pair.grid, mask=pair.fixed_brain)
    assert err < 1.5, err


def test_rigid_dense_recovers_a_hybrid_motion_without_folding(dense_reg, tmp_path_factory):
    """A held-out subject moved by the paper's hybrid motion (rigid 40 deg / 10 mm + B-spline N(0, 8 mm^2)),
    T2 -> T1, through both stages: RMSE(phi) over the brain (measured 0.6 mm on this pair; the 12-pair
    report's median 0.6) well under the identity's, and no fold anywhere on the model grid."""
    from msode_train import data as D
    from msode_train.evaluate import folding_fraction

    bank = D.SubjectBank.for_split(tmp_path_factory.mktemp("bank"), "test", 1, spacing=2.0)
    subj = bank[0]
    chain = D.sample_motion(np.random.default_rng(1), "hybrid", subj.grid)
    pair = D.make_pair(subj, "t2", "t1", chain)
    to_np = lambda t: t[0, 0].permute(2, 1, 0).numpy()  # (1,1,D,H,W) -> (X,Y,Z)  # noqa: E731
    res = dense_reg.register((to_np(pair.moving), subj.affine), (to_np(pair.fixed), subj.affine))
    before = D.rmse_phi(
        TransformChain([RigidTransform(torch.zeros(1, 6))]), pair.chain, pair.grid, mask=pair.fixed_brain
    )
    est = res.model_grid.chain
    err = D.rmse_phi(est, pair.chain, pair.grid, mask=pair.fixed_brain)
    assert before > 5.0 and err < 1.2, (err, before)
    with torch.no_grad():
        pts = est.map_grid(pair.grid, batch=1, dtype=torch.float32, device=torch.device("cpu"))
    assert folding_fraction(pts, pair.grid, torch.ones(pair.grid.shape_dhw)) == 0.0
    assert res.model_grid.folding(res.grid)["fraction_nonpositive"] == 0.0


def test_networks_export_with_torch_export(reg):
    """TorchScript is deprecated upstream (torch >= 2.10): the successor, torch.export, captures every
    feature network and vector field of the bundled plan's coarse levels (the same module classes as the
    fine levels), and the exported programs compute what the TorchScript members compute."""
    from msode_export.analytic import (
        MINDSSC,
        BSplineLKField,
        BSplineSSDField,
        DenseGNField,
        DenseSplineField,
        FeatureMap,
        RigidSSDField,
    )
    from msode_sdk.transforms import BSplineLattice, Grid
    from msode_train.tissue import load_encoders

    encoders, _ = load_encoders()
    g = Grid((30, 30, 20), (8.0, 8.0, 8.0))
    x = torch.nn.functional.avg_pool3d(
        torch.rand(1, 1, *g.shape_dhw, generator=torch.Generator().manual_seed(0)), 3, 1, 1
    )
    lattice = BSplineLattice(Grid((120, 120, 80), (2.0, 2.0, 2.0)), (40.0, 40.0, 40.0))
    for features in (encoders[8.0], MINDSSC(1, 1, "six")):
        fmap = FeatureMap(g, features, 1).eval()
        with torch.no_grad():
            f_ref = fmap(x)
            exported = torch.export.export(fmap, (x,), strict=False).module()
            assert torch.equal(exported(x), f_ref)
            f2 = torch.roll(f_ref, 1, dims=4)
            for head in (
                RigidSSDField(g, features=None),
                BSplineSSDField(g, lattice, features=None, cg_iters=4),
                DenseGNField(g, block_mm=16.0, window_blocks=1.5, features=None),
                BSplineLKField(g, lattice, block_mm=16.0, window_blocks=2.0, features=None),
                DenseSplineField(g, lattice, block_mm=16.0, window_blocks=2.0, features=None),
            ):
                head = head.eval()
                args = (f_ref, f2, torch.zeros(1))
                out = torch.export.export(head, args, strict=False).module()(*args)
                torch.testing.assert_close(out, head(*args), rtol=1e-6, atol=1e-6 * float(head(*args).abs().max()))


def _bumps(grid, centres_mm, peaks_mm, sigma_mm: float):
    """A dense displacement ``(1, 3, D, H, W)`` mm: Gaussian bumps of ``sigma_mm`` with peak vectors
    ``peaks_mm`` at ``centres_mm`` (model-frame mm), and the voxels within 1.5 sigma of a centre."""
    pts = grid.points(torch.float32, torch.device("cpu"))
    disp = torch.zeros_like(pts)
    near = torch.zeros(pts.shape[:3], dtype=torch.bool)
    for c, p in zip(centres_mm, peaks_mm):
        r2 = ((pts - torch.tensor(c)) ** 2).sum(-1)
        disp += torch.exp(-0.5 * r2 / sigma_mm**2)[..., None] * torch.tensor(p)
        near |= r2 < (1.5 * sigma_mm) ** 2
    return disp.permute(3, 0, 1, 2)[None].contiguous(), near


def test_rigid_dense_recovers_local_deformation_finer_than_the_bspline_lattice(dense_reg, reg, tmp_path_factory):
    """Free-form: a held-out T2 -> T1 pair deformed by four Gaussian bumps (sigma 8 mm, 4 mm peaks), finer
    than rigid_bspline.plan's 40 mm lattice can represent. Inside the bumps (within 1.5 sigma, brain)
    rigid_dense.plan's error is well under the identity's and clearly under rigid_bspline.plan's; no fold
    (measured RMSE(phi) there: identity 2.23 mm, dense 1.25 (the build before 2026-12-05: 1.43), B-spline
    1.85; over the whole brain dense 0.50)."""
    from msode_sdk.transforms import DenseTransform
    from msode_train import data as D

    subj = D.SubjectBank.for_split(tmp_path_factory.mktemp("bank"), "test", 1, spacing=2.0)[0]
    centres = [(-30.0, 20.0, 10.0), (25.0, -25.0, -10.0), (10.0, 30.0, 15.0), (-20.0, -15.0, -15.0)]
    peaks = [(4.0, 0.0, 0.0), (0.0, -4.0, 0.0), (2.3, 2.3, 2.3), (-2.8, 0.0, 2.8)]
    disp, near = _bumps(subj.grid, centres, peaks, 8.0)
    pair = D.make_pair(subj, "t2", "t1", TransformChain([DenseTransform(disp, subj.grid)]))
    region = near & pair.fixed_brain[0, 0]
    to_np = lambda t: t[0, 0].permute(2, 1, 0).numpy()  # (1,1,D,H,W) -> (X,Y,Z)  # noqa: E731
    moving, fixed = (to_np(pair.moving), subj.affine), (to_np(pair.fixed), subj.affine)
    identity = TransformChain([RigidTransform(torch.zeros(1, 6))])
    err = {"identity": float(D.rmse_phi(identity, pair.chain, pair.grid, mask=region))}
    for name, r in (("dense", dense_reg), ("bspline", reg)):
        res = r.register(moving, fixed)
        err[name] = float(D.rmse_phi(res.model_grid.chain, pair.chain, pair.grid, mask=region))
        if name == "dense":
            assert res.model_grid.folding(res.grid)["fraction_nonpositive"] == 0.0
    assert err["dense"] < 0.7 * err["identity"] and err["dense"] < err["bspline"] - 0.3, err
