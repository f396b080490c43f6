"""Image I/O and world geometry: NIfTI <-> model grid, world coordinates, ITK/ANTs transform files.

World coordinates are RAS mm, as nibabel gives them (NIfTI sform/qform). NIfTI arrays are ``(X, Y, Z)``
in voxel index order; torch tensors are ``(N, C, D, H, W)`` with ``D = Z`` — :func:`array_to_tensor`
and :func:`tensor_to_array` are the one place where that conversion happens. ITK and ANTs work in LPS
mm: ``lps = diag(-1, -1, 1) @ ras``, so x and y change sign in files written for them.

The model grid of a plan is an axis-aligned RAS grid (``shape_xyz``, ``spacing_xyz_mm``) centred on
each image's field-of-view centre (or intensity centre of mass), so the model frame's point ``x`` (mm,
centre-relative) is the world point ``centre + x``.

Input validation (:func:`load_image`; every failure is an :class:`~msode_sdk.errors.InputError` whose
one-line message starts with the input's name): images must be 3-D (trailing singleton axes are
dropped) with at least 2 voxels per axis and at most :data:`MAX_DIM` per axis and :data:`MAX_VOXELS` in
all; numeric (bool counts as 0/1; complex, structured/RGB, object, string and masked arrays are
refused); finite, with magnitudes up to :data:`MAX_ABS_INTENSITY` and not (nearly) constant. Affines
must be finite 4x4 with last row ``[0, 0, 0, 1]``, voxel sizes within :data:`SPACING_RANGE_MM`, a
well-conditioned direction matrix (:data:`MAX_CONDITION`; singular, parallel-axis and extreme-shear
frames are refused) and voxel centres within :data:`WORLD_LIMIT_MM` of the origin. NIfTI files are
checked header first (shape, type, affine) and their voxel data against the header size without
allocating what a lying header claims; gzip CRCs are verified. Images larger than the model grid are
accepted and cropped around their centre; one with no content inside the model grid is refused by
:meth:`msode_sdk.Registrar.prepare`.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from . import world
from .transforms import Grid

_log = logging.getLogger("msode_sdk")

__all__ = [
    "Image",
    "load_image",
    "array_to_tensor",
    "tensor_to_array",
    "image_centre",
    "resample_to_model_grid",
    "PreparedImage",
    "prepare_image",
    "native_tensor",
    "normalise_intensity",
    "sample_image_at_world",
    "world_points",
    "ras_to_lps_matrix",
    "write_itk_affine",
    "read_itk_affine",
    "displacement_nifti",
]

# Limits that catch absurd or hostile inputs before they cost memory or time. They are checked on the
# NIfTI header (shape, data type, affine) before any voxel is read, so a file that lies about its size
# is refused without allocating what it claims.
MAX_VOXELS = 512 * 512 * 1024  # 2**28 voxels per image (1 GiB as float32)
MAX_DIM = 4096  # voxels along any axis
SPACING_RANGE_MM = (1e-3, 100.0)  # voxel size along every axis (column norms of the affine)
MAX_CONDITION = 1e6  # of the affine's direction matrix: beyond it, singular/degenerate
WORLD_LIMIT_MM = 1e5  # every voxel centre within +-100 m of the world origin
MAX_ABS_INTENSITY = 1e30  # |voxel value|; keeps float32 sums and differences finite
MIN_RELATIVE_RANGE = 1e-6  # (max - min) / max(|min|, |max|): below it the image is ~constant
_MAX_TRAILING_BYTES = 1 << 20  # decompressed bytes tolerated after a NIfTI's declared voxel data

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _show_path(path, limit: int = 240) -> str:
    """A path for a one-line message: as is when printable, else escaped; long ones shortened."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-limit // 2 :]


