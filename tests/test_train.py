"""Training side of MS-ODENet: networks, losses, the ODE forward vs the SDK, training, resume, export, CLI.

Everything runs on tiny grids (16 mm model grid of the 240x240x160 mm field of view: 15x15x10) so the
default run stays well under a minute and a half on two shared cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import Phantom
from msode_export.pack import LevelSolver, PAPER_SCHEDULES, build_plan, export_onnx, export_torchscript, level_grids
from msode_sdk import Registrar
from msode_sdk.transforms import BSplineLattice, Grid, RigidTransform, TransformChain
from msode_train import losses as L
from msode_train.models import ARCHITECTURES, RigidNet, build_network
from msode_train.odenet import MSODENet, TrainStage
from msode_train.train import Trainer, learning_rate, load_config

GRID = Grid((24, 24, 16), (8.0, 8.0, 8.0))
BS_PARAMS = {"control_spacing_mm": [40.0, 40.0, 40.0]}


def _randomise_heads(model: torch.nn.Module, std: float = 0.02, seed: int = 0):
    """Give zero-initialised output layers random weights (a non-trivial flow)."""
    g = torch.Generator().manual_seed(seed)
    for net in model.nets.values():
        with torch.no_grad():
            net.out.weight.copy_(torch.randn(net.out.weight.shape, generator=g) * std)
            net.out.bias.copy_(torch.randn(net.out.bias.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------- networks


# the CNN fields start from the zero flow; the learned-feature Gauss-Newton fields (``*_feature_gn``) start
# from a Gauss-Newton step on random features (tests/test_similarity_ablation.py), plan v2's trainable
# B-spline and dense fields from the bundled plans' steps on MIND (tests/test_plan_v2_training.py)
ZERO_START_ARCHS = sorted(
    a for a in ARCHITECTURES if not a.endswith("_feature_gn") and not a.endswith("_lk_mind_learned")
)


@pytest.mark.parametrize("arch", ZERO_START_ARCHS)
def test_network_shapes_and_zero_initial_flow(arch):
    kind = ARCHITECTURES[arch][0]
    params = BS_PARAMS if kind == "bspline" else {}
    for lg in level_grids(GRID, 3):
        net = build_network(arch, lg, GRID, params)
        w = torch.rand(2, 1, *lg.shape_dhw)
        out = net(w, torch.rand_like(w), torch.tensor([0.5, 2.5]))
        expect = {
            "rigid": (2, 6),
            "bspline": (2, *BSplineLattice(GRID, (40.0,) * 3).coeff_shape),
            "dense": (2, 3, *lg.shape_dhw),
        }[kind]
        assert tuple(out.shape) == expect
        assert torch.count_nonzero(out) == 0  # zero-initialised last layer: the initial flow is zero


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_networks_script_and_export_to_onnx(arch):
    import onnxruntime as ort

    kind = ARCHITECTURES[arch][0]
    lg = level_grids(GRID, 3)[1]
    net = build_network(arch, lg, GRID, BS_PARAMS if kind == "bspline" else {}).eval()
    if arch in ZERO_START_ARCHS:
        torch.nn.init.normal_(net.out.weight, std=0.05)  # a non-zero flow to compare
    ts = export_torchscript(net)
    onx = export_onnx(net, lg)  # opset 17, checked, no GridSample
    w = torch.rand(2, 1, *lg.shape_dhw)
    f, t = torch.rand_like(w), torch.tensor([1.2, 1.7])
    ref = net(w, f, t)
    import io

    scripted = torch.jit.load(io.BytesIO(ts))
    torch.testing.assert_close(scripted(w, f, t), ref, rtol=1e-5, atol=1e-5)
    sess = ort.InferenceSession(onx, providers=["CPUExecutionProvider"])
    feeds = {"warped": w.numpy(), "fixed": f.numpy(), "t": t.numpy()}
    names = {i.name for i in sess.get_inputs()}  # fields that ignore t (Gauss-Newton) export without it
    got = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    # the Gauss-Newton fields solve a linear system: float32 rounding accumulates relative to the whole
    # output (its B-spline velocities reach a few hundred here), not to each element; as test_export does for CG
    scale = max(float(ref.detach().abs().max()), 1.0)
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=max(1e-4, 2e-5 * scale))


def test_time_changes_the_output():
    lg = level_grids(GRID, 3)[0]
    net = RigidNet(lg)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    w = torch.rand(1, 1, *lg.shape_dhw)
    assert not torch.allclose(net(w, w, torch.tensor([0.0])), net(w, w, torch.tensor([0.9])))


# ------------------------------------------------------------------------------------------ losses


@pytest.fixture(scope="module")
def phantom_pair():
    """Two contrasts of one phantom on a 4 mm grid, and the second one shifted by 8 mm in x."""
    ph = Phantom(seed=3, n_blobs=150, radii=(40.0, 45.0, 35.0), centre=(0.0, 0.0, 0.0))
    g = Grid((32, 32, 24), (4.0, 4.0, 4.0))
    pts = g.points(torch.float64)
    a = ph.value(pts, "a").float()[None, None]
    b = ph.value(pts, "b").float()[None, None]
    shift = torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64)
    b_shift = ph.value(pts + shift, "b").float()[None, None]
    norm = lambda v: (v / v.max()).clamp(0, 1)  # noqa: E731
    return norm(a), norm(b), norm(b_shift)


@pytest.mark.parametrize("name", ["mi", "ncc", "mind"])
def test_similarities_finite_and_minimised_at_alignment(phantom_pair, name):
    a, b, b_shift = phantom_pair
    sim = L.get_similarity(name)
    aligned, shifted = sim(a, b), sim(a, b_shift)
    assert torch.isfinite(aligned) and torch.isfinite(shifted)
    assert float(aligned) < float(shifted)
    # differentiable in the warped image
    w = b_shift.clone().requires_grad_(True)
    sim(w, a).backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_mi_of_an_image_with_itself_is_its_entropy_and_maximal(phantom_pair):
    a, b, _ = phantom_pair
    assert float(L.mi_loss(a, a)) < float(L.mi_loss(a, b))
    assert float(L.mi_loss(a, torch.rand_like(a))) > -0.1  # independent -> ~0


def test_content_similarity_missing_encoder_is_a_clear_error():
    with pytest.raises(L.ContentUnavailable, match="content"):
        L.get_similarity("content", encoder="/nonexistent/encoder.pt")
    with pytest.raises(ValueError, match="unknown similarity"):
        L.get_similarity("ssd")


def test_regulariser_and_self_loss():
    lat = BSplineLattice(GRID, (40.0,) * 3)
    from msode_sdk.transforms import BSplineTransform

    zero = TransformChain([BSplineTransform(torch.zeros(1, *lat.coeff_shape), lat)])
    bent = TransformChain([BSplineTransform(torch.randn(1, *lat.coeff_shape) * 4, lat)])
    assert float(L.gradient_regulariser(zero, GRID)) == 0.0
    assert float(L.gradient_regulariser(bent, GRID)) > 0.0
    rig = TransformChain([RigidTransform(torch.tensor([[0.0, 0.0, 0.0, 10.0, 0.0, 0.0]]))])
    ident = TransformChain([RigidTransform(torch.zeros(1, 6))])
    pts = GRID.points().reshape(1, -1, 3)
    # 10 mm everywhere -> (10 / scale)^2
    assert math.isclose(float(L.self_supervision_loss(ident, rig, pts, "points", 10.0)), 1.0, rel_tol=1e-5)
    assert math.isclose(
        float(
            L.self_supervision_loss(
                ident, rig, pts, "params", states_est=[ident.transforms[0].state], states_true=[rig.transforms[0].state]
            )
        ),
        100.0 / 6,
        rel_tol=1e-5,
    )


# ----------------------------------------------------------------------------- train vs SDK equality


def _equivalence(stages, integrator, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = MSODENet(GRID, stages, integrator=integrator)
    _randomise_heads(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mov = torch.rand(1, 1, *GRID.shape_dhw, generator=g)
    fix = torch.rand(1, 1, *GRID.shape_dhw, generator=g)
    with torch.no_grad():
        out = model(mov, fix)
    path = build_plan(
        tmp_path / f"eq_{integrator}.plan",
        "eq",
        GRID,
        model.stage_defs(),
        model.plan_networks(),
        formats=("torchscript",),
    )
    res = Registrar.load(path, device="cpu", backend="torch").register_model_grid(mov, fix)
    diffs = {
        st.name: float((tr.state - out.states[st.name]).abs().max()) for st, tr in zip(stages, res.chain.transforms)
    }
    sizes = {st.name: float(out.states[st.name].abs().max()) for st in stages}
    nfe_sdk = {r.name: [lv.nfe for lv in r.levels] for r in res.stages}
    return diffs, sizes, out.nfe, nfe_sdk


def test_train_forward_equals_sdk_for_fixed_step_levels(tmp_path):
    stages = [
        TrainStage("rigid", "rigid", [LevelSolver("euler", 0.25), LevelSolver("heun", 0.5), LevelSolver("euler", 0.5)]),
        TrainStage("bspline", "bspline", PAPER_SCHEDULES["bspline"], BS_PARAMS),
    ]
    diffs, sizes, nfe, nfe_sdk = _equivalence(stages, "torchdiffeq", tmp_path)
    assert all(v > 1e-2 for v in sizes.values())  # a non-trivial flow was integrated
    assert max(diffs.values()) < 1e-4, diffs
    assert nfe == nfe_sdk  # identical schedules: euler 4, heun 2 x 2, ...


def test_train_forward_adaptive_levels(tmp_path):
    stages = [TrainStage("rigid", "rigid", PAPER_SCHEDULES["rigid"])]
    diffs, sizes, nfe, nfe_sdk = _equivalence(stages, "torchdiffeq", tmp_path)
    assert sizes["rigid"] > 1e-2
    assert diffs["rigid"] < 1e-2 * max(1.0, sizes["rigid"]), diffs  # torchdiffeq's controller: close
    diffs, _, nfe, nfe_sdk = _equivalence(stages, "sdk", tmp_path)
    assert diffs["rigid"] < 1e-5 and nfe == nfe_sdk  # the SDK's own solver under autograd: exact


def test_adjoint_gradients_close_to_direct_backprop():
    """The adjoint integrates the adjoint ODE backwards with the same Euler grid (optimise-then-
    discretise), so its gradient equals direct backprop only up to the discretisation error."""
    stages = [TrainStage("rigid", "rigid", [LevelSolver("euler", 0.1)] * 2)]
    g2 = Grid((12, 12, 8), (16.0, 16.0, 16.0))
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        model = MSODENet(g2, stages, adjoint=adjoint)
        _randomise_heads(model, std=0.01)
        gen = torch.Generator().manual_seed(5)
        mov, fix = torch.rand(1, 1, *g2.shape_dhw, generator=gen), torch.rand(1, 1, *g2.shape_dhw, generator=gen)
        out = model(mov, fix)
        (out.states["rigid"] ** 2).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert float(cos) > 0.98, float(cos)
    assert 0.8 < float(grads[1].norm() / grads[0].norm()) < 1.25


def test_cascade_warps_through_previous_stage():
    stages = [
        TrainStage("rigid", "rigid", [LevelSolver("euler", 0.5)] * 3),
        TrainStage("bspline", "bspline", [LevelSolver("euler", 0.5)] * 3, BS_PARAMS),
    ]
    model = MSODENet(GRID, stages)
    _randomise_heads(model)
    mov = torch.rand(1, 1, *GRID.shape_dhw)
    out = model(mov, torch.rand_like(mov))
    assert [t.kind for t in out.chain.transforms] == ["rigid", "bspline"]
    # rigid-only prior changes the B-spline stage's result
    out_b = model(mov, torch.rand_like(mov), stages=["bspline"])
    assert not torch.allclose(out_b.states["bspline"], out.states["bspline"])


# --------------------------------------------------------------------------------- training, resume


def _tiny_cfg(tmp_path, **over):
    cfg = {
        "name": "tiny",
        "model": {"spacing_mm": 16.0, "levels": 2, "integrator": "torchdiffeq"},
        "stages": [
            {
                "name": "rigid",
                "transform": "rigid",
                "arch": "rigid_convfc",
                "arch_kwargs": {"width": 4, "hidden": 16},
                "schedule": [{"solver": "euler", "step_size": 0.5}, {"solver": "euler", "step_size": 0.5}],
            }
        ],
        "data": {
            "bank_dir": str(tmp_path.parent / "bank16"),
            "n_train": 2,
            "n_val": 1,
            "pairs": [["t2", "t1"]],
            "motion": "rigid",
            "motion_kwargs": {"max_rot_deg": 10.0, "max_trans_mm": 15.0},
        },
        "loss": {"sim": "ncc", "lambda_self": 1.0, "self_points": 512},
        "train": {
            "steps": 3,
            "batch_size": 1,
            "lr": 3e-3,
            "out_dir": str(tmp_path / "run"),
            "checkpoint_every": 1,
            "progress": False,
            "device": "cpu",
            "max_minutes": 5,
        },
        "export": {"formats": ["torchscript"], "eval_pairs": 0},
    }
    for k, v in over.items():
        cfg[k].update(v)
    return load_config(cfg)


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    tr = Trainer(_tiny_cfg(tmp_path, train={"lr": 1e-2}), resume=False)
    batch = tr.sample_batch()
    with torch.no_grad():
        before = float(tr.compute_losses(batch)["loss"])
    for _ in range(6):
        tr.opt.zero_grad()
        tr.compute_losses(batch)["loss"].backward()
        tr.opt.step()
    with torch.no_grad():
        after = float(tr.compute_losses(batch)["loss"])
    assert after < 0.8 * before, (before, after)


def test_resume_reproduces_the_next_step(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    tr = Trainer(cfg, resume=False)
    tr.fit(steps=2)
    assert (tmp_path / "run" / "state.pt").exists()
    nxt = tr.train_step()  # step 3, not checkpointed
    tr2 = Trainer(cfg, resume=True)
    assert tr2.step == 2
    again = tr2.train_step()
    for k in ("loss", "sim", "self", "rmse_phi_mm", "grad_norm"):
        assert math.isclose(nxt[k], again[k], rel_tol=1e-5, abs_tol=1e-7), (k, nxt[k], again[k])
    for (k, a), b in zip(tr.model.state_dict().items(), tr2.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 3  # header + 2 steps (step 3 of tr was never logged)


def test_learning_rate_schedule_known_values_and_bad_specs():
    tr = {"lr": 1e-3, "steps": 600, "lr_decay": {"start": 400, "final": 1e-5}}
    assert learning_rate({"lr": 1e-3, "steps": 600}, 599) == 1e-3  # no decay
    assert learning_rate(tr, 0) == learning_rate(tr, 400) == 1e-3
    assert math.isclose(learning_rate(tr, 500), (1e-3 + 1e-5) / 2, rel_tol=1e-12)  # cosine midpoint
    assert math.isclose(learning_rate(tr, 450), 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2, rel_tol=1e-12)
    assert learning_rate(tr, 600) == learning_rate(tr, 700) == 1e-5
    lin = {**tr, "lr_decay": {"start": 400, "final": 0.0, "shape": "linear"}}
    assert math.isclose(learning_rate(lin, 450), 0.75e-3, rel_tol=1e-12)
    lrs = [learning_rate(tr, s) for s in range(400, 601)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone
    for bad, msg in [
        ({"start": 400, "final": 1e-5, "shape": "step"}, "cosine"),
        ({"start": 400, "final": 2e-3}, "final"),
        ({"start": 600, "final": 0}, "start"),
        ({"start": 10}, "mapping"),
        ({"start": 10, "final": 0, "gamma": 0.5}, "mapping"),
    ]:
        with pytest.raises(ValueError, match=msg):
            learning_rate({**tr, "lr_decay": bad}, 0)
    with pytest.raises(ValueError, match="lr_decay"):  # checked when the config is loaded
        load_config({"name": "x", "train": {"steps": 10, "lr_decay": {"start": 10, "final": 0}}})


def test_trainer_follows_the_schedule_across_a_resume(tmp_path):
    cfg = _tiny_cfg(tmp_path, train={"steps": 4, "lr_decay": {"start": 1, "final": 3e-4, "shape": "linear"}})
    tr = Trainer(cfg, resume=False)
    tr.fit(steps=2)
    tr2 = Trainer(cfg, resume=True)  # resumes at step 2; the optimiser's saved lr is that of step 2
    tr2.fit()
    lrs = [row["lr"] for row in tr2.history]
    want = [3e-3, 3e-3, 2.1e-3, 1.2e-3]  # the lr of steps 1..4: learning_rate(step - 1), decaying from step 1 to 4
    assert len(lrs) == 4 and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(lrs, want)), lrs
    assert all(math.isclose(g["lr"], want[-1], rel_tol=1e-9) for g in tr2.opt.param_groups)


def test_cli_trains_exports_and_evaluates(tmp_path, capsys):
    import yaml
    from msode_train import cli

    cfg = _tiny_cfg(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main([str(path), "--steps", "2", "--eval-pairs", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = out["plan"]
    reg = Registrar.load(plan, device="cpu", backend="torch")
    m = reg.plan.manifest
    assert not m.analytic and m.training["steps"] == 2 and m.training["config"]["name"] == "tiny"
    assert "rmse_phi_mm" in m.metrics and m.metrics["n_pairs"] == 1
    assert (tmp_path / "run" / "rigid.ckpt").exists()
    from msode_export.checkpoint import build_networks, load_checkpoint

    nets = build_networks(load_checkpoint(tmp_path / "run" / "rigid.ckpt"))
    assert set(nets) == {1, 2}
    # a new run seeded from the plan has the trained weights
    tr = Trainer(
        _tiny_cfg(tmp_path, model={"init_from": plan}, train={"out_dir": str(tmp_path / "run2")}), resume=False
    )
    trained = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["model"]
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(v, trained[k], msg=k)
    # bad config -> exit 2 and a one-line error
    assert cli.main([str(tmp_path / "missing.yaml")]) == 2


def test_evaluate_with_sitk_baseline(tmp_path):
    from msode_export.analytic import build_analytic_plan
    from msode_train.evaluate import EvalConfig, evaluate_plans

    plan = build_analytic_plan(
        tmp_path / "a.plan", Grid((15, 15, 10), (16.0, 16.0, 16.0)), stages=("rigid",), formats=("torchscript",)
    )
    cfg = EvalConfig(
        motion="rigid",
        motion_kwargs={"max_rot_deg": 10.0, "max_trans_mm": 10.0},
        n_pairs=1,
        spacing_mm=16.0,
        bank_dir=str(tmp_path.parent / "bank16"),
        pairs=[("t1", "t1")],
        baselines=("sitk", "ants"),
        figures=True,
    )
    rep = evaluate_plans({"analytic": plan}, cfg, out_dir=tmp_path / "eval")
    s = rep["summary"]
    assert set(s) >= {"identity", "analytic", "sitk"}
    assert s["analytic"]["rmse_phi_mm"]["mean"] < s["identity"]["rmse_phi_mm"]["mean"]
    for f in ("results.json", "table.md", "fig_examples.png", "fig_bars.png", "fig_rmse_phi.png"):
        assert (tmp_path / "eval" / f).exists()


@pytest.mark.parametrize("sim_name,sim_kwargs", [("ncc", {"win": 5}), ("mi", {})])
def test_training_loss_gradient_through_the_loop_matches_finite_differences(sim_name, sim_kwargs):
    """The training objective is differentiable through the whole loop: on a tiny grid in float64, the
    backpropagated gradient of L_sim (local NCC or MI of the image warped by the final chain) + L_reg + the
    supervised point term, with respect to weights of every stage's networks (rigid levels 1 and 2, the
    B-spline level), equals central finite differences (torch.autograd.gradcheck). Each weight changes the
    flow of its level, hence every later warp, network input and stage."""
    from torch.func import functional_call

    from msode_sdk.warp import warp_chain

    g = Grid((12, 12, 8), (20.0, 20.0, 20.0))
    stages = [
        TrainStage("rigid", "rigid", [LevelSolver("euler", 0.5), LevelSolver("heun", 0.5)]),
        TrainStage("bspline", "bspline", [LevelSolver("euler", 0.5)], {"control_spacing_mm": [80.0, 80.0, 80.0]}),
    ]
    torch.manual_seed(0)
    model = MSODENet(g, stages, integrator="sdk").double()
    _randomise_heads(model, std=0.05, seed=3)
    gen = torch.Generator().manual_seed(7)
    smooth = lambda v: torch.nn.functional.avg_pool3d(v, 3, 1, 1)  # noqa: E731
    mov = smooth(torch.rand(1, 1, *g.shape_dhw, generator=gen, dtype=torch.float64))
    fix = smooth(torch.rand(1, 1, *g.shape_dhw, generator=gen, dtype=torch.float64))
    truth = TransformChain([RigidTransform(torch.tensor([[0.05, -0.03, 0.02, 4.0, -3.0, 2.0]], dtype=torch.float64))])
    pts = g.points(torch.float64, torch.device("cpu"))[::3, ::3, ::3].reshape(1, -1, 3)
    sim = L.get_similarity(sim_name, **sim_kwargs)
    names = ["nets.rigid_L1.out.bias", "nets.rigid_L2.out.bias", "nets.bspline_L1.out.bias"]
    params = dict(model.named_parameters())
    assert all(n in params for n in names), sorted(params)

    def objective(*values):
        out = functional_call(model, {**params, **dict(zip(names, values))}, (mov, fix))
        warped = warp_chain(mov, g, out.chain, g)
        return sim(warped, fix) + L.gradient_regulariser(out.chain, g) + L.point_error(out.chain, truth, pts) / 100.0

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    grads = torch.autograd.grad(objective(*inputs), inputs)
    assert all(float(gr.abs().max()) > 1e-8 for gr in grads)  # every stage's weights reach the loss
    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-7, rtol=1e-4)
