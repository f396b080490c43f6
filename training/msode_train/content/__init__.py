"""Modality-independent similarity: multi-slice image-to-image translation and its content encoder.

Paper section 2.2 (and DESIGN.md section 5). Different contrasts of one subject share *content*
(anatomy) and differ in *style*. A small MUNIT/DRIT-like translation model is trained on 2-D
multi-slice inputs (5 adjacent slices of a 3-D volume as channels, "stacks"):

* content encoder ``E^c`` (:class:`ContentEncoder`): fully convolutional, 7x7 conv, two stride-2
  downsamplings, residual blocks (channel-wise layer norm inside, see :class:`_ChannelNorm`: MUNIT's
  instance norm there compounds huge gains on (near-)empty slices), then a channel norm and an
  instance norm without affine parameters at the output (:class:`_SpatialNorm`): every channel of the
  code has zero mean and unit variance over the slice, so the codes cannot shrink (or flatten) to
  cheat the paired distance, and ``L_sim`` has a fixed scale (0 = identical, ~2 = uncorrelated).
  Output ``(B, content_dim, h/4, w/4)``; no modality code (content is modality independent);
* style encoder ``E^s`` (:class:`StyleEncoder`): 3x3 conv, three stride-2 convs, global average
  pooling, fully connected -> ``style_dim`` code; the modality one-hot is concatenated to its input
  channels (constant maps);
* generator ``G`` (:class:`Generator`): the modality one-hot is concatenated to the content code's
  channels, residual blocks with AdaIN (scale/shift from the style code through an MLP), then
  nearest upsampling + 3x3 conv (layer norm) twice, a 3x3 conv and ``tanh`` -> 5 slices in [0, 1]
  (MUNIT uses 5x5 and 7x7 there; 3x3 halves the CPU cost of a training step);
* critic ``D`` (:class:`Critic`): PatchGAN-style WGAN critic conditioned on the modality (one-hot
  concatenated to its input), no normalisation (gradient penalty, Gulrajani et al. 2017).

Losses per step on a pair ``(x_a, a), (x_b, b)`` (:func:`translation_losses`), as the paper lists
them: ``c = E^c(x)``, ``s = E^s(x, m)``, ``x_ab = G(c_a, s_b, b)``, ``x_ba = G(c_b, s_a, a)``;
adversarial (WGAN-GP, on ``x_ab`` / ``x_ba``), content reconstruction ``|E^c(x_ab) - c_a|``, style
reconstruction ``|E^s(x_ba, a) - s_a|``, cycle ``|G(E^c(x_ab), E^s(x_ba, a), a) - x_a|``, mono-modal
reconstruction ``|G(c_a, s_a, a) - x_a|`` (all L1, both directions).

Beyond the paper (documented here so the next engineer sees it): the synthetic (and BraTS) training
subjects are co-registered, so each training pair is *paired*: the same subject and the same slice
positions in two contrasts. Two supervised terms use that: a paired content term
``|c_a - c_b|`` (the very property the registration loss needs: the content codes of two contrasts
of the same anatomy coincide) and a paired translation term ``|x_ab - x_b| + |x_ba - x_a|`` (the style
of the translation comes from ``x_b`` itself, so ``x_ab`` must equal ``x_b``). Their weights are
``LossWeights.paired_content`` / ``paired_translation``; setting both to 0 gives the paper's unpaired
recipe. A third, registration-aware term, ``LossWeights.shift_symmetry`` (:func:`shift_symmetry`, default 0),
asks the paired code distance to be symmetric about the truth: ``d(+delta) = d(-delta)`` for ``x_a`` resampled
at small 3-D offsets ``+-delta`` (:meth:`SlicePool.draw_batch`). A slope of ``d`` at the truth is exactly
what moves ``L_sim``'s optimum off the true alignment (measured for ``content_phantom_v1``: 0.6-0.8 mm,
training/experiments/similarity_ablation/); ``content_phantom_v2`` is v1 fine-tuned with this term
(training/experiments/content_encoder/reports/v2/). The slope alone can also be lowered by a code that barely sees
small shifts (a flat ``L_sim``, whose optimum is as far off), so ``LossWeights.shift_drift`` weights slope over
curvature, the Newton estimate of the optimum's offset (``content_phantom_v5``). The critic is updated once per
generator step (``n_critic = 1``, not WGAN-GP's 5, to fit CPU budgets); an epsilon-drift term keeps critic outputs
bounded.

Registration loss (paper eq. 4): :class:`E3DContent` builds ``E^c_3D(x)`` of a volume ``(N, 1, D, H, W)``
from ``n_slices`` 5-slice stacks, split evenly over the three axes (axial: stacks along D = z,
coronal: along H = y, sagittal: along W = x), their centres drawn uniformly from the central
``central_fraction`` of each axis by a ``torch.Generator``; ``L_sim = mean ||E3D(warped) - E3D(fixed)||^2``
with the *same* positions for both images. :func:`content_similarity` loads committed weights by name
(``training/msode_train/weights/<name>.pt``) or path and returns a :class:`ContentSimilarity` callable
``(warped, fixed) -> loss``; the encoder is frozen, the loss is differentiable w.r.t. the warped image.

Training data (:class:`SlicePool`): paired stacks from a :class:`msode_train.data.SubjectBank`
(2 mm, all four contrasts), slices on all three axes from the central 70 % of each axis, 16 subjects
in memory, one replaced every 10 draws by a random subject, half of them in a random rigid pose
(U(-45, 45) deg, U(-10, 10) mm, all contrasts warped together) so oblique cuts are seen too; random
in-plane crops (64 x 64 for the committed weights) holding >= 15 % brain, random flips, an
independent gamma U(exp(-0.2), exp(0.2)) per contrast. :class:`ContentTrainer` (tqdm, atomic
checkpoints with resume, loss log, translation PNGs) runs it; ``train_content.py`` in
training/experiments/content_encoder/scripts/ is the command line (train / export / report).

Usage in the registration loss::

    sim = content_similarity("content_phantom_v2", n_slices=24, seed=0)
    loss = sim(warped, fixed)     # (N, 1, D, H, W), intensities in [0, 1], 2 mm grid; differentiable

Cost of one call with 24 stacks on a 2 mm 120x120x80 pair: ~0.4 s forward, ~0.8 s forward and
backward on one CPU thread of the shared project machine. Scale: about 0.01-0.02 for two aligned
contrasts of one subject, 0.1-0.35 at 15 mm / 20 deg (v1, ``training/experiments/content_encoder/reports/v1/``;
v2: ``v2/``).

Weights file (``torch.load(..., weights_only=True)``): a dict ``{"format": "msode-content",
"format_version": 1, "config": {...}, "state_dict": {E^c, E^s, G tensors}, "meta": {...}}``.

Slice geometry: a stack along an axis keeps the tensor order of the other two axes: axial stacks are
``(5, H, W)`` (y, x), coronal ``(5, D, W)`` (z, x), sagittal ``(5, D, H)`` (z, y); the images were
trained at ``config["spacing_mm"]`` (2 mm). Volumes on another isotropic spacing are resampled
(trilinear) to it when ``spacing_mm`` is given to :class:`ContentSimilarity`.

Modules (every name is re-exported here: ``from msode_train import content as C; C.ContentTrainer``):
:mod:`~msode_train.content.networks` (``E^c``, ``E^s``, ``G``, critic), :mod:`~msode_train.content.losses`
(translation, paired, shift and critic losses), :mod:`~msode_train.content.slices` (stacks and their
positions), :mod:`~msode_train.content.weights` (weights files), :mod:`~msode_train.content.similarity`
(``E^c_3D`` and ``L_sim``), :mod:`~msode_train.content.pool` (:class:`SlicePool`),
:mod:`~msode_train.content.trainer` (:class:`ContentTrainer`, figures), :mod:`~msode_train.content.analysis`
(landscapes, MI, capture ranges).
"""

