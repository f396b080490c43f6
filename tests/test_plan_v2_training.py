"""Plan v2's B-spline stage trained through the loop (issue 20): the trainable field (plan v2's local-block
B-spline fit on MIND + learned channels), the frozen prior plan in front of it, motion mixtures, the loss
plot and the plan builder's reading of the trained checkpoint."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from msode_export.analytic import CPU_SLAB_VOXELS, MINDSSC, BSplineLKField, DenseGNField, build_analytic_plan
from msode_export.checkpoint import save_checkpoint
from msode_export.pack import level_grids
from msode_sdk.transforms import BSplineLattice, Grid
from msode_train.models import MINDGains, MINDPlusLearned, build_network, per_level
from msode_train.odenet import MSODENet, TrainStage
from msode_train.plots import write_loss_plot
from msode_train.train import Trainer, load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = Grid((16, 16, 12), (4.0, 4.0, 4.0))


def _smooth_pair(grid: Grid, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blur = lambda v: torch.nn.functional.avg_pool3d(v, 3, 1, 1)  # noqa: E731
    a = blur(torch.rand(1, 1, *grid.shape_dhw, generator=g))
    b = blur(torch.rand(1, 1, *grid.shape_dhw, generator=g))
    return a, b


@pytest.mark.parametrize("kind", ["dense", "bspline"])
@pytest.mark.parametrize("pool", [1, 2])
def test_field_on_precomputed_features_equals_forward(kind, pool):
    """Training computes the fixed image's features once per level (``field_on_features``), as a plan's
    feature members do at inference: the same numbers as the field's own forward."""
    torch.manual_seed(0)
    feats = MINDPlusLearned(width=4, channels=2, mind_dilation=1, init_scale=0.5)
    kw = dict(gain=2.0, block_mm=8.0 * pool, window_blocks=1.0, damping=0.05, features=feats, pool=pool)
    if kind == "dense":
        field = DenseGNField(SMALL, **kw)
    else:
        field = BSplineLKField(SMALL, BSplineLattice(SMALL, (20.0, 20.0, 20.0)), **kw)
    w, f = _smooth_pair(SMALL)
    t = torch.zeros(1)
    ref = field(w, f, t)
    got = field.field_on_features(field.image_features(w), field.image_features(f), list(SMALL.shape_dhw))
    assert float(ref.detach().abs().max()) > 1e-4  # a non-trivial step
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_mind_plus_learned_starts_as_mind_and_its_learned_channels_get_gradients():
    """With its learned maps switched off the feature network is MIND (6-neighbourhood) exactly, so the B-spline
    field equals plan v2's field on MIND; at the (small, non-zero) initial scale both the maps' weights and the
    MIND gains receive gradients of a loss on the field's output."""
    torch.manual_seed(1)
    lat = BSplineLattice(SMALL, (20.0, 20.0, 20.0))
    feats = MINDPlusLearned(width=4, channels=2, mind_dilation=1)
    w, f = _smooth_pair(SMALL, seed=2)
    trained = BSplineLKField(SMALL, lat, block_mm=8.0, window_blocks=1.0, features=feats)
    mind_only = BSplineLKField(SMALL, lat, block_mm=8.0, window_blocks=1.0, features=MINDSSC(1, 1, "six"))
    t = torch.zeros(1)
    out = trained(w, f, t)
    out.square().sum().backward()
    assert float(feats.out.weight.grad.abs().max()) > 0 and float(feats.mind_gain.grad.abs().max()) > 0
    with torch.no_grad():
        feats.out.weight.zero_()
        x = feats(w)
        assert x.shape[1] == 8
        torch.testing.assert_close(x[:, :6], MINDSSC(1, 1, "six")(w))
        assert float(x[:, 6:].abs().max()) == 0.0
        ref = mind_only(w, f, t)
        torch.testing.assert_close(trained(w, f, t), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_mind_gains_start_as_mind_and_learn():
    torch.manual_seed(2)
    feats = MINDGains(mind_dilation=1)
    w, _ = _smooth_pair(SMALL, seed=3)
    x = feats(w)
    torch.testing.assert_close(x, MINDSSC(1, 1, "six")(w))
    x.square().sum().backward()
    assert float(feats.mind_gain.grad.abs().min()) > 0


def test_per_level_values_count_from_the_model_grid():
    model = Grid((120, 120, 80), (2.0, 2.0, 2.0))
    grids = level_grids(model, 3)  # 8, 4, 2 mm
    assert [per_level([3.0, 3.0, 5.0], g, model) for g in grids] == [3.0, 3.0, 5.0]
    assert [per_level(0.05, g, model) for g in grids] == [0.05] * 3
    with pytest.raises(ValueError, match="no entry"):
        per_level([1.0, 2.0], grids[0], model)


def test_bspline_lk_architecture_builds_per_level_fields():
    model = Grid((120, 120, 80), (2.0, 2.0, 2.0))
    kw = dict(width=[4, 2, 4], channels=[2, 1, 0], block_mm=16.0, window_blocks=[2.0, 1.5, 0.75], gain=[3.0, 3.0, 5.0])
    nets = [
        build_network("bspline_lk_mind_learned", g, model, {"control_spacing_mm": [40.0] * 3}, **kw)
        for g in level_grids(model, 3)
    ]
    assert [n.gain for n in nets] == [3.0, 3.0, 5.0]
    assert [n.residual.features.mind.dilation for n in nets] == [1, 1, 2]  # as the plan's MIND
    assert [n.block for n in nets] == [2, 4, 8]  # 16 mm blocks on 8 / 4 / 2 mm levels
    feats = [n.residual.features for n in nets]
    assert [type(f) for f in feats] == [MINDPlusLearned, MINDPlusLearned, MINDGains]  # channels 0: no CNN
    assert [f.width for f in feats[:2]] == [4, 2] and [f.out.out_channels for f in feats[:2]] == [2, 1]
    with pytest.raises(ValueError, match="channels"):
        build_network("bspline_lk_mind_learned", model, model, {"control_spacing_mm": [40.0] * 3}, channels=-1)


# ------------------------------------------------------------------------------------------- trainer


def _prior_cfg(tmp_path, prior_plan, **model_over):
    cfg = {
        "name": "tiny_v2",
        "model": {
            "spacing_mm": 16.0,
            "levels": 1,
            "prior_plan": str(prior_plan),
            "prior_stages": ["rigid"],
            **model_over,
        },
        "stages": [
            {
                "name": "bspline",
                "transform": "bspline",
                "arch": "bspline_lk_mind_learned",
                "arch_kwargs": {"width": 4, "channels": 2, "block_mm": 16.0, "window_blocks": 1.0, "init_scale": 0.2},
                "params": {"control_spacing_mm": [80.0, 80.0, 80.0]},
                "schedule": [{"solver": "euler", "step_size": 0.5}],
            }
        ],
        "data": {
            "bank_dir": str(tmp_path.parent / "bank16"),
            "n_train": 2,
            "n_val": 1,
            "pairs": [["t2", "t1"]],
            "motion": ["hybrid", "rigid"],
            "motion_kwargs": {"max_rot_deg": 10.0, "max_trans_mm": 10.0},
            "control_spacing_mm": 80.0,
        },
        "loss": {"sim": "mi", "lambda_sim": 0.1, "lambda_self": 0.0, "lambda_sup": 1.0, "self_points": 512},
        "train": {
            "steps": 2,
            "lr": 1e-3,
            "out_dir": str(tmp_path / "run"),
            "progress": False,
            "device": "cpu",
            "val_every": 1,
            "val_pairs": 1,
            "checkpoint_every": 1,
        },
        "export": {"plan": False},
    }
    return load_config(cfg)


@pytest.fixture(scope="module")
def rigid_prior_plan(tmp_path_factory):
    """A rigid-only plan on the tiny trainer's model grid (16 mm, the default field of view)."""
    from msode_train.train import model_grid_of

    grid = model_grid_of(load_config({"model": {"spacing_mm": 16.0}}))
    path = tmp_path_factory.mktemp("prior") / "rigid16.plan"
    build_analytic_plan(path, grid, stages=("rigid",), formats=("torchscript",), features="mind")
    return path


def test_trainer_runs_the_prior_plan_frozen_and_trains_the_stage_behind_it(tmp_path, rigid_prior_plan):
    tr = Trainer(_prior_cfg(tmp_path, rigid_prior_plan), resume=False)
    assert tr.prior_stages == ["rigid"]
    batch = tr.sample_batch()
    b = tr._collate(batch["pairs"])
    prior = tr.prior_chain(b["moving"], b["fixed"])
    assert [t.kind for t in prior.transforms] == ["rigid"] and not prior.transforms[0].state.requires_grad
    expect = tr.prior_registrar.register_model_grid(b["moving"], b["fixed"], stages=["rigid"]).chain
    torch.testing.assert_close(prior.transforms[0].state, expect.transforms[0].state)
    terms = tr.compute_losses(batch)
    terms["loss"].backward()
    feats = tr.model.network("bspline", 1).residual.features
    assert float(feats.out.weight.grad.abs().max()) > 0  # the loss reaches the learned maps through the loop
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    assert tr.step == 2
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert (tr.out_dir / "loss.png").exists() and (tr.out_dir / "val_log.csv").exists()
    out = tr.model(b["moving"], b["fixed"], prior=prior)
    assert [t.kind for t in out.chain.transforms] == ["rigid", "bspline"]


def test_prior_plan_errors_name_the_problem(tmp_path, rigid_prior_plan):
    with pytest.raises(ValueError, match="not in"):
        Trainer(_prior_cfg(tmp_path, rigid_prior_plan, prior_stages=["affine"]), resume=False)
    with pytest.raises(ValueError, match="export.plan: false"):
        load_config({"model": {"prior_plan": str(rigid_prior_plan)}, "export": {"plan": True}})
    with pytest.raises(ValueError, match="model grid"):
        Trainer(_prior_cfg(tmp_path, rigid_prior_plan, spacing_mm=20.0), resume=False)


def test_motion_mixtures_draw_every_kind_and_unknown_kinds_are_refused(tmp_path, rigid_prior_plan):
    tr = Trainer(_prior_cfg(tmp_path, rigid_prior_plan), resume=False)
    kinds = {tuple(t.kind for t in tr._motion().transforms) for _ in range(30)}
    assert kinds == {("rigid", "bspline"), ("rigid",)}
    with pytest.raises(ValueError, match="warp"):
        load_config({"data": {"motion": ["hybrid", "warp"]}})


def test_bundled_plan_v2_configs_load():
    for name in ("plan_v2_bspline", "plan_v2_bspline_gpu", "plan_v2_dense", "plan_v2_dense_gpu"):
        cfg = load_config(name)
        assert cfg["model"]["prior_plan"] and cfg["model"]["prior_stages"] == ["rigid"]
        st = cfg["stages"][0]
        assert st["arch"] == f"{st['transform']}_lk_mind_learned" and st.get("train", True)
        assert cfg["model"]["prior_plan"] == f"rigid_{st['transform']}.plan"
        # the schedule is plan v2's (NFE 14): training is what runs at inference
        assert [s["step_size"] for s in st["schedule"]] == [0.2, 0.2, 0.25]


def test_plan_v2_configs_start_from_the_shipped_bspline_fields():
    """Training starts from the shipped plan: the configs' field settings and scale search are the
    builder's (they had stayed at the second build's after the third changed four of them)."""
    b = _builder()
    for name in ("plan_v2_bspline", "plan_v2_bspline_gpu"):
        st = load_config(name)["stages"][0]
        kw = st["arch_kwargs"]
        for key, shipped in b.BSPLINE_LK.items():
            assert key in kw, (name, key)
            want = list(shipped) if isinstance(shipped, tuple) else [shipped] * 3
            got = list(kw[key]) if isinstance(kw[key], list) else [kw[key]] * 3
            assert [float(v) for v in got] == [float(v) for v in want], (name, key, got, want)
        assert [float(v) for v in st["params"]["scale_search"]] == list(b.SCALE_SEARCH)
        assert [float(v) for v in st["params"]["control_spacing_mm"]] == list(b.CONTROL_SPACING_MM)
    d = _dense_builder()
    for name in ("plan_v2_dense", "plan_v2_dense_gpu"):
        st = load_config(name)["stages"][0]
        kw = st["arch_kwargs"]
        for key, shipped in d.DENSE_FIELD.items():
            want = list(shipped) if isinstance(shipped, tuple) else [shipped] * 3
            got = list(kw[key]) if isinstance(kw[key], list) else [kw[key]] * 3
            assert got == want, (name, key, got, want)
        assert [float(v) for v in st["params"]["scale_search"]] == list(b.SCALE_SEARCH)
        assert float(kw["spline_spacing_mm"]) == b.CONTROL_SPACING_MM[0]


# ------------------------------------------------------------------------------------------- loss plot


def test_loss_plot_from_the_logs(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_loss_plot(tmp_path) is None  # nothing logged yet
    with open(tmp_path / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "rmse_phi_mm"])
        w.writeheader()
        for i in range(1, 41):
            w.writerow({"step": i, "loss": 1.0 / i, "rmse_phi_mm": 2.0 / i})
    with open(tmp_path / "val_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "val_rmse_phi_median", "val_rmse_phi_max"])
        w.writeheader()
        w.writerow({"step": 20, "val_rmse_phi_median": 0.5, "val_rmse_phi_max": 0.9})
    path = write_loss_plot(tmp_path, "run")
    assert path == tmp_path / "loss.png" and path.stat().st_size > 5000


# ------------------------------------------------------------------------------------------- plan builder


def _builder():
    spec = importlib.util.spec_from_file_location(
        "build_rigid_bspline_plan", ROOT / "scripts" / "build_rigid_bspline_plan.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dense_builder():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))  # it imports build_rigid_bspline_plan by name
    try:
        spec = importlib.util.spec_from_file_location(
            "build_rigid_dense_plan", ROOT / "scripts" / "build_rigid_dense_plan.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return mod


def _save_stage(path, arch_name, kwargs, control=(40.0, 40.0, 40.0), kind="bspline"):
    b = _builder()
    model = b.MODEL_GRID
    params = {"control_spacing_mm": list(control)} if kind == "bspline" else {}
    stage = TrainStage(kind, kind, b.BSPLINE_SCHEDULE, params, arch_name, kwargs)
    net = MSODENet(model, [stage])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(
        path,
        stage=stage.to_dict(),
        model_grid={"shape_xyz": list(model.shape_xyz), "spacing_xyz_mm": list(model.spacing_xyz), "centre": "fov"},
        arch={"name": arch_name, "kwargs": kwargs},
        state_dicts={lv: net.network(kind, lv).state_dict() for lv in range(1, 4)},
        training={
            "kind": "msode_train",
            "steps": 7,
            "config": {"name": f"plan_v2_{kind}", "loss": {"lambda_sup": 1.0}},
        },
        normalization={"method": "percentile", "low": 0.5, "high": 99.5},
        modalities=["t1", "t2"],
        metrics={},
    )
    return net


def test_builder_reads_the_trained_bspline_checkpoint(tmp_path):
    b = _builder()
    kw = {
        "width": 4,
        "channels": 2,
        "block_mm": 16.0,
        "window_blocks": [2.0, 1.5, 0.75],
        "damping": 0.05,
        "gain": [3.0, 3.0, 5.0],
    }
    net = _save_stage(tmp_path / "bspline.ckpt", "bspline_lk_mind_learned", kw)
    feats, kwargs, record = b.trained_levels(tmp_path / "bspline.ckpt", "bspline")
    assert [kwargs[lv]["gain"] for lv in (1, 2, 3)] == [3.0, 3.0, 5.0]
    assert [kwargs[lv]["window_blocks"] for lv in (1, 2, 3)] == [2.0, 1.5, 0.75]
    for lv in (1, 2, 3):
        trained = net.network("bspline", lv).residual.features.state_dict()
        for k, v in feats[lv].state_dict().items():
            torch.testing.assert_close(v, trained[k])
        assert feats[lv].mind.slab_voxels == CPU_SLAB_VOXELS  # inference slabs again
    assert record["steps"] == 7 and record["config"] == "plan_v2_bspline" and len(record["sha256"]) == 64
    _save_stage(tmp_path / "other.ckpt", "bspline_lk_mind_learned", kw, control=(20.0, 20.0, 20.0))
    with pytest.raises(ValueError, match="control spacing"):
        b.trained_levels(tmp_path / "other.ckpt", "bspline")


def _plan_equals_training_model(reg, ckpt, kind: str, arch_kwargs: dict) -> None:
    """The plan's deformable stage (behind its own rigid stage) through ``Registrar`` equals ``MSODENet``
    with the checkpoint's networks, on one shifted smooth random pair; the plan's stage parameters (the scale
    search included: training runs it as the SDK loop does) are the builder's."""
    from msode_export.checkpoint import build_networks, load_checkpoint

    b = _builder()
    model = b.MODEL_GRID
    g = torch.Generator().manual_seed(11)
    blur = lambda v: torch.nn.functional.avg_pool3d(v, 5, 1, 2)  # noqa: E731
    fixed = blur(torch.rand(1, 1, *model.shape_dhw, generator=g))
    moving = torch.roll(fixed, shifts=(2, -1, 3), dims=(2, 3, 4))  # a shifted copy: a non-trivial problem
    res = reg.register_model_grid(moving, fixed)
    params = dict(reg.plan.manifest.stages[1].params)
    assert params["scale_search"] == list(b.SCALE_SEARCH)
    stage = TrainStage(kind, kind, b.BSPLINE_SCHEDULE, params, f"{kind}_lk_mind_learned", arch_kwargs)
    net = MSODENet(model, [stage])
    for lv, trained in build_networks(load_checkpoint(ckpt)).items():
        net.nets[f"{kind}_L{lv}"] = trained
    rigid = reg.register_model_grid(moving, fixed, stages=["rigid"]).chain
    with torch.no_grad():
        out = net(moving, fixed, prior=rigid)
    want, got = out.states[kind], res.chain.transforms[1].state
    assert float(want.abs().max()) > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_plan_built_from_a_trained_checkpoint_equals_the_trained_model(tmp_path):
    """The bundled plan's structure with trained B-spline features (the builder's ``--bspline-checkpoint``)
    computes what the training model computes: the B-spline stage behind the plan's own rigid stage, through
    ``MSODENet`` (training) and through ``Registrar`` (the plan's TorchScript members), on one pair."""
    from msode_sdk import Registrar

    b = _builder()
    kw = {
        "width": 4,
        "channels": [2, 2, 0],  # as the shipped config: the finest level without learned maps
        "block_mm": 16.0,
        "window_blocks": [2.0, 1.5, 0.75],
        "gain": [3.0, 3.0, 5.0],
    }
    _save_stage(tmp_path / "bspline.ckpt", "bspline_lk_mind_learned", kw)
    plan = b.build(
        tmp_path / "trained.plan",
        bspline_checkpoint=tmp_path / "bspline.ckpt",
        registrar_ts=False,
        formats=("torchscript",),
        name="trained",
    )
    reg = Registrar.load(plan, device="cpu", backend="torch")
    training = reg.plan.manifest.training
    assert "trained through the loop" in training["kind"] and "trained" in training["note"]
    assert "trained through the loop" in reg.plan.manifest.description
    _plan_equals_training_model(reg, tmp_path / "bspline.ckpt", "bspline", kw)


DENSE_KW = {
    "width": 4,
    "channels": [2, 2, 0],
    "spline_fit": [True, True, False],
    "block_mm": [16.0, 16.0, 8.0],
    "window_blocks": [2.0, 1.0, 1.5],
    "gain": [3.0, 3.0, 5.0],
    "mind_dilation": [1, 1, 2],
}


def test_builder_reads_the_trained_dense_checkpoint(tmp_path):
    """The dense stage trained through the loop (architecture dense_lk_mind_learned): per level the trained
    features, the field class and settings as trained; another lattice or architecture is refused."""
    from msode_export.analytic import DenseGNField, DenseSplineField
    from msode_export.checkpoint import build_networks, load_checkpoint

    b = _builder()
    net = _save_stage(tmp_path / "dense.ckpt", "dense_lk_mind_learned", DENSE_KW, kind="dense")
    feats, kwargs, record = b.trained_levels(tmp_path / "dense.ckpt", "dense")
    assert [kwargs[lv]["spline_fit"] for lv in (1, 2, 3)] == [True, True, False]
    assert [kwargs[lv]["block_mm"] for lv in (1, 2, 3)] == [16.0, 16.0, 8.0]
    fields = build_networks(load_checkpoint(tmp_path / "dense.ckpt"))
    assert [type(fields[lv]) for lv in (1, 2, 3)] == [DenseSplineField, DenseSplineField, DenseGNField]
    for lv in (1, 2, 3):
        trained = net.network("dense", lv).residual.features.state_dict()
        for k, v in feats[lv].state_dict().items():
            torch.testing.assert_close(v, trained[k])
    assert record["config"] == "plan_v2_dense" and len(record["sha256"]) == 64
    with pytest.raises(ValueError, match="architecture"):
        b.trained_levels(tmp_path / "dense.ckpt", "bspline")
    _save_stage(tmp_path / "other.ckpt", "dense_lk_mind_learned", {**DENSE_KW, "spline_spacing_mm": 20.0}, kind="dense")
    with pytest.raises(ValueError, match="control spacing"):
        b.trained_levels(tmp_path / "other.ckpt", "dense")


def test_rigid_dense_plan_built_from_a_trained_checkpoint_equals_the_trained_model(tmp_path):
    """rigid_dense.plan's structure with trained dense features (``--dense-checkpoint``) computes what the
    training model computes: the dense stage behind the plan's rigid stage, through ``MSODENet`` and through
    ``Registrar`` (the plan's TorchScript members), on one pair; the manifest says what was trained."""
    from msode_sdk import Registrar

    d = _dense_builder()
    _save_stage(tmp_path / "dense.ckpt", "dense_lk_mind_learned", DENSE_KW, kind="dense")
    plan = d.build_rigid_dense(
        tmp_path / "trained.plan",
        dense_checkpoint=tmp_path / "dense.ckpt",
        name="trained",
        registrar_ts=False,
        formats=("torchscript",),
    )
    reg = Registrar.load(plan, device="cpu", backend="torch")
    m = reg.plan.manifest
    assert "dense features trained through the loop" in m.training["kind"] and "dense_trained" in m.training
    assert "trained through the loop" in m.description and "Closed-form: the Gauss-Newton heads" in m.training["note"]
    _plan_equals_training_model(reg, tmp_path / "dense.ckpt", "dense", DENSE_KW)
