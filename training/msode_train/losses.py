"""Training losses of MS-ODENet: ``L = lambda_sim L_sim + lambda_self L_self + lambda_reg L_reg``.

Similarities ``L_sim(warped, fixed)`` (lower is better; images ``(N, 1, D, H, W)`` in [0, 1]):

``mi`` (:func:`mi_loss`)
    Negative mutual information with Parzen-window (Gaussian kernel) joint histograms, ``bins`` bins
    on [0, 1], kernel sigma ``sigma_ratio`` bin widths. Differentiable in both images. Voxels are
    subsampled on a regular stride to at most ``max_voxels`` (deterministic).
``ncc``
    Negative local (windowed, ``win``^3 box) squared normalised cross-correlation, averaged over
    voxels (VoxelMorph's form; squared, so inverted contrasts also correlate).
``mind``
    Mean squared difference of MIND-SSC descriptors (Heinrich et al. 2013: 12 self-similarity
    context distances of the six-neighbourhood, dilation ``dilation``, patch radius ``radius``).
``content``
    The content-encoder feature distance of the paper, from :mod:`msode_train.content`
    (``content_similarity(name_or_path) -> callable(warped, fixed) -> loss``); a clear error if that
    module or its encoder is missing.

``L_self`` (self-supervision): a random perturbation ``theta~`` of one image, registered back to
itself; ``points`` metric (default): mean over brain points ``x`` of ``|phi_rec(x) - phi~(x)|^2``
divided by ``scale_mm^2`` (the displacement-field form of ``||theta~ - theta~_T||^2``: one unit for
one RMS ``scale_mm``, the same units for rigid, B-spline and dense, and independent of how the
parameters are scaled); ``params`` metric: the paper's plain mean ``||theta~ - theta~_T||^2`` of
the stage states (radians and mm mixed for rigid).

``L_reg = ||grad u||^2`` (``u = phi - x``, the deformable part; zero for rigid): mean over the grid of
the squared finite-difference Jacobian of the displacement, for B-spline evaluated exactly on a grid
of ``reg_spacing`` (default: twice the model spacing), for dense on its own grid.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from msode_export.analytic import MINDSSC as _MINDSSC
from msode_sdk.transforms import BSplineTransform, DenseTransform, Grid, TransformChain

__all__ = [
    "mi_loss",
    "local_ncc",
    "mind_ssc",
    "mind_loss",
    "get_similarity",
    "SIMILARITIES",
    "self_supervision_loss",
    "point_error",
    "brain_points",
    "gradient_regulariser",
    "ContentUnavailable",
]


class ContentUnavailable(RuntimeError):
    """The content-encoder similarity was asked for but cannot be built."""


# --------------------------------------------------------------------------------------------- MI


def mi_loss(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    max_voxels: int = 1 << 16,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``mi`` similarity loss: *negative* Gaussian-Parzen-window mutual information (nats), mean over the
    batch; differentiable in both images. Not the evaluation MIs: ``msode_sdk.initialize.mutual_information``
    (hard bins, foreground voxels; the SDK's rigid initialiser) and
    ``msode_train.content.linear_binned_mi`` (linear bins, all voxels; the content-encoder reports)."""
    n = warped.shape[0]
    a = warped.reshape(n, -1)
    b = fixed.reshape(n, -1)
    if mask is not None:
        m = mask.reshape(mask.shape[0], -1).to(a.dtype)
        m = m.expand(n, -1) if m.shape[0] == 1 else m
    else:
        m = None
    stride = max(1, math.ceil(a.shape[1] / max_voxels))
    if stride > 1:
        a, b = a[:, ::stride], b[:, ::stride]
        m = m[:, ::stride] if m is not None else None
    centres = torch.linspace(0.0, 1.0, bins, dtype=a.dtype, device=a.device)
    sigma = sigma_ratio / (bins - 1)
    wa = torch.exp(-0.5 * ((a.clamp(0, 1)[..., None] - centres) / sigma) ** 2)  # (N, V, B)
    wb = torch.exp(-0.5 * ((b.clamp(0, 1)[..., None] - centres) / sigma) ** 2)
    wa = wa / wa.sum(-1, keepdim=True).clamp_min(1e-12)
    wb = wb / wb.sum(-1, keepdim=True).clamp_min(1e-12)
    if m is not None:
        wa = wa * m[..., None]
        count = m.sum(1).clamp_min(1.0)[:, None, None]
    else:
        count = torch.full((n, 1, 1), float(a.shape[1]), dtype=a.dtype, device=a.device)
    pab = torch.bmm(wa.transpose(1, 2), wb) / count  # (N, B, B)
    pa = pab.sum(2, keepdim=True)
    pb = pab.sum(1, keepdim=True)
    eps = 1e-10
    mi = (pab * (torch.log(pab + eps) - torch.log(pa * pb + eps))).sum(dim=(1, 2))
    return -mi.mean()


# -------------------------------------------------------------------------------------------- NCC


