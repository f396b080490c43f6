"""Multi-slice stacks of volumes: extraction along the three axes, stack positions, shifted and
rigidly moved copies."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .networks import STACK

__all__ = ["extract_stacks", "sample_slice_positions"]


def extract_stacks(vol: torch.Tensor, axis: int, centres: torch.Tensor, k: int = STACK) -> torch.Tensor:
    """``k``-slice stacks of ``vol`` ``(N, C, D, H, W)`` centred at ``centres`` (long ``(S,)``) along
    tensor ``axis`` (0 = D axial, 1 = H coronal, 2 = W sagittal) -> ``(N * S, C * k, h, w)``
    (sample-major: stacks of sample 0 first). Differentiable (``index_select``)."""
    n, c = vol.shape[:2]
    s = centres.numel()
    off = torch.arange(k, device=vol.device) - (k // 2)
    idx = (centres.to(vol.device).view(-1, 1) + off.view(1, -1)).reshape(-1)
    g = vol.index_select(2 + axis, idx)
    if axis == 0:  # (N, C, S*k, H, W)
        g = g.view(n, c, s, k, *g.shape[3:]).permute(0, 2, 1, 3, 4, 5)
    elif axis == 1:  # (N, C, D, S*k, W)
        g = g.view(n, c, g.shape[2], s, k, g.shape[4]).permute(0, 3, 1, 4, 2, 5)
    else:  # (N, C, D, H, S*k)
        g = g.view(n, c, g.shape[2], g.shape[3], s, k).permute(0, 4, 1, 5, 2, 3)
    return g.reshape(n * s, c * k, g.shape[-2], g.shape[-1])


def sample_slice_positions(
    shape_dhw: Sequence[int],
    n_slices: int,
    generator: torch.Generator | None = None,
    central_fraction: float = 0.7,
    k: int = STACK,
) -> list:
    """Stack centres for each axis: ``[(axis, centres LongTensor), ...]`` with ``n_slices`` split as
    evenly as possible over the three axes (axial first), drawn uniformly (with replacement) from the
    central ``central_fraction`` of each axis (and at least ``k // 2`` voxels from its ends)."""
    out = []
    half = k // 2
    for axis in range(3):
        m = n_slices // 3 + (1 if axis < n_slices % 3 else 0)
        if m == 0:
            continue
        n = int(shape_dhw[axis])
        if n < k:
            raise ValueError(f"axis {axis} has {n} voxels; a {k}-slice stack needs at least {k}")
        margin = max(half, int(math.floor(n * (1.0 - central_fraction) / 2.0)))
        lo, hi = margin, max(margin, n - 1 - margin)
        lo, hi = max(lo, half), min(hi, n - 1 - half)
        c = torch.randint(lo, hi + 1, (m,), generator=generator)
        out.append((axis, c))
    return out


def _rigid_warp(vol: torch.Tensor, grid, theta: torch.Tensor) -> torch.Tensor:
    from msode_sdk.transforms import RigidTransform, TransformChain
    from msode_sdk.warp import warp_chain

    return warp_chain(vol, grid, TransformChain([RigidTransform(theta)]), grid)


def _shifted_stack(vol_dhw: torch.Tensor, axis: int, centre: int, window, delta) -> torch.Tensor:
    """The 5-slice stack of ``vol_dhw`` ``(D, H, W)`` along ``axis`` at ``centre``, in-plane ``window``
    ``(r0, c0, rows, cols)``, sampled (trilinear, zeros outside) at the voxel positions moved by
    ``delta`` ``(dD, dH, dW)`` voxels: ``out[k, i, j] = vol(p_kij + delta)``. ``delta = 0`` reproduces
    :func:`extract_stacks` cropped to the window."""
    r0, c0, rows, cols = window
    k = torch.arange(STACK, dtype=torch.float32) + (centre - STACK // 2)
    r = torch.arange(rows, dtype=torch.float32) + r0
    c = torch.arange(cols, dtype=torch.float32) + c0
    kk, rr, cc = torch.meshgrid(k, r, c, indexing="ij")
    # tensor axes of the stack (k, rows, cols) -> volume axes: the stack axis, then the other two in order
    others = [ax for ax in range(3) if ax != axis]
    idx = [None, None, None]
    idx[axis], idx[others[0]], idx[others[1]] = kk, rr, cc
    dims = vol_dhw.shape
    norm = [2.0 * (idx[i] + float(delta[i])) / max(dims[i] - 1, 1) - 1.0 for i in range(3)]
    grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1)[None]  # grid_sample wants (x=W, y=H, z=D)
    out = F.grid_sample(vol_dhw[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0]
