"""The ``msode::*`` torch operators: schemas, reference implementations, shape functions.

The schemas are defined here, in Python, once per process (``torch.library``), so that the operators
exist on every install, CPU-only ones included. Their reference implementation (the PyTorch warps of
:mod:`._reference`, i.e. the semantics) is registered for ``CompositeExplicitAutograd``: it serves
CPU tensors, and CUDA tensors whenever the compiled kernels are not loaded. The compiled extension
(``csrc/warp_ops.cpp``, built by :mod:`._cuda`) adds ``CUDA`` kernels to the same operators with
``TORCH_LIBRARY_IMPL(msode, CUDA, m)``; the dispatcher prefers those for CUDA tensors. A fake (meta)
implementation gives output shapes to ``torch.compile`` and friends.

Conventions of every operator (those of :mod:`msode_sdk.transforms`):

* ``volume`` ``(N, C, D, H, W)``, float32 or float16; the output has the volume's dtype and shape
  ``(N, C, Z', Y', X')`` for ``out_shape = [X', Y', Z']``;
* ``*_spacing`` are ``[x, y, z]`` mm, ``out_shape`` is ``[X, Y, Z]`` voxels; the source grid's shape is
  the volume's; every grid is centred (voxel ``i`` at ``(i - (n - 1) / 2) * spacing`` mm);
* ``matrix`` ``(N|1, 3|4, 4)`` maps centre-relative fixed mm points to moving ones (the rigid stage);
  ``coeffs`` ``(N|1, 3, cz, cy, cx)`` are B-spline control displacements in mm (control ``k`` at
  ``(k - (n - 1) / 2) * control_spacing``); ``field`` ``(N|1, 3, fD, fH, fW)`` is a dense displacement
  in mm on a centred grid of ``field_spacing`` (trilinear, border-extended);
* the sampled map is ``phi(x) = A (x + u(x))`` (``A`` the matrix, ``u`` the B-spline or dense
  displacement), the chain ``[rigid, deformable]`` of :class:`~msode_sdk.transforms.TransformChain`;
  warps sample the volume at ``phi(x)`` (trilinear, zeros outside), ``chain_displacement`` returns
  ``phi(x) - x`` ``(N, 3, Z', Y', X')`` float32 mm.
"""

from __future__ import annotations

import threading

import torch

from ..transforms import (
    BSplineLattice,
    BSplineTransform,
    DenseTransform,
    Grid,
    MatrixTransform,
    Transform,
    TransformChain,
)
from ..errors import InputError
from ._reference import warp_chain_reference

__all__ = ["SCHEMAS", "ensure_defined", "chain_from_args"]

NAMESPACE = "msode"

# The single definition of the operators' schemas (the C++ binding implements exactly these).
SCHEMAS: dict[str, str] = {
    "resample": "resample(Tensor volume, float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor",
    "warp_affine": (
        "warp_affine(Tensor volume, Tensor matrix, float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor"
    ),
    "warp_bspline": (
        "warp_bspline(Tensor volume, Tensor coeffs, float[] control_spacing, float[] src_spacing, "
        "float[] out_spacing, int[] out_shape) -> Tensor"
    ),
    "warp_dense": (
        "warp_dense(Tensor volume, Tensor field, float[] field_spacing, float[] src_spacing, "
        "float[] out_spacing, int[] out_shape) -> Tensor"
    ),
    "warp_affine_bspline": (
        "warp_affine_bspline(Tensor volume, Tensor matrix, Tensor coeffs, float[] control_spacing, "
        "float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor"
    ),
    "warp_affine_dense": (
        "warp_affine_dense(Tensor volume, Tensor matrix, Tensor field, float[] field_spacing, "
        "float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor"
    ),
    "chain_displacement": (
        "chain_displacement(Tensor? matrix, Tensor? coeffs, Tensor? field, float[] control_spacing, "
        "float[] field_spacing, float[] out_spacing, int[] out_shape) -> Tensor"
    ),
}

_lock = threading.Lock()
_libs: list = []  # keep the torch.library.Library objects alive


# ------------------------------------------------------------------------ arguments -> transforms


def _xyz(values, what: str, kind=float) -> tuple:
    vals = tuple(kind(v) for v in values)
    if len(vals) != 3:
        raise InputError(f"{what} must have 3 values (x, y, z), got {list(values)}")
    return vals


def lattice_with_shape(shape_xyz, control_spacing) -> BSplineLattice:
    """A :class:`BSplineLattice` of exactly ``shape_xyz`` control points at ``control_spacing`` mm: the
    lattice of a grid whose extent is ``(n - 3) * spacing`` (same control positions, centred)."""
    cs = _xyz(control_spacing, "control_spacing")
    n = _xyz(shape_xyz, "lattice shape", int)
    if min(n) < 3:
        raise InputError(f"a B-spline lattice has >= 3 control points per axis, got {n}")
    lat = BSplineLattice(Grid(tuple(k - 2 for k in n), cs), cs)
    assert lat.shape_xyz == n, (lat.shape_xyz, n)
    return lat


def chain_from_args(matrix=None, coeffs=None, control_spacing=None, field=None, field_spacing=None) -> TransformChain:
    """The :class:`TransformChain` an operator's arguments describe: ``[affine?, deformable?]``."""
    stages: list[Transform] = []
    if matrix is not None:
        stages.append(MatrixTransform(matrix))
    if coeffs is not None and field is not None:
        raise InputError("give either B-spline coefficients or a dense field, not both")
    if coeffs is not None:
        if coeffs.ndim != 5 or coeffs.shape[1] != 3:
            raise InputError(f"coeffs must be (N, 3, cz, cy, cx), got {tuple(coeffs.shape)}")
        cz, cy, cx = coeffs.shape[2:]
        stages.append(BSplineTransform(coeffs, lattice_with_shape((cx, cy, cz), control_spacing)))
    if field is not None:
        if field.ndim != 5 or field.shape[1] != 3:
            raise InputError(f"field must be (N, 3, fD, fH, fW), got {tuple(field.shape)}")
        fd, fh, fw = field.shape[2:]
        stages.append(DenseTransform(field, Grid((fw, fh, fd), _xyz(field_spacing, "field_spacing"))))
    return TransformChain(stages)


