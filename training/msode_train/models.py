"""Per-scale vector-field networks ``f_l(warped, fixed, t) -> d(theta)/dt`` of MS-ODENet.

Every network has exactly the SDK's signature (``msode_sdk.backends._base.NetworkRunner``)::

    forward(warped (N, 1, D, H, W), fixed (N, 1, D, H, W), t (N,)) -> velocity

on one pyramid level whose grid is fixed at construction (``level_grid``), and returns

* rigid:   ``(N, 6)`` = rotation rates (rad / unit time) about x, y, z and translation rates
  (mm / unit time), the SDK's ``theta = (rx, ry, rz, tx, ty, tz)`` convention;
* bspline: ``(N, 3, cz, cy, cx)`` control-point velocities (mm / unit time) of the stage lattice
  ``msode_sdk.transforms.BSplineLattice(model_grid, control_spacing_mm)`` (the lattice lives on the
  model grid at every level, as in the SDK);
* dense:   ``(N, 3, D, H, W)`` voxel velocities (mm / unit time, channels x, y, z) on the level grid.

Design choices (all networks):

* Time enters as a constant extra input channel (``t`` itself; a level owns ``[l-1, l]``) and, for
  the rigid head, also as an input of the fully connected layers.
* The last layer of every CNN field (``rigid_convfc``, ``bspline_fcn``, ``dense_unet``) is
  zero-initialised, so an untrained network is the zero flow
  (``theta_T = theta_0``): training starts from "do nothing", never from a random drift. Outputs are
  multiplied by fixed per-kind scales (``rot_scale`` rad, ``trans_scale`` mm, ``out_scale_mm``), so
  that an O(1) pre-activation is an O(motion) velocity.
* No normalisation layers that depend on the batch (training runs with batch 1-4); LeakyReLU.
* Geometry is explicit rather than learned: the feature maps' voxel-centre coordinates (mm,
  centre-relative, exactly as in :mod:`msode_sdk.transforms`) are computed at construction from the
  level grid and stored as buffers. The rigid head pools features *and* features weighted by x, y, z
  (first moments), which is what a rotation estimate needs (cf. the ``x x grad`` rows of the analytic
  Gauss-Newton field) and what plain global average pooling would throw away. The B-spline head
  pulls encoder features onto the control lattice with the exact (normalised) B-spline weights of
  the feature voxels, so every control point sees the image around it, whatever the level.
* Scriptable with ``torch.jit.script`` and exportable to ONNX opset 17 (Conv, LeakyRelu, ReduceMean,
  Einsum, Resize, Gemm; no GridSample). Spatial shape is fixed per level (the plan fixes it); batch
  is dynamic.

``rigid_feature_gn`` and ``bspline_feature_gn`` are different in kind: ``msode_export.analytic``'s
Gauss-Newton fields (the closed-form step on a feature SSD) whose features are a trainable
:class:`LearnedFeatures` CNN; they ignore ``t``, and only their feature CNN is learned.

Architectures are listed by name (with their transform kind) in :data:`ARCHITECTURES`, this package's
one table of them; a factory is ``factory(level_grid, model_grid, stage_params, **kwargs) -> nn.Module``.
Importing this module (which importing ``msode_train`` does) registers every one of them with
``msode_export.checkpoint.register_architecture``, so that ``msode export`` can rebuild the networks of
a checkpoint; :func:`register_architectures` is also the ``msode.architectures`` entry point
(``pyproject.toml``) through which the export package finds them without importing this package by name.
"""

from __future__ import annotations

import math

from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

from msode_export.analytic import (
    CPU_SLAB_VOXELS,
    MINDSSC,
    BSplineLKField,
    BSplineSSDField,
    DenseGNField,
    DenseSplineField,
    RigidSSDField,
    mind_dilation as default_mind_dilation,
)
from msode_export.checkpoint import register_architecture
from msode_sdk.transforms import BSplineLattice, Grid

__all__ = [
    "RigidNet",
    "BSplineNet",
    "DenseUNet",
    "ContextTrunk",
    "LearnedFeatures",
    "ARCHITECTURES",
    "DEFAULT_ARCH",
    "build_network",
    "register_architectures",
]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1)


