"""Fused CUDA warp kernels (``msode::*`` operators) and the CUDA-graph registration loop.

* CPU tests (always): the operators' schemas, their reference (CPU) implementations, fake shapes,
  the fallback when CUDA is unavailable, and the graph runner's refusals.
* Host test (where ``nvcc`` exists): the kernels' per-voxel math, compiled for the CPU from the same
  ``warp_kernels.cu`` (``-DMSODE_WARP_HOST_TEST``), against the PyTorch reference.
* GPU tests (``@pytest.mark.gpu``; skipped without CUDA): every operator against the reference on the
  device, batch 2, 2 channels, odd shapes, samples inside, on the border and outside the volume.

Tolerances: float32 kernels match the reference to 1e-5 absolute on intensities in [0, 1] (both are
fp32; the differences are coordinate rounding, measured ~4e-6); displacements to 1e-5 mm + 1e-6
relative. float16 volumes are read and written in fp16 and interpolated in fp32: they match the fp32
reference of the same (fp16-rounded) volume to 1e-3 (the fp16 output rounding is <= 4.9e-4).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from msode_sdk.transforms import BSplineLattice, BSplineTransform, DenseTransform, Grid, RigidTransform, TransformChain
from msode_sdk.warp import _cuda, _ops, registered_kernels, warp_chain, warp_chain_reference

from conftest import MODEL_GRID
from msode_sdk.bench import synthetic_pair

CSRC = Path(_cuda.__file__).resolve().parent / "csrc"
FP32_ATOL = 1e-5
FP16_ATOL = 1e-3

# Chains the kernels implement -> (operator, how to call it).
CHAIN_KINDS = [(), ("rigid",), ("bspline",), ("dense",), ("rigid", "bspline"), ("rigid", "dense")]
OP_OF = {
    (): "resample",
    ("rigid",): "warp_affine",
    ("bspline",): "warp_bspline",
    ("dense",): "warp_dense",
    ("rigid", "bspline"): "warp_affine_bspline",
    ("rigid", "dense"): "warp_affine_dense",
}


def make_case(kinds, device="cpu", n=2, c=2, seed=0, tbatch=None):
    """Random volume and chain of ``kinds``: odd shapes, anisotropic spacings, large rotations and
    translations (about half of the samples fall outside the source volume or on its border), an FFD
    with N(0, 4 mm) coefficients, a dense field on another grid (border extension exercised)."""
    g = torch.Generator().manual_seed(seed)
    src = Grid((19, 15, 21), (1.2, 1.5, 1.0))
    out = Grid((17, 22, 13), (1.3, 1.1, 1.7))
    vol = torch.rand(n, c, *src.shape_dhw, generator=g)
    tb = n if tbatch is None else tbatch
    ts = []
    for k in kinds:
        if k == "rigid":
            th = torch.cat([torch.rand(tb, 3, generator=g) * 1.2 - 0.6, torch.randn(tb, 3, generator=g) * 6], 1)
            ts.append(RigidTransform(th))
        elif k == "bspline":
            lat = BSplineLattice(out, (4.0, 5.0, 6.0))
            ts.append(BSplineTransform(torch.randn(tb, *lat.coeff_shape, generator=g) * 4, lat))
        else:
            fg = Grid((9, 11, 7), (2.5, 2.0, 3.0))
            ts.append(DenseTransform(torch.randn(tb, 3, *fg.shape_dhw, generator=g) * 4, fg))
    dev = torch.device(device)
    vol = vol.to(dev)
    ts = [
        type(t)(
            t.state.to(dev),
            *([t.lattice] if isinstance(t, BSplineTransform) else [t.grid] if isinstance(t, DenseTransform) else []),
        )
        for t in ts
    ]
    return vol, src, TransformChain(ts), out


def op_args(vol, src, chain, out):
    call = _transform_args(chain)
    return [vol, *call, list(src.spacing_xyz), list(out.spacing_xyz), list(out.shape_xyz)]


def _transform_args(chain):
    args = []
    for t in chain.transforms:
        if t.kind == "rigid":
            args.append(t.matrix)
        elif t.kind == "bspline":
            args += [t.state, list(t.lattice.control_spacing)]
        else:
            args += [t.state, list(t.grid.spacing_xyz)]
    return args


def displacement_args(chain, out):
    ts = chain.transforms
    matrix = ts[0].matrix if ts[0].kind == "rigid" else None
    coeffs = next((t.state for t in ts if t.kind == "bspline"), None)
    field = next((t.state for t in ts if t.kind == "dense"), None)
    cs = next((list(t.lattice.control_spacing) for t in ts if t.kind == "bspline"), [])
    fs = next((list(t.grid.spacing_xyz) for t in ts if t.kind == "dense"), [])
    return [matrix, coeffs, field, cs, fs, list(out.spacing_xyz), list(out.shape_xyz)]


# ===================================================================================== CPU tests


def test_schemas_defined_once_with_reference_and_fake_impls():
    _ops.ensure_defined()
    _ops.ensure_defined()  # idempotent
    for name, schema in _ops.SCHEMAS.items():
        assert str(getattr(torch.ops.msode, name).default._schema) == f"msode::{schema}"


@pytest.mark.parametrize("kinds", CHAIN_KINDS, ids=lambda k: "+".join(k) or "resample")
def test_cpu_operators_are_the_reference(kinds):
    vol, src, chain, out = make_case(kinds)
    fn = _ops.op(OP_OF[kinds])
    got = fn(*op_args(vol, src, chain, out))
    ref = warp_chain_reference(vol, src, chain, out)
    assert got.shape == (2, 2, *out.shape_dhw) and got.dtype == vol.dtype
    assert torch.equal(got, ref)
    half = fn(*op_args(vol.half(), src, chain, out))
    assert half.dtype == torch.float16
    assert (half.float() - warp_chain_reference(vol.half().float(), src, chain, out)).abs().max() <= FP16_ATOL
    meta = fn(
        *op_args(vol.to("meta"), src, chain, out)[:1],
        *[a.to("meta") if isinstance(a, torch.Tensor) else a for a in op_args(vol, src, chain, out)[1:]],
    )
    assert meta.device.type == "meta" and meta.shape == got.shape
    if kinds:
        d = _ops.op("chain_displacement")(*displacement_args(chain, out))
        assert torch.equal(d, chain.displacement(out, 2))


def test_cpu_operator_errors_are_clear():
    vol, src, chain, out = make_case(("rigid",))
    with pytest.raises((RuntimeError, ValueError), match="3 values"):
        _ops.op("warp_affine")(vol, chain.transforms[0].matrix, [1.0, 1.0], [1.0] * 3, [4, 4, 4])
    with pytest.raises((RuntimeError, ValueError), match="needs a matrix"):
        _ops.op("chain_displacement")(None, None, None, [], [], [1.0] * 3, [4, 4, 4])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_kernels_report_why_and_warps_fall_back(caplog):
    from msode_sdk.warp import ensure_kernels

    with caplog.at_level(logging.INFO):
        assert ensure_kernels("cuda") is False
    ok, why = _cuda.available()
    assert ok is False and why and ("CPU-only" in why or "no CUDA" in why or "disabled" in why)
    assert not any(dev == "cuda" for dev, _ in registered_kernels())
    vol, src, chain, out = make_case(("rigid", "bspline"))
    assert torch.equal(warp_chain(vol, src, chain, out), warp_chain_reference(vol, src, chain, out))
    d = _cuda.displacement(chain, out, 2)
    assert torch.equal(d, chain.displacement(out, 2))


def test_graph_runner_refuses_what_it_cannot_capture(analytic_plan):
    from msode_sdk import Registrar
    from msode_sdk._cuda_graph import GraphCaptureUnsupported, run_graphed, unsupported_reason

    reg = Registrar.load(analytic_plan, device="cpu", backend="torch")
    stages = reg._select_stages(None)
    assert "not CUDA" in unsupported_reason(reg, stages)
    with pytest.raises(GraphCaptureUnsupported, match="not CUDA"):
        run_graphed(
            reg, torch.zeros(1, 1, *MODEL_GRID.shape_dhw), torch.zeros(1, 1, *MODEL_GRID.shape_dhw), strict=True
        )
    # The paper's rigid schedule is adaptive: named as the reason, before any CUDA is touched.
    fake = SimpleNamespace(device=torch.device("cuda"), backend=SimpleNamespace(name="torch"))
    assert "adaptive_heun" in unsupported_reason(fake, stages)
    fake_ort = SimpleNamespace(device=torch.device("cuda"), backend=SimpleNamespace(name="onnxruntime"))
    assert "backend" in unsupported_reason(fake_ort, stages)


def test_cuda_graph_flag_is_harmless_on_cpu(analytic_plan):
    from msode_sdk import Registrar

    reg = Registrar.load(analytic_plan, device="cpu", backend="torch", cuda_graph=True)
    mov, fix = synthetic_pair(MODEL_GRID)
    res = reg.register_model_grid(mov, fix, stages=["rigid"])
    assert res.warped.shape == mov.shape and len(res.stages) == 1


@pytest.mark.parametrize("stages", [("rigid", "bspline"), ("rigid", "dense"), ("multistart", "bspline")], ids="+".join)
def test_graph_runner_computation_equals_eager_loop_on_cpu(tmp_path, stages, monkeypatch):
    """What the runner captures (the eager loop's own RegistrationLoop handed the ``msode::*`` operators:
    pyramid through ``resample``, stages -- a device-side multistart included --, final warp), run eagerly
    on CPU with the operators' reference implementations, gives the eager Registrar loop's result: same
    chain, NFE and warped image."""
    from msode_export.analytic import build_analytic_plan
    from msode_export.pack import LevelSolver
    from msode_sdk import Registrar
    from msode_sdk import _cuda_graph as cg
    from msode_sdk.loop import RegistrationLoop, stage_runs

    grid = Grid((24, 28, 20), (7.0, 7.0, 7.0))
    kinds = tuple(k.replace("multistart", "rigid") for k in stages)
    path = build_analytic_plan(
        tmp_path / "p.plan",
        grid,
        stages=kinds,
        control_spacing_mm=(30.0,) * 3,
        schedules={"rigid": (LevelSolver("euler", 0.25),) * 3, "dense": (LevelSolver("heun", 0.5),) * 3},
        formats=("torchscript",),
    )
    reg = Registrar.load(path, device="cpu", backend="torch")
    init = "multistart" if "multistart" in stages else None
    mov, fix = synthetic_pair(grid)
    eager = reg.register_model_grid(mov, fix, init=init)

    def ref_warp(volume, src_grid, chain, out_grid):  # the operators' CPU implementation = reference
        call = _cuda._transform_args(chain)
        assert call is not None, chain
        name, targs = call
        return _ops.op(name)(
            volume, *targs, list(src_grid.spacing_xyz), list(out_grid.spacing_xyz), list(out_grid.shape_xyz)
        )

    runner = cg.CudaGraphRunner.__new__(cg.CudaGraphRunner)
    runner.batch, runner.options = 1, cg.GraphOptions()
    runner.loop = RegistrationLoop(stage_runs(reg, reg._select_stages(None), init), grid, ref_warp)
    with torch.inference_mode():
        chain, stats = runner._run_stages(runner.loop.pyramid(mov, fix))
        warped = runner.loop.final_warp(mov, chain)
    assert [sum(s.nfe for s in st) for st in stats] == [s.nfe for s in eager.stages]
    for te, tg in zip(eager.chain.transforms, chain.transforms):
        assert te.kind == tg.kind
        torch.testing.assert_close(tg.state, te.state, atol=1e-4, rtol=1e-4)
    assert (warped - eager.warped).abs().max() <= 1e-4


# ===================================================================== kernel math on the host


class _Axis(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64),
        ("spacing", ctypes.c_float),
        ("centre", ctypes.c_float),
        ("half", ctypes.c_float),
    ]


class _Params(ctypes.Structure):  # mirrors msode::WarpParams (warp_kernels.cuh)
    _fields_ = [
        ("batch", ctypes.c_int64),
        ("out", _Axis * 3),
        ("matrix", ctypes.c_void_p),
        ("matrix_bstride", ctypes.c_int64),
        ("deform", ctypes.c_int32),
        ("src_kind", ctypes.c_int32),
        ("coeffs", ctypes.c_void_p),
        ("coeff_bstride", ctypes.c_int64),
        ("ctrl_n", ctypes.c_int64 * 3),
        ("ctrl_spacing", ctypes.c_float * 3),
        ("ctrl_centre", ctypes.c_float * 3),
        ("field", ctypes.c_void_p),
        ("field_bstride", ctypes.c_int64),
        ("field_axis", _Axis * 3),
        ("src", ctypes.c_void_p),
        ("channels", ctypes.c_int64),
        ("src_axis", _Axis * 3),
        ("dst", ctypes.c_void_p),
    ]


def _axis(n, s):
    """As make_axis in warp_ops.cpp."""
    return _Axis(int(n), float(s), float((n - 1) / 2.0), float(max((n - 1) * s, 1e-12) / 2.0))


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not installed: the kernel math is checked on the GPU tests only")
    src = CSRC / "warp_kernels.cu"
    digest = hashlib.sha256(src.read_bytes() + (CSRC / "warp_kernels.cuh").read_bytes()).hexdigest()[:12]
    lib_path = _cuda._cache_root() / "host_test" / f"warp_host_{digest}.so"
    try:
        lib_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: build in the test's temporary directory
        lib_path = tmp_path_factory.mktemp("host_kernels") / f"warp_host_{digest}.so"
    if not lib_path.exists():
        tmp = lib_path.with_suffix(f".{digest}.tmp.so")
        proc = subprocess.run(
            [
                nvcc,
                "-std=c++17",
                "-O2",
                "-DMSODE_WARP_HOST_TEST",
                "-Xcompiler",
                "-fPIC",
                "-shared",
                str(src),
                "-o",
                str(tmp),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(f"nvcc failed on warp_kernels.cu:\n{proc.stderr[-3000:]}")
        tmp.replace(lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.msode_warp_host.restype = ctypes.c_char_p
    lib.msode_warp_host.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.msode_warp_params_size.restype = ctypes.c_int64
    assert lib.msode_warp_params_size() == ctypes.sizeof(_Params), "ctypes mirror of WarpParams is out of date"
    return lib


def _host_run(lib, chain, out, batch, volume=None, src=None):
    p = _Params()
    keep = []
    p.batch = batch
    for a in range(3):
        p.out[a] = _axis(out.shape_xyz[a], out.spacing_xyz[a])
    for t in chain.transforms:
        st = t.state
        if t.kind == "rigid":
            m = t.matrix[:, :3].float().contiguous()
            keep.append(m)
            p.matrix, p.matrix_bstride = m.data_ptr(), (0 if m.shape[0] == 1 else 12)
        elif t.kind == "bspline":
            c = st.float().contiguous()
            keep.append(c)
            p.deform, p.coeffs, p.coeff_bstride = 1, c.data_ptr(), (0 if c.shape[0] == 1 else c[0].numel())
            for a in range(3):
                p.ctrl_n[a] = t.lattice.shape_xyz[a]
                p.ctrl_spacing[a] = t.lattice.control_spacing[a]
                p.ctrl_centre[a] = (t.lattice.shape_xyz[a] - 1) / 2.0
        else:
            f = st.float().contiguous()
            keep.append(f)
            p.deform, p.field, p.field_bstride = 2, f.data_ptr(), (0 if f.shape[0] == 1 else f[0].numel())
            for a in range(3):
                p.field_axis[a] = _axis(t.grid.shape_xyz[a], t.grid.spacing_xyz[a])
    x, y, z = out.shape_xyz
    if volume is not None:
        v = volume.contiguous()
        keep.append(v)
        p.src, p.channels = v.data_ptr(), v.shape[1]
        p.src_kind = 1 if v.dtype == torch.float16 else 0
        for a in range(3):
            p.src_axis[a] = _axis(src.shape_xyz[a], src.spacing_xyz[a])
        res = torch.full((batch, v.shape[1], z, y, x), float("nan"), dtype=v.dtype)
    else:
        res = torch.full((batch, 3, z, y, x), float("nan"))
    p.dst = res.data_ptr()
    err = lib.msode_warp_host(ctypes.byref(p), 0 if volume is not None else 1)
    assert err == b"", err.decode()
    return res


@pytest.mark.parametrize("kinds", CHAIN_KINDS, ids=lambda k: "+".join(k) or "resample")
def test_kernel_math_on_host_matches_reference(host_kernels, kinds):
    vol, src, chain, out = make_case(kinds)
    ref = warp_chain_reference(vol, src, chain, out)
    got = _host_run(host_kernels, chain, out, 2, vol, src)
    assert (got - ref).abs().max() <= FP32_ATOL
    inside = ref != 0
    assert 0.05 < inside.float().mean() <= 1.0
    half = _host_run(host_kernels, chain, out, 2, vol.half(), src)
    assert (half.float() - warp_chain_reference(vol.half().float(), src, chain, out)).abs().max() <= FP16_ATOL
    if kinds:
        d = _host_run(host_kernels, chain, out, 2)
        torch.testing.assert_close(d, chain.displacement(out, 2), atol=1e-5, rtol=1e-6)


def test_kernel_math_on_host_edge_cases(host_kernels):
    # one-voxel source axis, transform batch 1 broadcast over volume batch 3
    src = Grid((1, 12, 9), (1.0, 1.5, 1.0))
    out = Grid((5, 12, 9), (1.0, 1.5, 1.0))
    vol = torch.rand(3, 1, *src.shape_dhw)
    chain = TransformChain([RigidTransform(torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.3, -1.2]]))])
    assert (
        _host_run(host_kernels, chain, out, 3, vol, src) - warp_chain_reference(vol, src, chain, out)
    ).abs().max() <= FP32_ATOL
    # dense field on the output grid itself, far and non-finite transforms give zeros
    g = Grid((10, 12, 9), (1.0, 1.5, 1.0))
    vol = torch.rand(2, 2, *g.shape_dhw)
    dense = TransformChain([DenseTransform(torch.randn(2, 3, *g.shape_dhw) * 3, g)])
    assert (
        _host_run(host_kernels, dense, g, 2, vol, g) - warp_chain_reference(vol, g, dense, g)
    ).abs().max() <= FP32_ATOL
    far = TransformChain([RigidTransform(torch.tensor([[0.0, 0.0, 0.0, 1e30, 0.0, 0.0], [float("nan")] * 6]))])
    assert _host_run(host_kernels, far, g, 2, vol, g).abs().max() == 0


# ========================================================================================= GPU


@pytest.fixture(scope="module")
def cuda_kernels():
    ok, why = _cuda.available()
    if not ok:
        pytest.fail(f"CUDA is available but the warp kernels are not: {why}")
    return True


@pytest.mark.gpu
def test_gpu_kernels_registered(cuda_kernels):
    for name in _ops.SCHEMAS:
        assert _ops.has_cuda_kernel(name), name
    for kinds in CHAIN_KINDS:
        assert ("cuda", kinds) in registered_kernels()


@pytest.mark.gpu
@pytest.mark.parametrize("kinds", CHAIN_KINDS, ids=lambda k: "+".join(k) or "resample")
def test_gpu_kernels_match_reference(cuda_kernels, kinds):
    vol, src, chain, out = make_case(kinds, "cuda")
    fn = _ops.op(OP_OF[kinds])
    ref = warp_chain_reference(vol, src, chain, out)
    got = fn(*op_args(vol, src, chain, out))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = float((got - ref).abs().max())
    assert err <= FP32_ATOL, f"{kinds}: max |kernel - reference| = {err:.3g}"
    # samples inside the volume (and, for the transforms, outside: the resample case may lie wholly inside)
    inside = float((ref != 0).float().mean())
    assert 0.05 < inside <= 1.0 and (inside < 1.0 or not kinds)
    # the dispatching warp uses the kernel and gives the same
    assert torch.equal(warp_chain(vol, src, chain, out), got)
    # fp16 volume, fp32 arithmetic
    half = fn(*op_args(vol.half(), src, chain, out))
    assert half.dtype == torch.float16
    err16 = float((half.float() - warp_chain_reference(vol.half().float(), src, chain, out)).abs().max())
    assert err16 <= FP16_ATOL, f"{kinds} fp16: {err16:.3g}"
    if kinds:
        d = _ops.op("chain_displacement")(*displacement_args(chain, out))
        torch.testing.assert_close(d, chain.displacement(out, 2), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(_cuda.displacement(chain, out, 2), d)


@pytest.mark.gpu
def test_gpu_broadcast_batch_and_one_voxel_axis(cuda_kernels):
    vol, src, chain, out = make_case(("rigid", "bspline"), "cuda", n=3, c=1, tbatch=1)
    ref = warp_chain_reference(vol, src, chain, out)
    assert (warp_chain(vol, src, chain, out) - ref).abs().max() <= FP32_ATOL
    src1 = Grid((1, 12, 9), (1.0, 1.5, 1.0))
    vol1 = torch.rand(2, 1, *src1.shape_dhw, device="cuda")
    ch = TransformChain([RigidTransform(torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.3, -1.2]], device="cuda"))])
    out1 = Grid((5, 12, 9), (1.0, 1.5, 1.0))
    assert (warp_chain(vol1, src1, ch, out1) - warp_chain_reference(vol1, src1, ch, out1)).abs().max() <= FP32_ATOL


@pytest.mark.gpu
def test_gpu_operator_checks_inputs(cuda_kernels):
    vol, src, chain, out = make_case(("rigid",), "cuda")
    m = chain.transforms[0].matrix
    with pytest.raises(RuntimeError, match="src_spacing must have 3 values"):
        _ops.op("warp_affine")(vol, m, [1.0, 1.0], [1.0] * 3, [4, 4, 4])
    with pytest.raises(RuntimeError, match="float32 or float16"):
        _ops.op("warp_affine")(vol.double(), m, [1.0] * 3, [1.0] * 3, [4, 4, 4])
    with pytest.raises(RuntimeError, match="matrix must be"):
        _ops.op("warp_affine")(vol, m[:, :2], [1.0] * 3, [1.0] * 3, [4, 4, 4])
    with pytest.raises(RuntimeError, match="batch"):
        _ops.op("warp_affine")(vol[:1], m, [1.0] * 3, [1.0] * 3, [4, 4, 4])


@pytest.mark.gpu
def test_gpu_warp_falls_back_for_autograd_and_other_dtypes(cuda_kernels):
    vol, src, chain, out = make_case(("rigid",), "cuda")
    th = chain.transforms[0].state.clone().requires_grad_(True)
    ch = TransformChain([RigidTransform(th)])
    res = warp_chain(vol, src, ch, out)
    assert res.requires_grad  # the reference ran: gradients flow
    res.sum().backward()
    assert th.grad is not None and torch.isfinite(th.grad).all()
    r64 = warp_chain(vol.double(), src, TransformChain([RigidTransform(th.detach().double())]), out)
    assert r64.dtype == torch.float64


@pytest.mark.gpu
def test_gpu_operator_is_capturable(cuda_kernels):
    vol, src, chain, out = make_case(("rigid", "bspline"), "cuda")
    args = op_args(vol, src, chain, out)
    fn = _ops.op("warp_affine_bspline")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fn(*args)
    vol.copy_(torch.rand_like(vol))
    g.replay()
    torch.cuda.synchronize()
    assert (static_out - warp_chain_reference(vol, src, chain, out)).abs().max() <= FP32_ATOL


@pytest.fixture(scope="module")
def fixed_step_plan(tmp_path_factory):
    """Rigid + B-spline analytic plan on MODEL_GRID with fixed-step schedules only (capturable)."""
    from msode_export.analytic import build_analytic_plan
    from msode_export.pack import LevelSolver

    path = tmp_path_factory.mktemp("plans") / "analytic_fixed.plan"
    build_analytic_plan(
        path,
        MODEL_GRID,
        stages=("rigid", "bspline"),
        control_spacing_mm=(21.0, 21.0, 21.0),
        schedules={"rigid": (LevelSolver("euler", 0.1),) * 3},
        formats=("torchscript",),
    )
    return path


@pytest.mark.gpu
def test_gpu_graphed_loop_equals_eager_loop(cuda_kernels, fixed_step_plan):
    from msode_sdk import Registrar
    from msode_sdk._cuda_graph import run_graphed

    reg = Registrar.load(fixed_step_plan, device="cuda", backend="torch")
    mov, fix = synthetic_pair(MODEL_GRID)
    mov, fix = mov.cuda(), fix.cuda()
    eager = reg.register_model_grid(mov, fix)
    graphed = run_graphed(reg, mov, fix, strict=True)
    assert [s.nfe for s in graphed.stages] == [s.nfe for s in eager.stages]
    for te, tg in zip(eager.chain.transforms, graphed.chain.transforms):
        assert te.kind == tg.kind
        torch.testing.assert_close(tg.state, te.state, atol=1e-3, rtol=1e-3)
    assert (graphed.warped - eager.warped).abs().max() <= 1e-3
    # a second pair replays the same graph; the first result is untouched (outputs are copies)
    first = graphed.warped.clone()
    mov2, fix2 = synthetic_pair(MODEL_GRID, seed=1)
    again = run_graphed(reg, mov2.cuda(), fix2.cuda(), strict=True)
    assert torch.equal(graphed.warped, first)
    eager2 = reg.register_model_grid(mov2.cuda(), fix2.cuda())
    assert (again.warped - eager2.warped).abs().max() <= 1e-3
    # through the Registrar option
    reg_g = Registrar.load(fixed_step_plan, device="cuda", backend="torch", cuda_graph=True)
    res = reg_g.register_model_grid(mov, fix)
    assert (res.warped - eager.warped).abs().max() <= 1e-3
    assert all(s.seconds > 0 for s in res.stages)


@pytest.mark.gpu
def test_gpu_adaptive_plan_is_refused_or_runs_eagerly(cuda_kernels, analytic_plan, caplog):
    from msode_sdk import Registrar
    from msode_sdk._cuda_graph import GraphCaptureUnsupported, run_graphed

    reg = Registrar.load(analytic_plan, device="cuda", backend="torch", cuda_graph=True)
    mov, fix = (t.cuda() for t in synthetic_pair(MODEL_GRID))
    with pytest.raises(GraphCaptureUnsupported, match="adaptive_heun"):
        run_graphed(reg, mov, fix, strict=True)
    with caplog.at_level(logging.WARNING, logger="msode_sdk"):
        res = reg.register_model_grid(mov, fix)
    assert res.warped.shape == mov.shape
    assert any("adaptive_heun" in r.getMessage() for r in caplog.records)


def test_graph_runner_computation_equals_eager_loop_for_the_bundled_plan_on_cpu():
    """The same check for the bundled plan itself (format 2 feature levels, fixed steps, multistart on the
    device): what the runner would capture equals the eager registration."""
    from msode_sdk import Registrar
    from msode_sdk import _cuda_graph as cg
    from msode_sdk.loop import RegistrationLoop, stage_runs

    reg = Registrar.load("rigid_bspline.plan", device="cpu", backend="torch")
    stages = reg._select_stages(["rigid"])
    fake = SimpleNamespace(device=torch.device("cuda"), backend=SimpleNamespace(name="torch"))
    why = cg.unsupported_reason(fake, stages)
    assert why is None or "kernels" in why  # fixed steps and the device-side multistart are capturable
    mov, fix = synthetic_pair(reg.model_grid)
    eager = reg.register_model_grid(mov, fix, stages=["rigid"])

    def ref_warp(volume, src_grid, chain, out_grid):
        name, targs = _cuda._transform_args(chain)
        return _ops.op(name)(
            volume, *targs, list(src_grid.spacing_xyz), list(out_grid.spacing_xyz), list(out_grid.shape_xyz)
        )

    runner = cg.CudaGraphRunner.__new__(cg.CudaGraphRunner)
    runner.batch, runner.options = 1, cg.GraphOptions()
    runner.loop = RegistrationLoop(stage_runs(reg, stages), reg.model_grid, ref_warp)
    with torch.inference_mode():
        chain, stats = runner._run_stages(runner.loop.pyramid(mov, fix))
    assert [sum(s.nfe for s in st) for st in stats] == [s.nfe for s in eager.stages] == [20]
    torch.testing.assert_close(chain.transforms[0].state, eager.chain.transforms[0].state, atol=1e-4, rtol=1e-4)


OP_OF_KINDS = {
    (): "resample",
    ("rigid",): "warp_affine",
    ("bspline",): "warp_bspline",
    ("dense",): "warp_dense",
    ("rigid", "bspline"): "warp_affine_bspline",
    ("rigid", "dense"): "warp_affine_dense",
}


@pytest.mark.parametrize("kinds", list(OP_OF_KINDS), ids=lambda k: "+".join(k) or "resample")
def test_opcheck_warp_operators(kinds):
    """torch.library.opcheck on every msode:: warp operator (schema, fake/meta implementation, dispatch
    under FakeTensor and AOT): on CPU against the reference implementation; with CUDA also on the GPU,
    where the compiled kernels serve the same schema."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        vol, src, chain, out = make_case(kinds, dev)
        if kinds == ():
            args = [vol, list(src.spacing_xyz), list(out.spacing_xyz), list(out.shape_xyz)]
        else:
            args = op_args(vol, src, chain, out)
        torch.library.opcheck(_ops.op(OP_OF_KINDS[kinds]), tuple(args))


@pytest.mark.parametrize("kinds", [("rigid",), ("bspline",), ("rigid", "bspline"), ("rigid", "dense")], ids="+".join)
def test_opcheck_chain_displacement(kinds):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        _, _, chain, out = make_case(kinds, dev)
        torch.library.opcheck(_ops.op("chain_displacement"), tuple(displacement_args(chain, out)))
