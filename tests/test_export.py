"""Export and engines: ONNX / TorchScript round trips, registrar.ts parity with the SDK loop, backend
parity (ONNX Runtime vs torch), training checkpoints and `msode export`, the TensorRT backend's GPU-free
parts (cache keys, shipped-engine selection, cache reuse, logged fallbacks, availability reasons)."""

import io
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msode_export.analytic import analytic_network, build_analytic_plan
from msode_export.checkpoint import (
    CheckpointError,
    export_checkpoints,
    load_checkpoint,
    register_architecture,
    save_checkpoint,
)
from msode_export.pack import LevelSolver, export_onnx, export_torchscript
from msode_export.scripted import REGISTRAR_MEMBER, build_registrar_ts, load_registrar_ts
from msode_sdk import BackendUnavailable, InputError, Registrar
from msode_sdk import cli as sdk_cli
from msode_sdk.backends import BACKENDS, available_backends
from msode_sdk.backends import _tensorrt as trt_backend
from msode_sdk.plan import load_plan, write_plan
from msode_sdk.transforms import BSplineLattice, Grid, rigid_matrix

ROOT = Path(__file__).resolve().parents[1]
# Small model grid: every loop here runs in about a second on 2 CPU cores.
GRID = Grid((24, 28, 20), (7.0, 7.0, 7.0))
CS = (21.0, 21.0, 21.0)


# ------------------------------------------------------------------------------- fixtures, helpers


def _pair(phantom, grid, theta=(0.08, -0.06, 0.1, 5.0, -4.0, 3.0)):
    """Model-grid tensors of the phantom (centred on it): fixed(p) = O(R p + t + c), moving(q) = O(q + c)."""
    c = phantom.centre
    p = grid.points(torch.float64)
    m = rigid_matrix(torch.tensor([list(theta)], dtype=torch.float64))[0]
    q = p @ m[:3, :3].T + m[:3, 3]
    fixed = phantom.value(q + c)
    moving = phantom.value(p + c)
    scale = float(max(fixed.max(), moving.max()))
    return (moving / scale).float()[None, None], (fixed / scale).float()[None, None]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These grids are tiny (per-op overhead dominates); one intra-op thread is faster and immune to
    OpenMP oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(phantom):
    return _pair(phantom, GRID)


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    """Rigid + B-spline analytic plan (paper schedules: adaptive Heun and Euler) on GRID, both formats."""
    path = tmp_path_factory.mktemp("export") / "small_rb.plan"
    return build_analytic_plan(path, GRID, stages=("rigid", "bspline"), control_spacing_mm=CS)


@pytest.fixture(scope="module")
def three_stage_plan(tmp_path_factory):
    """Rigid (adaptive Heun, adaptive Heun, Euler) + B-spline (Heun, Euler, Euler) + dense (Euler): every
    solver, a B-spline stage acting as a prior of a later stage, and dense state carried across levels."""
    path = tmp_path_factory.mktemp("export") / "small_rbd.plan"
    schedules = {
        "bspline": (LevelSolver("heun", 0.5), LevelSolver("euler", 0.5), LevelSolver("euler", 0.5)),
        "dense": (LevelSolver("euler", 0.5), LevelSolver("euler", 0.5), LevelSolver("euler", 0.5)),
    }
    return build_analytic_plan(
        path,
        GRID,
        stages=("rigid", "bspline", "dense"),
        control_spacing_mm=CS,
        schedules=schedules,
        formats=("torchscript",),
        gains={"bspline": 2.0, "dense": 1.0},
    )


# --------------------------------------------------------------------- tiny trainable architectures


class TinyRigidNet(nn.Module):
    """conv -> global mean -> (features, t) -> 6 parameters."""

    def __init__(self, level_grid, model_grid, params, width: int = 4):
        super().__init__()
        self.conv = nn.Conv3d(2, width, 3, padding=1)
        self.fc = nn.Linear(width + 1, 6)

    def forward(self, warped, fixed, t):
        h = torch.relu(self.conv(torch.cat([warped, fixed], 1))).mean(dim=(2, 3, 4))
        return 0.02 * self.fc(torch.cat([h, t[:, None]], 1))


class TinyBSplineNet(nn.Module):
    """conv -> resize to the control lattice -> control-point velocities (mm)."""

    def __init__(self, level_grid, model_grid, params, width: int = 3):
        super().__init__()
        lat = BSplineLattice(model_grid, tuple(params["control_spacing_mm"]))
        self.size = list(lat.coeff_shape[1:])
        self.conv = nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, warped, fixed, t):
        v = self.conv(torch.cat([warped, fixed], 1))
        v = F.interpolate(v, size=self.size, mode="trilinear", align_corners=True)
        return 0.5 * v * (1.0 + t.reshape(-1, 1, 1, 1, 1))


register_architecture("test_rigid_cnn", TinyRigidNet)
register_architecture("test_bspline_cnn")(TinyBSplineNet)

CKPT_GRID = Grid((16, 16, 12), (10.0, 10.0, 10.0))


