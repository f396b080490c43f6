"""CUDA-graph runner of :meth:`Registrar.register_model_grid` for fixed-step plans.

A registration whose every stage integrates with fixed steps (``euler`` / ``heun``) is a fixed
sequence of kernels: the pyramid, for each step the warp of the moving level through the chain, the
network and the state update, and the final warp. It is captured once per (Registrar, stages, batch)
with :mod:`torch.cuda.graphs` and replayed for every later pair:

* static input buffers ``moving`` / ``fixed`` ``(N, 1, D, H, W)``: each call copies its inputs in;
* graphs, replayed back to back on the current stream with no host synchronisation between them:
  the pyramid, one per stage, the final warp (sharing one memory pool; CUDA events between them give
  the per-stage times of :class:`~msode_sdk.registrar.StageReport`);
* one host synchronisation at the end, which also checks that every state is finite; the outputs are
  cloned out of the static buffers, so results of earlier calls stay valid;
* the result is the :class:`~msode_sdk.registrar.ModelGridResult` of the eager loop: same chain kinds,
  warped image, per-level solver statistics (NFE, steps) and stage times.

Everything in the graphs runs on the device: warps through the fused CUDA kernels (:mod:`.warp._cuda`;
the PyTorch reference copies a host tensor per call and cannot be captured), pyramid levels through
the same ``resample`` kernel (the eager loop uses ``grid_sample``; they agree to ~1e-6), dense states
carried between levels by the ``chain_displacement`` kernel, networks through the torch backend's
TorchScript modules (warmed up on a side stream before capture, as TorchScript's profiling executor
and cuDNN need).

Not capturable, and reported as such (:class:`GraphCaptureUnsupported`, or with ``cuda_graph=True`` on
the Registrar a warning, once, and the eager loop): adaptive solvers (their step count is a host
decision on the data), the ``moments`` initialiser (eigen-decompositions and host-side choices), a
non-CUDA device, a backend other than ``torch``, chains without a fused kernel, or the kernels not
building.

Options (:class:`GraphOptions`): ``fp16_networks`` runs the networks under ``torch.autocast`` float16
(weights stay fp32; only for networks validated in fp16 -- the analytic SSD fields are not),
``channels_last`` hands the networks ``channels_last_3d`` inputs.

Use: ``Registrar.load(plan, device="cuda", backend="torch", cuda_graph=True)`` (or a
:class:`GraphOptions`); or :func:`run_graphed` directly (``strict=True`` raises instead of falling back).
"""
from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import MsodeError, PlanError
from .integrate import LevelSchedule, get_solver
from .transforms import DenseTransform, Grid, TransformChain, initial_state, make_transform

__all__ = ["GraphOptions", "GraphCaptureUnsupported", "CudaGraphRunner", "run_graphed", "unsupported_reason"]

_log = logging.getLogger("msode_sdk")

FIXED_STEP_SOLVERS = ("euler", "heun")


class GraphCaptureUnsupported(MsodeError, RuntimeError):
    """This registration cannot be captured in a CUDA graph (the message says why)."""


@dataclass(frozen=True)
class GraphOptions:
    """Options of the graphed loop (see module docstring)."""

    fp16_networks: bool = False
    channels_last: bool = False
    warmup: int = 3


def _kinds_chains(stage_defs) -> list[tuple[str, ...]]:
    out, prior = [], ()
    for st in stage_defs:
        prior = prior + (st.transform,)
        out.append(prior)
    return out


def unsupported_reason(reg, stage_defs, init: str | None = None) -> str | None:
    """Why ``reg`` cannot run ``stage_defs`` as a CUDA graph, or None when it can."""
    if reg.device.type != "cuda":
        return f"the device is {reg.device}, not CUDA"
    if reg.backend.name != "torch":
        return f"the {reg.backend.name!r} backend cannot be captured in a CUDA graph; use backend='torch'"
    for st in stage_defs:
        for sc in st.scales:
            if sc.solver not in FIXED_STEP_SOLVERS:
                return (f"stage {st.name!r} level {sc.level} uses the {sc.solver!r} solver, whose number of steps "
                        f"is decided on the host from the data; only fixed-step {list(FIXED_STEP_SOLVERS)} "
                        "schedules can be captured")
        mode = init or st.params.get("init", "none")
        if st.transform == "rigid" and mode not in (None, "none"):
            return f"stage {st.name!r} starts from the {mode!r} initialiser, which makes host-side decisions"
    from .warp import _cuda
    ok, why = _cuda.available()
    if not ok:
        return f"the CUDA warp kernels are unavailable ({why})"
    for kinds in [()] + _kinds_chains(stage_defs):
        if kinds not in _cuda.KINDS:
            return f"no fused CUDA kernel for the chain {list(kinds)}"
    return None


def _kernel_warp(volume: torch.Tensor, src_grid: Grid, chain: TransformChain, out_grid: Grid) -> torch.Tensor:
    """Warp through the fused kernel, never the reference (which cannot be captured)."""
    from .warp import _cuda
    call = _cuda.warp_op_call(volume, src_grid, chain, out_grid)
    if call is None:
        raise GraphCaptureUnsupported(
            f"the warp of chain {[t.kind for t in chain.transforms]} ({volume.dtype} volume) has no CUDA kernel path")
    fn, args = call
    return fn(*args)


