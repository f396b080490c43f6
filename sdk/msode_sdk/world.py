"""Native images and the model grid: the preprocessing and the world outputs of a registration, written once.

The Python SDK (:class:`msode_sdk.Registrar`) and the plan's ``registrar.ts`` (its ``register_native``
method, used by the C++ library) both run these functions -- TorchScript compiles them into the module --
so the two cannot drift. Every function takes tensors, lists and numbers only; maps between voxel and
world coordinates are composed in float64 on the tensors' device and applied in float32.

Layouts: a native image is a ``(N, C, n0, n1, n2)`` tensor in its own array order (NIfTI ``(X, Y, Z)``,
no transposing copy); a model-grid volume is ``(N, C, D, H, W)`` with ``D = z``; affines are 4x4 float64
voxel -> RAS mm; points are RAS mm. Conventions of the outputs (those of
:class:`msode_sdk.RegistrationResult`): the warped moving image on the fixed native grid (trilinear,
zeros outside), the displacement ``(n0, n1, n2, 3)`` in LPS mm (ITK/ANTs: fixed point ``p`` maps to
moving point ``p + d(p)``), the rigid part as a 4x4 RAS matrix, fixed point -> moving point.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "index_to_normalised",
    "sampling_theta",
    "affine_field",
    "gaussian_blur_axes",
    "image_centre",
    "resample_to_grid",
    "normalise_percentiles",
    "percentile_range",
    "prepare_on_grid",
    "resample_to_grid_with_fov",
    "quantiles",
    "axis_permutation",
    "world_outputs",
]


def _normalised_to_index(shape: List[int], device: torch.device) -> torch.Tensor:
    """4x4 float64: ``grid_sample`` coordinates of an ``(n0, n1, n2)`` tensor, in its order ``(c2, c1, c0)``
    (align_corners), -> voxel index ``(i0, i1, i2, 1)``."""
    m = torch.zeros([4, 4], dtype=torch.float64, device=device)
    for a in range(3):
        half = (shape[a] - 1) / 2.0
        m[a, 2 - a] = half
        m[a, 3] = half
    m[3, 3] = 1.0
    return m


def index_to_normalised(shape: List[int], device: torch.device) -> torch.Tensor:
    """4x4 float64: voxel index ``(i0, i1, i2, 1)`` of an ``(n0, n1, n2)`` tensor -> its ``grid_sample``
    coordinates ``(c2, c1, c0, 1)`` (align_corners; an axis of one voxel maps to 0)."""
    m = torch.zeros([4, 4], dtype=torch.float64, device=device)
    for a in range(3):
        half = max((shape[a] - 1) / 2.0, 1e-12)
        m[2 - a, a] = 1.0 / half
        m[2 - a, 3] = -1.0 if shape[a] > 1 else 0.0
    m[3, 3] = 1.0
    return m


def sampling_theta(out_to_src: torch.Tensor, out_shape: List[int], src_shape: List[int]) -> torch.Tensor:
    """``(1, 3, 4)`` float32 ``affine_grid`` matrix that samples a source tensor of spatial shape
    ``src_shape`` on an output tensor of spatial shape ``out_shape``, given the 4x4 float64 map
    ``out_to_src`` from output voxel indices to source voxel indices."""
    dev = out_to_src.device
    m = index_to_normalised(src_shape, dev) @ out_to_src @ _normalised_to_index(out_shape, dev)
    return m[:3].to(torch.float32).unsqueeze(0)


def affine_field(m34: torch.Tensor, shape: List[int], start: int = 0, stop: int = -1) -> torch.Tensor:
    """``m34 @ (i, j, k, 1)`` at every voxel of a grid of ``shape`` (rows ``start:stop`` of axis 0; ``stop``
    -1: to the end): ``(rows, n1, n2, 3)`` float32, as the broadcast sum of one term per axis (composed in
    float64; cheaper than ``affine_grid``'s product)."""
    dev = m34.device
    stop = shape[0] if stop < 0 else stop
    i = torch.arange(start, stop, dtype=torch.float64, device=dev)
    j = torch.arange(shape[1], dtype=torch.float64, device=dev)
    k = torch.arange(shape[2], dtype=torch.float64, device=dev)
    t0 = (i[:, None] * m34[:, 0][None, :] + m34[:, 3][None, :]).to(torch.float32).reshape(stop - start, 1, 1, 3)
    t1 = (j[:, None] * m34[:, 1][None, :]).to(torch.float32).reshape(1, shape[1], 1, 3)
    t2 = (k[:, None] * m34[:, 2][None, :]).to(torch.float32).reshape(1, 1, shape[2], 3)
    return t0 + t1 + t2


def gaussian_blur_axes(vol: torch.Tensor, sigmas: List[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, n0, n1, n2)`` with per-axis sigma in voxels (below 0.3: none)."""
    for axis in range(3):
        sigma = sigmas[axis]
        if sigma < 0.3:
            continue
        # 3 sigma, but never more than twice the axis (thin slabs far finer than the grid would
        # otherwise pad the volume to thousands of slices; beyond 2n the truncation is immaterial)
        radius = int(min(math.ceil(3.0 * sigma), 2 * vol.shape[2 + axis]))
        x = torch.arange(-radius, radius + 1, dtype=vol.dtype, device=vol.device)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = radius
        pad[2 * (2 - axis) + 1] = radius
        vol = F.conv3d(F.pad(vol, pad, mode="replicate"), k.reshape(shape))
    return vol


def quantiles(flat: torch.Tensor, qs: List[float]) -> List[float]:
    """``torch.quantile(flat.double(), q)`` for each ``q`` in ``qs`` (linear interpolation between the
    order statistics at ``floor`` / ``ceil`` of ``q (n - 1)``, as numpy's default), without sorting all of
    ``flat`` (1-D, finite): tail quantiles read the ``k`` smallest or largest values (``topk``, O(n log k);
    the 0.5 / 99.5 % percentiles of a 2 M-voxel sample: 8x faster than ``torch.quantile`` on CPU, and
    faster than ``kthvalue`` selection), others sort. The order statistics of a float32 sample are those
    of its float64 copy, so the result is identical."""
    n = flat.numel()
    out: List[float] = []
    for q in qs:
        rank = q * (n - 1)
        below = min(int(math.floor(rank)), n - 1)
        above = min(below + 1, n - 1)
        if below + 1 <= n // 16:  # lower tail: the above + 1 smallest, ascending
            vals = torch.topk(flat, above + 1, largest=False, sorted=True)[0]
            v_lo, v_hi = vals[below], vals[above]
        elif n - below <= n // 16:  # upper tail: the n - below largest, descending
            vals = torch.topk(flat, n - below, largest=True, sorted=True)[0]
            v_lo, v_hi = vals[n - 1 - below], vals[n - 1 - above]
        else:
            vals = torch.sort(flat)[0]
            v_lo, v_hi = vals[below], vals[above]
        lo, hi = float(v_lo.double()), float(v_hi.double())
        out.append(lo + (hi - lo) * (rank - below))
    return out


def image_centre(native: torch.Tensor, affine: torch.Tensor, mode: str) -> torch.Tensor:
    """RAS mm centre ``(3,)`` float64 of a native image ``(1, 1, n0, n1, n2)``: field-of-view centre
    (``fov``) or the intensity centre of mass (``com``) of the voxels above the 2nd percentile."""
    shape = [native.shape[2], native.shape[3], native.shape[4]]
    dev = native.device
    if mode == "com":
        arr = native[0, 0].to(torch.float64)
        flat = arr.reshape(-1)
        lo = quantiles(flat[:: max(1, flat.numel() // 2_000_000)], [0.02])[0]
        w = (arr - lo).clamp(min=0.0)
        total = float(w.sum())
        if total > 0:
            c = (
                torch.stack(
                    [
                        (w.sum(dim=(1, 2)) * torch.arange(shape[0], dtype=torch.float64, device=dev)).sum(),
                        (w.sum(dim=(0, 2)) * torch.arange(shape[1], dtype=torch.float64, device=dev)).sum(),
                        (w.sum(dim=(0, 1)) * torch.arange(shape[2], dtype=torch.float64, device=dev)).sum(),
                    ]
                )
                / total
            )
            return affine[:3, :3] @ c + affine[:3, 3]
    c = torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64, device=dev)
    return affine[:3, :3] @ c + affine[:3, 3]


def resample_to_grid(
    vol: torch.Tensor, affine: torch.Tensor, shape_xyz: List[int], spacing_xyz: List[float], centre: torch.Tensor
) -> torch.Tensor:
    """A native image ``(1, 1, n0, n1, n2)`` (voxel -> RAS ``affine``) on the axis-aligned RAS grid of
    ``shape_xyz`` voxels of ``spacing_xyz`` mm centred at ``centre``: ``(1, 1, D, H, W)``.

    Anti-aliasing for inputs finer than the grid: along each source axis whose voxels are ``r`` times
    smaller than the grid's finest spacing, ``floor(r)`` voxels are first averaged (a strided box filter;
    the pooled voxel centres are tracked exactly in the affine), then a Gaussian of
    ``sigma = 0.5 * sqrt(r'^2 - 1)`` pooled voxels takes the remaining ratio ``r'``."""
    vol, grid = _sampling(vol, affine, shape_xyz, spacing_xyz, centre)
    return F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def resample_to_grid_with_fov(
    vol: torch.Tensor, affine: torch.Tensor, shape_xyz: List[int], spacing_xyz: List[float], centre: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`resample_to_grid` and the image's field of view on the grid ``(1, 1, D, H, W)`` float32: 1
    where the sample had the image's data on all sides (inside its voxel box), 0 where it was padding."""
    vol, grid = _sampling(vol, affine, shape_xyz, spacing_xyz, centre)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    tol = 1.0 + 1e-4
    steps = [max(int(grid.shape[1]) - 1, 1), max(int(grid.shape[2]) - 1, 1), max(int(grid.shape[3]) - 1, 1)]
    corners = grid[:, :: steps[0], :: steps[1], :: steps[2]]  # (a grid one voxel thick has one "corner")
    if bool((corners.abs() <= tol).all()):  # the grid is an affine box: all its corners inside, all inside
        return out, torch.ones_like(out)
    g = grid.abs()
    fov = (g[..., 0] <= tol) & (g[..., 1] <= tol) & (g[..., 2] <= tol)
    return out, fov.unsqueeze(1).to(torch.float32)


def _sampling(
    vol: torch.Tensor, affine: torch.Tensor, shape_xyz: List[int], spacing_xyz: List[float], centre: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The anti-aliased volume and the ``grid_sample`` grid (normalised source coordinates) of
    :func:`resample_to_grid`."""
    dev = vol.device
    affine = affine.to(torch.float64)
    src_spacing = torch.linalg.vector_norm(affine[:3, :3], dim=0)
    finest = min(spacing_xyz[0], spacing_xyz[1], spacing_xyz[2])
    ratio: List[float] = (finest / src_spacing).tolist()
    pool: List[int] = []
    for a in range(3):
        p = max(int(math.floor(ratio[a] + 1e-6)), 1)
        pool.append(max(min(p, int(vol.shape[2 + a]) // 2), 1))
    if pool[0] > 1 or pool[1] > 1 or pool[2] > 1:
        vol = F.avg_pool3d(vol, kernel_size=[pool[0], pool[1], pool[2]])
        # pooled voxel i covers source voxels [f i, f i + f - 1]: its centre is f i + (f - 1) / 2
        scale = torch.eye(4, dtype=torch.float64, device=dev)
        for a in range(3):
            scale[a, a] = float(pool[a])
            scale[a, 3] = (pool[a] - 1) / 2.0
        affine = affine @ scale
    sigmas: List[float] = []
    for a in range(3):
        rest = ratio[a] / pool[a]
        sigmas.append(0.5 * math.sqrt(max(rest * rest - 1.0, 0.0)))
    vol = gaussian_blur_axes(vol, sigmas)
    model_to_world = torch.eye(4, dtype=torch.float64, device=dev)
    for a in range(3):
        model_to_world[a, a] = spacing_xyz[a]
        model_to_world[a, 3] = centre[a] - (shape_xyz[a] - 1) / 2.0 * spacing_xyz[a]
    vox = torch.linalg.inv(affine) @ model_to_world
    # the output tensor is (Z, Y, X): its index order is the reverse of the model voxel (x, y, z)
    rev = torch.zeros([4, 4], dtype=torch.float64, device=dev)
    rev[0, 2] = 1.0
    rev[1, 1] = 1.0
    rev[2, 0] = 1.0
    rev[3, 3] = 1.0
    out_shape = [shape_xyz[2], shape_xyz[1], shape_xyz[0]]
    theta = sampling_theta(vox @ rev, out_shape, [int(vol.shape[2]), int(vol.shape[3]), int(vol.shape[4])])
    grid = F.affine_grid(theta, [1, 1, out_shape[0], out_shape[1], out_shape[2]], align_corners=True)
    return vol, grid


def percentile_range(sample: torch.Tensor, low_pct: float, high_pct: float, what: str = "") -> Tuple[float, float]:
    """The ``low_pct`` / ``high_pct`` percentiles of ``sample`` (linear interpolation, as numpy's default;
    float64); a degenerate range falls back to the sample's min / max. Raises ``ValueError(what + "image has
    no intensity range ...")`` when that is degenerate too."""
    flat = sample.reshape(-1)
    q = quantiles(flat, [low_pct / 100.0, high_pct / 100.0])
    lo = q[0]
    hi = q[1]
    if not hi > lo:  # very sparse images: fall back to the full range
        lo = float(flat.min())
        hi = float(flat.max())
    if not hi > lo:
        raise ValueError(what + "image has no intensity range to normalise")
    return lo, hi


def normalise_percentiles(
    vol: torch.Tensor, sample: torch.Tensor, low_pct: float, high_pct: float, what: str = ""
) -> torch.Tensor:
    """Map intensities so that the ``low_pct`` / ``high_pct`` percentiles of ``sample`` (:func:`percentile_range`)
    become 0 and 1, clipped to ``[0, 1]``."""
    lo, hi = percentile_range(sample, low_pct, high_pct, what)
    return ((vol - lo) / (hi - lo)).clamp(0.0, 1.0)


def prepare_on_grid(
    native: torch.Tensor,
    affine: torch.Tensor,
    shape_xyz: List[int],
    spacing_xyz: List[float],
    centre: torch.Tensor,
    low_pct: float,
    high_pct: float,
    what: str = "",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A native image ``(1, 1, n0, n1, n2)`` on the model grid (:func:`resample_to_grid_with_fov`),
    normalised by its own percentiles (:func:`normalise_percentiles`, of at most 2 M voxels): ``(volume in
    [0, 1], field of view)``. Outside its field of view the volume is 0, the normalised low percentile: the
    image is shifted by that percentile before resampling, so padding reads as background whatever the
    image's own background (CT's -1000 HU, a negative or z-scored image; padding with a raw 0 made a bright
    frame there that the rigid stage aligned: 45 mm off on a -200-offset pair)."""
    flat = native.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 2_000_000)]
    lo, hi = percentile_range(sample, low_pct, high_pct, what)
    src = native - lo if lo != 0.0 else native  # MRI's background is 0: no extra pass
    vol, fov = resample_to_grid_with_fov(src, affine, shape_xyz, spacing_xyz, centre)
    return (vol / (hi - lo)).clamp(0.0, 1.0), fov


def axis_permutation(direction: torch.Tensor) -> List[int]:
    """For a 3x3 voxel -> RAS matrix whose columns are each parallel to one RAS axis (a signed, scaled
    permutation), the native axis of each model axis x, y, z; else ``[]`` (oblique)."""
    d: List[List[float]] = direction.abs().tolist()
    axis_of: List[int] = []
    for m in range(3):
        row = d[m]
        a = 0
        for c in range(1, 3):
            if row[c] > row[a]:
                a = c
        if row[a] <= 0:
            return []
        for c in range(3):
            if c != a and row[c] > 1e-6 * row[a]:
                return []
        for r in range(3):
            if r != m and d[r][a] > 1e-6 * row[a]:
                return []
        axis_of.append(a)
    if sorted(axis_of) != [0, 1, 2]:
        return []
    return axis_of


def _bspline_basis(coords: torch.Tensor, n_ctrl: int, cs: float) -> torch.Tensor:
    """``(len(coords), n_ctrl)`` uniform cubic B-spline basis of a centred lattice (BSplineLattice.basis_matrix)."""
    p = (torch.arange(n_ctrl, dtype=coords.dtype, device=coords.device) - (n_ctrl - 1) / 2.0) * cs
    a = ((coords[:, None] - p[None, :]) / cs).abs()
    inner = 2.0 / 3.0 - a * a + 0.5 * a * a * a
    outer = (2.0 - a).clamp(min=0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def _axis_coords(n: int, vox_to_x: torch.Tensor, m: int, a: int) -> torch.Tensor:
    """Model coordinate ``m`` (mm) along native axis ``a`` for a grid whose axis ``a`` is model axis ``m``."""
    idx = torch.arange(n, dtype=torch.float64, device=vox_to_x.device)
    return (vox_to_x[m, a] * idx + vox_to_x[m, 3]).to(torch.float32)


def _bspline_native(
    coeffs: torch.Tensor,
    bparams: List[float],
    vox_to_x: torch.Tensor,
    axis_of: List[int],
    shape: List[int],
    mix: torch.Tensor,
    lin: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``lin @ (i, j, k, 1) + mix @ u(x)`` of a B-spline stage (``coeffs (1, 3, cz, cy, cx)``, ``bparams`` =
    control spacing x, y, z and control counts x, y, z; ``lin`` 3x4 and ``mix`` 3x3 float64) at every voxel
    ``(i, j, k)`` of a native grid whose axes are parallel to the model axes, as two factors ``(cols,
    rows)``: ``(cols[a:b] @ rows).reshape(b - a, n1, n2, 3)`` is the field on rows ``a:b`` of axis 0.

    Separable synthesis of the mixed coefficients along native axes 2 and 1 gives ``rows``; the contraction
    along axis 0 also adds the affine part (its terms are extra rows: a column of ones and one of ``i``
    per output component), so a full-size field is written once by one matrix product, not summed from
    full-size parts (at 240x240x160 those sums were most of the output stage on CPU)."""
    dev = coeffs.device
    model_of = [0, 0, 0]  # the model axis (x 0, y 1, z 2) of each native axis
    for m in range(3):
        model_of[axis_of[m]] = m
    basis: List[torch.Tensor] = []
    for a in range(3):
        m = model_of[a]
        basis.append(_bspline_basis(_axis_coords(shape[a], vox_to_x, m, a), int(bparams[3 + m]), bparams[m]))
    mixed = torch.einsum("ij,jzyx->izyx", mix.to(torch.float32), coeffs[0].to(torch.float32))
    # coefficient dims in native axis order: model axis m is dim 3 - m of (c, z, y, x)
    mixed = mixed.permute([0, 3 - model_of[0], 3 - model_of[1], 3 - model_of[2]])  # (3, k0, k1, k2)
    t = torch.einsum("cabr,nr->cabn", mixed, basis[2])  # (3, k0, k1, n2)
    t = torch.einsum("cabn,mb->amnc", t, basis[1])  # (k0, n1, n2, 3)
    k0 = t.shape[0]
    rest = shape[1] * shape[2] * 3
    j = torch.arange(shape[1], dtype=torch.float64, device=dev)
    k = torch.arange(shape[2], dtype=torch.float64, device=dev)
    # rows of the contraction: k0 B-spline rows, the (j, k, 1) affine terms, one indicator per component
    ones_row = (
        j[:, None, None] * lin[:, 1][None, None, :] + k[None, :, None] * lin[:, 2][None, None, :] + lin[:, 3]
    ).to(torch.float32)
    indicator = torch.eye(3, dtype=torch.float32, device=dev).reshape(3, 1, 1, 3).expand(3, shape[1], shape[2], 3)
    rows = torch.cat([t.reshape(k0, rest), ones_row.reshape(1, rest), indicator.reshape(3, rest)], dim=0)
    i = torch.arange(shape[0], dtype=torch.float64, device=dev)
    cols = torch.cat(
        [
            basis[0],
            torch.ones([shape[0], 1], dtype=torch.float32, device=dev),
            (i[:, None] * lin[:, 0][None, :]).to(torch.float32),
        ],
        dim=1,
    )  # (n0, k0 + 4)
    return cols, rows


def lerp_rows(v: torch.Tensor, coords: torch.Tensor, n: int, spacing: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where linear interpolation along dim 0 of ``v`` (``n`` nodes of a centred grid of ``spacing`` mm)
    samples ``coords`` (mm), clamped to the first and last node as ``grid_sample(...,
    padding_mode="border", align_corners=True)`` does: the lower node of each sample ``(len,)`` (int64)
    and its weight on the upper node, shaped to broadcast against ``v``'s rows."""
    pos = (coords / spacing + (n - 1) / 2.0).clamp(0.0, float(n - 1))
    lo = pos.floor().clamp(max=float(max(n - 2, 0)))
    shape = [1] * v.dim()
    shape[0] = coords.shape[0]
    w = (pos - lo).to(v.dtype).reshape(shape)
    return lo.to(torch.long), w


def lerp_axis0(v: torch.Tensor, lo: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` interpolated between rows ``lo`` and ``lo + 1`` with weights ``w`` (:func:`lerp_rows`)."""
    hi = (lo + 1).clamp(max=v.shape[0] - 1)
    return torch.lerp(v.index_select(0, lo), v.index_select(0, hi), w)


def _dense_aligned(
    field: torch.Tensor,
    fparams: List[float],
    vox_to_x: torch.Tensor,
    axis_of: List[int],
    shape: List[int],
    mix: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mix @ u`` (``mix`` C x 3) of a dense field ``(1, 3, D, H, W)`` on the centred grid ``fparams`` at
    the voxels of a native grid whose axes are parallel to the model axes (``axis_of``): trilinear with
    border extension, which is separable. Interpolated here along native axes 2 and 1, ``(k0, n1, n2,
    C)``, with the rows and weights along axis 0 (:func:`lerp_rows`); :func:`lerp_axis0` of a slice of them
    finishes a slab of rows, so that no full-size field is made that is not an output (2 reads per sample
    and axis; ``grid_sample`` of the field at every native voxel was 4x slower on CPU)."""
    model_of = [0, 0, 0]
    for m in range(3):
        model_of[axis_of[m]] = m
    mixed = torch.einsum("ij,jzyx->izyx", mix.to(torch.float32), field[0].to(torch.float32))
    # model axis m is dim 3 - m of (c, z, y, x); each pass interpolates dim 0 (contiguous rows)
    t = mixed.permute([3 - model_of[2], 3 - model_of[1], 3 - model_of[0], 0]).contiguous()  # (k2, k1, k0, C)
    m = model_of[2]
    lo, w = lerp_rows(t, _axis_coords(shape[2], vox_to_x, m, 2), int(fparams[m]), fparams[3 + m])
    t = lerp_axis0(t, lo, w).permute(1, 0, 2, 3).contiguous()  # (k1, n2, k0, C)
    m = model_of[1]
    lo, w = lerp_rows(t, _axis_coords(shape[1], vox_to_x, m, 1), int(fparams[m]), fparams[3 + m])
    t = lerp_axis0(t, lo, w).permute(2, 0, 1, 3).contiguous()  # (k0, n1, n2, C): one copy of the largest
    m0 = model_of[0]
    lo, w = lerp_rows(t, _axis_coords(shape[0], vox_to_x, m0, 0), int(fparams[m0]), fparams[3 + m0])
    return t, lo, w


def _bspline_dense(
    coeffs: torch.Tensor, bparams: List[float], spacing: List[float], within: List[float]
) -> Tuple[torch.Tensor, List[float]]:
    """The B-spline sampled exactly on a centred grid of ``spacing`` mm covering the box of half-extents
    ``within`` (mm) and one node beyond, capped at the lattice's support (BSplineTransform.densified):
    ``(field (1, 3, D, H, W), field grid [nx, ny, nz, sx, sy, sz])``."""
    shape: List[int] = []
    axes: List[torch.Tensor] = []
    for a in range(3):
        n_ctrl = int(bparams[3 + a])
        half = min(((n_ctrl - 1) / 2.0 + 2.0) * bparams[a], within[a] + 2.0 * spacing[a])
        n = int(math.ceil(2 * half / spacing[a])) + 1
        shape.append(n)
        axes.append((torch.arange(n, dtype=torch.float32, device=coeffs.device) - (n - 1) / 2.0) * spacing[a])
    bx = _bspline_basis(axes[0], int(bparams[3]), bparams[0])
    by = _bspline_basis(axes[1], int(bparams[4]), bparams[1])
    bz = _bspline_basis(axes[2], int(bparams[5]), bparams[2])
    out = torch.einsum("ncklm,xm->ncklx", coeffs.to(torch.float32), bx)
    out = torch.einsum("ncklx,yl->nckyx", out, by)
    out = torch.einsum("nckyx,zk->nczyx", out, bz)
    return out, [float(shape[0]), float(shape[1]), float(shape[2]), spacing[0], spacing[1], spacing[2]]


def _dense_native(field: torch.Tensor, fparams: List[float], vox_to_x: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """A dense displacement ``(1, 3, D, H, W)`` on the centred grid ``fparams`` (``[nx, ny, nz, sx, sy, sz]``)
    sampled (trilinear, border-extended) at every voxel of a native grid: ``(n0, n1, n2, 3)``."""
    dev = vox_to_x.device
    field_index = torch.eye(4, dtype=torch.float64, device=dev)
    for a in range(3):
        field_index[a, a] = 1.0 / fparams[3 + a]
        field_index[a, 3] = (fparams[a] - 1.0) / 2.0
    rev = torch.zeros([4, 4], dtype=torch.float64, device=dev)
    rev[0, 2] = 1.0
    rev[1, 1] = 1.0
    rev[2, 0] = 1.0
    rev[3, 3] = 1.0
    f_shape = [int(fparams[2]), int(fparams[1]), int(fparams[0])]  # (D, H, W)
    theta = sampling_theta(rev @ field_index @ vox_to_x, shape, f_shape)
    pts = F.affine_grid(theta, [1, 1, shape[0], shape[1], shape[2]], align_corners=True)
    u = F.grid_sample(field[:1].to(torch.float32), pts, mode="bilinear", padding_mode="border", align_corners=True)
    return u[0].permute(1, 2, 3, 0)


def world_outputs(
    matrix: torch.Tensor,
    coeffs: Optional[torch.Tensor],
    bparams: List[float],
    field: Optional[torch.Tensor],
    fparams: List[float],
    mov_native: torch.Tensor,
    mov_affine: torch.Tensor,
    c_m: torch.Tensor,
    fix_shape: List[int],
    fix_affine: torch.Tensor,
    c_f: torch.Tensor,
    dense_spacing: List[float],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World outputs of a chain ``phi(x) = A (x + u(x))`` on the fixed native grid of ``fix_shape`` voxels.

    ``matrix`` is ``A`` (4x4, model frame, float64; identity without a rigid stage), ``u`` a B-spline stage
    (``coeffs (1, 3, cz, cy, cx)`` with ``bparams``) or a dense one (``field`` with ``fparams``) or neither;
    ``mov_native`` the moving image ``(1, 1, m0, m1, m2)`` (original intensities); ``c_m`` / ``c_f`` the
    RAS centres of the two model frames. Frames: fixed voxel ``v`` -> model point ``x = aff_f v - c_f``
    -> ``phi(x)`` -> moving world point ``phi(x) + c_m`` -> moving voxel. Everything but ``u`` is affine:
    composed in float64, applied as per-axis sums; ``u`` is added mixed by the linear maps that follow it
    (separable and exact for a B-spline on grids parallel to the model axes; on oblique grids exact
    samples on a grid of ``dense_spacing`` mm over the box the fixed grid occupies, interpolated).
    Returns ``(warped (n0, n1, n2), displacement (n0, n1, n2, 3) LPS mm, matrix (4, 4) RAS)``."""
    dev = mov_native.device
    f64 = torch.float64
    a_model = matrix.to(device=dev, dtype=f64)
    t_f = torch.eye(4, dtype=f64, device=dev)
    t_m = torch.eye(4, dtype=f64, device=dev)
    t_f[:3, 3] = -c_f.to(device=dev, dtype=f64)
    t_m[:3, 3] = c_m.to(device=dev, dtype=f64)
    vox_to_x = t_f @ fix_affine.to(device=dev, dtype=f64)
    inv_m = torch.linalg.inv(mov_affine.to(device=dev, dtype=f64))
    lps = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=f64, device=dev))
    eye3 = torch.eye(3, dtype=f64, device=dev)
    mov_shape = [int(mov_native.shape[2]), int(mov_native.shape[3]), int(mov_native.shape[4])]
    # index -> grid_sample coordinates of the moving tensor, and index -> LPS displacement (3 x 4)
    to_g = index_to_normalised(mov_shape, dev) @ inv_m @ t_m
    g_map = (to_g @ a_model @ vox_to_x)[:3]
    d_lin = (a_model[:3, :3] - eye3) @ vox_to_x[:3, :3]
    d_off = (a_model[:3, :3] - eye3) @ vox_to_x[:3, 3:] + a_model[:3, 3:] + t_m[:3, 3:] + t_f[:3, 3:]
    d_map = lps @ torch.cat([d_lin, d_off], dim=1)
    k_g = to_g[:3, :3] @ a_model[:3, :3]  # d(grid_sample coordinates) / d(u), u in model mm
    k_d = lps @ a_model[:3, :3]  # d(LPS displacement) / d(u)
    axis_of: List[int] = []
    if coeffs is not None or field is not None:
        axis_of = axis_permutation(vox_to_x[:3, :3])
    separable = len(axis_of) == 3
    g_cols = torch.zeros([0])
    g_rows = torch.zeros([0])
    dense_sep = separable and coeffs is None and field is not None
    dense_t = torch.zeros([0])
    dense_lo = torch.zeros([0], dtype=torch.long)
    dense_w = torch.zeros([0])
    if separable and coeffs is not None:  # the affine part folded into the separable synthesis
        g_cols, g_rows = _bspline_native(coeffs, bparams, vox_to_x, axis_of, fix_shape, k_g, g_map)
        d_cols, d_rows = _bspline_native(coeffs, bparams, vox_to_x, axis_of, fix_shape, k_d, d_map)
        disp = torch.mm(d_cols, d_rows).reshape(fix_shape[0], fix_shape[1], fix_shape[2], 3)
    elif dense_sep and field is not None:  # separable trilinear: both mixes at once, rows in the slab loop below
        dense_t, dense_lo, dense_w = _dense_aligned(
            field, fparams, vox_to_x, axis_of, fix_shape, torch.cat([k_d, k_g], dim=0)
        )
        disp = torch.empty([fix_shape[0], fix_shape[1], fix_shape[2], 3], dtype=torch.float32, device=dev)
    else:
        disp = affine_field(d_map, fix_shape)
    u: Optional[torch.Tensor] = None
    if coeffs is not None and not separable:  # oblique: exact samples on a fine grid over the fixed grid's box
        corners: List[List[float]] = []
        for i in [0, fix_shape[0] - 1]:
            for j in [0, fix_shape[1] - 1]:
                for k in [0, fix_shape[2] - 1]:
                    corners.append([float(i), float(j), float(k), 1.0])
        pts = torch.tensor(corners, dtype=f64, device=dev) @ vox_to_x[:3].T
        within: List[float] = pts.abs().amax(dim=0).tolist()
        dense, dparams = _bspline_dense(coeffs, bparams, dense_spacing, within)
        u = _dense_native(dense, dparams, vox_to_x, fix_shape)
    elif field is not None and not separable:
        u = _dense_native(field, fparams, vox_to_x, fix_shape)
    if u is not None:
        disp = disp + u @ k_d.T.to(torch.float32)
    # the warped image slab by slab along axis 0: its grid_sample coordinates never exist at full size
    # (at 240x240x160 a 110 MB temporary, written and read once)
    mov = mov_native.to(torch.float32)
    warped = torch.empty(fix_shape, dtype=torch.float32, device=dev)
    plane = fix_shape[1] * fix_shape[2]
    step = max(1, (1 << 20) // max(plane, 1))
    for start in range(0, fix_shape[0], step):
        stop = min(fix_shape[0], start + step)
        if separable and coeffs is not None:
            g = torch.mm(g_cols[start:stop], g_rows).reshape(stop - start, fix_shape[1], fix_shape[2], 3)
        elif dense_sep:
            u_rows = lerp_axis0(dense_t, dense_lo[start:stop], dense_w[start:stop])  # (rows, n1, n2, 6)
            disp[start:stop] = affine_field(d_map, fix_shape, start, stop) + u_rows[..., 0:3]
            g = affine_field(g_map, fix_shape, start, stop) + u_rows[..., 3:6]
        else:
            g = affine_field(g_map, fix_shape, start, stop)
        if u is not None:
            g = g + u[start:stop] @ k_g.T.to(torch.float32)
        warped[start:stop] = F.grid_sample(
            mov, g.unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=True
        )[0, 0]
    return warped, disp, t_m @ a_model @ t_f
