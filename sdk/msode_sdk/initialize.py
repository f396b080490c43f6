"""Principal-axes (image moments) initialiser for the rigid state theta_0.

Beyond the paper (DESIGN section 5): before a rigid stage integrates, theta_0 may come from matching
the principal axes of the two images' foregrounds. The foreground is ``intensity > threshold`` of the
normalised images (binary, so T1 and T2 of one head give nearly the same moments). With centroids
``c_f, c_m`` and covariance eigenvectors ``V_f, V_m`` (eigenvalues sorted), every
``R = V_m S V_f^T`` with ``S = diag(+-1, +-1, +-1)``, ``det R = +1`` maps the fixed axes onto the
moving ones: 4 candidates. Their sign ambiguity is resolved by the similarity: each candidate, and the
identity, is scored by mutual information at a coarse level, and the best is kept, so the initialiser
never starts from a worse MI than no initialiser.

``multistart`` (``Registrar``, ``init="multistart"``) goes further: the coarsest level of the rigid stage
is integrated from all 5 starts at once (one batch), each end point is scored by MI on the next finer
level, and the rest of the stage continues from the best. Scoring *after* the coarse flow is what makes
it reliable: a wrong start either converges to the same optimum or stalls at a visibly worse MI, while
scoring the raw starts (``moments``) sometimes prefers a wrong axis assignment.

Points are model-frame mm (centre-relative, ``(x, y, z)``); tensors ``(N, 1, D, H, W)``.
"""
from __future__ import annotations

import torch

from .transforms import Grid, RigidTransform, TransformChain, matrix_to_rigid
from .warp import warp_chain

__all__ = ["foreground_moments", "principal_axes_candidates", "candidate_thetas", "mutual_information",
           "moments_initial_theta"]


def moments_of_points(vol: torch.Tensor, pts: torch.Tensor, threshold: float = 0.05):
    """:func:`foreground_moments` with the voxel centres given as ``pts (P, 3)`` float64 mm, in the
    volume's flattened order (TorchScript-able: ``registrar.ts`` runs it too)."""
    w = (vol.reshape(vol.shape[0], -1) > threshold).to(torch.float64)
    mass = w.sum(1).clamp(min=1.0)
    c = (w @ pts) / mass[:, None]
    d = pts[None] - c[:, None]
    cov = torch.einsum("np,npi,npj->nij", w, d, d) / mass[:, None, None]
    return c, cov


def foreground_moments(vol: torch.Tensor, grid: Grid, threshold: float = 0.05):
    """Centroid ``(N, 3)`` mm and covariance ``(N, 3, 3)`` mm^2 of the voxels above ``threshold``."""
    return moments_of_points(vol, grid.points(torch.float64, vol.device).reshape(-1, 3), threshold)


def candidates_of_points(moving: torch.Tensor, fixed: torch.Tensor, pts: torch.Tensor,
                         threshold: float = 0.05) -> torch.Tensor:
    """:func:`principal_axes_candidates` with the voxel centres given as ``pts (P, 3)`` float64 mm."""
    c_m, cov_m = moments_of_points(moving, pts, threshold)
    c_f, cov_f = moments_of_points(fixed, pts, threshold)
    _, v_m = torch.linalg.eigh(cov_m)  # ascending eigenvalues, orthonormal columns
    _, v_f = torch.linalg.eigh(cov_f)
    n = moving.shape[0]
    out = []
    for s in [[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]:
        sgn = torch.tensor(s, dtype=torch.float64, device=moving.device)
        r = v_m @ torch.diag_embed(sgn.expand(n, 3)) @ v_f.transpose(1, 2)
        det = torch.linalg.det(r)
        r = r * det.sign()[:, None, None]  # make every candidate a proper rotation
        m = torch.eye(4, dtype=torch.float64, device=moving.device).repeat(n, 1, 1)
        m[:, :3, :3] = r
        m[:, :3, 3] = c_m - (r @ c_f[:, :, None])[:, :, 0]
        out.append(m)
    return torch.stack(out, 1)


def principal_axes_candidates(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, threshold: float = 0.05) -> torch.Tensor:
    """``(N, 4, 4, 4)``: the 4 proper rigid matrices (fixed frame -> moving frame) aligning the axes."""
    return candidates_of_points(moving, fixed, grid.points(torch.float64, moving.device).reshape(-1, 3), threshold)


def thetas_of_points(moving: torch.Tensor, fixed: torch.Tensor, pts: torch.Tensor,
                     threshold: float = 0.05) -> torch.Tensor:
    """:func:`candidate_thetas` with the voxel centres given as ``pts (P, 3)`` float64 mm."""
    cands = candidates_of_points(moving, fixed, pts, threshold)                  # (N, 4, 4, 4)
    n = cands.shape[0]
    eye = torch.eye(4, dtype=cands.dtype, device=cands.device).expand(n, 1, 4, 4)
    cands = torch.cat([eye, cands], 1)                                           # (N, 5, 4, 4)
    k = cands.shape[1]
    return matrix_to_rigid(cands.reshape(n * k, 4, 4)).to(torch.float32).reshape(n, k, 6)


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """MI ``(N,)`` of intensities in [0, 1] over voxels where either image is non-zero (hard bins)."""
    n = a.shape[0]
    out = []
    for i in range(n):
        x, y = a[i].reshape(-1), b[i].reshape(-1)
        keep = (x > 0) | (y > 0)
        x, y = x[keep], y[keep]
        if x.numel() == 0:
            out.append(torch.zeros((), dtype=torch.float64, device=a.device))
            continue
        ix = (x.clamp(0, 1) * (bins - 1)).round().long()
        iy = (y.clamp(0, 1) * (bins - 1)).round().long()
        joint = torch.bincount(ix * bins + iy, minlength=bins * bins).reshape(bins, bins).to(torch.float64)
        p = joint / joint.sum()
        px, py = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
        nz = p > 0
        out.append((p[nz] * torch.log(p[nz] / (px @ py)[nz])).sum())
    return torch.stack(out)


def candidate_thetas(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, threshold: float = 0.05) -> torch.Tensor:
    """``(N, 5, 6)`` float32 rigid parameters: the identity, then the 4 principal-axes candidates."""
    return thetas_of_points(moving, fixed, grid.points(torch.float64, moving.device).reshape(-1, 3), threshold)


def moments_initial_theta(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, threshold: float = 0.05) -> torch.Tensor:
    """Best of {identity, 4 principal-axes candidates} by MI: rigid parameters ``(N, 6)`` float32."""
    thetas = candidate_thetas(moving, fixed, grid, threshold)
    n, k = thetas.shape[:2]
    scores = []
    for j in range(k):
        warped = warp_chain(moving, grid, TransformChain([RigidTransform(thetas[:, j])]), grid)
        scores.append(mutual_information(warped, fixed))
    best = torch.stack(scores, 1).argmax(1)
    return thetas[torch.arange(n, device=thetas.device), best]
