"""The ``.plan`` bundle: read, validate and write (format versions 1 and 2).

A plan is everything the runtime needs to register a pair of images with one trained (or analytic)
multi-scale neural-ODE model, in a single file.

Format
------
A plan is a zip archive. The writer stores every member uncompressed (``ZIP_STORED``) and pads the
local headers so that each member's data starts on a 64-byte boundary, so members could be
memory-mapped; the reader also accepts deflated members. Members:

``manifest.json``
    UTF-8 JSON object (at most 1 MiB) describing the plan; its schema is enforced by
    :func:`validate_manifest` (see that function for every rule). In short: ``format``
    (``"msode-plan"``), ``format_version`` (int, this SDK reads versions 1 and 2 and refuses newer ones),
    ``name``, ``created``, optional ``description`` and ``analytic`` (the networks are
    gradient-descent stand-ins, not trained), ``model_grid`` (RAS grid the images are resampled to),
    ``normalization``, ``modalities``, ``stages`` (ordered, e.g. rigid then bspline, each with its
    ``transform``, ``params`` and per-level ``scales``: grid, solver, step size / tolerance, time
    segment, network members), optional free-form ``metrics`` and ``training`` provenance, and
    ``members``: the sha256 and size of every other member. Version 2 adds, per scale, an optional
    ``features`` network (``image -> (N, C, D', H', W')``, same formats as ``networks``) and the
    ``feature_grid`` (``shape_xyz``, ``spacing_xyz_mm``) its output lives on, and ``feature_warp``
    (bool, default false): the runtime computes the fixed image's features once per level and, at every
    evaluation, the features of the warped moving image (or, with ``feature_warp``, the moving
    features once per level, warped with the state); the level's network then takes
    ``(moving features, fixed features, t)``.
``networks/<stage>_L<level>.ts`` / ``networks/<stage>_L<level>.onnx``
    The per-scale networks (TorchScript and ONNX). Opaque bytes to this module.
``engines/<gpu>-<cc>-trt<version>/<stage>_L<level>.engine``, ``registrar.ts``, ...
    Optional members (TensorRT engines, whole-loop TorchScript, README, training config, ...).

Every member other than ``manifest.json`` must be listed in ``manifest["members"]``; an unlisted
member is an error, as is a listed one that is absent. Unknown JSON keys are ignored everywhere
(forward-compatible additions within a format version); known keys are type-checked strictly
(``bool`` is not an ``int``, integral floats are not ints, NaN and infinities are rejected).

Security guarantees of :func:`load_plan`
----------------------------------------
A plan file may be hostile. Loading it:

* reads the file (at most :data:`MAX_FILE_BYTES`) into memory and parses the zip from memory; it
  never extracts anything, never writes to disk, never unpickles and never imports or runs code
  (the network members stay opaque bytes; deserialising them is the backends' job);
* rejects unsafe member names (absolute, drive letters, backslashes, ``.``/``..`` or empty path
  components, NUL or control characters), duplicate names, symlinks and other special files,
  encrypted members and compression methods other than stored/deflated;
* bounds memory and time: the entry count (:data:`MAX_MEMBERS`) and the size of the zip's
  central directory (:data:`MAX_CENTRAL_DIRECTORY_BYTES`) are checked before the directory is
  parsed; declared sizes are capped (:data:`MAX_MEMBER_BYTES` per member, :data:`MAX_TOTAL_BYTES`
  in all, :data:`MAX_MANIFEST_BYTES` for the manifest) before anything is decompressed; and
  decompression proceeds in chunks and stops as soon as a member yields more than it declared
  (zip bombs);
* verifies the zip CRC, then the size and sha256 of every member against the manifest, and that
  every network a scale refers to is present;
* reports every problem as a :class:`~msode_sdk.errors.PlanError` whose message names the plan
  path (when loaded from a path) and the offending member or manifest field.

A loaded :class:`Plan` holds the verified bytes of every member in memory and is immutable, so it
may be shared between threads.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import lzma
import math
import os
import re
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Union

from msode_sdk.errors import PlanError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SOLVER_NAMES",
    "TRANSFORMS",
    "NETWORK_FORMATS",
    "MANIFEST_NAME",
    "ModelGrid",
    "ScaleSpec",
    "StageSpec",
    "Manifest",
    "Plan",
    "validate_manifest",
    "load_plan",
    "write_plan",
    "make_manifest",
    "plan_summary",
]

# --------------------------------------------------------------------------------------------
# Format constants and limits
# --------------------------------------------------------------------------------------------

FORMAT = "msode-plan"
FORMAT_VERSION = 2  # the newest format version this SDK reads
# Version 2 adds per-level feature networks (``features`` + ``feature_grid`` on a scale): features of
# each image computed once per level, the moving one warped with the state. A plan is written as
# version 2 only when it uses them, so plans without them stay readable by version-1 SDKs.
FEATURES_VERSION = 2

#: Solver names a scale may use. (The integrator module will own the solvers; the names live here
#: so that validating a plan needs nothing but the standard library.)
SOLVER_NAMES: tuple[str, ...] = ("euler", "heun", "adaptive_heun")
FIXED_STEP_SOLVERS: tuple[str, ...] = ("euler", "heun")
TRANSFORMS: tuple[str, ...] = ("rigid", "bspline", "dense")
NETWORK_FORMATS: tuple[str, ...] = ("torchscript", "onnx")
NORMALIZATION_METHODS: tuple[str, ...] = ("percentile",)
CENTRES: tuple[str, ...] = ("fov", "com")
ORIENTATIONS: tuple[str, ...] = ("RAS",)

MANIFEST_NAME = "manifest.json"

MAX_FILE_BYTES = 2 * 1024**3  # whole plan file
MAX_TOTAL_BYTES = 2 * 1024**3  # sum of declared uncompressed member sizes
MAX_MEMBER_BYTES = 512 * 1024**2  # declared uncompressed size of one member
MAX_MANIFEST_BYTES = 1024**2
MAX_MEMBERS = 10_000  # zip entries, directories included
MAX_CENTRAL_DIRECTORY_BYTES = 16 * 1024**2  # bounds zipfile's per-entry objects before it parses
MAX_MEMBER_NAME_CHARS = 1024
MAX_GRID_DIM = 1024  # voxels per axis
MAX_SPACING_MM = 100.0
DEFAULT_MAX_STEPS = 1000
MAX_STEPS_LIMIT = 100_000  # sanity bound so that no plan can make the integrator loop "forever"
MAX_PLAN_NAME_CHARS = 128
MAX_STAGE_NAME_CHARS = 64

ALIGNMENT = 64  # member data alignment in written plans (bytes)
_ALIGN_EXTRA_ID = 0xD935  # the extra-field id Android's zipalign uses for padding
_READ_CHUNK = 1024**2

_PLAN_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_STAGE_NAME_RE = re.compile(r"[a-z0-9_]+")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_DRIVE_RE = re.compile(r"[A-Za-z]:")

_S_IFMT = 0o170000
_S_IFLNK = 0o120000
_S_IFREG = 0o100000
_S_IFDIR = 0o040000

# Everything the zipfile module (and the codecs under it) is known to raise on malformed input.
_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    IndexError,
    KeyError,
)

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

# --------------------------------------------------------------------------------------------
# Parsed manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGrid:
    """The grid (RAS, world mm) that both images are resampled to before registration."""

    shape_xyz: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    orientation: str  # always "RAS" in format version 1
    centre: str  # "fov" (field-of-view centre) or "com" (intensity centre of mass)


@dataclass(frozen=True)
class ScaleSpec:
    """One pyramid level of a stage: its grid, ODE solver, time segment and networks."""

    level: int  # 1 = coarsest
    shape_xyz: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    solver: str  # one of SOLVER_NAMES
    step_size: float | None  # fixed step (euler/heun) or initial step (adaptive_heun, optional)
    tol: float | None  # adaptive_heun tolerance; None for fixed-step solvers unless given
    max_steps: int
    t0: float
    t1: float
    networks: dict[str, str]  # network format ("torchscript" / "onnx") -> member name
    # format 2: the level's feature network (format -> member) and the grid its output lives on;
    # empty / None when the field takes the images themselves
    features: dict[str, str] = field(default_factory=dict)
    feature_grid: tuple[tuple[int, int, int], tuple[float, float, float]] | None = None
    # how the moving features follow the state: False = the feature network runs on the warped moving
    # image at every evaluation (exact; the fixed features are still computed once), True = the moving
    # features are computed once per level and warped with the state ("feature_warp": true)
    feature_warp: bool = False


@dataclass(frozen=True)
class StageSpec:
    """One registration stage (e.g. rigid, then bspline) with its scales, coarse to fine."""

    name: str
    transform: str  # one of TRANSFORMS
    params: dict[str, Any]  # bspline: control_spacing_mm as a tuple of 3 floats
    scales: tuple[ScaleSpec, ...]


@dataclass(frozen=True)
class Manifest:
    """A validated ``manifest.json``. ``raw`` is the JSON object itself (for ``msode plan info``)."""

    name: str
    format_version: int
    created: str
    description: str
    analytic: bool
    model_grid: ModelGrid
    normalization: dict[str, Any]
    modalities: tuple[str, ...]
    stages: tuple[StageSpec, ...]
    metrics: dict[str, Any]
    training: dict[str, Any]

    @property
    def kind(self) -> str:
        """What the plan's networks are, in a few words: ``analytic`` (closed-form stand-ins), the
        ``training.kind`` its builder recorded (e.g. ``learned-features+gauss-newton``), else ``trained``."""
        if self.analytic:
            return "analytic"
        k = self.training.get("kind") if isinstance(self.training, dict) else None
        return str(k) if k else "trained"

    members: dict[str, dict[str, Any]]  # name -> {"sha256": lowercase hex, "size": int}
    raw: dict[str, Any]

    def stage(self, name: str) -> StageSpec:
        """The stage called ``name``; :class:`PlanError` if the plan has none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise PlanError(f"plan {self.name!r} has no stage {name!r} (stages: {[s.name for s in self.stages]})")


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _fail(path: str, message: str) -> NoReturn:
    raise PlanError(f"{path}: {message}")


