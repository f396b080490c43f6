"""The whole registrar loop as one TorchScript module: the plan member ``registrar.ts``.

For C++ (LibTorch) embedding without Python at run time::

    torch::jit::Module reg = torch::jit::load("registrar.ts", device);   // or read it from the .plan zip
    auto out = reg.forward({moving, fixed}).toTuple();                      // (warped, displacement, matrix)

Contract of ``forward(moving, fixed)``
-------------------------------------
* Inputs: ``(N, 1, D, H, W)`` float32 tensors (``N = 1`` for one pair) **already on the plan's model grid**
  (RAS, axis-aligned, each centred on its own image centre, see :mod:`msode_sdk.io`) and normalised to
  [0, 1]; both on the same device as the module. What the Python SDK does before
  :meth:`msode_sdk.Registrar.register_model_grid` (resampling, intensity normalisation) stays the
  caller's job; ``describe()`` returns the model grid and normalisation as JSON.
* Returns ``(warped, displacement, matrix)``:

  - ``warped`` ``(N, 1, D, H, W)``: the moving tensor resampled through the whole transform chain;
  - ``displacement`` ``(N, 3, D, H, W)``: total map ``phi(x) - x`` in **voxels of the model grid**,
    channel 0 = x (W axis), 1 = y (H), 2 = z (D): fixed voxel ``(x, y, z)`` maps to moving voxel
    ``(x, y, z) + displacement[:, :, z, y, x]``;
  - ``matrix``: float64, ``(4, 4)`` for ``N = 1`` (``(N, 4, 4)`` for a batch): the rigid part of the
    chain (product of the rigid stages; identity without one) in voxel space, mapping the fixed
    model-grid voxel index ``(x, y, z, 1)`` to the moving model-grid voxel index.

Semantics are those of the Python SDK, line for line (and checked by the parity test in
``tests/test_export.py``): the pyramid of :meth:`msode_sdk.Registrar._downsample`, the solvers of
:mod:`msode_sdk.integrate` (the fixed-step grid is precomputed with
:func:`msode_sdk.integrate.fixed_step_grid`; adaptive Heun with the same error norm, step control and
``max_steps``), the transforms of :mod:`msode_sdk.transforms` (the rigid
rotation of :func:`~msode_sdk.transforms.rigid_matrix` about the grid centre -- the very same function,
scripted --, exact separable cubic B-spline on each level grid, gather-based B-spline at arbitrary
points, dense fields border-extended) and the reference warps of :mod:`msode_sdk.warp._reference`
(``grid_sample``, ``align_corners=True``, zeros padding). The per-level networks are the plan's own
TorchScript members, embedded as submodules. The module needs nothing but LibTorch (no custom ops); it is
saved by the torch version that built it and loads in that LibTorch version or newer.

Run time: the first two calls are slower (TorchScript's profiling executor specialises and optimises the
graphs: ~1 s on a small grid); warm the module up once before timing it. Each transform kind and each
solver is its own small module so that the compiled graphs hold only the code a level needs.

Build with :func:`build_registrar_ts` (bytes) or add to a plan with :func:`add_registrar_ts`
(``msode export`` and ``scripts/build_analytic_plan.py`` do it by default).
"""
# No ``from __future__ import annotations`` here: TorchScript reads the class annotations as real types.

import copy
import io
import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msode_sdk import world
from msode_sdk.errors import PlanError
from msode_sdk.initialize import choose_start, mutual_information, thetas_of_axes
from msode_sdk.integrate import fixed_step_grid, heun_step_control
from msode_sdk.loop import (
    CONTENT_RATIO_WARNING,
    FOV_CONTENT,
    FOV_MASKED,
    SCALE_SEARCH_STRIDE,
    content_ratio,
    erode,
    fov_cuts_content,
    fov_margin,
    halves,
)
from msode_sdk.plan import Plan, load_plan, write_plan
from msode_sdk.registrar import SIMILARITY_DROP_WARNING
from msode_sdk.transforms import (
    Grid,
    affine_bspline_coords,
    apply_matrix,
    bspline_displacement_at,
    bspline_kernel,
    jacobian_determinant,
    lattice_for,
    rigid_inverse,
    rigid_matrix_unchecked,
)

__all__ = [
    "REGISTRAR_MEMBER",
    "RegistrarModule",
    "build_registrar_module",
    "build_registrar_ts",
    "add_registrar_ts",
    "load_registrar_ts",
]

REGISTRAR_MEMBER = "registrar.ts"

# ------------------------------------------------------------------------------------------------
# TorchScript ports of msode_sdk.transforms / warp._reference (same ops in the same order).
# Grids are (shape_xyz: List[int], spacing_xyz: List[float]); stage parameters are List[float]:
#   rigid: []     bspline: [csx, csy, csz, ncx, ncy, ncz]     dense: [nx, ny, nz, sx, sy, sz] (its grid)
# ------------------------------------------------------------------------------------------------


