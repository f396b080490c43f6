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
import copy
import functools
import gc
import json
import logging
import os
import threading
import traceback
import uuid
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from . import io as _io
from . import world
from .backends import BACKENDS, get_backend
from .errors import (
    BackendUnavailable,
    InputError,
    MsodeError,
    OutputError,
    PlanError,
    RegistrationError,
    ResourceError,
    is_out_of_memory,
)
from .integrate import SegmentStats
from .loop import (
    CONTENT_RATIO_WARNING,
    INIT_MODES,
    RegistrationLoop,
    content_ratio,
    downsample,
    fov_cuts_content,
    fov_margin,
    stage_runs,
)
from .loop import similarity as model_grid_similarity
from .plan import Plan, load_plan
from .transforms import Grid, TransformChain, jacobian_determinant

__all__ = ["Registrar", "RegistrationResult", "ModelGridResult", "StageReport", "bundled_plans", "resolve_plan_path"]

_log = logging.getLogger("msode_sdk")
MODELS_DIR = Path(__file__).resolve().parent / "models"


_PREPARE_POOL: ThreadPoolExecutor | None = None
_PREPARE_POOL_LOCK = threading.Lock()


def _prepare_pool() -> ThreadPoolExecutor:
    """Worker threads that prepare a pair's second image while the caller prepares the first."""
    global _PREPARE_POOL
    with _PREPARE_POOL_LOCK:
        if _PREPARE_POOL is None:
            _PREPARE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="msode-prepare")
        return _PREPARE_POOL


_TEAM_HELD = False


def _team_op() -> None:
    torch.ones(1 << 20).sum()  # large enough to run on every intra-op thread


def _hold_openmp_team() -> None:
    """Once per process, one multi-threaded CPU op on a long-lived preparation thread. Why: libgomp (torch's
    OpenMP on Linux) lets a thread that waits at the end of a parallel region spin ~300k rounds unless it
    counts more OpenMP threads than cores. With exactly as many, whenever anything else held a core (another
    process, a data-loading worker, a gzip in a saving thread) the registration's threads spun through each
    other's time slices: a rigid pair on 2 busy cores took 1.95-2.13 s instead of 0.95 s in register_many,
    and 11 s instead of 1 s as msode batch's first pair. A live thread that ran a parallel op keeps its own
    team and changes that count (setting OMP_WAIT_POLICY would too, but only before torch is imported)."""
    global _TEAM_HELD
    if not _TEAM_HELD:
        _prepare_pool().submit(_team_op).result()
        _TEAM_HELD = True


def _forget_prepare_pool() -> None:
    """In a forked child the pool's threads do not exist: a new pool is made on first use (else a job
    submitted there would wait forever)."""
    global _PREPARE_POOL, _PREPARE_POOL_LOCK, _TEAM_HELD
    _PREPARE_POOL = None
    _PREPARE_POOL_LOCK = threading.Lock()
    _TEAM_HELD = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_prepare_pool)


def bundled_plans() -> list[str]:
    """File names of the plans shipped inside the package."""
    return sorted(p.name for p in MODELS_DIR.glob("*.plan"))


def resolve_plan_path(plan: str | os.PathLike) -> Path:
    """A path that exists, or the name of a bundled plan (with or without ``.plan``)."""
    if not isinstance(plan, (str, os.PathLike)) or not str(plan).strip():
        raise PlanError(f"plan must be a path or a bundled plan's name, got {plan!r}; bundled: {bundled_plans()}")
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


def _load_networks(backend, plan: Plan) -> tuple[dict, dict]:
    """``(fields, features)``: the vector field of every (stage, level), and its feature network where the
    plan has one (format 2)."""
    fields, features = {}, {}
    for st in plan.manifest.stages:
        for sc in st.scales:
            fields[(st.name, sc.level)] = backend.load_network(plan, sc.networks)
            if sc.features:
                features[(st.name, sc.level)] = backend.load_features(plan, sc.features)
    return fields, features


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
            _log.warning(
                "backend auto: %s failed to load plan %r (%s); trying the next backend", cand, plan.manifest.name, exc
            )
            reasons.append(f"{cand}: {exc}")
            continue
        _log.info("backend auto -> %s on %s%s", cand, device, f" (skipped {'; '.join(reasons)})" if reasons else "")
        return backend, networks
    raise BackendUnavailable(f"no backend can run plan {plan.manifest.name!r} on {device}: {'; '.join(reasons)}")


