"""Simulated motions as SDK transforms: rigid, B-spline, hybrid (see "Motions" in :mod:`msode_train.data`)."""

from __future__ import annotations

import numpy as np
import torch

from msode_sdk.transforms import BSplineLattice, BSplineTransform, Grid, RigidTransform, TransformChain, euler_to_rigid

__all__ = [
    "DEFAULT_CONTROL_SPACING_MM",
    "motion_lattice",
    "sample_rigid",
    "sample_bspline",
    "sample_hybrid",
    "sample_motion",
    "MOTION_KINDS",
]

DEFAULT_CONTROL_SPACING_MM = 40.0


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def motion_lattice(grid: Grid, control_spacing_mm: float = DEFAULT_CONTROL_SPACING_MM) -> BSplineLattice:
    """The B-spline lattice of simulated motions on a model ``grid`` (isotropic control spacing)."""
    return BSplineLattice(grid, (float(control_spacing_mm),) * 3)


def sample_rigid(rng, n: int = 1, max_rot_deg: float = 75.0, max_trans_mm: float = 20.0) -> torch.Tensor:
    """``(n, 6)`` float32 rigid parameters (SDK convention: rotation vector + mm) of the paper's motion:
    Euler rotations U(-max_rot_deg, max_rot_deg) degrees about each axis (``R = Rz @ Ry @ Rx``) and
    translations U(-max_trans_mm, max_trans_mm) mm."""
    rng = _as_rng(rng)
    rot = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, (n, 3)))
    trans = rng.uniform(-max_trans_mm, max_trans_mm, (n, 3))
    theta = euler_to_rigid(torch.from_numpy(rot), torch.from_numpy(trans))
    return theta.to(torch.float32)


def sample_bspline(
    rng, lattice: BSplineLattice, n: int = 1, std_mm: float = 8.0, zero_border: bool = False
) -> torch.Tensor:
    """``(n, 3, cz, cy, cx)`` float32 control displacements N(0, std_mm^2) mm; ``zero_border`` sets
    the outermost ring of control points to zero (less motion at the field-of-view border)."""
    rng = _as_rng(rng)
    c = torch.from_numpy(rng.normal(0.0, std_mm, (n, *lattice.coeff_shape)).astype(np.float32))
    if zero_border:
        c[:, :, [0, -1]] = 0.0
        c[:, :, :, [0, -1]] = 0.0
        c[:, :, :, :, [0, -1]] = 0.0
    return c


def sample_hybrid(
    rng,
    lattice: BSplineLattice,
    n: int = 1,
    max_rot_deg: float = 40.0,
    max_trans_mm: float = 10.0,
    std_mm: float = 8.0,
    zero_border: bool = False,
):
    """``(theta (n, 6), coeffs (n, 3, cz, cy, cx))``: rigid U(-40, 40) deg, U(-10, 10) mm, plus the
    B-spline N(0, 8^2) mm; the chain is [rigid, bspline], ``phi(x) = R (x + u(x) + t)``."""
    rng = _as_rng(rng)
    theta = sample_rigid(rng, n, max_rot_deg, max_trans_mm)
    return theta, sample_bspline(rng, lattice, n, std_mm, zero_border)


MOTION_KINDS = ("identity", "rigid", "bspline", "hybrid")


def sample_motion(
    rng, kind: str, grid: Grid, n: int = 1, control_spacing_mm: float = DEFAULT_CONTROL_SPACING_MM, **kwargs
) -> TransformChain:
    """A ground-truth :class:`TransformChain` of ``kind`` (identity | rigid | bspline | hybrid) with
    the paper's distributions (override through ``kwargs`` of the ``sample_*`` functions)."""
    rng = _as_rng(rng)
    if kind == "identity":
        return TransformChain([RigidTransform(torch.zeros(n, 6))])
    if kind == "rigid":
        return TransformChain([RigidTransform(sample_rigid(rng, n, **kwargs))])
    lat = motion_lattice(grid, control_spacing_mm)
    if kind == "bspline":
        return TransformChain([BSplineTransform(sample_bspline(rng, lat, n, **kwargs), lat)])
    if kind == "hybrid":
        theta, coeffs = sample_hybrid(rng, lat, n, **kwargs)
        return TransformChain([RigidTransform(theta), BSplineTransform(coeffs, lat)])
    raise ValueError(f"unknown motion kind {kind!r}; valid: {list(MOTION_KINDS)}")