def _save_ckpt(path, kind, seed=0, **over):
    torch.manual_seed(seed)
    params = {"control_spacing_mm": [30.0, 30.0, 30.0]} if kind == "bspline" else {}
    cls = TinyRigidNet if kind == "rigid" else TinyBSplineNet
    sched = (
        [{"solver": "adaptive_heun", "step_size": 0.25, "tol": 1e-3}, {"solver": "euler", "step_size": 0.5}]
        if kind == "rigid"
        else [LevelSolver("euler", 0.5), LevelSolver("heun", 0.5)]
    )
    grids = [CKPT_GRID.downsampled(2), CKPT_GRID]
    kw = dict(
        stage={"name": kind, "transform": kind, "params": params, "schedule": sched},
        model_grid={
            "shape_xyz": list(CKPT_GRID.shape_xyz),
            "spacing_xyz_mm": list(CKPT_GRID.spacing_xyz),
            "centre": "fov",
        },
        arch={"name": f"test_{kind}_cnn", "kwargs": {"width": 4} if kind == "rigid" else {}},
        state_dicts={lv: cls(g, CKPT_GRID, params).state_dict() for lv, g in enumerate(grids, start=1)},
        training={"steps": 10, "loss": [1.0, 0.5], "config": {"lr": 1e-3}},
        modalities=["t1", "t2"],
        metrics={"rmse_mm": 1.5},
    )
    kw.update(over)
    return save_checkpoint(path, **kw)


# ------------------------------------------------------------------------------------ ONNX, TorchScript


def _onnx_check(data):
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17
    assert "GridSample" not in {n.op_type for n in model.graph.node}
    return model


@pytest.mark.parametrize("kind", ["tiny_rigid", "rigid", "bspline", "dense"])
def test_onnx_export_round_trip(kind):
    ort = pytest.importorskip("onnxruntime")
    grid = GRID.downsampled(2)
    if kind == "tiny_rigid":
        torch.manual_seed(0)
        net = TinyRigidNet(grid, GRID, {}).eval()
    else:
        net = analytic_network(kind, grid, GRID, {"control_spacing_mm": list(CS)})
    data = export_onnx(net, grid)
    _onnx_check(data)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert {"warped", "fixed"} <= set(names) <= {"warped", "fixed", "t"}
    g = torch.Generator().manual_seed(1)
    for n in (1, 2):  # dynamic batch
        a, b = (F.avg_pool3d(torch.rand(n, 1, *grid.shape_dhw, generator=g), 3, 1, 1) for _ in range(2))
        t = torch.full((n,), 0.5)
        with torch.no_grad():
            ref = net(a, b, t).numpy()
        feeds = {"warped": a.numpy(), "fixed": b.numpy(), "t": t.numpy()}
        out = sess.run(None, {k: feeds[k] for k in names})[0]
        assert out.shape == ref.shape and out.shape[0] == n
        # an iterative solve (10 CG steps) accumulates float32 rounding relative to the whole output, not
        # to each element: outputs reach ~100 mm, so the tolerance scales with their magnitude
        scale = max(float(np.abs(ref).max()), 1.0)
        np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=1e-4)