class CudaGraphRunner:
    """The captured registration of one Registrar for one stage selection and batch size."""

    def __init__(self, reg, stage_defs: Sequence, batch: int, options: GraphOptions = GraphOptions(),
                 init: str | None = None):
        why = unsupported_reason(reg, stage_defs, init)
        if why is not None:
            raise GraphCaptureUnsupported(why)
        self.reg = reg
        self.stage_defs = list(stage_defs)
        self.batch = int(batch)
        self.options = options
        self.device = reg.device
        self.grid = reg.model_grid
        self._lock = threading.Lock()
        self._capture()

    # ---------------------------------------------------------------------------- the computation

    def _downsample(self, vol: torch.Tensor, level_grid: Grid) -> torch.Tensor:
        """:meth:`Registrar._downsample` (same factor-2 steps) through the ``resample`` kernel."""
        cur_grid, cur = self.grid, vol
        while cur_grid.spacing_xyz[0] * 1.5 < level_grid.spacing_xyz[0]:
            nxt = cur_grid.downsampled(2)
            cur = _kernel_warp(cur, cur_grid, TransformChain(), nxt)
            cur_grid = nxt
        if cur_grid != level_grid:
            cur = _kernel_warp(cur, cur_grid, TransformChain(), level_grid)
        return cur

    def _pyramid(self) -> dict:
        pyr = {self.grid: (self.moving, self.fixed)}
        for st in self.stage_defs:
            for sc in st.scales:
                lg = Grid(sc.shape_xyz, sc.spacing_xyz_mm)
                if lg not in pyr:
                    pyr[lg] = (self._downsample(self.moving, lg), self._downsample(self.fixed, lg))
        return pyr

    def _network_inputs(self, vol: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last:
            vol = vol.contiguous(memory_format=torch.channels_last_3d)
        return vol

    def _stage(self, st, pyr: dict, prior: TransformChain):
        """One stage, as the eager loop runs it (:func:`msode_sdk.integrate.integrate_multiscale`)."""
        grid = self.grid
        levels = [LevelSchedule(Grid(sc.shape_xyz, sc.spacing_xyz_mm),
                                get_solver(sc.solver, step_size=sc.step_size, tol=sc.tol, max_steps=sc.max_steps),
                                sc.t0, sc.t1) for sc in st.scales]
        fp16 = self.options.fp16_networks
        from .registrar import checked_velocity  # registrar imports this module lazily: no cycle at import

        def make_field(i):
            lg = levels[i].grid
            mov_l, fix_l = pyr[lg]
            fix_in = self._network_inputs(fix_l)
            net = self.reg._networks[(st.name, st.scales[i].level)]

            def f(t, state):
                tr = make_transform(st.transform, state, st.params, grid, lg)
                warped = self._network_inputs(_kernel_warp(mov_l, lg, prior.then(tr), lg))
                if fp16:
                    with torch.autocast("cuda", dtype=torch.float16):
                        v = net(warped, fix_in, t)
                else:
                    v = net(warped, fix_in, t)
                return checked_velocity(net, v, state, st.transform)
            return f

        y = initial_state(st.transform, st.params, grid, levels[0].grid, self.batch, torch.float32, self.device)
        stats = []
        for i, lv in enumerate(levels):
            if i > 0 and st.transform == "dense" and levels[i - 1].grid != lv.grid:
                y = self._carry_dense(y, levels[i - 1].grid, lv.grid)
            y, s = lv.solver.integrate(make_field(i), y, lv.t0, lv.t1)
            stats.append(s)
        return y, stats, levels[-1].grid

    @staticmethod
    def _carry_dense(y: torch.Tensor, from_grid: Grid, to_grid: Grid) -> torch.Tensor:
        """:func:`msode_sdk.transforms.carry_state` for a dense field, by the displacement kernel."""
        from .warp import _ops
        return _ops.op("chain_displacement")(None, None, y, [], list(from_grid.spacing_xyz),
                                             list(to_grid.spacing_xyz), list(to_grid.shape_xyz))

    def _run_all(self):
        """Eager run of the whole computation on the static buffers (the warm-up; the graphs capture
        exactly these calls): returns ``(chain, warped, per-stage statistics)``."""
        pyr = self._pyramid()
        chain = TransformChain()
        stats = []
        for st in self.stage_defs:
            y, st_stats, last_grid = self._stage(st, pyr, chain)
            chain = chain.then(make_transform(st.transform, y, st.params, self.grid, last_grid))
            stats.append(st_stats)
        return chain, _kernel_warp(self.moving, self.grid, chain, self.grid), stats

    # ------------------------------------------------------------------------------------ capture

    def _capture(self) -> None:
        dev = self.device
        shape = (self.batch, 1, *self.grid.shape_dhw)
        with torch.cuda.device(dev), torch.inference_mode():
            gen = torch.Generator(device=dev).manual_seed(0)
            self.moving = torch.rand(shape, device=dev, generator=gen)
            self.fixed = torch.rand(shape, device=dev, generator=gen)
            # Warm-up on a side stream: TorchScript's profiling runs, cuDNN/cuBLAS handles, lazy inits.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(max(1, int(self.options.warmup))):
                    self._run_all()
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)

            self.graphs: list[tuple[str, torch.cuda.CUDAGraph]] = []
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                pyr = self._pyramid()
            pool = g.pool()
            self.graphs.append(("pyramid", g))
            chain = TransformChain()
            self.stats, self.last_grids = [], []
            for st in self.stage_defs:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    y, stats, last_grid = self._stage(st, pyr, chain)
                chain = chain.then(make_transform(st.transform, y, st.params, self.grid, last_grid))
                self.graphs.append((st.name, g))
                self.stats.append(stats)
                self.last_grids.append(last_grid)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                self.warped = _kernel_warp(self.moving, self.grid, chain, self.grid)
            self.graphs.append(("final", g))
            self.pyramid = pyr  # keeps the captured buffers alive
            self.chain = chain
            torch.cuda.synchronize(dev)

    # ---------------------------------------------------------------------------------------- run

    def run(self, moving: torch.Tensor, fixed: torch.Tensor):
        """Register ``(N, 1, D, H, W)`` tensors on the model grid (N = this runner's batch) by replaying
        the graphs; returns a :class:`~msode_sdk.registrar.ModelGridResult`."""
        from .registrar import ModelGridResult, StageReport

        expect = (self.batch, 1, *self.grid.shape_dhw)
        for name, t in (("moving", moving), ("fixed", fixed)):
            if tuple(t.shape) != expect:
                raise ValueError(f"{name}: this graph was captured for {expect}, got {tuple(t.shape)}")
        dev = self.device
        with self._lock, torch.cuda.device(dev), torch.inference_mode():
            stream = torch.cuda.current_stream(dev)
            self.moving.copy_(moving, non_blocking=True)
            self.fixed.copy_(fixed, non_blocking=True)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(self.graphs) + 1)]
            events[0].record(stream)
            for (_, g), ev in zip(self.graphs, events[1:]):
                g.replay()
                ev.record(stream)
            states = [t.state.clone() for t in self.chain.transforms]
            warped = self.warped.clone()
            finite = torch.stack([torch.isfinite(s).all() for s in states]).tolist()  # the one host sync
            ms = [events[i].elapsed_time(events[i + 1]) for i in range(len(self.graphs))]
        for st, ok in zip(self.stage_defs, finite):
            if not ok:
                raise FloatingPointError(f"stage {st.name!r} produced non-finite parameters")
        chain = TransformChain([make_transform(st.transform, s, st.params, self.grid, lg)
                                for st, s, lg in zip(self.stage_defs, states, self.last_grids)])
        reports = []
        for k, (st, stats) in enumerate(zip(self.stage_defs, self.stats)):
            seconds = ms[k + 1] / 1000.0 + (ms[0] / 1000.0 if k == 0 else 0.0)  # pyramid counted in stage 1
            reports.append(StageReport(st.name, st.transform, copy.deepcopy(stats), seconds))
        return ModelGridResult(chain, warped, reports)


