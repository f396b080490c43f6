"""The registration similarity ``L_sim`` (paper eq. 4): content codes of multi-slice stacks of both
volumes, compared at the same positions (:class:`ContentSimilarity`, :func:`content_similarity`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import code_distance
from .networks import STACK, ContentEncoder, _pad_to
from .slices import extract_stacks, sample_slice_positions
from .weights import DEFAULT_WEIGHTS, load_translation_model

__all__ = ["E3DContent", "ContentSimilarity", "content_similarity"]


class E3DContent(nn.Module):
    """``E^c_3D``: the content codes of 5-slice stacks of a volume on all three axes.

    ``forward(vol (N, 1, D, H, W), positions)`` -> list of ``(N, S_axis, content_dim, h', w')``
    tensors (one per axis in ``positions``, from :func:`sample_slice_positions`). Inputs are
    zero-padded to a multiple of 4 in-plane (the encoder's downsampling factor).
    """

    def __init__(self, encoder: ContentEncoder, stack: int = STACK):
        super().__init__()
        self.encoder = encoder
        self.stack = stack

    def forward(self, vol: torch.Tensor, positions) -> list:
        if vol.ndim != 5 or vol.shape[1] != 1:
            raise ValueError(f"E3DContent expects (N, 1, D, H, W), got {tuple(vol.shape)}")
        n = vol.shape[0]
        feats = []
        for axis, centres in positions:
            st = extract_stacks(vol, axis, centres, self.stack)
            st, (h, w) = _pad_to(st, 4)
            f = self.encoder(st)
            feats.append(f.view(n, centres.numel(), *f.shape[1:]))
        return feats


class ContentSimilarity(nn.Module):
    """``L_sim(warped, fixed) = mean ||E3D(warped) - E3D(fixed)||^2`` (paper eq. 4).

    * ``n_slices`` stacks per call, split over the three axes; the same positions for both images;
    * positions come from an internal ``torch.Generator`` seeded with ``seed``: each call draws new
      positions (a deterministic sequence; :meth:`reset` restarts it) unless ``resample=False``, in
      which case the first draw for a volume shape is reused for every later call; a ``generator``
      passed to the call overrides both;
    * ``spacing_mm``: the isotropic spacing of the volumes given to the call; when it differs from the
      spacing the encoder was trained at, volumes are resampled (trilinear) to it first;
    * ``reduction``: ``"mean"`` (scalar) or ``"none"`` (``(N,)``, one value per batch member).

    The encoder is frozen (no parameter gradients) and follows the input's device and dtype.
    """

    def __init__(
        self,
        encoder: ContentEncoder,
        n_slices: int = 24,
        seed: int = 0,
        resample: bool = True,
        central_fraction: float = 0.7,
        spacing_mm: float | None = None,
        trained_spacing_mm: float = 2.0,
        reduction: str = "mean",
        name: str = "",
    ):
        super().__init__()
        if n_slices < 1:
            raise ValueError("n_slices must be >= 1")
        if reduction not in ("mean", "none"):
            raise ValueError(f"unknown reduction {reduction!r}; valid: ['mean', 'none']")
        self.e3d = E3DContent(encoder)
        for p in self.e3d.parameters():
            p.requires_grad_(False)
        self.e3d.eval()
        self.n_slices = int(n_slices)
        self.seed = int(seed)
        self.resample = bool(resample)
        self.central_fraction = float(central_fraction)
        self.spacing_mm = spacing_mm
        self.trained_spacing_mm = float(trained_spacing_mm)
        self.reduction = reduction
        self.name = name
        self._gen = torch.Generator().manual_seed(self.seed)
        self._fixed_positions: dict = {}

    def train(self, mode: bool = True):  # the encoder always stays in eval mode
        super().train(mode)
        self.e3d.eval()
        return self

    def reset(self) -> None:
        """Restart the position sequence (and forget positions reused with ``resample=False``)."""
        self._gen = torch.Generator().manual_seed(self.seed)
        self._fixed_positions.clear()

    def _prepare(self, vol: torch.Tensor) -> torch.Tensor:
        if self.spacing_mm is not None and abs(float(self.spacing_mm) - self.trained_spacing_mm) > 1e-6:
            f = float(self.spacing_mm) / self.trained_spacing_mm
            size = [max(STACK, int(round(n * f))) for n in vol.shape[2:]]
            vol = F.interpolate(vol, size=size, mode="trilinear", align_corners=False)
        return vol

    def positions(self, shape_dhw, generator: torch.Generator | None = None) -> list:
        shape_dhw = tuple(int(v) for v in shape_dhw)
        if generator is not None:
            return sample_slice_positions(shape_dhw, self.n_slices, generator, self.central_fraction)
        if not self.resample:
            if shape_dhw not in self._fixed_positions:
                self._fixed_positions[shape_dhw] = sample_slice_positions(
                    shape_dhw, self.n_slices, self._gen, self.central_fraction
                )
            return self._fixed_positions[shape_dhw]
        return sample_slice_positions(shape_dhw, self.n_slices, self._gen, self.central_fraction)

    def features(self, vol: torch.Tensor, positions) -> list:
        enc = self.e3d.encoder
        p = next(enc.parameters())
        if p.device != vol.device or p.dtype != vol.dtype:
            self.e3d.to(device=vol.device, dtype=vol.dtype)
        return self.e3d(vol, positions)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, generator: torch.Generator | None = None):
        if warped.shape[2:] != fixed.shape[2:] or warped.ndim != 5:
            raise ValueError(
                f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must be (N, 1, D, H, W) on one grid"
            )
        if fixed.shape[0] != warped.shape[0]:
            fixed = fixed.expand(warped.shape[0], *fixed.shape[1:])
        w, f = self._prepare(warped), self._prepare(fixed)
        pos = self.positions(w.shape[2:], generator)
        fw, ff = self.features(w, pos), self.features(f, pos)
        per = [code_distance(a, b) * a[0].numel() for a, b in zip(fw, ff)]
        count = sum(a[0].numel() for a in fw)
        loss = sum(per) / count  # (N,): mean over all feature elements of all stacks
        return loss.mean() if self.reduction == "mean" else loss


def content_similarity(
    name_or_path=DEFAULT_WEIGHTS,
    n_slices: int = 24,
    seed: int = 0,
    resample: bool = True,
    central_fraction: float = 0.7,
    spacing_mm: float | None = None,
    reduction: str = "mean",
    device=None,
) -> ContentSimilarity:
    """The registration similarity ``(warped, fixed) -> loss`` from committed content weights.

    ``name_or_path``: a name in ``training/msode_train/weights/`` (default, or ``None``:
    :data:`DEFAULT_WEIGHTS`) or a path to a ``.pt`` file written by :func:`save_weights`. See
    :class:`ContentSimilarity` for the rest.
    """
    model = load_translation_model(name_or_path)
    sim = ContentSimilarity(
        model.enc_c,
        n_slices=n_slices,
        seed=seed,
        resample=resample,
        central_fraction=central_fraction,
        spacing_mm=spacing_mm,
        trained_spacing_mm=float(model.cfg.spacing_mm),
        reduction=reduction,
        name=str(name_or_path or DEFAULT_WEIGHTS),
    )
    if device is not None:
        sim.to(device)
    return sim
