"""C++ embedding (cpp_demo/): build `msode_register` with CMake against the pip torch wheel's LibTorch,
then check it against the Python SDK on the same plan and inputs, and on bad files.

The build is cached in cpp_demo/build (configure once, then incremental `cmake --build -j2`; a first
build takes ~20 s of CPU). Plans under test are the conftest analytic plan (small model grid, fast) with
a `registrar.ts` member:

* the real whole-loop module (``msode_export.scripted.add_registrar_ts``): the C++ output must equal
  ``Registrar.register_model_grid`` (torch backend) within 1e-3 of the intensity range
  (``test_cpp_matches_python_sdk``; skipped, saying why, if msode_export.scripted is absent);
* a stand-in TorchScript module with the same signature, cheap and independent of the export code,
  for the plumbing (layouts, channels, matrices, NIfTI readers), threads and every error path.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Tuple

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MODEL_GRID, affine_from, render
from msode_sdk.io import normalise_intensity
from msode_sdk.plan import load_plan, write_plan

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "cpp_demo"
BUILD = SRC / "build"

_missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
if shutil.which("g++") is None and shutil.which("c++") is None:
    _missing.append("g++")
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"C++ demo needs {' and '.join(_missing)} on PATH")

try:
    HAVE_SCRIPTED = importlib.util.find_spec("msode_export.scripted") is not None
except ImportError:  # msode_export itself is not importable
    HAVE_SCRIPTED = False


# ------------------------------------------------------------------------------------------ build


@pytest.fixture(scope="session")
def cpp_bin():
    """Configure (once) and build cpp_demo; returns the build directory."""
    prefix = torch.utils.cmake_prefix_path
    cache = BUILD / "CMakeCache.txt"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    t0 = time.perf_counter()
    if not cache.exists() or prefix not in cache.read_text(errors="replace"):
        cfg = subprocess.run(
            ["cmake", "-S", str(SRC), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}"],
            capture_output=True,
            text=True,
            env=env,
        )
        if cfg.returncode != 0:
            if torch.version.cuda and "CUDA" in cfg.stdout + cfg.stderr:
                pytest.skip(
                    "a CUDA torch wheel's TorchConfig needs the CUDA toolkit to configure; "
                    f"install it or use the CPU wheel:\n{cfg.stderr[-1000:]}"
                )
            pytest.fail(f"cmake configure failed:\n{cfg.stdout[-3000:]}\n{cfg.stderr[-3000:]}")
    build = subprocess.run(["cmake", "--build", str(BUILD), "-j2"], capture_output=True, text=True, env=env)
    if build.returncode != 0:
        pytest.fail(f"cmake build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}")
    print(f"cpp_demo build: {time.perf_counter() - t0:.1f} s")
    for exe in ("msode_register", "msode_selftest", "embed_example"):
        assert (BUILD / exe).exists(), exe
    return BUILD


def _run(exe, *args, timeout=300):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- plan with registrar.ts


def _com(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    m = v[0, 0]
    s = m.sum().clamp_min(1e-6)
    return torch.stack(((m * x).sum() / s, (m * y).sum() / s, (m * z).sum() / s))


class StandInRegistrar(torch.nn.Module):
    """Same signature as the plan's registrar.ts (msode_export.scripted): translation by
    the intensity centre-of-mass difference plus a small x-displacement varying along z (so that any
    confusion of channels or axes in the C++ plumbing shows)."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, h, w = moving.shape[2], moving.shape[3], moving.shape[4]
        z = torch.arange(d, dtype=torch.float32).view(d, 1, 1).expand(d, h, w)
        y = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(d, h, w)
        x = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(d, h, w)
        t = _com(moving, x, y, z) - _com(fixed, x, y, z)  # fixed voxel p -> moving voxel p + t
        wobble = 0.75 * torch.sin(z * (6.283185307 / float(d)))
        disp = torch.stack((t[0] + wobble, t[1] + 0.0 * z, t[2] + 0.0 * z)).unsqueeze(0)
        gx = (x + disp[0, 0]) * (2.0 / float(w - 1)) - 1.0
        gy = (y + disp[0, 1]) * (2.0 / float(h - 1)) - 1.0
        gz = (z + disp[0, 2]) * (2.0 / float(d - 1)) - 1.0
        grid = torch.stack((gx, gy, gz), dim=-1).unsqueeze(0)
        warped = F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        matrix = torch.eye(4, dtype=torch.float32)
        matrix[:3, 3] = t
        return warped, disp, matrix


