"""Training and test data: multi-contrast synthetic subjects, motion simulators, metrics, BraTS loader.

Anatomy
    The ICBM 2009c nonlinear symmetric template (T1 and GM/WM probability maps) that ships *inside*
    the ``nilearn`` wheel (``nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz``,
    1 mm, 197x233x189, skull-stripped). The files are read directly with nibabel (0.1 s, and no 2 s
    ``import nilearn``); ``nilearn.datasets.load_mni152_*`` read the very same packaged files, and
    nothing is ever downloaded. Brain mask = template T1 > 0.2 of its maximum (exactly nilearn's
    ``load_mni152_brain_mask``); CSF = mask - GM - WM, clipped at 0.

Subjects (:func:`synthesize_subject`)
    World space is MNI-like RAS mm. A subject lives on a BraTS-like 240x240x160 mm field of view,
    centred at ``TEMPLATE_CENTRE_RAS`` (the template brain's bounding-box centre in x and y, raised
    5 mm in z so the vertex keeps ~8 mm margin; the template's own brain-stem cut sits at the
    bottom), with isotropic ``spacing`` (1 mm -> 240x240x160, 2 mm -> 120x120x80, 4 mm -> 60x60x40).
    The coarser grids are generated *directly* (the template is box-averaged by round(spacing) first,
    which is also the partial-volume model), not by downsampling a 1 mm subject. The model frame of
    a subject (SDK convention, mm relative to the grid centre) is ``world - TEMPLATE_CENTRE_RAS``.

    Steps, each drawn from its own child stream of ``SeedSequence(seed)`` (so a subject's anatomy,
    tumour and bias do not depend on the grid spacing or on which contrasts are requested):

    1. anatomical variation: subject point ``x`` shows the template at ``C + (x + u(x)) / s``:
       ``u`` a cubic B-spline (40 mm control spacing, coefficients N(0, 5^2) mm, i.e. ~3 mm RMS
       displacement, ~7 mm at most; measured) and ``s`` a per-axis global scale in U(0.94, 1.06);
    2. tumour: centre at a random template voxel with WM > 0.9 above MNI z = -10 (supratentorial
       white matter), core radius U(8, 15) mm, oedema radius core + U(5, 12) mm (so 13-27 mm), an
       ellipsoid of random orientation and axis ratios U(0.8, 1.25), boundaries modulated by smooth
       noise (10 mm lattice, +-25-30 %), and a mass effect that pushes the surrounding anatomy
       outwards (radial compression of the template by up to 40 % at the centre, Gaussian fall-off
       with the oedema radius). Core replaces all tissue; oedema replaces parenchyma (GM/WM), not CSF;
    3. intensities: tissue-mixture (partial-volume) sums of per-class means (``CLASS_MEANS``, each
       randomised by U(-0.05, 0.05) per subject), with texture inside the core;
    4. partial-volume smoothing: Gaussian, sigma 0.5 voxel;
    5. bias: multiplicative ``exp(a n(x))``, ``n`` smooth unit-std noise on a 60 mm lattice,
       ``a`` in U(0.05, 0.08) per contrast (about +-10-16 % at 2 sigma);
    6. Rician noise ``|I + sigma (n1 + i n2)|`` with sigma U(1, 3) % of the maximum, inside the brain
       only: outside the brain the image is 0, as in skull-stripped BraTS data;
    7. per-contrast normalisation: the 99.5th percentile inside the brain -> 1, clipped to [0, 1].

    Labels: 0 background, 1 CSF, 2 GM, 3 WM, 4 oedema, 5 tumour core (6 enhancing tumour and 7
    "brain, tissue unknown" appear only in real data from :func:`load_brats_folder`). Brain mask =
    template-mask fraction > 0.5; label = arg-max of the class fractions inside it. The tumour mask is
    the whole tumour (labels 4, 5, 6), BraTS's "WT".

    Measured on this project's 2 shared CPU cores (torch 2.13 CPU, 2 threads, other jobs running):
    1 mm 240x240x160, four contrasts: 9-12 s; 2 mm 120x120x80: 0.6-0.9 s; 4 mm: ~0.08 s (plus 0.5 s
    once per process to read the template). A cached 2 mm subject is a 2.6 MB ``.npz`` that loads in
    ~0.03 s (see :class:`SubjectBank`).

Motions (paper, section 6 of DESIGN.md), as SDK transforms in the model frame (mm, centre-relative,
mapping *fixed* points to *moving* points): rigid U(-75, 75) deg per axis and U(-20, 20) mm;
B-spline coefficients N(0, 8^2) mm on a lattice of ``DEFAULT_CONTROL_SPACING_MM`` = 40 mm (the paper
does not state its spacing; at 40 mm and 8 mm std the map has ~4.5 mm RMS displacement and, over 20
draws on the 2 mm grid, a smallest Jacobian determinant of 0.51 (median of the per-draw minima 0.63),
so no folding; at 20 mm the minima drop to 0.13-0.23); hybrid U(-40, 40) deg,
U(-10, 10) mm, then the B-spline: ``phi(x) = R (x + u(x) + t)`` (SDK chain [rigid, bspline]).

Pairs (:func:`make_pair`) make the ground truth exact by construction: the moving image is the
subject itself, the fixed image is the subject pulled back through the ground-truth map,
``fixed(x) = S_fixed_contrast(phi(x))`` (trilinear, zero outside, via ``msode_sdk.warp.warp_chain``),
so ``warp_chain(moving, grid, chain, grid)`` reproduces the fixed image (exactly, for the same
contrast on the subject's own grid). Label maps are warped by one-hot encoding, warping all channels
with the same trilinear ``warp_chain`` and taking the arg-max (so labels and images use the very
same sampling points; voxels that map outside the volume get label 0).

Layouts: numpy arrays are NIfTI ``(X, Y, Z)``; torch tensors are ``(N, C, D, H, W)`` with ``D = Z``.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from msode_sdk.io import array_to_tensor
from msode_sdk.transforms import (BSplineLattice, BSplineTransform, Grid, RigidTransform, Transform, euler_to_rigid,
                                  TransformChain)
from msode_sdk.warp import sample_points, warp_chain

__all__ = [
    "GENERATOR_VERSION",
    "CONTRASTS",
    "FOV_MM",
    "LABELS",
    "TUMOUR_LABELS",
    "CLASS_MEANS",
    "TEMPLATE_CENTRE_RAS",
    "DEFAULT_CONTROL_SPACING_MM",
    "SPLIT_SEED_BASE",
    "SAMPLE_SEED",
    "GENERATION_SECONDS",
    "Subject",
    "load_template",
    "synthesize_subject",
    "SubjectBank",
    "split_seeds",
    "assert_disjoint",
    "motion_lattice",
    "sample_rigid",
    "sample_bspline",
    "sample_hybrid",
    "sample_motion",
    "MOTION_KINDS",
    "Pair",
    "make_pair",
    "dice",
    "rmse_x",
    "rmse_phi",
    "load_brats_folder",
    "BRATS_CONTRASTS",
]

# Bump whenever synthesis output changes: it is part of every bank cache key.
GENERATOR_VERSION = 1

CONTRASTS = ("t1", "t2", "flair", "pd")
FOV_MM = (240, 240, 160)

LABELS = {0: "background", 1: "csf", 2: "gm", 3: "wm", 4: "oedema", 5: "tumour_core",
          6: "enhancing_tumour", 7: "brain_unknown_tissue"}
TUMOUR_LABELS = (4, 5, 6)

# Mean intensity per class (csf, gm, wm, oedema, tumour core) before bias/noise/normalisation.
# T1: WM > GM > CSF, core dark. T2: CSF > GM > WM, oedema/core bright. FLAIR: T2-like with dark CSF,
# oedema brightest. PD: flat-ish, CSF bright-ish.
CLASS_MEANS = {
    "t1": (0.25, 0.55, 0.80, 0.45, 0.30),
    "t2": (0.95, 0.55, 0.38, 0.80, 0.68),
    "flair": (0.10, 0.55, 0.42, 0.90, 0.62),
    "pd": (0.85, 0.72, 0.60, 0.82, 0.75),
}
_CLASS_JITTER = 0.05

# World (MNI RAS mm) point at the centre of every synthetic subject's grid.
TEMPLATE_CENTRE_RAS = (0.0, -17.0, 10.0)

DEFAULT_CONTROL_SPACING_MM = 40.0
_ANAT_CONTROL_SPACING_MM = 40.0
_ANAT_STD_MM = 5.0
_ANAT_SCALE = (0.94, 1.06)
_TUMOUR_NOISE_SPACING_MM = 10.0
_BIAS_SPACING_MM = 60.0

# Disjoint seed ranges per split: split_seeds("train", n) = 0..n-1, "test" = 10000.., "val" = 20000..
SPLIT_SEED_BASE = {"train": 0, "test": 10_000, "val": 20_000}
_SPLIT_SIZE = 10_000
SAMPLE_SEED = 90_000  # the held-out subject of data/sample (outside every split)

# Wall-clock seconds of synthesize_subject (all four contrasts) measured on the project's 2 shared
# CPU cores, torch 2.13 CPU (shared with other jobs); indicative only.
GENERATION_SECONDS = {1.0: 10.0, 2.0: 0.7, 4.0: 0.08}


# ------------------------------------------------------------------------------------------ template


def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed: it carries the ICBM 2009 template (pip install nilearn)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@functools.lru_cache(maxsize=1)
def load_template() -> dict:
    """The packaged 1 mm ICBM 2009 maps as float32 ``(X, Y, Z)`` arrays in [0, 1]: ``t1``, ``gm``,
    ``wm``, ``mask`` (T1 > 0.2), ``csf`` (mask - GM - WM, clipped at 0), and ``affine`` (RAS)."""
    d = _template_dir()
    out = {}
    affine = None
    for key, name in _TEMPLATE_FILES.items():
        path = d / name
        if path.exists():
            img = nib.load(str(path))
            arr = np.asarray(img.dataobj, dtype=np.float32)
            arr /= max(float(arr.max()), 1e-6)
        else:  # a nilearn layout we do not know: its own loaders (they read packaged files too)
            from nilearn import datasets

            loader = {"t1": datasets.load_mni152_template, "gm": datasets.load_mni152_gm_template,
                      "wm": datasets.load_mni152_wm_template}[key]
            img = loader(resolution=1)
            arr = np.asarray(img.get_fdata(), dtype=np.float32)
        if not np.allclose(np.abs(img.affine[:3, :3]), np.diag(np.abs(np.diag(img.affine[:3, :3])))) or \
                np.any(np.diag(img.affine[:3, :3]) <= 0):
            img = nib.as_closest_canonical(img)
            arr = np.asarray(img.dataobj, dtype=np.float32) / max(float(np.max(img.dataobj)), 1e-6)
        affine = img.affine if affine is None else affine
        out[key] = np.clip(arr, 0.0, 1.0)
    out["mask"] = (out["t1"] > 0.2).astype(np.float32)
    out["csf"] = np.clip(out["mask"] - out["gm"] - out["wm"], 0.0, 1.0)
    out["affine"] = np.asarray(affine, dtype=np.float64)
    return out


@functools.lru_cache(maxsize=4)
def _template_volume(factor: int):
    """``(1, 3, D, H, W)`` [gm, wm, mask] box-averaged by ``factor``, its Grid, and the world point of
    that grid's centre."""
    t = load_template()
    vol = torch.cat([array_to_tensor(t[k]) for k in ("gm", "wm", "mask")], dim=1)
    if factor > 1:
        vol = F.avg_pool3d(vol, factor, stride=factor)
    shape_xyz = (vol.shape[4], vol.shape[3], vol.shape[2])
    spacing = np.diag(t["affine"][:3, :3])
    grid = Grid(shape_xyz, tuple(float(s) * factor for s in spacing))
    # pooled voxel i covers original voxels factor*i .. factor*i+factor-1
    centre_vox = np.array([factor * (n - 1) / 2.0 + (factor - 1) / 2.0 for n in shape_xyz])
    centre = t["affine"][:3, :3] @ centre_vox + t["affine"][:3, 3]
    return vol.contiguous(), grid, centre