def _grids(volume, src_spacing, out_spacing, out_shape) -> tuple[Grid, Grid]:
    if volume.ndim != 5:
        raise InputError(f"volume must be (N, C, D, H, W), got {tuple(volume.shape)}")
    d, h, w = volume.shape[2:]
    return (
        Grid((w, h, d), _xyz(src_spacing, "src_spacing")),
        Grid(_xyz(out_shape, "out_shape", int), _xyz(out_spacing, "out_spacing")),
    )


def _reference_warp(volume, chain, src_spacing, out_spacing, out_shape):
    src, out = _grids(volume, src_spacing, out_spacing, out_shape)
    # The reference samples in the volume's dtype; fp16 is sampled in fp32 and rounded once (as the kernel).
    vol = volume if volume.dtype in (torch.float32, torch.float64) else volume.float()
    return warp_chain_reference(vol, src, chain, out).to(volume.dtype)


# ------------------------------------------------------------------------------ implementations


def _resample(volume, src_spacing, out_spacing, out_shape):
    return _reference_warp(volume, TransformChain(), src_spacing, out_spacing, out_shape)


def _warp_affine(volume, matrix, src_spacing, out_spacing, out_shape):
    return _reference_warp(volume, chain_from_args(matrix=matrix), src_spacing, out_spacing, out_shape)


def _warp_bspline(volume, coeffs, control_spacing, src_spacing, out_spacing, out_shape):
    chain = chain_from_args(coeffs=coeffs, control_spacing=control_spacing)
    return _reference_warp(volume, chain, src_spacing, out_spacing, out_shape)


def _warp_dense(volume, field, field_spacing, src_spacing, out_spacing, out_shape):
    chain = chain_from_args(field=field, field_spacing=field_spacing)
    return _reference_warp(volume, chain, src_spacing, out_spacing, out_shape)


def _warp_affine_bspline(volume, matrix, coeffs, control_spacing, src_spacing, out_spacing, out_shape):
    chain = chain_from_args(matrix=matrix, coeffs=coeffs, control_spacing=control_spacing)
    return _reference_warp(volume, chain, src_spacing, out_spacing, out_shape)


def _warp_affine_dense(volume, matrix, field, field_spacing, src_spacing, out_spacing, out_shape):
    chain = chain_from_args(matrix=matrix, field=field, field_spacing=field_spacing)
    return _reference_warp(volume, chain, src_spacing, out_spacing, out_shape)


def _chain_displacement(matrix, coeffs, field, control_spacing, field_spacing, out_spacing, out_shape):
    chain = chain_from_args(matrix, coeffs, control_spacing, field, field_spacing)
    if not len(chain):
        raise InputError("chain_displacement needs a matrix, B-spline coefficients or a dense field")
    grid = Grid(_xyz(out_shape, "out_shape", int), _xyz(out_spacing, "out_spacing"))
    ref = next(t.state for t in chain.transforms)
    batch = max(t.batch for t in chain.transforms)
    return chain.displacement(grid, batch, torch.float32, ref.device).float().contiguous()


_IMPLS = {
    "resample": _resample,
    "warp_affine": _warp_affine,
    "warp_bspline": _warp_bspline,
    "warp_dense": _warp_dense,
    "warp_affine_bspline": _warp_affine_bspline,
    "warp_affine_dense": _warp_affine_dense,
    "chain_displacement": _chain_displacement,
}


def _out_zyx(out_shape) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in out_shape)
    return (z, y, x)


def _fake_warp(volume, *args):
    out_shape = args[-1]
    return volume.new_empty((volume.shape[0], volume.shape[1], *_out_zyx(out_shape)))


def _fake_displacement(matrix, coeffs, field, control_spacing, field_spacing, out_spacing, out_shape):
    given = [t for t in (matrix, coeffs, field) if t is not None]
    if not given:
        raise InputError("chain_displacement needs a matrix, B-spline coefficients or a dense field")
    batch = max(t.shape[0] for t in given)
    return given[0].new_empty((batch, 3, *_out_zyx(out_shape)), dtype=torch.float32)


def _schema_exists(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def ensure_defined() -> None:
    """Define the ``msode::*`` schemas with their reference and fake implementations (idempotent)."""
    with _lock:
        if _libs:
            return
        if _schema_exists("warp_affine"):  # defined by an earlier import under another module name
            _libs.append(None)
            return
        lib = torch.library.Library(NAMESPACE, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(schema)
            lib.impl(name, _IMPLS[name], "CompositeExplicitAutograd")
        _libs.append(lib)
        register_fake = getattr(torch.library, "register_fake", None)
        if register_fake is not None:
            for name in SCHEMAS:
                fake = _fake_displacement if name == "chain_displacement" else _fake_warp
                register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)


def has_cuda_kernel(name: str) -> bool:
    """Whether the compiled CUDA kernel (not the reference) serves ``msode::name`` on CUDA tensors."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CUDA"))
    except Exception:  # pragma: no cover - private API moved
        return False


def op(name: str):
    """``torch.ops.msode.<name>`` (defining the operators first if needed)."""
    ensure_defined()
    return getattr(getattr(torch.ops, NAMESPACE), name)