def _standin_ts() -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(StandInRegistrar()), buf)
    return buf.getvalue()


def _with_members(src, dst, extra: dict[str, bytes]):
    plan = load_plan(src)
    manifest = dict(plan.manifest.raw)
    manifest.pop("members", None)
    members = {n: plan.read(n) for n in plan.member_names()}
    members.update(extra)
    write_plan(dst, manifest, members)
    return dst


@pytest.fixture(scope="module")
def standin_plan(analytic_plan, tmp_path_factory):
    """The analytic plan plus the stand-in registrar.ts (fast; for plumbing, readers and errors)."""
    return _with_members(
        analytic_plan, tmp_path_factory.mktemp("cpp") / "standin.plan", {"registrar.ts": _standin_ts()}
    )


@pytest.fixture(scope="module")
def ts_plan(analytic_plan, standin_plan, tmp_path_factory):
    """The analytic plan with the real registrar.ts (msode_export.scripted), else the stand-in plan."""
    if not HAVE_SCRIPTED:
        return standin_plan
    from msode_export.scripted import add_registrar_ts

    return add_registrar_ts(analytic_plan, tmp_path_factory.mktemp("cpp") / "registrar.plan")


# ------------------------------------------------------------------------------------- phantom pair

GRID_AFFINE = affine_from(MODEL_GRID.spacing_xyz, shape=MODEL_GRID.shape_xyz, centre=(2.0, -8.0, 5.0))


def _world_map(pts):
    """A rigid motion (about 6 degrees and 6 mm) of the phantom in world space."""
    a = np.radians(6.0)
    rot = torch.tensor(
        [[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    c = torch.tensor([2.0, -8.0, 5.0], dtype=torch.float64)
    return (pts - c) @ rot.T + c + torch.tensor([4.0, -3.0, 2.0], dtype=torch.float64)


def _save(path, array, affine, dtype=np.float32, slope=None, inter=0.0):
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def pair(phantom, tmp_path_factory):
    """moving.nii as int16 with scl_slope/scl_inter, fixed.nii as float32, both on the model grid."""
    d = tmp_path_factory.mktemp("cpp_pair")
    shape = MODEL_GRID.shape_xyz
    moving = render(phantom, shape, GRID_AFFINE)
    fixed = render(phantom, shape, GRID_AFFINE, _world_map)
    raw = np.round((moving - 0.05) / 1e-4).astype(np.int16)  # stored = (value - 0.05) / slope
    return {
        "dir": d,
        "moving": _save(d / "moving.nii", raw, GRID_AFFINE, np.int16, slope=1e-4, inter=0.05),
        "fixed": _save(d / "fixed.nii", fixed, GRID_AFFINE),
    }


def _normalised(path, plan):
    """What Registrar.prepare does to an image already on the model grid (percentiles of all voxels)."""
    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 1, 0)))[None, None]
    n = plan.manifest.normalization
    return arr, normalise_intensity(t, n["low"], n["high"], reference=arr.reshape(-1))


