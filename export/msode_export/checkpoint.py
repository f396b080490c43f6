"""Training checkpoints (one registration stage each) and the architecture registry.

A checkpoint is what ``msode_train`` writes for one trained stage (e.g. the rigid MS-ODENet, or the
B-spline one) and what ``msode export CHECKPOINT... -o NAME.plan`` packs into a plan, cascading the
stages in the order given. It is a ``torch.save`` file of plain data only (dicts, lists, strings,
numbers, booleans, None and tensors), loaded with ``torch.load(weights_only=True)``: loading never
unpickles arbitrary objects. Format version 1::

    {
      "format": "msode-checkpoint", "format_version": 1,
      "stage": {"name": "rigid", "transform": "rigid" | "bspline" | "dense",
                "params": {...},                      # e.g. {"control_spacing_mm": [20, 20, 20]}
                "schedule": [{"solver": "adaptive_heun", "step_size": 0.1, "tol": 1e-3, "max_steps": 1000},
                             ...]},                   # one per pyramid level, coarse (L1) to fine
      "model_grid": {"shape_xyz": [120, 120, 80], "spacing_xyz_mm": [2, 2, 2], "centre": "fov"},
      "arch": {"name": "<registered architecture>", "kwargs": {...}},
      "state_dicts": {1: {param: tensor}, 2: {...}, ...},   # per level (int keys, 1 = coarsest)
      "training": {...},                              # JSON-able provenance: config, steps, losses, ...
      "normalization": {...}, "modalities": [...], "metrics": {...}   # optional, copied into the plan
    }

``params``, ``arch.kwargs``, ``training`` and the optional sections must be JSON-serialisable: they go
into the plan's manifest. Level ``l`` uses the grid ``model_grid`` downsampled by ``2 ** (L - l)``
(:func:`msode_export.pack.level_grids`) and integrates over ``[l - 1, l]``.

Architectures: networks are rebuilt at export time by a factory registered under the checkpoint's
``arch.name``: ``factory(level_grid, model_grid, stage_params, **kwargs) -> nn.Module`` with the
network contract ``forward(warped, fixed, t) -> velocity`` (see :mod:`msode_sdk.backends`), then the
level's state dict is loaded strictly.

The registry is filled from above, never by importing a higher package from here: code that defines
networks calls :func:`register_architecture` when it is imported (``msode_train`` does so for all of
its architectures when ``msode_train`` or any of its modules is imported). When a checkpoint names an
architecture that is not registered, the registry loads the plugins of the entry-point group
:data:`ENTRY_POINT_GROUP` (``msode.architectures``, declared in ``pyproject.toml``; ``msode_train``
declares ``msode_train.models:register_architectures`` there) once each, and looks again; an entry
point may name a module (importing it registers) or a callable (called with no arguments). Other code
can register its own (``msode export --import MODULE``). A name that is still unknown raises
:class:`UnknownArchitectureError`, which lists the registered names and any plugin that failed to load
(the first failure is its ``__cause__``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from msode_sdk.errors import MsodeError
from msode_sdk.plan import SOLVER_NAMES, TRANSFORMS
from msode_sdk.transforms import Grid

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "ENTRY_POINT_GROUP",
    "CheckpointError",
    "UnknownArchitectureError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "register_architecture",
    "get_architecture",
    "architectures",
    "load_architecture_plugins",
    "build_networks",
    "export_checkpoints",
]

CHECKPOINT_FORMAT = "msode-checkpoint"
CHECKPOINT_VERSION = 1
#: entry-point group of architecture plugins, loaded when a checkpoint names an unregistered architecture
ENTRY_POINT_GROUP = "msode.architectures"

Factory = Callable[..., nn.Module]
_ARCHITECTURES: dict[str, Factory] = {}
#: entry points already loaded (``"name = value"``) -> None, or the exception their loading raised
_PLUGINS: dict[str, BaseException | None] = {}


class CheckpointError(MsodeError, ValueError):
    """A checkpoint file is missing, not a checkpoint, of a newer format, or inconsistent."""


class UnknownArchitectureError(CheckpointError):
    """A checkpoint names a network architecture that no imported module or plugin registered.
    ``name``: the architecture; ``registered``: the names known; ``plugin_errors``: ``{entry point: error}``
    of the plugins that failed to load."""

    def __init__(self, name: str, registered: list[str], plugin_errors: Mapping[str, BaseException] | None = None):
        self.name = name
        self.registered = list(registered)
        self.plugin_errors = dict(plugin_errors or {})
        msg = f"unknown network architecture {name!r}; registered: {self.registered}"
        if self.plugin_errors:
            msg += "; architecture plugins that failed to load: " + "; ".join(
                f"{ep} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                for ep, e in self.plugin_errors.items()
            )
        if name.split("_", 1)[0] in TRANSFORMS:  # msode_train names its networks <transform>_<kind>
            if "msode_train" in sys.modules:  # looked up, never imported from here
                msg += (
                    f". {name!r} looks like an msode_train architecture, but the imported msode_train does "
                    "not define it (a checkpoint of another msode version?)"
                )
            else:
                msg += (
                    f". {name!r} looks like an msode_train architecture: `import msode_train` first (the "
                    "training package, `pip install msode[train]`; `msode export --import msode_train`)"
                )
        else:
            msg += " (import the module that registers it, e.g. `msode export --import MODULE`)"
        super().__init__(msg)


# --------------------------------------------------------------------------------------- registry


def register_architecture(name: str, factory: Factory | None = None):
    """Register ``factory(level_grid, model_grid, stage_params, **kwargs) -> nn.Module`` under ``name``.
    Usable as a decorator (``@register_architecture("rigid_cnn")``). Re-registering a name replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError("architecture name must be a non-empty string")

    def deco(fn: Factory) -> Factory:
        if not callable(fn):
            raise TypeError(f"architecture factory for {name!r} is not callable")
        _ARCHITECTURES[name] = fn
        return fn

    return deco(factory) if factory is not None else deco


