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

Modules (all names are re-exported here: ``from msode_train import data as D; D.SubjectBank``)
    :mod:`~msode_train.data.subject` (:class:`Subject`, label codes), :mod:`~msode_train.data.phantoms`
    (template, :func:`synthesize_subject`), :mod:`~msode_train.data.bank` (:class:`SubjectBank`, split
    seeds), :mod:`~msode_train.data.motions` (motion samplers), :mod:`~msode_train.data.pairs`
    (:class:`Pair`, :func:`make_pair`), :mod:`~msode_train.data.metrics` (Dice, RMSE),
    :mod:`~msode_train.data.brats` (:func:`load_brats_folder`).
"""

from __future__ import annotations

from .bank import SAMPLE_SEED, SPLIT_SEED_BASE, SubjectBank, assert_disjoint, split_seeds
from .brats import BRATS_CONTRASTS, load_brats_folder
from .metrics import dice, rmse_phi, rmse_x
from .motions import (
    DEFAULT_CONTROL_SPACING_MM,
    MOTION_KINDS,
    motion_lattice,
    sample_bspline,
    sample_hybrid,
    sample_motion,
    sample_rigid,
)
from .pairs import Pair, make_pair
from .phantoms import (
    CLASS_MEANS,
    CONTRASTS,
    FOV_MM,
    GENERATION_SECONDS,
    GENERATOR_VERSION,
    TEMPLATE_CENTRE_RAS,
    load_template,
    synthesize_subject,
)
from .subject import LABELS, TUMOUR_LABELS, Subject

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