def _axis_coords(n: int, s: float, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    return (torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2.0) * s


def _grid_points(
    shape: List[int], spacing: List[float], device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    xs = _axis_coords(shape[0], spacing[0], device, dtype)
    ys = _axis_coords(shape[1], spacing[1], device, dtype)
    zs = _axis_coords(shape[2], spacing[2], device, dtype)
    return _axes_points(xs, ys, zs)


def _axes_points(xs: Tensor, ys: Tensor, zs: Tensor) -> Tensor:
    """``(D, H, W, 3)`` (x, y, z) points of the rectilinear grid ``xs x ys x zs`` (transforms._axes_points)."""
    g = torch.meshgrid([zs, ys, xs], indexing="ij")
    return torch.stack([g[2], g[1], g[0]], dim=-1)


def _normalise(points: Tensor, shape: List[int], spacing: List[float]) -> Tensor:
    half: List[float] = []
    for i in range(3):
        half.append(max((shape[i] - 1) * spacing[i], 1e-12) / 2.0)
    return points / torch.tensor(half, dtype=points.dtype, device=points.device)


def _sample(volume: Tensor, shape: List[int], spacing: List[float], points: Tensor) -> Tensor:
    return _sample_coords(volume, _normalise(points, shape, spacing))


def _sample_coords(volume: Tensor, coords: Tensor) -> Tensor:
    return F.grid_sample(volume, coords.to(volume.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def _fast_coords(
    matrix: Optional[Tensor],
    coeffs: Optional[Tensor],
    bparams: List[float],
    shape: List[int],
    spacing: List[float],
    n: int,
    device: torch.device,
) -> Tensor:
    """``grid_sample`` coordinates of ``A (x + u(x))`` on a grid that is also the source grid: the SDK's
    own :func:`msode_sdk.transforms.affine_bspline_coords` (what its reference warp computes for
    ``[rigid?, bspline?]`` chains), so the warps agree bit for bit."""
    xs = _axis_coords(shape[0], spacing[0], device)
    ys = _axis_coords(shape[1], spacing[1], device)
    zs = _axis_coords(shape[2], spacing[2], device)
    bx: Optional[Tensor] = None
    by: Optional[Tensor] = None
    bz: Optional[Tensor] = None
    if coeffs is not None:
        bx = _bspline_basis(xs, int(bparams[3]), bparams[0])
        by = _bspline_basis(ys, int(bparams[4]), bparams[1])
        bz = _bspline_basis(zs, int(bparams[5]), bparams[2])
    inv_half: List[float] = []
    for i in range(3):
        inv_half.append(2.0 / max((shape[i] - 1) * spacing[i], 1e-12))
    c = _affine_bspline_coords(matrix, coeffs, xs, ys, zs, bx, by, bz, inv_half)
    if c.shape[0] != n:
        c = c.expand([n, c.shape[1], c.shape[2], c.shape[3], 3])
    return c


# The rotation convention, point mapping and B-spline kernel are the SDK's own functions (TorchScript
# compiles them into the module): one definition, no drift.
_rigid_matrix = rigid_matrix_unchecked
_rigid_inverse = rigid_inverse
_affine_bspline_coords = affine_bspline_coords
# the native-image pipeline: the SDK's own msode_sdk.world functions, compiled into the module
_world_image_centre = world.image_centre
_world_prepare = world.prepare_on_grid
_world_outputs = world.world_outputs
_erode = erode
_fov_cuts_content = fov_cuts_content
_content_ratio = content_ratio
_apply_matrix = apply_matrix
_bspline_kernel = bspline_kernel


def _bspline_basis(coords: Tensor, n_ctrl: int, cs: float) -> Tensor:
    p = (torch.arange(n_ctrl, dtype=coords.dtype, device=coords.device) - (n_ctrl - 1) / 2.0) * cs
    return _bspline_kernel((coords[:, None] - p[None, :]) / cs)


def _bspline_on(coeffs: Tensor, params: List[float], shape: List[int], spacing: List[float]) -> Tensor:
    """Exact separable FFD displacement ``(N, 3, D, H, W)`` on a grid (BSplineLattice.displacement_on)."""
    return _bspline_on_axes(
        coeffs,
        params,
        _axis_coords(shape[0], spacing[0], coeffs.device),
        _axis_coords(shape[1], spacing[1], coeffs.device),
        _axis_coords(shape[2], spacing[2], coeffs.device),
    )


def _bspline_on_axes(coeffs: Tensor, params: List[float], xs: Tensor, ys: Tensor, zs: Tensor) -> Tensor:
    """Exact separable FFD displacement ``(N, 3, len(zs), len(ys), len(xs))`` on the rectilinear grid of
    the mm axes ``xs``, ``ys``, ``zs`` (BSplineLattice.displacement_on_axes)."""
    bx = _bspline_basis(xs.to(coeffs.dtype), int(params[3]), params[0])
    by = _bspline_basis(ys.to(coeffs.dtype), int(params[4]), params[1])
    bz = _bspline_basis(zs.to(coeffs.dtype), int(params[5]), params[2])
    out = torch.einsum("ncklm,xm->ncklx", coeffs, bx)
    out = torch.einsum("ncklx,yl->nckyx", out, by)
    out = torch.einsum("nckyx,zk->nczyx", out, bz)
    return out


def _bspline_at(coeffs: Tensor, points: Tensor, params: List[float]) -> Tensor:
    """FFD displacement at arbitrary points: the SDK's own :func:`bspline_displacement_at`."""
    return bspline_displacement_at(
        coeffs, points, [int(params[3]), int(params[4]), int(params[5])], [params[0], params[1], params[2]]
    )


def _dense_at(field: Tensor, params: List[float], points: Tensor) -> Tensor:
    """``x + d(x)`` for a dense field on its grid, trilinear, border-extended (DenseTransform.map_points)."""
    n = points.shape[0]
    shape = [int(params[0]), int(params[1]), int(params[2])]
    spacing = [params[3], params[4], params[5]]
    flat = points.reshape(n, 1, 1, -1, 3)
    d = F.grid_sample(
        field, _normalise(flat, shape, spacing), mode="bilinear", padding_mode="border", align_corners=True
    )
    return points + d.reshape(n, 3, -1).transpose(1, 2).reshape(points.shape)


def _expand(pts: Tensor, n: int) -> Tensor:
    return pts.unsqueeze(0).expand([n, pts.shape[0], pts.shape[1], pts.shape[2], 3])


# ------------------------------------------------------------------------------------------------
# Modules. One small module per transform kind and per solver, so that TorchScript compiles only the
# code each stage and level needs (no run-time dispatch on kind/solver strings, small graphs).
# ------------------------------------------------------------------------------------------------


class _RigidT(nn.Module):
    """``phi(x) = R x + t`` (RigidTransform)."""

    index: int

    def __init__(self, index: int):
        super().__init__()
        self.index = int(index)

    def map_points(self, state: Tensor, points: Tensor) -> Tensor:
        return _apply_matrix(_rigid_matrix(state), points)

    def map_grid(self, state: Tensor, shape: List[int], spacing: List[float]) -> Tensor:
        pts = _grid_points(shape, spacing, state.device)
        return _apply_matrix(_rigid_matrix(state), _expand(pts, state.shape[0]))

    def map_axes(self, state: Tensor, xs: Tensor, ys: Tensor, zs: Tensor) -> Tensor:
        return self.map_points(state, _expand(_axes_points(xs, ys, zs), state.shape[0]))


class _ParamsT(nn.Module):
    """A stage transform described by a list of floats (lattice or field grid)."""

    index: int
    params: List[float]

    def __init__(self, index: int, params: List[float]):
        super().__init__()
        self.index = int(index)
        self.params = [float(v) for v in params]


class _BSplineT(_ParamsT):
    """``phi(x) = x + u(x)``, cubic B-spline on the stage's lattice (BSplineTransform)."""

    def map_points(self, state: Tensor, points: Tensor) -> Tensor:
        return points + _bspline_at(state, points, self.params)

    def map_grid(self, state: Tensor, shape: List[int], spacing: List[float]) -> Tensor:
        pts = _grid_points(shape, spacing, state.device)
        return pts + _bspline_on(state, self.params, shape, spacing).permute(0, 2, 3, 4, 1)

    def map_axes(self, state: Tensor, xs: Tensor, ys: Tensor, zs: Tensor) -> Tensor:
        return _axes_points(xs, ys, zs) + _bspline_on_axes(state, self.params, xs, ys, zs).permute(0, 2, 3, 4, 1)


class _DenseT(_ParamsT):
    """``phi(x) = x + d(x)``, ``d`` sampled on the grid ``params`` (DenseTransform)."""

    def map_points(self, state: Tensor, points: Tensor) -> Tensor:
        return _dense_at(state, self.params, points)

    def map_grid(self, state: Tensor, shape: List[int], spacing: List[float]) -> Tensor:
        pts = _grid_points(shape, spacing, state.device)
        p = self.params
        same = (
            int(p[0]) == shape[0]
            and int(p[1]) == shape[1]
            and int(p[2]) == shape[2]
            and p[3] == spacing[0]
            and p[4] == spacing[1]
            and p[5] == spacing[2]
        )
        if same:
            return pts + state.permute(0, 2, 3, 4, 1)
        return _dense_at(state, self.params, _expand(pts, state.shape[0]))

    def map_axes(self, state: Tensor, xs: Tensor, ys: Tensor, zs: Tensor) -> Tensor:
        return self.map_points(state, _expand(_axes_points(xs, ys, zs), state.shape[0]))


def _transform_module(kind: str, index: int, params: List[float]) -> nn.Module:
    if kind == "rigid":
        return _RigidT(index)
    if kind == "bspline":
        return _BSplineT(index, params)
    return _DenseT(index, params)


class _NoFeatures(nn.Module):
    """Placeholder feature network of a level without one (format 1): never called."""

    def forward(self, image: Tensor) -> Tensor:
        return image


class _LevelInputs(NamedTuple):
    """What every evaluation on a level reads (:meth:`_Level.integrate` builds it): the moving source (with its
    field of view as a 2nd channel when masked), the fixed input, the inverse level-start matrix, the fixed
    field of view (empty: no masking) and the earlier stages' states."""

    mov: Tensor
    fix: Tensor
    m0_inv: Tensor
    fov_f: Tensor
    states: List[Tensor]


class _Level(nn.Module):
    """One pyramid level of one stage: network, grid, transform (its own, on the level grid), the
    earlier stages as fixed priors (``phi = prior_1 o ... o prior_k o own``), time segment, and (plan
    format 2) the feature network with its grid and mode (:mod:`msode_sdk.loop`: fixed features once
    per level; moving features of the warped image at every evaluation, or warped with the state).
    Subclasses implement ``integrate`` (one per solver); :meth:`prepare` computes what a level holds
    fixed (moving source, fixed input, level-start frame) and :meth:`field` one evaluation."""

    shape: List[int]
    spacing: List[float]
    t0: float
    t1: float
    pyr: int
    carry: bool
    prev_params: List[float]
    label: str
    has_features: bool
    feature_warp: bool
    rigid: bool
    fshape: List[int]
    fspacing: List[float]
    fast: int
    prior_rigid: int
    bparams: List[float]
    stride: int
    masked: bool
    margin: int
    fpool: List[int]

    def __init__(
        self,
        network: nn.Module,
        own: nn.Module,
        priors: List[nn.Module],
        grid: Grid,
        t0: float,
        t1: float,
        pyr: int,
        prev_grid: Optional[Grid],
        kind: str,
        label: str,
        features: Optional[nn.Module] = None,
        feature_grid: Optional[Grid] = None,
        feature_warp: bool = False,
        prior_kinds: Optional[List[str]] = None,
    ):
        super().__init__()
        self.network = network
        self.own = own
        self.priors = nn.ModuleList(priors)  # applied in this order (the last, finest prior first)
        self.shape = [int(v) for v in grid.shape_xyz]
        self.spacing = [float(v) for v in grid.spacing_xyz]
        self.t0 = float(t0)
        self.t1 = float(t1)
        self.pyr = int(pyr)
        # carry_state: only a dense state moves when the grid changes
        self.carry = kind == "dense" and prev_grid is not None and prev_grid != grid
        self.prev_params = (
            [float(v) for v in prev_grid.shape_xyz] + [float(v) for v in prev_grid.spacing_xyz]
            if prev_grid is not None
            else []
        )
        self.label = label
        self.has_features = features is not None
        self.features = features if features is not None else _NoFeatures()
        self.feature_warp = bool(feature_warp) and features is not None
        self.rigid = kind == "rigid"
        fg = feature_grid if feature_grid is not None else grid
        self.fshape = [int(v) for v in fg.shape_xyz]
        self.fspacing = [float(v) for v in fg.spacing_xyz]
        # which [rigid?, bspline?] chain the warps take through the SDK's affine_bspline_coords (as its
        # reference warp does): 1 own rigid, 2 own B-spline, 3 a rigid prior then the own B-spline; 0 points
        prior_kinds = list(prior_kinds or [])
        self.prior_rigid = priors[0].index if prior_kinds == ["rigid"] else -1
        self.bparams = [float(v) for v in own.params] if kind == "bspline" else []
        self.stride = int(SCALE_SEARCH_STRIDE)
        # fields of view (msode_sdk.loop, "Fields of view"): exact feature levels of the masked stage kinds
        self.masked = kind in FOV_MASKED and features is not None and not self.feature_warp
        self.margin = fov_margin(grid)
        self.fpool = [a // b for a, b in zip(grid.shape_dhw, fg.shape_dhw)]
        if kind == "rigid" and not prior_kinds:
            self.fast = 1
        elif kind == "bspline" and not prior_kinds:
            self.fast = 2
        elif kind == "bspline" and prior_kinds == ["rigid"]:
            self.fast = 3
        else:
            self.fast = 0

    def _chain_points(self, y: Tensor, states: List[Tensor], n: int) -> Tensor:
        """``prior o own(y)`` at every voxel of the level grid, batch ``n``."""
        pts = self.own.map_grid(y, self.shape, self.spacing)
        for pr in self.priors:
            pts = pr.map_points(states[pr.index], pts)
        if pts.shape[0] != n:
            pts = pts.expand([n, pts.shape[1], pts.shape[2], pts.shape[3], 3])
        return pts

    def _warp(self, mov: Tensor, y: Tensor, states: List[Tensor]) -> Tensor:
        """``mov`` (on the level grid) warped by ``prior o own(y)`` onto the level grid."""
        n = mov.shape[0]
        if self.fast == 1:
            return _sample_coords(
                mov, _fast_coords(_rigid_matrix(y), None, self.bparams, self.shape, self.spacing, n, mov.device)
            )
        if self.fast == 2:
            return _sample_coords(mov, _fast_coords(None, y, self.bparams, self.shape, self.spacing, n, mov.device))
        if self.fast == 3:
            return _sample_coords(
                mov,
                _fast_coords(
                    _rigid_matrix(states[self.prior_rigid]), y, self.bparams, self.shape, self.spacing, n, mov.device
                ),
            )
        return _sample(mov, self.shape, self.spacing, self._chain_points(y, states, n))

    def prepare(self, y: Tensor, mov: Tensor, fix: Tensor, states: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """``(moving source, fixed input, inverse level-start matrix)`` of this level for states from ``y``."""
        m0_inv = torch.zeros([1, 4, 4], dtype=torch.float32, device=mov.device)
        if not self.has_features:
            return mov, fix, m0_inv
        fix_feat = self.features(fix)
        if not self.feature_warp:
            return mov, fix_feat, m0_inv
        if self.rigid:  # level-start frame prior o M0; evaluations warp by M0^-1 M(y)
            start = self._warp(mov, y, states)
            m0_inv = _rigid_inverse(_rigid_matrix(y))
        elif self.prior_rigid >= 0:  # frame: the (rigid) prior stage; evaluations warp by the own transform
            start = _sample_coords(
                mov,
                _fast_coords(
                    _rigid_matrix(states[self.prior_rigid]),
                    None,
                    self.bparams,
                    self.shape,
                    self.spacing,
                    mov.shape[0],
                    mov.device,
                ),
            )
        elif len(self.priors) > 0:
            pts = _expand(_grid_points(self.shape, self.spacing, mov.device), mov.shape[0])
            for pr in self.priors:
                pts = pr.map_points(states[pr.index], pts)
            start = _sample(mov, self.shape, self.spacing, pts)
        else:
            start = mov
        return self.features(start), fix_feat, m0_inv

    def integrate(
        self,
        y: Tensor,
        pyr_m: List[Tensor],
        pyr_f: List[Tensor],
        states: List[Tensor],
        fov_m: List[Tensor],
        fov_f: List[Tensor],
    ) -> Tensor:
        """This level's segment from the carried state: the level's inputs once (:meth:`prepare`; where the
        pair's fields of view cut content, ``fov_m`` / ``fov_f`` per pyramid level, else empty lists, and this
        level masks: the moving mask as a 2nd channel, warped with the image, and the fixed one, eroded once
        per level), then the solver's :meth:`solve` (template method: each solver class implements it)."""
        y = self.carried(y)
        mov, fix, m0_inv = self.prepare(y, pyr_m[self.pyr], pyr_f[self.pyr], states)
        if self.masked and len(fov_m) > 0:
            moving_fov = _erode(fov_m[self.pyr], self.margin)
            inp = _LevelInputs(
                torch.cat([mov, moving_fov], 1), fix, m0_inv, _erode(fov_f[self.pyr], self.margin), states
            )
        else:
            inp = _LevelInputs(mov, fix, m0_inv, torch.zeros([0], dtype=mov.dtype, device=mov.device), states)
        return self.solve(y, inp)

    def solve(self, y: Tensor, inp: _LevelInputs) -> Tensor:
        raise NotImplementedError("a solver class implements solve")

    def field(self, t: float, y: Tensor, inp: _LevelInputs) -> Tensor:
        """One evaluation. ``inp.fov_f``: the fixed field of view on the level (empty: no masking), ``inp.mov``
        then holding the moving image and its field of view as two channels (msode_sdk.loop's ``f_fov``)."""
        mov, fix, m0_inv, fov_f, states = inp.mov, inp.fix, inp.m0_inv, inp.fov_f, inp.states
        if self.feature_warp:
            if self.rigid:
                warped = _sample_coords(
                    mov,
                    _fast_coords(
                        m0_inv @ _rigid_matrix(y), None, self.bparams, self.fshape, self.fspacing, y.shape[0], y.device
                    ),
                )
            elif len(self.bparams) > 0:
                warped = _sample_coords(
                    mov, _fast_coords(None, y, self.bparams, self.fshape, self.fspacing, y.shape[0], y.device)
                )
            else:
                warped = _sample(mov, self.fshape, self.fspacing, self.own.map_grid(y, self.fshape, self.fspacing))
        else:
            warped = self._warp(mov, y, states)
            if fov_f.numel() > 0:
                feat = self.features(warped[:, :1].contiguous())
                inside = (warped[:, 1:] >= 0.999) & (fov_f > 0.5)
                if self.fpool != [1, 1, 1]:
                    inside = -F.max_pool3d(-inside.to(feat.dtype), self.fpool) > 0.5
                warped = torch.where(inside, feat, fix)
            elif self.has_features:
                warped = self.features(warped)
        tt = torch.full([warped.shape[0]], t, dtype=torch.float32, device=warped.device)
        v = self.network(warped, fix, tt)
        if v.shape != y.shape:
            raise RuntimeError(
                "network " + self.label + " returned shape " + str(v.shape) + ", expected " + str(y.shape)
            )
        return v.to(y.dtype)

    def start_candidates(self, pyr_m: List[Tensor], pyr_f: List[Tensor]) -> Tensor:
        """``(N, 5, 6)`` rigid starts on this level: identity + 4 principal-axes candidates."""
        mov = pyr_m[self.pyr]
        xs = _axis_coords(self.shape[0], self.spacing[0], mov.device, torch.float64)
        ys = _axis_coords(self.shape[1], self.spacing[1], mov.device, torch.float64)
        zs = _axis_coords(self.shape[2], self.spacing[2], mov.device, torch.float64)
        return thetas_of_axes(mov, pyr_f[self.pyr], xs, ys, zs, 0.05)

    def mi_of(self, y: Tensor, mov: Tensor, fix: Tensor) -> Tensor:
        """MI ``(N,)`` between ``fix`` and ``mov`` warped by this level's own transform of state ``y``."""
        if self.fast == 1:
            warped = _sample_coords(
                mov,
                _fast_coords(_rigid_matrix(y), None, self.bparams, self.shape, self.spacing, mov.shape[0], mov.device),
            )
        else:
            warped = _sample(mov, self.shape, self.spacing, self.own.map_grid(y, self.shape, self.spacing))
        return mutual_information(warped, fix)

    def scale_search(
        self,
        y: Tensor,
        pyr_m: List[Tensor],
        pyr_f: List[Tensor],
        states: List[Tensor],
        scales: List[float],
        fov_m: List[Tensor],
        fov_f: List[Tensor],
    ) -> Tensor:
        """A deformable stage's scale search on this (finest) level, as msode_sdk.loop's ``_scale_search``:
        ``y`` times the factor whose chain gives the highest MI at every ``stride``-th voxel of each axis;
        where the fields of view cut content (``fov_m`` / ``fov_f`` per pyramid level, else empty) and this
        level masks, only voxels inside both count (msode_sdk.loop.similarity)."""
        mov = pyr_m[self.pyr]
        k = self.stride
        xs = _axis_coords(self.shape[0], self.spacing[0], y.device)[k // 2 :: k]
        ys = _axis_coords(self.shape[1], self.spacing[1], y.device)[k // 2 :: k]
        zs = _axis_coords(self.shape[2], self.spacing[2], y.device)[k // 2 :: k]
        fix_s = pyr_f[self.pyr][:, :, k // 2 :: k, k // 2 :: k, k // 2 :: k]
        n = y.shape[0]
        candidates: List[Tensor] = []
        scores: List[Tensor] = []
        for a in scales:
            ya = y * a
            pts = self.own.map_axes(ya, xs, ys, zs)
            for pr in self.priors:
                pts = pr.map_points(states[pr.index], pts)
            candidates.append(ya.reshape(n, -1))
            mask: Optional[Tensor] = None
            if self.masked and len(fov_m) > 0:
                inside_m = _sample(fov_m[self.pyr], self.shape, self.spacing, pts) >= 0.999
                mask = inside_m & (fov_f[self.pyr][:, :, k // 2 :: k, k // 2 :: k, k // 2 :: k] > 0.5)
            scores.append(mutual_information(_sample(mov, self.shape, self.spacing, pts), fix_s, mask=mask))
        best, _ = choose_start(torch.stack(candidates, 1), torch.stack(scores, 1))
        return best.reshape(y.shape)

    def carried(self, y: Tensor) -> Tensor:
        if self.carry:
            pts = _expand(_grid_points(self.shape, self.spacing, y.device), y.shape[0])
            return (_dense_at(y, self.prev_params, pts) - pts).permute(0, 4, 1, 2, 3).contiguous()
        return y


class _FixedStepLevel(_Level):
    """Template for fixed-step solvers on the precomputed :func:`msode_sdk.integrate.fixed_step_grid`:
    this class owns the loop, a subclass implements ``step`` (as ``FixedGridSolver`` in the SDK)."""

    times: List[float]

    def __init__(self, *args, times: List[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.times = [float(v) for v in times]

    def step(self, t: float, dt: float, y: Tensor, inp: _LevelInputs) -> Tensor:
        raise NotImplementedError("subclass implements one step")

    def solve(self, y: Tensor, inp: _LevelInputs) -> Tensor:
        for i in range(len(self.times) - 1):
            ta = self.times[i]
            y = self.step(ta, self.times[i + 1] - ta, y, inp)
        return y


class _EulerLevel(_FixedStepLevel):
    """Forward Euler."""

    def step(self, t: float, dt: float, y: Tensor, inp: _LevelInputs) -> Tensor:
        return y + dt * self.field(t, y, inp)


class _HeunLevel(_FixedStepLevel):
    """Heun's method (explicit trapezoid)."""

    def step(self, t: float, dt: float, y: Tensor, inp: _LevelInputs) -> Tensor:
        k1 = self.field(t, y, inp)
        k2 = self.field(t + dt, y + dt * k1, inp)
        return y + 0.5 * dt * (k1 + k2)


class _AdaptiveHeunLevel(_Level):
    """msode_sdk.integrate.AdaptiveHeunSolver: Heun-Euler pair with the SDK's own step controller
    (:func:`msode_sdk.integrate.heun_step_control`), at most ``max_steps`` attempts (then a warning and the
    segment stops early)."""

    step0: float
    tol: float
    max_steps: int

    def __init__(self, *args, step0: float, tol: float, max_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.step0 = float(step0)
        self.tol = float(tol)
        self.max_steps = int(max_steps)

    def solve(self, y: Tensor, inp: _LevelInputs) -> Tensor:
        t0 = self.t0
        t1 = self.t1
        span = t1 - t0
        dt = min(self.step0 if self.step0 != 0.0 else span / 10.0, span)
        t = t0
        eps = span * 1e-9
        k1 = y  # placeholder; valid only while have_k1
        have_k1 = False
        attempts = 0
        while t1 - t > eps:
            if attempts >= self.max_steps:
                warnings.warn("adaptive_heun stopped before the end of its segment after max_steps attempts")
                break
            attempts += 1
            dt = min(dt, t1 - t)
            if not have_k1:
                k1 = self.field(t, y, inp)
                have_k1 = True
            y_new_euler = y + dt * k1
            k2 = self.field(t + dt, y_new_euler, inp)
            y_new = y + 0.5 * dt * (k1 + k2)
            ratio, factor = heun_step_control(0.5 * dt * (k2 - k1), y, y_new, self.tol)  # the SDK's controller
            if not math.isfinite(ratio):
                raise RuntimeError("adaptive_heun: non-finite error estimate in " + self.label)
            if ratio <= 1.0:
                if t1 - (t + dt) > eps:
                    t = t + dt
                else:
                    t = t1
                y = y_new
                have_k1 = False  # Heun-Euler is not FSAL: f is evaluated at (t, y) afresh
            dt = dt * factor
        return y


# TorchScript reads a module's attribute types from its class's own __annotations__: merge the base's.
for _cls in (_EulerLevel, _HeunLevel, _AdaptiveHeunLevel):
    _cls.__annotations__ = {**_Level.__annotations__, **_cls.__annotations__}


class _Stage(nn.Module):
    """A registration stage: its levels, coarse to fine. A rigid stage may start from an initialiser
    (``init``: ``none`` | ``moments`` | ``multistart``, exactly as :meth:`msode_sdk.Registrar.register_model_grid`
    runs them: the very same :mod:`msode_sdk.initialize` functions, scripted)."""

    name: str
    init_shape: List[int]
    init: str
    scale_search: List[float]

    def __init__(
        self,
        name: str,
        levels: List[_Level],
        init_shape: List[int],
        init: str = "none",
        scale_search: Optional[List[float]] = None,
    ):
        super().__init__()
        self.name = name
        self.levels = nn.ModuleList(levels)
        self.init_shape = [int(v) for v in init_shape]
        self.init = init
        self.scale_search = [float(v) for v in (scale_search or [])]

    def run(
        self,
        pyr_m: List[Tensor],
        pyr_f: List[Tensor],
        states: List[Tensor],
        fov_m: List[Tensor],
        fov_f: List[Tensor],
    ) -> Tensor:
        n = pyr_m[0].shape[0]
        shape = [n]
        for v in self.init_shape:
            shape.append(v)
        y = torch.zeros(shape, dtype=torch.float32, device=pyr_m[0].device)
        first = 0
        if self.init != "none":
            k = 5
            th = y.reshape(n, 1, 6).expand(n, k, 6)
            rep_m: List[Tensor] = []
            rep_f: List[Tensor] = []
            no_fov: List[Tensor] = []  # rigid levels are not masked
            for i in range(len(pyr_m)):
                rep_m.append(pyr_m[i].repeat_interleave(k, 0))
                rep_f.append(pyr_f[i].repeat_interleave(k, 0))
            last = len(self.levels) - 1
            for j, lvc in enumerate(self.levels):
                if j == last:  # from the finest level's images, as msode_sdk.loop's _candidates
                    th = lvc.start_candidates(pyr_m, pyr_f)
            k = th.shape[1]
            ends = th.reshape(n * k, 6)
            score = torch.zeros([n, k], dtype=torch.float64, device=y.device)
            for i, lv in enumerate(self.levels):
                if i == 0:
                    if self.init == "moments":  # score the raw starts on the first level
                        score = lv.mi_of(ends, rep_m[lv.pyr], rep_f[lv.pyr]).reshape(n, k)
                    else:  # multistart: integrate the first level from every start
                        ends = lv.integrate(ends, rep_m, rep_f, states, no_fov, no_fov)
            if self.init == "multistart":
                for j, lvs in enumerate(self.levels):
                    if j == min(1, last):  # score the end points on the next level
                        score = lvs.mi_of(ends, rep_m[lvs.pyr], rep_f[lvs.pyr]).reshape(n, k)
                first = 1
            y = ends.reshape(n, k, 6)[torch.arange(n, device=y.device), score.argmax(1)]
        for j, lvi in enumerate(self.levels):
            if j >= first:
                y = lvi.integrate(y, pyr_m, pyr_f, states, fov_m, fov_f)
        if len(self.scale_search) > 0:
            last = len(self.levels) - 1
            for j, lvl in enumerate(self.levels):
                if j == last:
                    y = lvl.scale_search(y, pyr_m, pyr_f, states, self.scale_search, fov_m, fov_f)
        if not bool(torch.isfinite(y).all()):
            raise RuntimeError("stage " + self.name + " produced non-finite parameters")
        return y


class RegistrarModule(nn.Module):
    """The whole multi-stage, multi-scale loop (see the module docstring for ``forward``'s contract)."""

    shape: List[int]
    spacing: List[float]
    rigid_indices: List[int]
    pyr_shapes: List[List[List[int]]]
    pyr_spacings: List[List[List[float]]]
    pyr_halving: List[List[bool]]
    info_json: str
    final_rigid: int
    final_bspline: int
    final_bparams: List[float]
    final_fast: bool
    final_dense: int
    final_fparams: List[float]
    native_ok: bool
    centre_mode: str
    norm_low: float
    norm_high: float
    fov_margin: int
    fov_masked_indices: List[int]
    deformable: bool
    similarity_drop_warning: float
    similarity_stride: int
    content_ratio_warning: float
    fov_content: float

    def __init__(
        self,
        model_grid: Grid,
        stages: List[_Stage],
        final: List[nn.Module],
        rigid_indices: List[int],
        pyramid: List[List[Grid]],
        info: dict,
        kinds: Optional[List[str]] = None,
    ):
        super().__init__()
        self.shape = [int(v) for v in model_grid.shape_xyz]
        self.spacing = [float(v) for v in model_grid.spacing_xyz]
        self.stages = nn.ModuleList(stages)
        self.last = final[-1]  # innermost stage: evaluated on the model grid
        self.outer = nn.ModuleList(final[:-1][::-1])  # then the earlier stages, finest first
        self.rigid_indices = [int(i) for i in rigid_indices]
        self.pyr_shapes = [[[int(v) for v in g.shape_xyz] for g in steps] for steps in pyramid]
        self.pyr_spacings = [[[float(v) for v in g.spacing_xyz] for g in steps] for steps in pyramid]
        self.pyr_halving = [[halves(a, b) for a, b in zip([model_grid, *steps[:-1]], steps)] for steps in pyramid]
        self.info_json = json.dumps(info, sort_keys=True)
        # the final warp of a [rigid?, bspline?] chain through affine_bspline_coords, as the SDK's reference warp
        kinds = list(kinds or [])
        fast = kinds in (["rigid"], ["bspline"], ["rigid", "bspline"])
        self.final_rigid = kinds.index("rigid") if fast and "rigid" in kinds else -1
        self.final_bspline = kinds.index("bspline") if fast and "bspline" in kinds else -1
        self.final_bparams = [float(v) for v in final[-1].params] if self.final_bspline >= 0 else []
        self.final_fast = fast
        # register_native: world outputs of [rigid?, bspline | dense?] chains (msode_sdk.world.world_outputs)
        self.native_ok = kinds in ([], ["rigid"], ["bspline"], ["dense"], ["rigid", "bspline"], ["rigid", "dense"])
        self.final_dense = kinds.index("dense") if self.native_ok and "dense" in kinds else -1
        if self.native_ok and self.final_bspline < 0 and "bspline" in kinds:
            self.final_bspline = kinds.index("bspline")
            self.final_bparams = [float(v) for v in final[-1].params]
        self.final_fparams = [float(v) for v in final[-1].params] if self.final_dense >= 0 else []
        grid_info = info.get("model_grid", {})
        norm = info.get("normalization", {})
        self.centre_mode = str(grid_info.get("centre", "fov"))
        self.norm_low = float(norm.get("low", 0.5))
        self.norm_high = float(norm.get("high", 99.5))
        self.fov_margin = fov_margin(model_grid)
        # report measures (register_native_measured), as RegistrationResult.report() computes them
        # a stage masks where one of its levels does (RegistrationLoop.fov_masks)
        self.fov_masked_indices = [i for i, st in enumerate(stages) if any(lv.masked for lv in st.levels)]
        self.deformable = any(k in ("bspline", "dense") for k in kinds)
        self.similarity_drop_warning = float(SIMILARITY_DROP_WARNING)
        self.similarity_stride = int(SCALE_SEARCH_STRIDE)
        self.content_ratio_warning = float(CONTENT_RATIO_WARNING)
        self.fov_content = float(FOV_CONTENT)

    @torch.jit.export
    def describe(self) -> str:
        """JSON: plan name, model grid, normalisation, stages, output conventions."""
        return self.info_json

    def _downsample(self, vol: Tensor, p: int) -> Tensor:
        cur = vol
        cur_shape = self.shape
        cur_spacing = self.spacing
        steps_shape = self.pyr_shapes[p]
        steps_spacing = self.pyr_spacings[p]
        for i in range(len(steps_shape)):
            if self.pyr_halving[p][i]:  # 2x2x2 averages, as msode_sdk.loop.downsample
                cur = F.avg_pool3d(cur, 2)
            else:
                pts = _expand(_grid_points(steps_shape[i], steps_spacing[i], cur.device), cur.shape[0])
                cur = _sample(cur, cur_shape, cur_spacing, pts)
            cur_shape = steps_shape[i]
            cur_spacing = steps_spacing[i]
        return cur

    def _states(
        self, moving: Tensor, fixed: Tensor, fov_m: Optional[Tensor] = None, fov_f: Optional[Tensor] = None
    ) -> List[Tensor]:
        """Every stage's final state for model-grid inputs (the pyramid, then the stages in order).
        ``fov_m`` / ``fov_f``: the fields of view on the model grid, given where they cut content (as
        msode_sdk.loop's ``pyramid``): their levels go to the masked levels."""
        pyr_m: List[Tensor] = []
        pyr_f: List[Tensor] = []
        lev_m: List[Tensor] = []
        lev_f: List[Tensor] = []
        for p in range(len(self.pyr_shapes)):
            pyr_m.append(self._downsample(moving, p))
            pyr_f.append(self._downsample(fixed, p))
            if fov_m is not None and fov_f is not None:  # as msode_sdk.loop's pyramid
                lev_m.append((self._downsample(fov_m, p) >= 0.999).to(fov_m.dtype))
                lev_f.append((self._downsample(fov_f, p) >= 0.999).to(fov_f.dtype))
        states: List[Tensor] = []
        for st in self.stages:
            states.append(st.run(pyr_m, pyr_f, states, lev_m, lev_f))
        return states

    def _prepare(self, image: Tensor, affine: Tensor, name: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(native (1, 1, X, Y, Z), centre RAS, model-grid volume, its field of view)`` of a native image,
        as the SDK's ``msode_sdk.io.prepare_image`` computes them (the same :mod:`msode_sdk.world` functions)."""
        if image.dim() != 3:
            raise ValueError("InputError: " + name + ": expected a 3-D (X, Y, Z) image, got " + str(image.shape))
        if list(affine.shape) != [4, 4]:
            raise ValueError("InputError: " + name + ": expected a 4x4 affine, got " + str(affine.shape))
        native = image.to(torch.float32).contiguous().unsqueeze(0).unsqueeze(0)
        aff = affine.to(device=native.device, dtype=torch.float64)
        centre = _world_image_centre(native, aff, self.centre_mode)
        vol, fov = _world_prepare(
            native, aff, self.shape, self.spacing, centre, self.norm_low, self.norm_high, "InputError: " + name + ": "
        )
        if float(vol.max()) <= 0.0:
            raise ValueError("InputError: " + name + ": no image content inside the model grid around its centre")
        return native, centre, vol, fov

    @torch.jit.export
    def register_native(
        self, moving: Tensor, moving_affine: Tensor, fixed: Tensor, fixed_affine: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The whole pipeline on native images, as ``msode_sdk.Registrar.register`` runs it: ``moving``,
        ``fixed`` float32 ``(X, Y, Z)`` in NIfTI index order (any strides), their 4x4 float64 voxel -> RAS
        affines. Returns ``(warped (X, Y, Z) on the fixed grid in the moving image's intensities,
        displacement (X, Y, Z, 3) LPS mm: fixed point p -> moving point p + d(p), matrix (4, 4) float64
        RAS: the rigid part, fixed point -> moving point)``. Errors about the inputs start with
        ``InputError:``."""
        warped, disp, matrix, _ = self._register_native(moving, moving_affine, fixed, fixed_affine, False)
        return warped, disp, matrix

    @torch.jit.export
    def register_native_measured(
        self, moving: Tensor, moving_affine: Tensor, fixed: Tensor, fixed_affine: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]:
        """:meth:`register_native` and the measures of the SDK's ``report.json`` (``RegistrationResult.report``),
        on the model grid: ``similarity`` float64 ``(1 + stages,)`` (mutual information, nats, at the start
        then after each stage; ``msode_sdk.loop.similarity``), ``similarity_drop_warning`` (the fraction of
        the start's value whose loss deserves a warning), ``fov_cut`` (bool: an image's field of view cuts
        content), ``fov_masked_stages`` (int64 stage indices masked by the fields of view), ``content_ratio``
        (``msode_sdk.loop.content_ratio``), ``content_ratio_warning`` (below it: a warning),
        ``moving_content_smaller`` (bool: which image the warning names) and, when a
        deformable stage ran, ``jacobian_min`` and ``jacobian_fraction_nonpositive``."""
        return self._register_native(moving, moving_affine, fixed, fixed_affine, True)

    def _register_native(
        self, moving: Tensor, moving_affine: Tensor, fixed: Tensor, fixed_affine: Tensor, measure: bool
    ) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]:
        if not self.native_ok:
            raise RuntimeError("registrar.ts: register_native supports plans whose chain is [rigid?, bspline|dense?]")
        with torch.no_grad():
            mov, c_m, vol_m, fov_m = self._prepare(moving, moving_affine, "moving")
            fix, c_f, vol_f, fov_f = self._prepare(fixed, fixed_affine, "fixed")
            cut = _fov_cuts_content(vol_m, fov_m, self.fov_margin) or _fov_cuts_content(vol_f, fov_f, self.fov_margin)
            if cut:
                states = self._states(vol_m, vol_f, fov_m, fov_f)
            else:
                states = self._states(vol_m, vol_f)
            measures: Dict[str, Tensor] = {}
            if measure:
                measures = self._measures(states, vol_m, vol_f, cut)
            a = torch.eye(4, dtype=torch.float64, device=mov.device)
            first = True
            for j in self.rigid_indices:
                m = _rigid_matrix(states[j])[0].to(torch.float64)
                if first:
                    a = m
                    first = False
                else:
                    a = a @ m
            coeffs: Optional[Tensor] = None
            field: Optional[Tensor] = None
            if self.final_bspline >= 0:
                coeffs = states[self.final_bspline]
            if self.final_dense >= 0:
                field = states[self.final_dense]
            shape = [int(fix.shape[2]), int(fix.shape[3]), int(fix.shape[4])]
            half: List[float] = []
            for i in range(3):
                half.append(self.spacing[i] / 2.0)
            warped, disp, matrix = _world_outputs(
                a,
                coeffs,
                self.final_bparams,
                field,
                self.final_fparams,
                mov,
                moving_affine,
                c_m,
                shape,
                fixed_affine,
                c_f,
                half,
            )
            return warped, disp, matrix, measures

    def _chain_grid(self, states: List[Tensor]) -> Tensor:
        """The whole chain at every model-grid voxel ``(1, D, H, W, 3)`` mm: the innermost (last) stage
        evaluated on the grid, then the others."""
        pts = self.last.map_grid(states[len(states) - 1], self.shape, self.spacing)
        for tr in self.outer:
            pts = tr.map_points(states[tr.index], pts)
        return pts

    def _chain_first(self, k: int, states: List[Tensor], xs: Tensor, ys: Tensor, zs: Tensor) -> Tensor:
        """The chain of the first ``k`` stages at the points ``xs x ys x zs`` ``(1, D, H, W, 3)`` mm
        (TransformChain(transforms[:k]).map_axes)."""
        n_final = len(states)
        pts = _expand(_axes_points(xs, ys, zs), 1)
        started = False
        if k == n_final:
            pts = self.last.map_axes(states[n_final - 1], xs, ys, zs)
            started = True
        position = n_final - 2  # self.outer holds the stages before the last, latest first
        for tr in self.outer:
            if position < k:
                if started:
                    pts = tr.map_points(states[tr.index], pts)
                else:
                    pts = tr.map_axes(states[tr.index], xs, ys, zs)
                    started = True
            position -= 1
        return pts

    def _measures(self, states: List[Tensor], vol_m: Tensor, vol_f: Tensor, cut: bool) -> Dict[str, Tensor]:
        """register_native_measured's measures (RegistrationResult.report's, on the model grid)."""
        k = self.similarity_stride
        h = k // 2
        dev = vol_f.device
        xs = _axis_coords(self.shape[0], self.spacing[0], dev)[h::k]
        ys = _axis_coords(self.shape[1], self.spacing[1], dev)[h::k]
        zs = _axis_coords(self.shape[2], self.spacing[2], dev)[h::k]
        fix_s = vol_f[:, :, h::k, h::k, h::k]
        sims: List[Tensor] = []
        for first in range(len(states) + 1):
            pts = self._chain_first(first, states, xs, ys, zs)
            sims.append(mutual_information(_sample(vol_m, self.shape, self.spacing, pts), fix_s))
        masked: List[int] = []
        if cut:
            masked = self.fov_masked_indices
        ratio, moving_smaller = _content_ratio(vol_m, vol_f, self.fov_content)
        out: Dict[str, Tensor] = {
            "similarity": torch.cat(sims),
            "similarity_drop_warning": torch.tensor(self.similarity_drop_warning, dtype=torch.float64),
            "fov_cut": torch.tensor(cut),
            "fov_masked_stages": torch.tensor(masked, dtype=torch.long),
            "content_ratio": ratio[0],
            "content_ratio_warning": torch.tensor(self.content_ratio_warning, dtype=torch.float64),
            "moving_content_smaller": moving_smaller[0],
        }
        if self.deformable:
            det = jacobian_determinant(self._chain_grid(states), self.spacing)[0]
            out["jacobian_min"] = det.min().to(torch.float64)
            out["jacobian_fraction_nonpositive"] = (det <= 0).to(torch.float64).mean()
        return out

    def forward(self, moving: Tensor, fixed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        expect = [1, self.shape[2], self.shape[1], self.shape[0]]
        if moving.dim() != 5 or list(moving.shape[1:]) != expect:
            raise ValueError(
                "moving: expected a (N, 1, D, H, W) = (N, "
                + str(expect[1:])
                + ") tensor on the model grid, got "
                + str(moving.shape)
            )
        if fixed.dim() != 5 or list(fixed.shape[1:]) != expect:
            raise ValueError(
                "fixed: expected a (N, 1, D, H, W) = (N, "
                + str(expect[1:])
                + ") tensor on the model grid, got "
                + str(fixed.shape)
            )
        if moving.shape[0] != fixed.shape[0]:
            raise ValueError("moving and fixed batch sizes differ")
        with torch.no_grad():
            moving = moving.to(torch.float32)
            fixed = fixed.to(torch.float32)
            n = moving.shape[0]
            states = self._states(moving, fixed)
            pts = self._chain_grid(states)
            if pts.shape[0] != n:
                pts = pts.expand([n, pts.shape[1], pts.shape[2], pts.shape[3], 3])
            if self.final_fast:
                m: Optional[Tensor] = None
                c: Optional[Tensor] = None
                if self.final_rigid >= 0:
                    m = _rigid_matrix(states[self.final_rigid])
                if self.final_bspline >= 0:
                    c = states[self.final_bspline]
                warped = _sample_coords(
                    moving, _fast_coords(m, c, self.final_bparams, self.shape, self.spacing, n, moving.device)
                )
            else:
                warped = _sample(moving, self.shape, self.spacing, pts)
            disp_mm = (pts - _grid_points(self.shape, self.spacing, pts.device)).permute(0, 4, 1, 2, 3)
            sp = torch.tensor(self.spacing, dtype=disp_mm.dtype, device=disp_mm.device).reshape(1, 3, 1, 1, 1)
            disp_vox = disp_mm / sp
            # rigid part: product of the rigid stages' matrices (TransformChain.affine_part), in voxels
            a = torch.eye(4, dtype=torch.float32, device=moving.device).unsqueeze(0).expand(n, 4, 4)
            first = True
            for j in self.rigid_indices:
                m = _rigid_matrix(states[j])
                if first:
                    a = m
                    first = False
                else:
                    a = a @ m
            vox_to_mm = torch.zeros([4, 4], dtype=torch.float64, device=moving.device)
            mm_to_vox = torch.zeros([4, 4], dtype=torch.float64, device=moving.device)
            for i in range(3):
                c = (self.shape[i] - 1) / 2.0
                vox_to_mm[i, i] = self.spacing[i]
                vox_to_mm[i, 3] = -c * self.spacing[i]
                mm_to_vox[i, i] = 1.0 / self.spacing[i]
                mm_to_vox[i, 3] = c
            vox_to_mm[3, 3] = 1.0
            mm_to_vox[3, 3] = 1.0
            matrix = mm_to_vox.unsqueeze(0) @ a.to(torch.float64) @ vox_to_mm.unsqueeze(0)
            if n == 1:
                matrix = matrix[0]
        return warped, disp_vox, matrix


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


def _stage_params(kind: str, params: dict, model_grid: Grid, final_grid: Grid) -> List[float]:
    if kind == "bspline":
        lat = lattice_for(params, model_grid)
        return [*lat.control_spacing, *(float(v) for v in lat.shape_xyz)]
    if kind == "dense":
        return [*(float(v) for v in final_grid.shape_xyz), *final_grid.spacing_xyz]
    return []


def _pyramid_steps(grid: Grid, level_grid: Grid) -> List[Grid]:
    """The sampling steps of Registrar._downsample from the model grid to a level grid."""
    steps, cur = [], grid
    while cur.spacing_xyz[0] * 1.5 < level_grid.spacing_xyz[0]:
        cur = cur.downsampled(2)
        steps.append(cur)
    if cur != level_grid:
        steps.append(level_grid)
    return steps


def _as_plan(plan) -> Plan:
    if isinstance(plan, Plan):
        return plan
    return load_plan(plan)


def _load_ts(plan: Plan, networks: dict, what: str) -> torch.jit.ScriptModule:
    member = networks.get("torchscript")
    if member is None:
        raise PlanError(
            f"{what} has no TorchScript network (has {sorted(networks)}); registrar.ts embeds TorchScript networks"
        )
    try:
        net = torch.jit.load(io.BytesIO(plan.read(member)), map_location="cpu")
    except Exception as exc:
        raise PlanError(
            f"plan member {member} is not a loadable TorchScript module: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return net.eval()


def build_registrar_module(plan, stages=None) -> RegistrarModule:
    """The (unscripted) :class:`RegistrarModule` of a plan (path or :class:`~msode_sdk.plan.Plan`),
    with the plan's TorchScript networks loaded as submodules. ``stages``: subset of stage names."""
    plan = _as_plan(plan)
    m = plan.manifest
    model_grid = Grid(m.model_grid.shape_xyz, m.model_grid.spacing_xyz_mm)
    selected = list(m.stages) if stages is None else [s for s in m.stages if s.name in set(stages)]
    if not selected or (stages is not None and len(selected) != len(set(stages))):
        raise PlanError(f"unknown stage(s) {stages}; plan has {[s.name for s in m.stages]}")
    pyramid_grids: List[Grid] = []
    stage_modules, finals, rigid_indices = [], [], []
    for index, st in enumerate(selected):
        levels = []
        prev = None
        grids = [Grid(sc.shape_xyz, sc.spacing_xyz_mm) for sc in st.scales]
        for sc, lg in zip(st.scales, grids):
            net = _load_ts(plan, sc.networks, f"stage {st.name!r} level {sc.level}")
            feats = _load_ts(plan, sc.features, f"stage {st.name!r} level {sc.level} features") if sc.features else None
            fgrid = Grid(*sc.feature_grid) if sc.feature_grid is not None else None
            if lg not in pyramid_grids:
                pyramid_grids.append(lg)
            own = _transform_module(st.transform, index, _stage_params(st.transform, st.params, model_grid, lg))
            priors = [copy.deepcopy(f) for f in finals[::-1]]  # the finest earlier stage acts first
            common = dict(
                network=net,
                own=own,
                priors=priors,
                grid=lg,
                t0=sc.t0,
                t1=sc.t1,
                pyr=pyramid_grids.index(lg),
                prev_grid=prev,
                kind=st.transform,
                label=f"{st.name}_L{sc.level}",
                features=feats,
                feature_grid=fgrid,
                feature_warp=sc.feature_warp,
                prior_kinds=[s.transform for s in selected[:index]][::-1],
            )
            if sc.solver == "adaptive_heun":
                levels.append(
                    _AdaptiveHeunLevel(step0=sc.step_size or 0.0, tol=sc.tol, max_steps=sc.max_steps, **common)
                )
            elif sc.solver in ("euler", "heun"):
                cls = _EulerLevel if sc.solver == "euler" else _HeunLevel
                levels.append(cls(times=fixed_step_grid(sc.t0, sc.t1, sc.step_size), **common))
            else:
                raise PlanError(f"stage {st.name!r} level {sc.level}: unknown solver {sc.solver!r}")
            prev = lg
        if st.transform == "rigid":
            init = [6]
            rigid_indices.append(index)
        elif st.transform == "bspline":
            init = list(lattice_for(st.params, model_grid).coeff_shape)
        else:
            init = [3, *grids[0].shape_dhw]
        init_mode = str(st.params.get("init", "none")) if st.transform == "rigid" else "none"
        if init_mode not in ("none", "moments", "multistart"):
            raise PlanError(f"stage {st.name!r}: unknown init {init_mode!r}; valid: ['moments', 'multistart', 'none']")
        if init_mode != "none" and index > 0:
            # the SDK scores candidates on images warped by the earlier stages; registrar.ts does not
            warnings.warn(
                f"stage {st.name!r} follows other stages: registrar.ts starts it from the identity, "
                f"not from init={init_mode!r}"
            )
            init_mode = "none"
        scales = list(st.params.get("scale_search", [])) if st.transform != "rigid" else []
        stage_modules.append(_Stage(st.name, levels, init, init_mode, scales))
        finals.append(
            _transform_module(st.transform, index, _stage_params(st.transform, st.params, model_grid, grids[-1]))
        )
    pyramid = [_pyramid_steps(model_grid, g) for g in pyramid_grids]
    info = {
        "format": "msode-registrar-ts",
        "version": 1,
        "plan": m.name,
        "analytic": m.analytic,
        "model_grid": {
            "shape_xyz": list(model_grid.shape_xyz),
            "spacing_xyz_mm": list(model_grid.spacing_xyz),
            "orientation": m.model_grid.orientation,
            "centre": m.model_grid.centre,
        },
        "normalization": dict(m.normalization),
        "stages": [{"name": s.name, "transform": s.transform} for s in selected],
        "inputs": "moving, fixed: (N, 1, D, H, W) float32 on the model grid, intensities in [0, 1]",
        "outputs": {
            "warped": "(N, 1, D, H, W)",
            "displacement": "(N, 3, D, H, W) model-grid voxels, channels x, y, z; fixed voxel v -> moving voxel v + d",
            "matrix": "float64 (4, 4) for N = 1 else (N, 4, 4): rigid part, fixed voxel (x, y, z, 1) -> moving voxel",
        },
        "torch": torch.__version__,
    }
    return RegistrarModule(
        model_grid, stage_modules, finals, rigid_indices, pyramid, info, kinds=[s.transform for s in selected]
    )


def build_registrar_ts(plan, stages=None) -> bytes:
    """The serialised TorchScript ``registrar.ts`` of a plan (path or loaded plan)."""
    module = build_registrar_module(plan, stages).eval()
    scripted = torch.jit.script(module)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    return buf.getvalue()


def load_registrar_ts(plan, map_location="cpu") -> torch.jit.ScriptModule:
    """``registrar.ts`` of a plan, loaded (convenience for Python users and tests)."""
    plan = _as_plan(plan)
    if not plan.has(REGISTRAR_MEMBER):
        raise PlanError(f"plan {plan.manifest.name!r} has no {REGISTRAR_MEMBER} member")
    return torch.jit.load(io.BytesIO(plan.read(REGISTRAR_MEMBER)), map_location=map_location)


def add_registrar_ts(plan_path, out_path=None) -> Path:
    """Add (or replace) the ``registrar.ts`` member of the plan at ``plan_path`` and rewrite it (atomically,
    through :func:`msode_sdk.plan.write_plan`) at ``out_path`` (default: in place). The manifest gains a
    ``registrar_ts`` entry describing the member; every other member is kept byte for byte."""
    plan = load_plan(plan_path)
    data = build_registrar_ts(plan)
    members = {name: plan.read(name) for name in plan.member_names()}
    members[REGISTRAR_MEMBER] = data
    manifest = dict(plan.manifest.raw)
    manifest.pop("members", None)
    manifest["registrar_ts"] = {
        "member": REGISTRAR_MEMBER,
        "torch": torch.__version__,
        "signature": "forward(moving, fixed) -> (warped, displacement_voxels, matrix_voxels)",
        "stages": [s.name for s in plan.manifest.stages],
    }
    target = Path(out_path) if out_path is not None else Path(plan_path)
    write_plan(target, manifest, members)
    return target
