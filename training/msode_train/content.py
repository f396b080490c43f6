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
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from msode_export.checkpoint import atomic_torch_save

__all__ = [
    "WEIGHTS_DIR",
    "DEFAULT_WEIGHTS",
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

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# v2: v1 fine-tuned against the cross-contrast bias of L_sim's optimum (0.35 vs 0.64 mm at 2 mm); v1 stays
# committed, the earlier ablation reports name it
DEFAULT_WEIGHTS = "content_phantom_v2"
STACK = 5  # adjacent slices per 2-D input (paper: "number of slices set to 5")
WEIGHTS_FORMAT = "msode-content"
WEIGHTS_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ networks


@dataclass
class ContentConfig:
    """Architecture of the translation model (stored in the weights file)."""

    stack: int = STACK
    n_modalities: int = 4
    modalities: tuple = ("t1", "t2", "flair", "pd")
    base_channels: int = 16
    content_dim: int = 32
    n_down: int = 2
    n_res: int = 2
    style_dim: int = 8
    critic_channels: int = 32
    spacing_mm: float = 2.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ContentConfig":
        d = dict(d)
        if "modalities" in d:
            d["modalities"] = tuple(d["modalities"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _onehot_maps(mod: torch.Tensor, n: int, h: int, w: int, dtype) -> torch.Tensor:
    """``(B,)`` long modality indices -> ``(B, n, h, w)`` constant one-hot maps."""
    oh = F.one_hot(mod.long(), n).to(dtype)
    return oh[:, :, None, None].expand(-1, -1, h, w)


def _conv(cin, cout, k, s=1, pad_mode="reflect"):
    return nn.Conv2d(cin, cout, k, s, padding=(k - 1) // 2 if s == 1 else 1, padding_mode=pad_mode)


def _instance_norm(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Instance normalisation without affine parameters, written out (``torch.instance_norm``'s backward
    returns NaN on constant inputs), with a larger ``eps`` than usual to bound its gain there."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    xc = x - mu
    return xc * torch.rsqrt((xc * xc).mean(dim=(2, 3), keepdim=True) + eps)


class _ChannelNorm(nn.Module):
    """Layer norm across channels at every pixel (zero mean, unit variance over C), optional affine.

    Used by the content encoder instead of instance norm: it is local (a content feature depends only
    on its receptive field, not on the statistics of the whole slice, so slices that move partly out
    of the field of view do not change the code elsewhere) and its gain stays bounded on all-background
    inputs (biases differ across channels), where instance norm's 1/sqrt(eps) gain compounds through
    the layers into exploding gradients. Without affine it fixes the scale of the content code, so the
    paired content loss cannot be lowered by shrinking the codes."""

    def __init__(self, ch: int, affine: bool = True, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ch)) if affine else None
        self.bias = nn.Parameter(torch.zeros(ch)) if affine else None

    def forward(self, x):
        xc = x - x.mean(dim=1, keepdim=True)
        y = xc * torch.rsqrt((xc * xc).mean(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y


class _SpatialNorm(nn.Module):
    """Instance norm (per channel over the slice, no affine) at the content encoder's output.

    Each channel of a content code then has zero mean and unit variance over its slice. This closes a
    shortcut that a per-pixel normalisation alone leaves open: a code made of one constant vector plus
    tiny spatial variations has a small paired-content distance, yet the generator (whose AdaIN
    instance-normalises) can still decode it (measured: with the per-pixel norm only, the cross-contrast
    distances came out ~1e-3 at any shift). One layer only, so its 1/sqrt(eps) gain on a constant
    (all-background) stack does not compound; such a stack's code is zero."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return _instance_norm(x, self.eps)


class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1 = _conv(ch, ch, 3)
        self.c2 = _conv(ch, ch, 3)
        self.n1 = _ChannelNorm(ch)
        self.n2 = _ChannelNorm(ch)

    def forward(self, x):
        y = F.relu(self.n1(self.c1(x)))
        return x + self.n2(self.c2(y))


class ContentEncoder(nn.Module):
    """``E^c``: ``(B, 5, h, w)`` in [0, 1] -> ``(B, content_dim, h / 2^n_down, w / 2^n_down)``."""

    def __init__(self, cfg: ContentConfig):
        super().__init__()
        ch = cfg.base_channels
        layers = [_conv(cfg.stack, ch, 7), _ChannelNorm(ch), nn.ReLU(inplace=True)]
        for i in range(cfg.n_down):
            nxt = cfg.content_dim if i == cfg.n_down - 1 else min(ch * 2, cfg.content_dim)
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1, padding_mode="reflect"), _ChannelNorm(nxt),
                       nn.ReLU(inplace=True)]
            ch = nxt
        layers += [_ResBlock(ch) for _ in range(cfg.n_res)]
        layers += [_ChannelNorm(ch, affine=False), _SpatialNorm()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x * 2.0 - 1.0)


class StyleEncoder(nn.Module):
    """``E^s``: ``(B, 5, h, w)``, modality ``(B,)`` -> ``(B, style_dim)`` (convs, global pooling, FC)."""

    def __init__(self, cfg: ContentConfig):
        super().__init__()
        ch = cfg.base_channels
        self.n_mod = cfg.n_modalities
        self.net = nn.Sequential(
            _conv(cfg.stack + cfg.n_modalities, ch, 3), nn.ReLU(inplace=True),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1, padding_mode="reflect"), nn.ReLU(inplace=True),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1, padding_mode="reflect"), nn.ReLU(inplace=True),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1, padding_mode="reflect"), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(2 * ch, cfg.style_dim)

    def forward(self, x, mod):
        b, _, h, w = x.shape
        z = torch.cat([x * 2.0 - 1.0, _onehot_maps(mod, self.n_mod, h, w, x.dtype)], 1)
        return self.fc(self.net(z).mean(dim=(2, 3)))


class _AdaINResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1 = _conv(ch, ch, 3)
        self.c2 = _conv(ch, ch, 3)

    @staticmethod
    def _adain(x, gamma, beta):
        return _instance_norm(x) * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]

    def forward(self, x, params):  # params (B, 4 * ch)
        g1, b1, g2, b2 = params.chunk(4, dim=1)
        y = F.relu(self._adain(self.c1(x), g1, b1))
        return x + self._adain(self.c2(y), g2, b2)


class _LayerNorm2d(nn.Module):
    """Layer norm over (C, H, W) per sample with per-channel affine (MUNIT's decoder norm)."""

    def __init__(self, ch: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))

    def forward(self, x):
        mu = x.mean(dim=(1, 2, 3), keepdim=True)
        var = x.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (x - mu) * torch.rsqrt(var + 1e-5) * self.weight[:, None, None] + self.bias[:, None, None]


class Generator(nn.Module):
    """``G``: content ``(B, content_dim, h, w)``, style ``(B, style_dim)``, modality ``(B,)`` ->
    ``(B, 5, h * 2^n_down, w * 2^n_down)`` in [0, 1]."""

    def __init__(self, cfg: ContentConfig):
        super().__init__()
        ch = cfg.content_dim
        self.n_mod = cfg.n_modalities
        self.inp = nn.Conv2d(ch + cfg.n_modalities, ch, 1)
        self.res = nn.ModuleList([_AdaINResBlock(ch) for _ in range(cfg.n_res)])
        self.mlp = nn.Sequential(nn.Linear(cfg.style_dim, 64), nn.ReLU(inplace=True),
                                 nn.Linear(64, 4 * ch * cfg.n_res))
        ups = []
        for i in range(cfg.n_down):
            nxt = max(ch // 2, cfg.base_channels)
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(ch, nxt, 3), _LayerNorm2d(nxt),
                    nn.ReLU(inplace=True)]
            ch = nxt
        self.up = nn.Sequential(*ups)
        self.out = _conv(ch, cfg.stack, 3)
        self.ch = cfg.content_dim

    def forward(self, c, s, mod):
        b, _, h, w = c.shape
        x = self.inp(torch.cat([c, _onehot_maps(mod, self.n_mod, h, w, c.dtype)], 1))
        params = self.mlp(s).chunk(len(self.res), dim=1)
        for blk, p in zip(self.res, params):
            x = blk(x, p)
        return (torch.tanh(self.out(self.up(x))) + 1.0) * 0.5


class Critic(nn.Module):
    """WGAN critic conditioned on the modality: ``(B, 5, h, w)``, ``(B,)`` -> ``(B, 1, h/8, w/8)`` scores."""

    def __init__(self, cfg: ContentConfig):
        super().__init__()
        ch = cfg.critic_channels
        self.n_mod = cfg.n_modalities
        self.net = nn.Sequential(
            nn.Conv2d(cfg.stack + cfg.n_modalities, ch, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * ch, 1, 3, 1, 1),
        )

    def forward(self, x, mod):
        b, _, h, w = x.shape
        return self.net(torch.cat([x * 2.0 - 1.0, _onehot_maps(mod, self.n_mod, h, w, x.dtype)], 1))


class TranslationModel(nn.Module):
    """``E^c``, ``E^s`` and ``G`` together (what the weights file stores; the critic is training-only)."""

    def __init__(self, cfg: ContentConfig | None = None):
        super().__init__()
        self.cfg = cfg or ContentConfig()
        self.enc_c = ContentEncoder(self.cfg)
        self.enc_s = StyleEncoder(self.cfg)
        self.gen = Generator(self.cfg)

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this (the downsampling factor, 8 for the style encoder)."""
        return 8

    def modality_tensor(self, mod, batch: int, device=None) -> torch.Tensor:
        """A modality name, index or ``(B,)`` tensor -> long ``(batch,)`` tensor."""
        if isinstance(mod, str):
            mod = self.cfg.modalities.index(mod)
        t = torch.as_tensor(mod, device=device).long()
        return t.expand(batch) if t.ndim == 0 else t

    @torch.no_grad()
    def translate(self, x: torch.Tensor, style_from: torch.Tensor, dst_mod) -> torch.Tensor:
        """Translate stacks ``x`` (any contrast) to ``dst_mod`` (name, index or ``(B,)``) with the style
        of ``style_from`` (stacks of ``dst_mod``). Inputs are padded to a multiple of 8 and cropped back."""
        dst = self.modality_tensor(dst_mod, x.shape[0], x.device)
        xp, (h, w) = _pad_to(x, self.multiple)
        sp, _ = _pad_to(style_from, self.multiple)
        out = self.gen(self.enc_c(xp), self.enc_s(sp, dst), dst)
        return out[:, :, :h, :w]


def _pad_to(x: torch.Tensor, m: int):
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------- losses


@dataclass
class LossWeights:
    """Loss weights (MUNIT-like defaults; ``paired_*`` are the beyond-paper supervised terms)."""

    adv: float = 1.0
    gp: float = 10.0
    drift: float = 1e-3
    cycle: float = 10.0
    content: float = 1.0
    style: float = 1.0
    image: float = 10.0
    paired_content: float = 2.0
    paired_translation: float = 10.0
    shift_symmetry: float = 0.0  # > 0: the pool draws shifted copies of x_a (TrainConfig.shift_vox)
    shift_drift: float = 0.0  # slope over curvature of the paired distance (shift_symmetry's "shift_drift")

    @property
    def uses_shifts(self) -> bool:
        return self.shift_symmetry > 0 or self.shift_drift > 0


def translation_losses(model: TranslationModel, xa, a, xb, b, weights: LossWeights | None = None,
                       critic: Critic | None = None) -> dict:
    """All generator-side terms for the pair ``(xa, a)``, ``(xb, b)`` (``(B, 5, h, w)``, ``(B,)``).

    Returns a dict of scalar tensors (``adv`` only when a ``critic`` is given), ``total`` (weighted
    sum), the translations ``x_ab``, ``x_ba`` (for the critic step and for pictures) and the content
    codes ``c_a``, ``c_b``.
    """
    w = weights or LossWeights()
    ca, cb = model.enc_c(xa), model.enc_c(xb)
    sa, sb = model.enc_s(xa, a), model.enc_s(xb, b)
    x_ab, x_ba = model.gen(ca, sb, b), model.gen(cb, sa, a)
    # reconstruct codes from the translations
    ca_h, cb_h = model.enc_c(x_ab), model.enc_c(x_ba)
    sa_h, sb_h = model.enc_s(x_ba, a), model.enc_s(x_ab, b)
    x_aba, x_bab = model.gen(ca_h, sa_h, a), model.gen(cb_h, sb_h, b)
    xa_rec, xb_rec = model.gen(ca, sa, a), model.gen(cb, sb, b)
    l1 = F.l1_loss
    out = {
        "cycle": l1(x_aba, xa) + l1(x_bab, xb),
        "content": l1(ca_h, ca) + l1(cb_h, cb),
        "style": l1(sa_h, sa) + l1(sb_h, sb),
        "image": l1(xa_rec, xa) + l1(xb_rec, xb),
        "paired_content": l1(ca, cb),
        "paired_translation": l1(x_ab, xb) + l1(x_ba, xa),
    }
    total = sum(getattr(w, k) * v for k, v in out.items())
    if critic is not None:
        out["adv"] = -(critic(x_ab, b).mean() + critic(x_ba, a).mean())
        total = total + w.adv * out["adv"]
    out["total"] = total
    out["x_ab"], out["x_ba"], out["c_a"], out["c_b"] = x_ab, x_ba, ca, cb
    return out


def code_distance(c: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean squared difference of content codes ``(B, ...)`` (e.g. ``(B, C, h, w)``, one stack each):
    ``L_sim``'s metric, used by :class:`ContentSimilarity` and :func:`shift_symmetry` alike."""
    return ((c - ref) ** 2).flatten(1).mean(1)


def shift_symmetry(enc_c: "ContentEncoder", cb: torch.Tensor, xa_plus: torch.Tensor, xa_minus: torch.Tensor,
                   ca: torch.Tensor | None = None, eps: float = 1e-4) -> dict:
    """Registration-aware terms (beyond the paper) on the paired distance ``d(s) = ||E^c(x_a(s)) - E^c(x_b)||^2``
    of two aligned contrasts, at small offsets ``+-delta`` (``xa_plus``/``xa_minus``, from
    :meth:`SlicePool.draw_batch`). A slope of ``d`` at ``s = 0`` moves ``L_sim``'s optimum off the truth (the
    bias measured in the similarity ablation, training/experiments/similarity_ablation/), by about the Newton step
    ``delta * (d(+) - d(-)) / (2 (d(+) + d(-) - 2 d(0)))``: slope over curvature.

    Returns ``shift_symmetry = mean |d(+) - d(-)|`` (the slope alone: an encoder can also lower it by making
    its code insensitive to shifts, which flattens ``L_sim`` and leaves the optimum as far off), and, when
    ``ca = E^c(x_a)`` is given, ``shift_drift = sum |d(+) - d(-)| / sum max(d(+) + d(-) - 2 d(0), eps)`` over
    the batch (slope over curvature: the optimum's drift in units of ``delta``, which only a symmetric *and*
    shift-sensitive code lowers), ``d_aligned`` (``d(0)``); ``d_shift`` (mean of ``d(+-delta)``) always."""
    dp = code_distance(enc_c(xa_plus), cb)
    dm = code_distance(enc_c(xa_minus), cb)
    out = {"shift_symmetry": (dp - dm).abs().mean(), "d_shift": 0.5 * (dp + dm).mean().detach()}
    if ca is not None:
        d0 = code_distance(ca, cb)
        out["shift_drift"] = (dp - dm).abs().sum() / (dp + dm - 2.0 * d0).sum().clamp_min(eps)
        out["d_aligned"] = d0.mean().detach()
    return out


def gradient_penalty(critic: Critic, real: torch.Tensor, fake: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` on random interpolates of real and fake."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    score = critic(x_hat, mod)
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    norm = torch.sqrt((grad.flatten(1) ** 2).sum(dim=1) + 1e-12)  # finite gradient at grad == 0
    return ((norm - 1.0) ** 2).mean()


def critic_loss(critic: Critic, real_a, a, real_b, b, fake_ab, fake_ba, weights: LossWeights) -> dict:
    """Critic (WGAN-GP) loss on both directions; ``wdist`` is the critic's Wasserstein estimate."""
    real = torch.cat([real_a, real_b])
    fake = torch.cat([fake_ba, fake_ab]).detach()
    mod = torch.cat([a, b])
    d_real, d_fake = critic(real, mod), critic(fake, mod)
    wdist = d_real.mean() - d_fake.mean()
    gp = gradient_penalty(critic, real, fake, mod)
    drift = (d_real ** 2).mean()
    total = -wdist + weights.gp * gp + weights.drift * drift
    return {"wdist": wdist, "gp": gp, "d_total": total}


# ------------------------------------------------------------------------------------------- slicing


def extract_stacks(vol: torch.Tensor, axis: int, centres: torch.Tensor, k: int = STACK) -> torch.Tensor:
    """``k``-slice stacks of ``vol`` ``(N, C, D, H, W)`` centred at ``centres`` (long ``(S,)``) along
    tensor ``axis`` (0 = D axial, 1 = H coronal, 2 = W sagittal) -> ``(N * S, C * k, h, w)``
    (sample-major: stacks of sample 0 first). Differentiable (``index_select``)."""
    n, c = vol.shape[:2]
    s = centres.numel()
    off = torch.arange(k, device=vol.device) - (k // 2)
    idx = (centres.to(vol.device).view(-1, 1) + off.view(1, -1)).reshape(-1)
    g = vol.index_select(2 + axis, idx)
    if axis == 0:    # (N, C, S*k, H, W)
        g = g.view(n, c, s, k, *g.shape[3:]).permute(0, 2, 1, 3, 4, 5)
    elif axis == 1:  # (N, C, D, S*k, W)
        g = g.view(n, c, g.shape[2], s, k, g.shape[4]).permute(0, 3, 1, 4, 2, 5)
    else:            # (N, C, D, H, S*k)
        g = g.view(n, c, g.shape[2], g.shape[3], s, k).permute(0, 4, 1, 5, 2, 3)
    return g.reshape(n * s, c * k, g.shape[-2], g.shape[-1])


def sample_slice_positions(shape_dhw: Sequence[int], n_slices: int, generator: torch.Generator | None = None,
                           central_fraction: float = 0.7, k: int = STACK) -> list:
    """Stack centres for each axis: ``[(axis, centres LongTensor), ...]`` with ``n_slices`` split as
    evenly as possible over the three axes (axial first), drawn uniformly (with replacement) from the
    central ``central_fraction`` of each axis (and at least ``k // 2`` voxels from its ends)."""
    out = []
    half = k // 2
    for axis in range(3):
        m = n_slices // 3 + (1 if axis < n_slices % 3 else 0)
        if m == 0:
            continue
        n = int(shape_dhw[axis])
        if n < k:
            raise ValueError(f"axis {axis} has {n} voxels; a {k}-slice stack needs at least {k}")
        margin = max(half, int(math.floor(n * (1.0 - central_fraction) / 2.0)))
        lo, hi = margin, max(margin, n - 1 - margin)
        lo, hi = max(lo, half), min(hi, n - 1 - half)
        c = torch.randint(lo, hi + 1, (m,), generator=generator)
        out.append((axis, c))
    return out


# ----------------------------------------------------------------------------------- 3-D similarity


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

    def __init__(self, encoder: ContentEncoder, n_slices: int = 24, seed: int = 0, resample: bool = True,
                 central_fraction: float = 0.7, spacing_mm: float | None = None, trained_spacing_mm: float = 2.0,
                 reduction: str = "mean", name: str = ""):
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
                    shape_dhw, self.n_slices, self._gen, self.central_fraction)
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
            raise ValueError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must be "
                             "(N, 1, D, H, W) on one grid")
        if fixed.shape[0] != warped.shape[0]:
            fixed = fixed.expand(warped.shape[0], *fixed.shape[1:])
        w, f = self._prepare(warped), self._prepare(fixed)
        pos = self.positions(w.shape[2:], generator)
        fw, ff = self.features(w, pos), self.features(f, pos)
        per = [code_distance(a, b) * a[0].numel() for a, b in zip(fw, ff)]
        count = sum(a[0].numel() for a in fw)
        loss = sum(per) / count  # (N,): mean over all feature elements of all stacks
        return loss.mean() if self.reduction == "mean" else loss


def _resolve_weights(name_or_path) -> Path:
    if name_or_path is None:
        name_or_path = DEFAULT_WEIGHTS
    p = Path(str(name_or_path))
    if p.suffix == ".pt" and p.exists():
        return p
    cand = WEIGHTS_DIR / f"{name_or_path}.pt"
    if cand.exists():
        return cand
    if p.exists():
        return p
    have = sorted(q.stem for q in WEIGHTS_DIR.glob("*.pt")) if WEIGHTS_DIR.exists() else []
    raise FileNotFoundError(f"content weights {name_or_path!r} not found (not a file, not in {WEIGHTS_DIR}; "
                            f"available: {have})")


def load_translation_model(name_or_path=DEFAULT_WEIGHTS, map_location="cpu") -> TranslationModel:
    """Load a :class:`TranslationModel` from a weights file (by name in ``WEIGHTS_DIR`` or by path);
    ``model.meta`` holds the file's provenance."""
    path = _resolve_weights(name_or_path)
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not an msode content-weights file")
    if int(blob.get("format_version", 0)) > WEIGHTS_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {blob['format_version']} is newer than this reader "
                         f"({WEIGHTS_FORMAT_VERSION})")
    model = TranslationModel(ContentConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    model.meta = dict(blob.get("meta", {}))
    model.meta["path"] = str(path)
    return model


def save_weights(model: TranslationModel, path, meta: dict | None = None, half: bool = False) -> Path:
    """Write ``model`` (E^c, E^s, G) as a ``weights_only``-loadable dict; atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()).clone()
          for k, v in model.state_dict().items()}
    blob = {"format": WEIGHTS_FORMAT, "format_version": WEIGHTS_FORMAT_VERSION,
            "config": model.cfg.to_dict(), "state_dict": sd, "meta": json.loads(json.dumps(meta or {}))}
    return atomic_torch_save(blob, path)


def content_similarity(name_or_path=DEFAULT_WEIGHTS, n_slices: int = 24, seed: int = 0, resample: bool = True,
                       central_fraction: float = 0.7, spacing_mm: float | None = None, reduction: str = "mean",
                       device=None) -> ContentSimilarity:
    """The registration similarity ``(warped, fixed) -> loss`` from committed content weights.

    ``name_or_path``: a name in ``training/msode_train/weights/`` (default, or ``None``:
    :data:`DEFAULT_WEIGHTS`) or a path to a ``.pt`` file written by :func:`save_weights`. See
    :class:`ContentSimilarity` for the rest.
    """
    model = load_translation_model(name_or_path)
    sim = ContentSimilarity(model.enc_c, n_slices=n_slices, seed=seed, resample=resample,
                            central_fraction=central_fraction, spacing_mm=spacing_mm,
                            trained_spacing_mm=float(model.cfg.spacing_mm), reduction=reduction,
                            name=str(name_or_path or DEFAULT_WEIGHTS))
    if device is not None:
        sim.to(device)
    return sim


# ---------------------------------------------------------------------------------------- data pool


def _rigid_warp(vol: torch.Tensor, grid, theta: torch.Tensor) -> torch.Tensor:
    from msode_sdk.transforms import RigidTransform, TransformChain
    from msode_sdk.warp import warp_chain
    return warp_chain(vol, grid, TransformChain([RigidTransform(theta)]), grid)


class SlicePool:
    """Paired multi-contrast 5-slice stacks drawn from a :class:`msode_train.data.SubjectBank`.

    ``slots`` volumes ``(4, D, H, W)`` (all contrasts of one subject, float16) stay in memory; every
    ``refresh_every`` draws one slot is replaced by a random subject in a random pose: with probability
    ``p_rotate`` a rigid motion (U(-max_rot_deg, max_rot_deg) per axis, U(-10, 10) mm), applied to all
    contrasts at once, so stacks are also seen in oblique orientations (as warped images are during
    registration); otherwise the subject as is. :meth:`draw` returns a paired batch: the same
    subject, axis and positions in two different contrasts.
    """

    def __init__(self, bank, slots: int = 16, refresh_every: int = 10, p_rotate: float = 0.5,
                 max_rot_deg: float = 45.0, central_fraction: float = 0.7, gamma: float = 0.2,
                 seed: int = 0, modalities: Sequence[str] = ("t1", "t2", "flair", "pd")):
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

    def draw_batch(self, batch: int, axis: int | None = None, crop: int | None = None,
                   shift_vox: float = 0.0) -> "PairedBatch":
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
                    if float(fg[y0:y0 + ch, x0:x0 + cw].mean()) >= 0.15:
                        break
                sa, sb = sa[:, y0:y0 + ch, x0:x0 + cw], sb[:, y0:y0 + ch, x0:x0 + cw]
            shifted = []
            if shift_vox > 0:
                u = self.rng.normal(size=3)
                delta = u / max(np.linalg.norm(u), 1e-12) * shift_vox * self.rng.uniform(0.25, 1.0)
                deltas.append(delta)
                shifted = [_shifted_stack(v[a], axis, int(pos[0]), (y0, x0, ch, cw), sgn * delta)
                           for sgn in (1.0, -1.0)]
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

        return PairedBatch(xa=stack8(xa), a=torch.tensor(ma), xb=stack8(xb), b=torch.tensor(mb),
                           xa_plus=stack8(xp), xa_minus=stack8(xm),
                           delta_vox=torch.tensor(np.array(deltas), dtype=torch.float32) if deltas else None)


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


def _shifted_stack(vol_dhw: torch.Tensor, axis: int, centre: int, window, delta) -> torch.Tensor:
    """The 5-slice stack of ``vol_dhw`` ``(D, H, W)`` along ``axis`` at ``centre``, in-plane ``window``
    ``(r0, c0, rows, cols)``, sampled (trilinear, zeros outside) at the voxel positions moved by
    ``delta`` ``(dD, dH, dW)`` voxels: ``out[k, i, j] = vol(p_kij + delta)``. ``delta = 0`` reproduces
    :func:`extract_stacks` cropped to the window."""
    r0, c0, rows, cols = window
    k = torch.arange(STACK, dtype=torch.float32) + (centre - STACK // 2)
    r = torch.arange(rows, dtype=torch.float32) + r0
    c = torch.arange(cols, dtype=torch.float32) + c0
    kk, rr, cc = torch.meshgrid(k, r, c, indexing="ij")
    # tensor axes of the stack (k, rows, cols) -> volume axes: the stack axis, then the other two in order
    others = [ax for ax in range(3) if ax != axis]
    idx = [None, None, None]
    idx[axis], idx[others[0]], idx[others[1]] = kk, rr, cc
    dims = vol_dhw.shape
    norm = [2.0 * (idx[i] + float(delta[i])) / max(dims[i] - 1, 1) - 1.0 for i in range(3)]
    grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1)[None]  # grid_sample wants (x=W, y=H, z=D)
    out = F.grid_sample(vol_dhw[None, None].float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[0, 0]


# ------------------------------------------------------------------------------------------ trainer


@dataclass
class TrainConfig:
    """Content-trainer settings. The defaults are the recipe of the committed weights (64 x 64 crops,
    Adam 3e-4 for both networks; ``train_meta.json`` of training/experiments/content_encoder/reports/) and
    the defaults of ``train_content.py train``, which reads them from here."""

    steps: int = 20000
    batch: int = 4
    crop: int | None = 64
    lr: float = 3e-4
    lr_critic: float = 3e-4
    n_critic: int = 1
    max_minutes: float | None = None
    ckpt_every: int = 50
    sample_every: int = 200
    log_every: int = 10
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)
    shift_vox: float = 1.0  # max offset of the shift-symmetry copies (used when weights.uses_shifts)
    grad_clip: float | None = None  # max L2 norm of the generator-side gradient (rare near-empty batches spike)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


class ContentTrainer:
    """Trains the translation model on a :class:`SlicePool`.

    ``out_dir`` receives ``ckpt.pt`` (model, critic, optimisers, step, history; written atomically
    every ``ckpt_every`` steps and at the end, and read back by ``resume=True``), ``log.jsonl`` (one
    line of losses every ``log_every`` steps) and ``samples/step_XXXXXX.png`` (translations of a fixed
    validation batch). Stops after ``steps`` or ``max_minutes`` (total over resumes), whichever first.
    ``model_cfg=None`` takes the resumed checkpoint's architecture (the default one without a
    checkpoint); a given ``model_cfg`` that differs from the checkpoint's raises a ``ValueError``.
    """

    def __init__(self, pool: SlicePool, out_dir, cfg: TrainConfig | None = None,
                 model_cfg: ContentConfig | None = None, device="cpu", val_batch=None, resume: bool = True,
                 progress: bool = True):
        self.pool = pool
        self.cfg = cfg or TrainConfig()
        self.device = torch.device(device)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        ckpt = self.out / "ckpt.pt"
        saved = torch.load(ckpt, map_location=self.device, weights_only=False) if resume and ckpt.exists() else None
        saved_cfg = (ContentConfig.from_dict(saved["model_cfg"])
                     if saved is not None and saved.get("model_cfg") is not None else None)
        if model_cfg is None:  # the resumed checkpoint's architecture, else the default one
            model_cfg = saved_cfg if saved_cfg is not None else ContentConfig()
        elif saved_cfg is not None:
            have, want = saved_cfg.to_dict(), model_cfg.to_dict()
            diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            if diff:  # a clear message instead of load_state_dict's missing / unexpected keys
                raise ValueError(f"{ckpt}: its model differs from the one asked for ("
                                 + ", ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in diff.items())
                                 + "); pass the checkpoint's architecture settings, or start afresh")
        self.model = TranslationModel(model_cfg).to(self.device)
        self.critic = Critic(self.model.cfg).to(self.device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.lr_critic, betas=(0.0, 0.9))
        self.step = 0
        self.elapsed = 0.0
        self.history: list = []
        self.progress = progress
        self.val_batch = val_batch
        if saved is not None:
            self._load_state(saved)

    # -- checkpoints
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "critic": self.critic.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "step": self.step,
                "elapsed": self.elapsed, "history": self.history, "model_cfg": self.model.cfg.to_dict(),
                "train_cfg": json.loads(json.dumps(self.cfg.to_dict())),
                "torch_rng": torch.get_rng_state(), "pool_rng": self.pool.rng.bit_generator.state}

    def save(self, path=None) -> Path:
        path = Path(path or self.out / "ckpt.pt")
        return atomic_torch_save(self.state(), path)

    def load(self, path) -> None:
        self._load_state(torch.load(path, map_location=self.device, weights_only=False))

    def _load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.critic.load_state_dict(st["critic"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.step, self.elapsed, self.history = int(st["step"]), float(st["elapsed"]), list(st["history"])
        torch.set_rng_state(st["torch_rng"].cpu())  # map_location moved it to the device (CUDA resume)
        try:
            self.pool.rng.bit_generator.state = st["pool_rng"]
        except Exception:  # pragma: no cover - a different pool
            pass

    # -- one step
    def train_step(self, xa, a, xb, b, xa_plus=None, xa_minus=None) -> dict:
        w = self.cfg.weights
        xa, a, xb, b = (t.to(self.device) for t in (xa, a, xb, b))
        use_adv = w.adv > 0
        # generator-side forward (critic frozen for this backward)
        for p in self.critic.parameters():
            p.requires_grad_(False)
        out = translation_losses(self.model, xa, a, xb, b, w, self.critic if use_adv else None)
        if w.uses_shifts and xa_plus is not None:
            sym = shift_symmetry(self.model.enc_c, out["c_b"], xa_plus.to(self.device), xa_minus.to(self.device),
                                 ca=out["c_a"])
            out.update(sym)
            out["total"] = (out["total"] + w.shift_symmetry * sym["shift_symmetry"]
                            + w.shift_drift * sym["shift_drift"])
        self.opt_g.zero_grad(set_to_none=True)
        out["total"].backward()
        g_norm = None
        if self.cfg.grad_clip:
            g_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt_g.step()
        for p in self.critic.parameters():
            p.requires_grad_(True)
        logs = {k: float(v.detach()) for k, v in out.items() if k not in ("x_ab", "x_ba", "c_a", "c_b")}
        if g_norm is not None:
            logs["g_norm"] = g_norm  # before clipping
        if use_adv:
            for i in range(self.cfg.n_critic):
                if i == 0:
                    fab, fba = out["x_ab"].detach(), out["x_ba"].detach()
                else:
                    xa, a, xb, b = (t.to(self.device) for t in self.pool.draw(self.cfg.batch, crop=self.cfg.crop))
                    with torch.no_grad():
                        ca, cb = self.model.enc_c(xa), self.model.enc_c(xb)
                        fab = self.model.gen(ca, self.model.enc_s(xb, b), b)
                        fba = self.model.gen(cb, self.model.enc_s(xa, a), a)
                d = critic_loss(self.critic, xa, a, xb, b, fab, fba, w)
                self.opt_d.zero_grad(set_to_none=True)
                d["d_total"].backward()
                self.opt_d.step()
            logs.update({k: float(v.detach()) for k, v in d.items()})
        return logs

    def run(self, log: Callable | None = None) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        base_elapsed = self.elapsed
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="content", mininterval=5.0)
        logf = open(self.out / "log.jsonl", "a")
        stopped = "steps"
        try:
            while self.step < cfg.steps:
                if cfg.max_minutes is not None and self.elapsed >= cfg.max_minutes * 60.0:
                    stopped = "time"
                    break
                shift = cfg.shift_vox if cfg.weights.uses_shifts else 0.0
                pb = self.pool.draw_batch(cfg.batch, crop=cfg.crop, shift_vox=shift)
                self.model.train()
                logs = self.train_step(pb.xa, pb.a, pb.xb, pb.b, pb.xa_plus, pb.xa_minus)
                self.step += 1
                self.elapsed = base_elapsed + time.perf_counter() - t_start
                if self.step % cfg.log_every == 0 or self.step == 1:
                    rec = {"step": self.step, "elapsed_s": round(self.elapsed, 1),
                           **{k: round(v, 5) for k, v in logs.items()}}
                    self.history.append(rec)
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    shown = ("total", "paired_content", "paired_translation", "cycle", "shift_symmetry")
                    bar.set_postfix({k: f"{logs[k]:.3f}" for k in shown if k in logs})
                bar.update(1)
                if self.step % cfg.ckpt_every == 0:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.val_batch is not None:
                    self.sample_png(self.out / "samples" / f"step_{self.step:06d}.png")
        finally:
            bar.close()
            logf.close()
        self.save()
        if self.val_batch is not None:
            self.sample_png(self.out / "samples" / f"step_{self.step:06d}.png")
        summary = {"steps": self.step, "elapsed_s": self.elapsed, "stopped": stopped,
                   "last": self.history[-1] if self.history else {}}
        if log:
            log(json.dumps(summary))
        return summary

    @torch.no_grad()
    def sample_png(self, path) -> Path:
        """Translations of the validation batch (a list of ``(stacks (4, 5, h, w), title)``):
        rows = input contrast, columns = output contrast (diagonal: reconstruction), middle slice."""
        self.model.eval()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = translation_figure(self.model, self.val_batch, title=f"step {self.step}")
        fig.savefig(path, dpi=50)
        import matplotlib.pyplot as plt
        plt.close(fig)
        self.model.train()
        return path


def translation_figure(model: TranslationModel, examples, title: str = ""):
    """A matplotlib figure: for each example ``(stacks (M, 5, h, w) of all M contrasts, label)``, an
    M x (M + 1) block: column 0 the real image, columns 1..M the translations from that row's contrast
    into each contrast (style from the real target stack); middle slice of each stack."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = model.cfg.modalities
    m = len(mods)
    rows = m * len(examples)
    fig, axes = plt.subplots(rows, m + 1, figsize=(1.6 * (m + 1), 1.6 * rows), squeeze=False)
    dev = next(model.parameters()).device
    for e, (st, label) in enumerate(examples):
        st = st.to(dev)
        for i in range(m):
            r = e * m + i
            src = st[i:i + 1]
            axes[r, 0].imshow(st[i, STACK // 2].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_ylabel(f"{label}\n{mods[i]}", fontsize=7)
            for j in range(m):
                out = model.translate(src, st[j:j + 1], j)
                axes[r, j + 1].imshow(out[0, STACK // 2].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    axes[r, j + 1].set_title(f"-> {mods[j]}", fontsize=8)
        axes[0, 0].set_title("input", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def validation_examples(subject, modalities=("t1", "t2", "flair", "pd"), spacing_positions=None) -> list:
    """Three examples (axial, coronal, sagittal middle stacks) of a subject for :func:`translation_figure`;
    coronal/sagittal stacks are flipped so the vertex is up."""
    vol = torch.cat([subject.tensor(m) for m in modalities], dim=1)  # (1, M, D, H, W)
    out = []
    names = ("axial", "coronal", "sagittal")
    for axis in range(3):
        n = vol.shape[2 + axis]
        c = torch.tensor([n // 2 if axis != 0 else int(n * 0.55)])
        st = extract_stacks(vol, axis, c).view(len(modalities), STACK, *vol.shape[2:][:axis], *vol.shape[2:][axis + 1:])
        if axis != 0:
            st = st.flip(-2)
        st, _ = _pad_to(st, 8)
        out.append((st, names[axis]))
    return out


# ------------------------------------------------------------------------------- evaluation helpers


def linear_binned_mi(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Mutual information (nats) of two images in [0, 1] of one shape ``(N, ...)`` -> ``(N,)``, over all
    voxels, joint histogram with linear (triangular Parzen) binning; the classical MI of Maes et al.
    (every voxel of the fixed grid, background included, as registration tools use it unmasked). The MI
    of the content-encoder reports (:func:`similarity_landscape`). Not the same number as
    ``msode_sdk.initialize.mutual_information`` (hard bins, only voxels where either image is non-zero)
    nor as the loss ``msode_train.losses.mi_loss`` (Gaussian Parzen window, negative)."""
    n = a.shape[0]
    a = a.reshape(n, -1).clamp(0, 1) * (bins - 1)
    b = b.reshape(n, -1).clamp(0, 1) * (bins - 1)
    a0 = a.floor().clamp(max=bins - 2)
    b0 = b.floor().clamp(max=bins - 2)
    wa, wb = a - a0, b - b0
    a0, b0 = a0.long(), b0.long()
    joint = torch.zeros(n, bins * bins, dtype=torch.float64, device=a.device)
    for da, fa in ((0, 1 - wa), (1, wa)):
        for db, fb in ((0, 1 - wb), (1, wb)):
            joint.scatter_add_(1, (a0 + da) * bins + (b0 + db), (fa * fb).to(torch.float64))
    joint = joint.view(n, bins, bins)
    joint = joint / joint.sum(dim=(1, 2), keepdim=True)
    pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    nz = joint > 0
    ratio = torch.where(nz, joint / (pa * pb).clamp_min(1e-300), torch.ones_like(joint))
    return (joint * torch.log(ratio)).sum(dim=(1, 2))


DOF_NAMES = ("rx", "ry", "rz", "tx", "ty", "tz")


@torch.no_grad()
def similarity_landscape(moving: torch.Tensor, fixed: torch.Tensor, grid, sim: ContentSimilarity,
                         values: Sequence[float], dof: int, chunk: int = 6, mi_bins: int = 32) -> dict:
    """Content distance and -MI (:func:`linear_binned_mi`) of ``warp(moving, theta)`` vs ``fixed`` with ``theta`` zero except
    ``theta[dof] = v`` (degrees for rotations 0-2, mm for translations 3-5) for every ``v`` in
    ``values``. The content distance uses ``sim``'s fixed positions (call with ``resample=False``)."""
    vals = [float(v) for v in values]
    pos = sim.positions(fixed.shape[2:])
    ff = sim.features(fixed, pos)
    content, mi = [], []
    for s in range(0, len(vals), chunk):
        part = vals[s:s + chunk]
        theta = torch.zeros(len(part), 6)
        theta[:, dof] = torch.tensor(part) * (math.pi / 180.0 if dof < 3 else 1.0)
        warped = _rigid_warp(moving.expand(len(part), *moving.shape[1:]), grid, theta)
        fw = sim.features(warped, pos)
        d = sum(((x - y) ** 2).flatten(1).sum(1) for x, y in zip(fw, [f.expand_as(x) for f, x in zip(ff, fw)]))
        d = d / sum(x[0].numel() for x in fw)
        content += d.tolist()
        mi += linear_binned_mi(warped, fixed.expand_as(warped), mi_bins).tolist()
    return {"values": vals, "content": content, "neg_mi": [-v for v in mi]}


def refine_minimum(values: Sequence[float], curve: Sequence[float]) -> float:
    """Location of the curve's minimum, refined by a parabola through the best sample and its neighbours."""
    v, c = np.asarray(values, float), np.asarray(curve, float)
    i = int(np.argmin(c))
    if 0 < i < len(c) - 1:
        y0, y1, y2 = c[i - 1], c[i], c[i + 1]
        den = y0 - 2 * y1 + y2
        if den > 0:
            return float(v[i] + 0.5 * (y0 - y2) / den * (v[i + 1] - v[i]))
    return float(v[i])


def capture_range(values: Sequence[float], curve: Sequence[float], truth: float = 0.0) -> dict:
    """Monotone capture range around ``truth``: from the sample nearest the truth, how far out (in the
    units of ``values``) the curve rises without a single decrease, on each side (``left``, ``right``
    as positive distances, ``both`` = min). If the curve's minimum is not at the truth's sample the
    range is measured from the minimum but reported relative to the truth; ``full`` = covers the
    sampled interval."""
    v, c = np.asarray(values, float), np.asarray(curve, float)
    i = int(np.argmin(c))
    j = i
    while j + 1 < len(c) and c[j + 1] >= c[j]:
        j += 1
    k = i
    while k - 1 >= 0 and c[k - 1] >= c[k]:
        k -= 1
    right, left = float(v[j] - truth), float(truth - v[k])
    return {"left": left, "right": right, "both": min(left, right), "argmin": float(v[i]),
            "full": bool(j == len(c) - 1 and k == 0)}
