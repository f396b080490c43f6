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

The computation is the eager loop's own (:class:`msode_sdk.loop.RegistrationLoop`, one implementation),
handed a warp that always takes the fused CUDA kernels (:mod:`.warp._cuda`): pyramid levels, feature
warps and image warps. Initialisers run on the device too (``moments`` and ``multistart``: Jacobi
eigen-decompositions, fixed-size MI histograms, argmax and gather; :mod:`msode_sdk.initialize`), and the
networks through the torch backend's TorchScript modules (warmed up on a side stream before capture, as
TorchScript's profiling executor and cuDNN need).

Not capturable, and reported as such (:class:`GraphCaptureUnsupported`, or with ``cuda_graph=True`` on
the Registrar a warning, once, and the eager loop): adaptive solvers (their step count is a host
decision on the data), a non-CUDA device, a backend other than ``torch``, chains without a fused
kernel, or the kernels not building.

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

from .errors import InputError, MsodeError, PlanError
from .loop import RegistrationLoop, stage_runs
from .transforms import Grid, TransformChain

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
    out: list[tuple[str, ...]] = []
    prior: tuple[str, ...] = ()
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
                return (
                    f"stage {st.name!r} level {sc.level} uses the {sc.solver!r} solver, whose number of steps "
                    f"is decided on the host from the data; only fixed-step {list(FIXED_STEP_SOLVERS)} "
                    "schedules can be captured"
                )
    from .warp import _cuda

    ok, why = _cuda.available()
    if not ok:
        return f"the CUDA warp kernels are unavailable ({why})"
    own = [(st.transform,) for st in stage_defs]  # feature levels warp by a stage's own transform alone
    for kinds in [(), ("rigid",)] + own + _kinds_chains(stage_defs):
        if kinds not in _cuda.KINDS:
            return f"no fused CUDA kernel for the chain {list(kinds)}"
    return None


def _kernel_warp(volume: torch.Tensor, src_grid: Grid, chain: TransformChain, out_grid: Grid) -> torch.Tensor:
    """Warp through the fused kernel, never the reference (which cannot be captured)."""
    from .warp import _cuda

    call = _cuda.warp_op_call(volume, src_grid, chain, out_grid)
    if call is None:
        raise GraphCaptureUnsupported(
            f"the warp of chain {[t.kind for t in chain.transforms]} ({volume.dtype} volume) has no CUDA kernel path"
        )
    fn, args = call
    return fn(*args)


class CudaGraphRunner:
    """The captured registration of one Registrar for one stage selection, initialiser and batch size."""

    def __init__(
        self, reg, stage_defs: Sequence, batch: int, options: GraphOptions = GraphOptions(), init: str | None = None
    ):
        why = unsupported_reason(reg, stage_defs, init)
        if why is not None:
            raise GraphCaptureUnsupported(why)
        self.reg = reg
        self.stage_defs = list(stage_defs)
        self.batch = int(batch)
        self.options = options
        self.device = reg.device
        self.grid = reg.model_grid
        self.loop = RegistrationLoop(stage_runs(reg, self.stage_defs, init), self.grid, self._warp)
        self._lock = threading.Lock()
        self._capture()

    def _warp(self, volume, src_grid, chain, out_grid):
        out = _kernel_warp(volume, src_grid, chain, out_grid)
        if self.options.channels_last and out.dim() == 5:
            out = out.contiguous(memory_format=torch.channels_last_3d)
        return out

    def _run_stages(self, pyr):
        chain = TransformChain()
        stats = []
        for k in range(len(self.loop.stages)):
            y, st_stats = self._stage(k, pyr, chain)
            chain = self.loop.chain_after(chain, k, y)
            stats.append(st_stats)
        return chain, stats

    def _stage(self, k: int, pyr: dict, chain: TransformChain):
        if self.options.fp16_networks:
            with torch.autocast("cuda", dtype=torch.float16):
                return self.loop.run_stage(k, pyr, chain, self.batch)
        return self.loop.run_stage(k, pyr, chain, self.batch)

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
                    chain, _ = self._run_stages(self.loop.pyramid(self.moving, self.fixed))
                    self.loop.final_warp(self.moving, chain)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)

            self.graphs: list[tuple[str, torch.cuda.CUDAGraph]] = []
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                pyr = self.loop.pyramid(self.moving, self.fixed)
            pool = g.pool()
            self.graphs.append(("pyramid", g))
            chain = TransformChain()
            self.stats = []
            for k, st in enumerate(self.loop.stages):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    y, stats = self._stage(k, pyr, chain)
                chain = self.loop.chain_after(chain, k, y)
                self.graphs.append((st.name, g))
                self.stats.append(stats)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                self.warped = self.loop.final_warp(self.moving, chain)
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
                raise InputError(f"{name}: this graph was captured for {expect}, got {tuple(t.shape)}")
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
        for st, ok in zip(self.loop.stages, finite):
            if not ok:
                raise FloatingPointError(f"stage {st.name!r} produced non-finite parameters")
        chain = TransformChain(
            [self.loop.chain_after(TransformChain(), k, s).transforms[0] for k, s in enumerate(states)]
        )
        reports = []
        for k, (st, stats) in enumerate(zip(self.loop.stages, self.stats)):
            seconds = ms[k + 1] / 1000.0 + (ms[0] / 1000.0 if k == 0 else 0.0)  # pyramid counted in stage 1
            reports.append(StageReport(st.name, st.transform, copy.deepcopy(stats), seconds))
        return ModelGridResult(chain, warped, reports)


# --------------------------------------------------------------------------------- Registrar glue

_warned: set = set()
_glue_lock = threading.Lock()


def run_graphed(
    reg,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    stages: Sequence[str] | None = None,
    options: GraphOptions | None = None,
    init: str | None = None,
    strict: bool = False,
):
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
