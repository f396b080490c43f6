"""Registration pairs with exact ground truth (:func:`make_pair`; see "Pairs" in :mod:`msode_train.data`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msode_sdk.transforms import BSplineTransform, Grid, RigidTransform, Transform, TransformChain
from msode_sdk.warp import warp_chain

from .motions import DEFAULT_CONTROL_SPACING_MM, _as_rng, sample_motion
from .subject import TUMOUR_LABELS, Subject

__all__ = ["Pair", "make_pair"]


@dataclass
class Pair:
    """A registration pair with exact ground truth: ``fixed(x) = moving(chain(x))`` (same contrast).

    Tensors are ``(N, 1, D, H, W)`` on ``grid``: ``fixed``/``moving`` float32, ``*_labels`` uint8.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    chain: TransformChain
    grid: Grid
    fixed_contrast: str
    moving_contrast: str
    subject_id: str = ""

    @property
    def fixed_tumour(self) -> torch.Tensor:
        return _is_tumour(self.fixed_labels)

    @property
    def moving_tumour(self) -> torch.Tensor:
        return _is_tumour(self.moving_labels)

    @property
    def fixed_brain(self) -> torch.Tensor:
        return self.fixed_labels > 0

    @property
    def moving_brain(self) -> torch.Tensor:
        return self.moving_labels > 0

    @property
    def batch(self) -> int:
        return self.fixed.shape[0]

    def gt_points(self, grid: Grid | None = None) -> torch.Tensor:
        """Ground-truth ``phi`` at every voxel of ``grid`` (default the pair's): ``(N, D, H, W, 3)`` mm."""
        return self.chain.map_grid(grid or self.grid, batch=self.batch, device=self.fixed.device)

    def gt_displacement(self, grid: Grid | None = None) -> torch.Tensor:
        """Ground-truth ``phi(x) - x`` on ``grid`` (default the pair's): ``(N, 3, D, H, W)`` mm."""
        return self.chain.displacement(grid or self.grid, batch=self.batch, device=self.fixed.device)


def _is_tumour(labels: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(labels, dtype=torch.bool)
    for v in TUMOUR_LABELS:
        out |= labels == v
    return out


def _chain_batch(chain: TransformChain) -> int:
    return chain.transforms[0].batch if chain.transforms else 1


def _resample_with_labels(
    image: torch.Tensor, labels: torch.Tensor, src: Grid, chain: TransformChain, out: Grid, n: int
):
    """Warp an image and its labels (one-hot + trilinear + arg-max) in one ``warp_chain`` call."""
    n_cls = int(labels.max()) + 1 if labels.numel() else 1
    onehot = F.one_hot(labels[:, 0].long(), n_cls).permute(0, 4, 1, 2, 3).to(image.dtype)
    vol = torch.cat([image, onehot], dim=1)
    if n > 1:
        vol = vol.expand(n, *vol.shape[1:])
    if chain.transforms or src != out:
        vol = warp_chain(vol, src, chain, out)
    img = vol[:, :1].contiguous()
    oh = vol[:, 1:]
    lab = oh.argmax(1, keepdim=True)
    lab = torch.where(oh.sum(1, keepdim=True) < 0.5, torch.zeros_like(lab), lab).to(torch.uint8)
    return img, lab


def make_pair(
    subject: Subject,
    moving_contrast: str,
    fixed_contrast: str,
    motion,
    grid: Grid | None = None,
    rng=None,
    device=None,
    control_spacing_mm: float = DEFAULT_CONTROL_SPACING_MM,
) -> Pair:
    """Build a pair with exact ground truth on the model ``grid`` (default the subject's grid; both
    grids are centred on the subject's centre, so their model frames coincide).

    ``motion``: a :class:`TransformChain`, a single :class:`Transform`, or a kind
    (``rigid | bspline | hybrid | identity``) drawn with :func:`sample_motion` from ``rng``.
    The moving image is ``S_moving_contrast`` on ``grid``; the fixed image is
    ``S_fixed_contrast(phi(x))``. Labels follow the same maps (one-hot, trilinear, arg-max).
    On the subject's own grid ``warp_chain(pair.moving, grid, pair.chain, grid) == pair.fixed`` (same
    contrast); on another grid both images are trilinear samples of the subject (no anti-aliasing),
    so the identity holds only up to interpolation: use a bank generated at the model spacing.
    A chain with batch ``N`` gives ``N`` pairs of the same subject.
    """
    grid = grid or subject.grid
    if isinstance(motion, str):
        chain = sample_motion(_as_rng(rng), motion, grid, control_spacing_mm=control_spacing_mm)
    elif isinstance(motion, Transform):
        chain = TransformChain([motion])
    elif isinstance(motion, TransformChain):
        chain = motion
    else:
        raise TypeError(f"motion must be a TransformChain, a Transform or a kind, got {type(motion).__name__}")
    if device is not None:
        chain = TransformChain([_to_device(t, device) for t in chain.transforms])
    n = _chain_batch(chain)
    labels = subject.labels_tensor(device)
    with torch.no_grad():
        fixed, fixed_lab = _resample_with_labels(
            subject.tensor(fixed_contrast, device), labels, subject.grid, chain, grid, n
        )
        moving, moving_lab = _resample_with_labels(
            subject.tensor(moving_contrast, device), labels, subject.grid, TransformChain(), grid, n
        )
    return Pair(
        fixed=fixed,
        moving=moving,
        fixed_labels=fixed_lab,
        moving_labels=moving_lab,
        chain=chain,
        grid=grid,
        fixed_contrast=fixed_contrast,
        moving_contrast=moving_contrast,
        subject_id=subject.subject_id,
    )


def _to_device(t: Transform, device) -> Transform:
    if isinstance(t, RigidTransform):
        return RigidTransform(t.state.to(device))
    if isinstance(t, BSplineTransform):
        return BSplineTransform(t.state.to(device), t.lattice)
    t = type(t)(t.state.to(device), t.grid)  # DenseTransform
    return t