def _sample_voxels(volume_xyz: np.ndarray, disp_vox: torch.Tensor) -> np.ndarray:
    """volume(x + d(x)) with d ``(1, 3, D, H, W)`` in voxels (x, y, z): grid_sample, zeros outside."""
    vol = torch.from_numpy(np.ascontiguousarray(volume_xyz.transpose(2, 1, 0)))[None, None]
    d, h, w = vol.shape[2:]
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (d, h, w)), indexing="ij")
    g = torch.stack(
        (
            (xx + disp_vox[0, 0]) * 2 / (w - 1) - 1,
            (yy + disp_vox[0, 1]) * 2 / (h - 1) - 1,
            (zz + disp_vox[0, 2]) * 2 / (d - 1) - 1,
        ),
        -1,
    )[None]
    out = F.grid_sample(vol, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy().transpose(2, 1, 0)


# ---------------------------------------------------------------------------------------- tests


def test_selftest_sha256_and_zip(cpp_bin, tmp_path, standin_plan):
    ts_plan = standin_plan
    r = _run(cpp_bin / "msode_selftest")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    rng = np.random.default_rng(0)
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000003):
        p = tmp_path / f"r{n}"
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        p.write_bytes(data)
        r = _run(cpp_bin / "msode_selftest", "sha256", p)
        assert r.stdout.strip() == hashlib.sha256(data).hexdigest(), n
    r = _run(cpp_bin / "msode_selftest", "zip", ts_plan)
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(ts_plan) as zf:
        want = sorted(f"{i.filename} {i.file_size} {hashlib.sha256(zf.read(i)).hexdigest()}" for i in zf.infolist())
    assert sorted(r.stdout.split("\n")[:-1]) == want


def _run_ok(cpp_bin, plan, moving, fixed, out_dir):
    out, out_n = out_dir / "warped.nii", out_dir / "warped_norm.nii"
    r = _run(cpp_bin / "msode_register", "--normalised-warped", out_n, plan, moving, fixed, out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert set(report["timings_ms"]) >= {"load_plan", "forward", "total"}
    assert all(v >= 0 for v in report["timings_ms"].values())
    fixed_img = nib.load(str(fixed))
    arrays = []
    for path in (out, out_n):  # FIXED's geometry, float32
        img = nib.load(str(path))
        assert img.shape == fixed_img.shape and img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.affine, fixed_img.affine, atol=1e-5)
        arrays.append(np.asarray(img.dataobj, dtype=np.float32))
    return report, arrays[0], arrays[1]


def _voxel_matrix(a_mm: np.ndarray) -> np.ndarray:
    """A model-frame (centre-relative mm) 4x4 map -> the same map on model-grid voxel indices."""
    s = np.diag([*MODEL_GRID.spacing_xyz, 1.0])
    c = np.eye(4)
    c[:3, 3] = [(n - 1) / 2.0 for n in MODEL_GRID.shape_xyz]
    return c @ np.linalg.inv(s) @ a_mm @ s @ np.linalg.inv(c)


@pytest.mark.skipif(not HAVE_SCRIPTED, reason="msode_export.scripted (the real registrar.ts) is not there yet")
def test_cpp_matches_python_sdk(cpp_bin, ts_plan, pair):
    """C++ msode_register == Registrar.register_model_grid (torch backend) on the same plan and inputs:
    warped images within 1e-3 of the intensity range, same voxel and world matrices."""
    report, warped_m, warped_n = _run_ok(cpp_bin, ts_plan, pair["moving"], pair["fixed"], pair["dir"])
    from msode_sdk import Registrar

    plan = load_plan(ts_plan)
    moving_arr, mov_t = _normalised(pair["moving"], plan)
    _, fix_t = _normalised(pair["fixed"], plan)
    reg = Registrar.load(ts_plan, device="cpu", backend="torch")
    res = reg.register_model_grid(mov_t, fix_t)
    ref_warped = res.warped[0, 0].numpy().transpose(2, 1, 0)
    spacing = torch.tensor(MODEL_GRID.spacing_xyz, dtype=torch.float32).view(1, 3, 1, 1, 1)
    ref_disp = res.displacement(reg.model_grid) / spacing  # mm -> model-grid voxels

    assert np.abs(warped_n - ref_warped).max() <= 1e-3, np.abs(warped_n - ref_warped).max()
    m_range = float(moving_arr.max() - moving_arr.min())
    expect_m = _sample_voxels(moving_arr, ref_disp)
    assert np.abs(warped_m - expect_m).max() <= 1e-3 * m_range, np.abs(warped_m - expect_m).max() / m_range
    # the registration did something: warped is much closer to fixed than moving was
    fixed_n, moving_n = (t[0, 0].numpy().transpose(2, 1, 0) for t in (fix_t, mov_t))
    assert np.abs(warped_n - fixed_n).mean() < 0.6 * np.abs(moving_n - fixed_n).mean()

    a = res.chain.affine_part()
    want = _voxel_matrix(np.eye(4) if a is None else a[0].double().numpy())
    mat = np.asarray(report["matrix_voxel"])
    np.testing.assert_allclose(mat, want, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(report["matrix_ras"]), GRID_AFFINE @ mat @ np.linalg.inv(GRID_AFFINE), atol=1e-4
    )


