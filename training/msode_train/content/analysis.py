"""Evaluation of a content similarity: similarity landscapes against mutual information, their minima
and capture ranges (the content-encoder reports)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .similarity import ContentSimilarity
from .slices import _rigid_warp

__all__ = ["linear_binned_mi", "DOF_NAMES", "similarity_landscape", "refine_minimum", "capture_range"]


def linear_binned_mi(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Mutual information (nats) of two images in [0, 1] of one shape ``(N, ...)`` -> ``(N,)``, over all
    voxels, joint histogram with linear (triangular Parzen) binning; the classical MI of Maes et al.
    (every voxel of the fixed grid, background included, as registration tools use it unmasked). The MI
    of the content-encoder reports (:func:`similarity_landscape`). Not the same number as
    ``msode_sdk.initialize.mutual_information`` (hard bins, only voxels where either image is in a non-zero bin)
    nor as the loss ``msode_train.losses.mi_loss`` (Gaussian Parzen window, negative)."""
    n = a.shape[0]
    a = a.reshape(n, -1).clamp(0, 1) * (bins - 1)
    b = b.reshape(n, -1).clamp(0, 1) * (bins - 1)
    a0 = a.floor().clamp(max=bins - 2)
    b0 = b.floor().clamp(max=bins - 2)
    wa, wb = a - a0, b - b0
    a0, b0 = a0.long(), b0.long()
    joint = torch.zeros(n, bins * bins, dtype=torch.float64, device=a.device)
    for da, fa in ((0, 1 - wa), (1, wa)):
        for db, fb in ((0, 1 - wb), (1, wb)):
            joint.scatter_add_(1, (a0 + da) * bins + (b0 + db), (fa * fb).to(torch.float64))
    joint = joint.view(n, bins, bins)
    joint = joint / joint.sum(dim=(1, 2), keepdim=True)
    pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    nz = joint > 0
    ratio = torch.where(nz, joint / (pa * pb).clamp_min(1e-300), torch.ones_like(joint))
    return (joint * torch.log(ratio)).sum(dim=(1, 2))


DOF_NAMES = ("rx", "ry", "rz", "tx", "ty", "tz")


@torch.no_grad()
def similarity_landscape(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    grid,
    sim: ContentSimilarity,
    values: Sequence[float],
    dof: int,
    chunk: int = 6,
    mi_bins: int = 32,
) -> dict:
    """Content distance and -MI (:func:`linear_binned_mi`) of ``warp(moving, theta)`` vs ``fixed`` with ``theta`` zero except
    ``theta[dof] = v`` (degrees for rotations 0-2, mm for translations 3-5) for every ``v`` in
    ``values``. The content distance uses ``sim``'s fixed positions (call with ``resample=False``)."""
    vals = [float(v) for v in values]
    pos = sim.positions(fixed.shape[2:])
    ff = sim.features(fixed, pos)
    content, mi = [], []
    for s in range(0, len(vals), chunk):
        part = vals[s : s + chunk]
        theta = torch.zeros(len(part), 6)
        theta[:, dof] = torch.tensor(part) * (math.pi / 180.0 if dof < 3 else 1.0)
        warped = _rigid_warp(moving.expand(len(part), *moving.shape[1:]), grid, theta)
        fw = sim.features(warped, pos)
        d = sum(((x - y) ** 2).flatten(1).sum(1) for x, y in zip(fw, [f.expand_as(x) for f, x in zip(ff, fw)]))
        d = d / sum(x[0].numel() for x in fw)
        content += d.tolist()
        mi += linear_binned_mi(warped, fixed.expand_as(warped), mi_bins).tolist()
    return {"values": vals, "content": content, "neg_mi": [-v for v in mi]}


def refine_minimum(values: Sequence[float], curve: Sequence[float]) -> float:
    """Location of the curve's minimum, refined by a parabola through the best sample and its neighbours."""
    v, c = np.asarray(values, float), np.asarray(curve, float)
    i = int(np.argmin(c))
    if 0 < i < len(c) - 1:
        y0, y1, y2 = c[i - 1], c[i], c[i + 1]
        den = y0 - 2 * y1 + y2
        if den > 0:
            return float(v[i] + 0.5 * (y0 - y2) / den * (v[i + 1] - v[i]))
    return float(v[i])


def capture_range(values: Sequence[float], curve: Sequence[float], truth: float = 0.0) -> dict:
    """Monotone capture range around ``truth``: from the sample nearest the truth, how far out (in the
    units of ``values``) the curve rises without a single decrease, on each side (``left``, ``right``
    as positive distances, ``both`` = min). If the curve's minimum is not at the truth's sample the
    range is measured from the minimum but reported relative to the truth; ``full`` = covers the
    sampled interval."""
    v, c = np.asarray(values, float), np.asarray(curve, float)
    i = int(np.argmin(c))
    j = i
    while j + 1 < len(c) and c[j + 1] >= c[j]:
        j += 1
    k = i
    while k - 1 >= 0 and c[k - 1] >= c[k]:
        k -= 1
    right, left = float(v[j] - truth), float(truth - v[k])
    return {
        "left": left,
        "right": right,
        "both": min(left, right),
        "argmin": float(v[i]),
        "full": bool(j == len(c) - 1 and k == 0),
    }