# --------------------------------------------------------------------------------- Registrar glue

_warned: set = set()
_glue_lock = threading.Lock()


def run_graphed(reg, moving: torch.Tensor, fixed: torch.Tensor, stages: Sequence[str] | None = None,
                options: GraphOptions | None = None, init: str | None = None, strict: bool = False):
    """Register model-grid tensors (already validated, on ``reg.device``, float32) by a captured CUDA
    graph, capturing on first use for this (stages, batch, options). Returns a ``ModelGridResult``, or
    None when the registration cannot be captured and ``strict`` is false (a warning says why, once);
    with ``strict`` that raises :class:`GraphCaptureUnsupported`."""
    options = options or GraphOptions()
    stage_defs = reg._select_stages(stages)
    key = (tuple(st.name for st in stage_defs), int(moving.shape[0]), options, init)
    runners = reg.__dict__.setdefault("_cuda_graph_runners", {})
    runner = runners.get(key)
    if runner is None:
        with _glue_lock:
            runner = runners.get(key)
            if runner is None:
                try:
                    runner = CudaGraphRunner(reg, stage_defs, moving.shape[0], options, init)
                except GraphCaptureUnsupported as exc:
                    runners[key] = exc
                    runner = exc
                except (RuntimeError, PlanError) as exc:  # the capture itself failed
                    first = (str(exc).splitlines() or [type(exc).__name__])[0]
                    err = GraphCaptureUnsupported(f"CUDA graph capture failed: {first}")
                    err.__cause__ = exc
                    runners[key] = err
                    runner = err
                else:
                    runners[key] = runner
    if isinstance(runner, GraphCaptureUnsupported):
        if strict:
            raise runner
        msg = str(runner)
        if msg not in _warned:
            _warned.add(msg)
            _log.warning("cuda_graph requested but not used: %s; running the eager loop", msg)
        return None
    return runner.run(moving, fixed)
