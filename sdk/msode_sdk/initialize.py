"""Principal-axes (image moments) initialiser for the rigid state theta_0.

Beyond the paper: before a rigid stage integrates, theta_0 may come from matching
the principal axes of the two images' foregrounds. The foreground is ``intensity > threshold`` of the
normalised images (binary, so T1 and T2 of one head give nearly the same moments). With centroids
``c_f, c_m`` and covariance eigenvectors ``V_f, V_m`` (eigenvalues sorted), every
``R = V_m S V_f^T`` with ``S = diag(+-1, +-1, +-1)``, ``det R = +1`` maps the fixed axes onto the
moving ones: 4 candidates. Their sign ambiguity is resolved by the similarity: each candidate, and the
identity, is scored by mutual information at a coarse level, and the best is kept, so the initialiser
never starts from a worse MI than no initialiser.

The loop takes the moments from the rigid stage's finest level (:meth:`msode_sdk.loop.RegistrationLoop._candidates`):
averaging to 16 mm blurs the foreground's shape enough to turn the axes of a nearly round head (its two smaller
extents within 5 %) by tens of degrees.

``multistart`` (``Registrar``, ``init="multistart"``) goes further: the coarsest level of the rigid stage
is integrated from all 5 starts at once (one batch), each end point is scored by MI on the next finer
level, and the rest of the stage continues from the best. Scoring *after* the coarse flow is what makes
it reliable: a wrong start either converges to the same optimum or stalls at a visibly worse MI, while
scoring the raw starts (``moments``) sometimes prefers a wrong axis assignment.

Everything here runs on the tensors' device with static shapes and no host synchronisation (no
``.item()``, boolean indexing, LAPACK info checks or data-dependent sizes), so a CUDA graph can capture
it: the 3x3 eigen-decompositions are cyclic Jacobi sweeps (:func:`symmetric_eigh3`), determinants are
written out, MI histograms are fixed-size scatter-adds, and the choice is ``argmax`` + gather. The
functions are TorchScript-compatible (``registrar.ts`` runs the same code).

Points are model-frame mm (centre-relative, ``(x, y, z)``); tensors ``(N, 1, D, H, W)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .transforms import Grid, matrix_to_rigid

__all__ = [
    "foreground_moments",
    "principal_axes_candidates",
    "candidate_thetas",
    "mutual_information",
    "choose_start",
    "moments_initial_theta",
    "symmetric_eigh3",
    "JACOBI_SWEEPS",
    "MI_BINS",
]

JACOBI_SWEEPS = 8  # cyclic sweeps of 3 rotations; convergence is quadratic: 8 reach float64 round-off
MI_BINS = 32


def moments_of_axes(
    vol: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, zs: torch.Tensor, threshold: float = 0.05
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`foreground_moments` on the axis-aligned grid whose voxel centres are the products of the
    float64 mm coordinates ``xs (W,)``, ``ys (H,)``, ``zs (D,)``. Separable sums: the mask summed over one
    axis at a time gives every first and second moment, so no ``(D*H*W, 3)`` point array is built (at the
    2 mm model grid 4 ms instead of 28 per image)."""
    w = (vol[:, 0] > threshold).to(torch.float64)  # (N, D, H, W)
    w_yx = w.sum(1)  # (N, H, W)
    w_zx = w.sum(2)  # (N, D, W)
    w_zy = w.sum(3)  # (N, D, H)
    w_x = w_yx.sum(1)
    w_y = w_yx.sum(2)
    w_z = w_zx.sum(2)
    mass = w_x.sum(1).clamp(min=1.0)
    c = torch.stack((w_x @ xs, w_y @ ys, w_z @ zs), 1) / mass[:, None]  # (N, 3)
    sxx = (w_x @ (xs * xs)) / mass
    syy = (w_y @ (ys * ys)) / mass
    szz = (w_z @ (zs * zs)) / mass
    sxy = ((w_yx @ xs) @ ys) / mass
    sxz = ((w_zx @ xs) @ zs) / mass
    syz = ((w_zy @ ys) @ zs) / mass
    # central moments from raw ones: |coordinates| <= ~150 mm, so float64 loses nothing that matters here
    cxx = sxx - c[:, 0] * c[:, 0]
    cyy = syy - c[:, 1] * c[:, 1]
    czz = szz - c[:, 2] * c[:, 2]
    cxy = sxy - c[:, 0] * c[:, 1]
    cxz = sxz - c[:, 0] * c[:, 2]
    cyz = syz - c[:, 1] * c[:, 2]
    cov = torch.stack(
        (torch.stack((cxx, cxy, cxz), 1), torch.stack((cxy, cyy, cyz), 1), torch.stack((cxz, cyz, czz), 1)), 1
    )
    return c, cov


