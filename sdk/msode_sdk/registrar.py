"""`Registrar`: load a `.plan`, register image pairs, return results in world coordinates.

Pipeline of :meth:`Registrar.register` (see DESIGN sections 3-4):

1. validate both inputs (:mod:`msode_sdk.io`), resample each onto the plan's model grid (axis-aligned
   RAS, centred on the image's FOV centre or centre of mass) and normalise intensities to [0, 1];
2. run the plan's stages (e.g. rigid then B-spline), each a multi-scale ODE over the pyramid whose
   vector field is the stage's per-level network applied to ``(moving o phi, fixed, t)``;
3. map the resulting chain back to world space on the fixed image's native grid: warped image,
   4x4 rigid/affine matrix (RAS), total displacement field (ITK/ANTs convention, LPS).

Errors: bad inputs and arguments raise :class:`~msode_sdk.errors.InputError`, bad plans
:class:`~msode_sdk.errors.PlanError`, missing devices/backends :class:`~msode_sdk.errors.BackendUnavailable`,
running out of GPU or CPU memory :class:`~msode_sdk.errors.ResourceError` (cached GPU memory is released
first; the Registrar stays usable), a diverged solve :class:`~msode_sdk.errors.RegistrationError`,
unwritable outputs :class:`~msode_sdk.errors.OutputError`; all derive from
:class:`~msode_sdk.errors.MsodeError` and carry a one-line message naming the problem.

Thread safety (contract): after loading, a Registrar holds only read-only state (the verified plan
bytes, the loaded networks, the model grid). :meth:`register` allocates everything it writes and
changes no process-global setting (it never calls ``torch.set_num_threads``, ``set_default_dtype``,
``set_grad_enabled`` or the like; ``inference_mode`` is thread-local). One Registrar may therefore
serve several threads at once, and backends whose sessions are not re-entrant serialise their calls
internally. On CPU, concurrent calls give bitwise the same results as serial calls: a torch CPU
operation's parallel split depends only on the tensor sizes and the process-wide intra-op thread count
(``torch.get_num_threads()``, which threads started later inherit), never on the calling thread.
Concurrent calls share the cores (little extra throughput on CPU) and each holds its own working
memory.

Determinism: on CPU the same inputs give the same output bits, call after call and in fresh processes,
for a fixed torch version, machine and intra-op thread count. Changing ``torch.set_num_threads``
(process-global: set it once at start-up, never per call) may change the last bits of float32
reductions. On CUDA, results are reproducible to float32 rounding; bitwise equality is only promised
on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import threading
import traceback
import uuid
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from . import io as _io
from .backends import BACKENDS, get_backend
from .errors import (BackendUnavailable, InputError, MsodeError, OutputError, PlanError, RegistrationError,
                     ResourceError)
from .integrate import LevelSchedule, SegmentStats, get_solver, integrate_multiscale
from .plan import Plan, load_plan
from .transforms import Grid, TransformChain, initial_state, make_transform
from .initialize import candidate_thetas, moments_initial_theta, mutual_information
from .transforms import carry_state
from .warp import sample_points, warp_chain

__all__ = ["Registrar", "RegistrationResult", "ModelGridResult", "StageReport", "bundled_plans", "resolve_plan_path"]

_log = logging.getLogger("msode_sdk")
INIT_MODES = ("none", "moments", "multistart")
MODELS_DIR = Path(__file__).resolve().parent / "models"


def bundled_plans() -> list[str]:
    """File names of the plans shipped inside the package."""
    return sorted(p.name for p in MODELS_DIR.glob("*.plan"))


def resolve_plan_path(plan: str | os.PathLike) -> Path:
    """A path that exists, or the name of a bundled plan (with or without ``.plan``)."""
    p = Path(plan)
    if p.exists():
        return p
    name = p.name if p.name.endswith(".plan") else p.name + ".plan"
    if str(p) in (p.name, p.name.removesuffix(".plan")) and (MODELS_DIR / name).exists():
        return MODELS_DIR / name
    raise PlanError(f"plan {str(plan)!r} is neither a file nor a bundled plan; bundled: {bundled_plans()}")


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"unsupported device {device!r}; valid: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"device {spec!r} requested but CUDA is not available (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailable(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


# Preference order of backend="auto". On CPU the TorchScript backend is the default: it was
# measured faster than ONNX Runtime's CPU provider on these networks (rule and numbers: msode_sdk.backends docstring).
_AUTO_ORDER = {"cuda": ("tensorrt", "onnxruntime", "torch"), "cpu": ("torch", "onnxruntime")}


def checked_velocity(net, v: torch.Tensor, state: torch.Tensor, transform: str) -> torch.Tensor:
    """A network's output as the state's velocity: same shape as the state (else ``PlanError``)."""
    if v.shape != state.shape:
        raise PlanError(f"network {net.member} returned shape {tuple(v.shape)}, "
                        f"expected {tuple(state.shape)} for a {transform} state")
    return v.to(state.dtype)


def _load_networks(backend, plan: Plan) -> dict:
    return {(st.name, sc.level): backend.load_network(plan, sc.networks)
            for st in plan.manifest.stages for sc in st.scales}


def _pick_backend(name: str, device: torch.device, plan: Plan):
    """``(backend, networks)``. An explicit name must work or raises; ``auto`` tries the candidates of
    :data:`_AUTO_ORDER` in turn, skipping (and logging why) those that are unavailable or that fail to
    load this plan's networks (e.g. a TensorRT engine that does not build)."""
    if name != "auto":
        backend = get_backend(name, device)
        return backend, _load_networks(backend, plan)
    formats = {fmt for st in plan.manifest.stages for sc in st.scales for fmt in sc.networks}
    reasons = []
    for cand in _AUTO_ORDER[device.type]:
        cls = BACKENDS.get(cand)
        if cls is None:
            continue
        if not set(cls.formats) & formats:
            reasons.append(f"{cand}: plan has no {'/'.join(cls.formats)} networks")
            continue
        why = cls.unavailable_reason(device)
        if why:
            reasons.append(f"{cand}: {why}")
            continue
        try:
            backend = cls(device)
            networks = _load_networks(backend, plan)
        except BackendUnavailable as exc:
            _log.warning("backend auto: %s failed to load plan %r (%s); trying the next backend", cand,
                         plan.manifest.name, exc)
            reasons.append(f"{cand}: {exc}")
            continue
        _log.info("backend auto -> %s on %s%s", cand, device, f" (skipped {'; '.join(reasons)})" if reasons else "")
        return backend, networks
    raise BackendUnavailable(f"no backend can run plan {plan.manifest.name!r} on {device}: {'; '.join(reasons)}")