def architectures() -> list[str]:
    """Registered architecture names."""
    return sorted(_ARCHITECTURES)


def load_architecture_plugins() -> dict[str, BaseException]:
    """Load every not yet loaded entry point of :data:`ENTRY_POINT_GROUP` (each once per process):
    a module is imported (it registers on import), a callable is called with no arguments. Returns
    ``{entry point: exception}`` of every plugin whose loading failed (now or before); nothing is
    swallowed silently: :func:`get_architecture` reports them."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"{ep.name} = {ep.value}"
        if key in _PLUGINS:
            continue
        try:
            hook = ep.load()
            if callable(hook):
                hook()
        except Exception as exc:  # a broken plugin (ImportError and all): reported, not hidden
            _PLUGINS[key] = exc
        else:
            _PLUGINS[key] = None
    return {k: e for k, e in _PLUGINS.items() if e is not None}


def get_architecture(name: str) -> Factory:
    """The factory registered under ``name``. On a miss the plugins of :data:`ENTRY_POINT_GROUP` are
    loaded and the name looked up again; still unknown: :class:`UnknownArchitectureError` (whose
    ``__cause__`` is the first plugin failure, if any)."""
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name]
    failed = load_architecture_plugins()
    if name in _ARCHITECTURES:
        for ep, exc in failed.items():
            warnings.warn(
                f"architecture plugin {ep} failed to load: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2
            )
        return _ARCHITECTURES[name]
    raise UnknownArchitectureError(name, architectures(), failed) from next(iter(failed.values()), None)


# -------------------------------------------------------------------------------------- checkpoints


class Checkpoint(dict):
    """A loaded, validated checkpoint (a plain dict; see the module docstring for its keys)."""

    @property
    def stage(self) -> dict:
        return self["stage"]

    @property
    def model_grid(self) -> Grid:
        g = self["model_grid"]
        return Grid(tuple(g["shape_xyz"]), tuple(g["spacing_xyz_mm"]))

    @property
    def levels(self) -> int:
        return len(self["stage"]["schedule"])


def _json_check(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} must be JSON-serialisable (it goes into the plan manifest): {exc}") from None


def _fail(path, msg) -> None:
    raise CheckpointError(f"{path}: {msg}" if path else msg)


def _validate(obj: Any, path: str | None = None) -> Checkpoint:
    if not isinstance(obj, dict):
        _fail(path, f"not an msode checkpoint (top level is {type(obj).__name__}, expected a dict)")
    if obj.get("format") != CHECKPOINT_FORMAT:
        _fail(path, f"not an msode checkpoint (format {obj.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    ver = obj.get("format_version")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
        _fail(path, f"bad format_version {ver!r}")
    if ver > CHECKPOINT_VERSION:
        _fail(
            path,
            f"checkpoint format_version {ver} is newer than this msode_export reads "
            f"({CHECKPOINT_VERSION}); upgrade msode",
        )
    for key in ("stage", "model_grid", "arch", "state_dicts", "training"):
        if key not in obj:
            _fail(path, f"missing {key!r}")
    st = obj["stage"]
    if not isinstance(st, dict):
        _fail(path, "stage must be a dict")
    name, transform = st.get("name"), st.get("transform")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]{1,64}", name):
        _fail(path, f"stage.name {name!r} must match [a-z0-9_]+")
    if transform not in TRANSFORMS:
        _fail(path, f"stage.transform {transform!r} is not one of {list(TRANSFORMS)}")
    params = st.get("params", {})
    if not isinstance(params, dict):
        _fail(path, "stage.params must be a dict")
    if transform == "bspline":
        cs = params.get("control_spacing_mm")
        if not (
            isinstance(cs, (list, tuple)) and len(cs) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in cs)
        ):
            _fail(path, f"stage.params.control_spacing_mm must be 3 positive numbers, got {cs!r}")
    sched = st.get("schedule")
    if not isinstance(sched, (list, tuple)) or not sched:
        _fail(path, "stage.schedule must be a non-empty list (one solver per level)")
    for i, lv in enumerate(sched):
        where = f"stage.schedule[{i}]"
        if not isinstance(lv, dict) or lv.get("solver") not in SOLVER_NAMES:
            _fail(path, f"{where}.solver must be one of {list(SOLVER_NAMES)}")
        for k in ("step_size", "tol"):
            v = lv.get(k)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
            ):
                _fail(path, f"{where}.{k} must be a positive number or None, got {v!r}")
        if lv["solver"] in ("euler", "heun") and lv.get("step_size") is None:
            _fail(path, f"{where}: solver {lv['solver']} needs a step_size")
        if lv["solver"] == "adaptive_heun" and lv.get("tol") is None:
            _fail(path, f"{where}: adaptive_heun needs a tol")
        ms = lv.get("max_steps", 1000)
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 1:
            _fail(path, f"{where}.max_steps must be a positive integer")
    g = obj["model_grid"]
    if not isinstance(g, dict):
        _fail(path, "model_grid must be a dict")
    try:
        Grid(tuple(int(v) for v in g["shape_xyz"]), tuple(float(v) for v in g["spacing_xyz_mm"]))
        if len(g["shape_xyz"]) != 3 or len(g["spacing_xyz_mm"]) != 3:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        _fail(path, "model_grid needs shape_xyz (3 ints) and spacing_xyz_mm (3 numbers)")
    arch = obj["arch"]
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("name"), str)
        or not isinstance(arch.get("kwargs", {}), dict)
    ):
        _fail(path, "arch must be {'name': str, 'kwargs': dict}")
    sds = obj["state_dicts"]
    if not isinstance(sds, dict):
        _fail(path, "state_dicts must be a dict {level: state_dict}")
    want = set(range(1, len(sched) + 1))
    if set(sds) != want:
        _fail(path, f"state_dicts has levels {sorted(sds, key=str)}, expected {sorted(want)} (one per schedule entry)")
    for lv, sd in sds.items():
        if not isinstance(sd, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
        ):
            _fail(path, f"state_dicts[{lv}] must map parameter names to tensors")
    if not isinstance(obj["training"], dict):
        _fail(path, "training must be a dict")
    for key in ("params", "kwargs"):
        _json_check(
            st.get("params", {}) if key == "params" else arch.get("kwargs", {}),
            f"{'stage.params' if key == 'params' else 'arch.kwargs'}",
        )
    for key in ("training", "normalization", "modalities", "metrics"):
        if key in obj:
            _json_check(obj[key], key)
    return Checkpoint(obj)


def save_checkpoint(
    path,
    stage: Mapping,
    model_grid: Mapping,
    arch: Mapping,
    state_dicts: Mapping,
    training: Mapping | None = None,
    **extra,
) -> Path:
    """Write a checkpoint (validated first; atomically). ``stage``: ``{name, transform, params, schedule}``
    (schedule entries: dicts ``{solver, step_size, tol, max_steps}`` or :class:`msode_export.pack.LevelSolver`);
    ``model_grid``: ``{shape_xyz, spacing_xyz_mm[, centre]}``; ``arch``: ``{name, kwargs}``;
    ``state_dicts``: ``{level: state_dict}``; ``extra``: optional ``normalization``, ``modalities``, ``metrics``."""
    unknown = set(extra) - {"normalization", "modalities", "metrics"}
    if unknown:
        raise TypeError(f"unexpected checkpoint sections {sorted(unknown)}")
    sched = []
    for lv in stage.get("schedule", ()):
        if not isinstance(lv, Mapping):  # a LevelSolver dataclass
            lv = {"solver": lv.solver, "step_size": lv.step_size, "tol": lv.tol, "max_steps": lv.max_steps}
        sched.append(
            {
                "solver": lv["solver"],
                "step_size": lv.get("step_size"),
                "tol": lv.get("tol"),
                "max_steps": int(lv.get("max_steps", 1000)),
            }
        )
    obj = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "stage": {
            "name": stage.get("name"),
            "transform": stage.get("transform"),
            "params": _plain(dict(stage.get("params", {}))),
            "schedule": sched,
        },
        "model_grid": _plain(dict(model_grid)),
        "arch": {"name": arch.get("name"), "kwargs": _plain(dict(arch.get("kwargs", {})))},
        "state_dicts": {
            int(lv): {k: v.detach().cpu().clone() for k, v in sd.items()} for lv, sd in state_dicts.items()
        },
        "training": _plain(dict(training or {})),
        **{k: _plain(v) for k, v in extra.items()},
    }
    _validate(obj)
    return atomic_torch_save(obj, path)


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: readers never see a
    partial file, and a failed save leaves no temporary behind."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _plain(value):
    """Tuples -> lists, recursively (so that what is saved is what JSON and weights_only see)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_checkpoint(path) -> Checkpoint:
    """Load and validate a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or hostile pickles all end up here
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{p}: not a loadable msode checkpoint ({msg[:200]})") from None
    return _validate(obj, str(p))


def build_networks(ckpt: Checkpoint) -> dict[int, nn.Module]:
    """The checkpoint's per-level networks (``{level: module}`` in eval mode), weights loaded strictly."""
    from .pack import level_grids

    arch = ckpt["arch"]
    factory = get_architecture(arch["name"])
    model_grid = ckpt.model_grid
    params = dict(ckpt.stage.get("params", {}))
    nets = {}
    for lv, grid in enumerate(level_grids(model_grid, ckpt.levels), start=1):
        try:
            net = factory(grid, model_grid, params, **arch.get("kwargs", {}))
        except Exception as exc:
            raise CheckpointError(f"architecture {arch['name']!r} could not be built for level {lv}: {exc}") from None
        try:
            net.load_state_dict(ckpt["state_dicts"][lv], strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:3]
            raise CheckpointError(
                f"stage {ckpt.stage['name']!r} level {lv}: weights do not fit architecture "
                f"{arch['name']!r}: {' '.join(first)[:300]}"
            ) from None
        nets[lv] = net.eval()
    return nets


