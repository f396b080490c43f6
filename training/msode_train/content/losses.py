"""Training losses of the translation model: the paper's MUNIT-like terms, the paired terms and the
registration-aware shift terms (described in :mod:`msode_train.content`); the WGAN-GP critic loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .networks import ContentEncoder, Critic, TranslationModel

__all__ = ["LossWeights", "translation_losses", "code_distance", "shift_symmetry", "gradient_penalty", "critic_loss"]


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


def translation_losses(
    model: TranslationModel, xa, a, xb, b, weights: LossWeights | None = None, critic: Critic | None = None
) -> dict:
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


def shift_symmetry(
    enc_c: "ContentEncoder",
    cb: torch.Tensor,
    xa_plus: torch.Tensor,
    xa_minus: torch.Tensor,
    ca: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> dict:
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
    drift = (d_real**2).mean()
    total = -wdist + weights.gp * gp + weights.drift * drift
    return {"wdist": wdist, "gp": gp, "d_total": total}
