"""Spatial transforms of the model space: rigid (6 dof), cubic B-spline FFD, dense displacement.

Conventions (one place for all of them):

* A :class:`Grid` is an axis-aligned RAS voxel grid of shape ``(X, Y, Z)`` and spacing in mm. Its
  tensors are laid out ``(N, C, D, H, W)`` with ``D = Z``, ``H = Y``, ``W = X``.
* Points are mm, in RAS axes, **relative to the grid centre** (the centre of the voxel lattice), and
  their last dimension is ordered ``(x, y, z)``. Vector fields are ``(N, 3, D, H, W)`` with channel
  0 = x, 1 = y, 2 = z, in mm.
* Every transform maps a point of the *fixed* model frame to a point of the *moving* model frame
  (the pull-back convention of ITK and of image warping: ``warped(x) = moving(phi(x))``).
* A :class:`TransformChain` ``[T1, T2, ..., Tk]`` (stages in registration order, e.g. rigid then
  B-spline) maps ``x -> T1(T2(...Tk(x)))``: the later, finer stage acts first on the fixed side.
  For rigid-then-deformable this is ``phi(x) = R (x + u(x) + t)``.
* Rigid parameters ``theta = (rx, ry, rz, tx, ty, tz)``: the rotation vector ``(rx, ry, rz)`` in
  radians (axis times angle, about the grid centre; :func:`rigid_matrix`) and a fixed-frame
  translation in mm: ``phi(x) = R (x + t)``. (Euler-angle motions convert with :func:`euler_to_rigid`.)
* B-spline: control points on a regular lattice of spacing ``control_spacing`` (mm, per axis x, y, z)
  centred on the grid, ``ceil(extent / spacing) + 3`` points per axis so every point of the grid has
  its full 4x4x4 support; coefficients are displacements in mm, tensor ``(N, 3, cz, cy, cx)``;
  ``u(x) = sum_k c_k B3((x - p_k) / s)`` with the uniform cubic B-spline kernel ``B3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = [
    "Grid",
    "BSplineLattice",
    "Transform",
    "RigidTransform",
    "MatrixTransform",
    "rigid_inverse",
    "BSplineTransform",
    "DenseTransform",
    "TransformChain",
    "rigid_matrix",
    "matrix_to_rigid",
    "euler_to_rigid",
    "rigid_matrix_unchecked",
    "bspline_kernel",
    "bspline_displacement_at",
    "affine_bspline_coords",
    "jacobian_determinant",
    "TRANSFORM_KINDS",
    "make_transform",
    "initial_state",
    "carry_state",
]


@dataclass(frozen=True)
class Grid:
    """Axis-aligned voxel grid; ``shape_xyz`` voxels of ``spacing_xyz`` mm, centred on the origin."""

    shape_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_xyz", tuple(int(v) for v in self.shape_xyz))
        object.__setattr__(self, "spacing_xyz", tuple(float(v) for v in self.spacing_xyz))

    @property
    def shape_dhw(self) -> tuple[int, int, int]:
        """Tensor spatial shape ``(D, H, W) = (Z, Y, X)``."""
        x, y, z = self.shape_xyz
        return (z, y, x)

    @property
    def extent_xyz(self) -> tuple[float, float, float]:
        """Distance in mm between the first and last voxel centres along x, y, z."""
        (nx, ny, nz), (sx, sy, sz) = self.shape_xyz, self.spacing_xyz
        return ((nx - 1) * sx, (ny - 1) * sy, (nz - 1) * sz)

    def downsampled(self, factor: int) -> "Grid":
        """The grid of a pyramid level ``factor`` times coarser (shape // factor, spacing * factor)."""
        (nx, ny, nz), (sx, sy, sz) = self.shape_xyz, self.spacing_xyz
        return Grid(
            (max(nx // factor, 1), max(ny // factor, 1), max(nz // factor, 1)), (sx * factor, sy * factor, sz * factor)
        )

    def axis_coords(self, axis: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """Centre-relative mm coordinates of the voxel centres along axis 0=x, 1=y, 2=z."""
        n, s = self.shape_xyz[axis], self.spacing_xyz[axis]
        return (torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2.0) * s

    def points(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """All voxel centres as a ``(D, H, W, 3)`` tensor of ``(x, y, z)`` mm."""
        xs, ys, zs = (self.axis_coords(a, dtype, device) for a in range(3))
        z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
        return torch.stack((x, y, z), dim=-1)

    def normalise(self, points: torch.Tensor) -> torch.Tensor:
        """mm points -> ``grid_sample`` coordinates (align_corners=True, -1/+1 = first/last voxel).
        Scalar arithmetic per axis, no host-to-device copy (so a CUDA graph can capture it)."""
        hx, hy, hz = (max(e, 1e-12) / 2.0 for e in self.extent_xyz)
        return torch.stack((points[..., 0] / hx, points[..., 1] / hy, points[..., 2] / hz), dim=-1)


# --------------------------------------------------------------------------------------------- rigid


def _skew(v: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` -> ``(N, 3, 3)`` cross-product matrices ``[v]x``."""
    z = torch.zeros_like(v[:, 0])
    return torch.stack(
        (
            torch.stack((z, -v[:, 2], v[:, 1]), -1),
            torch.stack((v[:, 2], z, -v[:, 0]), -1),
            torch.stack((-v[:, 1], v[:, 0], z), -1),
        ),
        -2,
    )


def rigid_matrix(theta: torch.Tensor) -> torch.Tensor:
    """``(N, 6)`` rigid parameters ``(rx, ry, rz [rad], tx, ty, tz [mm])`` -> ``(N, 4, 4)`` matrices.

    The rotation is the rotation vector ``r = (rx, ry, rz)`` (axis ``r / |r|``, angle ``|r|``, about the
    grid centre; Rodrigues' formula) and ``t`` is a translation in the FIXED frame applied first: the
    matrix maps centre-relative fixed-frame mm points to moving-frame ones, ``phi(x) = R (x + t)``.
    Why: a network sees misalignment in the fixed frame (the warped image lives there), so additive
    updates of a fixed-frame translation and of a rotation vector are right whatever the current
    rotation (below 180 degrees), where ``R x + t`` would rotate the translation dynamics by ``R`` and
    Euler angles degenerate at 90 degrees of pitch.
    """
    if theta.ndim != 2 or theta.shape[-1] != 6:
        raise InputError(f"rigid parameters must be (N, 6), got {tuple(theta.shape)}")
    return rigid_matrix_unchecked(theta)


def rigid_matrix_unchecked(theta: torch.Tensor) -> torch.Tensor:
    """:func:`rigid_matrix` without the shape check; TorchScript-compatible (``torch.jit.script``
    it to reuse the exact same rotation convention in scripted code, e.g. ``registrar.ts``)."""
    r = theta[:, :3]
    angle2 = (r * r).sum(-1)
    angle = torch.sqrt(angle2.clamp(min=1e-12))
    small = angle2 < 1e-8
    a = torch.where(small, 1.0 - angle2 / 6.0, torch.sin(angle) / angle)
    b = torch.where(small, 0.5 - angle2 / 24.0, (1.0 - torch.cos(angle)) / angle2.clamp(min=1e-12))
    k = _skew(r)
    eye = torch.eye(3, dtype=theta.dtype, device=theta.device).expand(theta.shape[0], 3, 3)
    rot = eye + a[:, None, None] * k + b[:, None, None] * (k @ k)
    top = torch.cat((rot, rot @ theta[:, 3:, None]), dim=-1)  # phi(x) = R (x + t)
    bottom = torch.zeros_like(top[:, :1, :])
    bottom[..., 3] = 1.0
    return torch.cat((top, bottom), dim=-2)


def euler_to_rigid(angles_xyz: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Rigid parameters of the map ``x -> R x + translation`` with ``R`` from Euler angles (rad,
    ``R = Rz @ Ry @ Rx``, the convention of "rotations of U(-75, 75) degrees about each axis"):
    ``(N, 3), (N, 3) -> (N, 6)`` (rotation vector, fixed-frame translation ``R^T translation``)."""
    rx, ry, rz = angles_xyz[:, 0], angles_xyz[:, 1], angles_xyz[:, 2]
    one, zero = torch.ones_like(rx), torch.zeros_like(rx)

    def rot(c, s, axis):
        if axis == 0:
            rows = ((one, zero, zero), (zero, c, -s), (zero, s, c))
        elif axis == 1:
            rows = ((c, zero, s), (zero, one, zero), (-s, zero, c))
        else:
            rows = ((c, -s, zero), (s, c, zero), (zero, zero, one))
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    r = (
        rot(torch.cos(rz), torch.sin(rz), 2)
        @ rot(torch.cos(ry), torch.sin(ry), 1)
        @ rot(torch.cos(rx), torch.sin(rx), 0)
    )
    m = torch.eye(4, dtype=angles_xyz.dtype, device=angles_xyz.device).repeat(angles_xyz.shape[0], 1, 1)
    m[:, :3, :3] = r
    m[:, :3, 3] = translation
    return matrix_to_rigid(m)


def matrix_to_rigid(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rigid_matrix` for proper rotations: ``(N, 4, 4)`` -> ``(N, 6)``; the rotation
    vector comes back with angle in ``[0, pi]``."""
    r = matrix[:, :3, :3]
    cos = ((r.diagonal(dim1=1, dim2=2).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    vee = torch.stack((r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]), -1)
    sin = torch.sin(angle)
    # general case: r = angle / (2 sin angle) * vee(R - R^T) (series near 0)
    factor = torch.where(angle < 1e-4, 0.5 + angle * angle / 12.0, angle / (2.0 * sin.clamp(min=1e-12)))
    general = factor[:, None] * vee
    # near pi: (R + R^T)/2 - cos I = (1 - cos) n n^T; take the best-conditioned column for the axis
    b = 0.5 * (r + r.transpose(1, 2)) - cos[:, None, None] * torch.eye(3, dtype=r.dtype, device=r.device)
    diag = b.diagonal(dim1=1, dim2=2)
    col = torch.gather(b, 2, diag.argmax(-1)[:, None, None].expand(-1, 3, 1))[..., 0]
    n = col / torch.linalg.norm(col, dim=-1, keepdim=True).clamp(min=1e-12)
    sign = torch.where((n * vee).sum(-1) < 0, -torch.ones_like(angle), torch.ones_like(angle))
    near_pi = angle[:, None] * n * sign[:, None]
    rot = torch.where((angle > 2.5)[:, None], near_pi, general)
    t = (r.transpose(1, 2) @ matrix[:, :3, 3:])[..., 0]  # matrix translation = R t
    return torch.cat((rot, t), dim=-1)


def apply_matrix(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(N, 4, 4)`` to points ``(N, ..., 3)``."""
    n = points.shape[0]
    flat = points.reshape(n, -1, 3)
    out = flat @ matrix[:, :3, :3].transpose(1, 2) + matrix[:, None, :3, 3]
    return out.reshape(points.shape)


def rigid_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid ``(N, 4, 4)`` matrices, exactly (``[R^T, -R^T t]``; no general inversion)."""
    rt = matrix[:, :3, :3].transpose(1, 2)
    top = torch.cat((rt, -(rt @ matrix[:, :3, 3:])), dim=-1)
    return torch.cat((top, matrix[:, 3:, :]), dim=-2)


# ------------------------------------------------------------------------------------------ B-spline


def bspline_kernel(u: torch.Tensor) -> torch.Tensor:
    """Uniform cubic B-spline ``B3(u)``, support ``|u| < 2``, partition of unity."""
    a = u.abs()
    inner = 2.0 / 3.0 - a * a + 0.5 * a * a * a
    outer = (2.0 - a).clamp(min=0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


@dataclass(frozen=True)
class BSplineLattice:
    """Control lattice of a cubic B-spline FFD over ``grid`` with ``control_spacing`` mm (x, y, z)."""

    grid: Grid
    control_spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        cs = tuple(float(v) for v in self.control_spacing)
        if len(cs) != 3 or not all(math.isfinite(v) and v > 0 for v in cs):
            raise InputError(f"B-spline control spacing must be 3 positive mm values, got {cs}")
        object.__setattr__(self, "control_spacing", cs)

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        return cast(
            Tuple[int, int, int],
            tuple(int(math.ceil(e / s - 1e-9)) + 3 for e, s in zip(self.grid.extent_xyz, self.control_spacing)),
        )

    @property
    def coeff_shape(self) -> tuple[int, int, int, int]:
        """Coefficient tensor shape without batch: ``(3, cz, cy, cx)``."""
        cx, cy, cz = self.shape_xyz
        return (3, cz, cy, cx)

    def control_coords(self, axis: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """Centre-relative mm positions of the control points along axis 0=x, 1=y, 2=z."""
        n, s = self.shape_xyz[axis], self.control_spacing[axis]
        return (torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2.0) * s

    def basis_matrix(self, coords: torch.Tensor, axis: int) -> torch.Tensor:
        """``(len(coords), n_ctrl)`` matrix of ``B3((coords_i - p_k) / s)`` along one axis."""
        p = self.control_coords(axis, coords.dtype, coords.device)
        return bspline_kernel((coords[:, None] - p[None, :]) / self.control_spacing[axis])

    def displacement_on(self, coeffs: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Exact FFD displacement ``(N, 3, D, H, W)`` mm on every voxel of ``grid`` (separable sum)."""
        return self.displacement_on_axes(coeffs, *(grid.axis_coords(a, coeffs.dtype, coeffs.device) for a in range(3)))

    def displacement_on_axes(
        self, coeffs: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, zs: torch.Tensor
    ) -> torch.Tensor:
        """Exact FFD displacement on the rectilinear grid ``xs x ys x zs`` (mm, any order or spacing):
        ``(N, 3, len(zs), len(ys), len(xs))``."""
        bx, by, bz = self.basis_matrix(xs, 0), self.basis_matrix(ys, 1), self.basis_matrix(zs, 2)
        return bspline_synth_on_axes(coeffs, bx, by, bz)

    def displacement_at(self, coeffs: torch.Tensor, points: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
        """Exact FFD displacement at arbitrary points ``(N, ..., 3)`` mm -> ``(N, ..., 3)`` mm.

        Points outside the lattice support get zero displacement (the kernel vanishes there).
        """
        return bspline_displacement_at(coeffs, points, list(self.shape_xyz), list(self.control_spacing), chunk)


def bspline_synth_on_axes(coeffs: torch.Tensor, bx: torch.Tensor, by: torch.Tensor, bz: torch.Tensor) -> torch.Tensor:
    """``(N, C, cz, cy, cx)`` coefficients -> ``(N, C, Z, Y, X)``: the B-spline sum on a rectilinear grid given
    its per-axis basis matrices ``(X, cx)``, ``(Y, cy)``, ``(Z, cz)`` (:meth:`BSplineLattice.basis_matrix`).
    Separable: contract x, then y, then z. TorchScript-compatible (exported fields call it)."""
    out = torch.einsum("ncklm,xm->ncklx", coeffs, bx)
    out = torch.einsum("ncklx,yl->nckyx", out, by)
    return torch.einsum("nckyx,zk->nczyx", out, bz)


def bspline_displacement_at(
    coeffs: torch.Tensor, points: torch.Tensor, shape_xyz: List[int], control_spacing: List[float], chunk: int = 1 << 20
) -> torch.Tensor:
    """The 64-term FFD sum at arbitrary points (see :meth:`BSplineLattice.displacement_at`);
    TorchScript-compatible so scripted code (``registrar.ts``) reuses this very function."""
    n = points.shape[0]
    flat = points.reshape(n, -1, 3)
    out = torch.empty_like(flat)
    cx, cy = shape_xyz[0], shape_xyz[1]
    coeff_flat = coeffs.reshape(n, 3, -1)  # index = (k*cy + l)*cx + m
    for start in range(0, flat.shape[1], chunk):
        pts = flat[:, start : start + chunk]
        # Per axis: index of the first of the 4 supporting control points, and their weights.
        idx: List[torch.Tensor] = []
        wts: List[torch.Tensor] = []
        for a in range(3):
            nc = shape_xyz[a]
            u = pts[..., a] / control_spacing[a] + (nc - 1) / 2.0
            base = torch.floor(u) - 1
            offs = torch.arange(4, dtype=pts.dtype, device=pts.device)
            k = base[..., None] + offs  # (N, P, 4)
            w = bspline_kernel(u[..., None] - k)
            valid = (k >= 0) & (k <= nc - 1)
            wts.append(torch.where(valid, w, torch.zeros_like(w)))
            idx.append(k.clamp(0, nc - 1).long())
        acc = torch.zeros([n, 3, pts.shape[1]], dtype=pts.dtype, device=pts.device)
        for i in range(4):
            for j in range(4):
                wzy = wts[2][..., i] * wts[1][..., j]
                lin_zy = (idx[2][..., i] * cy + idx[1][..., j]) * cx
                for m in range(4):
                    lin = (lin_zy + idx[0][..., m])[:, None, :].expand(n, 3, -1)
                    acc += torch.gather(coeff_flat, 2, lin) * (wzy * wts[0][..., m])[:, None, :]
        out[:, start : start + chunk] = acc.transpose(1, 2)
    return out.reshape(points.shape)


def affine_bspline_coords(
    matrix: Optional[torch.Tensor],
    coeffs: Optional[torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    zs: torch.Tensor,
    basis_x: Optional[torch.Tensor],
    basis_y: Optional[torch.Tensor],
    basis_z: Optional[torch.Tensor],
    inv_half: List[float],
) -> torch.Tensor:
    """``diag(inv_half) A (x + u(x))`` at every point of the rectilinear grid ``xs x ys x zs`` (mm):
    ``(N, len(zs), len(ys), len(xs), 3)``. ``matrix`` ``(N|1, 4, 4)`` is ``A`` (None: identity), ``coeffs``
    ``(N, 3, cz, cy, cx)`` the B-spline ``u`` with its per-axis basis matrices (None: no B-spline). With
    ``inv_half`` the source grid's ``2 / extent`` these are ``grid_sample`` coordinates: the affine part as
    a broadcast sum of one term per axis, the B-spline synthesised separably from the coefficients mixed
    by ``diag(inv_half) A`` (no point list, no per-point matrix product). TorchScript-compatible:
    ``registrar.ts`` computes its warps with this very function."""
    dev = xs.device
    scale = torch.tensor(inv_half, dtype=torch.float32).to(dev).view(1, 3, 1)
    if matrix is None:
        m = torch.eye(4, dtype=torch.float32, device=dev)[:3].unsqueeze(0) * scale
    else:
        m = matrix[:, :3, :].to(torch.float32) * scale  # (N|1, 3, 4)
    coords = (
        m[:, :, 0].reshape(-1, 1, 1, 1, 3) * xs.reshape(1, 1, 1, -1, 1)
        + m[:, :, 1].reshape(-1, 1, 1, 1, 3) * ys.reshape(1, 1, -1, 1, 1)
        + (m[:, :, 2].reshape(-1, 1, 1, 1, 3) * zs.reshape(1, -1, 1, 1, 1) + m[:, :, 3].reshape(-1, 1, 1, 1, 3))
    )
    if coeffs is not None and basis_x is not None and basis_y is not None and basis_z is not None:
        mixed = torch.einsum("nij,njzyx->nizyx", m[:, :, :3].expand(coeffs.shape[0], 3, 3), coeffs.to(torch.float32))
        coords = coords + torch.einsum("nczyx,ax,by,dz->ndbac", mixed, basis_x, basis_y, basis_z)
    return coords


# ------------------------------------------------------------------------------------------ transforms


def _axes_points(xs: torch.Tensor, ys: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
    return torch.stack((x, y, z), dim=-1)


class Transform:
    """A batch of maps from fixed-frame mm points to moving-frame mm points."""

    kind: str = ""
    state: torch.Tensor

    def map_points(self, points: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def map_grid(self, grid: Grid) -> torch.Tensor:
        """``phi`` at every voxel of ``grid``: ``(N, D, H, W, 3)`` mm."""
        return self.map_axes(*(grid.axis_coords(a, self.dtype, self.device) for a in range(3)))

    def map_axes(self, xs: torch.Tensor, ys: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        """``phi`` on the rectilinear grid ``xs x ys x zs`` (mm): ``(N, len(zs), len(ys), len(xs), 3)``."""
        pts = _axes_points(xs, ys, zs)
        return self.map_points(pts.unsqueeze(0).expand(self.batch, *pts.shape))

    @property
    def batch(self) -> int:
        return self.state.shape[0]

    @property
    def dtype(self):
        return self.state.dtype

    @property
    def device(self):
        return self.state.device


class RigidTransform(Transform):
    """``phi(x) = R (x + t)``; ``state`` is ``(N, 6)`` = ``(rx, ry, rz, tx, ty, tz)`` (see :func:`rigid_matrix`)."""

    kind = "rigid"

    def __init__(self, theta: torch.Tensor):
        self.state = theta

    @property
    def matrix(self) -> torch.Tensor:
        return rigid_matrix(self.state)

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        return apply_matrix(self.matrix, points)


class MatrixTransform(Transform):
    """A batch of 3x4 / 4x4 matrices as a :class:`Transform` (the rigid stage given by its matrix)."""

    kind = "rigid"

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 3 or matrix.shape[1] not in (3, 4) or matrix.shape[2] != 4:
            raise InputError(f"matrix must be (N, 3, 4) or (N, 4, 4), got {tuple(matrix.shape)}")
        if matrix.shape[1] == 3:
            last = torch.zeros(matrix.shape[0], 1, 4, dtype=matrix.dtype, device=matrix.device)
            last[:, 0, 3] = 1
            matrix = torch.cat((matrix, last), dim=1)
        self.state = matrix

    @property
    def matrix(self) -> torch.Tensor:
        return self.state

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        return apply_matrix(self.state, points)


class BSplineTransform(Transform):
    """``phi(x) = x + u(x)``; ``state`` is ``(N, 3, cz, cy, cx)`` control displacements in mm."""

    kind = "bspline"

    def __init__(self, coeffs: torch.Tensor, lattice: BSplineLattice):
        if tuple(coeffs.shape[1:]) != lattice.coeff_shape:
            raise InputError(f"B-spline coefficients {tuple(coeffs.shape)} do not match lattice {lattice.coeff_shape}")
        self.state = coeffs
        self.lattice = lattice

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        return points + self.lattice.displacement_at(self.state, points)

    def map_axes(self, xs, ys, zs) -> torch.Tensor:
        disp = self.lattice.displacement_on_axes(self.state, xs, ys, zs)  # exact, separable
        return _axes_points(xs, ys, zs) + disp.permute(0, 2, 3, 4, 1)

    def densified(self, spacing_xyz, within=None) -> "DenseTransform":
        """The same FFD sampled exactly on a grid of ``spacing_xyz`` mm that covers the lattice's whole
        support (the field is zero on and beyond its border), or with ``within`` (x, y, z half-extents in
        mm of the box holding every point it will be asked about) only that box and one node beyond, for
        fast evaluation at many arbitrary points: trilinear between nodes, so the error is
        O(spacing^2 * |u''|) (measured: max 0.02 mm on a 1 mm grid, 0.09 mm on a 2 mm grid, for
        N(0, 8 mm^2) coefficients on a 20 mm lattice)."""
        half = [((n - 1) / 2.0 + 2.0) * cs for n, cs in zip(self.lattice.shape_xyz, self.lattice.control_spacing)]
        if within is not None:
            half = [min(h, float(w) + 2.0 * s) for h, w, s in zip(half, within, spacing_xyz)]
        shape = cast(Tuple[int, int, int], tuple(int(math.ceil(2 * h / s)) + 1 for h, s in zip(half, spacing_xyz)))
        support = Grid(shape, cast(Tuple[float, float, float], tuple(float(s) for s in spacing_xyz)))
        return DenseTransform(self.lattice.displacement_on(self.state, support), support)


class DenseTransform(Transform):
    """``phi(x) = x + d(x)``; ``state`` is ``(N, 3, D, H, W)`` mm sampled on ``grid``.

    Between voxels ``d`` is trilinear; outside the grid it is extended by its border values.
    """

    kind = "dense"

    def __init__(self, field: torch.Tensor, grid: Grid):
        if tuple(field.shape[1:]) != (3, *grid.shape_dhw):
            raise InputError(f"dense field {tuple(field.shape)} does not match grid {grid.shape_dhw}")
        self.state = field
        self.grid = grid

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        n = points.shape[0]
        flat = points.reshape(n, 1, 1, -1, 3)
        d = F.grid_sample(
            self.state, self.grid.normalise(flat), mode="bilinear", padding_mode="border", align_corners=True
        )
        return points + d.reshape(n, 3, -1).transpose(1, 2).reshape(points.shape)

    def map_grid(self, grid: Grid) -> torch.Tensor:
        if grid == self.grid:
            return grid.points(self.dtype, self.device) + self.state.permute(0, 2, 3, 4, 1)
        return super().map_grid(grid)


class TransformChain:
    """Stages in registration order; ``phi = T1 o T2 o ... o Tk`` (see module docstring)."""

    def __init__(self, transforms: Sequence[Transform] = ()):
        self.transforms = list(transforms)

    def then(self, transform: Transform) -> "TransformChain":
        """A new chain with ``transform`` appended as the next (finer) stage."""
        return TransformChain([*self.transforms, transform])

    def __len__(self) -> int:
        return len(self.transforms)

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        for t in reversed(self.transforms):
            points = t.map_points(points)
        return points

    def map_grid(self, grid: Grid, batch: int = 1, dtype=torch.float32, device=None) -> torch.Tensor:
        """``phi`` at every voxel of ``grid``: ``(N, D, H, W, 3)`` mm. The innermost stage uses its
        exact grid evaluation (separable B-spline, dense field as stored)."""
        if not self.transforms:
            pts = grid.points(dtype, device)
            return pts.unsqueeze(0).expand(batch, *pts.shape)
        points = self.transforms[-1].map_grid(grid)
        for t in reversed(self.transforms[:-1]):
            points = t.map_points(points)
        return points

    def map_axes(self, xs: torch.Tensor, ys: torch.Tensor, zs: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """``phi`` on the rectilinear grid ``xs x ys x zs`` (mm): ``(N, len(zs), len(ys), len(xs), 3)``;
        the innermost stage uses its separable evaluation where it has one (B-spline: exact)."""
        if not self.transforms:
            pts = _axes_points(xs, ys, zs)
            return pts.unsqueeze(0).expand(batch, *pts.shape)
        points = self.transforms[-1].map_axes(xs, ys, zs)
        for t in reversed(self.transforms[:-1]):
            points = t.map_points(points)
        return points

    def displacement(self, grid: Grid, batch: int = 1, dtype=torch.float32, device=None) -> torch.Tensor:
        """``phi(x) - x`` on ``grid`` as ``(N, 3, D, H, W)`` mm."""
        phi = self.map_grid(grid, batch, dtype, device)
        return (phi - grid.points(phi.dtype, phi.device)).permute(0, 4, 1, 2, 3)

    def densified(self, spacing_xyz) -> "TransformChain":
        """This chain with B-spline stages replaced by their :meth:`BSplineTransform.densified` fields:
        the fast way to evaluate ``phi`` at millions of arbitrary points (e.g. a native image grid)."""
        return TransformChain(
            [t.densified(spacing_xyz) if isinstance(t, BSplineTransform) else t for t in self.transforms]
        )

    def affine_part(self) -> torch.Tensor | None:
        """Product of the rigid stages' matrices ``(N, 4, 4)`` (None without rigid stages)."""
        mats = [t.matrix for t in self.transforms if isinstance(t, RigidTransform)]
        if not mats:
            return None
        out = mats[0]
        for m in mats[1:]:
            out = out @ m
        return out


def _grid_derivative(points: torch.Tensor, dim: int, spacing: float) -> torch.Tensor:
    """d(points)/d(axis ``dim`` of ``(N, D, H, W, 3)``) per mm: central differences, one-sided at the ends
    (0 on an axis of one voxel)."""
    n = points.shape[dim]
    if n < 2:
        return torch.zeros_like(points)
    inner = (points.narrow(dim, 2, n - 2) - points.narrow(dim, 0, n - 2)) / (2.0 * spacing)
    lo = (points.narrow(dim, 1, 1) - points.narrow(dim, 0, 1)) / spacing
    hi = (points.narrow(dim, n - 1, 1) - points.narrow(dim, n - 2, 1)) / spacing
    return torch.cat((lo, inner, hi), dim)


def jacobian_determinant(points: torch.Tensor, spacing_xyz: List[float]) -> torch.Tensor:
    """Determinant of the Jacobian of a point map sampled on a grid: ``points`` ``(N, D, H, W, 3)`` mm
    (``phi`` at every voxel, e.g. :meth:`TransformChain.map_grid`; grid of ``spacing_xyz`` mm) ->
    ``(N, D, H, W)``, by finite differences (central inside, one-sided at the borders). 1 for rigid maps;
    values <= 0 mark folding (the map is not locally invertible there)."""
    jx = _grid_derivative(points, 3, float(spacing_xyz[0]))  # d phi / dx: (N, D, H, W, 3)
    jy = _grid_derivative(points, 2, float(spacing_xyz[1]))
    jz = _grid_derivative(points, 1, float(spacing_xyz[2]))
    # det [jx jy jz] (columns) = jx . (jy x jz)
    return (jx * torch.linalg.cross(jy, jz, dim=-1)).sum(-1)


# ------------------------------------------------------------------------ kinds (integrator state)

TRANSFORM_KINDS = ("rigid", "bspline", "dense")


def _check_kind(kind: str) -> None:
    if kind not in TRANSFORM_KINDS:
        raise InputError(f"unknown transform {kind!r}; valid: {list(TRANSFORM_KINDS)}")


def lattice_for(params: dict, model_grid: Grid) -> BSplineLattice:
    """The B-spline lattice of a stage; defined on the model (finest) grid for every level."""
    return BSplineLattice(model_grid, tuple(params["control_spacing_mm"]))


def initial_state(
    kind: str, params: dict, model_grid: Grid, level_grid: Grid, batch: int, dtype=torch.float32, device=None
) -> torch.Tensor:
    """The identity state of a stage: zeros of the right shape."""
    _check_kind(kind)
    if kind == "rigid":
        return torch.zeros(batch, 6, dtype=dtype, device=device)
    if kind == "bspline":
        return torch.zeros(batch, *lattice_for(params, model_grid).coeff_shape, dtype=dtype, device=device)
    return torch.zeros(batch, 3, *level_grid.shape_dhw, dtype=dtype, device=device)


def make_transform(kind: str, state: torch.Tensor, params: dict, model_grid: Grid, level_grid: Grid) -> Transform:
    """Wrap an integrator state as a :class:`Transform` of the stage's kind."""
    _check_kind(kind)
    if kind == "rigid":
        return RigidTransform(state)
    if kind == "bspline":
        return BSplineTransform(state, lattice_for(params, model_grid))
    return DenseTransform(state, level_grid)


def carry_state(kind: str, state: torch.Tensor, from_grid: Grid, to_grid: Grid) -> torch.Tensor:
    """Carry a state to the next (finer) level: rigid and B-spline unchanged; a dense field is
    resampled in mm (trilinear, border-extended) onto the finer grid."""
    _check_kind(kind)
    if kind != "dense" or from_grid == to_grid:
        return state
    field = DenseTransform(state, from_grid)
    pts = to_grid.points(state.dtype, state.device)
    pts = pts.unsqueeze(0).expand(state.shape[0], *pts.shape)
    return (field.map_points(pts) - pts).permute(0, 4, 1, 2, 3).contiguous()