@functools.lru_cache(maxsize=1)
def _tumour_centre_candidates() -> np.ndarray:
    """World RAS points of template voxels with WM > 0.9, inside the mask, above MNI z = -10."""
    t = load_template()
    ijk = np.argwhere((t["wm"] > 0.9) & (t["mask"] > 0.5))
    world = ijk @ t["affine"][:3, :3].T + t["affine"][:3, 3]
    return world[world[:, 2] > -10.0]


# ------------------------------------------------------------------------------------------ subject


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


def _grid_affine(shape_xyz, spacing: float, centre) -> np.ndarray:
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = np.asarray(centre, dtype=np.float64) - spacing * (np.asarray(shape_xyz, dtype=np.float64) - 1) / 2.0
    return a


def _smooth_noise(rng: np.random.Generator, grid: Grid, spacing_mm: float, channels: int) -> torch.Tensor:
    """``(1, C, D, H, W)`` smooth noise of unit std: cubic B-spline of N(0, 1) control values."""
    lat = BSplineLattice(grid, (spacing_mm,) * 3)
    coeffs = torch.from_numpy(rng.standard_normal((1, channels, *lat.coeff_shape[1:])).astype(np.float32))
    f = lat.displacement_on(coeffs, grid)
    return f / f.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)


def _blur(vol: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel of ``(1, C, D, H, W)`` (sigma in voxels)."""
    radius = max(1, int(math.ceil(3.0 * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=vol.dtype)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    k = k / k.sum()
    c = vol.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        weight = k.reshape(shape).expand(c, *shape[1:]).contiguous()
        vol = F.conv3d(F.pad(vol, pad, mode="replicate"), weight, groups=c)
    return vol


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def synthesize_subject(seed: int, grid_shape=FOV_MM, spacing: float = 1.0,
                       contrasts: Sequence[str] = CONTRASTS, tumour: bool = True) -> Subject:
    """Synthesise one multi-contrast subject (see the module docstring for every step).

    ``grid_shape`` is the grid at 1 mm, i.e. the field of view in mm (default BraTS-like 240x240x160);
    the arrays have shape ``round(grid_shape / spacing)`` (2 mm -> 120x120x80), generated directly at
    that spacing. Deterministic in ``seed``; the anatomy, tumour and bias of a seed are the same at
    every spacing and for every subset of ``contrasts`` (only the noise realisation differs).
    """
    t_start = time.perf_counter()
    spacing = float(spacing)
    if not (0.25 <= spacing <= 16.0):
        raise ValueError(f"spacing must be in [0.25, 16] mm, got {spacing}")
    contrasts = tuple(contrasts)
    unknown = [c for c in contrasts if c not in CLASS_MEANS]
    if unknown or not contrasts:
        raise ValueError(f"unknown contrasts {unknown}; synthetic contrasts are {list(CLASS_MEANS)}")
    seed = int(seed)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    streams = np.random.SeedSequence([seed, GENERATOR_VERSION]).spawn(8)
    rng_anat, rng_int, rng_tum, rng_tnoise, rng_bias, rng_noise = (np.random.default_rng(s) for s in streams[:6])

    shape = tuple(max(2, int(round(n / spacing))) for n in grid_shape)
    grid = Grid(shape, (spacing,) * 3)
    centre = np.asarray(TEMPLATE_CENTRE_RAS, dtype=np.float64)
    factor = max(1, int(round(spacing)))
    tvol, tgrid, tcentre = _template_volume(factor)

    # 1. anatomical variation: q(x) = (x + u(x)) / s, template-relative to the subject centre.
    scale = rng_anat.uniform(*_ANAT_SCALE, size=3)
    lat = BSplineLattice(grid, (_ANAT_CONTROL_SPACING_MM,) * 3)
    coeffs = torch.from_numpy(rng_anat.normal(0.0, _ANAT_STD_MM, (1, *lat.coeff_shape)).astype(np.float32))
    with torch.no_grad():
        q = BSplineTransform(coeffs, lat).map_grid(grid)[0]  # (D, H, W, 3)
        q /= torch.tensor(scale, dtype=torch.float32)

        # 2. tumour geometry (template coordinates relative to the subject centre).
        cands = _tumour_centre_candidates()
        tc = cands[rng_tum.integers(len(cands))] + rng_tum.uniform(-0.5, 0.5, 3) - centre
        r_core = rng_tum.uniform(8.0, 15.0)
        r_oed = r_core + rng_tum.uniform(5.0, 12.0)
        axes = rng_tum.uniform(0.8, 1.25, 3)
        rot = _random_rotation(rng_tum)
        mass = rng_tum.uniform(0.1, 0.4)
        core_amp, oed_amp = 0.25, 0.3
        tnoise = _smooth_noise(rng_tnoise, grid, _TUMOUR_NOISE_SPACING_MM, 3)[0]  # (3, D, H, W)

        # 3. intensity means per subject (drawn for every known contrast, in a fixed order).
        jitter = rng_int.uniform(-_CLASS_JITTER, _CLASS_JITTER, (len(CLASS_MEANS), 5))
        means = {c: np.asarray(CLASS_MEANS[c]) + jitter[i] for i, c in enumerate(CLASS_MEANS)}

        if tumour:
            v = q - torch.tensor(tc, dtype=torch.float32)
            # ellipsoid distance: rotate into the tumour frame, divide by the axis ratios
            a_mat = torch.tensor((rot / axes[None, :]).astype(np.float32))  # v @ rot / axes
            rho = torch.linalg.vector_norm(v @ a_mat, dim=-1)
            r_k = r_core * (1.0 + core_amp * tnoise[0]).clamp(0.5, 1.6)
            r_o = r_oed * (1.0 + oed_amp * tnoise[1]).clamp(0.5, 1.6)
            pk = ((r_k - rho) / spacing + 0.5).clamp(0.0, 1.0)
            po_region = ((r_o - rho) / spacing + 0.5).clamp(0.0, 1.0)
            # mass effect: the template is sampled closer to the tumour centre
            r2 = (v * v).sum(-1, keepdim=True)
            q = torch.tensor(tc, dtype=torch.float32) + v * (1.0 - mass * torch.exp(-r2 / (2.0 * r_oed ** 2)))
            del v, r2, rho, r_k, r_o

        # sample [gm, wm, mask] of the template at C + q
        q += torch.tensor(centre - tcentre, dtype=torch.float32)
        probs = sample_points(tvol, tgrid, q[None])[0]  # (3, D, H, W)
        del q
        g, w, b = probs[0], probs[1], probs[2]
        s = g + w
        fix = torch.where(s > b, b / s.clamp_min(1e-6), torch.ones_like(s))
        g, w = g * fix, w * fix
        c = (b - g - w).clamp_min(0.0)
        if tumour:
            keep = 1.0 - pk
            k = b * pk
            g, w, c = g * keep, w * keep, c * keep
            po = (po_region - pk).clamp_min(0.0)
            e = po * (g + w)
            g, w = g * (1.0 - po), w * (1.0 - po)
        else:
            k = e = torch.zeros_like(b)
        fracs = torch.stack((c, g, w, e, k))  # (5, D, H, W), sums to b
        brain = b > 0.5
        labels = torch.where(brain, fracs.argmax(0) + 1, torch.zeros((), dtype=torch.long)).to(torch.uint8)

        # 3. tissue-mixture intensities, texture inside the core
        mu = torch.tensor(np.stack([means[cn] for cn in contrasts]).astype(np.float32))  # (C, 5)
        img = torch.einsum("ck,kdhw->cdhw", mu, fracs)
        img += (0.15 * k * tnoise[2])[None] * mu[:, 4, None, None, None]
        del fracs, g, w, c, e, k, tnoise
        # 4. partial-volume smoothing
        img = _blur(img[None], 0.5)
        # 5. bias field (one per known contrast, in a fixed order)
        bias_all = _smooth_noise(rng_bias, grid, _BIAS_SPACING_MM, len(CLASS_MEANS))
        amp_all = rng_bias.uniform(0.05, 0.08, len(CLASS_MEANS))
        idx = [list(CLASS_MEANS).index(cn) for cn in contrasts]
        amp = torch.tensor(amp_all[idx].astype(np.float32))[None, :, None, None, None]
        img = img * torch.exp(amp * bias_all[:, idx])
        del bias_all
        # 6. Rician noise inside the brain only
        sig_all = rng_noise.uniform(0.01, 0.03, len(CLASS_MEANS))
        out = {}
        inside = (b / 0.5).clamp(0.0, 1.0)
        brain_np = None
        for ci, cn in enumerate(contrasts):
            clean = img[0, ci]
            sig = float(sig_all[idx[ci]]) * float(clean.max())
            n1 = torch.from_numpy(rng_noise.standard_normal(clean.shape, dtype=np.float32))
            n2 = torch.from_numpy(rng_noise.standard_normal(clean.shape, dtype=np.float32))
            noisy = torch.sqrt((clean + sig * n1) ** 2 + (sig * n2) ** 2)
            vol = clean + (noisy - clean) * inside
            del n1, n2, noisy
            # 7. normalise: 99.5th percentile inside the brain -> 1
            arr = np.ascontiguousarray(vol.permute(2, 1, 0).numpy())
            if brain_np is None:
                brain_np = np.ascontiguousarray(brain.permute(2, 1, 0).numpy())
            hi = float(np.percentile(arr[brain_np], 99.5)) if brain_np.any() else float(arr.max())
            np.multiply(arr, 1.0 / max(hi, 1e-6), out=arr)
            np.clip(arr, 0.0, 1.0, out=arr)
            out[cn] = arr
        labels_np = np.ascontiguousarray(labels.permute(2, 1, 0).numpy())

    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "spacing_mm": spacing,
        "fov_mm": [float(n) for n in grid_shape],
        "template": "ICBM 2009c nonlinear symmetric (nilearn packaged, 1 mm)",
        "anat_scale": scale.tolist(),
        "tumour": bool(tumour),
        "tumour_centre_template_ras": (np.asarray(tc) + centre).tolist(),
        "tumour_core_radius_mm": float(r_core),
        "tumour_oedema_radius_mm": float(r_oed),
        "mass_effect": float(mass),
        "class_means": {cn: means[cn].tolist() for cn in contrasts},
        "noise_sigma_frac": {cn: float(sig_all[idx[i]]) for i, cn in enumerate(contrasts)},
        "bias_amplitude": {cn: float(amp_all[idx[i]]) for i, cn in enumerate(contrasts)},
        "seconds": time.perf_counter() - t_start,
    }
    return Subject(images=out, labels=labels_np, affine=_grid_affine(shape, spacing, centre),
                   subject_id=f"synth{seed:05d}", seed=seed, meta=meta)


# -------------------------------------------------------------------------------------------- bank


def split_seeds(split: str, n: int) -> list:
    """Subject seeds of a split; the ranges never overlap (train 0.., test 10000.., val 20000..)."""
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLIT_SEED_BASE)}")
    if not (0 <= n <= _SPLIT_SIZE):
        raise ValueError(f"a split holds at most {_SPLIT_SIZE} subjects, asked for {n}")
    base = SPLIT_SEED_BASE[split]
    return list(range(base, base + n))


def assert_disjoint(*banks: "SubjectBank") -> None:
    """Raise ``ValueError`` if two banks share a subject seed."""
    seen: dict = {}
    for i, bank in enumerate(banks):
        for s in bank.seeds:
            if s in seen and seen[s] != i:
                raise ValueError(f"subject seed {s} is in bank {seen[s]} and bank {i}")
            seen[s] = i


class SubjectBank:
    """Synthetic subjects, synthesised once and cached on disk, loaded lazily.

    Subject ``i`` has seed ``seed + i``. Each lives in
    ``root/msode_subj_v{GENERATOR_VERSION}_s{seed}_sp{spacing}_fov{X}x{Y}x{Z}_{contrasts}.npz``
    (``np.savez_compressed``; intensities quantised to uint16, i.e. steps of 1.5e-5, labels uint8),
    written atomically so concurrent processes (DDP ranks) can share a root. Every access returns
    what the file holds (a freshly synthesised subject is saved and read back), so a bank is
    deterministic whether or not its cache was warm. ``max_in_memory`` subjects are kept in an LRU.

    Use :meth:`for_split` (or :func:`split_seeds`) so train and test never share subjects.
    """

    def __init__(self, root, n_subjects: int, seed: int = 0, spacing: float = 2.0,
                 grid_shape=FOV_MM, contrasts: Sequence[str] = CONTRASTS, max_in_memory: int = 4):
        self.root = Path(root).expanduser()  # "~/..." from configs and CLIs means the home directory
        self.n_subjects = int(n_subjects)
        self.seed = int(seed)
        self.spacing = float(spacing)
        self.grid_shape = tuple(int(v) for v in grid_shape)
        self.contrasts = tuple(contrasts)
        self.max_in_memory = int(max_in_memory)
        self._lru: dict = {}

    @classmethod
    def for_split(cls, root, split: str, n_subjects: int, spacing: float = 2.0, **kwargs) -> "SubjectBank":
        seeds = split_seeds(split, n_subjects)
        return cls(root, n_subjects, seed=seeds[0] if seeds else SPLIT_SEED_BASE[split], spacing=spacing, **kwargs)

    @property
    def seeds(self) -> list:
        return list(range(self.seed, self.seed + self.n_subjects))

    @property
    def grid(self) -> Grid:
        return Grid(tuple(max(2, int(round(n / self.spacing))) for n in self.grid_shape), (self.spacing,) * 3)

    def __len__(self) -> int:
        return self.n_subjects

    def path(self, i: int) -> Path:
        s = self._seed_of(i)
        fov = "x".join(str(v) for v in self.grid_shape)
        return self.root / (f"msode_subj_v{GENERATOR_VERSION}_s{s}_sp{self.spacing:g}_fov{fov}_"
                            f"{'-'.join(self.contrasts)}.npz")

    def _seed_of(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.n_subjects
        if not (0 <= i < self.n_subjects):
            raise IndexError(f"subject index {i} out of range for a bank of {self.n_subjects}")
        return self.seed + i

    def is_cached(self, i: int) -> bool:
        return self.path(i).exists()

    def ensure(self, indices=None, log=None) -> None:
        """Synthesise (and cache) every missing subject; ``log`` gets one line per new subject."""
        for i in (range(self.n_subjects) if indices is None else indices):
            if not self.is_cached(i):
                t0 = time.perf_counter()
                self._write(i)
                if log is not None:
                    log(f"synthesised subject seed {self._seed_of(i)} at {self.spacing:g} mm "
                        f"in {time.perf_counter() - t0:.1f} s -> {self.path(i)}")

    def _write(self, i: int) -> None:
        subj = synthesize_subject(self._seed_of(i), self.grid_shape, self.spacing, self.contrasts)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(i)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        arrays = {f"img_{c}": np.round(np.clip(a, 0.0, 1.0) * 65535.0).astype(np.uint16) for c, a in subj.images.items()}
        np.savez_compressed(tmp, labels=subj.labels, affine=subj.affine, meta=np.array(json.dumps(subj.meta)), **arrays)
        os.replace(tmp, path)

    def _read(self, i: int) -> Subject:
        path = self.path(i)
        with np.load(path, allow_pickle=False) as z:
            images = {c: z[f"img_{c}"].astype(np.float32) / np.float32(65535.0) for c in self.contrasts}
            labels = z["labels"]
            affine = z["affine"]
            meta = json.loads(str(z["meta"]))
        s = self._seed_of(i)
        meta["cache_file"] = str(path)
        return Subject(images=images, labels=labels, affine=affine, subject_id=f"synth{s:05d}", seed=s, meta=meta)

    def __getitem__(self, i: int) -> Subject:
        s = self._seed_of(i)
        if s in self._lru:
            subj = self._lru.pop(s)
            self._lru[s] = subj
            return subj
        if not self.is_cached(i):
            self._write(i)
        subj = self._read(i)
        if self.max_in_memory > 0:
            self._lru[s] = subj
            while len(self._lru) > self.max_in_memory:
                self._lru.pop(next(iter(self._lru)))
        return subj

    def __iter__(self) -> Iterator[Subject]:
        for i in range(self.n_subjects):
            yield self[i]


# ------------------------------------------------------------------------------------------ motions


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def motion_lattice(grid: Grid, control_spacing_mm: float = DEFAULT_CONTROL_SPACING_MM) -> BSplineLattice:
    """The B-spline lattice of simulated motions on a model ``grid`` (isotropic control spacing)."""
    return BSplineLattice(grid, (float(control_spacing_mm),) * 3)


def sample_rigid(rng, n: int = 1, max_rot_deg: float = 75.0, max_trans_mm: float = 20.0) -> torch.Tensor:
    """``(n, 6)`` float32 rigid parameters (SDK convention: rotation vector + mm) of the paper's motion:
    Euler rotations U(-max_rot_deg, max_rot_deg) degrees about each axis (``R = Rz @ Ry @ Rx``) and
    translations U(-max_trans_mm, max_trans_mm) mm."""
    rng = _as_rng(rng)
    rot = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, (n, 3)))
    trans = rng.uniform(-max_trans_mm, max_trans_mm, (n, 3))
    theta = euler_to_rigid(torch.from_numpy(rot), torch.from_numpy(trans))
    return theta.to(torch.float32)


def sample_bspline(rng, lattice: BSplineLattice, n: int = 1, std_mm: float = 8.0,
                   zero_border: bool = False) -> torch.Tensor:
    """``(n, 3, cz, cy, cx)`` float32 control displacements N(0, std_mm^2) mm; ``zero_border`` sets
    the outermost ring of control points to zero (less motion at the field-of-view border)."""
    rng = _as_rng(rng)
    c = torch.from_numpy(rng.normal(0.0, std_mm, (n, *lattice.coeff_shape)).astype(np.float32))
    if zero_border:
        c[:, :, [0, -1]] = 0.0
        c[:, :, :, [0, -1]] = 0.0
        c[:, :, :, :, [0, -1]] = 0.0
    return c


def sample_hybrid(rng, lattice: BSplineLattice, n: int = 1, max_rot_deg: float = 40.0,
                  max_trans_mm: float = 10.0, std_mm: float = 8.0, zero_border: bool = False):
    """``(theta (n, 6), coeffs (n, 3, cz, cy, cx))``: rigid U(-40, 40) deg, U(-10, 10) mm, plus the
    B-spline N(0, 8^2) mm; the chain is [rigid, bspline], ``phi(x) = R (x + u(x) + t)``."""
    rng = _as_rng(rng)
    theta = sample_rigid(rng, n, max_rot_deg, max_trans_mm)
    return theta, sample_bspline(rng, lattice, n, std_mm, zero_border)


MOTION_KINDS = ("identity", "rigid", "bspline", "hybrid")


def sample_motion(rng, kind: str, grid: Grid, n: int = 1,
                  control_spacing_mm: float = DEFAULT_CONTROL_SPACING_MM, **kwargs) -> TransformChain:
    """A ground-truth :class:`TransformChain` of ``kind`` (identity | rigid | bspline | hybrid) with
    the paper's distributions (override through ``kwargs`` of the ``sample_*`` functions)."""
    rng = _as_rng(rng)
    if kind == "identity":
        return TransformChain([RigidTransform(torch.zeros(n, 6))])
    if kind == "rigid":
        return TransformChain([RigidTransform(sample_rigid(rng, n, **kwargs))])
    lat = motion_lattice(grid, control_spacing_mm)
    if kind == "bspline":
        return TransformChain([BSplineTransform(sample_bspline(rng, lat, n, **kwargs), lat)])
    if kind == "hybrid":
        theta, coeffs = sample_hybrid(rng, lat, n, **kwargs)
        return TransformChain([RigidTransform(theta), BSplineTransform(coeffs, lat)])
    raise ValueError(f"unknown motion kind {kind!r}; valid: {list(MOTION_KINDS)}")


# -------------------------------------------------------------------------------------------- pairs


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


def _resample_with_labels(image: torch.Tensor, labels: torch.Tensor, src: Grid, chain: TransformChain,
                          out: Grid, n: int):
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


def make_pair(subject: Subject, moving_contrast: str, fixed_contrast: str, motion, grid: Grid | None = None,
              rng=None, device=None, control_spacing_mm: float = DEFAULT_CONTROL_SPACING_MM) -> Pair:
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
        fixed, fixed_lab = _resample_with_labels(subject.tensor(fixed_contrast, device), labels,
                                                 subject.grid, chain, grid, n)
        moving, moving_lab = _resample_with_labels(subject.tensor(moving_contrast, device), labels,
                                                   subject.grid, TransformChain(), grid, n)
    return Pair(fixed=fixed, moving=moving, fixed_labels=fixed_lab, moving_labels=moving_lab, chain=chain,
                grid=grid, fixed_contrast=fixed_contrast, moving_contrast=moving_contrast,
                subject_id=subject.subject_id)


def _to_device(t: Transform, device) -> Transform:
    if isinstance(t, RigidTransform):
        return RigidTransform(t.state.to(device))
    if isinstance(t, BSplineTransform):
        return BSplineTransform(t.state.to(device), t.lattice)
    t = type(t)(t.state.to(device), t.grid)  # DenseTransform
    return t


# ------------------------------------------------------------------------------------------ metrics


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
            m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(
                np.ascontiguousarray(np.asarray(mask).astype(bool).transpose(2, 1, 0)))
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


# -------------------------------------------------------------------------------------------- BraTS

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
                raise ValueError(f"{path}: grid differs from the other images of {sid} "
                                 f"(shape {arr.shape} vs {shape}); BraTS images must be co-registered")
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
        meta = {"source": str(folder), "contrasts_found": list(out), "has_seg": seg is not None,
                "oblique": bool(not np.allclose(direction, np.eye(3), atol=1e-4))}
        yield Subject(images=out, labels=labels, affine=np.asarray(affine, dtype=np.float64), subject_id=sid,
                      seed=None, meta=meta)