_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate memory")


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA OOM, Python/numpy MemoryError, torch's CPU allocator failure, ONNX Runtime's arena."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    from_backend = isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime")
    return from_backend and any(m in str(exc).lower() for m in _OOM_MARKERS)


def _typed_failures(method):
    """Failures of ``method`` the caller can act on become typed :class:`MsodeError` s: a diverged
    solve (``FloatingPointError`` from the solvers' finiteness checks) :class:`RegistrationError`;
    running out of memory :class:`ResourceError`. For the latter the original exception (whose
    traceback frames hold the large tensors) is dropped and cached GPU memory released before the
    typed error is raised, so the caller can retry at once."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except MsodeError:
            raise
        except FloatingPointError as exc:
            raise RegistrationError(f"registration diverged: {str(exc).strip() or 'non-finite values'} (inputs "
                                    f"far from what plan {self.name!r} was made for?)") from None
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'}"
            gpu = isinstance(exc, torch.cuda.OutOfMemoryError) or self.device.type == "cuda"
            traceback.clear_frames(exc.__traceback__)
        # here the handler has ended: the exception and the frames it referenced are gone
        gc.collect()
        torch.cuda.empty_cache()  # no-op unless CUDA was initialised
        raise ResourceError(f"out of {'GPU' if gpu else 'CPU'} memory on {self.device} in {method.__name__} "
                            f"({what}); cached memory was released and the Registrar remains usable: retry "
                            f"with fewer concurrent registrations, smaller inputs or another device")
    return wrapper


@dataclass
class StageReport:
    """What one stage did: per-level solver statistics and its wall time."""

    name: str
    transform: str
    levels: list[SegmentStats]
    seconds: float

    @property
    def nfe(self) -> int:
        return sum(s.nfe for s in self.levels)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "transform": self.transform, "seconds": self.seconds, "nfe": self.nfe,
            "levels": [{"solver": s.solver, "t0": s.t0, "t1": s.t1, "nfe": s.nfe, "steps": s.steps,
                        "rejected": s.rejected, "truncated": s.truncated} for s in self.levels],
        }


@dataclass
class ModelGridResult:
    """Registration on the model grid: the chain (fixed model frame -> moving model frame, mm,
    centre-relative) and the warped moving image ``(N, 1, D, H, W)``."""

    chain: TransformChain
    warped: torch.Tensor
    stages: list[StageReport]

    def displacement(self, grid: Grid) -> torch.Tensor:
        """Total displacement on ``grid`` ``(N, 3, D, H, W)``, mm, model frame (RAS axes)."""
        return self.chain.displacement(grid, self.warped.shape[0], torch.float32, self.warped.device)


@dataclass
class RegistrationResult:
    """World-space result of :meth:`Registrar.register`.

    * ``warped``: moving resampled into the fixed image's grid (nibabel, original intensities).
    * ``matrix``: 4x4 RAS mm map of the rigid/affine part, fixed point -> moving point.
    * ``displacement``: total map on the fixed grid, ``(X, Y, Z, 1, 3)``, intent 1007, LPS mm
      (ITK/ANTs): fixed point ``p`` maps to moving point ``p + d(p)``.
    * ``timings``: seconds per step (``load``, each stage, ``output``, ``total``).
    """

    warped: nib.Nifti1Image
    matrix: np.ndarray
    displacement: nib.Nifti1Image
    timings: dict[str, float]
    stages: list[StageReport]
    plan_name: str
    backend: str
    providers: list[str]
    device: str
    analytic_plan: bool
    plan_kind: str = "trained"   # PlanManifest.kind: analytic | trained | the builder's training.kind
    model_grid: ModelGridResult | None = field(default=None, repr=False)
    fixed_image: _io.Image | None = field(default=None, repr=False)
    moving_image: _io.Image | None = field(default=None, repr=False)

    @property
    def nfe(self) -> dict[str, int]:
        return {s.name: s.nfe for s in self.stages}

    def report(self) -> dict:
        return {
            "plan": self.plan_name, "analytic_plan": self.analytic_plan, "plan_kind": self.plan_kind,
            "backend": self.backend,
            "providers": self.providers, "device": self.device, "timings_s": self.timings,
            "nfe": self.nfe, "stages": [s.to_dict() for s in self.stages],
            "matrix_ras": np.asarray(self.matrix).tolist(),
            "conventions": {"matrix": "RAS mm, fixed point -> moving point",
                            "displacement": "LPS mm (ITK/ANTs), fixed point p -> moving point p + d(p)",
                            "transform.tfm": "ITK AffineTransform, LPS, fixed -> moving (rigid part)"},
        }

    def save(self, out_dir, preview: bool = False) -> dict[str, Path]:
        """Write ``warped.nii.gz``, ``transform.tfm``, ``displacement.nii.gz``, ``report.json`` (and
        ``preview.png`` if asked) into ``out_dir``. Files are written to temporary names (unique per
        call, so concurrent saves do not collide) and renamed, so a failure leaves no partial outputs:
        this call's files and any directories it created are removed and :class:`OutputError` (an
        ``OSError``) is raised; files of an earlier run that were already replaced are removed too,
        other files in ``out_dir`` are left as they were. An ``out_dir`` that is (or lies under) a
        file raises :class:`InputError`."""
        if preview:
            from ._preview import _require_matplotlib
            _require_matplotlib()  # fail before writing anything
        out = Path(out_dir)
        created = []  # directories this call creates, deepest last; removed again on failure
        try:
            if out.exists() and not out.is_dir():
                raise InputError(f"output path {out} exists and is not a directory")
            for d in (out, *out.parents):
                if d.exists():
                    if not d.is_dir():
                        raise InputError(f"output path {out}: {d} is not a directory")
                    break
                created.insert(0, d)
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _remove_dirs(created)
            raise OutputError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
        targets = {"warped": out / "warped.nii.gz", "transform": out / "transform.tfm",
                   "displacement": out / "displacement.nii.gz", "report": out / "report.json"}
        if preview:
            targets["preview"] = out / "preview.png"
        token = f".part-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"  # unique per call
        tmp = {k: v.with_name(f".{v.name}{token}" + "".join(v.suffixes)) for k, v in targets.items()}
        replaced = []
        try:
            # nibabel keeps the open file in the image's file_map while saving: concurrent saves of one
            # result would share it ("can't seek backwards"), so each call saves its own image objects
            nib.save(_own_image(self.warped), str(tmp["warped"]))
            _io.write_itk_affine(tmp["transform"], self.matrix)
            nib.save(_own_image(self.displacement), str(tmp["displacement"]))
            tmp["report"].write_text(json.dumps(self.report(), indent=2))
            if preview:
                from ._preview import write_preview
                write_preview(tmp["preview"], self)
            for k in targets:
                os.replace(tmp[k], targets[k])
                replaced.append(targets[k])
        except BaseException as exc:
            for p in [*replaced, *tmp.values()]:
                with contextlib.suppress(OSError):
                    p.unlink()
            _remove_dirs(created)
            if isinstance(exc, OSError) and not isinstance(exc, MsodeError):
                raise OutputError(f"cannot write results to {out}: {exc.strerror or exc}; nothing was left "
                                  f"behind") from None
            raise
        return targets


def _own_image(img):
    """A new image object over the same data (no copy), with its own header copy and file map."""
    return type(img)(img.dataobj, img.affine, img.header)


def _remove_dirs(dirs) -> None:
    """Remove directories a failed save created (deepest first), if they are empty."""
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


class Registrar:
    """A loaded plan bound to a device and a network backend. See module docstring (errors, thread
    safety, determinism)."""

    def __init__(self, plan: Plan, device: str | torch.device = "auto", backend: str = "auto", cuda_graph=False):
        self.plan = plan
        self.device = _resolve_device(device)
        # cuda_graph: True or a msode_sdk._cuda_graph.GraphOptions -> register_model_grid replays a captured
        # CUDA graph when the plan allows it (fixed-step solvers), else warns once and runs eagerly.
        self.cuda_graph = cuda_graph
        if self.device.type == "cuda":
            from .warp import ensure_kernels
            ensure_kernels("cuda")  # build/load the fused warp kernels now, not in the first registration
        self.backend, self._networks = _pick_backend(backend, self.device, plan)
        m = plan.manifest
        self.model_grid = Grid(m.model_grid.shape_xyz, m.model_grid.spacing_xyz_mm)
        if m.analytic:
            _log.warning("plan %r is ANALYTIC: its 'networks' are SSD gradient descent, not trained models "
                         "(mono-modal only)", m.name)

    @classmethod
    def load(cls, plan: str | os.PathLike = "rigid_bspline.plan", device: str = "auto", backend: str = "auto",
             cuda_graph=False) -> "Registrar":
        """Load a plan by path or bundled name; ``device``: auto | cpu | cuda[:n];
        ``backend``: auto | torch | onnxruntime | tensorrt; ``cuda_graph``: replay the registration as a
        captured CUDA graph when possible (see :mod:`msode_sdk._cuda_graph`)."""
        return cls(load_plan(resolve_plan_path(plan)), device=device, backend=backend, cuda_graph=cuda_graph)

    @property
    def name(self) -> str:
        return self.plan.manifest.name

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.plan.manifest.stages]

    def _select_stages(self, stages: Sequence[str] | None):
        all_stages = self.plan.manifest.stages
        if stages is None:
            return list(all_stages)
        if isinstance(stages, str):  # one stage name
            stages = [stages]
        try:
            stages = list(stages)
        except TypeError:
            raise InputError(f"stages must be a list of stage names from {self.stage_names} (or None for all), "
                             f"got {type(stages).__name__}") from None
        wrong = [type(s).__name__ for s in stages if not isinstance(s, str)]
        if wrong:
            raise InputError(f"stage names must be strings from {self.stage_names}, got {', '.join(wrong)}")
        if not stages:
            raise InputError(f"stages is empty; choose from {self.stage_names} (or None for all)")
        unknown = [s for s in stages if s not in self.stage_names]
        if unknown:
            raise InputError(f"unknown stage(s) {unknown}; this plan has {self.stage_names}")
        return [s for s in all_stages if s.name in stages]

    # ------------------------------------------------------------------ model-grid engine (tensors)

    @_typed_failures
    def register_model_grid(self, moving: torch.Tensor, fixed: torch.Tensor, stages: Sequence[str] | None = None,
                            init: str | None = None) -> ModelGridResult:
        """Register tensors already on the model grid: ``moving``, ``fixed`` ``(N, 1, D, H, W)`` float32,
        intensities normalised to [0, 1], both centred on their own image centre. Returns the chain
        (fixed model frame -> moving model frame, mm) and the warped moving tensor.

        ``init``: how rigid stages start: ``"none"`` (identity, the paper), ``"moments"``
        (principal-axes initialiser, :mod:`msode_sdk.initialize`) or ``"multistart"`` (the coarsest
        level from the identity and the 4 principal-axes candidates as one batch, the best end point by
        MI continues; rigid stage first only, else ``"moments"`` with a warning); default: the stage's
        plan parameter ``init``, else ``"none"``."""
        if init not in (None, *INIT_MODES):
            raise InputError(f"unknown init {init!r}; valid: {list(INIT_MODES)}")
        grid = self.model_grid
        expect = (1, *grid.shape_dhw)
        for name, t in (("moving", moving), ("fixed", fixed)):
            if not isinstance(t, torch.Tensor) or t.ndim != 5 or tuple(t.shape[1:]) != expect:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(f"{name}: expected a (N, {', '.join(map(str, expect))}) tensor on the model grid, got {shape}")
        if moving.shape[0] != fixed.shape[0]:
            raise InputError(f"moving and fixed batch sizes differ: {moving.shape[0]} vs {fixed.shape[0]}")
        moving = moving.to(self.device, torch.float32)
        fixed = fixed.to(self.device, torch.float32)
        if self.cuda_graph and self.device.type == "cuda":
            from ._cuda_graph import GraphOptions, run_graphed
            opts = self.cuda_graph if isinstance(self.cuda_graph, GraphOptions) else None
            res = run_graphed(self, moving, fixed, stages, options=opts, init=init)
            if res is not None:
                return res
        n = moving.shape[0]
        pyramids: dict[Grid, tuple[torch.Tensor, torch.Tensor]] = {grid: (moving, fixed)}
        chain = TransformChain()
        reports = []
        with torch.inference_mode():
            for st in self._select_stages(stages):
                t_start = time.perf_counter()
                levels = []
                for sc in st.scales:
                    lg = Grid(sc.shape_xyz, sc.spacing_xyz_mm)
                    if lg not in pyramids:
                        pyramids[lg] = tuple(self._downsample(v, grid, lg) for v in (moving, fixed))
                    solver = get_solver(sc.solver, step_size=sc.step_size, tol=sc.tol, max_steps=sc.max_steps)
                    levels.append(LevelSchedule(lg, solver, sc.t0, sc.t1))

                def make_field(i, st=st, levels=levels, prior=chain):
                    lg = levels[i].grid
                    mov_l, fix_l = pyramids[lg]
                    net = self._networks[(st.name, st.scales[i].level)]

                    def f(t, state):
                        tr = make_transform(st.transform, state, st.params, grid, lg)
                        warped = warp_chain(mov_l, lg, prior.then(tr), lg)
                        return checked_velocity(net, net(warped, fix_l, t), state, st.transform)
                    return f

                y0 = initial_state(st.transform, st.params, grid, levels[0].grid, n, torch.float32, self.device)
                mode = init or st.params.get("init", "none")
                if st.transform == "rigid" and mode == "multistart" and len(chain):
                    _log.warning("init='multistart' needs the rigid stage first; stage %r follows %d transform(s): "
                                 "using init='moments'", st.name, len(chain))
                    mode = "moments"
                if st.transform == "rigid" and mode == "moments":
                    mov0, fix0 = pyramids[levels[0].grid]
                    y0 = moments_initial_theta(warp_chain(mov0, levels[0].grid, chain, levels[0].grid) if len(chain) else mov0,
                                               fix0, levels[0].grid)
                if st.transform == "rigid" and mode == "multistart":
                    y, seg_stats = self._multistart(st, levels, make_field, pyramids, n)
                else:
                    y, seg_stats = integrate_multiscale(st.transform, levels, make_field, y0)
                if not bool(torch.isfinite(y).all()):
                    raise FloatingPointError(f"stage {st.name!r} produced non-finite parameters")
                chain = chain.then(make_transform(st.transform, y, st.params, grid, levels[-1].grid))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                reports.append(StageReport(st.name, st.transform, seg_stats, time.perf_counter() - t_start))
                _log.info("stage %s done: %.1f ms, NFE %d", st.name, reports[-1].seconds * 1000, reports[-1].nfe)
            warped = warp_chain(moving, grid, chain, grid)
        return ModelGridResult(chain, warped, reports)

    def _multistart(self, st, levels, make_field, pyramids, n: int):
        """Rigid stage from 5 starts (identity + 4 principal-axes candidates, :mod:`.initialize`): the
        coarsest level integrates all of them as one batch, MI on the next level picks each pair's best
        end point, the remaining levels continue from it. The first level's NFE counts batched calls."""
        grid = self.model_grid
        lg0 = levels[0].grid
        mov0, fix0 = pyramids[lg0]
        thetas = candidate_thetas(mov0, fix0, lg0)                                   # (N, K, 6)
        k = thetas.shape[1]
        mov_r, fix_r = mov0.repeat_interleave(k, 0), fix0.repeat_interleave(k, 0)
        net = self._networks[(st.name, st.scales[0].level)]

        def f(t, state):
            tr = make_transform(st.transform, state, st.params, grid, lg0)
            warped = warp_chain(mov_r, lg0, TransformChain([tr]), lg0)
            return checked_velocity(net, net(warped, fix_r, t), state, st.transform)

        y1, stats0 = levels[0].solver.integrate(f, thetas.reshape(n * k, 6), levels[0].t0, levels[0].t1)
        lg_s = levels[1].grid if len(levels) > 1 else lg0
        mov_s, fix_s = pyramids[lg_s]
        ys = carry_state(st.transform, y1, lg0, lg_s)
        warped = warp_chain(mov_s.repeat_interleave(k, 0), lg_s,
                            TransformChain([make_transform(st.transform, ys, st.params, grid, lg_s)]), lg_s)
        score = mutual_information(warped, fix_s.repeat_interleave(k, 0)).reshape(n, k)
        best = score.argmax(1)
        y = y1.reshape(n, k, -1)[torch.arange(n, device=y1.device), best]
        _log.info("multistart: start %s chosen (MI %s)", best.tolist(),
                  [[round(float(v), 3) for v in row] for row in score])
        if len(levels) == 1:
            return y, [stats0]
        y = carry_state(st.transform, y, lg0, levels[1].grid)
        y, rest = integrate_multiscale(st.transform, levels[1:], lambda i: make_field(i + 1), y)
        return y, [stats0, *rest]

    @staticmethod
    def _downsample(vol: torch.Tensor, grid: Grid, level_grid: Grid) -> torch.Tensor:
        """Pyramid level by repeated factor-2 steps; each step samples the finer level at the coarser
        voxel centres (mm-exact; for even sizes this is 2x2x2 averaging)."""
        cur_grid, cur = grid, vol
        while cur_grid.spacing_xyz[0] * 1.5 < level_grid.spacing_xyz[0]:
            nxt = cur_grid.downsampled(2)
            pts = nxt.points(cur.dtype, cur.device)
            cur = sample_points(cur, cur_grid, pts.unsqueeze(0).expand(cur.shape[0], *pts.shape))
            cur_grid = nxt
        if cur_grid != level_grid:
            pts = level_grid.points(cur.dtype, cur.device)
            cur = sample_points(cur, cur_grid, pts.unsqueeze(0).expand(cur.shape[0], *pts.shape))
        return cur

    # ------------------------------------------------------------------------------ world space

    def prepare(self, image, name: str) -> tuple[_io.Image, np.ndarray, torch.Tensor]:
        """Validate an input and put it on the model grid: ``(image, centre RAS, tensor (1,1,D,H,W))``."""
        img = _io.load_image(image, name)
        m = self.plan.manifest
        centre = _io.image_centre(img, m.model_grid.centre)
        vol = _io.resample_to_model_grid(img, self.model_grid, centre, self.device)
        flat = img.array.reshape(-1)
        sample = flat[:: max(1, flat.size // 2_000_000)]  # percentiles on <= 2M voxels: fast, stable
        norm = m.normalization
        try:
            vol = _io.normalise_intensity(vol, norm["low"], norm["high"], reference=sample)
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from None
        if float(vol.max()) <= 0.0:
            raise InputError(f"{name}: no image content inside the model grid around its centre")
        return img, centre, vol

    @_typed_failures
    def register(self, moving, fixed, stages: Sequence[str] | None = None, init: str | None = None) -> RegistrationResult:
        """Register ``moving`` onto ``fixed``.

        Each input: a NIfTI path, a nibabel image, or ``(array (X, Y, Z), affine 4x4 voxel->RAS mm)``.
        ``stages``: a subset of the plan's stage names (default: all, in plan order).
        ``init``: ``"none"`` | ``"moments"`` | ``"multistart"`` for rigid stages (see
        :meth:`register_model_grid`).

        Raises :class:`InputError` for bad inputs or arguments (checked, both images included, before
        any expensive work), :class:`ResourceError` when memory runs out. Safe to call from several
        threads at once (module docstring).
        """
        t0 = time.perf_counter()
        self._select_stages(stages)  # argument errors first
        moving = _io.load_image(moving, "moving")  # both inputs validated before either is resampled
        fixed = _io.load_image(fixed, "fixed")
        mov_img, c_m, mov = self.prepare(moving, "moving")
        fix_img, c_f, fix = self.prepare(fixed, "fixed")
        t1 = time.perf_counter()
        res = self.register_model_grid(mov, fix, stages, init=init)
        t2 = time.perf_counter()
        warped, matrix, disp = self._to_world(res.chain, mov_img, c_m, fix_img, c_f)
        t3 = time.perf_counter()
        timings = {"load": t1 - t0, **{s.name: s.seconds for s in res.stages}, "output": t3 - t2, "total": t3 - t0}
        return RegistrationResult(
            warped=warped, matrix=matrix, displacement=disp, timings=timings, stages=res.stages,
            plan_name=self.name, backend=self.backend.name, providers=self.backend.providers(),
            device=str(self.device), analytic_plan=self.plan.manifest.analytic, plan_kind=self.plan.manifest.kind,
            model_grid=res,
            fixed_image=fix_img, moving_image=mov_img,
        )

    def _to_world(self, chain: TransformChain, mov_img, c_m, fix_img, c_f):
        """World outputs on the fixed native grid (see RegistrationResult).

        Everything is computed in float32 in centre-relative frames (|x| < ~1 m, so ~1e-4 mm
        resolution): ``x = p - c_f`` for fixed world points ``p``, ``y = phi(x)``, moving world point
        ``q = y + c_m``. Fixed grids whose axes are parallel to RAS (any permutation and flips) take a
        separable path (exact B-spline by 1-D basis matrices); oblique grids evaluate B-spline stages
        through exact samples on a grid of half the model spacing (max error ~0.02 mm for N(0, 8 mm^2)
        coefficients on a 20 mm lattice) instead of the 64-term sum at every native voxel.
        """
        dev = self.device
        shape = fix_img.shape
        aff = np.asarray(fix_img.affine, dtype=np.float64)
        offset = aff[:3, 3] - np.asarray(c_f, dtype=np.float64)
        with torch.inference_mode():
            axis_of = _axis_permutation(aff[:3, :3])
            if axis_of is not None:
                # model axis m is native array axis axis_of[m]; 1-D coordinates along each model axis
                coords = [torch.as_tensor(aff[m, axis_of[m]] * np.arange(shape[axis_of[m]]) + offset[m],
                                          dtype=torch.float32, device=dev) for m in range(3)]
                phi = chain.map_axes(*coords)[0]                              # (Z', Y', X', 3) model order
                x = torch.stack(torch.meshgrid(coords[2], coords[1], coords[0], indexing="ij")[::-1], -1)
                # tensor dim of model axis m is 2 - m; reorder to native array order (n0, n1, n2, 3)
                order = [2 - [m for m in range(3) if axis_of[m] == a][0] for a in range(3)]
                phi, x = phi.permute(*order, 3), x.permute(*order, 3)
            else:
                ijk = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=dev) for n in shape),
                                                 indexing="ij"), -1)
                x = ijk @ torch.as_tensor(aff[:3, :3].T, dtype=torch.float32, device=dev) \
                    + torch.as_tensor(offset, dtype=torch.float32, device=dev)
                fast = chain.densified(tuple(s / 2.0 for s in self.model_grid.spacing_xyz))
                phi = fast.map_points(x[None])[0]
            # moving voxel index of q = phi + c_m, then grid_sample coordinates (align_corners=True)
            inv = np.linalg.inv(np.asarray(mov_img.affine, dtype=np.float64))
            lin = torch.as_tensor(inv[:3, :3].T, dtype=torch.float32, device=dev)
            off = torch.as_tensor(inv[:3, :3] @ np.asarray(c_m) + inv[:3, 3], dtype=torch.float32, device=dev)
            half = torch.tensor([(n - 1) / 2.0 for n in mov_img.shape], dtype=torch.float32, device=dev)
            g = (phi @ lin + off) / half - 1.0
            mov_t = _io.array_to_tensor(mov_img.array, dev)
            warped = torch.nn.functional.grid_sample(mov_t, g[None], mode="bilinear", padding_mode="zeros",
                                                     align_corners=True)[0, 0]          # (n0, n1, n2)
            # total displacement, converted to LPS in the same pass (the NIfTI stores ITK's convention)
            lps = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float32, device=dev)
            disp = (phi - x + torch.as_tensor(np.asarray(c_m) - np.asarray(c_f), dtype=torch.float32, device=dev)) * lps
        warped_img = nib.Nifti1Image(warped.cpu().numpy().astype(np.float32, copy=False), fix_img.affine)
        warped_img.set_qform(fix_img.affine, code=1)
        warped_img.set_sform(fix_img.affine, code=1)
        disp_img = _io.displacement_nifti(disp.cpu().numpy(), fix_img.affine, vectors="lps")
        a = chain.affine_part()
        a_model = np.eye(4) if a is None else a[0].detach().cpu().double().numpy()
        t_m, t_f = np.eye(4), np.eye(4)
        t_m[:3, 3] = c_m
        t_f[:3, 3] = -np.asarray(c_f)
        matrix = t_m @ a_model @ t_f
        return warped_img, matrix, disp_img


def _axis_permutation(direction: np.ndarray) -> list[int] | None:
    """For a 3x3 voxel->RAS matrix whose columns are each parallel to one RAS axis (a signed,
    scaled permutation), the native axis of each model axis x, y, z; else None (oblique)."""
    d = np.abs(direction)
    axis_of = []
    for m in range(3):
        a = int(np.argmax(d[m]))
        if d[m, a] <= 0 or np.any(np.delete(d[m], a) > 1e-6 * d[m, a]) or np.any(np.delete(d[:, a], m) > 1e-6 * d[m, a]):
            return None
        axis_of.append(a)
    return axis_of if sorted(axis_of) == [0, 1, 2] else None
