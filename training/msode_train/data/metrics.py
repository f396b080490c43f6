"""Evaluation metrics: Dice, intensity RMSE, and the RMSE of two point maps (mm)."""

from __future__ import annotations

import numpy as np
import torch

from msode_sdk.transforms import Grid, Transform, TransformChain

from .pairs import _chain_batch

__all__ = ["dice", "rmse_x", "rmse_phi"]


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def dice(a_mask, b_mask) -> float:
    """Dice overlap ``2 |A n B| / (|A| + |B|)`` of two boolean masks of one shape (numpy or torch);
    1.0 when both are empty."""
    a, b = _np(a_mask).astype(bool), _np(b_mask).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: mask shapes differ {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def rmse_x(img_a, img_b, mask=None) -> float:
    """Root mean squared intensity difference of two images of one shape (over ``mask`` if given)."""
    a, b = _np(img_a).astype(np.float64), _np(img_b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rmse_x: image shapes differ {a.shape} vs {b.shape}")
    d2 = (a - b) ** 2
    if mask is not None:
        m = np.broadcast_to(_np(mask).astype(bool), d2.shape)
        if not m.any():
            raise ValueError("rmse_x: empty mask")
        d2 = d2[m]
    return float(np.sqrt(d2.mean()))


def _points_of(chain_or_points, grid: Grid, batch: int) -> torch.Tensor:
    if chain_or_points is None:
        chain_or_points = TransformChain()
    if isinstance(chain_or_points, Transform):
        chain_or_points = TransformChain([chain_or_points])
    if isinstance(chain_or_points, TransformChain):
        return chain_or_points.map_grid(grid, batch=batch).to(torch.float64)
    p = torch.as_tensor(chain_or_points).to(torch.float64)
    if p.ndim == 4:
        p = p[None]
    if tuple(p.shape[1:]) != (*grid.shape_dhw, 3):
        raise ValueError(f"rmse_phi: point map of shape {tuple(p.shape)} does not match grid {grid.shape_dhw}")
    return p


def rmse_phi(chain_est, chain_gt, grid: Grid, mask=None, reduction: str = "mean"):
    """RMS of ``|phi_est(x) - phi_gt(x)|`` (mm) over the voxels of ``grid`` inside ``mask``.

    ``chain_est``/``chain_gt``: a :class:`TransformChain`, a :class:`Transform`, ``None`` (identity)
    or a point map ``(N, D, H, W, 3)`` mm. ``mask``: torch ``([N, 1,] D, H, W)`` or numpy
    ``(X, Y, Z)`` (NIfTI layout), e.g. ``pair.fixed_brain``. ``reduction='mean'`` -> float over all
    batch members; ``'none'`` -> ``(N,)`` float64 tensor.
    """
    with torch.no_grad():
        n = max(_chain_batch(c) if isinstance(c, TransformChain) else 1 for c in (chain_est, chain_gt))
        pe, pg = _points_of(chain_est, grid, n), _points_of(chain_gt, grid, n)
        if pe.shape[0] != pg.shape[0]:
            pe, pg = torch.broadcast_tensors(pe, pg)
        d2 = ((pe - pg) ** 2).sum(-1)  # (N, D, H, W)
        if mask is None:
            m = torch.ones_like(d2, dtype=torch.bool)
        else:
            m = (
                mask
                if isinstance(mask, torch.Tensor)
                else torch.from_numpy(np.ascontiguousarray(np.asarray(mask).astype(bool).transpose(2, 1, 0)))
            )
            m = m.to(torch.bool).cpu()
            while m.ndim > 4:
                m = m[:, 0]
            m = torch.broadcast_to(m, d2.shape)
        d2 = d2.cpu()
        cnt = m.sum(dim=(1, 2, 3)).to(torch.float64)
        if (cnt == 0).any():
            raise ValueError("rmse_phi: empty mask")
        per = torch.sqrt((d2 * m).sum(dim=(1, 2, 3)) / cnt)
        if reduction == "none":
            return per
        if reduction == "mean":
            return float(torch.sqrt((d2 * m).sum() / cnt.sum()))
        raise ValueError(f"unknown reduction {reduction!r}; valid: ['mean', 'none']")