def _strided_coords(coords: torch.Tensor, n_down: int) -> torch.Tensor:
    """Voxel-centre coordinates after ``n_down`` convolutions (k=3, stride 2, padding 1): output voxel
    ``i`` is centred on input voxel ``2 i``."""
    for _ in range(n_down):
        coords = coords[::2]
    return coords


def _n_down_for(level_grid: Grid, min_size: int, max_down: int) -> int:
    """How many stride-2 stages keep every axis at least ``min_size`` voxels (at most ``max_down``)."""
    n = 0
    sizes = list(level_grid.shape_xyz)
    while n < max_down and all((s - 1) // 2 + 1 >= min_size for s in sizes):
        sizes = [(s - 1) // 2 + 1 for s in sizes]
        n += 1
    return n


def _time_channel(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    n = ref.shape[0]
    return t.reshape(n, 1, 1, 1, 1).to(ref.dtype).expand(n, 1, ref.shape[2], ref.shape[3], ref.shape[4])


class _Encoder(nn.Module):
    """Input conv then ``n_down`` stride-2 stages (each: strided conv + conv), widths doubling up to
    ``max_width``; LeakyReLU(0.2). Returns the deepest feature map."""

    def __init__(self, cin: int, width: int, n_down: int, max_width: int = 64, first_stride: int = 1):
        super().__init__()
        layers: list[nn.Module] = [_conv(cin, width, first_stride), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(n_down):
            c2 = min(c * 2, max_width)
            layers += [_conv(c, c2, 2), nn.LeakyReLU(0.2), _conv(c2, c2), nn.LeakyReLU(0.2)]
            c = c2
        self.body = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ---------------------------------------------------------------------------------------------- rigid


class RigidNet(nn.Module):
    """Rigid vector field: 3-D conv encoder, moment pooling (mean of features and of features times
    the normalised x, y, z coordinates), two fully connected layers -> 6 (zero-initialised), scaled
    to rad and mm per unit time."""

    def __init__(
        self,
        level_grid: Grid,
        width: int = 16,
        hidden: int = 64,
        max_width: int = 64,
        first_stride: int = 2,
        rot_scale: float = 0.5,
        trans_scale: float = 10.0,
        coord_scale_mm: float = 80.0,
    ):
        super().__init__()
        self.level_shape = tuple(level_grid.shape_dhw)
        first_stride = int(first_stride)
        base = level_grid
        if first_stride == 2:
            base_shape = tuple((s - 1) // 2 + 1 for s in level_grid.shape_xyz)
        else:
            base_shape = level_grid.shape_xyz
        n_down = _n_down_for(Grid(base_shape, level_grid.spacing_xyz), 3, 4)
        self.encoder = _Encoder(3, width, n_down, max_width, first_stride)
        c = self.encoder.out_channels
        # feature-grid coordinates (mm, centre-relative) divided by coord_scale_mm: (1, 1, d, h, w) each
        total = n_down + (1 if first_stride == 2 else 0)
        xs, ys, zs = (_strided_coords(base.axis_coords(a), total) / float(coord_scale_mm) for a in range(3))
        self.register_buffer("cx", xs.reshape(1, 1, 1, 1, -1).clone())
        self.register_buffer("cy", ys.reshape(1, 1, 1, -1, 1).clone())
        self.register_buffer("cz", zs.reshape(1, 1, -1, 1, 1).clone())
        self.fc1 = nn.Linear(4 * c + 1, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 6)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("scale", torch.tensor([rot_scale] * 3 + [trans_scale] * 3, dtype=torch.float32))

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat((warped, fixed, _time_channel(t, warped)), dim=1)
        h = self.encoder(x)
        m0 = h.mean(dim=(2, 3, 4))
        mx = (h * self.cx).mean(dim=(2, 3, 4))
        my = (h * self.cy).mean(dim=(2, 3, 4))
        mz = (h * self.cz).mean(dim=(2, 3, 4))
        z = torch.cat((m0, mx, my, mz, t.reshape(-1, 1).to(h.dtype)), dim=1)
        z = F.leaky_relu(self.fc1(z), 0.2)
        z = F.leaky_relu(self.fc2(z), 0.2)
        return self.out(z) * self.scale


# -------------------------------------------------------------------------------------------- B-spline


class BSplineNet(nn.Module):
    """B-spline vector field: fully convolutional encoder on the level grid, features pulled onto the
    control lattice with normalised B-spline weights, convolutions on the lattice -> 3 channels
    (zero-initialised last layer), scaled to mm per unit time. Output ``(N, 3, cz, cy, cx)``."""

    def __init__(
        self,
        level_grid: Grid,
        lattice: BSplineLattice,
        width: int = 16,
        max_width: int = 64,
        n_down: int | None = None,
        out_scale_mm: float = 8.0,
    ):
        super().__init__()
        if n_down is None:
            # feature voxels no coarser than about half the control spacing, and >= 3 voxels per axis
            n_down = 0
            while n_down < 3:
                sp = level_grid.spacing_xyz[0] * 2 ** (n_down + 1)
                if sp > 0.5 * min(lattice.control_spacing):
                    break
                n_down += 1
            n_down = min(n_down, _n_down_for(level_grid, 3, 3))
        # the first convolution already strides when the features are coarser than the level grid
        first_stride = 2 if n_down >= 1 else 1
        self.encoder = _Encoder(3, width, max(n_down - 1, 0), max_width, first_stride)
        c = self.encoder.out_channels
        bases = []
        for a in range(3):
            coords = _strided_coords(level_grid.axis_coords(a, torch.float64), n_down)
            bases.append(lattice.basis_matrix(coords, a).to(torch.float32))  # (n_feat, n_ctrl)
        bx, by, bz = bases
        self.register_buffer("bx", bx)
        self.register_buffer("by", by)
        self.register_buffer("bz", bz)
        # normaliser: total weight each control point receives from the feature voxels
        w = torch.einsum("x,xm->m", torch.ones(bx.shape[0]), bx)
        wy = torch.einsum("y,yl->l", torch.ones(by.shape[0]), by)
        wz = torch.einsum("z,zk->k", torch.ones(bz.shape[0]), bz)
        norm = wz.reshape(-1, 1, 1) * wy.reshape(1, -1, 1) * w.reshape(1, 1, -1)
        self.register_buffer("inv_norm", (1.0 / norm.clamp(min=1e-2)).reshape(1, 1, *norm.shape))
        self.head = nn.Sequential(
            _conv(c, c),
            nn.LeakyReLU(0.2),
            _conv(c, c),
            nn.LeakyReLU(0.2),
        )
        self.out = _conv(c, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.out_scale = float(out_scale_mm)
        self.coeff_shape = lattice.coeff_shape

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat((warped, fixed, _time_channel(t, warped)), dim=1)
        h = self.encoder(x)  # (N, C, z, y, x)
        h = torch.einsum("nczyx,xm->nczym", h, self.bx)
        h = torch.einsum("nczym,yl->nczlm", h, self.by)
        h = torch.einsum("nczlm,zk->ncklm", h, self.bz) * self.inv_norm  # (N, C, cz, cy, cx)
        h = self.head(h)
        return self.out(h) * self.out_scale


# ----------------------------------------------------------------------------------------------- dense


class DenseUNet(nn.Module):
    """Dense vector field: a small 3-D UNet (``depth`` stride-2 stages, skip connections, trilinear
    upsampling to the skip's exact size) -> 3 channels (zero-initialised), scaled to mm per unit time."""

    def __init__(
        self, level_grid: Grid, width: int = 16, depth: int = 3, max_width: int = 64, out_scale_mm: float = 4.0
    ):
        super().__init__()
        depth = min(int(depth), _n_down_for(level_grid, 2, 4))
        self.inc = nn.Sequential(_conv(3, width), nn.LeakyReLU(0.2))
        downs, ups = [], []
        chans = [width]
        c = width
        for _ in range(depth):
            c2 = min(c * 2, max_width)
            downs.append(nn.Sequential(_conv(c, c2, 2), nn.LeakyReLU(0.2), _conv(c2, c2), nn.LeakyReLU(0.2)))
            chans.append(c2)
            c = c2
        for i in range(depth):
            skip = chans[depth - 1 - i]
            ups.append(nn.Sequential(_conv(c + skip, skip), nn.LeakyReLU(0.2)))
            c = skip
        self.downs = nn.ModuleList(downs)
        self.ups = nn.ModuleList(ups)
        self.out = _conv(c, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.out_scale = float(out_scale_mm)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat((warped, fixed, _time_channel(t, warped)), dim=1)
        h = self.inc(x)
        skips: list[torch.Tensor] = []
        for down in self.downs:
            skips.append(h)
            h = down(h)
        i = 0
        for up in self.ups:
            s = skips[len(skips) - 1 - i]
            h = F.interpolate(h, size=(s.shape[2], s.shape[3], s.shape[4]), mode="trilinear", align_corners=False)
            h = up(torch.cat((h, s), dim=1))
            i += 1
        return self.out(h) * self.out_scale


# ------------------------------------------------------------------------ learned-feature Gauss-Newton


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that, run as TorchScript on CPU without gradients (a plan's feature networks), always
    calls oneDNN. PyTorch's dispatch sends single-image 3-D inputs with ``N C D H < 20480`` (the tissue
    encoder at 8 mm: 1 x 8 x 20 x 30) to its unvectorised native kernel, 6x slower than oneDNN on 2 cores.
    Eager calls (training, ``torch.export``, ONNX tracing) and other devices run the module's own path;
    the two agree to float32 rounding. Same parameters and state-dict keys as ``nn.Conv3d``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.onednn = bool(torch.backends.mkldnn.is_available()) and self.padding_mode == "zeros"
        self.pad_list: List[int] = [int(v) for v in self.padding] if not isinstance(self.padding, str) else []
        self.stride_list: List[int] = [int(v) for v in self.stride]
        self.dilation_list: List[int] = [int(v) for v in self.dilation]
        self.onednn = self.onednn and len(self.pad_list) == 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.jit.is_scripting()
            and self.onednn
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return torch.mkldnn_convolution(
                x, self.weight, self.bias, self.pad_list, self.stride_list, self.dilation_list, self.groups
            )
        return self._conv_forward(x, self.weight, self.bias)


class ContextTrunk(nn.Module):
    """The shared front of the contrast-aware feature CNNs (``msode_train.tissue.TissueEncoder``,
    :class:`LearnedFeatures`): ``(N, 1, D, H, W) -> (N, width, D, H, W)``, conv3 -> conv3
    -> FiLM -> conv3 (dilation 2), LeakyReLU(0.2). The FiLM takes the per-channel mean and mean square
    of the features (what the image's contrast is) through Linear -> LeakyReLU -> Linear
    (zero-initialised: the identity at the start) to ``gamma, beta`` and returns
    ``h * (1 + gamma) + beta``. Subclasses add their heads after :meth:`trunk`; parameter names
    (``c1``, ``c2``, ``film.0``, ``film.2``, ``c3``) are those of the committed weights."""

    def __init__(self, width: int):
        super().__init__()
        w = int(width)
        self.c1 = Conv3d(1, w, 3, padding=1)
        self.c2 = Conv3d(w, w, 3, padding=1)
        self.film = nn.Sequential(nn.Linear(2 * w, 2 * w), nn.LeakyReLU(0.2), nn.Linear(2 * w, 2 * w))
        nn.init.zeros_(self.film[2].weight)
        nn.init.zeros_(self.film[2].bias)
        self.c3 = Conv3d(w, w, 3, padding=2, dilation=2)
        self.width = w

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.c1(x), 0.2)
        h = F.leaky_relu(self.c2(h), 0.2)
        ctx = torch.cat((h.mean(dim=(2, 3, 4)), (h * h).mean(dim=(2, 3, 4))), dim=1)  # (N, 2w)
        gb = self.film(ctx)
        gamma = gb[:, : self.width].reshape(-1, self.width, 1, 1, 1)
        beta = gb[:, self.width :].reshape(-1, self.width, 1, 1, 1)
        return F.leaky_relu(self.c3(h * (1.0 + gamma) + beta), 0.2)


class LearnedFeatures(ContextTrunk):
    """Normalised image ``(N, 1, D, H, W)`` -> ``(N, 1 + channels, D, H, W)`` features on the same grid:
    ``a * image`` (``a`` a learned scalar, ``intensity_init`` at start) followed by ``channels`` learned maps.

    :class:`ContextTrunk` (conv3 -> conv3 -> FiLM(the image's contrast) -> conv3,
    dilation 2) -> conv1. The learned maps start small but not zero: a Gauss-Newton step's derivative with
    respect to a feature channel that is identically zero is zero, so zero-initialised channels
    would never learn. The same holds for ``a``: with ``intensity_init`` 1 the untrained field is
    (almost) the intensity-SSD flow and training may turn the intensities down; with 0 the intensity
    channel stays zero for good (no gradient reaches ``a``) and the field is a Gauss-Newton step on
    the learned channels alone, random at the start, i.e. everything useful must be learned (the
    similarity ablation's set-up).
    """

    def __init__(self, width: int = 8, channels: int = 3, init_scale: float = 0.1, intensity_init: float = 1.0):
        super().__init__(width)
        self.out = Conv3d(self.width, int(channels), 1)
        with torch.no_grad():
            self.out.weight.mul_(float(init_scale))
            self.out.bias.zero_()
        self.intensity_gain = nn.Parameter(torch.full((1,), float(intensity_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x * self.intensity_gain.reshape(1, 1, 1, 1, 1), self.out(self.trunk(x))), dim=1)


class MINDPlusLearned(ContextTrunk):
    """Normalised image ``(N, 1, D, H, W)`` -> ``(N, 6 + channels, D, H, W)``: 6-neighbourhood MIND
    (:class:`msode_export.analytic.MINDSSC`, ``mind_dilation`` voxels), each channel times a learned gain
    (1 at the start), followed by ``channels`` learned maps (:class:`ContextTrunk` -> conv1, which sees
    the image's contrast through its FiLM).

    Starts as (almost) plan v2's MIND features, so training through the loop begins from the shipped
    fields and learns what MIND gets wrong between contrasts. The learned maps start small but not zero
    (``init_scale``): a Gauss-Newton step's derivative with respect to an identically zero feature channel
    is zero, so such a channel would never learn (see :class:`LearnedFeatures`)."""

    def __init__(
        self,
        width: int = 8,
        channels: int = 2,
        mind_dilation: int = 2,
        init_scale: float = 0.05,
        slab_voxels: int = CPU_SLAB_VOXELS,
    ):
        super().__init__(width)
        self.mind = MINDSSC(radius=1, dilation=int(mind_dilation), neighbourhood="six", slab_voxels=slab_voxels)
        self.mind_gain = nn.Parameter(torch.ones(6))
        self.out = Conv3d(self.width, int(channels), 1)
        with torch.no_grad():
            self.out.weight.mul_(float(init_scale))
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.mind(x) * self.mind_gain.reshape(1, 6, 1, 1, 1), self.out(self.trunk(x))), dim=1)


class MINDGains(nn.Module):
    """Normalised image ``(N, 1, D, H, W)`` -> ``(N, 6, D, H, W)``: 6-neighbourhood MIND times 6 learned gains
    (1 at the start): :class:`MINDPlusLearned` without its learned maps, for levels where a CNN per
    evaluation costs more than it gives (the plan's finest B-spline level: 4 evaluations at full resolution)."""

    def __init__(self, mind_dilation: int = 2, slab_voxels: int = CPU_SLAB_VOXELS):
        super().__init__()
        self.mind = MINDSSC(radius=1, dilation=int(mind_dilation), neighbourhood="six", slab_voxels=slab_voxels)
        self.mind_gain = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mind(x) * self.mind_gain.reshape(1, 6, 1, 1, 1)


# -------------------------------------------------------------------------------------------- registry


def _rigid_factory(level_grid: Grid, model_grid: Grid, stage_params: dict, **kwargs) -> nn.Module:
    return RigidNet(level_grid, **kwargs)


def _bspline_factory(level_grid: Grid, model_grid: Grid, stage_params: dict, **kwargs) -> nn.Module:
    lattice = BSplineLattice(model_grid, tuple(stage_params["control_spacing_mm"]))
    return BSplineNet(level_grid, lattice, **kwargs)


def _dense_factory(level_grid: Grid, model_grid: Grid, stage_params: dict, **kwargs) -> nn.Module:
    return DenseUNet(level_grid, **kwargs)


def _rigid_gn_factory(
    level_grid: Grid,
    model_grid: Grid,
    stage_params: dict,
    width: int = 8,
    channels: int = 3,
    gain: float = 5.0,
    damping: float = 1e-3,
    pool: int = 1,
    **kwargs,
) -> nn.Module:
    return RigidSSDField(
        level_grid, gain=gain, damping=damping, pool=pool, features=LearnedFeatures(width, channels, **kwargs)
    )


def _bspline_gn_factory(
    level_grid: Grid,
    model_grid: Grid,
    stage_params: dict,
    width: int = 8,
    channels: int = 3,
    gain: float = 5.0,
    damping: float = 0.05,
    pool: int = 1,
    **kwargs,
) -> nn.Module:
    lattice = BSplineLattice(model_grid, tuple(stage_params["control_spacing_mm"]))
    return BSplineSSDField(
        level_grid, lattice, gain=gain, damping=damping, pool=pool, features=LearnedFeatures(width, channels, **kwargs)
    )


#: z-slab size of fields trained under autograd: the whole volume at once
TRAINING_SLAB_VOXELS = 1 << 40


def per_level(value, level_grid: Grid, model_grid: Grid):
    """``value``, or for a list (one entry per level, coarse first, the last on the model grid) the
    entry of ``level_grid``: levels are 2x steps, so the entry counted from the fine end is
    ``log2(level spacing / model spacing)``."""
    if not isinstance(value, (list, tuple)):
        return value
    from_fine = int(round(math.log2(max(level_grid.spacing_xyz) / max(model_grid.spacing_xyz))))
    if not 0 <= from_fine < len(value):
        raise ValueError(f"per-level value {list(value)} has no entry for the level at {level_grid.spacing_xyz} mm")
    return value[len(value) - 1 - from_fine]


def _mind_learned_features(
    level_grid: Grid,
    model_grid: Grid,
    width: int | list,
    channels: int | list,
    init_scale: float,
    slab_voxels: int,
    mind_dilation: int | list | None,
) -> nn.Module:
    """One level's features of the ``*_lk_mind_learned`` fields: :class:`MINDPlusLearned` (:class:`MINDGains`
    where ``channels`` is 0); ``mind_dilation`` default ``msode_export.analytic.mind_dilation`` of the level's
    spacing (the plans' MIND)."""
    if mind_dilation is None:
        dil = default_mind_dilation(max(level_grid.spacing_xyz))
    else:
        dil = int(per_level(mind_dilation, level_grid, model_grid))
    width, channels = int(per_level(width, level_grid, model_grid)), int(per_level(channels, level_grid, model_grid))
    if channels < 0:
        raise ValueError(f"channels must be >= 0, got {channels}")
    if channels == 0:
        return MINDGains(mind_dilation=dil, slab_voxels=slab_voxels)
    return MINDPlusLearned(width, channels, mind_dilation=dil, init_scale=init_scale, slab_voxels=slab_voxels)


def _bspline_lk_factory(
    level_grid: Grid,
    model_grid: Grid,
    stage_params: dict,
    width: int | list = 8,
    channels: int | list = 2,
    init_scale: float = 0.05,
    slab_voxels: int = TRAINING_SLAB_VOXELS,
    mind_dilation: int | list | None = None,
    **kwargs,
) -> nn.Module:
    """Plan v2's B-spline field (:class:`msode_export.analytic.BSplineLKField`: local block solves fitted
    by the spline) on :class:`MINDPlusLearned` features (:class:`MINDGains` where ``channels`` is 0).
    ``width``, ``channels``, ``mind_dilation`` (voxels; default ``msode_export.analytic.mind_dilation`` of the
    level's spacing) and the field's ``kwargs`` (``gain``, ``block_mm``, ``window_blocks``, ``damping``,
    ``fit_smoothing``) are each a value or a per-level list (coarse first). ``slab_voxels``:
    default one slab (under autograd every slab's slice costs a zero-filled full-size gradient; the plan
    builder sets the CPU inference slabs again)."""
    lattice = BSplineLattice(model_grid, tuple(stage_params["control_spacing_mm"]))
    kw = {k: per_level(v, level_grid, model_grid) for k, v in kwargs.items()}
    feats = _mind_learned_features(level_grid, model_grid, width, channels, init_scale, slab_voxels, mind_dilation)
    return BSplineLKField(level_grid, lattice, features=feats, slab_voxels=slab_voxels, **kw)


def _dense_lk_factory(
    level_grid: Grid,
    model_grid: Grid,
    stage_params: dict,
    width: int | list = 8,
    channels: int | list = 2,
    init_scale: float = 0.05,
    slab_voxels: int = TRAINING_SLAB_VOXELS,
    mind_dilation: int | list | None = None,
    spline_fit: bool | list = False,
    spline_spacing_mm: float = 40.0,
    **kwargs,
) -> nn.Module:
    """rigid_dense.plan's dense field on the features of :func:`_bspline_lk_factory`: where ``spline_fit``
    (per level) :class:`msode_export.analytic.DenseSplineField` (the block solutions' fit by the cubic
    B-spline of ``spline_spacing_mm`` on the model grid, sampled at every voxel), else
    :class:`~msode_export.analytic.DenseGNField` (free-form: the block solutions interpolated). The other
    arguments as :func:`_bspline_lk_factory`'s; the field's ``kwargs``: ``gain``, ``block_mm``,
    ``window_blocks``, ``damping`` (and ``fit_smoothing`` where spline-fitted)."""
    kw = {k: per_level(v, level_grid, model_grid) for k, v in kwargs.items()}
    feats = _mind_learned_features(level_grid, model_grid, width, channels, init_scale, slab_voxels, mind_dilation)
    if bool(per_level(spline_fit, level_grid, model_grid)):
        lattice = BSplineLattice(model_grid, (float(spline_spacing_mm),) * 3)
        return DenseSplineField(level_grid, lattice, features=feats, slab_voxels=slab_voxels, **kw)
    kw.pop("fit_smoothing", None)  # a spline-fit setting; the free-form levels have no fit
    return DenseGNField(level_grid, features=feats, slab_voxels=slab_voxels, **kw)


Factory = Callable[..., nn.Module]

#: name -> (transform kind, factory(level_grid, model_grid, stage_params, **kwargs))
ARCHITECTURES: dict[str, tuple[str, Factory]] = {
    "rigid_convfc": ("rigid", _rigid_factory),
    "bspline_fcn": ("bspline", _bspline_factory),
    "dense_unet": ("dense", _dense_factory),
    # a Gauss-Newton step on the SSD of learned features (msode_export.analytic fields + LearnedFeatures)
    "rigid_feature_gn": ("rigid", _rigid_gn_factory),
    "bspline_feature_gn": ("bspline", _bspline_gn_factory),
    # plan v2's local-block B-spline field on MIND + learned channels (the shipped field at the start)
    "bspline_lk_mind_learned": ("bspline", _bspline_lk_factory),
    # rigid_dense.plan's dense field (spline-fitted or free-form per level) on the same features
    "dense_lk_mind_learned": ("dense", _dense_lk_factory),
}
#: default architecture per transform kind
DEFAULT_ARCH = {"rigid": "rigid_convfc", "bspline": "bspline_fcn", "dense": "dense_unet"}


def build_network(arch: str, level_grid: Grid, model_grid: Grid, stage_params: dict, **kwargs) -> nn.Module:
    """Instantiate a registered architecture for one level."""
    try:
        _, factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; valid: {sorted(ARCHITECTURES)}") from None
    return factory(level_grid, model_grid, stage_params, **kwargs)


def register_architectures() -> list[str]:
    """Register every architecture of :data:`ARCHITECTURES` with ``msode_export.checkpoint`` (idempotent:
    re-registering replaces); returns their names. Run on import, and the ``msode.architectures`` entry
    point."""
    for name, (_, factory) in ARCHITECTURES.items():
        register_architecture(name, factory)
    return sorted(ARCHITECTURES)


register_architectures()
