"""Real data: BraTS-style folders as :class:`~msode_train.data.subject.Subject` s (:func:`load_brats_folder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

from .subject import Subject

__all__ = ["BRATS_CONTRASTS", "load_brats_folder"]

BRATS_CONTRASTS = ("t1", "t1ce", "t2", "flair")
_BRATS_LABEL_MAP = {1: 5, 2: 4, 4: 6, 3: 6}  # NCR/NET -> core, ED -> oedema, ET (4; 3 in BraTS 2023) -> enhancing


def _find(folder: Path, sid: str, key: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{sid}_{key}{ext}"
        if p.exists():
            return p
    return None


def _robust01(arr: np.ndarray, brain: np.ndarray, pct=(0.5, 99.5)) -> np.ndarray:
    vals = arr[brain] if brain.any() else arr.ravel()
    lo, hi = np.percentile(vals, pct)
    if not hi > lo:
        lo, hi = float(vals.min()), float(vals.max())
    out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-6))
    out = np.clip(out, 0.0, 1.0)
    out[~brain] = 0.0
    return out


def load_brats_folder(root, contrasts: Sequence[str] = BRATS_CONTRASTS, pct=(0.5, 99.5)) -> Iterator[Subject]:
    """Yield a :class:`Subject` per ``<root>/<id>/`` folder holding ``<id>_{t1,t1ce,t2,flair,seg}.nii[.gz]``.

    Missing contrasts are tolerated (a folder without any is skipped); every image is reoriented to
    the closest canonical RAS orientation (oblique data keep their affine and are treated as axis
    aligned by ``Subject.grid``, ``meta['oblique']`` says so); all images of a subject must share one
    grid (BraTS data are co-registered). Brain = any contrast non-zero; intensities are normalised
    per contrast (``pct`` percentiles inside the brain -> 0 and 1, clipped, background 0). Labels
    from ``seg``: BraTS 1 (necrotic/non-enhancing core) -> 5, 2 (oedema) -> 4, 4 (enhancing; 3 in
    BraTS 2023) -> 6; other brain voxels -> 7 (tissue class unknown); no ``seg`` -> no tumour labels.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS folder not found: {root}")
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        sid = folder.name
        images, affine, shape = {}, None, None
        for key in (*contrasts, "seg"):
            path = _find(folder, sid, key)
            if path is None:
                continue
            img = nib.as_closest_canonical(nib.load(str(path)))
            arr = np.asanyarray(img.dataobj)
            while arr.ndim > 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim != 3:
                raise ValueError(f"{path}: expected a 3-D image, got shape {arr.shape}")
            if affine is None:
                affine, shape = img.affine, arr.shape
            elif arr.shape != shape or not np.allclose(img.affine, affine, atol=1e-3):
                raise ValueError(
                    f"{path}: grid differs from the other images of {sid} "
                    f"(shape {arr.shape} vs {shape}); BraTS images must be co-registered"
                )
            images[key] = arr
        seg = images.pop("seg", None)
        if not images:
            continue
        brain = np.zeros(shape, dtype=bool)
        for arr in images.values():
            brain |= np.asarray(arr) != 0
        labels = np.where(brain, 7, 0).astype(np.uint8)
        if seg is not None:
            seg = np.rint(np.asarray(seg)).astype(np.int64)
            for src, dst in _BRATS_LABEL_MAP.items():
                labels[seg == src] = dst
        out = {c: _robust01(np.asarray(a, dtype=np.float32), brain, pct) for c, a in images.items()}
        direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        meta = {
            "source": str(folder),
            "contrasts_found": list(out),
            "has_seg": seg is not None,
            "oblique": bool(not np.allclose(direction, np.eye(3), atol=1e-4)),
        }
        yield Subject(
            images=out, labels=labels, affine=np.asarray(affine, dtype=np.float64), subject_id=sid, seed=None, meta=meta
        )
