"""Latency benchmark: ``python -m msode_sdk.bench [--plan P] [--device D] [--backend B ...] [--pair DIR] [--json F]``.

Measures, over ``--repeats`` runs after ``--warmup`` runs, per backend:

* ``model-grid``: :meth:`Registrar.register_model_grid` with the inputs already on the device (the
  number the GPU targets refer to), per stage and whole, NFE per stage; on CUDA with the torch backend
  also replayed as CUDA graphs (``Registrar.load(..., cuda_graph=True)``) when the plan allows it
  (fixed-step solvers), else the reason it does not;
* ``end-to-end``: :meth:`Registrar.register` from in-memory arrays (validation, resampling to the model
  grid, the stages, world outputs on the fixed grid), whole and split into load / stages / output. The
  pair is ``--pair DIR`` (``moving*.nii*`` and ``fixed*.nii*`` in DIR, e.g. ``scripts/make_latency_pairs.py``
  output) or, by default, a synthetic textured pair with a 10 deg / 5 mm rigid motion on a 1 mm grid
  covering the model grid's field of view (240x240x160 for the bundled plans);
* ``throughput``: pairs per second of the model-grid registration at batch 1 and batch 8 (``--batches``);
* peak memory: GPU (``torch.cuda.max_memory_allocated``) or the process's peak RSS;
* ``warp``: one rigid warp of a model-grid volume, dispatching warp vs the PyTorch reference; on CUDA
  (``--no-cuda-extras`` skips) the fused kernel vs ``F.affine_grid`` + ``F.grid_sample`` at 240x240x160.

Reports p50 / p95 / max in ms. Benchmarks measure; they assert nothing. ``--threads`` sets torch's
intra-op threads (default: torch's choice, printed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import sys
import time
from typing import Any

import numpy as np
import torch

from .registrar import Registrar, bundled_plans
from .transforms import Grid, RigidTransform, TransformChain
from .warp import registered_kernels, warp_chain, warp_chain_reference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def pct(p):
        k = (len(xs) - 1) * p
        lo, hi = int(np.floor(k)), int(np.ceil(k))
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"p50_ms": pct(0.5) * 1e3, "p95_ms": pct(0.95) * 1e3, "max_ms": xs[-1] * 1e3, "n": len(xs)}


def synthetic_pair(grid: Grid, seed: int = 0):
    """A smooth textured ellipsoid and its copy moved by a 10 degree / 5 mm rigid motion, both
    ``(1, 1, D, H, W)`` on ``grid`` with intensities in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    pts = grid.points()
    half = torch.tensor(grid.extent_xyz) / 2
    r = ((pts / (0.8 * half)) ** 2).sum(-1)
    noise = torch.rand((1, 1, *grid.shape_dhw), generator=g)
    for _ in range(3):
        noise = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    fixed = torch.where(r < 1, 0.3 + 0.7 * noise, torch.zeros_like(noise))
    theta = torch.tensor([[0.1, -0.05, 0.17, 5.0, -3.0, 2.0]])
    moving = warp_chain(fixed, grid, TransformChain([RigidTransform(theta)]), grid)
    return moving.contiguous(), fixed.contiguous()


def _time(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def _upsample_to_1mm(vol: torch.Tensor, grid: Grid) -> np.ndarray:
    size = tuple(int(round(n * s)) for n, s in zip(grid.shape_dhw, grid.spacing_xyz[::-1]))
    up = torch.nn.functional.interpolate(vol.float().cpu(), size=size, mode="trilinear", align_corners=True)
    return up[0, 0].permute(2, 1, 0).contiguous().numpy()


def _host_pair(grid: Grid, moving: torch.Tensor, fixed: torch.Tensor, pair_dir: str | None):
    """``((array, affine), (array, affine), description)`` of the end-to-end inputs."""
    if pair_dir:
        import nibabel as nib

        found = {}
        for role in ("moving", "fixed"):
            names = sorted(glob.glob(os.path.join(pair_dir, f"{role}*.nii*")))
            if not names:
                raise SystemExit(f"--pair {pair_dir}: no {role}*.nii[.gz] file")
            img: Any = nib.load(names[0])
            found[role] = (np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine))
        return found["moving"], found["fixed"], f"{pair_dir} ({found['fixed'][0].shape})"
    mov_np, fix_np = _upsample_to_1mm(moving, grid), _upsample_to_1mm(fixed, grid)
    aff = np.eye(4)
    aff[:3, 3] = -(np.asarray(fix_np.shape) - 1) / 2.0
    return (mov_np, aff), (fix_np, aff), f"synthetic 1 mm {fix_np.shape}"


