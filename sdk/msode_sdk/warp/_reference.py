"""PyTorch reference warps: the semantics every accelerated kernel must reproduce."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..transforms import Grid, TransformChain, affine_bspline_coords


def sample_points(volume: torch.Tensor, src_grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume`` ``(N, C, D, H, W)`` at mm points ``(N, D', H', W', 3)``
    (centre-relative, ``(x, y, z)``); zero outside the volume, blending towards zero within the last
    half voxel as ``grid_sample(padding_mode='zeros', align_corners=True)`` does."""
    return F.grid_sample(
        volume, src_grid.normalise(points).to(volume.dtype), mode="bilinear", padding_mode="zeros", align_corners=True
    )


def warp_chain_reference(volume: torch.Tensor, src_grid: Grid, chain: TransformChain, out_grid: Grid) -> torch.Tensor:
    coords = _affine_prefix_coords(chain, src_grid, out_grid, volume)
    if coords is not None:
        return F.grid_sample(volume, coords.to(volume.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    points = chain.map_grid(out_grid, batch=volume.shape[0], dtype=torch.float32, device=volume.device)
    if points.shape[0] != volume.shape[0]:
        points = points.expand(volume.shape[0], *points.shape[1:])
    return sample_points(volume, src_grid, points)


def _affine_prefix_coords(chain: TransformChain, src_grid: Grid, out_grid: Grid, volume: torch.Tensor):
    """``grid_sample`` coordinates of ``[rigid?, bspline?]`` chains without materialising the points
    (:func:`msode_sdk.transforms.affine_bspline_coords`: the same numbers as mapping every point, in fewer
    passes over the grid); None for other chains and under autograd (the caller maps points)."""
    kinds = tuple(t.kind for t in chain.transforms)
    if kinds not in (("rigid",), ("bspline",), ("rigid", "bspline")) or torch.is_grad_enabled():
        return None
    n = volume.shape[0]
    dev = volume.device
    ts: list[Any] = chain.transforms  # attributes by kind (matrix / lattice)
    matrix = ts[0].matrix if kinds[0] == "rigid" else None
    if matrix is not None and matrix.shape[0] not in (1, n):
        return None
    xs, ys, zs = (out_grid.axis_coords(i, torch.float32, dev) for i in range(3))
    coeffs = bx = by = bz = None
    if kinds[-1] == "bspline":
        bsp = ts[-1]
        coeffs = bsp.state
        bx, by, bz = (bsp.lattice.basis_matrix(c, i) for i, c in enumerate((xs, ys, zs)))
    inv_half = [2.0 / max(e, 1e-12) for e in src_grid.extent_xyz]
    coords = affine_bspline_coords(matrix, coeffs, xs, ys, zs, bx, by, bz, inv_half)
    if coords.shape[0] != n:
        coords = coords.expand(n, *coords.shape[1:])
    return coords