def check_output_dir(out: Path) -> None:
    """Before any work (``msode register``, ``msode batch``): ``out`` must be, or be creatable as, a
    directory: :class:`InputError` naming the path when it or a parent is a file, or the path is invalid."""
    try:
        for d in (out, *out.parents):
            if d.exists():
                if not d.is_dir():
                    raise InputError(f"output path {_show_path(out)}: {_show_path(d)} exists and is not a directory")
                break
    except InputError:
        raise
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise InputError(f"output path {_show_path(out)}: {why}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Image:
    """A validated 3-D scalar image: ``array`` ``(X, Y, Z)`` float32 and its voxel-to-RAS ``affine``."""

    array: np.ndarray
    affine: np.ndarray
    name: str = "image"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel sizes in mm along the array axes (column norms of the affine)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def to_nifti(self) -> nib.Nifti1Image:
        return world_nifti(self.array.astype(np.float32, copy=False), self.affine)


def _validate_affine(affine, name: str) -> np.ndarray:
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name}: affine is not numeric") from None
    if a.shape != (4, 4):
        raise InputError(f"{name}: affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name}: affine has NaN or Inf entries")
    if not np.allclose(a[3], [0, 0, 0, 1], atol=1e-6):
        raise InputError(f"{name}: affine's last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    lo, hi = SPACING_RANGE_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise InputError(f"{name}: voxel spacing {[float(f'{v:.6g}') for v in spacing]} mm is outside [{lo}, {hi}] mm")
    # Singular or nearly so (e.g. two parallel axes, extreme shear): condition of the direction part.
    cond = np.linalg.cond(a[:3, :3] / spacing)
    if not np.isfinite(cond) or cond > MAX_CONDITION:
        raise InputError(
            f"{name}: affine is singular or degenerate (condition number {cond:.3g} of its "
            f"direction matrix; at most {MAX_CONDITION:g})"
        )
    return a


def _check_shape(shape, name: str) -> tuple[int, ...]:
    """Validate an array or header shape (trailing singleton axes dropped); returns the 3-D shape."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1), as many tools write them
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{name}: expected a 3-D image, got {len(shape)}-D with shape {shape}")
    if min(shape) < 0:
        raise InputError(f"{name}: negative dimension in shape {shape} (corrupted header?)")
    if min(shape) < 2:
        raise InputError(f"{name}: every axis needs at least 2 voxels, got shape {shape}")
    if max(shape) > MAX_DIM or math.prod(shape) > MAX_VOXELS:
        raise InputError(
            f"{name}: image of shape {shape} is larger than supported ({MAX_DIM} voxels per axis, {MAX_VOXELS} in all)"
        )
    return shape


def _check_dtype(dtype, name: str) -> None:
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise InputError(f"{name}: complex images are not supported (dtype {dtype})")
    if dtype.kind not in "biuf":
        raise InputError(f"{name}: image data must be numeric (bool, int, uint or float), got dtype {dtype}")


def _check_world_extent(shape, affine: np.ndarray, name: str) -> None:
    """Every voxel centre within :data:`WORLD_LIMIT_MM` of the origin (outputs are float32 mm)."""
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], dtype=np.float64
    )
    far = float(np.max(np.abs(corners @ affine[:3, :3].T + affine[:3, 3])))
    if far > WORLD_LIMIT_MM:
        raise InputError(
            f"{name}: image lies {far:.4g} mm from the world origin; voxel centres must be "
            f"within {WORLD_LIMIT_MM:g} mm (check the affine's translation)"
        )


def _validate_array(arr, name: str) -> np.ndarray:
    """A numeric array -> C-contiguous float32 ``(X, Y, Z)``, or :class:`InputError` naming the problem.
    Already float32 C-contiguous input is not copied."""
    try:
        arr = np.asanyarray(arr)
    except Exception as exc:  # ragged nested sequences, tensors on a GPU, objects numpy cannot read
        raise InputError(f"{name}: image data is not a regular numeric array ({_first_line(exc)})") from None
    if isinstance(arr, np.ma.MaskedArray):
        raise InputError(f"{name}: masked arrays are not supported; pass plain data (e.g. arr.filled(0))")
    _check_dtype(arr.dtype, name)
    arr = arr.reshape(_check_shape(arr.shape, name))
    lo, hi = arr.min(), arr.max()  # NaN propagates through min/max: two passes decide finiteness
    if arr.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError(f"{name}: image has {bad} NaN/Inf voxels")
    big = max(abs(float(lo)), abs(float(hi)))
    if big > MAX_ABS_INTENSITY:
        raise InputError(
            f"{name}: intensities reach {big:.3g}; at most {MAX_ABS_INTENSITY:g} in magnitude is supported"
        )
    lo32, hi32 = float(np.float32(lo)), float(np.float32(hi))  # rounding is monotone: the float32 extremes
    if hi32 == lo32:
        raise InputError(f"{name}: image is constant (all voxels = {lo32:g}); nothing to register")
    if hi32 - lo32 <= max(MIN_RELATIVE_RANGE * max(abs(lo32), abs(hi32)), 1e-30):
        raise InputError(
            f"{name}: intensity range [{lo32:.9g}, {hi32:.9g}] is too narrow to normalise (nearly constant image)"
        )
    return np.asarray(arr, dtype=np.float32, order="C")


def load_image(obj, name: str = "image") -> Image:
    """Load and validate one input.

    ``obj``: a path to a NIfTI file (``.nii``/``.nii.gz``), a nibabel spatial image, an :class:`Image`,
    or a tuple ``(array (X, Y, Z), affine 4x4 voxel->RAS mm)``. Raises :class:`InputError` naming
    the problem. For files, the header (shape, data type, affine) is checked against the limits of
    this module before any voxel is read, and the amount of voxel data is checked against the header
    (truncated files are refused; gzip CRCs are verified) without allocating what the header claims.
    """
    if isinstance(obj, Image):
        arr = _validate_array(obj.array, obj.name)
        affine = _validate_affine(obj.affine, obj.name)
        _check_world_extent(arr.shape, affine, obj.name)
        return obj if arr is obj.array and affine is obj.affine else Image(arr, affine, obj.name)
    if isinstance(obj, (str, os.PathLike)):
        try:
            path = Path(obj)
            shown = _show_path(path)
            if "\0" in str(path):
                raise ValueError("embedded null byte")
            exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
        except (OSError, TypeError, ValueError) as exc:  # NUL bytes, names too long, bytes paths
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
            raise InputError(f"{name}: invalid path {_show_path(obj)}: {why}") from None
        if not exists:
            raise InputError(f"{name}: file not found: {shown}")
        if is_dir:
            raise InputError(f"{name}: {shown} is a directory, expected a NIfTI file")
        if not is_file:
            raise InputError(f"{name}: {shown} is not a regular file (device, FIFO or socket)")
        try:
            img = nib.load(str(path))
        except Exception as exc:
            raise InputError(f"{name}: cannot read {shown} as NIfTI: {_first_line(exc)}") from None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"{name}: {shown} is a {type(img).__name__}, expected NIfTI")
        return _from_nibabel(img, f"{name} ({path.name})")
    if isinstance(obj, nib.spatialimages.SpatialImage):
        return _from_nibabel(obj, name)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        arr, affine = obj
        arr = _validate_array(arr, name)
        affine = _validate_affine(affine, name)
        _check_world_extent(arr.shape, affine, name)
        _warn_shear(affine, name)
        return Image(arr, affine, name)
    if isinstance(obj, np.ndarray):
        raise InputError(f"{name}: a bare array has no geometry; pass (array, affine 4x4 voxel->RAS mm)")
    raise InputError(f"{name}: expected a path, a nibabel image or (array, affine), got {type(obj).__name__}")


def _from_nibabel(img, name: str) -> Image:
    affine = img.affine
    if affine is None:
        raise InputError(f"{name}: image has no affine")
    proxy = img.dataobj
    try:
        header_shape = tuple(int(n) for n in img.shape)
        header_dtype = np.dtype(img.get_data_dtype())
    except Exception as exc:
        raise InputError(f"{name}: unreadable header: {_first_line(exc)}") from None
    shape = _check_shape(header_shape, name)  # before reading: a lying header costs nothing
    if nib.is_proxy(proxy):
        _check_dtype(header_dtype, name)
    affine = _validate_affine(affine, name)
    _check_world_extent(shape, affine, name)
    _warn_without_orientation(img, name)
    _warn_units(img, name)
    _warn_shear(affine, name)
    arr = _validate_array(_read_voxels(img, name), name)
    return Image(arr, affine, name)


def _warn_without_orientation(img, name: str) -> None:
    """A NIfTI header with qform_code and sform_code both 0 says nothing about where the voxels are: its
    affine is nibabel's fallback (voxel sizes on the diagonal, no orientation, no origin). Registration
    compares world positions, so say so rather than register silently in a made-up frame."""
    hdr = getattr(img, "header", None)
    if not isinstance(hdr, nib.Nifti1Header):  # NIfTI-2's header subclasses it; other formats: their own
        return
    try:
        codes = int(hdr["qform_code"]), int(hdr["sform_code"])
    except (KeyError, TypeError, ValueError):
        return
    if codes == (0, 0):
        _log.warning(
            "%s: the NIfTI header has no orientation (qform_code and sform_code both 0); its world "
            "coordinates are a fallback (voxel sizes only, no orientation or origin), so results in world "
            "coordinates may be wrong: set the qform/sform (scanner or aligned) or pass (array, affine)",
            name,
        )


def _warn_units(img, name: str) -> None:
    """The header's spatial unit is taken to be mm (as nibabel's affine does); ITK scales metres and microns
    to mm, so a file in those units is read 1000x off by one tool or the other: say so."""
    hdr = getattr(img, "header", None)
    if not isinstance(hdr, nib.Nifti1Header):
        return
    try:
        unit = hdr.get_xyzt_units()[0]
    except Exception:  # an unreadable units field: unknown, as most files say
        return
    if unit in ("meter", "micron"):
        _log.warning(
            "%s: the header's spatial unit is %s; voxel sizes and positions are read as mm (nibabel), "
            "as the outputs are written: ITK-based tools convert %s to mm, so they will disagree by 1000x",
            name,
            unit,
            unit,
        )


#: a direction matrix whose columns are further than this (cosine) from orthogonal is sheared (gantry tilt)
SHEAR_COSINE = 1e-3


def _warn_shear(affine: np.ndarray, name: str) -> None:
    """Non-orthogonal voxel axes (CT gantry tilt) are handled in world coordinates here, but ITK/ANTs
    represent an image by spacing, origin and an orthonormal direction: they read such a grid (and the
    outputs written on it) in another place, so the ITK-side use of the outputs would be wrong."""
    d = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    cos = np.abs(d.T @ d - np.eye(3)).max()
    if cos > SHEAR_COSINE:
        _log.warning(
            "%s: the voxel axes are not orthogonal (shear: %.2f degrees from square, e.g. a CT gantry tilt); "
            "results are right in this file's world coordinates (nibabel), but ITK/ANTs cannot represent a "
            "sheared grid and will place it, and displacement.nii.gz / warped.nii.gz written on it, "
            "differently: resample the image onto an orthogonal grid first if ITK/ANTs will read the outputs",
            name,
            float(np.degrees(np.arcsin(min(cos, 1.0)))),
        )


def _read_voxels(img, name: str) -> np.ndarray:
    """The scaled voxel array of a nibabel image. File-backed NIfTI data is checked against the
    header: uncompressed files by their size before reading; gzip/bzip2 files are decompressed here
    (:func:`_read_compressed`: read to the end so the gzip CRC is verified, never allocating more
    than the file holds), so a file holding less (or much more) data than declared is refused."""
    proxy = img.dataobj
    file_like = getattr(proxy, "file_like", None)
    try:
        if not (nib.is_proxy(proxy) and isinstance(file_like, str) and hasattr(proxy, "offset")):
            return np.asanyarray(proxy)
        shape, dtype, offset = tuple(int(n) for n in proxy.shape), np.dtype(proxy.dtype), int(proxy.offset)
        nbytes = math.prod(shape) * dtype.itemsize
        lower = file_like.lower()
        header_end = _single_file_header_end(img)
        if header_end is not None and offset < header_end:
            # nibabel would read the header's own bytes as voxels: a silently wrong image
            raise InputError(
                f"{name}: vox_offset {offset} lies inside the header ({header_end} bytes): "
                "the voxel data cannot start there"
            )
        opener = gzip.open if lower.endswith(".gz") else bz2.open if lower.endswith(".bz2") else None
        if opener is None and lower.endswith((".nii", ".img")):
            size = os.path.getsize(file_like)
            if offset + nbytes > size:
                raise InputError(
                    f"{name}: file is truncated: its header declares {nbytes} bytes of voxel data "
                    f"at offset {offset}, the file has {size} bytes"
                )
        if opener is None:
            return _scaled_float32(np.asanyarray(proxy.get_unscaled()), proxy.slope, proxy.inter)
        raw = _read_compressed(opener, file_like, offset, nbytes, name)
        arr = np.ndarray(shape, dtype, buffer=raw, order=proxy.order)
        return _scaled_float32(arr, proxy.slope, proxy.inter)
    except InputError:
        raise
    except Exception as exc:  # truncated or corrupted gzip, short file, bad header sizes
        raise InputError(f"{name}: cannot read voxel data: {_first_line(exc)}") from None


def _scaled_float32(arr: np.ndarray, slope, inter) -> np.ndarray:
    """nibabel's ArrayProxy scaling (``scl_slope`` / ``scl_inter``, as sanitised by nibabel) computed in
    float32, the SDK's working type, in the array's own memory order: nibabel's ``apply_read_scaling``
    promotes to float64 first (an int16 file with a slope peaked at ~5x its float32 size while loading;
    outside audit). Differs from it by <= 1 float32 ulp. Unscaled arrays are returned as they are."""
    slope = float(np.asarray(slope))
    inter = float(np.asarray(inter))
    if slope == 1.0 and inter == 0.0:
        return arr
    out = np.multiply(arr, np.float32(slope), dtype=np.float32)
    if inter != 0.0:
        out += np.float32(inter)
    return out


def _single_file_header_end(img) -> int | None:
    """Bytes before a single-file NIfTI's voxel data can start (header + the 4-byte extension flag:
    352 for NIfTI-1, 544 for NIfTI-2); None for header/image pairs and other formats."""
    hdr = getattr(img, "header", None)
    if not isinstance(hdr, nib.Nifti1Header) or bytes(hdr["magic"]).rstrip(b"\0") not in (b"n+1", b"n+2"):
        return None
    return int(hdr["sizeof_hdr"]) + 4


def _gzip_may_hold(path: str, n: int) -> bool:
    """False when the gzip trailer (ISIZE: the uncompressed size mod 2**32 of the last member, i.e. of
    the whole file for the usual single-member files) says the file holds fewer than ``n`` bytes."""
    if n >= 1 << 32:
        return True  # ISIZE wraps: no verdict
    if os.path.getsize(path) < 18:
        return False
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little") >= n


def _read_compressed(opener, path: str, offset: int, nbytes: int, name: str) -> np.ndarray:
    """The ``nbytes`` of voxel data at ``offset`` of a compressed file, read to the end of the stream
    (so the gzip CRC and length are verified). The buffer of the declared size is allocated up front
    only when the gzip trailer agrees with the header; otherwise (lying or multi-member files, bzip2)
    the data is collected in chunks first, so a header that claims gigabytes costs what the file
    really holds."""

    def truncated(held):
        return InputError(
            f"{name}: file is truncated: its header declares {nbytes} bytes of voxel data at "
            f"offset {offset}, the decompressed file holds {held} bytes"
        )

    with opener(path, "rb") as f:
        pos = 0
        while pos < offset:
            chunk = f.read(min(offset - pos, 1 << 20))
            if not chunk:
                raise truncated(pos)
            pos += len(chunk)
        got = 0
        if opener is gzip.open and _gzip_may_hold(path, offset + nbytes):
            buf = np.empty(nbytes, dtype=np.uint8)
            view = memoryview(buf)  # type: ignore[arg-type]  # numpy arrays are buffers
            while got < nbytes:
                k = f.readinto(view[got : got + (1 << 24)])
                if not k:
                    break
                got += k
        else:
            chunks = []
            while got < nbytes:
                chunk = f.read(min(nbytes - got, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got == nbytes:
                buf = np.empty(nbytes, dtype=np.uint8)
                at = 0
                for chunk in chunks:
                    buf[at : at + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    at += len(chunk)
            del chunks
        if got < nbytes:
            raise truncated(pos + got)
        extra = 0
        while True:  # to the end of the stream: verifies the gzip CRC and length
            chunk = f.read(1 << 20)
            if not chunk:
                break
            extra += len(chunk)
            if extra > _MAX_TRAILING_BYTES:
                raise InputError(
                    f"{name}: file holds more than {_MAX_TRAILING_BYTES} bytes beyond the "
                    f"{nbytes} bytes of voxel data its header declares (corrupted header?)"
                )
    return buf


# ---------------------------------------------------------------------------------- layout helpers


def array_to_tensor(arr: np.ndarray, device=None) -> torch.Tensor:
    """``(X, Y, Z)`` array -> ``(1, 1, D, H, W)`` float32 tensor (``D = Z``)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(arr, dtype=np.float32).transpose(2, 1, 0))).to(device)[
        None, None
    ]


