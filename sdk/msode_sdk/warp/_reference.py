"""PyTorch reference warps: the semantics every accelerated kernel must reproduce."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..transforms import Grid, TransformChain


def sample_points(volume: torch.Tensor, src_grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume`` ``(N, C, D, H, W)`` at mm points ``(N, D', H', W', 3)``
    (centre-relative, ``(x, y, z)``); zero outside the volume, blending towards zero within the last
    half voxel as ``grid_sample(padding_mode='zeros', align_corners=True)`` does."""
    return F.grid_sample(volume, src_grid.normalise(points).to(volume.dtype), mode="bilinear",
                         padding_mode="zeros", align_corners=True)


def warp_chain_reference(volume: torch.Tensor, src_grid: Grid, chain: TransformChain, out_grid: Grid) -> torch.Tensor:
    points = chain.map_grid(out_grid, batch=volume.shape[0], dtype=torch.float32, device=volume.device)
    if points.shape[0] != volume.shape[0]:
        points = points.expand(volume.shape[0], *points.shape[1:])
    return sample_points(volume, src_grid, points)
