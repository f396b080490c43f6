"""The bundled plan on a GPU: captured whole as CUDA graphs (multistart decided on the device) and equal
to the eager loop; the end-to-end pipeline (resampling, normalisation, world outputs) on the device equal
to the CPU's; the initialiser's operations capturable. Skipped without CUDA (`gpu` marker)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from msode_sdk import Registrar

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

pytestmark = pytest.mark.gpu


def _sample_arrays():
    out = []
    for name in ("moving_t2", "fixed_t1"):
        img = nib.load(str(SAMPLE / f"{name}.nii.gz"))
        out.append((np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)))
    return out


@pytest.fixture(scope="module")
def cuda_kernels():
    from msode_sdk.warp import _cuda

    ok, why = _cuda.available()
    if not ok:
        pytest.fail(f"CUDA is present but the warp kernels did not load: {why}")


def test_bundled_plan_is_captured_and_equals_the_eager_loop(cuda_kernels):
    from msode_sdk._cuda_graph import run_graphed, unsupported_reason

    reg = Registrar.load("rigid_bspline.plan", device="cuda", backend="torch")
    assert unsupported_reason(reg, reg._select_stages(None)) is None
    mov_h, fix_h = _sample_arrays()
    _, _, mov = reg.prepare(mov_h, "moving")
    _, _, fix = reg.prepare(fix_h, "fixed")
    eager = reg.register_model_grid(mov, fix)
    graphed = run_graphed(reg, mov, fix, strict=True)
    assert [s.nfe for s in graphed.stages] == [s.nfe for s in eager.stages]
    for te, tg in zip(eager.chain.transforms, graphed.chain.transforms):
        assert te.kind == tg.kind
        torch.testing.assert_close(tg.state, te.state, atol=2e-3, rtol=1e-3)
    assert float((graphed.warped - eager.warped).abs().max()) <= 1e-2
    # replays for a second pair (a flipped copy: another multistart choice), eager agrees
    mov2, fix2 = torch.flip(mov, dims=[4]).contiguous(), fix
    again = run_graphed(reg, mov2, fix2, strict=True)
    eager2 = reg.register_model_grid(mov2, fix2)
    for te, tg in zip(eager2.chain.transforms, again.chain.transforms):
        torch.testing.assert_close(tg.state, te.state, atol=2e-3, rtol=1e-3)


def test_end_to_end_on_the_gpu_equals_the_cpu(cuda_kernels):
    mov_h, fix_h = _sample_arrays()
    cpu = Registrar.load("rigid_bspline.plan", device="cpu").register(mov_h, fix_h, stages=["rigid"])
    gpu = Registrar.load("rigid_bspline.plan", device="cuda", cuda_graph=True).register(mov_h, fix_h, stages=["rigid"])
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=0.05)  # mm / rad-scale entries
    w_cpu, w_gpu = np.asarray(cpu.warped.dataobj), np.asarray(gpu.warped.dataobj)
    assert w_gpu.shape == w_cpu.shape == fix_h[0].shape
    rng = float(w_cpu.max() - w_cpu.min())
    assert float(np.abs(w_gpu - w_cpu).mean()) <= 1e-3 * rng
    d_cpu, d_gpu = np.asarray(cpu.displacement.dataobj), np.asarray(gpu.displacement.dataobj)
    assert float(np.sqrt(((d_gpu - d_cpu) ** 2).sum(-1).mean())) <= 0.05


def test_initialiser_is_capturable(cuda_kernels):
    from msode_sdk.initialize import candidate_thetas, choose_start, mutual_information
    from msode_sdk.transforms import Grid

    grid = Grid((15, 15, 10), (16.0, 16.0, 16.0))
    g = torch.Generator(device="cuda").manual_seed(0)
    mov = torch.rand(2, 1, *grid.shape_dhw, device="cuda", generator=g)
    fix = torch.rand(2, 1, *grid.shape_dhw, device="cuda", generator=g)
    ref = candidate_thetas(mov, fix, grid)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        candidate_thetas(mov, fix, grid)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        th = candidate_thetas(mov, fix, grid)
        k = th.shape[1]
        score = mutual_information(mov.repeat_interleave(k, 0), fix.repeat_interleave(k, 0)).reshape(2, k)
        chosen, best = choose_start(th, score)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(th, ref)
    assert chosen.shape == (2, 6) and best.shape == (2,)