def tensor_to_array(t: torch.Tensor) -> np.ndarray:
    """``(D, H, W)`` or ``(1, 1, D, H, W)`` (or ``(.., 3, D, H, W)`` vector) tensor -> ``(X, Y, Z[, 3])`` array."""
    t = t.detach().cpu()
    if t.ndim == 5:
        t = t[0]
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3:
        return t.permute(2, 1, 0).numpy()
    if t.ndim == 4:  # (3, D, H, W) vectors
        return t.permute(3, 2, 1, 0).numpy()
    raise InputError(f"expected a (D, H, W), (1, 1, D, H, W) or (1, 3, D, H, W) tensor, got shape {tuple(t.shape)}")


def world_points(shape_xyz, affine: np.ndarray, dtype=torch.float32, device=None) -> torch.Tensor:
    """RAS mm coordinates of every voxel of an image, ``(Z, Y, X, 3)`` tensor in ``(x, y, z)`` order."""
    a = torch.as_tensor(affine, dtype=torch.float64)
    i, j, k = (torch.arange(n, dtype=torch.float64) for n in shape_xyz)
    kk, jj, ii = torch.meshgrid(k, j, i, indexing="ij")
    ijk = torch.stack((ii, jj, kk), -1)
    pts = ijk @ a[:3, :3].T + a[:3, 3]
    return pts.to(dtype=dtype, device=device)