def test_torchscript_round_trip():
    grid = GRID.downsampled(2)
    torch.manual_seed(0)
    for net in (
        TinyRigidNet(grid, GRID, {}).eval(),
        analytic_network("bspline", grid, GRID, {"control_spacing_mm": list(CS)}),
    ):
        loaded = torch.jit.load(io.BytesIO(export_torchscript(net)))
        a, b, t = torch.rand(2, 1, *grid.shape_dhw), torch.rand(2, 1, *grid.shape_dhw), torch.zeros(2)
        with torch.no_grad():
            torch.testing.assert_close(loaded(a, b, t), net(a, b, t), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------- backend parity


def test_ort_vs_torch_backend_parity(small_plan, pair):
    pytest.importorskip("onnxruntime")
    moving, fixed = pair
    disp = {}
    for backend in ("torch", "onnxruntime"):
        reg = Registrar.load(small_plan, device="cpu", backend=backend)
        assert reg.backend.name == backend
        disp[backend] = reg.register_model_grid(moving, fixed).displacement(GRID)
    rms = float(((disp["torch"] - disp["onnxruntime"]) ** 2).sum(1).mean().sqrt())
    moved = float((disp["torch"] ** 2).sum(1).mean().sqrt())
    assert moved > 3.0  # the registration moved things (so the comparison is not trivial)
    assert rms <= 0.05, rms


# ------------------------------------------------------------------------------------ registrar.ts


def _voxel_matrix(chain, grid):
    a = chain.affine_part()
    a = torch.eye(4, dtype=torch.float64) if a is None else a[0].double().cpu()
    p = torch.eye(4, dtype=torch.float64)
    for i in range(3):
        p[i, i] = grid.spacing_xyz[i]
        p[i, 3] = -(grid.shape_xyz[i] - 1) / 2.0 * grid.spacing_xyz[i]
    return torch.linalg.inv(p) @ a @ p


def _check_parity(plan_path, moving, fixed, ts_bytes):
    reg = Registrar.load(plan_path, device="cpu", backend="torch")
    ref = reg.register_model_grid(moving, fixed)
    module = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu")  # bare TorchScript, no msode code
    warped, disp, matrix = module(moving, fixed)
    grid = reg.model_grid
    ref_disp = ref.displacement(grid) / torch.tensor(grid.spacing_xyz).view(1, 3, 1, 1, 1)
    assert warped.shape == (1, 1, *grid.shape_dhw) and disp.shape == (1, 3, *grid.shape_dhw)
    assert matrix.shape == (4, 4) and matrix.dtype == torch.float64
    assert float((warped - ref.warped).abs().max()) <= 1e-4
    assert float((disp - ref_disp).abs().max()) <= 1e-3
    assert float((matrix - _voxel_matrix(ref.chain, grid)).abs().max()) <= 1e-5
    return ref, (warped, disp, matrix)


def test_registrar_ts_parity_three_stages(three_stage_plan, pair):
    moving, fixed = pair
    ts = build_registrar_ts(load_plan(three_stage_plan))
    ref, (warped, disp, matrix) = _check_parity(three_stage_plan, moving, fixed, ts)
    assert [s.name for s in ref.stages] == ["rigid", "bspline", "dense"]
    assert ref.stages[0].levels[0].solver == "adaptive_heun" and ref.stages[0].levels[0].nfe > 4
    # the registration did something: warped is closer to fixed than moving was
    assert float((warped - fixed).abs().mean()) < 0.7 * float((moving - fixed).abs().mean())
    # voxel-matrix convention: fixed voxel (x, y, z, 1) -> moving voxel, close to the simulated rigid map
    truth = rigid_matrix(torch.tensor([[0.08, -0.06, 0.1, 5.0, -4.0, 3.0]], dtype=torch.float64))[0]
    p = torch.eye(4, dtype=torch.float64)
    for i in range(3):
        p[i, i] = GRID.spacing_xyz[i]
        p[i, 3] = -(GRID.shape_xyz[i] - 1) / 2.0 * GRID.spacing_xyz[i]
    truth_vox = torch.linalg.inv(p) @ truth @ p
    corners = torch.tensor([[x, y, z, 1.0] for x in (0, 23) for y in (0, 27) for z in (0, 19)], dtype=torch.float64)
    err = ((corners @ (matrix - truth_vox).T)[:, :3] ** 2).sum(1).sqrt().max()
    assert float(err) < 0.5, float(err)  # voxels, at the grid corners
    assert torch.equal(matrix[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))


def test_registrar_ts_parity_with_scale_search(pair, tmp_path):
    """The deformable stages' scale search (B-spline after rigid, dense after both) runs the same in
    registrar.ts as in the SDK loop, and it chooses: the stages' end points differ from the plan without it."""
    schedules = {
        "bspline": (LevelSolver("euler", 0.5), LevelSolver("euler", 0.5)),
        "dense": (LevelSolver("euler", 0.5), LevelSolver("euler", 0.5)),
    }
    common = dict(
        model_grid=GRID,
        stages=("rigid", "bspline", "dense"),
        control_spacing_mm=CS,
        schedules=schedules,
        formats=("torchscript",),
        gains={"bspline": 4.0, "dense": 3.0},  # overshooting gains, so a factor < 1 wins somewhere
    )
    searched = build_analytic_plan(
        tmp_path / "searched.plan",
        stage_params={"bspline": {"scale_search": [0.25, 0.5, 1.0]}, "dense": {"scale_search": [0.5, 1.0]}},
        **common,
    )
    plain = build_analytic_plan(tmp_path / "plain.plan", **common)
    moving, fixed = pair
    ref, _ = _check_parity(searched, moving, fixed, build_registrar_ts(load_plan(searched)))
    other = Registrar.load(plain, device="cpu", backend="torch").register_model_grid(moving, fixed)
    diff = [
        float((a.state - b.state).abs().max()) for a, b in zip(ref.chain.transforms[1:], other.chain.transforms[1:])
    ]
    assert max(diff) > 0.05, diff  # mm: far beyond the parity tolerances above


def test_registrar_ts_in_plan_and_in_a_bare_process(small_plan, pair, tmp_path):
    """add_registrar_ts rewrites the plan with the member listed; a Python process without msode on its
    path (torch only) loads and runs it with the same results."""
    from msode_export.scripted import add_registrar_ts

    out = add_registrar_ts(small_plan, tmp_path / "with_ts.plan")
    plan = load_plan(out)
    assert REGISTRAR_MEMBER in plan.manifest.members and plan.manifest.raw["registrar_ts"]["member"] == REGISTRAR_MEMBER
    assert set(load_plan(small_plan).member_names()) | {REGISTRAR_MEMBER} == set(plan.member_names())
    moving, fixed = pair
    _, (warped, disp, matrix) = _check_parity(out, moving, fixed, plan.read(REGISTRAR_MEMBER))
    (tmp_path / "registrar.ts").write_bytes(plan.read(REGISTRAR_MEMBER))
    torch.save({"moving": moving, "fixed": fixed}, tmp_path / "inputs.pt")
    code = (
        "import torch, sys, json; m = torch.jit.load(sys.argv[1]); d = torch.load(sys.argv[2]); "
        "w, u, a = m(d['moving'], d['fixed']); torch.save({'w': w, 'u': u, 'a': a}, sys.argv[3]); "
        "print(json.loads(m.describe())['plan'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            code,
            str(tmp_path / "registrar.ts"),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == plan.manifest.name
    got = torch.load(tmp_path / "out.pt")
    assert torch.equal(got["w"], warped) and torch.equal(got["u"], disp) and torch.equal(got["a"], matrix)


def test_registrar_ts_input_errors(three_stage_plan):
    module = torch.jit.load(io.BytesIO(build_registrar_ts(three_stage_plan, stages=["rigid"])))
    info = json.loads(module.describe())
    assert info["stages"] == [{"name": "rigid", "transform": "rigid"}]
    assert info["model_grid"]["shape_xyz"] == list(GRID.shape_xyz)
    with pytest.raises(Exception, match="model grid"):
        module(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))


def test_bundled_plan_has_registrar_ts():
    plan = load_plan(ROOT / "sdk" / "msode_sdk" / "models" / "analytic_ssd.plan")
    assert REGISTRAR_MEMBER in plan.manifest.members
    module = load_registrar_ts(plan)
    info = json.loads(module.describe())
    assert info["plan"] == "analytic_ssd" and info["model_grid"]["shape_xyz"] == [120, 120, 80]
    assert [s["name"] for s in info["stages"]] == ["rigid", "bspline"]


# ------------------------------------------------------------------------ checkpoints, msode export


def test_checkpoint_round_trip(tmp_path):
    path = _save_ckpt(tmp_path / "rigid.ckpt", "rigid")
    ck = load_checkpoint(path)
    assert ck.stage["name"] == "rigid" and ck.levels == 2 and ck.model_grid == CKPT_GRID
    assert ck["arch"] == {"name": "test_rigid_cnn", "kwargs": {"width": 4}}
    assert set(ck["state_dicts"]) == {1, 2} and ck["training"]["config"] == {"lr": 1e-3}
    ref = TinyRigidNet(CKPT_GRID, CKPT_GRID, {}).state_dict()
    assert set(ck["state_dicts"][2]) == set(ref)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_checkpoint(tmp_path / "junk.ckpt")
    # a pickle of an arbitrary object is refused by weights_only loading, never executed
    torch.save({"format": "msode-checkpoint", "obj": types.SimpleNamespace(a=1)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_checkpoint(tmp_path / "evil.ckpt")
    good = torch.load(_save_ckpt(tmp_path / "ok.ckpt", "rigid"), weights_only=True)
    for mutate, msg in (
        (lambda d: d.update(format_version=99), "newer"),
        (lambda d: d["state_dicts"].pop(2), "levels"),
        (lambda d: d["stage"].update(transform="affine"), "transform"),
        (lambda d: d.update(format="other"), "not an msode checkpoint"),
    ):
        bad = {**good, "stage": dict(good["stage"]), "state_dicts": dict(good["state_dicts"])}
        mutate(bad)
        torch.save(bad, tmp_path / "bad.ckpt")
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="JSON"):
        _save_ckpt(tmp_path / "x.ckpt", "rigid", training={"when": object()})


def test_export_cli_from_checkpoints(tmp_path, capsys):
    r = _save_ckpt(tmp_path / "rigid.ckpt", "rigid", seed=1)
    b = _save_ckpt(tmp_path / "bspline.ckpt", "bspline", seed=2)
    out = tmp_path / "trained.plan"
    assert sdk_cli.main(["export", str(r), str(b), "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    plan = load_plan(out)
    m = plan.manifest
    assert m.name == "trained" and not m.analytic and [s.name for s in m.stages] == ["rigid", "bspline"]
    assert {"networks/rigid_L1.onnx", "networks/bspline_L2.ts", REGISTRAR_MEMBER} <= set(plan.member_names())
    assert m.training["stages"]["rigid"]["arch"]["name"] == "test_rigid_cnn" and m.metrics["bspline"]["rmse_mm"] == 1.5
    assert list(m.modalities) == ["t1", "t2"]
    assert [sc.solver for sc in m.stages[1].scales] == ["euler", "heun"]
    # the exported weights are the checkpoint's: TorchScript member == rebuilt network
    net = TinyRigidNet(CKPT_GRID, CKPT_GRID, {}, width=4)
    net.load_state_dict(load_checkpoint(r)["state_dicts"][2])
    ts = torch.jit.load(io.BytesIO(plan.read("networks/rigid_L2.ts")))
    x = torch.rand(1, 1, *CKPT_GRID.shape_dhw)
    with torch.no_grad():
        torch.testing.assert_close(ts(x, x, torch.ones(1)), net(x, x, torch.ones(1)))
    # the plan runs through the SDK (both backends) and registrar.ts reproduces the torch backend
    g = torch.Generator().manual_seed(0)
    moving, fixed = (F.avg_pool3d(torch.rand(1, 1, *CKPT_GRID.shape_dhw, generator=g), 3, 1, 1) for _ in range(2))
    _check_parity(out, moving, fixed, plan.read(REGISTRAR_MEMBER))
    Registrar.load(out, device="cpu", backend="onnxruntime").register_model_grid(moving, fixed)
    # plan info shows the embedded loop
    assert sdk_cli.main(["plan", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "registrar.ts:  yes" in info and "TensorRT engines: none" in info


def test_export_cli_analytic_and_errors(tmp_path, capsys):
    out = tmp_path / "an.plan"
    assert (
        sdk_cli.main(
            [
                "export",
                "--analytic",
                "--model-grid",
                "16,16,12",
                "--spacing",
                "10",
                "--stages",
                "rigid",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    m = load_plan(out).manifest
    assert (
        m.name == "an"
        and m.analytic
        and m.model_grid.shape_xyz == (16, 16, 12)
        and m.model_grid.spacing_xyz_mm == (10.0, 10.0, 10.0)
    )
    assert REGISTRAR_MEMBER in m.members
    capsys.readouterr()
    r = _save_ckpt(tmp_path / "rigid.ckpt", "rigid")
    other = _save_ckpt(
        tmp_path / "other.ckpt", "bspline", model_grid={"shape_xyz": [8, 8, 6], "spacing_xyz_mm": [20, 20, 20]}
    )
    cases = [
        (["export", "-o", str(tmp_path / "x.plan")], "CHECKPOINT"),
        (["export", str(tmp_path / "nope.ckpt"), "-o", str(tmp_path / "x.plan")], "no such checkpoint"),
        (["export", str(r), str(r), "-o", str(tmp_path / "x.plan")], "unique"),
        (["export", str(r), str(other), "-o", str(tmp_path / "x.plan")], "model grid"),
        (["export", "--analytic", "-o", str(tmp_path / "x.plan")], "--model-grid"),
        (["export", str(r), "--formats", "tflite", "-o", str(tmp_path / "x.plan")], "format"),
    ]
    for argv, needle in cases:
        assert sdk_cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("msode: error:") and needle in err[0], (argv, err)
    assert not (tmp_path / "x.plan").exists()
    bad_arch = _save_ckpt(tmp_path / "arch.ckpt", "rigid", arch={"name": "no_such_arch", "kwargs": {}})
    with pytest.raises(CheckpointError, match="unknown network architecture 'no_such_arch'.*test_rigid_cnn"):
        export_checkpoints([bad_arch], tmp_path / "y.plan")


# -------------------------------------------------------------------------------- backend selection


def test_backend_errors(small_plan):
    with pytest.raises(InputError) as exc:
        Registrar.load(small_plan, device="cpu", backend="tvm")
    for name in ("torch", "onnxruntime", "tensorrt", "auto"):
        assert name in str(exc.value)
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        Registrar.load(small_plan, device="cpu", backend="tensorrt")
    assert "tensorrt" in BACKENDS and available_backends(torch.device("cpu"))["tensorrt"]
    reg = Registrar.load(small_plan, device="cpu", backend="auto")
    assert reg.backend.name == "torch"  # the measured CPU rule (see msode_sdk.backends)


# ------------------------------------------------------------------------------ TensorRT, no GPU


HW = trt_backend.HardwareKey("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0")


def _fake_trt(version="10.3.0", fp16=True):
    flags = types.SimpleNamespace(FP16="fp16") if fp16 else types.SimpleNamespace()
    return types.SimpleNamespace(__version__=version, BuilderFlag=flags)


def test_trt_availability_reasons(monkeypatch, small_plan):
    monkeypatch.setattr(trt_backend, "_trt_module", None)
    why = trt_backend.TensorRTBackend.unavailable_reason(torch.device("cuda"))
    assert "not installed" in why
    with pytest.raises(BackendUnavailable, match="tensorrt.*not installed"):
        trt_backend.TensorRTBackend(torch.device("cpu"))
    monkeypatch.setattr(trt_backend, "_trt_module", _fake_trt("8.6.1"))
    assert "too old" in trt_backend.TensorRTBackend.unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(trt_backend, "_trt_module", _fake_trt("10.3.0"))
    assert "CUDA devices only" in trt_backend.TensorRTBackend.unavailable_reason(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "no CUDA" in trt_backend.TensorRTBackend.unavailable_reason(torch.device("cuda"))


def test_trt_names_and_cache_key(monkeypatch, tmp_path):
    assert trt_backend.gpu_slug("NVIDIA GeForce RTX 4090 (laptop)") == "nvidia-geforce-rtx-4090-laptop"
    assert HW.dir_name == "nvidia-h100-80gb-hbm3-sm90-trt10.3.0"
    assert (
        trt_backend.engine_member_name(HW, "networks/rigid_L2.onnx")
        == "engines/nvidia-h100-80gb-hbm3-sm90-trt10.3.0/rigid_L2.engine"
    )
    sha = "ab" * 32
    key = trt_backend.engine_cache_key(HW, "fp32", sha, 4)
    assert len(key) == 64 and key == trt_backend.engine_cache_key(HW, "fp32", sha.upper(), 4)
    variants = [
        trt_backend.engine_cache_key(trt_backend.HardwareKey("NVIDIA H200", (9, 0), "10.3.0"), "fp32", sha, 4),
        trt_backend.engine_cache_key(trt_backend.HardwareKey(HW.gpu, (8, 9), "10.3.0"), "fp32", sha, 4),
        trt_backend.engine_cache_key(trt_backend.HardwareKey(HW.gpu, (9, 0), "10.4.0"), "fp32", sha, 4),
        trt_backend.engine_cache_key(HW, "fp16", sha, 4),
        trt_backend.engine_cache_key(HW, "fp32", "cd" * 32, 4),
        trt_backend.engine_cache_key(HW, "fp32", sha, 8),
    ]
    assert len({key, *variants}) == 7
    monkeypatch.setenv(trt_backend.ENGINE_CACHE_ENV, str(tmp_path / "c"))
    assert trt_backend.engine_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(trt_backend.ENGINE_CACHE_ENV)
    assert trt_backend.engine_cache_dir() == Path.home() / ".cache" / "msode" / "engines"


@pytest.fixture(scope="module")
def engine_plan(small_plan, tmp_path_factory):
    """small_plan plus fake shipped engines: this GPU (fp32, recorded ONNX sha) and another GPU."""
    plan = load_plan(small_plan)
    manifest = dict(plan.manifest.raw)
    manifest.pop("members", None)
    members = {n: plan.read(n) for n in plan.member_names()}
    mine = trt_backend.engine_member_name(HW, "networks/rigid_L1.onnx")
    members[mine] = b"ENGINE rigid_L1"
    members["engines/nvidia-a100-sxm4-40gb-sm80-trt10.3.0/rigid_L1.engine"] = b"ENGINE a100"
    manifest["engines"] = {
        HW.dir_name: {
            "precision": "fp32",
            "max_batch": 4,
            "onnx_sha256": {
                mine: plan.manifest.members["networks/rigid_L1.onnx"]["sha256"],
                trt_backend.engine_member_name(HW, "networks/rigid_L2.onnx"): "0" * 64,
            },
        }
    }
    path = tmp_path_factory.mktemp("engines") / "with_engines.plan"
    write_plan(path, manifest, members)
    return load_plan(path)


def test_trt_shipped_engine_selection(engine_plan, small_plan, capsys):
    sha = engine_plan.manifest.members["networks/rigid_L1.onnx"]["sha256"]
    member, why = trt_backend.shipped_engine(engine_plan, "networks/rigid_L1.onnx", HW, "fp32", sha)
    assert member == "engines/nvidia-h100-80gb-hbm3-sm90-trt10.3.0/rigid_L1.engine", why
    assert trt_backend.shipped_engine(engine_plan, "networks/rigid_L1.onnx", HW, "fp16", sha)[0] is None
    assert trt_backend.shipped_engine(engine_plan, "networks/rigid_L1.onnx", HW, "fp32", "1" * 64)[0] is None
    assert trt_backend.shipped_engine(engine_plan, "networks/rigid_L1.onnx", HW, "fp32", sha, max_batch=8)[0] is None
    other = trt_backend.HardwareKey("NVIDIA H100 80GB HBM3", (9, 0), "10.4.0")
    member, why = trt_backend.shipped_engine(engine_plan, "networks/rigid_L1.onnx", other, "fp32", sha)
    assert member is None and "none for nvidia-h100-80gb-hbm3-sm90-trt10.4.0" in why and "a100" in why
    member, why = trt_backend.shipped_engine(load_plan(small_plan), "networks/rigid_L1.onnx", HW, "fp32", sha)
    assert member is None and "no TensorRT engines" in why
    # plan info lists the engine directories
    assert sdk_cli.main(["plan", "info", str(engine_plan.path)]) == 0
    assert (
        "TensorRT engines: nvidia-a100-sxm4-40gb-sm80-trt10.3.0, nvidia-h100-80gb-hbm3-sm90-trt10.3.0"
        in capsys.readouterr().out
    )


def test_trt_obtain_engine_cache_and_fallbacks(engine_plan, tmp_path, caplog):
    built = []

    def build(onnx, precision, max_batch):
        built.append((precision, max_batch))
        return b"ENGINE built " + precision.encode()

    def deserialize(data):
        return None if data.startswith(b"CORRUPT") or data == b"ENGINE rigid_L1" and fail_shipped else ("engine", data)

    plan = engine_plan
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="msode_sdk.tensorrt")
    args = dict(hw=HW, max_batch=4, build=build, deserialize=deserialize, cache=cache)
    l1 = (
        "networks/rigid_L1.onnx",
        plan.read("networks/rigid_L1.onnx"),
        plan.manifest.members["networks/rigid_L1.onnx"]["sha256"],
    )
    l2 = (
        "networks/rigid_L2.onnx",
        plan.read("networks/rigid_L2.onnx"),
        plan.manifest.members["networks/rigid_L2.onnx"]["sha256"],
    )
    fail_shipped = False
    engine, source = trt_backend.obtain_engine(plan, *l1, precision="fp32", **args)
    assert source.startswith("plan:engines/nvidia-h100") and engine == ("engine", b"ENGINE rigid_L1") and not built
    # shipped engine that does not deserialise: logged, built from ONNX, cached
    fail_shipped = True
    caplog.clear()
    engine, source = trt_backend.obtain_engine(plan, *l1, precision="fp32", **args)
    assert source == "built" and built == [("fp32", 4)] and "could not be deserialised" in caplog.text
    # L2's recorded ONNX sha does not match: fallback logged; second call comes from the cache
    caplog.clear()
    _, source = trt_backend.obtain_engine(plan, *l2, precision="fp16", **args)
    assert (
        source == "built"
        and "the plan has no engines/nvidia-h100-80gb-hbm3-sm90-trt10.3.0/rigid_L2.engine" in caplog.text
    )
    assert "building a fp16 engine" in caplog.text
    _, source = trt_backend.obtain_engine(plan, *l2, precision="fp16", **args)
    assert source.startswith("cache:") and len(built) == 2
    key = trt_backend.engine_cache_key(HW, "fp16", l2[2], 4)
    cached = cache / f"rigid_L2-{key[:32]}.engine"
    assert cached.read_bytes() == b"ENGINE built fp16"
    # a corrupted cache entry is logged, replaced and rebuilt
    cached.write_bytes(b"CORRUPT")
    caplog.clear()
    _, source = trt_backend.obtain_engine(plan, *l2, precision="fp16", **args)
    assert source == "built" and "unusable" in caplog.text and cached.read_bytes() == b"ENGINE built fp16"
    # an unwritable cache is logged, and the engine is used anyway
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    caplog.clear()
    _, source = trt_backend.obtain_engine(plan, *l2, precision="fp32", **{**args, "cache": blocker / "sub"})
    assert source == "built" and "cannot write the engine cache" in caplog.text


def test_trt_precision_fallback_and_builder_calls(caplog):
    caplog.set_level(logging.WARNING, logger="msode_sdk.tensorrt")
    assert trt_backend._effective_precision(_fake_trt(fp16=False), "fp16") == "fp32"
    assert "FP32" in caplog.text
    assert trt_backend._effective_precision(_fake_trt(), "fp16") == "fp16"
    with pytest.raises(InputError, match="precision"):
        trt_backend._effective_precision(_fake_trt(), "int8")

    # the builder sequence of the documented TensorRT 10 API, against a recording stand-in
    calls = []

    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    inputs = [
        Obj(name="warped", shape=(-1, 1, 5, 6, 7)),
        Obj(name="fixed", shape=(-1, 1, 5, 6, 7)),
        Obj(name="t", shape=(-1,)),
    ]
    network = Obj(num_inputs=3, get_input=lambda i: inputs[i])
    profile = Obj(set_shape=lambda name, mn, opt, mx: calls.append(("shape", name, mn, opt, mx)))
    config = Obj(
        set_memory_pool_limit=lambda pool, size: calls.append(("pool", pool, size)),
        set_flag=lambda f: calls.append(("flag", f)),
        add_optimization_profile=lambda p: calls.append(("profile", p is profile)),
    )
    builder = Obj(
        create_network=lambda flags: calls.append(("network", flags)) or network,
        create_builder_config=lambda: config,
        create_optimization_profile=lambda: profile,
        build_serialized_network=lambda n, c: b"SERIALIZED",
    )
    parser = Obj(parse=lambda data: calls.append(("parse", data)) or True, num_errors=0)
    trt = types.SimpleNamespace(
        __version__="10.3.0",
        Logger=Obj,
        Builder=lambda logger: builder,
        OnnxParser=lambda n, logger: parser,
        MemoryPoolType=Obj(WORKSPACE="ws"),
        BuilderFlag=Obj(FP16="fp16"),
    )
    trt.Logger.WARNING = 2
    assert trt_backend.build_engine(trt, b"onnx", "fp16", 3, logger="log", workspace_mib=64) == b"SERIALIZED"
    assert ("network", 0) in calls and ("parse", b"onnx") in calls and ("flag", "fp16") in calls
    assert ("pool", "ws", 64 << 20) in calls and ("profile", True) in calls
    assert ("shape", "warped", (1, 1, 5, 6, 7), (1, 1, 5, 6, 7), (3, 1, 5, 6, 7)) in calls
    assert ("shape", "t", (1,), (1,), (3,)) in calls
    parser.parse = lambda data: False
    parser.num_errors = 1
    parser.get_error = lambda i: "Unsupported operator GridSample"
    with pytest.raises(BackendUnavailable, match="cannot parse.*GridSample"):
        trt_backend.build_engine(trt, b"onnx", "fp32", 3, logger="log", member="networks/x.onnx")


# ------------------------------------------------------------------------------------ GPU (device)


@pytest.mark.gpu
def test_registrar_ts_on_cuda(small_plan, pair):
    """registrar.ts moved to CUDA runs there and agrees with the SDK's CUDA registration (whose warps may
    be the fused kernels, equal to the reference to 1e-5, so only a tolerance, not bits)."""
    moving, fixed = (t.cuda() for t in pair)
    module = torch.jit.load(io.BytesIO(build_registrar_ts(small_plan)), map_location="cuda")
    warped, disp, matrix = module(moving, fixed)
    assert warped.is_cuda and disp.is_cuda and matrix.shape == (4, 4)
    ref = Registrar.load(small_plan, device="cuda", backend="torch").register_model_grid(moving, fixed)
    ref_disp = ref.displacement(GRID) / torch.tensor(GRID.spacing_xyz, device="cuda").view(1, 3, 1, 1, 1)
    rms_mm = float((((disp - ref_disp) * GRID.spacing_xyz[0]) ** 2).sum(1).mean().sqrt())
    assert rms_mm <= 0.05, rms_mm
    assert float((matrix.cpu() - _voxel_matrix(ref.chain, GRID)).abs().max()) <= 1e-3


@pytest.mark.gpu
def test_tensorrt_backend_on_gpu(small_plan, pair, tmp_path, monkeypatch):
    """The TensorRT GPU path end to end: engines built from ONNX and cached, reused from the cache, shipped
    in a plan and used from there; registration agrees with the torch backend."""
    pytest.importorskip("tensorrt")
    from msode_export.engines import add_tensorrt_engines

    monkeypatch.setenv(trt_backend.ENGINE_CACHE_ENV, str(tmp_path / "cache"))
    moving, fixed = (t.cuda() for t in pair)
    reg = Registrar.load(small_plan, device="cuda", backend="tensorrt")
    assert set(reg.backend.sources.values()) == {"built"}
    d_trt = reg.register_model_grid(moving, fixed).displacement(GRID)
    d_torch = (
        Registrar.load(small_plan, device="cuda", backend="torch").register_model_grid(moving, fixed).displacement(GRID)
    )
    assert float(((d_trt - d_torch) ** 2).sum(1).mean().sqrt()) <= 0.05
    again = Registrar.load(small_plan, device="cuda", backend="tensorrt")
    assert all(s.startswith("cache:") for s in again.backend.sources.values())
    shipped = add_tensorrt_engines(small_plan, out_path=tmp_path / "with_engines.plan")
    third = Registrar.load(shipped, device="cuda", backend="tensorrt")
    assert all(s.startswith("plan:engines/") for s in third.backend.sources.values())


@pytest.mark.parametrize("geometry", ["oblique_fixed", "flipped_moving", "thick_slice_moving"])
def test_registrar_ts_register_native_equals_the_sdk(phantom, geometry, tmp_path):
    """registrar.ts's register_native (what the C++ library calls) runs the SDK's own preprocessing and
    world outputs (msode_sdk.world, compiled into the module): on native grids -- oblique anisotropic,
    flipped and differently sized, thick-slice -- it equals Registrar.register to float32 rounding."""
    from conftest import affine_from, render

    grid = Grid((24, 28, 20), (7.0, 7.0, 7.0))
    plan = build_analytic_plan(
        tmp_path / "p.plan",
        grid,
        stages=("rigid", "bspline"),
        control_spacing_mm=(28.0,) * 3,
        schedules={"rigid": (LevelSolver("euler", 0.25),) * 3},
        formats=("torchscript",),
    )
    c0 = phantom.centre.numpy()
    m = rigid_matrix(torch.tensor([[0.1, -0.08, 0.12, 5.0, -4.0, 3.0]], dtype=torch.float64))[0]
    world_map = lambda p: p @ m[:3, :3].T + (m[:3, 3] + torch.from_numpy(c0) - m[:3, :3] @ torch.from_numpy(c0))  # noqa: E731
    f_shape, f_aff = (40, 44, 30), affine_from((4.0, 4.0, 5.0), (0.0, 0.0, 0.0), (40, 44, 30), c0)
    m_shape, m_aff = (42, 40, 36), affine_from((4.2, 4.2, 4.2), (0.0, 0.0, 0.0), (42, 40, 36), c0 + 3.0)
    if geometry == "oblique_fixed":
        f_aff = affine_from((4.0, 4.5, 6.0), (8.0, -5.0, 20.0), (40, 44, 30), c0 + 2.0)
    elif geometry == "flipped_moving":
        m_shape = (46, 38, 34)
        m_aff = affine_from((4.0, 4.4, 4.6), (0.0, 0.0, 0.0), m_shape, c0 - 4.0) @ np.diag([-1.0, 1.0, -1.0, 1.0])
        m_aff[:3, 3] = c0 - 4.0 - m_aff[:3, :3] @ ((np.asarray(m_shape) - 1) / 2.0)
    else:  # thick slices: 1.5 x 1.5 x 12 mm voxels (pooled and blurred in-plane onto the 7 mm model grid)
        m_shape = (110, 112, 14)
        m_aff = affine_from((1.5, 1.5, 12.0), (0.0, 0.0, 0.0), m_shape, c0 + 2.0)
    fixed = render(phantom, f_shape, f_aff, world_map)
    moving = render(phantom, m_shape, m_aff)
    ref = Registrar.load(plan, device="cpu", backend="torch").register((moving, m_aff), (fixed, f_aff))
    module = torch.jit.load(io.BytesIO(build_registrar_ts(load_plan(plan))))
    warped, disp, matrix = module.register_native(
        torch.from_numpy(moving), torch.from_numpy(m_aff), torch.from_numpy(fixed), torch.from_numpy(f_aff)
    )
    rw, rd = np.asarray(ref.warped.dataobj), np.asarray(ref.displacement.dataobj)[:, :, :, 0, :]
    assert warped.shape == rw.shape == f_shape and disp.shape == (*f_shape, 3) and matrix.dtype == torch.float64
    assert float(np.abs(warped.numpy() - rw).max()) <= 1e-3 * float(rw.max() - rw.min())
    assert float(np.sqrt(((disp.numpy() - rd) ** 2).sum(-1).mean())) <= 0.01
    assert float(np.abs(matrix.numpy() - ref.matrix).max()) <= 1e-4
    with pytest.raises(torch.jit.Error, match="InputError: fixed: image has no intensity range"):
        module.register_native(
            torch.from_numpy(moving), torch.from_numpy(m_aff), torch.zeros(8, 8, 8), torch.from_numpy(f_aff)
        )