def local_ncc(warped: torch.Tensor, fixed: torch.Tensor, win: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Negative mean local squared NCC over ``win``^3 windows (in [-1, 0])."""
    pad = win // 2

    def box(v):
        return F.avg_pool3d(v, win, stride=1, padding=pad, count_include_pad=False)

    i, j = warped, fixed
    mi, mj = box(i), box(j)
    cross = box(i * j) - mi * mj
    vi = (box(i * i) - mi * mi).clamp_min(0)
    vj = (box(j * j) - mj * mj).clamp_min(0)
    cc = cross * cross / (vi * vj + eps)
    return -cc.mean()


# ------------------------------------------------------------------------------------------- MIND


def mind_ssc(img: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor ``(N, 12, D, H, W)`` of ``(N, 1, D, H, W)`` (:class:`msode_export.analytic.MINDSSC`,
    the very module the bundled plan's fine levels run)."""
    return _MINDSSC(radius, dilation).to(img.device)(img)


def mind_loss(warped: torch.Tensor, fixed: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """Mean squared MIND-SSC descriptor difference."""
    return ((mind_ssc(warped, radius, dilation) - mind_ssc(fixed, radius, dilation)) ** 2).mean()


# ---------------------------------------------------------------------------------------- registry

SimFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SIMILARITIES = ("mi", "ncc", "mind", "content")


def get_similarity(name: str, **kwargs) -> SimFn:
    """``callable(warped, fixed) -> scalar loss`` for ``name`` in :data:`SIMILARITIES`; ``kwargs`` go to
    the function (``content``: ``encoder=<name or path>``)."""
    if name == "mi":
        return lambda w, f: mi_loss(w, f, **kwargs)
    if name == "ncc":
        return lambda w, f: local_ncc(w, f, **kwargs)
    if name == "mind":
        return lambda w, f: mind_loss(w, f, **kwargs)
    if name == "content":
        try:
            from .content import content_similarity
        except ImportError as exc:
            raise ContentUnavailable(
                "similarity 'content' needs msode_train.content (the pretrained content encoder), which is not "
                f"available ({exc}); train/ship the encoder first, or choose one of mi, ncc, mind"
            ) from None
        encoder = kwargs.pop("encoder", None)
        try:
            fn = content_similarity(encoder, **kwargs) if kwargs else content_similarity(encoder)
        except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
            raise ContentUnavailable(f"content similarity could not load encoder {encoder!r}: {exc}") from exc
        return fn
    raise ValueError(f"unknown similarity {name!r}; valid: {list(SIMILARITIES)}")


# ------------------------------------------------------------------------------- self-supervision


def point_error(chain_est: TransformChain, chain_ref: TransformChain, points: torch.Tensor) -> torch.Tensor:
    """Mean over points of ``|phi_est(x) - phi_ref(x)|^2`` (mm^2); ``points`` ``(N, P, 3)`` mm."""
    pe = chain_est.map_points(points)
    pr = chain_ref.map_points(points)
    return ((pe - pr) ** 2).sum(-1).mean()


def self_supervision_loss(
    chain_est: TransformChain,
    chain_true: TransformChain,
    points: torch.Tensor | None = None,
    metric: str = "points",
    scale_mm: float = 10.0,
    states_est=None,
    states_true=None,
) -> torch.Tensor:
    """``L_self`` (see module docstring)."""
    if metric == "points":
        if points is None:
            raise ValueError("metric 'points' needs the points")
        return point_error(chain_est, chain_true, points) / (scale_mm * scale_mm)
    if metric == "params":
        return sum(((a - b) ** 2).mean() for a, b in zip(states_est, states_true))
    raise ValueError(f"unknown self-supervision metric {metric!r}; valid: ['points', 'params']")


def brain_points(mask: torch.Tensor, grid: Grid, max_points: int = 4096) -> torch.Tensor:
    """``(N, P, 3)`` mm centres of ``mask`` voxels (``(N, 1, D, H, W)`` bool on ``grid``), a regular
    subsample of at most ``max_points`` per batch member; all members get the same count (the
    smallest), the whole grid if a mask is empty."""
    pts = grid.points(torch.float32, mask.device).reshape(-1, 3)
    out = []
    for m in mask.reshape(mask.shape[0], -1).bool():
        sel = pts[m] if bool(m.any()) else pts
        stride = max(1, math.ceil(sel.shape[0] / max_points))
        out.append(sel[::stride])
    k = min(p.shape[0] for p in out)
    return torch.stack([p[:k] for p in out])


# ------------------------------------------------------------------------------------ regulariser


def _grad_sq(field: torch.Tensor, spacing_xyz) -> torch.Tensor:
    """Mean squared forward differences (per mm) of a ``(N, 3, D, H, W)`` field."""
    sx, sy, sz = spacing_xyz
    terms = []
    if field.shape[4] > 1:
        terms.append(((field[..., 1:] - field[..., :-1]) / sx) ** 2)
    if field.shape[3] > 1:
        terms.append(((field[..., 1:, :] - field[..., :-1, :]) / sy) ** 2)
    if field.shape[2] > 1:
        terms.append(((field[:, :, 1:] - field[:, :, :-1]) / sz) ** 2)
    return sum(t.mean() for t in terms) if terms else field.new_zeros(())


def gradient_regulariser(chain: TransformChain, model_grid: Grid, reg_factor: int = 2) -> torch.Tensor:
    """``||grad u||^2`` of the deformable stages of ``chain`` (zero when there are none)."""
    total = None
    for t in chain.transforms:
        if isinstance(t, BSplineTransform):
            g = model_grid.downsampled(reg_factor) if reg_factor > 1 else model_grid
            disp = t.lattice.displacement_on(t.state, g)
            term = _grad_sq(disp, g.spacing_xyz)
        elif isinstance(t, DenseTransform):
            term = _grad_sq(t.state, t.grid.spacing_xyz)
        else:
            continue
        total = term if total is None else total + term
    if total is None:
        dev = chain.transforms[0].state.device if chain.transforms else None
        return torch.zeros((), device=dev)
    return total