def image_centre(img: Image, mode: str = "fov") -> np.ndarray:
    """RAS mm centre of an image: field-of-view centre (``fov``) or intensity centre of mass (``com``)
    of the voxels above the 2nd percentile (:func:`msode_sdk.world.image_centre`)."""
    if mode not in ("fov", "com"):
        raise InputError(f"unknown centre mode {mode!r}; valid: ['com', 'fov']")
    c = world.image_centre(native_tensor(img.array), torch.from_numpy(np.asarray(img.affine, dtype=np.float64)), mode)
    return c.numpy()


def _gaussian_blur_axes(vol: torch.Tensor, sigmas) -> torch.Tensor:
    """Separable Gaussian blur per tensor axis (:func:`msode_sdk.world.gaussian_blur_axes`)."""
    return world.gaussian_blur_axes(vol, [float(v) for v in sigmas])


def sample_image_at_world(
    img_tensor: torch.Tensor, affine: np.ndarray, points_ras: torch.Tensor, padding: str = "zeros"
) -> torch.Tensor:
    """Trilinear samples of an image ``(N, C, Z, Y, X)`` (voxel->RAS ``affine``) at RAS points
    ``(..., 3)`` -> ``(N, C, *points.shape[:-1])``; zero outside (``padding='zeros'``)."""
    inv = torch.as_tensor(np.linalg.inv(affine), dtype=torch.float64, device=points_ras.device)
    shape_xyz = img_tensor.shape[-1], img_tensor.shape[-2], img_tensor.shape[-3]
    vox = points_ras.to(torch.float64) @ inv[:3, :3].T + inv[:3, 3]
    half = torch.tensor([(n - 1) / 2.0 for n in shape_xyz], dtype=torch.float64, device=vox.device)
    g = (vox / half - 1.0).to(img_tensor.dtype)
    lead = points_ras.shape[:-1]
    g = g.reshape(1, 1, 1, -1, 3).expand(img_tensor.shape[0], -1, -1, -1, -1)
    out = F.grid_sample(img_tensor, g, mode="bilinear", padding_mode=padding, align_corners=True)
    return out.reshape(img_tensor.shape[0], img_tensor.shape[1], *lead)