def export_checkpoints(
    paths,
    out,
    name: str | None = None,
    formats=("torchscript", "onnx"),
    registrar_ts: bool = True,
    description: str = "",
) -> Path:
    """Pack checkpoints (one stage each, cascaded in the given order) into a plan at ``out``.

    All checkpoints must share the model grid (shape, spacing, centre) and normalisation. The manifest
    records each stage's training provenance and metrics under its stage name. With ``registrar_ts``
    (and TorchScript among ``formats``) the whole loop is added as ``registrar.ts``.
    """
    from .pack import LevelSolver, StageDef, build_plan

    paths = list(paths)
    if not paths:
        raise CheckpointError("no checkpoints given")
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    grid = first.model_grid
    centre = first["model_grid"].get("centre", "fov")
    norm = first.get("normalization") or {"method": "percentile", "low": 0.5, "high": 99.5}
    names = [c.stage["name"] for c in ckpts]
    if len(set(names)) != len(names):
        raise CheckpointError(f"stage names must be unique across checkpoints, got {names}")
    for p, c in zip(paths[1:], ckpts[1:]):
        if c.model_grid != grid or c["model_grid"].get("centre", "fov") != centre:
            raise CheckpointError(f"{p}: model grid {c['model_grid']} differs from {paths[0]}'s {first['model_grid']}")
        if (c.get("normalization") or norm) != norm:
            raise CheckpointError(f"{p}: intensity normalisation differs from {paths[0]}'s")
    defs, nets, modalities, training, metrics = [], {}, [], {"stages": {}}, {}
    for c in ckpts:
        st = c.stage
        sched = [
            LevelSolver(lv["solver"], lv.get("step_size"), lv.get("tol"), int(lv.get("max_steps", 1000)))
            for lv in st["schedule"]
        ]
        defs.append(StageDef(st["name"], st["transform"], sched, dict(st.get("params", {}))))
        for lv, net in build_networks(c).items():
            nets[(st["name"], lv)] = net
        for m in c.get("modalities", []) or []:
            if m not in modalities:
                modalities.append(m)
        training["stages"][st["name"]] = {"arch": c["arch"], **c["training"]}
        if c.get("metrics"):
            metrics[st["name"]] = c["metrics"]
    plan_name = name or Path(out).name.removesuffix(".plan")
    path = build_plan(
        out,
        plan_name,
        grid,
        defs,
        nets,
        formats=tuple(formats),
        analytic=False,
        centre=centre,
        normalization=norm,
        modalities=modalities,
        metrics=metrics,
        training=training,
        description=description,
    )
    if registrar_ts and "torchscript" in formats:
        from .scripted import add_registrar_ts

        add_registrar_ts(path)
    return path