#: report.json's similarity: a registration whose final MI is below (1 - this) x the start's logs a warning
SIMILARITY_DROP_WARNING = 0.1


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
            raise RegistrationError(
                f"registration diverged: {str(exc).strip() or 'non-finite values'} (inputs "
                f"far from what plan {self.name!r} was made for?)"
            ) from None
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'}"
            gpu = isinstance(exc, torch.cuda.OutOfMemoryError) or self.device.type == "cuda"
            traceback.clear_frames(exc.__traceback__)
        # here the handler has ended: the exception and the frames it referenced are gone
        gc.collect()
        torch.cuda.empty_cache()  # no-op unless CUDA was initialised
        raise ResourceError(
            f"out of {'GPU' if gpu else 'CPU'} memory on {self.device} in {method.__name__} "
            f"({what}); cached memory was released and the Registrar remains usable: retry "
            f"with fewer concurrent registrations, smaller inputs or another device"
        )

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
            "name": self.name,
            "transform": self.transform,
            "seconds": self.seconds,
            "nfe": self.nfe,
            "levels": [
                {
                    "solver": s.solver,
                    "t0": s.t0,
                    "t1": s.t1,
                    "nfe": s.nfe,
                    "steps": s.steps,
                    "rejected": s.rejected,
                    "truncated": s.truncated,
                }
                for s in self.levels
            ],
        }


class ModelGridResult:
    """Registration on the model grid: the chain (fixed model frame -> moving model frame, mm,
    centre-relative), the warped moving image ``(N, 1, D, H, W)`` and the stages' reports.

    ``warped`` may be given as a zero-argument function: it then runs on first access (``register``
    resamples the native moving image instead and never needs the model-grid one). ``images``: the
    registered ``(moving, fixed)`` model-grid tensors, for :meth:`similarity`. ``fields_of_view``:
    ``{"cut_content": bool, "masked_stages": [names]}`` (:mod:`msode_sdk.loop`, "Fields of view"); None
    when no fields of view were given."""

    def __init__(
        self,
        chain: TransformChain,
        warped: torch.Tensor | Callable[[], torch.Tensor],
        stages: list[StageReport],
        batch: int | None = None,
        device: torch.device | None = None,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
        fields_of_view: dict | None = None,
    ):
        self.chain = chain
        self.stages = stages
        self.images = images
        self.fields_of_view = fields_of_view
        self._warped = warped
        if isinstance(warped, torch.Tensor):
            batch, device = warped.shape[0], warped.device
        if batch is None or device is None:
            raise ValueError("ModelGridResult: a lazy warped image needs batch and device")
        self.batch: int = batch
        self.device: torch.device = device

    @property
    def warped(self) -> torch.Tensor:
        if not isinstance(self._warped, torch.Tensor):
            self._warped = self._warped()
        return self._warped

    def __repr__(self) -> str:
        return f"ModelGridResult(batch={self.batch}, stages={[s.name for s in self.stages]})"

    def displacement(self, grid: Grid) -> torch.Tensor:
        """Total displacement on ``grid`` ``(N, 3, D, H, W)``, mm, model frame (RAS axes)."""
        return self.chain.displacement(grid, self.batch, torch.float32, self.device)

    def jacobian_determinant(self, grid: Grid) -> torch.Tensor:
        """Determinant of the map's Jacobian at every voxel of ``grid`` ``(N, D, H, W)`` (finite
        differences, :func:`msode_sdk.transforms.jacobian_determinant`); <= 0 where the map folds."""
        with torch.inference_mode():
            pts = self.chain.map_grid(grid, self.batch, torch.float32, self.device)
            return jacobian_determinant(pts, list(grid.spacing_xyz))

    def similarity(self, grid: Grid) -> dict[str, list[float]] | None:
        """Mutual information (nats, 32 bins, every 3rd voxel of the model ``grid``; :func:`msode_sdk.loop.
        similarity`) between the fixed image and the moving one warped by the map so far: ``"start"`` (the
        two images' centres aligned, before any stage), then after each stage (by name); one value per
        batch item. None without the images (a result built by hand)."""
        if self.images is None:
            return None
        moving, fixed = self.images
        out = {}
        with torch.inference_mode():
            for k, name in enumerate(["start", *(s.name for s in self.stages)]):
                chain = TransformChain(self.chain.transforms[:k])
                out[name] = [round(float(v), 4) for v in model_grid_similarity(grid, chain, moving, fixed).tolist()]
        return out

    def folding(self, grid: Grid) -> dict:
        """``{"min", "fraction_nonpositive"}`` of the Jacobian determinant over ``grid`` (batch item 0)."""
        det = self.jacobian_determinant(grid)[0]
        return {"min": float(det.min()), "fraction_nonpositive": float((det <= 0).double().mean())}