def native_tensor(arr: np.ndarray, device=None) -> torch.Tensor:
    """``(X, Y, Z)`` array -> ``(1, 1, X, Y, Z)`` float32 tensor in the array's own order: no transposing
    copy (one host-to-device copy on a GPU); :mod:`msode_sdk.world` samples it."""
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)[None, None]


def resample_to_model_grid(
    img: Image, grid: Grid, centre_ras: np.ndarray, device=None, tensor: torch.Tensor | None = None
) -> torch.Tensor:
    """Resample an image onto the axis-aligned RAS model ``grid`` centred at ``centre_ras``:
    ``(1, 1, D, H, W)`` float32 on ``device`` (``tensor``: the image as :func:`native_tensor` already on the
    device, so it is not copied again).

    Anti-aliasing for inputs finer than the grid: along each source axis whose voxels are ``r``
    times smaller than the grid's finest spacing, ``floor(r)`` voxels are first averaged (a strided
    box filter, one cheap pass; the pooled voxel centres are tracked exactly in the affine), then a
    Gaussian of ``sigma = 0.5 * sqrt(r'^2 - 1)`` pooled voxels takes the remaining ratio ``r'``.
    The sampling positions are composed in float64 on the host and applied by ``affine_grid``."""
    vol = native_tensor(img.array, device) if tensor is None else tensor
    affine = torch.from_numpy(np.asarray(img.affine, dtype=np.float64)).to(vol.device)
    centre = torch.as_tensor(np.asarray(centre_ras, dtype=np.float64), device=vol.device)
    return world.resample_to_grid(vol, affine, list(grid.shape_xyz), list(grid.spacing_xyz), centre)


