"""Training data of the translation model: paired multi-contrast stacks from a subject bank (:class:`SlicePool`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .networks import STACK, _pad_to
from .slices import _rigid_warp, _shifted_stack, extract_stacks, sample_slice_positions

__all__ = ["SlicePool", "PairedBatch"]


class SlicePool:
    """Paired multi-contrast 5-slice stacks drawn from a :class:`msode_train.data.SubjectBank`.

    ``slots`` volumes ``(4, D, H, W)`` (all contrasts of one subject, float16) stay in memory; every
    ``refresh_every`` draws one slot is replaced by a random subject in a random pose: with probability
    ``p_rotate`` a rigid motion (U(-max_rot_deg, max_rot_deg) per axis, U(-10, 10) mm), applied to all
    contrasts at once, so stacks are also seen in oblique orientations (as warped images are during
    registration); otherwise the subject as is. :meth:`draw` returns a paired batch: the same
    subject, axis and positions in two different contrasts.
    """

    def __init__(
        self,
        bank,
        slots: int = 16,
        refresh_every: int = 10,
        p_rotate: float = 0.5,
        max_rot_deg: float = 45.0,
        central_fraction: float = 0.7,
        gamma: float = 0.2,
        seed: int = 0,
        modalities: Sequence[str] = ("t1", "t2", "flair", "pd"),
    ):
        self.bank = bank
        self.modalities = tuple(modalities)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.refresh_every = int(refresh_every)
        self.p_rotate = float(p_rotate)
        self.max_rot_deg = float(max_rot_deg)
        self.central_fraction = float(central_fraction)
        self.gamma = float(gamma)
        self.n_draws = 0
        n = min(int(slots), len(bank))
        order = self.rng.permutation(len(bank))[:n]
        self.vols = [self._load(int(i), rotate=False) for i in order]

    def _load(self, i: int, rotate: bool) -> torch.Tensor:
        subj = self.bank[i]
        vol = torch.cat([subj.tensor(m) for m in self.modalities], dim=1)  # (1, 4, D, H, W)
        if rotate:
            rot = np.deg2rad(self.rng.uniform(-self.max_rot_deg, self.max_rot_deg, 3))
            trans = self.rng.uniform(-10.0, 10.0, 3)
            theta = torch.tensor(np.concatenate([rot, trans])[None], dtype=torch.float32)
            with torch.no_grad():
                vol = _rigid_warp(vol, subj.grid, theta)
        return vol[0].to(torch.float16)

    def refresh(self) -> None:
        slot = int(self.rng.integers(len(self.vols)))
        i = int(self.rng.integers(len(self.bank)))
        self.vols[slot] = self._load(i, rotate=bool(self.rng.random() < self.p_rotate))

    def draw(self, batch: int, axis: int | None = None, crop: int | None = None):
        """``(xa, a, xb, b)``: stacks ``(B, 5, h, w)`` in [0, 1] and modality indices ``(B,)``, a != b.
        ``crop``: random in-plane crop size (multiple of 8; ``None`` = the whole slice, padded to a
        multiple of 8)."""
        d = self.draw_batch(batch, axis=axis, crop=crop)
        return d.xa, d.a, d.xb, d.b

    def draw_batch(
        self, batch: int, axis: int | None = None, crop: int | None = None, shift_vox: float = 0.0
    ) -> "PairedBatch":
        """A :class:`PairedBatch`; with ``shift_vox > 0`` it also holds ``xa`` resampled (trilinear, in 3-D)
        at ``+delta`` and ``-delta`` voxels, ``delta`` a random direction per sample with length
        U(0.25, 1) * ``shift_vox`` (through-plane components included), for :func:`shift_symmetry`.
        Same random stream as :meth:`draw` when ``shift_vox == 0``."""
        self.n_draws += 1
        if self.refresh_every > 0 and self.n_draws % self.refresh_every == 0:
            self.refresh()
        if axis is None:
            axis = int(self.rng.integers(3))
        shape = self.vols[0].shape[1:]
        xa, xb, ma, mb, xp, xm, deltas = [], [], [], [], [], [], []
        n_mod = len(self.modalities)
        for _ in range(batch):
            v = self.vols[int(self.rng.integers(len(self.vols)))]
            pos = sample_slice_positions(shape, 3, self.gen, self.central_fraction)[axis][1][:1]
            st = extract_stacks(v[None].float(), axis, pos)  # (1, 4*5, h, w)
            st = st.view(n_mod, STACK, *st.shape[-2:])
            a = int(self.rng.integers(n_mod))
            b = int((a + 1 + self.rng.integers(n_mod - 1)) % n_mod)
            sa, sb = st[a], st[b]
            h, w = sa.shape[-2:]
            y0, x0, ch, cw = 0, 0, h, w
            if crop is not None:  # a random crop with at least 15 % brain (up to 20 tries)
                ch, cw = min(crop, h), min(crop, w)
                fg = (st.amax(0) > 0.02).float().mean(0)  # (h, w) brain indicator, any contrast
                for _ in range(20):
                    y0, x0 = int(self.rng.integers(h - ch + 1)), int(self.rng.integers(w - cw + 1))
                    if float(fg[y0 : y0 + ch, x0 : x0 + cw].mean()) >= 0.15:
                        break
                sa, sb = sa[:, y0 : y0 + ch, x0 : x0 + cw], sb[:, y0 : y0 + ch, x0 : x0 + cw]
            shifted = []
            if shift_vox > 0:
                u = self.rng.normal(size=3)
                delta = u / max(np.linalg.norm(u), 1e-12) * shift_vox * self.rng.uniform(0.25, 1.0)
                deltas.append(delta)
                shifted = [
                    _shifted_stack(v[a], axis, int(pos[0]), (y0, x0, ch, cw), sgn * delta) for sgn in (1.0, -1.0)
                ]
            flip_w, flip_h = self.rng.random() < 0.5, self.rng.random() < 0.5
            group = [sa, sb, *shifted]
            if flip_w:  # in-plane flips: orientation-agnostic content
                group = [g.flip(-1) for g in group]
            if flip_h:
                group = [g.flip(-2) for g in group]
            if self.gamma > 0:
                ga, gb = np.exp(self.rng.uniform(-self.gamma, self.gamma, 2))
                gammas = [ga, gb] + [ga] * len(shifted)  # shifted copies of x_a keep x_a's gamma
                group = [g.clamp_min(0).pow(float(gm)) for g, gm in zip(group, gammas)]
            xa.append(group[0]), xb.append(group[1]), ma.append(a), mb.append(b)
            if shifted:
                xp.append(group[2]), xm.append(group[3])

        def stack8(items):
            return _pad_to(torch.stack(items), 8)[0] if items else None

        return PairedBatch(
            xa=stack8(xa),
            a=torch.tensor(ma),
            xb=stack8(xb),
            b=torch.tensor(mb),
            xa_plus=stack8(xp),
            xa_minus=stack8(xm),
            delta_vox=torch.tensor(np.array(deltas), dtype=torch.float32) if deltas else None,
        )


@dataclass
class PairedBatch:
    """One training batch of :class:`SlicePool`: paired stacks ``xa``/``xb`` ``(B, 5, h, w)`` in [0, 1] of
    modalities ``a``/``b`` ``(B,)``; optionally ``xa_plus``/``xa_minus`` (``x_a``'s contrast resampled at
    ``+-delta_vox``, ``(B, 3)`` voxel offsets in the volume's (D, H, W) index order)."""

    xa: torch.Tensor
    a: torch.Tensor
    xb: torch.Tensor
    b: torch.Tensor
    xa_plus: torch.Tensor | None = None
    xa_minus: torch.Tensor | None = None
    delta_vox: torch.Tensor | None = None