def test_cpp_plumbing_standin(cpp_bin, standin_plan, pair, tmp_path):
    """Layouts, channels, matrices and the NIfTI readers (int16 + scaling, uint8) against the stand-in
    registrar.ts run by PyTorch on what the SDK's normalisation makes of the same files."""
    arr = np.asarray(nib.load(str(pair["fixed"])).dataobj)
    u8 = _save(tmp_path / "fixed_u8.nii", np.round(arr / arr.max() * 255), GRID_AFFINE, np.uint8)
    report, warped_m, warped_n = _run_ok(cpp_bin, standin_plan, pair["moving"], u8, tmp_path)
    plan = load_plan(standin_plan)
    moving_arr, mov_t = _normalised(pair["moving"], plan)
    _, fix_t = _normalised(u8, plan)
    module = torch.jit.load(io.BytesIO(plan.read("registrar.ts")), map_location="cpu").eval()
    with torch.no_grad():
        w, disp, matrix = module(mov_t, fix_t)
    assert float(disp[0, 0].std()) > 0.1  # the stand-in's x displacement varies along z
    assert np.abs(warped_n - w[0, 0].numpy().transpose(2, 1, 0)).max() <= 1e-3
    m_range = float(moving_arr.max() - moving_arr.min())
    assert np.abs(warped_m - _sample_voxels(moving_arr, disp)).max() <= 1e-3 * m_range
    np.testing.assert_allclose(np.asarray(report["matrix_voxel"]), matrix.double().numpy(), atol=1e-4)
    assert report["plan"] == plan.manifest.name and report["analytic_plan"] is True
    assert report["rigid_init"] == "none"


def test_embed_example_two_threads(cpp_bin, standin_plan):
    """The library linked into another program: one Registrar, two threads, same result."""
    r = _run(cpp_bin / "embed_example", standin_plan)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    t = [float(v.rstrip(";")) for v in words[words.index("(voxels)") + 1 :][:3]]
    np.testing.assert_allclose(t, [2.0, -1.0, 1.0], atol=0.25)  # stand-in: centre-of-mass shift
    assert float(words[-1]) == 0.0


@pytest.mark.parametrize("name", ["analytic_ssd.plan", "rigid_bspline.plan"])
def test_bundled_plan(cpp_bin, pair, tmp_path, name):
    """Each bundled plan opens, verifies and loads its registrar.ts in C++ (checked cheaply: inputs on
    the wrong grid are refused with the plan's 120x120x80 model grid in the message, after loading)."""
    from msode_sdk.registrar import MODELS_DIR

    path = MODELS_DIR / name
    plan = load_plan(path)
    if not plan.has("registrar.ts"):
        pytest.skip(f"the bundled {name} has no registrar.ts")
    g = plan.manifest.model_grid
    _expect_error(
        cpp_bin,
        [path, pair["moving"], pair["fixed"], tmp_path / "w.nii"],
        "do not match",
        "x".join(str(v) for v in g.shape_xyz),
    )


def _expect_error(cpp_bin, args, *phrases, rc=1):
    out = Path(args[-1])
    r = _run(cpp_bin / "msode_register", *args)
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("msode_register: error:"), r.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert r.stdout == ""
    assert not out.exists()
    return lines[0]


