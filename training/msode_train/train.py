"""Training of MS-ODENet: configs, data sampling, the loss step, resumable checkpoints, plan export.

One YAML config (``training/msode_train/configs/*.yaml``) describes a run; :func:`load_config` merges
it over :data:`DEFAULTS` and applies ``--set a.b=value`` overrides (values parsed as YAML). Sections:

``model``   ``spacing_mm``, ``fov_mm`` (model grid = round(fov / spacing), centred on the field of view,
            as every synthetic subject and the SDK's ``centre: fov``), ``levels``, ``integrator``
            (``torchdiffeq`` | ``sdk``, see :mod:`msode_train.odenet`), ``adjoint``, ``init_from``
            (a training state ``.pt``, a stage checkpoint ``.ckpt`` or a ``.plan`` whose networks seed
            matching ``<stage>_L<l>`` networks), ``prior_plan`` / ``prior_stages`` (a plan whose stages run first,
            frozen, through the SDK itself, ``Registrar.register_model_grid``: e.g. a shipped plan's rigid stage
            in front of a deformable stage being trained; its model grid must be the config's).
``stages``  list of ``{name, transform, schedule (paper | list of {solver, step_size, tol, max_steps}),
            params, arch, arch_kwargs, train}``; stages with ``train: false`` run frozen (no_grad), e.g.
            a trained rigid stage in front of a B-spline stage being trained.
``data``    ``bank_dir`` (default ``~/.cache/msode/bank``, env ``MSODE_BANK`` overrides), ``bank_spacing_mm``
            (default: the model spacing; a coarser bank is sampled trilinearly onto the model grid),
            ``n_train``,
            ``n_val``, ``contrasts``, ``pairs`` (``random``: ordered pairs of distinct contrasts, or a
            list of ``[moving, fixed]``), ``motion`` (rigid | bspline | hybrid, the paper's
            distributions from :mod:`msode_train.data`; a list: each pair draws one of them, uniformly),
            ``motion_kwargs``, ``control_spacing_mm``.
``loss``    ``sim`` (mi | ncc | mind | content), ``sim_kwargs``, ``sim_spacing_mm`` (default: the model
            grid; else L_sim is computed on the same pairs rendered at this spacing from a bank of
            that spacing, the moving image warped by the estimated map: e.g. a 4 mm ODE with a
            2 mm loss, where the content encoder was trained), ``lambda_sim``, ``lambda_self``,
            ``self_metric`` (points | params), ``self_scale_mm``, ``lambda_reg``, ``lambda_sup``
            (beyond the paper, default 0: supervised point error against the simulated map of the
            multi-contrast pair itself).
``train``   ``steps``, ``batch_size``, ``lr`` (Adam), ``lr_decay`` (None, or ``{start, final, shape}``: from step
            ``start`` to ``steps`` the learning rate falls from ``lr`` to ``final`` along ``shape``
            (cosine | linear); a function of the step, so a resumed run continues it), ``grad_clip``, ``max_minutes`` (the run stops
            itself, checkpointed, after that), ``checkpoint_every``, ``val_every``, ``val_pairs``,
            ``out_dir`` (default ``out/train/<name>``, git-ignored), ``threads``, ``seed``, ``device`` (auto | cpu | cuda[:n]), ``progress``.
``export``  ``plan`` (write ``<out_dir>/<name>.plan`` at the end), ``formats``, ``eval_pairs``
            (held-out pairs evaluated through the SDK and recorded in the plan's metrics).

Outputs in ``out_dir``: ``config.yaml`` (resolved), ``train_log.csv`` (one row per step),
``val_log.csv``, ``loss.png`` (:func:`msode_train.plots.write_loss_plot`, at every validation and at the
end), ``state.pt`` (resumable: networks, optimiser, step, RNG, history; written
atomically every ``checkpoint_every`` steps, on SIGTERM/SIGINT and at the end), one stage
checkpoint ``<stage>.ckpt`` per stage (``msode_export.checkpoint`` format, for ``msode export``), the
plan, and TensorBoard events when ``tensorboard`` is installed.

Each step draws (numpy ``Generator`` seeded by ``seed``, part of the resumable state) ``batch_size``
training pairs: a random bank subject, a contrast pair, a motion from the paper's distribution
(``data.make_pair``: exact ground truth); and, when ``lambda_self > 0``, as many self-supervision
pairs: one image of a random subject and contrast, perturbed by a motion from the same distribution
(``fixed = moving o phi~``). Images are normalised exactly as the SDK normalises its inputs
(``msode_sdk.io.normalise_intensity`` with the plan's percentiles), so the networks see in training what
they see at inference.

Several processes or GPUs (``torchrun``): under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the
trainer joins the process group (gloo on the CPU; NCCL on ``cuda:LOCAL_RANK`` when CUDA is there and
``train.device`` is ``auto`` or ``cuda``) and wraps the model in ``DistributedDataParallel``, which
averages the gradients of the trained networks over the ranks after every backward pass.
``train.batch_size`` is then the batch *per rank*: with K ranks a step trains on ``K * batch_size``
pairs. The batch is split, not re-seeded: every rank draws the step's *global* batch specification
(subject index, contrast pair and motion of all ``K * batch_size`` training pairs, then of as many
self-supervision pairs) from the one numpy stream seeded by ``train.seed``, exactly the draws one
process with ``batch_size = K * batch_size`` makes, and renders and trains on its own slice (rank r:
members ``r * batch_size .. (r + 1) * batch_size - 1`` of both lists). Every loss term is a mean over
batch members (L_sim, L_self, L_reg, L_sup; the brain-point count, the smallest of the batch, is agreed
across the ranks), so the mean of the ranks' gradients is the gradient of the global batch's mean loss:
K ranks reproduce one process with the K-fold batch, the same samples and the same optimiser steps, up
to float32 rounding (the all-reduce sums in another order; tests/test_train_ddp.py measures it). The
numpy stream is identical on every rank, so ``state.pt`` is the same state a single process would save
and a run may be resumed with another number of ranks (same global batch: same run). Adaptive solver
levels are the exception: their step-size controller looks at the whole batch, so a rank's solve of
its slice is not the global batch's solve (they agree to the solver tolerance). Only rank 0 writes
(``config.yaml``, logs, ``state.pt``, TensorBoard, validation, stage checkpoints, the plan); logged
losses are the global means; the ranks agree on stopping (steps, ``max_minutes``, a signal) every step.
``python -m torch.distributed.run --standalone --nproc-per-node=K -m msode_train.cli CONFIG ...``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import yaml

from msode_export.checkpoint import atomic_torch_save
from msode_export.pack import PAPER_SCHEDULES, LevelSolver, build_plan
from msode_sdk.io import normalise_intensity
from msode_sdk.transforms import BSplineTransform, DenseTransform, Grid, RigidTransform, TransformChain
from msode_sdk.warp import warp_chain

from . import data as D
from .losses import brain_points, get_similarity, gradient_regulariser, point_error, self_supervision_loss
from .odenet import MSODENet, TrainStage, detach_chain
from .plots import write_loss_plot

__all__ = [
    "DEFAULTS",
    "CONFIG_DIR",
    "load_config",
    "Trainer",
    "model_grid_of",
    "train_stages_of",
    "git_commit",
    "NORMALIZATION",
    "distributed_env",
]

_log = logging.getLogger("msode_train")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
NORMALIZATION = {"method": "percentile", "low": 0.5, "high": 99.5}
STATE_FORMAT = "msode-train-state"
STATE_VERSION = 1

DEFAULTS: dict = {
    "name": "msode",
    "model": {
        "spacing_mm": 2.0,
        "fov_mm": list(D.FOV_MM),
        "levels": 3,
        "integrator": "torchdiffeq",
        "adjoint": False,
        "init_from": None,
        "prior_plan": None,
        "prior_stages": None,
    },
    "stages": [{"name": "rigid", "transform": "rigid", "schedule": "paper"}],
    "data": {
        "bank_dir": "~/.cache/msode/bank",
        "n_train": 40,
        "n_val": 4,
        "contrasts": list(D.CONTRASTS),
        "pairs": "random",
        "motion": "rigid",
        "motion_kwargs": {},
        "control_spacing_mm": D.DEFAULT_CONTROL_SPACING_MM,
        "bank_spacing_mm": None,
        "cache": 64,
    },
    "loss": {
        "sim": "mi",
        "sim_kwargs": {},
        "sim_spacing_mm": None,
        "lambda_sim": 1.0,
        "lambda_self": 1.0,
        "self_metric": "points",
        "self_scale_mm": 10.0,
        "lambda_reg": 0.0,
        "lambda_sup": 0.0,
        "self_points": 4096,
    },
    "train": {
        "steps": 1000,
        "batch_size": 1,
        "lr": 1e-4,
        "lr_decay": None,
        "grad_clip": 10.0,
        "max_minutes": 35.0,
        "checkpoint_every": 25,
        "val_every": 0,
        "val_pairs": 4,
        "out_dir": "out/train/{name}",
        "threads": None,
        "seed": 0,
        "device": "auto",
        "progress": True,
    },
    "export": {"plan": True, "formats": ["torchscript", "onnx"], "eval_pairs": 0},
}


# ---------------------------------------------------------------------------------------- config


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_path(cfg: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    cur = cfg
    for k in keys[:-1]:
        if isinstance(cur, list):
            cur = cur[int(k)]
        else:
            cur = cur.setdefault(k, {})
    last = keys[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def load_config(path_or_dict, overrides: Sequence[str] = ()) -> dict:
    """A resolved config: ``path_or_dict`` (a YAML path, a bundled config name such as ``rigid_2mm``, or
    a dict) merged over :data:`DEFAULTS`, then ``overrides`` ``"a.b=value"`` (value parsed as YAML;
    list indices allowed, e.g. ``stages.0.train=false``)."""
    if isinstance(path_or_dict, dict):
        user = path_or_dict
    else:
        p = Path(path_or_dict)
        if not p.exists():
            cand = CONFIG_DIR / (p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml")
            if not cand.exists():
                have = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
                raise FileNotFoundError(f"config {str(path_or_dict)!r} not found (bundled: {have})")
            p = cand
        user = yaml.safe_load(p.read_text()) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{p}: a config must be a YAML mapping")
    cfg = _merge(DEFAULTS, user)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.path=value")
        k, v = ov.split("=", 1)
        _set_path(cfg, k.strip(), yaml.safe_load(v))
    cfg["train"]["out_dir"] = str(cfg["train"]["out_dir"]).format(name=cfg["name"])
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict) -> None:
    from .losses import SIMILARITIES

    if cfg["loss"]["sim"] not in SIMILARITIES:
        raise ValueError(f"loss.sim {cfg['loss']['sim']!r} is not one of {list(SIMILARITIES)}")
    kinds = cfg["data"]["motion"]
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in D.MOTION_KINDS:
            raise ValueError(f"data.motion {kind!r} is not one of {list(D.MOTION_KINDS)}")
    if not cfg["stages"]:
        raise ValueError("config needs at least one stage")
    if cfg["model"].get("prior_plan") and cfg["export"].get("plan", True):
        raise ValueError(
            "model.prior_plan needs export.plan: false (a plan of the trained stages alone would lack the prior "
            "stages; build the whole plan from the stage checkpoint, e.g. scripts/build_rigid_bspline_plan.py "
            "--bspline-checkpoint)"
        )
    for c in cfg["data"]["contrasts"]:
        if c not in D.CLASS_MEANS:
            raise ValueError(f"unknown contrast {c!r}; synthetic contrasts are {list(D.CLASS_MEANS)}")
    learning_rate(cfg["train"], 0)  # validates train.lr / train.lr_decay


LR_DECAY_SHAPES = ("cosine", "linear")


def learning_rate(train_cfg: dict, step: int) -> float:
    """The Adam learning rate for the optimiser step that follows ``step`` completed steps.

    ``train.lr`` until ``lr_decay.start``, then down to ``lr_decay.final`` at ``train.steps`` along
    ``lr_decay.shape`` (cosine: ``final + (lr - final) (1 + cos(pi u)) / 2``; linear: ``lr + (final - lr) u``,
    with ``u = (step - start) / (steps - start)`` clipped to [0, 1]). A pure function of the step, so a
    resumed run continues it without scheduler state (raising ``train.steps`` on resume re-times the rest)."""
    lr = float(train_cfg["lr"])
    if not lr > 0:
        raise ValueError(f"train.lr must be > 0, got {train_cfg['lr']!r}")
    spec = train_cfg.get("lr_decay")
    if not spec:
        return lr
    if (
        not isinstance(spec, dict)
        or set(spec) - {"start", "final", "shape"}
        or "start" not in spec
        or "final" not in spec
    ):
        raise ValueError(f"train.lr_decay must be a mapping with start, final and optionally shape, got {spec!r}")
    shape = spec.get("shape", "cosine")
    if shape not in LR_DECAY_SHAPES:
        raise ValueError(f"train.lr_decay.shape {shape!r} is not one of {list(LR_DECAY_SHAPES)}")
    start, end, final = int(spec["start"]), int(train_cfg["steps"]), float(spec["final"])
    if not 0 <= final <= lr:
        raise ValueError(f"train.lr_decay.final must be in [0, lr = {lr}], got {final}")
    if not 0 <= start < end:
        raise ValueError(f"train.lr_decay.start must be in [0, train.steps = {end}), got {start}")
    u = min(max((step - start) / (end - start), 0.0), 1.0)
    if shape == "cosine":
        return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * u))
    return lr + (final - lr) * u


def model_grid_of(cfg: dict) -> Grid:
    sp = float(cfg["model"]["spacing_mm"])
    shape = tuple(max(2, int(round(n / sp))) for n in cfg["model"]["fov_mm"])
    return Grid(shape, (sp,) * 3)


def _schedule(spec, transform: str, levels: int) -> list[LevelSolver]:
    if spec in (None, "paper"):
        sched = list(PAPER_SCHEDULES[transform])
        if levels != len(sched):  # e.g. the single-scale ablation: the finest level's solver over [0, 1]
            sched = sched[-levels:] if levels < len(sched) else sched + [sched[-1]] * (levels - len(sched))
        return sched
    out = []
    for s in spec:
        out.append(LevelSolver(s["solver"], s.get("step_size"), s.get("tol"), int(s.get("max_steps", 1000))))
    if len(out) != levels:
        raise ValueError(f"schedule has {len(out)} levels, model.levels is {levels}")
    return out


def train_stages_of(cfg: dict) -> list[TrainStage]:
    levels = int(cfg["model"]["levels"])
    out = []
    for s in cfg["stages"]:
        params = dict(s.get("params") or {})
        if s["transform"] == "bspline" and "control_spacing_mm" not in params:
            params["control_spacing_mm"] = [20.0, 20.0, 20.0]
        if "control_spacing_mm" in params:
            cs = params["control_spacing_mm"]
            params["control_spacing_mm"] = [float(cs)] * 3 if isinstance(cs, (int, float)) else [float(v) for v in cs]
        out.append(
            TrainStage(
                s["name"],
                s["transform"],
                _schedule(s.get("schedule", "paper"), s["transform"], levels),
                params,
                s.get("arch"),
                dict(s.get("arch_kwargs") or {}),
            )
        )
    return out


def git_commit() -> str | None:
    """The repository's HEAD commit (read-only ``git rev-parse``), None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(spec: str) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment (``WORLD_SIZE`` > 1), else ``(0, 1, 0)``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _distributed_device(spec: str, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto`` / ``cuda`` / ``cuda:N`` when CUDA is
    available (torchrun gives each rank its own GPU), else the CPU."""
    if spec in (None, "auto") or str(spec).startswith("cuda"):
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): run at most one "
                    "rank per GPU (--nproc-per-node), or --device cpu"
                )
            return torch.device("cuda", local_rank)
        if spec not in (None, "auto"):
            raise RuntimeError(f"train.device {spec!r} but CUDA is not available")
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- chains


def stack_chains(chains: Sequence[TransformChain]) -> TransformChain:
    """Concatenate same-structure chains along the batch."""
    if len(chains) == 1:
        return chains[0]
    out = []
    for parts in zip(*(c.transforms for c in chains)):
        first = parts[0]
        state = torch.cat([p.state for p in parts], dim=0)
        if isinstance(first, RigidTransform):
            out.append(RigidTransform(state))
        elif isinstance(first, BSplineTransform):
            out.append(BSplineTransform(state, first.lattice))
        else:
            out.append(DenseTransform(state, first.grid))
    return TransformChain(out)


def slice_chain(chain: TransformChain, start: int, stop: int) -> TransformChain:
    """Batch members ``start:stop`` of a chain."""
    out = []
    for t in chain.transforms:
        if isinstance(t, RigidTransform):
            out.append(RigidTransform(t.state[start:stop]))
        elif isinstance(t, BSplineTransform):
            out.append(BSplineTransform(t.state[start:stop], t.lattice))
        else:
            out.append(DenseTransform(t.state[start:stop], t.grid))
    return TransformChain(out)


def chain_to(chain: TransformChain, device) -> TransformChain:
    """The chain with every state moved to ``device``."""
    out = []
    for t in chain.transforms:
        if isinstance(t, RigidTransform):
            out.append(RigidTransform(t.state.to(device)))
        elif isinstance(t, BSplineTransform):
            out.append(BSplineTransform(t.state.to(device), t.lattice))
        else:
            out.append(DenseTransform(t.state.to(device), t.grid))
    return TransformChain(out)


def normalise(vol: torch.Tensor, norm: dict = NORMALIZATION) -> torch.Tensor:
    """Per-image SDK normalisation of a ``(N, 1, D, H, W)`` batch (percentiles of each image)."""
    return torch.cat([normalise_intensity(v[None], norm["low"], norm["high"]) for v in vol], dim=0)


# ------------------------------------------------------------------------------------------- trainer


class Trainer:
    """A training run (see the module docstring). ``resume=True`` continues from ``out_dir/state.pt``.

    ``distributed``: ``None`` (default) joins a torchrun process group when ``WORLD_SIZE`` > 1 (initialising
    it if nobody has), ``False`` never does. Under torchrun every rank constructs a Trainer and calls
    :meth:`fit` (collective), and then :meth:`close`; only rank 0 (:attr:`is_main`) writes files."""

    def __init__(
        self,
        cfg: dict,
        resume: bool = True,
        log: Callable[[str], None] | None = None,
        distributed: bool | None = None,
    ):
        self.cfg = cfg
        tr = cfg["train"]
        self.rank, self.world_size, self.local_rank = distributed_env() if distributed in (None, True) else (0, 1, 0)
        self.is_main = self.rank == 0
        self._own_group = False
        self._closed = False
        self._ddp: torch.nn.Module | None = None
        self.log = log or (lambda msg: _log.info(msg))
        if not self.is_main:
            self.log = lambda msg: None  # rank 0 speaks for the run
        if tr.get("threads"):
            torch.set_num_threads(int(tr["threads"]))
        if self.world_size > 1:
            import torch.distributed as dist

            self.device = _distributed_device(tr.get("device", "auto"), self.local_rank)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
                self._own_group = True
            if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
                raise RuntimeError("the process group does not match torchrun's RANK / WORLD_SIZE")
        else:
            self.device = resolve_device(tr.get("device", "auto"))
        self.out_dir = Path(tr["out_dir"]).expanduser()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(int(tr["seed"]))
        self.model_grid = model_grid_of(cfg)
        self.stages = train_stages_of(cfg)
        self.model = MSODENet(
            self.model_grid, self.stages, integrator=cfg["model"]["integrator"], adjoint=bool(cfg["model"]["adjoint"])
        ).to(self.device)
        self.train_names = [s["name"] for s in cfg["stages"] if s.get("train", True)]
        if not self.train_names:
            raise ValueError("no stage has train: true")
        for st in self.stages:
            for p in self.model.stage_parameters([st.name]):
                p.requires_grad_(st.name in self.train_names)
        if cfg["model"].get("init_from"):
            self.init_from(cfg["model"]["init_from"])
        self.prior_registrar, self.prior_stages = None, None
        if cfg["model"].get("prior_plan"):
            self._load_prior(cfg["model"]["prior_plan"], cfg["model"].get("prior_stages"))
        self.opt = torch.optim.Adam(self.model.stage_parameters(self.train_names), lr=float(tr["lr"]))
        dc = cfg["data"]
        self.bank_dir = Path(os.environ.get("MSODE_BANK") or dc["bank_dir"]).expanduser()
        self.bank_spacing = float(dc.get("bank_spacing_mm") or cfg["model"]["spacing_mm"])

        def train_bank(spacing: float) -> D.SubjectBank:
            return D.SubjectBank.for_split(
                self.bank_dir,
                "train",
                int(dc["n_train"]),
                spacing=spacing,
                grid_shape=tuple(int(v) for v in cfg["model"]["fov_mm"]),
                contrasts=tuple(dc["contrasts"]),
                max_in_memory=int(dc.get("cache", 64)),
            )

        self.bank = train_bank(self.bank_spacing)
        self.rng = np.random.default_rng(int(tr["seed"]))
        lc = cfg["loss"]
        self.sim_grid, self.sim_bank = self.model_grid, None
        if lc.get("sim_spacing_mm") and abs(float(lc["sim_spacing_mm"]) - float(cfg["model"]["spacing_mm"])) > 1e-9:
            # the same subjects (same split and count) at the loss's spacing, on that bank's own grid
            self.sim_bank = train_bank(float(lc["sim_spacing_mm"]))
            self.sim_grid = self.sim_bank.grid
        sim_kwargs = dict(lc.get("sim_kwargs") or {})
        if lc["sim"] == "content":
            sim_kwargs.setdefault("spacing_mm", float(self.sim_grid.spacing_xyz[0]))
            sim_kwargs.setdefault("device", self.device)
        self.sim = get_similarity(lc["sim"], **sim_kwargs)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []
        self._stop = False
        self._tb = None
        if resume and (self.out_dir / "state.pt").exists():
            self.load_state(self.out_dir / "state.pt")
            self.log(f"resumed from {self.out_dir / 'state.pt'} at step {self.step}")
        if self.world_size > 1:
            # after any resume (every rank has read the state before rank 0 can write the next one: the
            # wrapper's constructor is collective); it broadcasts rank 0's parameters and buffers
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # no batch statistics: the buffers are constants, synchronised once at construction
            sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                else {"broadcast_buffers": False}
            )
            self._ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **sync
            )
            self.log(
                f"DistributedDataParallel: {self.world_size} ranks ({self._ddp_backend()}), batch "
                f"{int(tr['batch_size'])} per rank, {self.global_batch_size} per step"
            )

    # ----------------------------------------------------------------------------------- ranks

    @property
    def global_batch_size(self) -> int:
        """Training pairs per optimiser step: ``train.batch_size`` times the number of ranks."""
        return int(self.cfg["train"]["batch_size"]) * self.world_size

    @staticmethod
    def _ddp_backend() -> str:
        import torch.distributed as dist

        return str(dist.get_backend())

    def _all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``values`` reduced over the ranks (a copy on this rank's device; unchanged with one process)."""
        if self.world_size <= 1:
            return values
        import torch.distributed as dist

        t = values.detach().to(self.device).clone()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t

    def close(self, barrier: bool = True) -> None:
        """Leave the process group (a barrier first unless ``barrier=False``, e.g. after a failure; the group
        is destroyed only if this trainer created it); a no-op with one process or once closed."""
        if self.world_size <= 1 or self._closed:
            return
        import torch.distributed as dist

        self._closed = True
        if not dist.is_initialized():
            return
        if barrier:
            dist.barrier()
        self._ddp = None
        if self._own_group:
            dist.destroy_process_group()
            self._own_group = False

    # ----------------------------------------------------------------------------------- data

    def _contrast_pair(self) -> tuple[str, str]:
        pairs = self.cfg["data"]["pairs"]
        cons = list(self.cfg["data"]["contrasts"])
        if pairs == "random":
            if len(cons) < 2:
                return cons[0], cons[0]
            i, j = self.rng.choice(len(cons), 2, replace=False)
            return cons[i], cons[j]
        if pairs == "same":
            c = cons[self.rng.integers(len(cons))]
            return c, c
        m, f = pairs[self.rng.integers(len(pairs))]
        return m, f

    def _motion(self) -> TransformChain:
        dc = self.cfg["data"]
        kind = dc["motion"]
        if isinstance(kind, list):  # a mixture: one kind per pair, uniformly (repeat a kind to weigh it)
            kind = kind[int(self.rng.integers(len(kind)))]
        return D.sample_motion(
            self.rng,
            kind,
            self.model_grid,
            1,
            control_spacing_mm=float(dc["control_spacing_mm"]),
            **(dc.get("motion_kwargs") or {}),
        )

    def _make(self, subject, mc: str, fc: str, chain: TransformChain, grid: Grid | None = None) -> D.Pair:
        return D.make_pair(subject, mc, fc, chain, grid=grid or self.model_grid, device=self.device)

    def sample_batch(self) -> dict:
        """``batch_size`` training pairs (and self-supervision pairs when ``lambda_self > 0``; and, with
        ``loss.sim_spacing_mm``, the training pairs again at that spacing: ``sim_pairs``).

        Under torchrun: the global batch (``batch_size`` per rank) is drawn on every rank, this rank
        renders its slice (module docstring)."""
        b = int(self.cfg["train"]["batch_size"])
        mains, selfs_ = self._draw_specs(b * self.world_size)
        lo, hi = self.rank * b, (self.rank + 1) * b
        pairs, selfs, sim_pairs = [], [], []
        for idx, mc, fc, chain in mains[lo:hi]:
            pairs.append(self._make(self.bank[idx], mc, fc, chain))
            if self.sim_bank is not None:  # same subject, contrasts and motion at the loss's spacing
                sim_pairs.append(self._make(self.sim_bank[idx], mc, fc, pairs[-1].chain, self.sim_grid))
        for idx, c, _, chain in selfs_[lo:hi]:
            selfs.append(self._make(self.bank[idx], c, c, chain))
        return {"pairs": pairs, "self": selfs, "sim_pairs": sim_pairs}

    def _draw_specs(self, n: int) -> tuple[list, list]:
        """The random part of a batch of ``n``: ``(subject index, moving contrast, fixed contrast, motion)``
        of ``n`` training pairs, then of ``n`` self-supervision pairs when ``lambda_self > 0`` (the order of
        the draws from ``self.rng``; rendering a pair draws nothing)."""
        mains, selfs = [], []
        for _ in range(n):
            idx = int(self.rng.integers(len(self.bank)))
            mc, fc = self._contrast_pair()
            mains.append((idx, mc, fc, self._motion()))
        if float(self.cfg["loss"]["lambda_self"]) > 0:
            cons = list(self.cfg["data"]["contrasts"])
            for _ in range(n):
                idx = int(self.rng.integers(len(self.bank)))
                c = cons[int(self.rng.integers(len(cons)))]
                selfs.append((idx, c, c, self._motion()))
        return mains, selfs

    @staticmethod
    def _collate(pairs: Sequence[D.Pair]) -> dict:
        return {
            "moving": normalise(torch.cat([p.moving for p in pairs])),
            "fixed": normalise(torch.cat([p.fixed for p in pairs])),
            "brain": torch.cat([p.fixed_brain for p in pairs]),
            "chain": stack_chains([p.chain for p in pairs]),
        }

    # ----------------------------------------------------------------------------------- loss

    def compute_losses(self, batch: dict) -> dict:
        """All loss terms of one batch (tensors; ``loss`` is the weighted total). The training pairs and
        the self-supervision pairs go through the network as one batch (one ODE solve; on CPU, batches
        > 1 also take the much faster oneDNN convolution path)."""
        lc = self.cfg["loss"]
        g = self.model_grid
        b = self._collate(batch["pairs"])
        n_main = b["moving"].shape[0]
        s = self._collate(batch["self"]) if batch["self"] else None
        moving = b["moving"] if s is None else torch.cat((b["moving"], s["moving"]))
        fixed = b["fixed"] if s is None else torch.cat((b["fixed"], s["fixed"]))
        net = self._ddp if self._ddp is not None and torch.is_grad_enabled() else self.model
        out = net(moving, fixed, prior=self.prior_chain(moving, fixed), grad_stages=self.train_names)
        chain = slice_chain(out.chain, 0, n_main)
        terms = {}
        zero = torch.zeros((), device=self.device)
        if float(lc["lambda_sim"]) <= 0:
            terms["sim"] = zero
        elif batch.get("sim_pairs"):
            f = self._collate(batch["sim_pairs"])
            terms["sim"] = self.sim(warp_chain(f["moving"], self.sim_grid, chain, self.sim_grid), f["fixed"])
        else:
            terms["sim"] = self.sim(warp_chain(b["moving"], g, chain, g), b["fixed"])
        terms["reg"] = gradient_regulariser(chain, g) if float(lc["lambda_reg"]) > 0 else zero
        npts = int(lc.get("self_points", 4096))
        sup = point_error(chain, b["chain"], self._brain_points(b["brain"], npts))
        terms["sup"] = sup / float(lc["self_scale_mm"]) ** 2
        terms["rmse_phi"] = sup.detach().sqrt()  # RMS over (subsampled) brain points, mm
        if s is not None:
            chain_s = slice_chain(out.chain, n_main, moving.shape[0])
            states_s = [st[n_main:] for st in out.states.values()]
            terms["self"] = self_supervision_loss(
                chain_s,
                s["chain"],
                self._brain_points(s["brain"], npts),
                lc["self_metric"],
                float(lc["self_scale_mm"]),
                states_s,
                [t.state for t in s["chain"].transforms],
            )
        else:
            terms["self"] = zero
        terms["loss"] = (
            float(lc["lambda_sim"]) * terms["sim"]
            + float(lc["lambda_self"]) * terms["self"]
            + float(lc["lambda_reg"]) * terms["reg"]
            + float(lc["lambda_sup"]) * terms["sup"]
        )
        terms["nfe"] = {k: sum(v) for k, v in out.nfe.items()}
        return terms

    def _load_prior(self, plan, stages) -> None:
        from msode_sdk.registrar import Registrar

        reg = Registrar.load(plan, device=str(self.device), backend="torch")
        if reg.model_grid != self.model_grid:
            raise ValueError(
                f"model.prior_plan {plan}: model grid {reg.model_grid} differs from the config's {self.model_grid}"
            )
        names = list(stages) if stages else reg.stage_names
        unknown = [s for s in names if s not in reg.stage_names]
        if unknown:
            raise ValueError(f"model.prior_stages {unknown} not in {plan}'s stages {reg.stage_names}")
        clash = [s for s in names if s in {st.name for st in self.stages}]
        if clash:
            raise ValueError(f"model.prior_stages {clash} have the names of stages being trained; rename them")
        self.prior_registrar, self.prior_stages = reg, names
        self.log(f"prior: stages {names} of {reg.name} ({plan}) run first, frozen")

    def prior_chain(self, moving: torch.Tensor, fixed: torch.Tensor) -> TransformChain | None:
        """The frozen prior stages' chain for a batch (``model.prior_plan``), or None. Run by the SDK (inference
        mode); the states are copied out of inference mode so the trained stages' autograd can read them."""
        if self.prior_registrar is None:
            return None
        res = self.prior_registrar.register_model_grid(moving.detach(), fixed.detach(), stages=self.prior_stages)
        return detach_chain(res.chain, copy=True)

    def _brain_points(self, mask: torch.Tensor, npts: int) -> torch.Tensor:
        """:func:`losses.brain_points` of the batch; under torchrun truncated to the smallest count of all
        ranks, i.e. what the global batch gets (each member's points are a prefix of its strided list)."""
        pts = brain_points(mask, self.model_grid, npts)
        if self.world_size > 1:
            k = int(self._all_reduce(torch.tensor([pts.shape[1]], dtype=torch.int64), "min")[0])
            pts = pts[:, :k]
        return pts

    def train_step(self) -> dict:
        """One optimiser step; returns the logged row (floats)."""
        t0 = time.perf_counter()
        self.model.train()
        batch = self.sample_batch()
        t_data = time.perf_counter() - t0
        self.opt.zero_grad(set_to_none=True)
        lr = learning_rate(self.cfg["train"], self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        terms = self.compute_losses(batch)
        loss = terms["loss"]
        logged = {k: float(terms[k].detach()) for k in ("loss", "sim", "self", "reg", "sup", "rmse_phi")}
        if self.world_size > 1:  # the global batch's means (every rank also sees a non-finite loss anywhere)
            keys = ("loss", "sim", "self", "reg", "sup")
            vec = torch.stack(
                [terms[k].detach().reshape(()).double() for k in keys] + [terms["rmse_phi"].double() ** 2]
            )
            vec = self._all_reduce(vec).cpu() / self.world_size
            logged = dict(zip(keys, vec[:-1].tolist()))
            logged["rmse_phi"] = math.sqrt(max(float(vec[-1]), 0.0)) if math.isfinite(float(vec[-1])) else float("nan")
        if not math.isfinite(logged["loss"]):
            raise FloatingPointError(
                f"non-finite loss at step {self.step + 1}: { {k: float(v) for k, v in terms.items() if k != 'nfe'} }"
            )
        loss.backward()  # under torchrun DistributedDataParallel averages the gradients over the ranks
        clip = self.cfg["train"].get("grad_clip")
        params = self.model.stage_parameters(self.train_names)
        gnorm = torch.nn.utils.clip_grad_norm_(params, float(clip) if clip else float("inf"))
        self.opt.step()
        self.step += 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        row = {
            "step": self.step,
            "time_s": round(self.elapsed, 3),
            "sec_per_step": round(dt, 3),
            "data_s": round(t_data, 3),
            "loss": logged["loss"],
            "sim": logged["sim"],
            "self": logged["self"],
            "reg": logged["reg"],
            "sup": logged["sup"],
            "rmse_phi_mm": logged["rmse_phi"],
            "grad_norm": float(gnorm),
            "lr": lr,
            **{f"nfe_{k}": v for k, v in terms["nfe"].items()},
        }
        self.history.append(row)
        return row

    # ----------------------------------------------------------------------------------- validation

    def validation_pairs(self, n: int) -> list:
        """Fixed held-out validation pairs (the ``val`` split; seeds independent of training)."""
        if not hasattr(self, "_val"):
            dc = self.cfg["data"]
            bank = D.SubjectBank.for_split(
                self.bank_dir,
                "val",
                max(1, int(dc["n_val"])),
                spacing=self.bank_spacing,
                grid_shape=tuple(int(v) for v in self.cfg["model"]["fov_mm"]),
                contrasts=tuple(dc["contrasts"]),
            )
            rng = np.random.default_rng(12345)
            saved, self.rng = self.rng, rng
            try:
                out = []
                for i in range(n):
                    mc, fc = self._contrast_pair()
                    out.append(self._make(bank[i % len(bank)], mc, fc, self._motion()))
            finally:
                self.rng = saved
            self._val = out
        return self._val

    @torch.no_grad()
    def validate(self, n: int | None = None) -> dict:
        n = int(n or self.cfg["train"]["val_pairs"])
        self.model.eval()
        errs = []
        for p in self.validation_pairs(n):
            b = self._collate([p])
            out = self.model(b["moving"], b["fixed"], prior=self.prior_chain(b["moving"], b["fixed"]))
            errs.append(
                D.rmse_phi(chain_to(out.chain, "cpu"), chain_to(p.chain, "cpu"), p.grid, mask=p.fixed_brain.cpu())
            )
        errs = np.asarray(errs)
        return {
            "step": self.step,
            "val_rmse_phi_median": float(np.median(errs)),
            "val_rmse_phi_mean": float(errs.mean()),
            "val_rmse_phi_max": float(errs.max()),
            "val_success_lt2mm": float((errs < 2.0).mean()),
        }

    # ----------------------------------------------------------------------------------- loop

    def fit(self, steps: int | None = None, max_minutes: float | None = None) -> dict:
        """Train until ``steps`` (total, default ``train.steps``) or ``max_minutes`` of wall time (default
        ``train.max_minutes``) or a SIGTERM/SIGINT; checkpoints on the way and at the end. Under torchrun:
        collective (every rank calls it; the ranks agree on when to stop), rank 0 writes."""
        tr = self.cfg["train"]
        steps = int(steps if steps is not None else tr["steps"])
        max_minutes = float(max_minutes if max_minutes is not None else tr["max_minutes"] or 1e9)
        deadline = time.monotonic() + 60.0 * max_minutes
        main = self.is_main
        if main:
            self._write_config()
        self._install_signals()
        log_path = self.out_dir / "train_log.csv"
        if main:
            self._trim_csv(log_path)
            self._trim_csv(self.out_dir / "val_log.csv")
        bar = None
        if tr.get("progress", True) and main:
            try:
                from tqdm import tqdm

                bar = tqdm(total=steps, initial=self.step, desc=self.cfg["name"], dynamic_ncols=True, mininterval=5)
            except ImportError:  # pragma: no cover
                bar = None
        stop_reason = "steps"
        try:
            while self.step < steps:
                reason = self._stop_reason(deadline)
                if reason:
                    stop_reason = reason
                    break
                row = self.train_step()
                if main:
                    self._append_csv(log_path, row)
                    self._tensorboard(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{row['loss']:.4g}", rmse=f"{row['rmse_phi_mm']:.2f}", s=f"{row['sec_per_step']:.2f}"
                    )
                every = int(tr.get("checkpoint_every") or 0)
                if every and self.step % every == 0 and main:
                    self.save_state()
                ve = int(tr.get("val_every") or 0)
                if ve and self.step % ve == 0 and main:
                    v = self.validate()
                    self._append_csv(self.out_dir / "val_log.csv", v)
                    self.log(
                        f"step {self.step}: val RMSE(phi) median {v['val_rmse_phi_median']:.2f} mm, "
                        f"max {v['val_rmse_phi_max']:.2f} mm"
                    )
                    write_loss_plot(self.out_dir, self.cfg["name"])
        finally:
            if bar is not None:
                bar.close()
            if main:
                self.save_state()
                write_loss_plot(self.out_dir, self.cfg["name"])
            self._restore_signals()
        self.log(f"stopped at step {self.step} ({stop_reason}); state in {self.out_dir / 'state.pt'}")
        return {"step": self.step, "stop_reason": stop_reason}

    def _stop_reason(self, deadline: float) -> str | None:
        """``"signal"`` / ``"max_minutes"`` / None; under torchrun the ranks agree (any rank's reason stops all)."""
        flags = (bool(self._stop), time.monotonic() > deadline)
        if self.world_size > 1:
            flags = tuple(bool(v) for v in self._all_reduce(torch.tensor(flags, dtype=torch.int32), "max").tolist())
        if flags[0]:
            return "signal"
        if flags[1]:
            return "max_minutes"
        return None

    def _install_signals(self):
        self._old = {}

        def handler(signum, frame):
            self._stop = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_signals(self):
        for sig, h in getattr(self, "_old", {}).items():
            signal.signal(sig, h)

    # ----------------------------------------------------------------------------------- logs

    def _write_config(self):
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg, sort_keys=False))

    @staticmethod
    def _append_csv(path: Path, row: dict):
        new = not path.exists()
        if not new:  # keep the header's columns (a new NFE column appears only if the stages change)
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header is None:
                new = True
        if new:
            header = list(row)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def _trim_csv(self, path: Path):
        """On resume: drop rows logged after the checkpointed step (they will be redone)."""
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            fields = rows[0].keys() if rows else None
        keep = [r for r in rows if int(float(r["step"])) <= self.step]
        if fields is None or len(keep) == len(rows):
            return
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields))
            w.writeheader()
            w.writerows(keep)

    def _tensorboard(self, row: dict):
        if self._tb is False:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except Exception:  # tensorboard not installed
                self._tb = False
                return
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, row["step"])

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "step": self.step,
            "elapsed_s": self.elapsed,
            "config_json": json.dumps(self.cfg),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "rng_numpy_json": json.dumps(self.rng.bit_generator.state),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history_json": json.dumps(self.history[-20000:]),
            "world_size": self.world_size,
        }

    def save_state(self, path: Path | None = None) -> Path:
        path = Path(path or self.out_dir / "state.pt")
        return atomic_torch_save(self.state_dict(), path)

    def load_state(self, path) -> None:
        st = torch.load(path, map_location="cpu", weights_only=True)
        if st.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not an msode training state")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.step = int(st["step"])
        self.elapsed = float(st.get("elapsed_s", 0.0))
        self.rng.bit_generator.state = json.loads(st["rng_numpy_json"])
        torch.set_rng_state(st["rng_torch"])
        if st.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng_cuda"])
        self.history = json.loads(st.get("history_json", "[]"))
        saved_world = int(st.get("world_size", 1))
        if saved_world != self.world_size:
            self.log(
                f"{path} was saved by {saved_world} process(es), this run has {self.world_size}: the batch per "
                f"step is now {self.global_batch_size} pairs (train.batch_size {self.cfg['train']['batch_size']} "
                "per process)"
            )

    def init_from(self, path) -> None:
        """Seed networks from a training state, stage checkpoint(s) or a plan (matching names only)."""
        path = Path(path).expanduser()
        loaded = []
        if path.suffix == ".plan":
            import io as _io
            from msode_sdk.plan import load_plan

            plan = load_plan(path)
            for st in plan.manifest.stages:
                for sc in st.scales:
                    key = f"{st.name}_L{sc.level}"
                    member = sc.networks.get("torchscript")
                    if key in self.model.nets and member:
                        sd = torch.jit.load(_io.BytesIO(plan.read(member)), map_location="cpu").state_dict()
                        self.model.nets[key].load_state_dict(sd)
                        loaded.append(key)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj.get("format") == STATE_FORMAT:
                sd = obj["model"]
                for key, net in self.model.nets.items():
                    sub = {k[len(f"nets.{key}.") :]: v for k, v in sd.items() if k.startswith(f"nets.{key}.")}
                    if sub:
                        net.load_state_dict(sub)
                        loaded.append(key)
            else:
                from msode_export.checkpoint import load_checkpoint

                ck = load_checkpoint(path)
                for lv, sd in ck["state_dicts"].items():
                    key = f"{ck.stage['name']}_L{lv}"
                    if key in self.model.nets:
                        self.model.nets[key].load_state_dict(sd)
                        loaded.append(key)
        if not loaded:
            raise ValueError(f"{path}: no network matched this model's stages {[s.name for s in self.stages]}")
        self.log(f"initialised {loaded} from {path}")

    # ----------------------------------------------------------------------------------- export

    def provenance(self) -> dict:
        recent = self.history[-50:]

        def avg(k):
            vals = [r[k] for r in recent if k in r]
            return float(np.mean(vals)) if vals else None

        return {
            "kind": "msode_train",
            "config": self.cfg,
            "git_commit": git_commit(),
            "steps": self.step,
            "wall_seconds": round(self.elapsed, 1),
            "device": str(self.device),
            "torch": str(torch.__version__),
            "trained_stages": self.train_names,
            **(
                {"distributed": {"world_size": self.world_size, "global_batch_size": self.global_batch_size}}
                if self.world_size > 1
                else {}
            ),
            "final_losses_mean_last50": {k: avg(k) for k in ("loss", "sim", "self", "reg", "sup", "rmse_phi_mm")},
            "data": {
                "generator_version": D.GENERATOR_VERSION,
                "train_seeds": [self.bank.seeds[0], self.bank.seeds[-1]],
                "spacing_mm": self.bank.spacing,
                "motion": self.cfg["data"]["motion"],
                "contrasts": list(self.cfg["data"]["contrasts"]),
                "pairs": self.cfg["data"]["pairs"],
            },
        }

    def save_stage_checkpoints(self, metrics: dict | None = None) -> list[Path]:
        """One ``msode_export.checkpoint`` file per stage (``<out_dir>/<stage>.ckpt``)."""
        from msode_export.checkpoint import save_checkpoint

        g = self.model_grid
        paths = []
        for st in self.stages:
            sds = {lv: self.model.network(st.name, lv).state_dict() for lv in range(1, st.levels + 1)}
            p = save_checkpoint(
                self.out_dir / f"{st.name}.ckpt",
                stage=st.to_dict(),
                model_grid={"shape_xyz": list(g.shape_xyz), "spacing_xyz_mm": list(g.spacing_xyz), "centre": "fov"},
                arch={"name": st.arch, "kwargs": dict(st.arch_kwargs)},
                state_dicts=sds,
                training=self.provenance(),
                normalization=dict(NORMALIZATION),
                modalities=list(self.cfg["data"]["contrasts"]),
                metrics=metrics or {},
            )
            paths.append(p)
        return paths

    def export_plan(self, path: Path | None = None, metrics: dict | None = None, formats=None) -> Path:
        """Write the plan (networks, schedule, model grid, normalisation, metrics, provenance)."""
        path = Path(path or self.out_dir / f"{self.cfg['name']}.plan")
        self.model.eval()
        nets = {k: v.cpu() for k, v in self.model.plan_networks().items()}
        try:
            return build_plan(
                path,
                self.cfg["name"].replace("/", "_"),
                self.model_grid,
                self.model.stage_defs(),
                nets,
                formats=tuple(formats or self.cfg["export"]["formats"]),
                analytic=False,
                centre="fov",
                normalization=dict(NORMALIZATION),
                modalities=list(self.cfg["data"]["contrasts"]),
                metrics=metrics or {},
                training=self.provenance(),
                description=f"MS-ODENet ({', '.join(s.name for s in self.stages)}) trained by msode_train "
                f"on synthetic multi-contrast phantoms; config {self.cfg['name']}",
            )
        finally:
            self.model.to(self.device)