@dataclass(frozen=True)
class PreparedImage:
    """An input on the plan's model grid: the validated ``image``, its ``centre`` (RAS mm; the model
    frame's origin), ``vol`` ``(1, 1, D, H, W)`` normalised to [0, 1], ``native`` (the image as
    :func:`native_tensor`, on the same device, reused for the world outputs) and ``fov`` ``(1, 1, D, H, W)``
    (1 inside the image's field of view, 0 where ``vol`` is padding; :mod:`msode_sdk.loop`, "Fields of view")."""

    image: Image
    centre: np.ndarray
    vol: torch.Tensor
    native: torch.Tensor
    fov: torch.Tensor | None = None


def prepare_image(
    img: Image, grid: Grid, centre_mode: str, normalization: dict, device=None, name: str = "image"
) -> PreparedImage:
    """Resample a validated image onto the model ``grid`` (centred on the image's ``centre_mode`` centre)
    and normalise its intensities (``normalization``: the plan's ``low`` / ``high`` percentiles of the
    native image, from at most 2 M voxels). Raises :class:`InputError` naming ``name`` for images with no
    intensity range or no content inside the model grid. Needs nothing but the plan's manifest values, so
    data-loading workers run it without loading any network."""
    if centre_mode not in ("fov", "com"):
        raise InputError(f"unknown centre mode {centre_mode!r}; valid: ['com', 'fov']")
    native = native_tensor(img.array, device)
    affine = torch.from_numpy(np.asarray(img.affine, dtype=np.float64)).to(native.device)
    centre_t = world.image_centre(native, affine, centre_mode)
    try:
        vol, fov = world.prepare_on_grid(
            native,
            affine,
            list(grid.shape_xyz),
            list(grid.spacing_xyz),
            centre_t,
            float(normalization["low"]),
            float(normalization["high"]),
        )
    except ValueError as exc:  # no intensity range
        raise InputError(f"{name}: {exc}") from None
    centre = centre_t.cpu().numpy()
    if float(vol.max()) <= 0.0:
        raise InputError(f"{name}: no image content inside the model grid around its centre")
    return PreparedImage(img, centre, vol, native, fov)