def _corrupt_member(src, dst, member):
    data = bytearray(Path(src).read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo(member)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x5A
    Path(dst).write_bytes(bytes(data))
    return dst


def test_bad_plans(cpp_bin, standin_plan, pair, analytic_plan, tmp_path):
    ts_plan = standin_plan
    m, f, w = pair["moving"], pair["fixed"], tmp_path / "w.nii"
    _expect_error(cpp_bin, [tmp_path / "nope.plan", m, f, w], "no such file")
    junk = tmp_path / "junk.plan"
    junk.write_text("this is not a zip file\n" * 10)
    _expect_error(cpp_bin, [junk, m, f, w], "not a zip")
    _expect_error(cpp_bin, [analytic_plan, m, f, w], "registrar.ts")
    for member in ("registrar.ts", "networks/rigid_L1.ts"):
        bad = _corrupt_member(ts_plan, tmp_path / "corrupt.plan", member)
        _expect_error(cpp_bin, [bad, m, f, w], f"'{member}'", "sha256 mismatch")
    # truncated plan file
    trunc = tmp_path / "trunc.plan"
    trunc.write_bytes(ts_plan.read_bytes()[: ts_plan.stat().st_size // 2])
    _expect_error(cpp_bin, [trunc, m, f, w], "not a zip")
    # compressed members and unsafe names are refused
    with zipfile.ZipFile(ts_plan) as zf:
        items = [(i.filename, zf.read(i)) for i in zf.infolist()]
    deflated = tmp_path / "deflated.plan"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            zf.writestr(name, data)
    _expect_error(cpp_bin, [deflated, m, f, w], "compressed")
    evil = tmp_path / "evil.plan"
    with zipfile.ZipFile(evil, "w") as zf:
        for name, data in items:
            zf.writestr(name, data)
        zf.writestr("../evil.txt", b"x")
    _expect_error(cpp_bin, [evil, m, f, w], "unsafe member name", "'..'")


def test_bad_images(cpp_bin, standin_plan, pair, tmp_path):
    ts_plan = standin_plan
    m, f, w = pair["moving"], pair["fixed"], tmp_path / "w.nii"
    _expect_error(cpp_bin, [ts_plan, tmp_path / "missing.nii", f, w], "moving", "file not found")
    raw = Path(m).read_bytes()
    trunc = tmp_path / "trunc.nii"
    trunc.write_bytes(raw[: len(raw) - 1000])
    _expect_error(cpp_bin, [ts_plan, trunc, f, w], "truncated")
    short = tmp_path / "short.nii"
    short.write_bytes(raw[:200])
    _expect_error(cpp_bin, [ts_plan, m, short, w], "fixed", "truncated")
    x, y, z = MODEL_GRID.shape_xyz
    arr = np.random.default_rng(0).random((x, y, z - 2)).astype(np.float32)
    _expect_error(
        cpp_bin,
        [ts_plan, m, _save(tmp_path / "dims.nii", arr, GRID_AFFINE), w],
        "dimensions",
        f"{x}x{y}x{z - 2}",
        "model grid",
    )
    aff = GRID_AFFINE.copy()
    aff[0, 0] *= 1.01
    arr = np.asarray(nib.load(str(f)).dataobj)
    _expect_error(cpp_bin, [ts_plan, m, _save(tmp_path / "spacing.nii", arr, aff), w], "spacing")
    big = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(arr.astype(">f4"), GRID_AFFINE, header=nib.Nifti1Header(endianness=">")), str(big))
    assert big.read_bytes()[:4] == (348).to_bytes(4, "big")
    _expect_error(cpp_bin, [ts_plan, m, big, w], "big-endian")
    gz = tmp_path / "img.nii"
    gz.write_bytes(gzip.compress(Path(f).read_bytes()))
    _expect_error(cpp_bin, [ts_plan, m, gz, w], "gzip")
    _expect_error(cpp_bin, [ts_plan, m, _save(tmp_path / "const.nii", np.ones_like(arr), GRID_AFFINE), w], "constant")
    nan = arr.copy()
    nan[3, 4, 5] = np.nan
    _expect_error(cpp_bin, [ts_plan, m, _save(tmp_path / "nan.nii", nan, GRID_AFFINE), w], "NaN")
    _expect_error(cpp_bin, [ts_plan, m, _save(tmp_path / "i32.nii", arr * 1000, GRID_AFFINE, np.int32), w], "datatype")
    r = _run(cpp_bin / "msode_register", ts_plan, m, f)  # usage
    assert r.returncode == 2 and "usage" in r.stderr
