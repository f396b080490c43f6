"""Plan format 2: per-level feature networks (msode_sdk.loop). The exact mode equals a format-1 plan whose
fields compute the features themselves; feature warping composes exactly for intensities; registrar.ts,
ONNX Runtime and the manifest rules follow."""

import io
import json
import math

import pytest
import torch

from msode_export.analytic import FeatureMap, MINDSSC, RigidSSDField, BSplineSSDField
from msode_export.pack import LevelFeatures, LevelSolver, StageDef, build_plan, level_grids
from msode_export.scripted import build_registrar_ts
from msode_sdk import PlanError, Registrar
from msode_sdk import plan as P
from msode_sdk.transforms import BSplineLattice, Grid, RigidTransform, TransformChain, euler_to_rigid, rigid_matrix
from msode_sdk.warp import warp_chain

GRID = Grid((24, 28, 20), (7.0, 7.0, 7.0))
CS = (28.0, 28.0, 28.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(phantom, theta=(0.1, -0.08, 0.12, 6.0, -5.0, 4.0), contrast="b"):
    """fixed(p) = O_b(R p + t + c) (another contrast), moving(q) = O_a(q + c), on GRID."""
    c = phantom.centre
    p = GRID.points(torch.float64)
    m = rigid_matrix(torch.tensor([list(theta)], dtype=torch.float64))[0]
    fixed = phantom.value(p @ m[:3, :3].T + m[:3, 3] + c, contrast)
    moving = phantom.value(p + c)
    return ((moving / moving.max()).float()[None, None], (fixed / fixed.max()).float()[None, None])


def _mind(spacing):
    return MINDSSC(radius=1, dilation=1, neighbourhood="six")


def _plan(path, with_features: bool, warp=(), pool_last: int = 1, formats=("torchscript",)):
    """Rigid (2 levels, Euler) + B-spline (2 levels) on MIND; format 2 when ``with_features``."""
    grids = level_grids(GRID, 2)
    lattice = BSplineLattice(GRID, CS)
    nets, feats = {}, {}
    for stage in ("rigid", "bspline"):
        for lv, g in enumerate(grids, start=1):
            pool = pool_last if (stage == "rigid" and lv == 2) else 1

            def field(grid, f, pool, stage=stage):
                if stage == "rigid":
                    return RigidSSDField(grid, gain=5.0, features=f, pool=pool)
                return BSplineSSDField(grid, lattice, gain=2.0, features=f, pool=pool, cg_iters=6)

            if with_features:
                fmap = FeatureMap(g, _mind(g.spacing_xyz[0]), pool)
                feats[(stage, lv)] = LevelFeatures(fmap, fmap.grid, warp=f"{stage}_L{lv}" in warp)
                nets[(stage, lv)] = field(fmap.grid, None, 1)
            else:
                nets[(stage, lv)] = field(g, _mind(g.spacing_xyz[0]), pool)
    stages = [
        StageDef("rigid", "rigid", (LevelSolver("euler", 0.2),) * 2),
        StageDef("bspline", "bspline", (LevelSolver("euler", 0.5),) * 2, {"control_spacing_mm": list(CS)}),
    ]
    return build_plan(path, "feat", GRID, stages, nets, formats=formats, features=feats)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat")
    return {
        "v1": _plan(d / "v1.plan", False, pool_last=2),
        "v2": _plan(d / "v2.plan", True, pool_last=2),
        "v2_onnx": _plan(d / "v2o.plan", True, pool_last=2, formats=("torchscript", "onnx")),
    }


def test_format_version_and_manifest(plans):
    assert P.load_plan(plans["v1"]).manifest.format_version == 1
    m = P.load_plan(plans["v2"]).manifest
    assert m.format_version == 2
    sc = m.stages[0].scales[1]
    assert sc.features == {"torchscript": "networks/rigid_L2.features.ts"}
    assert sc.feature_grid == ((12, 14, 10), (14.0, 14.0, 14.0))  # the pooled grid of the 7 mm level
    assert sc.feature_warp is False
    assert "feature network" in P.plan_summary(P.load_plan(plans["v2"]))


def test_exact_mode_equals_the_format_1_plan(plans, phantom):
    """Fixed features once per level, moving features of the warped image every evaluation: the same
    numbers as fields that compute both themselves (what the bundled plan relies on)."""
    moving, fixed = _pair(phantom)
    a = Registrar.load(plans["v1"], device="cpu", backend="torch").register_model_grid(moving, fixed)
    b = Registrar.load(plans["v2"], device="cpu", backend="torch").register_model_grid(moving, fixed)
    for ta, tb in zip(a.chain.transforms, b.chain.transforms):
        torch.testing.assert_close(tb.state, ta.state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.warped, a.warped, rtol=1e-5, atol=1e-5)
    assert [s.nfe for s in a.stages] == [s.nfe for s in b.stages] == [10, 4]
    # and the comparison is not trivial: the rigid stage moved well towards the simulated motion (MIND on
    # these 7 / 14 mm toy grids does not reach sub-voxel accuracy; the bundled plan's report measures that)
    pts = GRID.points().reshape(1, -1, 3)
    truth = TransformChain([RigidTransform(torch.tensor([[0.1, -0.08, 0.12, 6.0, -5.0, 4.0]]))]).map_points(pts)
    err = float(((TransformChain(b.chain.transforms[:1]).map_points(pts) - truth) ** 2).sum(-1).mean().sqrt())
    before = float(((pts - truth) ** 2).sum(-1).mean().sqrt())
    assert err < 0.7 * before, (err, before)


def test_registrar_ts_runs_feature_levels_like_the_sdk(plans, phantom, tmp_path):
    moving, fixed = _pair(phantom)
    warp = _plan(tmp_path / "w.plan", True, warp=("rigid_L1", "rigid_L2", "bspline_L1", "bspline_L2"))
    for path in (plans["v2"], warp):
        ref = Registrar.load(path, device="cpu", backend="torch").register_model_grid(moving, fixed)
        module = torch.jit.load(io.BytesIO(build_registrar_ts(P.load_plan(path))))
        warped, disp, matrix = module(moving, fixed)
        assert float((warped - ref.warped).abs().max()) <= 1e-4
        ref_disp = ref.displacement(GRID) / torch.tensor(GRID.spacing_xyz).view(1, 3, 1, 1, 1)
        assert float((disp - ref_disp).abs().max()) <= 1e-3


def test_onnx_runtime_runs_feature_levels(plans, phantom):
    pytest.importorskip("onnxruntime")
    moving, fixed = _pair(phantom)
    d = {}
    for backend in ("torch", "onnxruntime"):
        reg = Registrar.load(plans["v2_onnx"], device="cpu", backend=backend)
        d[backend] = reg.register_model_grid(moving, fixed).displacement(GRID)
    rms = float(((d["torch"] - d["onnxruntime"]) ** 2).sum(1).mean().sqrt())
    assert rms <= 0.05, rms


def test_feature_warping_composes_exactly_for_intensities(tmp_path, phantom):
    """With intensities as the "features", warping them once per level from the level-start frame gives
    the registration of warping the image at every evaluation, up to the extra interpolation."""
    grids = level_grids(GRID, 2)
    results = {}
    for warp in (False, True):
        nets, feats = {}, {}
        for lv, g in enumerate(grids, start=1):
            fmap = FeatureMap(g, None, 1)
            feats[("rigid", lv)] = LevelFeatures(fmap, g, warp=warp)
            nets[("rigid", lv)] = RigidSSDField(g, gain=5.0)
        path = build_plan(
            tmp_path / f"i{warp}.plan",
            "i",
            GRID,
            [StageDef("rigid", "rigid", (LevelSolver("euler", 0.1),) * 2)],
            nets,
            formats=("torchscript",),
            features=feats,
        )
        assert P.load_plan(path).manifest.stages[0].scales[0].feature_warp is warp
        moving, fixed = _pair(phantom, contrast="a")
        results[warp] = Registrar.load(path, device="cpu", backend="torch").register_model_grid(moving, fixed)
    pts = GRID.points().reshape(1, -1, 3)
    gap = float(
        ((results[True].chain.map_points(pts) - results[False].chain.map_points(pts)) ** 2).sum(-1).mean().sqrt()
    )
    assert gap < 0.1 * GRID.spacing_xyz[0], gap


def test_feature_warping_of_a_rotated_start_uses_the_relative_transform(tmp_path, phantom):
    """Rigid feature warping from a level-start pose M0 must sample moving o M(theta) (via M0^-1 M(theta)),
    not moving o M0 o M(theta): with a 40 deg start the two differ by tens of mm."""
    g = GRID
    fmap = FeatureMap(g, None, 1)
    path = build_plan(
        tmp_path / "r.plan",
        "r",
        g,
        [StageDef("rigid", "rigid", (LevelSolver("euler", 0.5),), {"init": "moments"})],
        {("rigid", 1): RigidSSDField(g, gain=0.0)},
        formats=("torchscript",),
        features={("rigid", 1): LevelFeatures(fmap, g, warp=True)},
    )
    reg = Registrar.load(path, device="cpu", backend="torch")
    from msode_sdk.loop import RegistrationLoop, stage_runs

    loop = RegistrationLoop(stage_runs(reg, reg._select_stages(None)), g)
    moving, fixed = _pair(phantom)
    y0 = euler_to_rigid(torch.tensor([[0.0, 0.0, math.radians(40.0)]]), torch.tensor([[3.0, 0.0, 0.0]]))
    seen = {}
    st, lv = loop.stages[0], loop.stages[0].levels[0]
    net = lv.network

    def spy(warped, fix, t):
        seen["warped"] = warped
        return net(warped, fix, t)

    loop.stages[0] = type(st)(
        st.name,
        st.transform,
        st.params,
        (type(lv)(lv.schedule, lv.level, spy, lv.features, lv.feature_grid, True),),
        "none",
    )
    f = loop._field(loop.stages[0], loop.stages[0].levels[0], y0, moving, fixed, TransformChain())
    y = y0 + torch.tensor([[0.02, -0.01, 0.03, 1.0, -1.0, 0.5]])
    f(0.0, y)
    direct = warp_chain(moving, g, TransformChain([RigidTransform(y)]), g)
    inside = direct.abs() > 0
    err = float((seen["warped"] - direct)[inside].abs().mean())
    assert err < 0.05 * float(direct[inside].abs().mean()), err


# ------------------------------------------------------------------------------------ manifest rules


def _v2_manifest():
    sc = {
        "level": 1,
        "shape_xyz": [4, 4, 4],
        "spacing_xyz_mm": [2.0, 2.0, 2.0],
        "solver": "euler",
        "step_size": 0.5,
        "t0": 0.0,
        "t1": 1.0,
        "networks": {"torchscript": "n.ts"},
        "features": {"torchscript": "f.ts"},
        "feature_grid": {"shape_xyz": [2, 2, 2], "spacing_xyz_mm": [4.0, 4.0, 4.0]},
    }
    members = {k: {"sha256": "0" * 64, "size": 1} for k in ("n.ts", "f.ts", "o.onnx")}
    return {
        "format": "msode-plan",
        "format_version": 2,
        "name": "x",
        "created": "now",
        "model_grid": {
            "shape_xyz": [4, 4, 4],
            "spacing_xyz_mm": [2.0, 2.0, 2.0],
            "orientation": "RAS",
            "centre": "fov",
        },
        "normalization": {"method": "percentile", "low": 1, "high": 99},
        "modalities": [],
        "stages": [{"name": "rigid", "transform": "rigid", "scales": [sc]}],
        "members": members,
    }


def test_manifest_feature_rules():
    m = P.validate_manifest(_v2_manifest())
    assert m.stages[0].scales[0].feature_grid == ((2, 2, 2), (4.0, 4.0, 4.0))
    bad = _v2_manifest()
    bad["stages"][0]["scales"][0]["features"] = {"onnx": "o.onnx"}
    with pytest.raises(PlanError, match=r"scales\[0\]\.features: needs the same formats as the networks"):
        P.validate_manifest(bad)
    bad = _v2_manifest()
    del bad["stages"][0]["scales"][0]["feature_grid"]
    with pytest.raises(PlanError, match="feature_grid"):
        P.validate_manifest(bad)
    bad = _v2_manifest()
    bad["stages"][0]["scales"][0]["feature_warp"] = "yes"
    with pytest.raises(PlanError, match="feature_warp"):
        P.validate_manifest(bad)
    bad = _v2_manifest()
    bad["stages"][0]["scales"][0]["features"] = {"torchscript": "missing.ts"}
    with pytest.raises(PlanError, match="not listed in manifest.members"):
        P.validate_manifest(bad)
    # a format-1 manifest never has feature levels: the key is an unknown (ignored) one there
    v1 = _v2_manifest()
    v1["format_version"] = 1
    assert P.validate_manifest(v1).stages[0].scales[0].features == {}


def test_feature_network_of_the_wrong_grid_is_a_plan_error(tmp_path, phantom):
    g = GRID
    fmap = FeatureMap(g, None, 1)
    path = build_plan(
        tmp_path / "x.plan",
        "x",
        g,
        [StageDef("rigid", "rigid", (LevelSolver("euler", 0.5),))],
        {("rigid", 1): RigidSSDField(g)},
        formats=("torchscript",),
        features={("rigid", 1): LevelFeatures(fmap, g)},
    )
    raw = P.load_plan(path)
    manifest = json.loads(raw.read("manifest.json"))
    manifest["stages"][0]["scales"][0]["feature_grid"]["shape_xyz"] = [12, 14, 10]
    members = {n: raw.read(n) for n in raw.member_names()}
    manifest.pop("members")
    P.write_plan(tmp_path / "y.plan", manifest, members)
    moving, fixed = _pair(phantom)
    with pytest.raises(PlanError, match="feature network .* returned"):
        Registrar.load(tmp_path / "y.plan", device="cpu").register_model_grid(moving, fixed)