def normalise_intensity(
    vol: torch.Tensor, low_pct: float, high_pct: float, reference: np.ndarray | torch.Tensor | None = None
) -> torch.Tensor:
    """Map intensities so that the ``low_pct``/``high_pct`` percentiles (of ``reference`` when given,
    e.g. a sample of the native image, else of ``vol``) become 0 and 1, clipped to ``[0, 1]``
    (:func:`msode_sdk.world.normalise_percentiles`: linear interpolation, float64, on the reference's
    device)."""
    src = reference if reference is not None else vol.detach()
    if not isinstance(src, torch.Tensor):
        src = torch.from_numpy(np.ascontiguousarray(src))
    try:
        return world.normalise_percentiles(vol, src.to(vol.device), float(low_pct), float(high_pct))
    except ValueError as exc:
        raise InputError(str(exc)) from None


# ------------------------------------------------------------------------------ transforms to files


def ras_to_lps_matrix(matrix_ras: np.ndarray) -> np.ndarray:
    """A 4x4 point map in RAS mm -> the same map in LPS mm (what ITK/ANTs use)."""
    return _RAS_TO_LPS @ np.asarray(matrix_ras, dtype=np.float64) @ _RAS_TO_LPS


def write_itk_affine(path, matrix_ras: np.ndarray) -> None:
    """Write a 4x4 RAS fixed->moving point map as an ITK text transform (``.tfm``, LPS), readable by
    ITK, SimpleITK (``ReadTransform``) and ANTs (``antsApplyTransforms -t file.tfm``)."""
    m = ras_to_lps_matrix(matrix_ras)
    params = " ".join(f"{v:.17g}" for v in [*m[:3, :3].ravel(), *m[:3, 3]])
    text = (
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {params}\nFixedParameters: 0 0 0\n"
    )
    Path(path).write_text(text)


