"""Reliability and security of the public face (issue #8, DESIGN section 9).

Bad input of every kind through ``Registrar.register`` / ``msode_sdk.io.load_image`` and the CLI gets a
typed error with a one-line message naming the problem (or the documented outcome), never a crash, a
hang or partial output; property tests of the validation; thread safety and determinism; peak memory
(RSS) of one 240x240x160 pair; out-of-memory conversion. Plan-file hostility is covered in
test_plan.py. No test asserts on wall-clock time; hangs are caught by a per-test alarm (and, as a last
resort, faulthandler) instead.
"""

from __future__ import annotations

import errno
import faulthandler
import gzip
import hashlib
import io
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msode_sdk
from conftest import MODEL_GRID, Phantom, affine_from, render
from msode_sdk import InputError, MsodeError, OutputError, Registrar, RegistrationError, ResourceError, cli
from msode_sdk import io as sdk_io
from msode_sdk.transforms import Grid

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("sdk", "export", "training", "tests"))}
GIB = 1 << 30


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _no_hang():
    """Every test here is bounded: SIGALRM raises in the test (also interrupting blocking reads), and
    faulthandler kills the run with all stacks if even that does not return."""

    def on_alarm(signum, frame):
        raise TimeoutError("reliability test exceeded its time bound (hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(400)
    faulthandler.dump_traceback_later(500, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def reg(analytic_plan):
    """The analytic rigid+B-spline plan of conftest (model grid 48x56x40 at 3.5 mm)."""
    return Registrar.load(analytic_plan, device="cpu", backend="torch")


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """A tiny analytic plan (20x20x16 at 10 mm, fixed Euler steps): bounded cost per registration."""
    from msode_export.analytic import build_analytic_plan
    from msode_export.pack import LevelSolver

    path = tmp_path_factory.mktemp("tiny") / "tiny.plan"
    euler = (LevelSolver("euler", 0.5),) * 3
    build_analytic_plan(
        path,
        Grid((20, 20, 16), (10.0, 10.0, 10.0)),
        stages=("rigid", "bspline"),
        control_spacing_mm=(40.0, 40.0, 40.0),
        schedules={"rigid": euler, "bspline": euler},
        formats=("torchscript",),
        name="tiny",
    )
    return path


@pytest.fixture(scope="module")
def tiny(tiny_plan):
    return Registrar.load(tiny_plan, device="cpu", backend="torch")


@pytest.fixture(scope="module")
def pair():
    """A small valid same-contrast pair (arrays, affines) with a known rigid offset."""
    ph = Phantom(seed=3)
    shape = (36, 40, 30)
    f_aff = affine_from((4.0, 4.0, 4.0), (0, 0, 0), shape, ph.centre.numpy())
    m_aff = affine_from((4.0, 4.0, 4.0), (0.0, 0.0, 6.0), shape, ph.centre.numpy() + np.array([3.0, -2.0, 2.0]))
    return (render(ph, shape, m_aff), m_aff), (render(ph, shape, f_aff), f_aff)


def _save(path: Path, arr, affine=None, cls=nib.Nifti1Image) -> Path:
    nib.save(cls(np.asarray(arr), A3 if affine is None else affine), str(path))
    return path


def _header_only(shape, dtype=np.float32, data: bytes = b"") -> bytes:
    """A NIfTI-1 single file whose header claims ``shape`` followed by ``data`` (default: none)."""
    h = nib.Nifti1Header()
    h.set_data_dtype(dtype)
    h.set_data_shape(shape)
    h.set_zooms((1.0,) * len(shape))
    h.set_sform(np.eye(4), 1)
    b = io.BytesIO()
    h.write_to(b)
    b.write(b"\0" * 4)  # extension flag: vox_offset = 352
    return b.getvalue() + data


def _good_array(shape=(12, 10, 8), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


A3 = np.diag([3.0, 3.0, 3.0, 1.0])


def _one_line(msg: str) -> None:
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)


# ---------------------------------------------------------------- bad arrays and affines (public API)


def _ragged():
    return [[1.0, 2.0], [3.0]]


BAD_ARRAYS = {
    "2-D": (lambda: np.ones((8, 8), np.float32), "3-D"),
    "4-D": (lambda: np.ones((8, 8, 8, 2), np.float32), "3-D image, got 4-D"),
    "1-D": (lambda: np.arange(10.0), "got 1-D"),
    "0-D": (lambda: np.float32(3.0), "got 0-D"),
    "empty axis": (lambda: np.zeros((0, 8, 8), np.float32), "at least 2 voxels"),
    "empty 1-D": (lambda: np.zeros((0,), np.float32), "3-D"),
    "one slice": (lambda: np.ones((8, 8, 1), np.float32), "at least 2 voxels"),
    "complex": (lambda: np.ones((8, 8, 8), np.complex64), "complex"),
    "object": (lambda: np.full((4, 4, 4), None, dtype=object), "numeric"),
    "str": (lambda: np.full((4, 4, 4), "a"), "numeric"),
    "bytes": (lambda: np.full((4, 4, 4), b"a"), "numeric"),
    "datetime": (lambda: np.zeros((4, 4, 4), "datetime64[s]"), "numeric"),
    "ragged": (_ragged, "regular numeric array"),
    "NaN voxel": (
        lambda: np.where(np.arange(512).reshape(8, 8, 8) == 7, np.nan, 1.0 + _good_array((8, 8, 8))),
        "1 NaN/Inf",
    ),
    "Inf voxels": (lambda: np.where(np.arange(512).reshape(8, 8, 8) < 3, np.inf, _good_array((8, 8, 8))), "3 NaN/Inf"),
    "-Inf float16": (lambda: np.where(np.arange(512).reshape(8, 8, 8) == 0, -np.inf, 1).astype(np.float16), "NaN/Inf"),
    "constant": (lambda: np.full((8, 8, 8), 7.0), "constant"),
    "all zero": (lambda: np.zeros((8, 8, 8), np.int16), "constant"),
    "all False": (lambda: np.zeros((8, 8, 8), bool), "constant"),
    "nearly constant": (lambda: 1000.0 + 5e-4 * _good_array((8, 8, 8)).astype(np.float64), "too narrow"),
    "huge values": (lambda: 1e35 * _good_array((8, 8, 8)).astype(np.float64), "intensities reach"),
    "float32 max": (
        lambda: np.where(_good_array((8, 8, 8)) > 0.5, np.finfo(np.float32).max, 0).astype(np.float32),
        "intensities reach",
    ),
    "masked": (lambda: np.ma.masked_array(_good_array((8, 8, 8)), _good_array((8, 8, 8)) > 0.5), "masked"),
    "too many voxels": (lambda: np.broadcast_to(np.float32(1), (4096, 4096, 17)), "larger than supported"),
    "axis too long": (lambda: np.broadcast_to(np.float32(1), (5000, 2, 2)), "larger than supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
@pytest.mark.parametrize("which", ["moving", "fixed"])
def test_bad_array_is_input_error(reg, pair, case, which):
    make, expected = BAD_ARRAYS[case]
    bad = (make(), A3)
    args = (bad, pair[1]) if which == "moving" else (pair[0], bad)
    with pytest.raises(InputError, match=expected) as ei:
        reg.register(*args)
    assert str(ei.value).startswith(which), str(ei.value)
    _one_line(str(ei.value))


def _rot(deg):
    return affine_from((1.0, 1.0, 1.0), (0.0, 0.0, deg), (8, 8, 8))


def _parallel_columns():
    a = np.eye(4)
    a[:3, 1] = [1.0, 0.0, 0.0]
    return a


def _shear_degenerate():
    a = np.eye(4)
    a[:3, 1] = [1.0, 1e-7, 0.0]  # nearly parallel to x: not a usable 3-D frame
    return a


BAD_AFFINES = {
    "zero column": (lambda: np.diag([1.0, 0.0, 1.0, 1.0]), "spacing"),
    "all zero": (lambda: np.zeros((4, 4)), "last row"),
    "zero matrix": (lambda: np.diag([0.0, 0.0, 0.0, 1.0]), "spacing"),
    "parallel columns": (_parallel_columns, "singular or degenerate"),
    "shear-degenerate": (_shear_degenerate, "singular or degenerate"),
    "NaN": (lambda: np.where(np.eye(4) == 1, np.nan, 0.0), "NaN or Inf"),
    "Inf translation": (
        lambda: np.array([[1, 0, 0, np.inf], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
        "NaN or Inf",
    ),
    "3x3": (lambda: np.eye(3), "4x4"),
    "4x3": (lambda: np.eye(4)[:, :3], "4x4"),
    "flat 16": (lambda: np.eye(4).ravel(), "4x4"),
    "bad last row": (lambda: np.vstack([np.eye(4)[:3], [0, 0, 1, 1]]), "last row"),
    "strings": (lambda: np.full((4, 4), "x"), "not numeric"),
    "None": (lambda: None, "4x4"),
    "dict": (lambda: {"a": 1}, "not numeric"),
    "spacing 1e-6 mm": (lambda: np.diag([1e-6, 1e-6, 1e-6, 1.0]), "spacing"),
    "spacing 1e6 mm": (lambda: np.diag([1e6, 1.0, 1.0, 1.0]), "spacing"),
    "far from origin": (lambda: _rot(0.0) + np.pad(np.full((3, 1), 1e9), ((0, 1), (3, 0))), "world origin"),
}


@pytest.mark.parametrize("case", sorted(BAD_AFFINES))
def test_bad_affine_is_input_error(reg, pair, case):
    make, expected = BAD_AFFINES[case]
    with pytest.raises(InputError, match=expected) as ei:
        reg.register(pair[0], (pair[1][0], make()))
    assert str(ei.value).startswith("fixed")
    _one_line(str(ei.value))


@pytest.mark.parametrize(
    "obj, expected",
    [
        (None, "expected a path"),
        (42, "got int"),
        ((np.ones((4, 4, 4)),), "got tuple"),
        ((np.ones((4, 4, 4)), np.eye(4), "x"), "got tuple"),
        (np.ones((4, 4, 4)), "bare array has no geometry"),
        (b"/tmp/x.nii", "got bytes"),
    ],
)
def test_wrong_input_types(reg, pair, obj, expected):
    with pytest.raises(InputError, match=expected):
        reg.register(obj, pair[1])


@pytest.mark.parametrize(
    "stages, expected",
    [
        (5, "stages must be a list"),
        ([], "empty"),
        ([1], "must be strings"),
        (["affine"], "unknown stage"),
        ("rigid,bspline", "unknown stage"),
        ([None], "must be strings"),
        (object(), "stages must be a list"),
    ],
)
def test_stage_argument_errors_come_first(reg, stages, expected):
    # the inputs are invalid too: argument errors are reported before any image work
    with pytest.raises(InputError, match=expected):
        reg.register(None, None, stages=stages)


def test_single_stage_name_as_string(tiny, pair):
    a = tiny.register(*pair, stages="rigid")
    b = tiny.register(*pair, stages=["rigid"])
    assert a.nfe == b.nfe and set(a.nfe) == {"rigid"}
    assert np.array_equal(a.matrix, b.matrix)


@pytest.mark.parametrize(
    "case",
    [
        "bool",
        "4-D singleton",
        "uint8",
        "int64",
        "float16",
        "big-endian",
        "fortran",
        "negative strides",
        "larger than grid",
    ],
)
def test_documented_accepted_inputs(reg, pair, case):
    """Accepted as documented: bool (0/1), (X, Y, Z, 1), any int/uint/float dtype, any byte order and
    memory layout; images larger than the model grid are cropped around their centre."""
    arr, aff = pair[0]
    arr = {
        "bool": lambda: arr > np.median(arr),
        "4-D singleton": lambda: arr[..., None, None],
        "uint8": lambda: (arr / arr.max() * 255).astype(np.uint8),
        "int64": lambda: (arr * 1e6).astype(np.int64),
        "float16": lambda: arr.astype(np.float16),
        "big-endian": lambda: arr.astype(">f8"),
        "fortran": lambda: np.asfortranarray(arr),
        "negative strides": lambda: arr[::-1, ::-1, ::-1],
        "larger than grid": lambda: np.pad(arr, ((60, 60), (0, 0), (0, 0))),
    }[case]()
    if case == "larger than grid":
        aff = aff.copy()
        aff[:3, 3] -= aff[:3, :3] @ np.array([60.0, 0.0, 0.0])  # same centre, 4 x the x extent
    img, centre, vol = reg.prepare((arr, aff), "moving")
    assert img.array.dtype == np.float32 and img.array.flags.c_contiguous and img.array.ndim == 3
    assert vol.shape == (1, 1, *MODEL_GRID.shape_dhw) and bool(torch.isfinite(vol).all())
    assert 0.0 <= float(vol.min()) and float(vol.max()) <= 1.0


@pytest.mark.parametrize("offset", [-200.0, -1000.0, 5000.0])
def test_an_image_whose_background_is_not_zero_registers_as_the_original(reg, pair, offset):
    """Intensities shifted by a constant (a negative or z-scored image, CT's -1000 HU background): the model
    grid's padding stands for the image's own low percentile, so the registration is the original's (before,
    padding read as a raw 0 made a bright frame that the rigid stage aligned)."""
    (m_arr, m_aff), fixed = pair
    base = reg.register((m_arr, m_aff), fixed, stages=["rigid"]).matrix
    moved = reg.register((m_arr + offset, m_aff), fixed, stages=["rigid"]).matrix
    np.testing.assert_allclose(moved, base, atol=2e-3)


def test_content_outside_the_model_grid(reg, pair):
    """A 1.2 m field of view whose only content sits in one corner, far outside the model grid
    around the FOV centre (the plan centres on the field of view)."""
    arr = np.zeros((40, 40, 40), np.float32)
    arr[:4, :4, :4] = _good_array((4, 4, 4)) + 1.0
    aff = np.diag([30.0, 30.0, 30.0, 1.0])
    with pytest.raises(InputError, match="^moving: no image content inside the model grid"):
        reg.register((arr, aff), pair[1])
    # moving and fixed are prepared side by side: the fixed image's failure is reported as its own, and
    # when both fail the moving image's error comes first, as when they were prepared one after the other
    with pytest.raises(InputError, match="^fixed: no image content inside the model grid"):
        reg.register(pair[0], (arr, aff))
    with pytest.raises(InputError, match="^moving: no image content inside the model grid"):
        reg.register((arr, aff), (arr, aff))


def test_mismatched_inputs_name_the_bad_one(reg, pair):
    with pytest.raises(InputError, match="^fixed: .*constant"):
        reg.register(pair[0], (np.zeros((8, 8, 8)), A3))
    with pytest.raises(InputError, match="^moving: .*spacing"):
        reg.register((pair[0][0], np.diag([1e-6, 1, 1, 1])), (np.zeros((8, 8, 8)), A3))  # moving is checked first


def test_validated_image_objects_are_revalidated(reg, pair):
    bad = sdk_io.Image(np.full((8, 8, 8), np.nan, np.float32), A3, "moving")
    with pytest.raises(InputError, match="NaN"):
        reg.register(bad, pair[1])


# --------------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def files(tmp_path_factory, pair):
    d = tmp_path_factory.mktemp("files")
    arr, aff = pair[0]
    good = _save(d / "good.nii.gz", arr, aff)
    _save(d / "good.nii", arr, aff)
    return d, good


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x5A
    return bytes(b)


def _patched(raw: bytes, fmt: str, offset: int, value) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _bad_files(d: Path):
    raw, gz = (d / "good.nii").read_bytes(), (d / "good.nii.gz").read_bytes()
    os.makedirs(d / "adir", exist_ok=True)
    cases = {
        "missing": (d / "nope.nii.gz", "file not found"),
        "directory": (d / "adir", "is a directory"),
        "text file": (_write(d / "notes.txt", b"hello"), "cannot read"),
        "text as .nii.gz": (_write(d / "text.nii.gz", b"hello, not gzip"), "cannot read"),
        "random .nii": (_write(d / "random.nii", np.random.default_rng(1).bytes(4000)), "cannot read"),
        "empty .nii": (_write(d / "empty.nii", b""), "cannot read"),
        "truncated .nii": (_write(d / "trunc.nii", raw[: len(raw) // 2]), "truncated"),
        "header-only .nii": (_write(d / "hdr.nii", raw[:352]), "truncated"),
        "truncated .nii.gz": (_write(d / "trunc.nii.gz", gz[: len(gz) // 2]), "cannot read voxel data"),
        "gz without trailer": (_write(d / "notrailer.nii.gz", gz[:-4]), "cannot read voxel data"),
        "gz header cut": (_write(d / "hdrcut.nii.gz", gz[:40]), "cannot read"),
        "gz corrupted payload": (_write(d / "flipped.nii.gz", _flip(gz, len(gz) - 200)), "cannot read voxel data"),
        "dim[0] = 9": (_write(d / "dim0.nii", _patched(raw, "<h", 40, 9)), "cannot read"),
        "negative dim": (_write(d / "negdim.nii", _patched(raw, "<h", 42, -5)), "negative dimension"),
        "zero dim": (_write(d / "zerodim.nii", _patched(raw, "<h", 44, 0)), "at least 2 voxels"),
        "unknown datatype": (_write(d / "dtype.nii", _patched(raw, "<h", 70, 1234)), "cannot read"),
        "vox_offset 1e20": (_write(d / "offset.nii", _patched(raw, "<f", 108, 1e20)), "truncated"),
        # nibabel would read the header's own bytes as the first voxels
        "vox_offset 0": (_write(d / "offset0.nii", _patched(raw, "<f", 108, 0.0)), "inside the header"),
        "vox_offset 100": (
            _write(d / "offset100.nii", _patched(raw, "<f", 108, 100.0)),
            "too low",
        ),  # nibabel's own check
        "bad magic": (_write(d / "magic.nii", raw[:344] + b"zzz\0" + raw[348:]), "cannot read"),
        "huge claim .nii": (_write(d / "huge.nii", _header_only((4000, 4000, 4000))), "larger than supported"),
        "huge claim .nii.gz": (
            _write(d / "huge.nii.gz", gzip.compress(_header_only((30000, 30000, 30000)))),
            "larger than supported",
        ),
        "2000x2000x2 header only .nii": (_write(d / "big2.nii", _header_only((2000, 2000, 2))), "truncated"),
        "2000x2000x2 header only .nii.gz": (
            _write(d / "big2.nii.gz", gzip.compress(_header_only((2000, 2000, 2)))),
            "truncated",
        ),
        "4-D file": (_save(d / "four.nii.gz", np.ones((6, 6, 6, 3), np.float32)), "got 4-D"),
        "2-D file": (_save(d / "two.nii.gz", np.ones((6, 6), np.float32)), "got 2-D"),
        "complex file": (_save(d / "cplx.nii.gz", np.ones((6, 6, 6), np.complex64)), "complex"),
        "RGB file": (_save(d / "rgb.nii", np.zeros((6, 6, 6), [("R", "u1"), ("G", "u1"), ("B", "u1")])), "numeric"),
        "NaN file": (
            _save(d / "nan.nii.gz", np.where(_good_array((6, 6, 6)) > 0.5, np.nan, 1.0).astype(np.float32)),
            "NaN",
        ),
        "constant file": (_save(d / "const.nii.gz", np.full((6, 6, 6), 3, np.int16)), "constant"),
        "MGH file": (_save(d / "img.mgz", _good_array((6, 6, 6)), np.eye(4), nib.MGHImage), "expected NIfTI"),
        "trailing garbage .nii.gz": (
            _write(d / "trail.nii.gz", gzip.compress((d / "good.nii").read_bytes() + b"\0" * (2 << 20))),
            "more than",
        ),
        "NUL in path": (str(d / "a\0b.nii"), "invalid path"),
        "name too long": (d / ("x" * 5000 + ".nii"), "invalid path"),
    }
    if hasattr(os, "mkfifo"):
        fifo = d / "fifo.nii"
        if not fifo.exists():
            os.mkfifo(fifo)
        cases["FIFO"] = (fifo, "not a regular file")
    if os.path.exists("/dev/zero"):
        cases["/dev/zero"] = (Path("/dev/zero"), "not a regular file")
    return cases


def _bad_file_names():
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        arr = _good_array()
        _save(d / "good.nii.gz", arr)
        _save(d / "good.nii", arr)
        return sorted(_bad_files(d))


@pytest.fixture(scope="module")
def bad(files):
    return _bad_files(files[0])


@pytest.mark.parametrize("case", _bad_file_names())
def test_bad_file_is_input_error(reg, bad, pair, case):
    path, expected = bad[case]
    with pytest.raises(InputError, match=expected) as ei:
        reg.register(pair[0], path)
    assert str(ei.value).startswith("fixed")
    _one_line(str(ei.value))


@pytest.mark.parametrize("cls", [nib.Nifti1Image, nib.Nifti2Image])
def test_a_file_without_orientation_is_loaded_with_a_warning(tmp_path, caplog, cls):
    """qform_code = sform_code = 0: the header says nothing about orientation or origin; the image loads
    (nibabel's fallback affine, as other tools do) with a warning naming the file; a header with either code
    set loads silently."""
    import logging

    from msode_sdk.io import load_image

    arr = _good_array()
    img = cls(arr, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "bare.nii.gz"))
    aligned = _save(tmp_path / "aligned.nii.gz", arr, np.diag([2.0, 2.0, 3.0, 1.0]), cls)
    with caplog.at_level(logging.WARNING, logger="msode_sdk"):
        loaded = load_image(str(tmp_path / "bare.nii.gz"), "moving")
        load_image(str(aligned), "fixed")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and said[0].startswith("moving") and "no orientation" in said[0], said
    np.testing.assert_allclose(loaded.spacing, [2.0, 2.0, 3.0])


def test_sheared_grids_and_non_mm_units_load_with_a_warning(tmp_path, caplog):
    """A gantry-tilted grid (non-orthogonal voxel axes) is registered in nibabel's world frame but ITK/ANTs
    cannot represent it, and a header in metres or microns is read as mm where ITK converts: each loads
    with a warning naming the input; an oblique but orthogonal grid and a header in mm load silently."""
    import logging

    from msode_sdk.io import load_image

    arr = _good_array()
    tilt = np.diag([1.0, 1.0, 2.5, 1.0])
    tilt[1, 2] = 2.5 * np.tan(np.radians(15.0))  # each slice shifted along y: 15 degrees of tilt
    oblique = np.eye(4)
    oblique[:3, :3] = _rot(20.0)[:3, :3] @ np.diag([1.0, 1.2, 2.0])
    metres = nib.Nifti1Image(arr, np.eye(4))
    metres.header.set_xyzt_units("meter")
    nib.save(metres, str(tmp_path / "metres.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="msode_sdk"):
        load_image((arr, tilt), "tilted")
        load_image(str(_save(tmp_path / "tilted.nii.gz", arr, tilt)), "tilted file")
        load_image(str(tmp_path / "metres.nii.gz"), "metres")
        load_image((arr, oblique), "oblique")
        load_image(str(_save(tmp_path / "mm.nii.gz", arr, oblique)), "mm")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 3, said
    assert said[0].startswith("tilted:") and "not orthogonal" in said[0] and "15.00 degrees" in said[0], said
    assert said[1].startswith("tilted file") and "not orthogonal" in said[1]
    assert said[2].startswith("metres") and "spatial unit is meter" in said[2]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_lying_header_is_refused_without_allocating(files, suffix):
    """A header-only file claiming 2000x2000x2 (32 MB) or 2000x2000x60 float64 (1.9 GB): refused as
    truncated without allocating what it claims (plain files by their size, gzip files by their
    trailer and a chunked read); see also the RSS check in test_peak_rss_one_pair."""
    import tracemalloc

    d, _ = files
    for shape, dtype in (((2000, 2000, 2), np.float32), ((2000, 2000, 60), np.float64)):
        data = _header_only(shape, dtype)
        path = _write(d / f"claim{suffix}", gzip.compress(data) if suffix.endswith(".gz") else data)
        tracemalloc.start()
        try:
            with pytest.raises(InputError, match="truncated"):
                sdk_io.load_image(path, "fixed")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, (shape, peak)


def test_multi_member_gzip_and_bzip2_are_read(files, tmp_path):
    """Valid but unusual compressed files take the chunked path and read exactly as nibabel does."""
    import bz2

    raw = (files[0] / "good.nii").read_bytes()
    expected = np.asarray(np.asanyarray(nib.load(str(files[0] / "good.nii")).dataobj), dtype=np.float32)
    for name, blob in (
        ("multi.nii.gz", gzip.compress(raw[:352]) + gzip.compress(raw[352:])),
        ("data.nii.bz2", bz2.compress(raw)),
    ):
        path = _write(tmp_path / name, blob)
        assert np.array_equal(sdk_io.load_image(path, "moving").array, expected)


def test_nifti_reader_matches_nibabel(files, tmp_path):
    """The SDK's own checked reader gives nibabel's values: bit for bit unscaled, to a float32 ulp with
    scl_slope / scl_inter (applied in float32, not through nibabel's float64 copy)."""
    d, good = files
    arr = (np.random.default_rng(5).standard_normal((20, 18, 12)) * 800).astype(np.int16)
    img = nib.Nifti1Image(arr, affine_from((1.2, 1.0, 2.5), (0, 10, 0), arr.shape))
    img.header.set_slope_inter(0.37, -12.5)
    for name in ("scaled.nii.gz", "scaled.nii"):
        nib.save(img, str(tmp_path / name))
        ours = sdk_io.load_image(tmp_path / name, "moving").array
        theirs = np.asarray(np.asanyarray(nib.load(str(tmp_path / name)).dataobj), dtype=np.float32)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=float(np.spacing(np.abs(theirs).max())))
        assert np.abs(ours - (arr * 0.37 - 12.5)).max() < 1e-3  # the scaling itself
    sample = ROOT / "data" / "sample" / "fixed_t1.nii.gz"
    if sample.exists():
        ours = sdk_io.load_image(sample, "fixed").array
        theirs = np.asarray(np.asanyarray(nib.load(str(sample)).dataobj), dtype=np.float32)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=float(np.spacing(np.abs(theirs).max())))


def test_thin_slab_far_finer_than_the_grid_is_bounded(reg):
    """A 4-slice slab 0.004 mm thick: the anti-aliasing blur along z is capped (it used to pad the
    volume to thousands of slices)."""
    arr = _good_array((64, 64, 4)) + 1.0
    aff = np.diag([3.5, 3.5, 1e-3, 1.0])
    from msode_sdk.io import resample_to_model_grid

    img = sdk_io.load_image((arr, aff), "moving")
    vol = resample_to_model_grid(img, Grid(MODEL_GRID.shape_xyz, MODEL_GRID.spacing_xyz), sdk_io.image_centre(img))
    assert vol.shape == (1, 1, *MODEL_GRID.shape_dhw) and bool(torch.isfinite(vol).all())
    # no model-grid voxel centre lies within the 0.003 mm slab: refused as such, not garbage
    with pytest.raises(InputError, match="no image content inside the model grid"):
        reg.prepare((arr, aff), "moving")


# --------------------------------------------------------------------------------------------- CLI


def _cli(capsys, argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "truncated .nii.gz",
        "gz without trailer",
        "negative dim",
        "huge claim .nii.gz",
        "2000x2000x2 header only .nii.gz",
        "4-D file",
        "NaN file",
        "constant file",
        "text file",
        "MGH file",
    ],
)
def test_cli_bad_file_one_line_no_output(files, bad, tmp_path, capsys, case):
    d, good = files
    path, expected = bad[case]
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, ["register", path, good, "-o", out, "--plan", "analytic_ssd", "--device", "cpu"])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msode: error: moving") and expected.split()[0] in lines[0], err
    assert stdout == "" and not out.exists()


def test_cli_subprocess_bad_input(files, bad, tmp_path):
    """`python -m msode_sdk register` on a truncated file: exit 2, one stderr line, no output dir."""
    d, good = files
    bad, _ = bad["truncated .nii.gz"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "msode_sdk", "register", str(good), str(bad), "-o", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("msode: error: fixed (trunc.nii.gz)"), proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_cli_file_name_with_newline_stays_one_line(files, tmp_path, capsys):
    d, good = files
    weird = tmp_path / "evil\nname\x1b[31m.nii.gz"
    weird.write_bytes(b"not a nifti")
    rc, _, err = _cli(capsys, ["register", weird, good, "-o", tmp_path / "out", "--device", "cpu"])
    assert rc == 2 and err.count("\n") == 1 and "\x1b" not in err and "evil" in err, repr(err)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["register", "a.nii"], "required"),
        (["register", "a.nii", "b.nii", "-o"], "expected one argument"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_cli_usage_errors_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.count("\n") == 1 and err.startswith("msode: error:") and expected in err, err


def test_cli_argument_errors_after_plan_load_one_line_with_quiet(files, tiny_plan, tmp_path, capsys):
    d, good = files
    out = tmp_path / "out"
    for extra, expected in (
        (["--stages", "affine"], "unknown stage"),
        (["--backend", "tensorflow"], "unknown backend"),
        (["--device", "tpu"], "device"),
    ):
        rc, stdout, err = _cli(capsys, ["register", good, good, "-o", out, "--plan", tiny_plan, "-q", *extra])
        assert rc == 2 and err.count("\n") == 1 and expected in err, err
        assert not out.exists()
    rc, _, err = _cli(capsys, ["register", good, good, "-o", out, "--plan", d / "nope.plan", "-q"])
    assert rc == 2 and err.count("\n") == 1 and "plan" in err


def test_cli_output_path_is_a_file(files, tmp_path, capsys):
    d, good = files
    target = tmp_path / "taken"
    target.write_text("keep me")
    rc, _, err = _cli(capsys, ["register", good, good, "-o", target, "--device", "cpu"])
    assert rc == 2 and err.count("\n") == 1 and "not a directory" in err
    assert err.count("output path") == 1, err  # said once, not wrapped twice
    assert target.read_text() == "keep me"
    rc, _, err = _cli(capsys, ["register", good, good, "-o", target / "sub", "--plan", "nope", "-q"])
    assert rc == 2 and err.count("\n") == 1 and "not a directory" in err  # checked before the plan is loaded


def test_cli_failure_during_save_leaves_nothing(files, tiny_plan, tmp_path, capsys, monkeypatch):
    d, good = files
    out = tmp_path / "new" / "out"

    def disk_full(path, matrix):
        Path(path).write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sdk_io, "write_itk_affine", disk_full)
    rc, stdout, err = _cli(capsys, ["register", good, good, "-o", out, "--plan", tiny_plan, "-q"])
    assert rc == 2 and err.count("\n") == 1 and "cannot write results" in err and "No space left" in err, err
    assert not (tmp_path / "new").exists()  # the directories this run created are removed again
    assert stdout == ""


# ------------------------------------------------------------------------------- save() atomicity


@pytest.fixture(scope="module")
def tiny_result(tiny, pair):
    return tiny.register(*pair)


def _listing(d: Path):
    return sorted(p.name for p in d.iterdir()) if d.exists() else None


@pytest.mark.parametrize("fail_at", ["warped", "transform", "report", "rename-3"])
def test_save_failure_leaves_no_partial_outputs(tiny_result, tmp_path, monkeypatch, fail_at):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "unrelated.txt").write_text("mine")
    boom = OSError(errno.EIO, "I/O error")
    if fail_at == "warped":
        monkeypatch.setattr(sdk_io, "save_nifti", lambda img, path, *a: (Path(path).write_bytes(b"x"), _raise(boom)))
    elif fail_at == "transform":
        monkeypatch.setattr(sdk_io, "write_itk_affine", lambda p, m: _raise(boom))
    elif fail_at == "report":
        monkeypatch.setattr(type(tiny_result), "report", lambda self: _raise(ValueError("not serialisable")))
    else:
        real, calls = os.replace, []

        def flaky(a, b):
            calls.append(b)
            if len(calls) % 4 == 3:
                raise boom
            real(a, b)

        monkeypatch.setattr("msode_sdk.registrar.os.replace", flaky)
    with pytest.raises((OutputError, ValueError)) as ei:
        tiny_result.save(out)
    if fail_at != "report":
        assert isinstance(ei.value, OutputError) and isinstance(ei.value, OSError) and "I/O error" in str(ei.value)
    assert _listing(out) == ["unrelated.txt"]
    # a fresh directory is removed again
    with pytest.raises((OutputError, ValueError)):
        tiny_result.save(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


def _raise(exc):
    raise exc


def test_save_into_a_file_path(tiny_result, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        tiny_result.save(f)
    with pytest.raises(InputError, match="not a directory"):
        tiny_result.save(f / "sub")
    assert f.read_text() == "x"


def test_concurrent_saves_to_one_directory(tiny_result, tmp_path):
    errors = []

    def work():
        try:
            tiny_result.save(tmp_path / "shared")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert _listing(tmp_path / "shared") == sorted(
        ["warped.nii.gz", "transform.tfm", "displacement.nii.gz", "report.json"]
    )


# ------------------------------------------------------------------------------ out of memory


def _result_bits(res) -> str:
    h = hashlib.sha256()
    for a in (np.asarray(res.warped.dataobj), np.asarray(res.displacement.dataobj), res.matrix):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "where, exc, kind",
    [
        ("network", lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
        ("warp", lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB"), "GPU"),
        (
            "warp",
            lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes"),
            "CPU",
        ),
        ("network", lambda: MemoryError(), "CPU"),
    ],
)
def test_out_of_memory_becomes_resource_error(tiny, pair, tiny_result, monkeypatch, where, exc, kind):
    freed, held = [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))

    def oom(*args, **kwargs):
        big = torch.zeros(1 << 16)  # a "large" working tensor referenced by the failing frame
        held.append(weakref.ref(big))
        raise exc()

    if where == "network":
        key = next(k for k in tiny._networks if k[0] == "bspline")
        monkeypatch.setitem(tiny._networks, key, oom)
    else:
        monkeypatch.setattr("msode_sdk.loop.warp_chain", oom)
    with pytest.raises(ResourceError) as ei:
        tiny.register(*pair)
    err = ei.value
    assert isinstance(err, MemoryError) and isinstance(err, MsodeError)
    assert f"out of {kind} memory" in str(err) and "remains usable" in str(err)
    _one_line(str(err))
    assert err.__cause__ is None and err.__context__ is None  # the original frames are not kept alive
    assert freed and held and held[0]() is None
    monkeypatch.undo()
    assert _result_bits(tiny.register(*pair)) == _result_bits(tiny_result)  # still usable, same bits


def test_other_runtime_errors_are_not_masked(tiny, pair, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch in some kernel")

    monkeypatch.setattr("msode_sdk.loop.warp_chain", bug)
    with pytest.raises(RuntimeError, match="shape mismatch") as ei:
        tiny.register(*pair)
    assert not isinstance(ei.value, MsodeError)


def test_diverged_solve_is_registration_error(tiny, pair, tiny_result, monkeypatch):
    """A network that returns NaN (what a trained model may do far outside its training data): a typed
    error, never a non-finite transform; the Registrar stays usable."""
    key = next(k for k in tiny._networks if k[0] == "rigid")
    monkeypatch.setitem(tiny._networks, key, lambda warped, fixed, t: torch.full((warped.shape[0], 6), float("nan")))
    with pytest.raises(RegistrationError, match="diverged.*non-finite") as ei:
        tiny.register(*pair)
    assert isinstance(ei.value, FloatingPointError) and isinstance(ei.value, MsodeError)
    monkeypatch.undo()
    assert _result_bits(tiny.register(*pair)) == _result_bits(tiny_result)


def test_absurd_but_finite_results_are_registration_errors(tiny, pair, tiny_result, monkeypatch):
    """A field that returns huge finite steps: the state stays finite but the matrix overflows, or the
    translation leaves the model grid by metres (what the solve does on images with nothing in common):
    a typed error naming the fault, never a NaN transform or an absurd one returned as a result."""
    key = next(k for k in tiny._networks if k[0] == "rigid")
    huge = torch.tensor([1e30, 0.0, 0.0, 0.0, 0.0, 0.0])
    monkeypatch.setitem(tiny._networks, key, lambda warped, fixed, t: huge.expand(warped.shape[0], 6).clone())
    with pytest.raises(RegistrationError, match="not finite"):
        tiny.register(*pair)
    far = torch.tensor([0.0, 0.0, 0.0, 0.0, 5000.0, 0.0])  # 5 m/unit time along y on a 200 mm grid
    monkeypatch.setitem(tiny._networks, key, lambda warped, fixed, t: far.expand(warped.shape[0], 6).clone())
    with pytest.raises(RegistrationError, match=r"beyond the model grid's extent \[200.0, 200.0, 160.0\] mm"):
        tiny.register(*pair)
    with pytest.raises(RegistrationError, match="no longer overlap"):
        tiny.register_model_grid(*(tiny.prepare(x, n)[2] for x, n in zip(pair, ("moving", "fixed"))))
    monkeypatch.undo()
    assert _result_bits(tiny.register(*pair)) == _result_bits(tiny_result)


def test_a_network_failing_at_run_time_is_a_plan_error(tiny, pair, tiny_result, monkeypatch):
    """A plan member that raises inside its own code (a hostile or broken network) is the plan's fault:
    PlanError naming the member and the error's own line, not a raw RuntimeError; the Registrar stays
    usable. (Out of memory stays a ResourceError: test_out_of_memory_becomes_resource_error.)"""
    from msode_sdk.errors import PlanError

    key = next(k for k in tiny._networks if k[0] == "rigid")
    runner = tiny._networks[key]

    def broken(inputs):
        raise RuntimeError(
            "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript...\n"
            "RuntimeError: index 7 is out of bounds"
        )

    monkeypatch.setattr(runner, "_run", broken)
    with pytest.raises(
        PlanError,
        match=rf"network {re.escape(runner.member)} failed at run time: RuntimeError: "
        "RuntimeError: index 7 is out of bounds$",
    ) as ei:
        tiny.register(*pair)
    _one_line(str(ei.value))
    monkeypatch.undo()
    assert _result_bits(tiny.register(*pair)) == _result_bits(tiny_result)


@pytest.mark.parametrize(
    "pairs, expected",
    [
        ([None], "pair 0: expected \\(moving, fixed\\), got None"),
        ([("a", "b", "c")], "pair 0: expected \\(moving, fixed\\), got a tuple of 3"),
    ],
)
def test_register_many_malformed_pair(tiny, pairs, expected):
    with pytest.raises(InputError, match=expected):
        list(tiny.register_many(pairs))
    out = list(tiny.register_many(pairs, errors="return"))
    assert len(out) == 1 and isinstance(out[0], InputError)


@pytest.mark.parametrize("plan", [None, 3, b"rigid_bspline.plan", "", "  "])
def test_plan_argument_of_the_wrong_kind(plan):
    from msode_sdk.errors import PlanError

    with pytest.raises(PlanError, match="plan must be a path or a bundled plan's name.*bundled: \\["):
        Registrar.load(plan)


def test_cli_out_of_memory_exit_code(files, tiny_plan, tmp_path, capsys, monkeypatch):
    d, good = files

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("msode_sdk.loop.warp_chain", oom)
    rc, _, err = _cli(capsys, ["register", good, good, "-o", tmp_path / "o", "--plan", tiny_plan, "-q"])
    assert rc == 2 and err.count("\n") == 1 and "out of GPU memory" in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ threads and determinism


@pytest.mark.parametrize("backend, stages", [("torch", None), ("onnxruntime", ["rigid"])])
def test_threads_give_serial_bits(analytic_plan, pair, backend, stages):
    """One Registrar, 4 threads started together: bitwise the results of a serial call. The model
    grid (48x56x40) is large enough for torch's intra-op parallel reductions to engage."""
    r = Registrar.load(analytic_plan, device="cpu", backend=backend)
    serial = _result_bits(r.register(*pair, stages=stages))
    barrier, results, errors = threading.Barrier(4), {}, []

    def work(i):
        try:
            barrier.wait()
            results[i] = _result_bits(r.register(*pair, stages=stages))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert results == {i: serial for i in range(4)}


_CHILD = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from msode_sdk import Registrar
    d = np.load(sys.argv[2])
    res = Registrar.load(sys.argv[1], device="cpu", backend="torch").register(
        (d["mov"], d["mov_aff"]), (d["fix"], d["fix_aff"]), stages=["rigid"])
    h = hashlib.sha256()
    for a in (np.asarray(res.warped.dataobj), np.asarray(res.displacement.dataobj), res.matrix):
        h.update(np.ascontiguousarray(a).tobytes())
    print(h.hexdigest())
""")


def test_same_bits_across_fresh_processes(reg, pair, analytic_plan, tmp_path):
    """Same input, same output bits: in this process and in two fresh ones (whose TorchScript networks
    are in their first, profiling, runs). Rigid stage: its Gauss-Newton sums are parallel reductions
    over the 48x56x40 grid, the most rounding-sensitive part. The children run one after the other
    (side by side, OpenMP threads oversubscribe the cores)."""
    inputs = tmp_path / "pair.npz"
    np.savez(inputs, mov=pair[0][0], mov_aff=pair[0][1], fix=pair[1][0], fix_aff=pair[1][1])
    here = _result_bits(reg.register(*pair, stages=["rigid"]))
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(analytic_plan), str(inputs)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == here


# ---------------------------------------------------------------------------------------- memory


_RSS_CHILD = textwrap.dedent("""
    import gzip, io, json, resource, sys
    import numpy as np, nibabel as nib
    from msode_sdk import InputError, Registrar
    from msode_sdk.io import load_image

    def rss_mib():
        # VmHWM: peak RSS of this program's own address space. ru_maxrss also counts the parent's RSS at
        # fork time on Linux (it survives exec), so it is only an upper bound.
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024.0
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    out = {"baseline_mib": rss_mib()}
    # 1) a gzip NIfTI whose header claims 2000x2000x60 float64 (1.9 GB) but holds no data
    h = nib.Nifti1Header(); h.set_data_dtype(np.float64); h.set_data_shape((2000, 2000, 60))
    h.set_sform(np.eye(4), 1); b = io.BytesIO(); h.write_to(b); b.write(bytes(4))
    open(sys.argv[1], "wb").write(gzip.compress(b.getvalue()))
    try:
        load_image(sys.argv[1], "moving")
        out["lying_header"] = "accepted"
    except InputError as exc:
        out["lying_header"] = str(exc)
    out["after_lying_header_mib"] = rss_mib()
    # 2) one 240x240x160 1 mm pair with the bundled analytic_ssd plan (model grid 120x120x80 at 2 mm)
    shape = (240, 240, 160)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    def head(dx):
        r = (x - dx) ** 2 / 0.6 + y ** 2 / 0.7 + z ** 2 / 0.5
        return ((r < 1) * (1.0 + 0.5 * np.sin(9 * (x - dx)) * np.cos(7 * y) * np.sin(5 * z))).astype(np.float32)
    aff = np.eye(4); aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0
    moving, fixed = (head(0.02), aff), (head(0.0), aff)
    out["inputs_mib"] = rss_mib()
    res = Registrar.load("analytic_ssd", device="cpu").register(moving, fixed)
    out["nfe"] = res.nfe
    out["displacement_shape"] = list(res.displacement.shape)
    out["peak_mib"] = rss_mib()
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(out))
""")


def test_peak_rss_one_pair(tmp_path, record_property):
    """CPU peak RSS of one 240x240x160 1 mm pair with the bundled analytic_ssd plan < 4 GiB (DESIGN
    section 8: memory is a correctness budget); a lying gzip header costs no memory."""
    env = {**ENV, "OMP_NUM_THREADS": ENV.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(tmp_path / "lying.nii.gz")],
        capture_output=True,
        text=True,
        timeout=380,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB; an upper bound
    record_property("peak_rss_mib", info["peak_mib"])
    print(
        f"peak RSS, one 240x240x160 pair, analytic_ssd on CPU: {info['peak_mib']:.0f} MiB "
        f"(after imports {info['baseline_mib']:.0f} MiB, with inputs {info['inputs_mib']:.0f} MiB; "
        f"ru_maxrss {info['ru_maxrss_mib']:.0f} MiB, RUSAGE_CHILDREN {children_peak / (1 << 20):.0f} MiB)"
    )
    assert "truncated" in info["lying_header"], info
    assert info["after_lying_header_mib"] - info["baseline_mib"] < 256, info  # not the 1.9 GB it claims
    assert info["displacement_shape"] == [240, 240, 160, 1, 3]
    assert info["peak_mib"] * (1 << 20) < 4 * GIB and children_peak < 4 * GIB, info


# ------------------------------------------------------------------------------- property tests


_NUMERIC = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.longdouble,
]
_DTYPES = _NUMERIC * 3 + [np.complex64, object, "U3"]


@st.composite
def _arrays(draw):
    """Two thirds valid-looking images (so that resampling and normalisation are exercised too), one
    third wild: any rank, empty axes, non-numeric dtypes, constants, NaN/Inf, extreme magnitudes."""
    wild = draw(st.integers(0, 2)) == 0
    ndim = draw(st.sampled_from([3, 3, 3, 4, 0, 1, 2, 5])) if wild else 3
    shape = list(draw(st.lists(st.integers(0 if wild else 2, 12), min_size=ndim, max_size=ndim)))
    if ndim > 3 and draw(st.booleans()):
        shape[3:] = [1] * (ndim - 3)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    modes = ["normal", "uniform", "sparse", "offset"] + (["constant", "scaled", "nan", "inf"] if wild else [])
    mode = draw(st.sampled_from(modes))
    base = rng.standard_normal(shape) if mode != "uniform" else rng.random(shape)
    if mode == "constant":
        base = np.full(shape, draw(st.floats(-1e4, 1e4)))
    elif mode == "sparse":
        base = (rng.random(shape) > 0.97).astype(np.float64)
    elif mode == "scaled":
        base = base * 10.0 ** draw(st.integers(-45, 45))
    elif mode == "offset":
        base = base + 10.0 ** draw(st.integers(0, 12))
    elif mode in ("nan", "inf") and base.size:
        base.flat[rng.integers(base.size)] = np.nan if mode == "nan" else -np.inf
    dtype = draw(st.sampled_from(_DTYPES if wild else _NUMERIC))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype == np.bool_:
            return base > 0
        if dtype in (object, "U3"):
            return base.astype(dtype)
        if np.dtype(dtype).kind in "iu":
            info = np.iinfo(dtype)
            base = np.nan_to_num(base * (info.max / 8 if mode == "uniform" else 30), posinf=info.max, neginf=info.min)
            return np.clip(base, info.min, info.max).astype(dtype)
        return base.astype(dtype)


@st.composite
def _affines(draw):
    """Two thirds plausible (axis-aligned or oblique, 0.5-10 mm voxels), one third anything: random
    entries with NaN/Inf, wrong shapes, degenerate frames, absurd spacings and translations."""
    wild = draw(st.integers(0, 2)) == 0
    kind = draw(
        st.sampled_from(["plain", "oblique", "random", "degenerate", "shape"] if wild else ["plain", "oblique"])
    )
    if kind == "random":
        vals = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=16, max_size=16))
        return np.asarray(vals).reshape(4, 4)
    if kind == "shape":
        return np.eye(draw(st.sampled_from([2, 3, 5])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    exponents = st.floats(-4.0, 3.0) if wild else st.floats(-0.3, 1.0)
    spacing = 10.0 ** np.asarray(draw(st.lists(exponents, min_size=3, max_size=3)))
    direction = np.eye(3)
    if kind in ("oblique", "degenerate"):
        direction = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    if kind == "degenerate":
        i, j = rng.choice(3, 2, replace=False)
        direction[:, j] = direction[:, i] + draw(st.sampled_from([0.0, 1e-9, 1e-7, 1e-3])) * direction[:, j]
    a = np.eye(4)
    a[:3, :3] = direction * spacing
    a[:3, 3] = rng.standard_normal(3) * 10.0 ** draw(st.sampled_from([0, 1, 2, 3, 5, 9] if wild else [0, 1, 2]))
    return a


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(arr=_arrays(), affine=_affines())
def test_property_validation_only_input_error(reg, arr, affine):
    """Random shapes, dtypes, values and affines through the whole input path (validation, resampling
    to the model grid, normalisation): InputError with a one-line message naming the input, or a
    finite model-grid tensor in [0, 1]."""
    try:
        img, centre, vol = reg.prepare((arr, affine), "moving")
    except InputError as exc:
        assert str(exc).startswith("moving"), str(exc)
        _one_line(str(exc))
        return
    assert img.array.dtype == np.float32 and img.array.ndim == 3 and np.all(np.isfinite(centre))
    assert vol.shape == (1, 1, *MODEL_GRID.shape_dhw) and bool(torch.isfinite(vol).all())
    assert 0.0 <= float(vol.min()) and 0.0 < float(vol.max()) <= 1.0


@st.composite
def _plausible(draw):
    """Valid-looking but random images: small, any spacing in range, oblique, noisy, sparse or smooth."""
    shape = tuple(draw(st.lists(st.integers(2, 14), min_size=3, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "blob", "sparse", "ramp"]))
    idx = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    arr = {
        "noise": lambda: rng.random(shape),
        "sparse": lambda: (rng.random(shape) > 0.9) * 1.0,
        "blob": lambda: np.exp(-((idx - rng.uniform(-0.5, 0.5, 3)) ** 2).sum(-1) * 4),
        "ramp": lambda: idx @ rng.standard_normal(3),
    }[kind]()
    arr = (arr * 10.0 ** draw(st.integers(-3, 4))).astype(draw(st.sampled_from([np.float32, np.float64, np.int16])))
    spacing = 10.0 ** np.asarray(draw(st.lists(st.floats(-0.5, 1.5), min_size=3, max_size=3)))
    direction = np.linalg.qr(rng.standard_normal((3, 3)))[0] if draw(st.booleans()) else np.eye(3)
    a = np.eye(4)
    a[:3, :3] = direction * spacing
    a[:3, 3] = rng.uniform(-100, 100, 3)
    return arr, a


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(moving=_plausible(), fixed=_plausible())
def test_property_register_only_input_error(tiny, moving, fixed):
    """Whole registrations (tiny plan: bounded cost) of random images: InputError, RegistrationError (a
    solve that ran away from images with nothing in common) or finite outputs on the fixed grid."""
    try:
        res = tiny.register(moving, fixed)
    except (InputError, RegistrationError) as exc:
        _one_line(str(exc))
        return
    assert res.warped.shape == fixed[0].shape and res.displacement.shape == (*fixed[0].shape, 1, 3)
    assert np.all(np.isfinite(np.asarray(res.warped.dataobj))) and np.all(np.isfinite(res.matrix))
    assert np.all(np.isfinite(np.asarray(res.displacement.dataobj)))


@pytest.fixture(scope="module")
def nifti_bytes(tmp_path_factory):
    arr = (np.random.default_rng(2).random((10, 9, 8)) * 1000).astype(np.int16)
    path = tmp_path_factory.mktemp("nb") / "small.nii"
    nib.save(nib.Nifti1Image(arr, affine_from((2.0, 2.0, 3.0), (0, 5, 0), arr.shape)), str(path))
    return path.read_bytes()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_mutated_nifti_only_input_error(nifti_bytes, tmp_path_factory, data):
    """Random byte edits of a small NIfTI (header fields and data), plain or gzip, possibly cut:
    load_image returns a valid image or raises InputError."""
    raw = bytearray(nifti_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.one_of(st.integers(0, 351), st.integers(0, len(raw) - 1)))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        for field, fmt in ((40, "<h"), (42, "<h"), (44, "<h"), (46, "<h"), (70, "<h"), (108, "<f"), (112, "<f")):
            if data.draw(st.integers(0, 6)) == 0:
                value = (
                    data.draw(st.integers(-32768, 32767))
                    if fmt == "<h"
                    else data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
                )
                struct.pack_into(fmt, raw, field, value)
    raw = bytes(raw)
    gz = data.draw(st.booleans())
    blob = gzip.compress(raw, mtime=0) if gz else raw
    blob = blob[: data.draw(st.integers(0, len(blob)))] if data.draw(st.integers(0, 3)) == 0 else blob
    path = tmp_path_factory.mktemp("mut") / ("m.nii.gz" if gz else "m.nii")
    path.write_bytes(blob)
    try:
        img = sdk_io.load_image(path, "moving")
    except InputError as exc:
        assert str(exc).startswith("moving")
        return
    assert img.array.dtype == np.float32 and img.array.ndim == 3 and np.all(np.isfinite(img.array))


def test_errors_are_exported():
    assert issubclass(msode_sdk.ResourceError, MemoryError) and issubclass(msode_sdk.ResourceError, MsodeError)
    assert issubclass(msode_sdk.OutputError, OSError) and issubclass(msode_sdk.OutputError, MsodeError)
    assert issubclass(msode_sdk.RegistrationError, FloatingPointError)
    assert {"ResourceError", "OutputError", "RegistrationError"} <= set(msode_sdk.__all__)