from __future__ import annotations

from .analysis import DOF_NAMES, capture_range, linear_binned_mi, refine_minimum, similarity_landscape
from .losses import LossWeights, code_distance, critic_loss, gradient_penalty, shift_symmetry, translation_losses
from .networks import (
    STACK,
    ContentConfig,
    ContentEncoder,
    Critic,
    Generator,
    StyleEncoder,
    TranslationModel,
    n_parameters,
)
from .pool import PairedBatch, SlicePool
from .similarity import ContentSimilarity, E3DContent, content_similarity
from .slices import extract_stacks, sample_slice_positions
from .trainer import ContentTrainer, TrainConfig, translation_figure, validation_examples
from .weights import (
    DEFAULT_WEIGHTS,
    WEIGHTS_DIR,
    WEIGHTS_FORMAT,
    WEIGHTS_FORMAT_VERSION,
    load_translation_model,
    save_weights,
)

__all__ = [
    "WEIGHTS_DIR",
    "DEFAULT_WEIGHTS",
    "WEIGHTS_FORMAT",
    "WEIGHTS_FORMAT_VERSION",
    "STACK",
    "ContentConfig",
    "ContentEncoder",
    "StyleEncoder",
    "Generator",
    "Critic",
    "TranslationModel",
    "LossWeights",
    "translation_losses",
    "code_distance",
    "shift_symmetry",
    "PairedBatch",
    "gradient_penalty",
    "extract_stacks",
    "sample_slice_positions",
    "E3DContent",
    "ContentSimilarity",
    "content_similarity",
    "load_translation_model",
    "save_weights",
    "SlicePool",
    "TrainConfig",
    "ContentTrainer",
    "critic_loss",
    "translation_figure",
    "validation_examples",
    "n_parameters",
    "DOF_NAMES",
    "linear_binned_mi",
    "similarity_landscape",
    "capture_range",
    "refine_minimum",
]
