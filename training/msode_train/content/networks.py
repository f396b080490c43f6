"""The translation model of the content similarity: content encoder ``E^c``, style encoder ``E^s``,
generator ``G`` and the training-only critic ``D`` (described in :mod:`msode_train.content`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "STACK",
    "ContentConfig",
    "ContentEncoder",
    "StyleEncoder",
    "Generator",
    "Critic",
    "TranslationModel",
    "n_parameters",
]

STACK = 5  # adjacent slices per 2-D input (paper: "number of slices set to 5")


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
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1, padding_mode="reflect"), _ChannelNorm(nxt), nn.ReLU(inplace=True)]
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
            _conv(cfg.stack + cfg.n_modalities, ch, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1, padding_mode="reflect"),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1, padding_mode="reflect"),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1, padding_mode="reflect"),
            nn.ReLU(inplace=True),
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
        self.mlp = nn.Sequential(nn.Linear(cfg.style_dim, 64), nn.ReLU(inplace=True), nn.Linear(64, 4 * ch * cfg.n_res))
        ups = []
        for i in range(cfg.n_down):
            nxt = max(ch // 2, cfg.base_channels)
            ups += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                _conv(ch, nxt, 3),
                _LayerNorm2d(nxt),
                nn.ReLU(inplace=True),
            ]
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
            nn.Conv2d(cfg.stack + cfg.n_modalities, ch, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
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