def _batch_item(res: ModelGridResult, chain: TransformChain, i: int) -> ModelGridResult:
    """Item ``i`` of a batch's model-grid result (its warped image sliced when first read)."""

    def warped() -> torch.Tensor:
        return res.warped[i : i + 1]

    images = None if res.images is None else (res.images[0][i : i + 1], res.images[1][i : i + 1])
    return ModelGridResult(
        chain, warped, res.stages, batch=1, device=res.device, images=images, fields_of_view=res.fields_of_view
    )


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
    plan_kind: str = "trained"  # PlanManifest.kind: analytic | trained | the builder's training.kind
    model_grid: ModelGridResult | None = field(default=None, repr=False)
    fixed_image: _io.Image | None = field(default=None, repr=False)
    moving_image: _io.Image | None = field(default=None, repr=False)
    grid: Grid | None = field(default=None, repr=False)  # the plan's model grid
    # the model-grid measures report() adds (folding, similarity): computed on first use, then kept, so
    # report() and save() do not recompute them (nor log the similarity warning twice)
    _measures: dict | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def nfe(self) -> dict[str, int]:
        return {s.name: s.nfe for s in self.stages}

    def report(self) -> dict:
        return {
            "plan": self.plan_name,
            "analytic_plan": self.analytic_plan,
            "plan_kind": self.plan_kind,
            "backend": self.backend,
            "providers": self.providers,
            "device": self.device,
            "timings_s": self.timings,
            "nfe": self.nfe,
            "stages": [s.to_dict() for s in self.stages],
            "matrix_ras": np.asarray(self.matrix).tolist(),
            **self._model_grid_measures(),
            **self._fov_report(),
            "conventions": {
                "matrix": "RAS mm, fixed point -> moving point",
                "displacement": "LPS mm (ITK/ANTs), fixed point p -> moving point p + d(p)",
                "transform.tfm": "ITK AffineTransform, LPS, fixed -> moving (rigid part)",
            },
        }

    def _fov_report(self) -> dict:
        """Which stages masked by the images' fields of view (:mod:`msode_sdk.loop`, "Fields of view")."""
        fov = None if self.model_grid is None else self.model_grid.fields_of_view
        return {} if fov is None else {"fields_of_view": copy.deepcopy(fov)}

    def _model_grid_measures(self) -> dict:
        if self._measures is None:
            self._measures = {**self._folding_report(), **self._similarity_report()}
        return copy.deepcopy(self._measures)  # a caller may edit the report it gets

    def _folding_report(self) -> dict:
        """The map's Jacobian determinant on the model grid (the registration's own domain, centred on the
        fixed image), when a deformable stage ran: folding is where it is <= 0."""
        deformable = any(s.transform in ("bspline", "dense") for s in self.stages)
        if not deformable or self.model_grid is None or self.grid is None:
            return {}
        g = self.grid
        domain = f"model grid {'x'.join(map(str, g.shape_xyz))} at {'x'.join(f'{v:g}' for v in g.spacing_xyz)} mm"
        return {"jacobian_determinant": {"domain": domain, **self.model_grid.folding(g)}}

    def _similarity_report(self) -> dict:
        """Mutual information between the fixed image and the warped moving one on the model grid, before
        the first stage and after each (:meth:`ModelGridResult.similarity`): a registration that lowered it
        deserves a look."""
        if self.model_grid is None or self.grid is None:
            return {}
        values = self.model_grid.similarity(self.grid)
        if values is None:
            return {}
        start, final = values["start"][0], list(values.values())[-1][0]
        # a margin: an already aligned pair loses a little to interpolation (an image onto itself: 3.119 -> 3.115)
        if final < (1.0 - SIMILARITY_DROP_WARNING) * start:
            _log.warning(
                "the registration lowered the images' mutual information (%.3f at the start, %.3f after it): "
                "check the result (inputs of the same anatomy? orientation headers?)",
                start,
                final,
            )
        return {
            "similarity": {
                "metric": "mutual information, nats, 32 bins, intensities normalised to [0, 1], every 3rd "
                "voxel of the model grid; 'start': the images' centres aligned, then after each stage",
                **{name: v[0] for name, v in values.items()},
            }
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
        created: list[Path] = []  # directories this call creates, deepest last; removed again on failure
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
        targets = {
            "warped": out / "warped.nii.gz",
            "transform": out / "transform.tfm",
            "displacement": out / "displacement.nii.gz",
            "report": out / "report.json",
        }
        if preview:
            targets["preview"] = out / "preview.png"
        token = f".part-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"  # unique per call
        tmp = {k: v.with_name(f".{v.name}{token}" + "".join(v.suffixes)) for k, v in targets.items()}
        replaced = []
        try:
            # nibabel keeps the open file in the image's file_map while saving: concurrent saves of one
            # result would share it ("can't seek backwards"), so each call saves its own image objects
            _io.save_nifti(_own_image(self.warped), tmp["warped"])
            _io.write_itk_affine(tmp["transform"], self.matrix)
            _io.save_nifti(_own_image(self.displacement), tmp["displacement"], _io.DISPLACEMENT_GZIP_LEVEL)
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
                raise OutputError(
                    f"cannot write results to {out}: {exc.strerror or exc}; nothing was left behind"
                ) from None
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
        self.backend, (self._networks, self._features) = _pick_backend(backend, self.device, plan)
        _hold_openmp_team()
        m = plan.manifest
        self.model_grid = Grid(m.model_grid.shape_xyz, m.model_grid.spacing_xyz_mm)
        if m.analytic:
            _log.warning(
                "plan %r is ANALYTIC: its 'networks' are SSD gradient descent, not trained models (mono-modal only)",
                m.name,
            )

    @classmethod
    def load(
        cls,
        plan: str | os.PathLike = "rigid_bspline.plan",
        device: str = "auto",
        backend: str = "auto",
        cuda_graph=False,
    ) -> "Registrar":
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
            raise InputError(
                f"stages must be a list of stage names from {self.stage_names} (or None for all), "
                f"got {type(stages).__name__}"
            ) from None
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
    def register_model_grid(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        stages: Sequence[str] | None = None,
        init: str | None = None,
        *,
        lazy_warp: bool = False,
        fov: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ModelGridResult:
        """Register tensors already on the model grid: ``moving``, ``fixed`` ``(N, 1, D, H, W)`` float32,
        intensities normalised to [0, 1], both centred on their own image centre. Returns the chain
        (fixed model frame -> moving model frame, mm) and the warped moving tensor.

        ``init``: how rigid stages start: ``"none"`` (identity, the paper), ``"moments"``
        (principal-axes initialiser, :mod:`msode_sdk.initialize`) or ``"multistart"`` (the coarsest
        level from the identity and the 4 principal-axes candidates as one batch, the best end point by
        MI continues; rigid stage first only, else ``"moments"`` with a warning); default: the stage's
        plan parameter ``init``, else ``"none"``. ``lazy_warp``: the warped tensor is computed when first
        read (eager path; callers that resample the native images themselves never pay for it). ``fov``: the
        images' fields of view on the model grid ``(N, 1, D, H, W)`` (1 inside, 0 padding; :meth:`register`
        passes them): where either cuts content, the deformable stages ignore what lies outside the joint
        field of view (:mod:`msode_sdk.loop`, "Fields of view"); without them, no such masking."""
        if init not in (None, *INIT_MODES):
            raise InputError(f"unknown init {init!r}; valid: {list(INIT_MODES)}")
        grid = self.model_grid
        expect = (1, *grid.shape_dhw)
        for name, t in (("moving", moving), ("fixed", fixed)):
            if not isinstance(t, torch.Tensor) or t.ndim != 5 or tuple(t.shape[1:]) != expect:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(
                    f"{name}: expected a (N, {', '.join(map(str, expect))}) tensor on the model grid, got {shape}"
                )
        if moving.shape[0] != fixed.shape[0]:
            raise InputError(f"moving and fixed batch sizes differ: {moving.shape[0]} vs {fixed.shape[0]}")
        moving = moving.to(self.device, torch.float32)
        fixed = fixed.to(self.device, torch.float32)
        given_fov = fov
        if fov is not None:
            fov = (fov[0].to(self.device, torch.float32), fov[1].to(self.device, torch.float32))
            for name, m, t in (("moving", fov[0], moving), ("fixed", fov[1], fixed)):
                if m.shape != t.shape:
                    raise InputError(f"{name} field of view: expected shape {tuple(t.shape)}, got {tuple(m.shape)}")
            margin = fov_margin(self.model_grid)
            if not (fov_cuts_content(moving, fov[0], margin) or fov_cuts_content(fixed, fov[1], margin)):
                fov = None  # nothing cut: the plain loop, as registrar.ts and the CUDA graphs run it
        if fov is not None and self.cuda_graph and self.device.type == "cuda":
            _log.info("a field of view cuts the anatomy: eager loop with field-of-view masks, not the CUDA graphs")
        elif self.cuda_graph and self.device.type == "cuda":
            from ._cuda_graph import GraphOptions, run_graphed

            opts = self.cuda_graph if isinstance(self.cuda_graph, GraphOptions) else None
            res = run_graphed(self, moving, fixed, stages, options=opts, init=init)
            if res is not None:
                self._check_overlap(res.chain)
                res.images = (moving, fixed)
                res.fields_of_view = None if given_fov is None else {"cut_content": False, "masked_stages": []}
                return res
        n = moving.shape[0]
        loop = RegistrationLoop(stage_runs(self, self._select_stages(stages), init), self.model_grid)
        chain = TransformChain()
        reports = []
        with torch.inference_mode():
            pyr = loop.pyramid(moving, fixed, fov)
            for k, st in enumerate(loop.stages):
                t_start = time.perf_counter()
                y, seg_stats = loop.run_stage(k, pyr, chain, n)
                if st.init == "multistart":
                    best, score = loop.last_multistart
                    _log.info(
                        "multistart: start %s chosen (MI %s)",
                        best.tolist(),
                        [[round(float(v), 3) for v in row] for row in score],
                    )
                if loop.last_scale_search is not None:  # the stage ended with one (msode_sdk.loop)
                    index, score = loop.last_scale_search
                    _log.info(
                        "stage %s: scale search chose %s (MI %s)",
                        st.name,
                        [st.params["scale_search"][int(i)] for i in index.tolist()],
                        [[round(float(v), 3) for v in row] for row in score],
                    )
                if not bool(torch.isfinite(y).all()):
                    raise FloatingPointError(f"stage {st.name!r} produced non-finite parameters")
                chain = loop.chain_after(chain, k, y)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                reports.append(StageReport(st.name, st.transform, seg_stats, time.perf_counter() - t_start))
                _log.info("stage %s done: %.1f ms, NFE %d", st.name, reports[-1].seconds * 1000, reports[-1].nfe)
            self._check_overlap(chain)
            masked = None
            if given_fov is not None:
                names = [st.name for st in loop.stages if loop.fov_masks(st)]
                masked = {"cut_content": fov is not None, "masked_stages": names}
            if not lazy_warp:
                return ModelGridResult(
                    chain, loop.final_warp(moving, chain), reports, images=(moving, fixed), fields_of_view=masked
                )

        def final_warp(chain: TransformChain = chain) -> torch.Tensor:
            with torch.inference_mode():
                return loop.final_warp(moving, chain)

        return ModelGridResult(
            chain, final_warp, reports, batch=n, device=moving.device, images=(moving, fixed), fields_of_view=masked
        )

    def _check_overlap(self, chain: TransformChain) -> None:
        """A rigid result that maps the fixed model grid's centre further than the grid's own extent (per
        axis) has left the moving model grid entirely: the solve ran away (e.g. on images with nothing in
        common) and its finite but absurd numbers must not come back as a result. ``FloatingPointError``:
        the caller's RegistrationError. One small host read per registration."""
        a = chain.affine_part()
        if a is None:
            return
        t = a[:, :3, 3].detach().double().abs().cpu()  # (N, 3) mm: where the fixed centre maps to
        extent = torch.tensor([n * sp for n, sp in zip(self.model_grid.shape_xyz, self.model_grid.spacing_xyz)])
        finite = torch.isfinite(t).all(dim=1)
        if not bool(finite.all()):  # a finite state whose matrix overflowed
            raise FloatingPointError(f"the rigid result of pair {int((~finite).nonzero()[0, 0])} is not finite")
        bad = (t > extent).any(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"the rigid result of pair {i} moves the fixed image's centre by "
                f"{[round(float(v), 1) for v in a[i, :3, 3].tolist()]} mm, beyond the model grid's extent "
                f"{[round(float(v), 1) for v in extent.tolist()]} mm: the images no longer overlap"
            )

    @staticmethod
    def _downsample(vol: torch.Tensor, grid: Grid, level_grid: Grid) -> torch.Tensor:
        """A pyramid level of ``vol`` (:func:`msode_sdk.loop.downsample`; kept for training code)."""
        return downsample(vol, grid, level_grid)

    # ------------------------------------------------------------------------------ world space

    def prepare(self, image, name: str) -> tuple[_io.Image, np.ndarray, torch.Tensor]:
        """Validate an input and put it on the model grid: ``(image, centre RAS, tensor (1,1,D,H,W))``."""
        p = self.prepare_image(_io.load_image(image, name), name)
        return p.image, p.centre, p.vol

    def preparation(self) -> dict:
        """What :func:`msode_sdk.io.prepare_image` needs from this plan (picklable: data-loading workers
        prepare inputs with it without the networks): model grid, centre mode, normalisation."""
        m = self.plan.manifest
        return {"grid": self.model_grid, "centre_mode": m.model_grid.centre, "normalization": dict(m.normalization)}

    def prepare_image(self, img: _io.Image, name: str, device=None) -> _io.PreparedImage:
        """A validated image on this plan's model grid (:func:`msode_sdk.io.prepare_image`), on ``device``
        (default: the registrar's)."""
        return _io.prepare_image(img, **self.preparation(), device=self.device if device is None else device, name=name)

    @_typed_failures
    def register(
        self, moving, fixed, stages: Sequence[str] | None = None, init: str | None = None
    ) -> RegistrationResult:
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
        # the two preparations side by side: their percentile selection (topk) runs on one core each
        # (CPU, 240x240x160 pair: 0.20 -> 0.12 s)
        job = _prepare_pool().submit(self.prepare_image, fixed, "fixed")
        try:
            prepared_moving = self.prepare_image(moving, "moving")
        except BaseException:
            wait([job])  # the moving image's error first, as when prepared one after the other
            raise
        pair = (prepared_moving, job.result())
        return self.register_prepared([pair], stages, init, load_seconds=[time.perf_counter() - t0])[0]

    @_typed_failures
    def register_prepared(
        self,
        pairs,
        stages: Sequence[str] | None = None,
        init: str | None = None,
        load_seconds: Sequence[float] | None = None,
    ) -> list[RegistrationResult]:
        """Register prepared ``(moving, fixed)`` pairs (:class:`msode_sdk.io.PreparedImage`, e.g. from data-
        loading workers) as one batch on the model grid, then map each back to its own world space.
        With one pair this is exactly :meth:`register`; a batch gives the same results to float32
        rounding. Each result's stage times are the batch's divided by its size (``timings["batch"]``
        says how many pairs shared them); ``load_seconds`` (per pair) is reported as ``load``."""
        pairs = list(pairs)
        if not pairs:
            return []
        n = len(pairs)
        dev = self.device
        mov = torch.cat([m.vol.to(dev) for m, _ in pairs]) if n > 1 else pairs[0][0].vol.to(dev)
        fix = torch.cat([f.vol.to(dev) for _, f in pairs]) if n > 1 else pairs[0][1].vol.to(dev)
        t1 = time.perf_counter()
        fovs = [(m.fov, f.fov) for m, f in pairs]
        fov = None
        if all(a is not None and b is not None for a, b in fovs):
            fov = (torch.cat([a.to(dev) for a, _ in fovs]), torch.cat([b.to(dev) for _, b in fovs]))
        res = self.register_model_grid(mov, fix, stages, init=init, lazy_warp=True, fov=fov)
        t2 = time.perf_counter()
        out = []
        for i, (m, f) in enumerate(pairs):
            t3 = time.perf_counter()
            chain = res.chain if n == 1 else _chain_item(res.chain, i)
            native = m.native if m.native.device == dev else None
            warped, matrix, disp = self._to_world(chain, m.image, m.centre, f.image, f.centre, native)
            t4 = time.perf_counter()
            item = res if n == 1 else _batch_item(res, chain, i)
            if item.fields_of_view is not None:  # native inputs: how much of the anatomy each holds
                item.fields_of_view = {**item.fields_of_view, "content_ratio": _content_ratio(m, f)}
            load = float(load_seconds[i]) if load_seconds is not None else 0.0
            timings = {"load": load, **{s.name: s.seconds / n for s in res.stages}, "output": t4 - t3}
            timings["total"] = load + (t2 - t1) / n + (t4 - t3)
            if n > 1:
                timings["batch"] = n
            out.append(
                RegistrationResult(
                    warped=warped,
                    matrix=matrix,
                    displacement=disp,
                    timings=timings,
                    stages=res.stages,
                    plan_name=self.name,
                    backend=self.backend.name,
                    providers=self.backend.providers(),
                    device=str(self.device),
                    analytic_plan=self.plan.manifest.analytic,
                    plan_kind=self.plan.manifest.kind,
                    model_grid=item,
                    fixed_image=f.image,
                    moving_image=m.image,
                    grid=self.model_grid,
                )
            )
        return out

    def register_prepared_or_each(
        self,
        pairs,
        stages: Sequence[str] | None = None,
        init: str | None = None,
        load_seconds: Sequence[float] | None = None,
    ) -> list:
        """:meth:`register_prepared` of a batch, with each failure in place: when the batch as a whole fails
        (e.g. out of memory), each pair is registered on its own and the ones that still fail come back as
        their :class:`MsodeError` instead of a :class:`RegistrationResult`."""
        pairs = list(pairs)
        loads = list(load_seconds) if load_seconds is not None else [0.0] * len(pairs)
        try:
            return list(self.register_prepared(pairs, stages, init, load_seconds=loads))
        except MsodeError as exc:
            if len(pairs) == 1:
                return [exc]
        results: list = []
        for p, s in zip(pairs, loads):  # one pair spoilt the batch: each on its own, errors per pair
            try:
                results += self.register_prepared([p], stages, init, load_seconds=[s])
            except MsodeError as one:
                results.append(one)
        return results

    def register_many(
        self,
        pairs,
        batch_size: int = 1,
        stages: Sequence[str] | None = None,
        init: str | None = None,
        errors: str = "raise",
    ):
        """Register many ``(moving, fixed)`` pairs (each input as :meth:`register` takes it), ``batch_size``
        at a time on the model grid; yields one :class:`RegistrationResult` per pair, in order.
        ``errors="raise"`` stops at the first pair that fails; ``errors="return"`` yields the
        :class:`MsodeError` in its place and goes on. On 2 CPU cores a batch does not pay (measured:
        batch 8 at 0.25 pairs/s vs 0.60 at batch 1); on a GPU it does."""
        if errors not in ("raise", "return"):
            raise InputError(f"errors must be 'raise' or 'return', got {errors!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._select_stages(stages)
        pending: list = []  # (index, prepared pair, load seconds)
        done: dict = {}

        def flush():
            if not pending:
                return
            results = self.register_prepared_or_each(
                [p for _, p, _ in pending], stages, init, load_seconds=[s for _, _, s in pending]
            )
            if errors == "raise":
                for r in results:
                    if isinstance(r, MsodeError):
                        raise r
            for (i, _, _), r in zip(pending, results):
                done[i] = r
            pending.clear()

        next_out = 0
        for i, pair in enumerate(pairs):
            t0 = time.perf_counter()
            try:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    what = f"a {type(pair).__name__} of {len(pair)}" if isinstance(pair, (tuple, list)) else repr(pair)
                    raise InputError(f"pair {i}: expected (moving, fixed), got {what[:80]}")
                moving, fixed = pair
                prepared = (
                    self.prepare_image(_io.load_image(moving, "moving"), "moving"),
                    self.prepare_image(_io.load_image(fixed, "fixed"), "fixed"),
                )
            except MsodeError as exc:
                if errors == "raise":
                    raise
                done[i] = exc
            else:
                pending.append((i, prepared, time.perf_counter() - t0))
                if len(pending) == batch_size:
                    flush()
            while next_out in done and not pending:
                yield done.pop(next_out)
                next_out += 1
        flush()
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    def _to_world(self, chain: TransformChain, mov_img, c_m, fix_img, c_f, mov_native: torch.Tensor | None = None):
        """World outputs on the fixed native grid (see RegistrationResult), on the registrar's device, by
        :func:`msode_sdk.world.world_outputs` (what ``registrar.ts`` runs too) for the chains plans produce
        (``[rigid?, bspline | dense?]``); any other chain maps every native point through it."""
        dev = self.device
        shape = [int(n) for n in fix_img.shape]
        if mov_native is None:
            mov_native = _io.native_tensor(mov_img.array, dev)
        f64 = torch.float64
        aff_f = torch.from_numpy(np.asarray(fix_img.affine, dtype=np.float64)).to(dev)
        aff_m = torch.from_numpy(np.asarray(mov_img.affine, dtype=np.float64)).to(dev)
        cm = torch.as_tensor(np.asarray(c_m, dtype=np.float64), device=dev)
        cf = torch.as_tensor(np.asarray(c_f, dtype=np.float64), device=dev)
        kinds = [t.kind for t in chain.transforms]
        a = chain.affine_part()
        a_model = torch.eye(4, dtype=f64, device=dev) if a is None else a[0].detach().to(dev, f64)
        half = [sp / 2.0 for sp in self.model_grid.spacing_xyz]
        with torch.inference_mode():
            if kinds in ([], ["rigid"], ["bspline"], ["dense"], ["rigid", "bspline"], ["rigid", "dense"]):
                deform: Any = chain.transforms[-1] if kinds and kinds[-1] != "rigid" else None
                coeffs = field = None
                bparams: list[float] = []
                fparams: list[float] = []
                if deform is not None and deform.kind == "bspline":
                    coeffs = deform.state[:1]
                    bparams = [*deform.lattice.control_spacing, *(float(n) for n in deform.lattice.shape_xyz)]
                elif deform is not None:
                    field = deform.state[:1]
                    fparams = [*(float(n) for n in deform.grid.shape_xyz), *deform.grid.spacing_xyz]
                warped, disp, matrix = world.world_outputs(
                    a_model, coeffs, bparams, field, fparams, mov_native, aff_m, cm, shape, aff_f, cf, half
                )
            else:  # any other chain: map every native point through it
                t_f = torch.eye(4, dtype=f64, device=dev)
                t_f[:3, 3] = -cf
                vox_to_x = t_f @ aff_f
                x = world.affine_field(vox_to_x[:3], shape)[None]
                phi = chain.densified(tuple(half)).map_points(x)
                t_m = torch.eye(4, dtype=f64, device=dev)
                t_m[:3, 3] = cm
                to_g = world.index_to_normalised([int(n) for n in mov_img.shape], dev) @ torch.linalg.inv(aff_m) @ t_m
                g = (phi @ to_g[:3, :3].T.float() + to_g[:3, 3].float())[0]
                disp = ((phi - x + (cm - cf).float()) * torch.tensor([-1.0, -1.0, 1.0], device=dev))[0]
                warped = F.grid_sample(mov_native, g[None], mode="bilinear", padding_mode="zeros", align_corners=True)[
                    0, 0
                ]
                matrix = t_m @ a_model @ t_f
        # a finite state can still give a non-finite map (a huge step overflowing the matrix or the field);
        # the field's sum is one cheap pass and is not finite if any value is (or if they are absurd)
        for what, v in (("matrix", matrix), ("displacement field", disp.sum())):
            if not bool(torch.isfinite(v).all()):
                raise FloatingPointError(f"the {what} of the result is not finite")
        warped_img = _io.world_nifti(warped.cpu().numpy(), fix_img.affine)
        disp_img = _io.displacement_nifti(disp.cpu().numpy(), fix_img.affine, vectors="lps")
        return warped_img, matrix.cpu().numpy(), disp_img


def _content_ratio(moving, fixed) -> float:
    """:func:`msode_sdk.loop.content_ratio` of two prepared images (rounded), with a warning below
    :data:`~msode_sdk.loop.CONTENT_RATIO_WARNING`."""
    ratios, moving_smaller = content_ratio(moving.vol, fixed.vol.to(moving.vol.device))
    ratio = round(float(ratios[0]), 3)
    if ratio < CONTENT_RATIO_WARNING:
        smaller = "moving" if bool(moving_smaller[0]) else "fixed"
        _log.warning(
            "the %s image's field of view holds %.0f %% of the anatomy the other image holds (model-grid voxels "
            "with content): a field of view this small registers unreliably; check the result",
            smaller,
            100 * ratio,
        )
    return ratio


def _chain_item(chain: TransformChain, i: int) -> TransformChain:
    """Pair ``i`` of a batched chain (every stage's state sliced to batch 1)."""
    out = []
    for t in chain.transforms:
        item = copy.copy(t)
        item.state = t.state[i : i + 1]
        out.append(item)
    return TransformChain(out)