def _show(value: object, limit: int = 60) -> str:
    """A short, safe rendering of a (possibly huge or hostile) value for an error message."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not escape as another exception type
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _kind(value: object) -> str:
    names = {dict: "object", list: "list", tuple: "list", str: "str", bool: "bool", int: "int"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


def _got(value: object) -> str:
    return "got null" if value is None else f"got {_kind(value)} {_show(value)}"


def _child(path: str, key: str) -> str:
    return f"{path}.{key}"


def _require(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        _fail(_child(path, key), "required field is missing")
    return obj[key]


def _dict(value: object, path: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        _fail(path, f"expected an object, {_got(value)}")
    return value


def _list(value: object, path: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        _fail(path, f"expected a list, {_got(value)}")
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, f"expected a string, {_got(value)}")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"expected true or false, {_got(value)}")
    return value


def _int(value: object, path: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"expected an integer, {_got(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        _fail(path, f"{_show(value)} is not in [{lo_s}, {hi_s}]")
    return int(value)


def _float(value: object, path: str) -> float:
    """A finite real number (int or float, not bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(path, f"expected a number, {_got(value)}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        _fail(path, f"expected a finite number, got {_show(value)}")
    return result


def _float_in(value: object, path: str, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    x = _float(value, path)
    below = x <= lo if lo_open else x < lo
    above = x >= hi if hi_open else x > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        _fail(path, f"{_show(value)} is not in {interval}")
    return x


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(path, f"{_show(value)} is not one of {sorted(choices)}")
    return value


def _vec3(value: object, path: str) -> list[Any] | tuple[Any, ...]:
    items = _list(value, path)
    if len(items) != 3:
        _fail(path, f"expected 3 values (x, y, z), got {len(items)}")
    return items


def _shape3(value: object, path: str) -> tuple[int, int, int]:
    items = _vec3(value, path)
    a, b, c = (_int(v, f"{path}[{i}]", 1, MAX_GRID_DIM) for i, v in enumerate(items))
    return (a, b, c)


def _spacing3(value: object, path: str, hi: float = MAX_SPACING_MM) -> tuple[float, float, float]:
    items = _vec3(value, path)
    a, b, c = (_float_in(v, f"{path}[{i}]", 0.0, hi, True, False) for i, v in enumerate(items))
    return (a, b, c)


MAX_SCALE_SEARCH = 8


def _scale_search(value: object, path: str, transform: str) -> list[float]:
    """A deformable stage's ``scale_search`` factors (msode_sdk.loop): 1 to 8 numbers in (0, 4]."""
    if transform == "rigid":
        _fail(path, "a rigid stage has no scale search (deformable stages only)")
    items = _list(value, path)
    if not 1 <= len(items) <= MAX_SCALE_SEARCH:
        _fail(path, f"expected 1 to {MAX_SCALE_SEARCH} factors, got {len(items)}")
    return [_float_in(v, f"{path}[{i}]", 0.0, 4.0, True, False) for i, v in enumerate(items)]


def _member_name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe zip member name, or None. Directory names end with '/'."""
    if not name:
        return "empty name"
    if len(name) > MAX_MEMBER_NAME_CHARS:
        return f"longer than {MAX_MEMBER_NAME_CHARS} characters"
    if "\x00" in name:
        return "contains a NUL byte"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "contains control characters"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE_RE.match(name):
        return "starts with a drive letter"
    body = name[:-1] if name.endswith("/") else name
    for part in body.split("/"):
        if part == "":
            return "has an empty path component"
        if part in (".", ".."):
            return f"has a {part!r} path component"
    return None


def _json_copy(value: Any) -> Any:
    """Deep copy of the dict/list skeleton of a JSON-like value (leaves are shared, never fails)."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# validate_manifest
# --------------------------------------------------------------------------------------------


def validate_manifest(obj: object) -> Manifest:
    """Check a parsed ``manifest.json`` against the version-1 schema and return it parsed.

    Pure (no I/O); raises :class:`PlanError` whose message starts with the offending field path,
    e.g. ``manifest.stages[1].scales[0].solver: 'rk4' is not one of [...]``. Lists may be given as
    tuples. ``format`` and ``format_version`` are checked first, so a plan from a newer SDK gets
    the "upgrade msode" message rather than a schema complaint.

    Rules beyond plain types: names match ``[A-Za-z0-9_.-]+`` (plan) / ``[a-z0-9_]+`` (stage,
    unique); grid shapes are 3 ints in [1, 1024], spacings 3 finite floats in (0, 100] mm; each
    stage's scales have levels 1..L in order (coarse to fine), contiguous time segments
    (``t1`` of one level == ``t0`` of the next, ``t0 < t1``), and the finest level's grid equals
    ``model_grid``; euler/heun need ``step_size`` in (0, t1 - t0] with at most ``max_steps`` steps
    per segment; adaptive_heun needs ``tol`` in (0, 1) and may give an initial ``step_size``;
    ``max_steps`` is an int in [1, 100000] (default 1000); each scale names at least one network
    (``torchscript`` and/or ``onnx``) and each is a key of ``members``; ``members`` maps safe member
    names (never ``manifest.json`` or a directory) to ``{"sha256": 64 hex, "size": int}``.
    """
    root = "manifest"
    m = _dict(obj, root)

    fmt = _require(m, "format", root)
    if fmt != FORMAT:
        _fail(_child(root, "format"), f"expected {FORMAT!r}, got {_show(fmt)} (not an msode plan?)")
    version = _int(_require(m, "format_version", root), _child(root, "format_version"))
    if version > FORMAT_VERSION:
        raise PlanError(
            f"plan format_version {version} is newer than this SDK supports ({FORMAT_VERSION}); upgrade msode"
        )
    if version < 1:
        _fail(_child(root, "format_version"), f"{version} is not a valid format version (>= 1)")

    name = _str(_require(m, "name", root), _child(root, "name"))
    if not _PLAN_NAME_RE.fullmatch(name) or name in (".", "..") or len(name) > MAX_PLAN_NAME_CHARS:
        _fail(
            _child(root, "name"),
            f"{_show(name)} is not a valid plan name ([A-Za-z0-9_.-]+, at most "
            f"{MAX_PLAN_NAME_CHARS} characters, not '.' or '..')",
        )
    created = _str(_require(m, "created", root), _child(root, "created"))
    description = _str(m.get("description", ""), _child(root, "description"))
    analytic = _bool(m.get("analytic", False), _child(root, "analytic"))

    model_grid = _validate_model_grid(_require(m, "model_grid", root), _child(root, "model_grid"))
    normalization = _validate_normalization(_require(m, "normalization", root), _child(root, "normalization"))

    mod_path = _child(root, "modalities")
    modalities = tuple(
        _str(v, f"{mod_path}[{i}]") for i, v in enumerate(_list(_require(m, "modalities", root), mod_path))
    )

    metrics = _dict(m.get("metrics", {}), _child(root, "metrics"))
    training = _dict(m.get("training", {}), _child(root, "training"))
    members = _validate_members(_require(m, "members", root), _child(root, "members"))

    stages_path = _child(root, "stages")
    stage_items = _list(_require(m, "stages", root), stages_path)
    if not stage_items:
        _fail(stages_path, "a plan needs at least one stage")
    stages: list[StageSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(stage_items):
        stage = _validate_stage(item, f"{stages_path}[{i}]", model_grid, members, version)
        if stage.name in seen:
            _fail(f"{stages_path}[{i}].name", f"duplicate stage name {stage.name!r}")
        seen.add(stage.name)
        stages.append(stage)

    return Manifest(
        name=name,
        format_version=version,
        created=created,
        description=description,
        analytic=analytic,
        model_grid=model_grid,
        normalization=normalization,
        modalities=modalities,
        stages=tuple(stages),
        metrics=_json_copy(metrics),
        training=_json_copy(training),
        members=members,
        raw=_json_copy(m),
    )


def _validate_model_grid(value: object, path: str) -> ModelGrid:
    g = _dict(value, path)
    shape = _shape3(_require(g, "shape_xyz", path), _child(path, "shape_xyz"))
    spacing = _spacing3(_require(g, "spacing_xyz_mm", path), _child(path, "spacing_xyz_mm"))
    orientation = _choice(_require(g, "orientation", path), _child(path, "orientation"), ORIENTATIONS)
    centre = _choice(_require(g, "centre", path), _child(path, "centre"), CENTRES)
    return ModelGrid(shape, spacing, orientation, centre)


def _validate_normalization(value: object, path: str) -> dict[str, Any]:
    n = _dict(value, path)
    out: dict[str, Any] = _json_copy(n)
    out["method"] = _choice(_require(n, "method", path), _child(path, "method"), NORMALIZATION_METHODS)
    low = _float_in(_require(n, "low", path), _child(path, "low"), 0.0, 100.0, False, False)
    high = _float_in(_require(n, "high", path), _child(path, "high"), 0.0, 100.0, False, False)
    if not low < high:
        _fail(path, f"low ({low:g}) must be below high ({high:g})")
    out["low"], out["high"] = low, high
    return out


def _validate_members(value: object, path: str) -> dict[str, dict[str, Any]]:
    entries = _dict(value, path)
    out: dict[str, dict[str, Any]] = {}
    total = 0
    for name, entry in entries.items():
        entry_path = f"{path}[{_show(name)}]"
        if not isinstance(name, str):
            _fail(entry_path, f"member names must be strings, {_got(name)}")
        problem = _member_name_problem(name)
        if problem is not None:
            _fail(entry_path, f"unsafe member name: {problem}")
        if name.endswith("/"):
            _fail(entry_path, "directories are not members")
        if name == MANIFEST_NAME:
            _fail(entry_path, f"{MANIFEST_NAME} must not list itself")
        e = _dict(entry, entry_path)
        digest = _str(_require(e, "sha256", entry_path), _child(entry_path, "sha256"))
        if not _SHA256_RE.fullmatch(digest):
            _fail(_child(entry_path, "sha256"), f"expected 64 hex digits, got {_show(digest)}")
        size = _int(_require(e, "size", entry_path), _child(entry_path, "size"), 0, MAX_MEMBER_BYTES)
        total += size
        out[name] = {"sha256": digest.lower(), "size": size}
    if total > MAX_TOTAL_BYTES:
        _fail(path, f"members total {total} bytes, more than the limit of {MAX_TOTAL_BYTES}")
    return out


def _validate_stage(
    value: object, path: str, model_grid: ModelGrid, members: Mapping[str, Any], version: int = 1
) -> StageSpec:
    s = _dict(value, path)
    name = _str(_require(s, "name", path), _child(path, "name"))
    if not _STAGE_NAME_RE.fullmatch(name) or len(name) > MAX_STAGE_NAME_CHARS:
        _fail(
            _child(path, "name"),
            f"{_show(name)} is not a valid stage name ([a-z0-9_]+, at most {MAX_STAGE_NAME_CHARS})",
        )
    transform = _choice(_require(s, "transform", path), _child(path, "transform"), TRANSFORMS)
    params_path = _child(path, "params")
    params: dict[str, Any] = _json_copy(_dict(s.get("params", {}), params_path))
    if transform == "bspline":
        cs_path = _child(params_path, "control_spacing_mm")
        params["control_spacing_mm"] = _spacing3(
            _require(params, "control_spacing_mm", params_path), cs_path, hi=math.inf
        )
    if "scale_search" in params:
        params["scale_search"] = _scale_search(params["scale_search"], _child(params_path, "scale_search"), transform)

    scales_path = _child(path, "scales")
    items = _list(_require(s, "scales", path), scales_path)
    if not items:
        _fail(scales_path, "a stage needs at least one scale")
    scales = [_validate_scale(item, f"{scales_path}[{i}]", i + 1, members, version) for i, item in enumerate(items)]
    for i in range(len(scales) - 1):
        if scales[i].t1 != scales[i + 1].t0:
            _fail(
                f"{scales_path}[{i + 1}].t0",
                f"time segments must be contiguous: level {i + 1} ends at t1={scales[i].t1:g} "
                f"but level {i + 2} starts at t0={scales[i + 1].t0:g}",
            )
    finest = scales[-1]
    finest_path = f"{scales_path}[{len(scales) - 1}]"
    if finest.shape_xyz != model_grid.shape_xyz:
        _fail(
            _child(finest_path, "shape_xyz"),
            f"the finest level's shape {list(finest.shape_xyz)} must equal "
            f"model_grid.shape_xyz {list(model_grid.shape_xyz)}",
        )
    if finest.spacing_xyz_mm != model_grid.spacing_xyz_mm:
        _fail(
            _child(finest_path, "spacing_xyz_mm"),
            f"the finest level's spacing {list(finest.spacing_xyz_mm)} must equal "
            f"model_grid.spacing_xyz_mm {list(model_grid.spacing_xyz_mm)}",
        )
    return StageSpec(name=name, transform=transform, params=params, scales=tuple(scales))


def _validate_scale(
    value: object, path: str, expected_level: int, members: Mapping[str, Any], version: int = 1
) -> ScaleSpec:
    sc = _dict(value, path)
    level = _int(_require(sc, "level", path), _child(path, "level"))
    if level != expected_level:
        _fail(
            _child(path, "level"),
            f"expected {expected_level}, got {level} (levels are 1..L in order, coarse to fine)",
        )
    shape = _shape3(_require(sc, "shape_xyz", path), _child(path, "shape_xyz"))
    spacing = _spacing3(_require(sc, "spacing_xyz_mm", path), _child(path, "spacing_xyz_mm"))
    solver = _choice(_require(sc, "solver", path), _child(path, "solver"), SOLVER_NAMES)
    t0 = _float(_require(sc, "t0", path), _child(path, "t0"))
    t1 = _float(_require(sc, "t1", path), _child(path, "t1"))
    if not t0 < t1:
        _fail(_child(path, "t1"), f"t1 ({t1:g}) must be greater than t0 ({t0:g})")
    span = t1 - t0
    if not math.isfinite(span):
        _fail(_child(path, "t1"), f"time segment [{t0:g}, {t1:g}] is too long")
    max_steps = _int(sc.get("max_steps", DEFAULT_MAX_STEPS), _child(path, "max_steps"), 1, MAX_STEPS_LIMIT)

    step_path = _child(path, "step_size")
    step_size: float | None = None
    if solver in FIXED_STEP_SOLVERS:
        step_size = _float_in(_require(sc, "step_size", path), step_path, 0.0, span, True, False)
        steps = max(1, math.ceil(span / step_size - 1e-6))  # as msode_sdk.integrate counts them
        if steps > max_steps:
            _fail(
                step_path,
                f"{step_size:g} needs {steps} steps on [{t0:g}, {t1:g}], more than max_steps={max_steps}",
            )
    elif "step_size" in sc:
        step_size = _float_in(sc["step_size"], step_path, 0.0, span, True, False)

    tol_path = _child(path, "tol")
    tol: float | None = None
    if solver == "adaptive_heun":
        tol = _float_in(_require(sc, "tol", path), tol_path, 0.0, 1.0, True, True)
    elif "tol" in sc:
        tol = _float_in(sc["tol"], tol_path, 0.0, 1.0, True, True)

    networks = _network_members(_require(sc, "networks", path), _child(path, "networks"), members)
    features: dict[str, str] = {}
    feature_grid = None
    feature_warp = False
    if version >= FEATURES_VERSION and "features" in sc:
        feat_path = _child(path, "features")
        features = _network_members(sc["features"], feat_path, members)
        if set(features) != set(networks):
            _fail(feat_path, f"needs the same formats as the networks ({sorted(networks)}), got {sorted(features)}")
        fg_path = _child(path, "feature_grid")
        fg = _dict(_require(sc, "feature_grid", path), fg_path)
        feature_grid = (
            _shape3(_require(fg, "shape_xyz", fg_path), _child(fg_path, "shape_xyz")),
            _spacing3(_require(fg, "spacing_xyz_mm", fg_path), _child(fg_path, "spacing_xyz_mm")),
        )
        feature_warp = _bool(sc.get("feature_warp", False), _child(path, "feature_warp"))

    return ScaleSpec(
        level=level,
        shape_xyz=shape,
        spacing_xyz_mm=spacing,
        solver=solver,
        step_size=step_size,
        tol=tol,
        max_steps=max_steps,
        t0=t0,
        t1=t1,
        networks=networks,
        features=features,
        feature_grid=feature_grid,
        feature_warp=feature_warp,
    )


def _network_members(value: object, path: str, members: Mapping[str, Any]) -> dict[str, str]:
    """``{format: member}`` of a scale's ``networks`` / ``features``: known formats, listed members."""
    nets = _dict(value, path)
    out: dict[str, str] = {}
    for fmt in NETWORK_FORMATS:
        if fmt in nets:
            member = _str(nets[fmt], _child(path, fmt))
            if member not in members:
                _fail(_child(path, fmt), f"member {member!r} is not listed in manifest.members")
            out[fmt] = member
    if not out:
        _fail(path, f"needs at least one of {list(NETWORK_FORMATS)}")
    return out


# --------------------------------------------------------------------------------------------
# Plan and load_plan
# --------------------------------------------------------------------------------------------


class Plan:
    """An opened, fully verified plan bundle. Build it with :func:`load_plan`.

    ``manifest`` is the validated manifest, ``path`` the file it came from (None for bytes). All
    member bytes are held in memory and were checked against the manifest's sha256 and size.
    ``manifest.json`` itself can be read too but is not among :meth:`member_names`.
    """

    __slots__ = ("manifest", "path", "_members")

    def __init__(self, manifest: Manifest, members: Mapping[str, bytes], path: str | None = None) -> None:
        self.manifest = manifest
        self.path = path
        self._members: dict[str, bytes] = dict(members)

    def _label(self) -> str:
        return _source_label(self.path)

    def member_names(self) -> list[str]:
        """Names of the members listed in the manifest (sorted; ``manifest.json`` excluded)."""
        return sorted(n for n in self._members if n != MANIFEST_NAME)

    def has(self, name: str) -> bool:
        """Whether the bundle contains member ``name``."""
        return name in self._members

    def read(self, name: str) -> bytes:
        """The verified bytes of member ``name``; :class:`PlanError` naming it if absent."""
        try:
            return self._members[name]
        except (KeyError, TypeError):
            raise PlanError(f"{self._label()}: has no member {_show(name)}") from None

    def network(self, stage: str, level: int, fmt: str) -> bytes:
        """The bytes of stage ``stage``'s level-``level`` network in format ``fmt``."""
        spec = self.manifest.stage(stage)
        for scale in spec.scales:
            if scale.level == level:
                if fmt not in scale.networks:
                    raise PlanError(
                        f"{self._label()}: stage {stage!r} level {level} has no {fmt!r} network "
                        f"(has {sorted(scale.networks)})"
                    )
                return self.read(scale.networks[fmt])
        raise PlanError(f"{self._label()}: stage {stage!r} has no level {level}")

    def __repr__(self) -> str:
        return f"Plan(name={self.manifest.name!r}, path={self.path!r}, members={len(self.member_names())})"


def _source_label(path: str | None) -> str:
    return f"plan {path!r}" if path is not None else "plan <bytes>"


def load_plan(source: Source) -> Plan:
    """Open and fully verify a plan: a file path, or the plan file's raw bytes.

    Raises :class:`PlanError` (naming the path and the offending member or field) for a missing,
    unreadable, truncated, corrupted, hostile or too-new plan; see the module docstring for the
    checks. A ``bytes`` argument is the file's contents, never a path. Other argument types are a
    programming error (``TypeError``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        path = None
        if len(data) > MAX_FILE_BYTES:
            raise PlanError(f"{_source_label(None)}: larger than the limit of {MAX_FILE_BYTES} bytes")
    elif isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        data = _read_file(path)
    else:
        raise TypeError(f"load_plan expects a path or bytes, got {type(source).__name__}")
    return _load_bytes(data, path)


def _read_file(path: str) -> bytes:
    label = _source_label(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise PlanError(f"{label}: is a directory, not a plan file")
        if not stat.S_ISREG(st.st_mode):
            raise PlanError(f"{label}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise PlanError(f"{label}: {st.st_size} bytes, larger than the limit of {MAX_FILE_BYTES}")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PlanError(f"{label}: no such file") from None
    except (OSError, ValueError) as exc:  # permissions, NUL in path, I/O errors
        raise PlanError(f"{label}: cannot read: {exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise PlanError(f"{label}: larger than the limit of {MAX_FILE_BYTES} bytes")
    return data


def _load_bytes(data: bytes, path: str | None) -> Plan:
    label = _source_label(path)
    if not data:
        raise PlanError(f"{label}: empty file (not a zip file)")
    _check_central_directory(data, label)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except _ZIP_ERRORS as exc:
        raise PlanError(f"{label}: not a zip file, or truncated ({_show(str(exc), 120)})") from exc
    with zf:
        files = _check_entries(infos, label)
        if MANIFEST_NAME not in files:
            raise PlanError(f"{label}: {MANIFEST_NAME} is missing (not an msode plan?)")
        manifest_info = files[MANIFEST_NAME]
        if manifest_info.file_size > MAX_MANIFEST_BYTES:
            raise PlanError(
                f"{label}: {MANIFEST_NAME} is {manifest_info.file_size} bytes, "
                f"more than the limit of {MAX_MANIFEST_BYTES}"
            )
        manifest_bytes = _read_member(zf, manifest_info, label)
        obj = _parse_manifest_json(manifest_bytes, label)
        try:
            manifest = validate_manifest(obj)
        except PlanError as exc:
            raise PlanError(f"{label}: {exc}") from None

        for name in files:
            if name != MANIFEST_NAME and name not in manifest.members:
                raise PlanError(f"{label}: member {name!r} is not listed in manifest.members")
        for name in manifest.members:
            if name not in files:
                raise PlanError(f"{label}: member {name!r} is listed in manifest.members but missing")

        contents: dict[str, bytes] = {MANIFEST_NAME: manifest_bytes}
        for name, entry in manifest.members.items():
            info = files[name]
            if info.file_size != entry["size"]:
                raise PlanError(
                    f"{label}: member {name!r}: size {info.file_size} does not match manifest.members ({entry['size']})"
                )
            blob = _read_member(zf, info, label)
            digest = hashlib.sha256(blob).hexdigest()
            if digest != entry["sha256"]:
                raise PlanError(
                    f"{label}: member {name!r}: sha256 mismatch (manifest {entry['sha256'][:12]}..., "
                    f"content {digest[:12]}...): the plan is corrupted or was modified"
                )
            contents[name] = blob
    return Plan(manifest, contents, path)


def _check_central_directory(data: bytes, label: str) -> None:
    """Refuse a zip whose end record declares too many entries or too large a central directory.

    Runs before :mod:`zipfile` builds one object per entry, so a hostile file cannot make it
    allocate millions of them. Finds the end records exactly as zipfile does (the end record at a
    fixed position when there is no archive comment, else the last signature in the final 64 KiB;
    a zip64 end record directly before its locator, which directly precedes the end record); a
    file without an end record is left for zipfile to reject.
    """
    eocd = len(data) - 22
    if not (eocd >= 0 and data[eocd : eocd + 4] == b"PK\x05\x06" and data[-2:] == b"\0\0"):
        eocd = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 65536))
        if eocd < 0 or eocd + 22 > len(data):
            return
    entries, size = struct.unpack_from("<HI", data, eocd + 10)
    locator, record = eocd - 20, eocd - 20 - 56
    if record >= 0 and data[locator : locator + 4] == b"PK\x06\x07" and data[record : record + 4] == b"PK\x06\x06":
        entries, size = struct.unpack_from("<QQ", data, record + 32)  # zip64 values replace them
    if entries > MAX_MEMBERS:
        raise PlanError(f"{label}: {entries} zip entries, more than the limit of {MAX_MEMBERS}")
    if size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise PlanError(
            f"{label}: zip central directory of {size} bytes, more than the limit of {MAX_CENTRAL_DIRECTORY_BYTES}"
        )


def _check_entries(infos: list[zipfile.ZipInfo], label: str) -> dict[str, zipfile.ZipInfo]:
    """Structural checks on every zip entry; returns the file (non-directory) entries by name."""
    if len(infos) > MAX_MEMBERS:
        raise PlanError(f"{label}: {len(infos)} zip entries, more than the limit of {MAX_MEMBERS}")
    files: dict[str, zipfile.ZipInfo] = {}
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.orig_filename  # zipfile cuts `filename` at a NUL byte; check the real name
        problem = _member_name_problem(name)
        if problem is not None:
            raise PlanError(f"{label}: unsafe member name {_show(name)}: {problem}")
        if name in seen:
            raise PlanError(f"{label}: duplicate member {name!r}")
        seen.add(name)
        mode = (info.external_attr >> 16) & _S_IFMT
        if mode == _S_IFLNK:
            raise PlanError(f"{label}: member {name!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise PlanError(f"{label}: member {name!r} is encrypted")
        if name.endswith("/"):
            if mode not in (0, _S_IFDIR) or info.file_size != 0:
                raise PlanError(f"{label}: member {name!r} is not a plain directory entry")
            continue
        if mode not in (0, _S_IFREG):
            raise PlanError(f"{label}: member {name!r} is not a regular file (mode {mode:o})")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise PlanError(
                f"{label}: member {name!r} uses compression method {info.compress_type} "
                "(only stored and deflated are accepted)"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise PlanError(f"{label}: member {name!r} is stored but its sizes disagree")
        if info.file_size > MAX_MEMBER_BYTES:
            raise PlanError(
                f"{label}: member {name!r} declares {info.file_size} bytes, more than the limit of {MAX_MEMBER_BYTES}"
            )
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise PlanError(f"{label}: members exceed the total limit of {MAX_TOTAL_BYTES} bytes")
        files[name] = info
    return files


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> bytes:
    """Read one member in chunks, stopping as soon as it yields more than it declared."""
    name = info.orig_filename
    declared = info.file_size
    chunks: list[bytes] = []
    total = 0
    try:
        with zf.open(info) as f:
            while True:
                chunk = f.read(min(_READ_CHUNK, declared - total + 1))
                if not chunk:
                    break
                total += len(chunk)
                if total > declared:
                    raise PlanError(
                        f"{label}: member {name!r} decompresses to more than its declared {declared} bytes (zip bomb?)"
                    )
                chunks.append(chunk)
    except PlanError:
        raise
    except zipfile.BadZipFile as exc:
        raise PlanError(f"{label}: member {name!r} is corrupted ({_show(str(exc), 120)})") from exc
    except _ZIP_ERRORS as exc:
        raise PlanError(
            f"{label}: member {name!r} cannot be read ({type(exc).__name__}: {_show(str(exc), 120)})"
        ) from exc
    if total != declared:
        raise PlanError(f"{label}: member {name!r} is truncated ({total} of {declared} bytes)")
    return b"".join(chunks)


def _reject_constant(token: str) -> NoReturn:
    raise PlanError(f"{MANIFEST_NAME}: {token} is not valid JSON (non-finite numbers are not allowed)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PlanError(f"{MANIFEST_NAME}: duplicate key {_show(key)} in a JSON object")
        out[key] = value
    return out


def _parse_manifest_json(raw: bytes, label: str) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{label}: {MANIFEST_NAME} is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except PlanError as exc:
        raise PlanError(f"{label}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(
            f"{label}: {MANIFEST_NAME} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno} (char {exc.pos})"
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. integers with too many digits, deep nesting
        raise PlanError(f"{label}: {MANIFEST_NAME} cannot be parsed: {_show(str(exc), 120)}") from None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_manifest(
    name: str, model_grid: Mapping[str, Any], stages: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """A manifest dict skeleton for :func:`write_plan`.

    Sets ``format``, ``format_version`` (2 when a scale has ``features``, else 1), ``name``, ``created`` (now, UTC, ISO 8601 with ``Z``),
    ``model_grid``, ``stages`` and defaults for ``normalization`` (percentile 0.5-99.5) and
    ``modalities`` (empty); keyword arguments add or override top-level keys (``description``,
    ``analytic``, ``metrics``, ``training``, ...). ``members`` is filled in by :func:`write_plan`.
    Inputs are copied, not aliased. Nothing is validated here.
    """
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": required_format_version(stages),
        "name": name,
        "created": _utc_now(),
        "model_grid": _json_copy(dict(model_grid)),
        "normalization": {"method": "percentile", "low": 0.5, "high": 99.5},
        "modalities": [],
        "stages": _json_copy(list(stages)),
    }
    for key, value in extra.items():
        manifest[key] = _json_copy(value)
    return manifest


def required_format_version(stages: Any) -> int:
    """The oldest format version that can hold ``stages`` (manifest dicts): 2 with feature networks, else 1."""
    try:
        uses_features = any("features" in sc for st in stages for sc in st.get("scales", ()))
    except (TypeError, AttributeError):  # malformed stages: validation reports them
        uses_features = False
    return FEATURES_VERSION if uses_features else 1


def _aligned_info(name: str, offset: int) -> zipfile.ZipInfo:
    """A stored-member ZipInfo whose data will start on an ALIGNMENT boundary at ``offset``."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed: reproducible bundles
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = (_S_IFREG | 0o644) << 16
    header = 30 + len(name.encode("utf-8")) + 6  # local header + name + padding extra's id/len/align
    pad = (-(offset + header)) % ALIGNMENT
    info.extra = struct.pack("<HHH", _ALIGN_EXTRA_ID, 2 + pad, ALIGNMENT) + b"\0" * pad
    return info


def write_plan(path: str | os.PathLike[str], manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> Manifest:
    """Validate and write a plan atomically; returns the manifest as a reader will see it.

    Fills ``members`` (sha256 and size of each given member; any existing value is replaced) and,
    if missing, ``format``, ``format_version`` and ``created``. Neither argument is modified.
    Members are written stored (uncompressed, 64-byte aligned), ``manifest.json`` first and the
    rest in sorted order, with fixed timestamps, so the same inputs give the same bytes. The bundle
    is verified by loading it back from memory, then written to a temporary file in the target's
    directory and moved into place with ``os.replace``: readers never see a partial plan and a
    failure leaves any previous file untouched. Raises :class:`PlanError` for an invalid manifest
    or member, or when the file cannot be written.
    """
    target = os.fsdecode(os.fspath(path))
    label = _source_label(target)
    if not isinstance(manifest, Mapping):
        raise PlanError(f"{label}: manifest must be a mapping, got {type(manifest).__name__}")
    m: dict[str, Any] = _json_copy(dict(manifest))
    m.setdefault("format", FORMAT)
    m.setdefault("format_version", required_format_version(m.get("stages", ())))
    m.setdefault("created", _utc_now())

    blobs: dict[str, bytes] = {}
    total = 0
    for name in sorted(members, key=str):
        data = members[name]
        if not isinstance(name, str):
            raise PlanError(f"{label}: member names must be strings, got {_show(name)}")
        problem = _member_name_problem(name)
        if problem is not None or name.endswith("/"):
            raise PlanError(f"{label}: unsafe member name {_show(name)}: {problem or 'is a directory'}")
        if name == MANIFEST_NAME:
            raise PlanError(f"{label}: {MANIFEST_NAME} is written from the manifest argument")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PlanError(f"{label}: member {name!r} must be bytes, got {type(data).__name__}")
        blob = bytes(data)
        if len(blob) > MAX_MEMBER_BYTES:
            raise PlanError(f"{label}: member {name!r} is {len(blob)} bytes, more than {MAX_MEMBER_BYTES}")
        total += len(blob)
        blobs[name] = blob
    m["members"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in blobs.items()}

    try:
        validate_manifest(m)
    except PlanError as exc:
        raise PlanError(f"{label}: {exc}") from None
    try:
        text = json.dumps(m, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise PlanError(f"{label}: manifest is not JSON-serialisable: {exc}") from None
    manifest_bytes = text.encode("utf-8")
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise PlanError(
            f"{label}: {MANIFEST_NAME} would be {len(manifest_bytes)} bytes, more than {MAX_MANIFEST_BYTES}"
        )
    if total + len(manifest_bytes) > MAX_TOTAL_BYTES:
        raise PlanError(f"{label}: members exceed the total limit of {MAX_TOTAL_BYTES} bytes")

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, blob in [(MANIFEST_NAME, manifest_bytes), *blobs.items()]:
            zf.writestr(_aligned_info(name, buf.tell()), blob)
    data = buf.getvalue()
    if len(data) > MAX_FILE_BYTES:
        raise PlanError(f"{label}: the plan would be {len(data)} bytes, more than {MAX_FILE_BYTES}")
    written = _load_bytes(data, None)  # what a reader will see; catches any writer/reader mismatch
    _atomic_write(target, data, label)
    return written.manifest


def _atomic_write(target: str, data: bytes, label: str) -> None:
    directory = os.path.dirname(os.path.abspath(target))
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise PlanError(f"{label}: cannot write: {exc}") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _fmt_vec(values: tuple[Any, ...] | list[Any]) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _fmt_scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return _show(json.dumps(value, allow_nan=True, default=str), 70)
    return _show(value, 70) if isinstance(value, str) else str(value)


def plan_summary(plan: Plan) -> str:
    """A human-readable, multi-line description of a plan (for ``msode plan info``)."""
    m = plan.manifest
    g = m.model_grid
    lines = [f"plan {m.name} ({FORMAT} v{m.format_version})"]
    if plan.path is not None:
        lines.append(f"  file:          {plan.path}")
    lines.append(f"  created:       {m.created}")
    if m.description:
        lines.append(f"  description:   {m.description}")
    if m.analytic:
        lines.append("  analytic:      yes - networks are gradient-descent stand-ins, not trained")
    else:
        lines.append(f"  kind:          {m.kind}")
    lines.append(
        f"  model grid:    {_fmt_vec(g.shape_xyz)} voxels at {_fmt_vec(g.spacing_xyz_mm)} mm, "
        f"{g.orientation}, centred on {'field of view' if g.centre == 'fov' else 'centre of mass'}"
    )
    norm = m.normalization
    lines.append(f"  normalisation: {norm['method']} {norm['low']:g}-{norm['high']:g}")
    lines.append(f"  modalities:    {', '.join(m.modalities) if m.modalities else '(none recorded)'}")
    lines.append(f"  stages:        {len(m.stages)}")
    for i, stage in enumerate(m.stages, 1):
        extra = ""
        if stage.transform == "bspline":
            extra = f", control spacing {_fmt_vec(stage.params['control_spacing_mm'])} mm"
        lines.append(f"    {i}. {stage.name} ({stage.transform}{extra}), {len(stage.scales)} levels")
        for sc in stage.scales:
            if sc.solver == "adaptive_heun":
                solver = f"adaptive_heun tol={sc.tol:g} max_steps={sc.max_steps}"
                if sc.step_size is not None:
                    solver += f" h0={sc.step_size:g}"
            else:
                solver = f"{sc.solver} step={sc.step_size:g}"
            lines.append(
                f"       L{sc.level}: {_fmt_vec(sc.shape_xyz)} at {_fmt_vec(sc.spacing_xyz_mm)} mm, "
                f"t=[{sc.t0:g}, {sc.t1:g}], {solver}, networks: {', '.join(sorted(sc.networks))}"
            )
            if sc.feature_grid is not None:
                how = "moving features warped with the state" if sc.feature_warp else "moving features per evaluation"
                lines.append(
                    f"           feature network ({', '.join(sorted(sc.features))}) on "
                    f"{_fmt_vec(sc.feature_grid[0])} at {_fmt_vec(sc.feature_grid[1])} mm: fixed features once, {how}"
                )
    engine_dirs = sorted({n.split("/")[1] for n in m.members if n.startswith("engines/") and n.count("/") >= 2})
    lines.append(
        f"  registrar.ts:  {'yes (whole loop as one TorchScript module)' if 'registrar.ts' in m.members else 'no'}"
    )
    lines.append(
        f"  TensorRT engines: {', '.join(engine_dirs) if engine_dirs else 'none (built from ONNX on first use)'}"
    )
    total = sum(e["size"] for e in m.members.values())
    lines.append(f"  members:       {len(m.members)} ({_fmt_bytes(total)}, sha256 verified)")
    for name in sorted(m.members):
        entry = m.members[name]
        lines.append(f"    {name}  {_fmt_bytes(entry['size'])}  sha256 {entry['sha256'][:12]}")
    for title, section in (("metrics", m.metrics), ("training", m.training)):
        if section:
            lines.append(f"  {title}:")
            for key in sorted(section, key=str):
                lines.append(f"    {key}: {_fmt_scalar(section[key])}")
    return "\n".join(lines)
