"""One subject: co-registered contrasts, labels and masks on one RAS grid (see :mod:`msode_train.data`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch

from msode_sdk.io import array_to_tensor
from msode_sdk.transforms import Grid

__all__ = ["LABELS", "TUMOUR_LABELS", "Subject"]

LABELS = {
    0: "background",
    1: "csf",
    2: "gm",
    3: "wm",
    4: "oedema",
    5: "tumour_core",
    6: "enhancing_tumour",
    7: "brain_unknown_tissue",
}
TUMOUR_LABELS = (4, 5, 6)


@dataclass
class Subject:
    """One subject: co-registered contrasts on one axis-aligned RAS grid.

    ``images``: contrast -> float32 ``(X, Y, Z)`` in [0, 1]; ``labels``: uint8 ``(X, Y, Z)`` (see
    ``LABELS``); ``tumour``/``brain``: bool masks; ``affine``: voxel -> world RAS mm.
    """

    images: dict
    labels: np.ndarray
    affine: np.ndarray
    subject_id: str = "subject"
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def tumour(self) -> np.ndarray:
        return np.isin(self.labels, TUMOUR_LABELS)

    @property
    def brain(self) -> np.ndarray:
        return self.labels > 0

    @property
    def contrasts(self) -> tuple:
        return tuple(self.images)

    @property
    def shape(self) -> tuple:
        return tuple(self.labels.shape)

    @property
    def spacing(self) -> tuple:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def grid(self) -> Grid:
        """The SDK grid of this subject (its model frame is ``world - centre_ras``)."""
        return Grid(self.shape, self.spacing)

    @property
    def centre_ras(self) -> np.ndarray:
        c = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine[:3, :3] @ c + self.affine[:3, 3]

    def tensor(self, contrast: str, device=None) -> torch.Tensor:
        """``(1, 1, D, H, W)`` float32 tensor of one contrast."""
        if contrast not in self.images:
            raise KeyError(f"subject {self.subject_id} has no contrast {contrast!r}; it has {list(self.images)}")
        return array_to_tensor(self.images[contrast], device)

    def labels_tensor(self, device=None) -> torch.Tensor:
        """``(1, 1, D, H, W)`` uint8 label tensor."""
        return torch.from_numpy(np.ascontiguousarray(self.labels.transpose(2, 1, 0))).to(device)[None, None]

    def to_nifti(self, contrast: str) -> nib.Nifti1Image:
        arr = self.labels if contrast == "labels" else self.images[contrast]
        img = nib.Nifti1Image(np.asarray(arr), self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img