def _grid_axes(grid: Grid, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        grid.axis_coords(0, torch.float64, device),
        grid.axis_coords(1, torch.float64, device),
        grid.axis_coords(2, torch.float64, device),
    )


def foreground_moments(vol: torch.Tensor, grid: Grid, threshold: float = 0.05):
    """Centroid ``(N, 3)`` mm and covariance ``(N, 3, 3)`` mm^2 of the voxels above ``threshold``."""
    return moments_of_axes(vol, *_grid_axes(grid, vol.device), threshold)


def _det3(m: torch.Tensor) -> torch.Tensor:
    """Determinants of ``(N, 3, 3)`` matrices, written out (no LU, no error check, no host sync)."""
    return (
        m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
        - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
        + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0])
    )


def symmetric_eigh3(a: torch.Tensor, sweeps: int = JACOBI_SWEEPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric ``(N, 3, 3)`` matrices by cyclic Jacobi rotations: eigenvalues
    ``(N, 3)`` ascending and orthonormal eigenvectors as columns ``(N, 3, 3)`` (the signs of the columns
    are arbitrary, as with LAPACK). Fixed work, static shapes: each rotation zeroes one off-diagonal
    pair ``(p, q)`` with the numerically stable ``t = sign(tau) / (|tau| + sqrt(1 + tau^2))``."""
    n = a.shape[0]
    a = 0.5 * (a + a.transpose(1, 2))
    v = torch.eye(3, dtype=a.dtype, device=a.device).unsqueeze(0).repeat(n, 1, 1)
    eye = torch.eye(3, dtype=a.dtype, device=a.device).unsqueeze(0)
    scale = a.abs().amax(dim=(1, 2)).clamp(min=1e-300)
    pairs = [[0, 1], [0, 2], [1, 2]]
    for _ in range(sweeps):
        for pq in pairs:
            p = pq[0]
            q = pq[1]
            apq = a[:, p, q]
            rotate = apq.abs() > 1e-300 * scale
            safe = torch.where(rotate, apq, torch.ones_like(apq))
            tau = (a[:, q, q] - a[:, p, p]) / (2.0 * safe)
            sgn = torch.where(tau >= 0, torch.ones_like(tau), -torch.ones_like(tau))
            t = sgn / (tau.abs() + torch.sqrt(1.0 + tau * tau))
            t = torch.where(rotate, t, torch.zeros_like(t))
            c = 1.0 / torch.sqrt(1.0 + t * t)
            s = t * c
            # the rotation J: identity except J[p,p] = J[q,q] = c, J[p,q] = s, J[q,p] = -s
            j = eye.repeat(n, 1, 1)
            j[:, p, p] = c
            j[:, q, q] = c
            j[:, p, q] = s
            j[:, q, p] = -s
            a = j.transpose(1, 2) @ a @ j
            v = v @ j
    vals = torch.diagonal(a, dim1=1, dim2=2)
    order = torch.argsort(vals, dim=1)
    vals = torch.gather(vals, 1, order)
    v = torch.gather(v, 2, order.unsqueeze(1).expand(n, 3, 3))
    return vals, v


def candidates_of_axes(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    zs: torch.Tensor,
    threshold: float = 0.05,
) -> torch.Tensor:
    """:func:`principal_axes_candidates` on the grid of the float64 mm axis coordinates ``xs, ys, zs``."""
    c_m, cov_m = moments_of_axes(moving, xs, ys, zs, threshold)
    c_f, cov_f = moments_of_axes(fixed, xs, ys, zs, threshold)
    _, v_m = symmetric_eigh3(cov_m)  # ascending eigenvalues, orthonormal columns
    _, v_f = symmetric_eigh3(cov_f)
    n = moving.shape[0]
    out = []
    for flip in [-1, 0, 1, 2]:  # S = I, then the sign pairs (y, z), (x, z), (x, y)
        sgn = torch.ones([n, 3], dtype=torch.float64, device=moving.device)  # no host copy: capturable
        if flip >= 0:
            sgn[:, :] = -1.0
            sgn[:, flip] = 1.0
        r = v_m @ torch.diag_embed(sgn) @ v_f.transpose(1, 2)
        det = _det3(r)
        r = r * torch.where(det < 0, -torch.ones_like(det), torch.ones_like(det))[:, None, None]  # proper rotations
        m = torch.eye(4, dtype=torch.float64, device=moving.device).repeat(n, 1, 1)
        m[:, :3, :3] = r
        m[:, :3, 3] = c_m - (r @ c_f[:, :, None])[:, :, 0]
        out.append(m)
    return torch.stack(out, 1)


def principal_axes_candidates(
    moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, threshold: float = 0.05
) -> torch.Tensor:
    """``(N, 4, 4, 4)``: the 4 proper rigid matrices (fixed frame -> moving frame) aligning the axes."""
    return candidates_of_axes(moving, fixed, *_grid_axes(grid, moving.device), threshold)


def thetas_of_axes(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    zs: torch.Tensor,
    threshold: float = 0.05,
) -> torch.Tensor:
    """:func:`candidate_thetas` on the grid of the float64 mm axis coordinates ``xs, ys, zs``."""
    cands = candidates_of_axes(moving, fixed, xs, ys, zs, threshold)  # (N, 4, 4, 4)
    n = cands.shape[0]
    eye = torch.eye(4, dtype=cands.dtype, device=cands.device).expand(n, 1, 4, 4)
    cands = torch.cat([eye, cands], 1)  # (N, 5, 4, 4)
    k = cands.shape[1]
    return matrix_to_rigid(cands.reshape(n * k, 4, 4)).to(torch.float32).reshape(n, k, 6)


def candidate_thetas(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, threshold: float = 0.05) -> torch.Tensor:
    """``(N, 5, 6)`` float32 rigid parameters: the identity, then the 4 principal-axes candidates."""
    return thetas_of_axes(moving, fixed, *_grid_axes(grid, moving.device), threshold)


def mutual_information(
    a: torch.Tensor, b: torch.Tensor, bins: int = MI_BINS, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """MI ``(N,)`` float64 (nats) of intensities in [0, 1] over the voxels where either image falls in a
    non-zero bin, from a hard ``bins x bins`` joint histogram (intensities rounded to the nearest bin; a
    "non-zero value" rule let float noise of 1e-6 in the background, which two implementations or devices
    need not share, move voxels in and out: 0.001 nats between registrar.ts and the SDK), and only where
    ``mask`` (same shape as ``a``, optional) is > 0.5. Batched and
    with static shapes: the voxels outside both images weigh 0 in a fixed-size scatter-add; a pair with
    no such voxel scores 0."""
    n = a.shape[0]
    x = a.reshape(n, -1)
    y = b.reshape(n, -1)
    ix = torch.round(x.clamp(0.0, 1.0) * (bins - 1)).long()
    iy = torch.round(y.clamp(0.0, 1.0) * (bins - 1)).long()
    counted = (ix > 0) | (iy > 0)
    if mask is not None:  # e.g. inside both fields of view: outside one, its zeros are not data
        counted = counted & (mask.reshape(n, -1) > 0.5)
    w = counted.to(torch.float64)
    joint = torch.zeros([n, bins * bins], dtype=torch.float64, device=a.device)
    joint = joint.scatter_add(1, ix * bins + iy, w).reshape(n, bins, bins)
    total = joint.sum(dim=(1, 2), keepdim=True)
    p = joint / total.clamp(min=1.0)
    px = p.sum(2, keepdim=True)
    py = p.sum(1, keepdim=True)
    nz = p > 0
    ratio = torch.where(nz, p / (px * py).clamp(min=1e-300), torch.ones_like(p))
    return torch.where(nz, p * torch.log(ratio), torch.zeros_like(p)).sum(dim=(1, 2))


def choose_start(thetas: torch.Tensor, scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the candidate with the highest score: ``thetas (N, K, P)``, ``scores (N, K)`` ->
    ``(chosen (N, P), index (N,))``, on the device (first maximum on ties)."""
    best = scores.argmax(1)
    chosen = torch.gather(thetas, 1, best[:, None, None].expand(thetas.shape[0], 1, thetas.shape[2]))[:, 0]
    return chosen, best


def moments_initial_theta(
    moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, threshold: float = 0.05
) -> torch.Tensor:
    """Best of {identity, 4 principal-axes candidates} by MI on ``grid``: rigid parameters ``(N, 6)``
    float32 (what ``init="moments"`` starts from)."""
    from .transforms import RigidTransform, TransformChain
    from .warp import warp_chain

    thetas = candidate_thetas(moving, fixed, grid, threshold)  # (N, K, 6)
    n, k = thetas.shape[0], thetas.shape[1]
    warped = warp_chain(
        moving.repeat_interleave(k, 0), grid, TransformChain([RigidTransform(thetas.reshape(n * k, 6))]), grid
    )
    scores = mutual_information(warped, fixed.repeat_interleave(k, 0)).reshape(n, k)
    return choose_start(thetas, scores)[0]
