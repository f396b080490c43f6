"""Analytic stand-in "networks": Gauss-Newton-style gradient descent on a mono-modal SSD objective.

They have exactly the signature of a trained per-scale network, ``f(warped, fixed, t) -> d(theta)/dt``,
and so turn the SDK's ODE loop into plain (preconditioned) gradient descent. They prove the loop, the
warps and the geometry end to end without a trained model, and power the demo until a trained plan
ships. They only work for same-contrast pairs (SSD), and say so in the plan (``analytic: true``).

Derivation. With ``r = W - F`` (warped minus fixed) and ``g = grad W`` (1/mm, central differences),
an incremental transform ``delta`` applied on the fixed side changes ``W`` by ``g . v(x)`` where
``v`` is the point velocity of the increment:

* rigid: ``v = w x x + tau`` -> Jacobian columns ``(x x g, g)`` (rotations about the grid centre,
  translations in mm); the 6x6 Gauss-Newton system ``(J^T J) d = J^T r`` is solved by 6 steps of
  Jacobi-preconditioned conjugate gradients (exact for 6 unknowns, and ONNX-exportable);
* B-spline: ``v = sum_k c_k B_k(x)`` -> gradient ``G_k = sum_x r g B_k``; the damped Gauss-Newton
  system is solved matrix-free by preconditioned conjugate gradients;
* dense: a demons force ``r g / (|g|^2 + r^2 / K)`` smoothed with a Gaussian.

The ODE is ``d(theta)/dt = -gain * step``: near the optimum the error decays like ``exp(-gain t)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msode_sdk.transforms import BSplineLattice, Grid


class _Gradient(nn.Module):
    """Central-difference gradient in 1/mm of ``(N, 1, D, H, W)`` -> ``(N, 3, D, H, W)`` (x, y, z)."""

    def __init__(self, spacing_xyz):
        super().__init__()
        self.sx, self.sy, self.sz = (float(s) for s in spacing_xyz)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        p = F.pad(v, (1, 1, 1, 1, 1, 1), mode="replicate")
        gx = (p[:, :, 1:-1, 1:-1, 2:] - p[:, :, 1:-1, 1:-1, :-2]) / (2.0 * self.sx)
        gy = (p[:, :, 1:-1, 2:, 1:-1] - p[:, :, 1:-1, :-2, 1:-1]) / (2.0 * self.sy)
        gz = (p[:, :, 2:, 1:-1, 1:-1] - p[:, :, :-2, 1:-1, 1:-1]) / (2.0 * self.sz)
        return torch.cat((gx, gy, gz), dim=1)


class RigidSSDField(nn.Module):
    """Gauss-Newton flow for the 6 rigid parameters on one pyramid level."""

    def __init__(self, level_grid: Grid, gain: float = 5.0, damping: float = 1e-3):
        super().__init__()
        self.grad = _Gradient(level_grid.spacing_xyz)
        self.sx, self.sy, self.sz = (float(s) for s in level_grid.spacing_xyz)
        self.gain = float(gain)
        self.damping = float(damping)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r = warped - fixed
        g = self.grad(warped)
        # centre-relative mm coordinates, computed from the input's shape (no large constants)
        d, h, w = warped.shape[2], warped.shape[3], warped.shape[4]
        zs = (torch.arange(d, dtype=warped.dtype, device=warped.device) - (d - 1) / 2.0) * self.sz
        ys = (torch.arange(h, dtype=warped.dtype, device=warped.device) - (h - 1) / 2.0) * self.sy
        xs = (torch.arange(w, dtype=warped.dtype, device=warped.device) - (w - 1) / 2.0) * self.sx
        z = zs.reshape(d, 1, 1)
        y = ys.reshape(1, h, 1)
        x = xs.reshape(1, 1, w)
        gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]
        jac = torch.stack((y * gz - z * gy, z * gx - x * gz, x * gy - y * gx, gx, gy, gz), dim=1)
        n = jac.shape[0]
        jac = jac.reshape(n, 6, -1)
        hess = torch.bmm(jac, jac.transpose(1, 2))                      # (N, 6, 6)
        grad = torch.bmm(jac, r.reshape(n, -1, 1))                       # (N, 6, 1)
        d = torch.diagonal(hess, dim1=1, dim2=2).clamp(min=1e-12)      # Jacobi scaling
        s = torch.rsqrt(d).unsqueeze(-1)                                  # (N, 6, 1)
        a = hess * s * s.transpose(1, 2) + self.damping * torch.eye(6, dtype=hess.dtype, device=hess.device)
        b = grad * s
        # Conjugate gradients, 6 iterations: exact for a 6x6 SPD system.
        sol = torch.zeros_like(b)
        res = b
        p = res
        rr = (res * res).sum(dim=1, keepdim=True)
        for _ in range(6):
            ap = torch.bmm(a, p)
            alpha = rr / (p * ap).sum(dim=1, keepdim=True).clamp(min=1e-30)
            sol = sol + alpha * p
            res = res - alpha * ap
            rr_new = (res * res).sum(dim=1, keepdim=True)
            p = res + (rr_new / rr.clamp(min=1e-30)) * p
            rr = rr_new
        return -self.gain * (sol * s).squeeze(-1)


class BSplineSSDField(nn.Module):
    """Levenberg-Marquardt flow for B-spline control displacements on one pyramid level.

    The Gauss-Newton system ``(H + mu D) z = G`` with ``H = B^T g g^T B`` is solved matrix-free by
    ``cg_iters`` steps of preconditioned conjugate gradients (preconditioner ``D``, the Gershgorin
    row-sum bound ``sum_x |g|^2 B_k``); ``B`` and ``B^T`` are the separable B-spline synthesis and its
    adjoint. ``mu`` damps directions the image does not constrain.
    """

    def __init__(self, level_grid: Grid, lattice: BSplineLattice, gain: float = 5.0, damping: float = 0.05,
                 cg_iters: int = 10):
        super().__init__()
        self.grad = _Gradient(level_grid.spacing_xyz)
        bx, by, bz = (lattice.basis_matrix(level_grid.axis_coords(a), a) for a in range(3))
        self.register_buffer("bx", bx)  # (X, cx)
        self.register_buffer("by", by)  # (Y, cy)
        self.register_buffer("bz", bz)  # (Z, cz)
        self.gain = float(gain)
        self.damping = float(damping)
        self.cg_iters = int(cg_iters)

    def _adjoint(self, v: torch.Tensor) -> torch.Tensor:
        """``(N, C, Z, Y, X)`` -> ``(N, C, cz, cy, cx)``: sum over voxels weighted by ``B_k``."""
        v = torch.einsum("nczyx,xm->nczym", v, self.bx)
        v = torch.einsum("nczym,yl->nczlm", v, self.by)
        return torch.einsum("nczlm,zk->ncklm", v, self.bz)

    def _synth(self, c: torch.Tensor) -> torch.Tensor:
        """``(N, C, cz, cy, cx)`` -> ``(N, C, Z, Y, X)``: the B-spline field of coefficients ``c``."""
        v = torch.einsum("ncklm,xm->ncklx", c, self.bx)
        v = torch.einsum("ncklx,yl->nckyx", v, self.by)
        return torch.einsum("nckyx,zk->nczyx", v, self.bz)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r = warped - fixed
        g = self.grad(warped)
        rhs = self._adjoint(r * g)
        diag = self._adjoint((g * g).sum(dim=1, keepdim=True))            # (N, 1, cz, cy, cx)
        diag = diag + 1e-3 * diag.mean(dim=(2, 3, 4), keepdim=True) + 1e-12
        sol = torch.zeros_like(rhs)
        res = rhs
        z = res / diag
        p = z
        rz = (res * z).sum(dim=(1, 2, 3, 4), keepdim=True)
        for _ in range(self.cg_iters):
            hp = self._adjoint(g * (g * self._synth(p)).sum(dim=1, keepdim=True)) + self.damping * diag * p
            alpha = rz / (p * hp).sum(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-30)
            sol = sol + alpha * p
            res = res - alpha * hp
            z = res / diag
            rz_new = (res * z).sum(dim=(1, 2, 3, 4), keepdim=True)
            p = z + (rz_new / rz.clamp(min=1e-30)) * p
            rz = rz_new
        return -self.gain * sol


class DenseDemonsField(nn.Module):
    """Demons force smoothed by a Gaussian of ``sigma_mm``: a dense SSD descent flow."""

    def __init__(self, level_grid: Grid, gain: float = 2.0, sigma_mm: float = 4.0):
        super().__init__()
        self.grad = _Gradient(level_grid.spacing_xyz)
        self.gain = float(gain)
        kernels = []
        for s in level_grid.spacing_xyz:
            sig = max(sigma_mm / s, 0.5)
            rad = int(math.ceil(2.5 * sig))
            xs = torch.arange(-rad, rad + 1, dtype=torch.float32)
            k = torch.exp(-0.5 * (xs / sig) ** 2)
            kernels.append(k / k.sum())
        self.register_buffer("kx", kernels[0].reshape(1, 1, 1, 1, -1).repeat(3, 1, 1, 1, 1))
        self.register_buffer("ky", kernels[1].reshape(1, 1, 1, -1, 1).repeat(3, 1, 1, 1, 1))
        self.register_buffer("kz", kernels[2].reshape(1, 1, -1, 1, 1).repeat(3, 1, 1, 1, 1))
        self.px, self.py, self.pz = (len(k) // 2 for k in kernels)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r = warped - fixed
        g = self.grad(warped)
        denom = (g * g).sum(dim=1, keepdim=True) + r * r + 1e-6
        v = -self.gain * r * g / denom
        v = F.conv3d(F.pad(v, (self.px, self.px, 0, 0, 0, 0), mode="replicate"), self.kx, groups=3)
        v = F.conv3d(F.pad(v, (0, 0, self.py, self.py, 0, 0), mode="replicate"), self.ky, groups=3)
        v = F.conv3d(F.pad(v, (0, 0, 0, 0, self.pz, self.pz), mode="replicate"), self.kz, groups=3)
        return v


def analytic_network(transform: str, level_grid: Grid, model_grid: Grid, params: dict) -> nn.Module:
    """The analytic field for a stage kind on one level."""
    if transform == "rigid":
        return RigidSSDField(level_grid, gain=params.get("gain", 5.0))
    if transform == "bspline":
        lattice = BSplineLattice(model_grid, tuple(params["control_spacing_mm"]))
        return BSplineSSDField(level_grid, lattice, gain=params.get("gain", 5.0))
    if transform == "dense":
        return DenseDemonsField(level_grid, gain=params.get("gain", 2.0), sigma_mm=params.get("sigma_mm", 4.0))
    raise ValueError(f"unknown transform {transform!r}; valid: ['bspline', 'dense', 'rigid']")


def build_analytic_plan(path, model_grid: Grid, stages=("rigid", "bspline"), control_spacing_mm=(16.0, 16.0, 16.0),
                        schedules: dict | None = None, formats=("torchscript", "onnx"), centre: str = "fov",
                        name: str | None = None, gains: dict | None = None, registrar_ts: bool = False):
    """Write a plan whose networks are the analytic SSD fields above (``analytic: true``).

    ``schedules``: stage kind -> sequence of :class:`msode_export.pack.LevelSolver` (default: the
    paper's schedules); ``gains``: stage kind -> ODE gain; ``registrar_ts``: also embed the whole loop
    as ``registrar.ts`` (:func:`msode_export.scripted.add_registrar_ts`; needs TorchScript networks).
    """
    from .pack import PAPER_SCHEDULES, StageDef, build_plan, level_grids

    schedules = dict(PAPER_SCHEDULES, **(schedules or {}))
    defs, nets = [], {}
    for kind in stages:
        params = {"control_spacing_mm": list(control_spacing_mm)} if kind == "bspline" else {}
        net_params = dict(params)
        if gains and kind in gains:
            net_params["gain"] = gains[kind]
        sched = schedules[kind]
        defs.append(StageDef(kind, kind, sched, params))
        for lv, grid in enumerate(level_grids(model_grid, len(sched)), start=1):
            nets[(kind, lv)] = analytic_network(kind, grid, model_grid, net_params)
    out = build_plan(
        path, name or "analytic_" + "_".join(stages), model_grid, defs, nets, formats=formats, analytic=True,
        centre=centre, modalities=[],
        description=("ANALYTIC plan: the 'networks' are closed-form SSD Gauss-Newton/gradient flows, not "
                     "trained models. Plain gradient descent in the MS-ODENet loop; same-contrast pairs only."),
        training={"kind": "analytic", "note": "no training; msode_export.analytic"},
    )
    if registrar_ts:
        from .scripted import add_registrar_ts
        add_registrar_ts(out)
    return out