def _model_grid_run(reg: Registrar, moving, fixed, warmup, repeats) -> tuple[dict, dict]:
    stage_times: dict[str, list[float]] = {}
    nfe: dict[str, int] = {}

    def run():
        res = reg.register_model_grid(moving, fixed)
        for st in res.stages:
            stage_times.setdefault(st.name, []).append(st.seconds)
            nfe[st.name] = st.nfe
        return res

    whole, _ = _time(run, reg.device, warmup, repeats)
    return {"whole": _percentiles(whole), **{k: _percentiles(v[-repeats:]) for k, v in stage_times.items()}}, nfe


def bench_backend(
    plan: str,
    device: str,
    backend: str,
    repeats: int,
    warmup: int,
    end_to_end: bool,
    pair_dir: str | None = None,
    batches=(1, 8),
) -> dict:
    reg = Registrar.load(plan, device=device, backend=backend)
    dev = reg.device
    grid = reg.model_grid
    moving, fixed = synthetic_pair(grid)
    moving, fixed = moving.to(dev), fixed.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    mg, nfe = _model_grid_run(reg, moving, fixed, warmup, repeats)
    out = {
        "plan": reg.name,
        "plan_kind": reg.plan.manifest.kind,
        "analytic_plan": reg.plan.manifest.analytic,
        "backend": reg.backend.name,
        "providers": reg.backend.providers(),
        "device": str(dev),
        "model_grid_xyz": list(grid.shape_xyz),
        "spacing_mm": list(grid.spacing_xyz),
        "model_grid": mg,
        "nfe": nfe,
    }
    graphed = None
    if dev.type == "cuda" and reg.backend.name == "torch":
        from ._cuda_graph import unsupported_reason

        why = unsupported_reason(reg, reg._select_stages(None))
        if why is None:
            graphed = Registrar(reg.plan, device=dev, backend="torch", cuda_graph=True)
            t0 = time.perf_counter()
            graphed.register_model_grid(moving, fixed)  # capture (warm-up included)
            _sync(dev)
            out["capture_s"] = time.perf_counter() - t0
            out["model_grid_graphed"], _ = _model_grid_run(graphed, moving, fixed, 1, repeats)
        else:
            out["model_grid_graphed"] = {"unsupported": why}
    runner = graphed or reg
    if end_to_end:
        mov_h, fix_h, what = _host_pair(grid, moving, fixed, pair_dir)
        e2e, res = _time(lambda: runner.register(mov_h, fix_h), dev, max(1, warmup // 2), max(3, repeats // 3))
        parts: dict[str, list[float]] = {}
        for _ in range(max(3, repeats // 3)):  # the split, from the timings each result reports
            r = runner.register(mov_h, fix_h)
            for k, v in r.timings.items():
                parts.setdefault(k, []).append(v)
        out["end_to_end"] = {
            "whole": _percentiles(e2e),
            "input": what,
            "graphed": graphed is not None,
            **{k: _percentiles(v) for k, v in parts.items() if k != "total"},
        }
        out["nfe_end_to_end"] = res.nfe
    tp = {}
    for b in batches:
        try:
            mb, fb = moving.expand(b, *moving.shape[1:]).contiguous(), fixed.expand(b, *fixed.shape[1:]).contiguous()
            times, _ = _time(lambda: runner.register_model_grid(mb, fb), dev, 1, max(2, repeats // 4))
            tp[f"batch_{b}"] = {"pairs_per_s": b / (_percentiles(times)["p50_ms"] / 1e3), **_percentiles(times)}
        except Exception as exc:  # e.g. out of memory: report and go on
            tp[f"batch_{b}"] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    out["throughput"] = tp
    if dev.type == "cuda":
        out["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def bench_warp(grid: Grid, device: torch.device, repeats: int, warmup: int) -> dict:
    vol = torch.rand(1, 1, *grid.shape_dhw, device=device)
    chain = TransformChain([RigidTransform(torch.tensor([[0.1, 0.2, -0.1, 3.0, 1.0, -2.0]], device=device))])
    disp, _ = _time(lambda: warp_chain(vol, grid, chain, grid), device, warmup, repeats)
    ref, _ = _time(lambda: warp_chain_reference(vol, grid, chain, grid), device, warmup, repeats)
    kernel = any(k == (device.type, ("rigid",)) for k in registered_kernels())
    return {
        "shape_xyz": list(grid.shape_xyz),
        "dispatch": _percentiles(disp),
        "reference": _percentiles(ref),
        "dispatch_is_kernel": kernel,
    }


def _peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20


def _cuda_time(fn, warmup: int, repeats: int, inner: int = 10):
    """Per-call device time of ``fn`` (CUDA events around ``inner`` back-to-back calls, so launch
    latency overlaps and no host sync is counted), ``repeats`` samples; returns (seconds list, output)."""
    out = None
    for _ in range(max(1, warmup)):
        out = fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return times, out


def bench_cuda_warp(device: torch.device, repeats: int, warmup: int, shape_xyz=(240, 240, 160)) -> dict:
    """The rigid warp of a float32 volume by the fused kernel vs ``F.affine_grid`` + ``F.grid_sample``
    (device time, peak memory, agreement). Errors are reported, not raised."""
    import torch.nn.functional as F

    from .warp import _cuda

    grid = Grid(tuple(shape_xyz), (1.0, 1.0, 1.0))
    ok, why = _cuda.available()
    out: dict = {"shape_xyz": list(grid.shape_xyz), "kernels": ok, "kernels_info": why}
    try:
        g = torch.Generator(device=device).manual_seed(0)
        vol = torch.rand(1, 1, *grid.shape_dhw, device=device, generator=g)
        chain = TransformChain([RigidTransform(torch.tensor([[0.1, 0.2, -0.1, 3.0, 1.0, -2.0]], device=device))])
        m = RigidTransform(chain.transforms[0].state).matrix[0]
        half = torch.tensor([max(e, 1e-12) / 2.0 for e in grid.extent_xyz], device=device)
        theta_n = torch.cat((m[:3, :3] * half[None, :] / half[:, None], (m[:3, 3] / half)[:, None]), 1)[None]

        def torch_warp():
            sg = F.affine_grid(theta_n, list(vol.shape), align_corners=True)
            return F.grid_sample(vol, sg, mode="bilinear", padding_mode="zeros", align_corners=True)

        call = _cuda.warp_op_call(vol, grid, chain, grid) if ok else None
        kernel = (lambda: call[0](*call[1])) if call else (lambda: warp_chain(vol, grid, chain, grid))
        torch.cuda.reset_peak_memory_stats(device)
        k_times, k_res = _cuda_time(kernel, warmup, repeats)
        k_mem = _peak_mib(device)
        torch.cuda.reset_peak_memory_stats(device)
        t_times, t_res = _cuda_time(torch_warp, warmup, repeats)
        t_mem = _peak_mib(device)
        kp, tp = _percentiles(k_times), _percentiles(t_times)
        out["warp_rigid"] = {
            "kernel": kp,
            "affine_grid_grid_sample": tp,
            "speedup_p50": tp["p50_ms"] / kp["p50_ms"],
            "timing": "device time per call (CUDA events over 10 back-to-back calls)",
            "max_abs_diff": float((k_res - t_res).abs().max()),
            "kernel_is_fused": ok,
            "peak_gpu_mem_mib": {"kernel": k_mem, "affine_grid_grid_sample": t_mem},
        }
    except Exception as exc:  # report and go on
        out["warp_rigid"] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    return out


def _fmt(p: dict) -> str:
    return f"{p['p50_ms']:10.2f} {p['p95_ms']:10.2f} {p['max_ms']:10.2f}"


def print_table(results: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"msode bench  torch {results['torch']}  {results['machine']}", file=file)
    print(f"{'backend':<12} {'device':<8} {'what':<26} {'p50 ms':>10} {'p95 ms':>10} {'max ms':>10}  NFE", file=file)
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['backend']:<12} {r['device']:<8} unavailable: {r['error']}", file=file)
            continue
        for title, key in (("model-grid", "model_grid"), ("graphed", "model_grid_graphed")):
            block = r.get(key, {})
            if "unsupported" in block:
                print(f"{r['backend']:<12} {r['device']:<8} {title}: not captured ({block['unsupported']})", file=file)
                continue
            for k, p in block.items():
                nfe = r["nfe"].get(k, sum(r["nfe"].values()) if k == "whole" else "")
                print(f"{r['backend']:<12} {r['device']:<8} {title + ' ' + k:<26} {_fmt(p)}  {nfe}", file=file)
        e2e = r.get("end_to_end", {})
        for k, p in e2e.items():
            if isinstance(p, dict):
                print(f"{r['backend']:<12} {r['device']:<8} {'end-to-end ' + k:<26} {_fmt(p)}", file=file)
        if e2e:
            print(
                f"{'':<12} {'':<8} end-to-end input: {e2e['input']}{', CUDA graphs' if e2e['graphed'] else ''}",
                file=file,
            )
        tp = r.get("throughput", {})
        if tp:
            cells = [
                f"{k.replace('_', ' ')}: " + (f"{v['pairs_per_s']:.2f} pairs/s" if "pairs_per_s" in v else v["error"])
                for k, v in tp.items()
            ]
            print(f"{'':<12} {'':<8} throughput (model grid) {'; '.join(cells)}", file=file)
        if "peak_gpu_mem_mib" in r:
            print(f"{'':<12} {'':<8} peak GPU memory {r['peak_gpu_mem_mib']:.0f} MiB", file=file)
    w = results.get("warp")
    if w:
        print(
            f"warp rigid {w['shape_xyz']}: dispatch ({'kernel' if w['dispatch_is_kernel'] else 'reference'}) "
            f"{w['dispatch']['p50_ms']:.2f} ms p50, reference (affine points + grid_sample) {w['reference']['p50_ms']:.2f} ms p50",
            file=file,
        )
    c = results.get("cuda")
    if c:
        w = c.get("warp_rigid", {})
        if "error" in w:
            print(f"cuda warp rigid {c['shape_xyz']}: error {w['error']}", file=file)
        elif w:
            print(
                f"cuda warp rigid {c['shape_xyz']} fp32: {'fused kernel' if w['kernel_is_fused'] else 'reference (no kernel)'} "
                f"{w['kernel']['p50_ms']:.3f} ms p50, affine_grid+grid_sample {w['affine_grid_grid_sample']['p50_ms']:.3f} ms p50 "
                f"-> {w['speedup_p50']:.1f}x (device time; max |diff| {w['max_abs_diff']:.1e}; peak "
                f"{w['peak_gpu_mem_mib']['kernel']:.0f} vs {w['peak_gpu_mem_mib']['affine_grid_grid_sample']:.0f} MiB)",
                file=file,
            )
    print(f"peak RSS {results['peak_rss_mib']:.0f} MiB", file=file)
    if any(r.get("analytic_plan") for r in results["runs"]):
        print("note: ANALYTIC plan (SSD gradient descent stand-in networks), not a trained model", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msode_sdk.bench", description=__doc__.split("\n\n")[0])
    default = (
        "rigid_bspline.plan"
        if "rigid_bspline.plan" in bundled_plans()
        else (bundled_plans() or ["rigid_bspline.plan"])[0]
    )
    ap.add_argument("--plan", default=default)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", action="append", help="repeatable; default: every backend usable here")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pair", default=None, help="folder with moving*.nii[.gz] and fixed*.nii[.gz] for end to end")
    ap.add_argument("--batches", default="1,8", help="batch sizes of the throughput measurement (default 1,8)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-end-to-end", action="store_true")
    ap.add_argument("--no-cuda-extras", action="store_true", help="skip the 240x240x160 warp-kernel comparison on CUDA")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .backends import available_backends
    from .registrar import _resolve_device

    device = _resolve_device(args.device)
    backends = args.backend or [b for b, why in available_backends(device).items() if why is None]
    batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "runs": [],
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", CPU"),
    }
    for b in backends:
        try:
            results["runs"].append(
                bench_backend(
                    args.plan, str(device), b, args.repeats, args.warmup, not args.no_end_to_end, args.pair, batches
                )
            )
        except Exception as exc:  # report and continue with the other backends
            results["runs"].append({"backend": b, "device": str(device), "error": str(exc).splitlines()[0]})
    ok = [r for r in results["runs"] if "error" not in r]
    if ok:
        grid = Grid(tuple(ok[0]["model_grid_xyz"]), tuple(ok[0]["spacing_mm"]))
        results["warp"] = bench_warp(grid, device, args.repeats, args.warmup)
    if device.type == "cuda" and not args.no_cuda_extras:
        results["cuda"] = bench_cuda_warp(device, args.repeats, args.warmup)
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