def read_itk_affine(path) -> np.ndarray:
    """Read an ``AffineTransform_double_3_3`` ITK text file back as a 4x4 RAS matrix."""
    params = fixed = None
    for line in Path(path).read_text().splitlines():
        if line.startswith("Parameters:"):
            params = [float(v) for v in line.split(":", 1)[1].split()]
        elif line.startswith("FixedParameters:"):
            fixed = [float(v) for v in line.split(":", 1)[1].split()]
    if params is None or len(params) != 12:
        raise InputError(f"{path}: not a 3-D affine ITK transform file")
    m = np.eye(4)
    m[:3, :3] = np.reshape(params[:9], (3, 3))
    c = np.asarray(fixed or [0, 0, 0], dtype=np.float64)
    m[:3, 3] = np.asarray(params[9:]) + c - m[:3, :3] @ c  # ITK: T(x) = A (x - c) + t + c
    return _RAS_TO_LPS @ m @ _RAS_TO_LPS


def displacement_nifti(disp_xyz3: np.ndarray, affine: np.ndarray, vectors: str = "ras") -> nib.Nifti1Image:
    """A displacement field ``(X, Y, Z, 3)`` in mm on the grid ``affine`` -> the ITK/ANTs NIfTI:
    shape ``(X, Y, Z, 1, 3)``, intent 1007 (vector), vectors in LPS mm. ``vectors`` says what the input
    holds: ``"ras"`` (converted here) or ``"lps"`` (used as is, without a copy)."""
    if vectors == "ras":
        d = np.asarray(disp_xyz3, dtype=np.float32) * np.asarray([-1.0, -1.0, 1.0], dtype=np.float32)
    elif vectors == "lps":
        d = np.asarray(disp_xyz3, dtype=np.float32)
    else:
        raise InputError(f"unknown vector convention {vectors!r}; valid: ['lps', 'ras']")
    img = world_nifti(d[:, :, :, None, :], affine)
    img.header.set_intent(1007, (), name="msode_disp")
    return img


# gzip level of written displacement fields: their float noise compresses by ~10 % at level 1, which took
# ~10x the time (240x240x160: 3.6 s against 0.36 s, more than the registration); 0 is still a valid .nii.gz
DISPLACEMENT_GZIP_LEVEL = 0


def save_nifti(img: nib.Nifti1Image, path, compresslevel: int = 1) -> None:
    """Write ``img`` to ``path``: a gzip stream at ``compresslevel`` (0-9; 0 stores the data) for names ending
    in ``.gz``, else plain. The gzip header's time stamp is 0, so equal images give equal files."""
    path = str(path)
    if not path.endswith(".gz"):
        nib.save(img, path)
        return
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as f,
    ):
        img.to_stream(f)


def world_nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """An output image: ``array`` on the grid ``affine`` (voxel -> RAS mm), both xform codes "scanner" and
    the spatial unit mm (viewers and ITK read an unknown unit as mm, some tools warn or assume metres)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return img
