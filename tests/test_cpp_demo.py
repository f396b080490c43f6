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

Native grids (issue 21, ``msode_register PLAN MOVING FIXED -o OUTDIR``): the C++ files against the Python
CLI's ``msode register`` on oblique / anisotropic / flipped / thick-slice grids (the analytic test plan,
and the bundled plan on data/sample), SimpleITK applying the C++ displacement and transform, a stand-in
``register_native`` with a known answer, hostile files, and the NIfTI reader / writer against nibabel.
Tests that need the real ``register_native`` skip, saying why, when registrar.ts lacks it.
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


@pytest.mark.parametrize("name", ["analytic_ssd.plan", "rigid_bspline.plan", "rigid_dense.plan"])
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


def _expect_error(cpp_bin, args, *phrases, rc=2):
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


def test_bad_plans(cpp_bin, standin_plan, pair, analytic_plan, tmp_path, request):
    scripted_plan = request.getfixturevalue("ts_plan")  # the real registrar.ts (or the stand-in without scripting)
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
    # a manifest whose stages are not a list of named stages, or not those registrar.ts was built for
    with zipfile.ZipFile(scripted_plan) as zf:
        items = [(i.filename, zf.read(i)) for i in zf.infolist()]
    manifest = json.loads(dict(items)["manifest.json"])
    cases = [
        ("stages_int", 5, "manifest.stages: expected a non-empty list"),
        ("stages_unnamed", [{"transform": "rigid"}], "manifest.stages[0].name: required field is missing"),
    ]
    if "registrar_ts" in manifest:
        renamed = [{**st, "name": st["name"] + "_x"} for st in manifest["stages"]]
        cases.append(("stages_renamed", renamed, "built for other stages"))
    for name, stages, phrase in cases:
        bad = tmp_path / f"{name}.plan"
        with zipfile.ZipFile(bad, "w") as zf:
            for member, data in items:
                zf.writestr(member, json.dumps({**manifest, "stages": stages}) if member == "manifest.json" else data)
        _expect_error(cpp_bin, [bad, m, f, w], phrase)


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
    _expect_error(cpp_bin, [ts_plan, m, _save(tmp_path / "const.nii", np.ones_like(arr), GRID_AFFINE), w], "constant")
    nan = arr.copy()
    nan[3, 4, 5] = np.nan
    _expect_error(cpp_bin, [ts_plan, m, _save(tmp_path / "nan.nii", nan, GRID_AFFINE), w], "NaN")
    cplx = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(arr.astype(np.complex64), GRID_AFFINE), str(cplx))
    _expect_error(cpp_bin, [ts_plan, m, cplx, w], "complex images are not supported")
    r = _run(cpp_bin / "msode_register", ts_plan, m, f)  # usage
    assert r.returncode == 2 and "usage" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_model_grid_mode_reads_any_nifti(cpp_bin, standin_plan, pair, tmp_path):
    """The model-grid mode now reads what the native mode reads: a big-endian, gzip-compressed NIfTI-2
    int32 copy of FIXED gives the same warped image as the little-endian NIfTI-1 float32 original."""
    arr = np.asarray(nib.load(str(pair["fixed"])).dataobj, dtype=np.float32)
    hdr = nib.Nifti2Header(endianness=">")
    hdr.set_data_dtype(np.int32)
    img = nib.Nifti2Image(np.round(arr * 1e4).astype(np.int32), GRID_AFFINE, header=hdr)
    img.header.set_slope_inter(1e-4, 0.0)
    other = tmp_path / "fixed_be.nii.gz"
    nib.save(img, str(other))
    assert gzip.decompress(other.read_bytes())[:4] == (540).to_bytes(4, "big")
    _, ref_m, _ = _run_ok(cpp_bin, standin_plan, pair["moving"], pair["fixed"], tmp_path)
    _, got_m, _ = _run_ok(cpp_bin, standin_plan, pair["moving"], other, tmp_path)
    rng = float(ref_m.max() - ref_m.min())
    assert np.abs(got_m - ref_m).max() <= 1e-3 * rng


# ================================================================================================
# Native grids (issue 21): msode_register PLAN MOVING FIXED -o OUTDIR == `msode register`
# ================================================================================================


def _has_register_native(plan_path) -> bool:
    plan = load_plan(plan_path)
    if not plan.has("registrar.ts"):
        return False
    module = torch.jit.load(io.BytesIO(plan.read("registrar.ts")), map_location="cpu")
    return hasattr(module, "register_native")


@pytest.fixture(scope="module")
def native_plan(ts_plan):
    """The analytic test plan's real registrar.ts, if it has register_native (else skip, saying why)."""
    if not HAVE_SCRIPTED:
        pytest.skip("msode_export.scripted (the real registrar.ts) is not importable")
    if not _has_register_native(ts_plan):
        pytest.skip("registrar.ts built by msode_export.scripted has no register_native method yet")
    return ts_plan


@pytest.fixture(scope="module")
def rigid_native_plan(tmp_path_factory):
    """A rigid-only analytic plan with registrar.ts: its whole map is the rigid matrix (transform.tfm test)."""
    if not HAVE_SCRIPTED:
        pytest.skip("msode_export.scripted (the real registrar.ts) is not importable")
    from msode_export.analytic import build_analytic_plan

    path = tmp_path_factory.mktemp("cpp") / "rigid.plan"
    build_analytic_plan(path, MODEL_GRID, stages=("rigid",), formats=("torchscript",), registrar_ts=True)
    if not _has_register_native(path):
        pytest.skip("registrar.ts built by msode_export.scripted has no register_native method yet")
    return path


class NativeStandIn(torch.nn.Module):
    """register_native with a known answer, for the C++ plumbing independent of the export code: the map
    fixed p -> moving M p + (wobble sin(p_z / 15), 0, 0) (M: 4 degrees about z through the fixed FOV centre,
    then (3, -2, 1.5) mm); returns (moving sampled there, LPS displacement, M) as register_native does."""

    def __init__(self, wobble: float = 0.75):
        super().__init__()
        self.wobble = float(wobble)  # (no class annotation: this file uses postponed annotations)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return moving, torch.zeros(1, 3, moving.shape[2], moving.shape[3], moving.shape[4]), torch.eye(4)

    @torch.jit.export
    def register_native(
        self, moving: torch.Tensor, moving_affine: torch.Tensor, fixed: torch.Tensor, fixed_affine: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if float(moving.max()) > 1e6:  # a module-side input error, as the real one raises them
            raise ValueError("InputError: moving: stand-in refuses intensities above 1e6")
        nx, ny, nz = fixed.shape[0], fixed.shape[1], fixed.shape[2]
        ii = torch.arange(nx, dtype=torch.float64).view(nx, 1, 1).expand(nx, ny, nz)
        jj = torch.arange(ny, dtype=torch.float64).view(1, ny, 1).expand(nx, ny, nz)
        kk = torch.arange(nz, dtype=torch.float64).view(1, 1, nz).expand(nx, ny, nz)
        p = torch.stack((ii, jj, kk, torch.ones_like(ii)), -1) @ fixed_affine.t()
        c = fixed_affine @ torch.tensor([(nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0, 1.0], dtype=torch.float64)
        a = 4.0 * 3.141592653589793 / 180.0
        m = torch.eye(4, dtype=torch.float64)
        m[0, 0] = torch.cos(torch.tensor(a, dtype=torch.float64))
        m[1, 1] = m[0, 0]
        m[1, 0] = torch.sin(torch.tensor(a, dtype=torch.float64))
        m[0, 1] = -m[1, 0]
        m[:3, 3] = c[:3] - m[:3, :3] @ c[:3] + torch.tensor([3.0, -2.0, 1.5], dtype=torch.float64)
        q = p @ m.t()
        q[..., 0] = q[..., 0] + self.wobble * torch.sin(p[..., 2] / 15.0)
        d = (q - p)[..., :3] * torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
        v = q @ torch.linalg.inv(moving_affine).t()
        mx, my, mz = moving.shape[0], moving.shape[1], moving.shape[2]
        g = torch.stack(
            (
                v[..., 2] * (2.0 / (mz - 1)) - 1.0,
                v[..., 1] * (2.0 / (my - 1)) - 1.0,
                v[..., 0] * (2.0 / (mx - 1)) - 1.0,
            ),
            -1,
        ).to(torch.float32)
        vol = moving.to(torch.float32).unsqueeze(0).unsqueeze(0)
        warped = F.grid_sample(vol, g.unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        return warped, d.to(torch.float32), m


@pytest.fixture(scope="module")
def native_standin_plan(analytic_plan, tmp_path_factory):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(NativeStandIn()), buf)
    return _with_members(
        analytic_plan, tmp_path_factory.mktemp("cpp") / "native_standin.plan", {"registrar.ts": buf.getvalue()}
    )


def _direction_affine(columns, spacing, shape, centre) -> np.ndarray:
    """voxel -> RAS affine from unit direction columns (3x3), voxel sizes and the FOV centre."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, dtype=np.float64) @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


# fixed: oblique (10 degrees about x, 8 about z), anisotropic 1.6 x 1.6 x 4 mm
NATIVE_FIXED = (
    (100, 120, 36),
    affine_from((1.6, 1.6, 4.0), rot_deg=(10.0, 0.0, 8.0), shape=(100, 120, 36), centre=(2.0, -8.0, 5.0)),
)
# moving "flipped": LPS-stored (x and y reversed), 2.5 mm isotropic, another size and centre
NATIVE_MOVING = {
    "flipped": (
        (64, 80, 56),
        _direction_affine(np.diag([-1.0, -1.0, 1.0]), (2.5, 2.5, 2.5), (64, 80, 56), (4.0, -6.0, 3.0)),
    ),
    # "thick": 0.5 x 0.5 x 4 mm slices, coronal (array axes -> world x, -z, y), a partial field of view
    "thick": (
        (160, 200, 24),
        _direction_affine(
            [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], (0.5, 0.5, 4.0), (160, 200, 24), (0.0, -5.0, 4.0)
        ),
    ),
}


@pytest.fixture(scope="module")
def native_pairs(tmp_path_factory):
    """NIfTI files of one phantom on native grids: fixed (oblique, anisotropic, int16 + scl_slope, .nii.gz)
    and two movings (see NATIVE_MOVING; float32 .nii and uint16 .nii.gz), the phantom moved rigidly between."""
    from conftest import Phantom

    d = tmp_path_factory.mktemp("cpp_native")
    ph = Phantom(seed=3, n_blobs=80)
    shape, aff = NATIVE_FIXED
    fixed = render(ph, shape, aff, _world_map)
    raw = np.round(fixed / 5e-5).astype(np.int16)
    files = {"dir": d, "fixed": _save(d / "fixed.nii.gz", raw, aff, np.int16, slope=5e-5, inter=0.0)}
    shape, aff = NATIVE_MOVING["flipped"]
    files["flipped"] = _save(d / "moving_flipped.nii", render(ph, shape, aff), aff)
    shape, aff = NATIVE_MOVING["thick"]
    files["thick"] = _save(d / "moving_thick.nii.gz", np.round(render(ph, shape, aff) * 2000), aff, np.uint16)
    return files


def _cpp_native(cpp_bin, plan, moving, fixed, out, *extra, timeout=600):
    r = _run(cpp_bin / "msode_register", plan, moving, fixed, "-o", out, "-q", *extra, timeout=timeout)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _sdk_cli(plan, moving, fixed, out):
    """`msode register` itself (its main(), in this process): torch backend on the CPU."""
    from msode_sdk.cli import main

    rc = main(["register", str(moving), str(fixed), "-o", str(out), "--plan", str(plan), "--device", "cpu",
               "--backend", "torch", "-q"])  # fmt: skip
    assert rc == 0


OUTPUT_FILES = ["displacement.nii.gz", "report.json", "transform.tfm", "warped.nii.gz"]


def _compare_outputs(cpp_dir: Path, sdk_dir: Path, fixed_path) -> dict:
    """The C++ files against the SDK's: same names, geometry and layout; warped within 1e-3 of the
    intensity range, displacement RMS within 0.01 mm, matrices (report, transform.tfm) within 1e-4."""
    from msode_sdk.io import read_itk_affine

    assert sorted(p.name for p in cpp_dir.iterdir()) == OUTPUT_FILES
    fixed = nib.load(str(fixed_path))
    out = {}
    w_c, w_s = (nib.load(str(d / "warped.nii.gz")) for d in (cpp_dir, sdk_dir))
    assert w_c.shape == w_s.shape == fixed.shape[:3] and w_c.get_data_dtype() == np.float32
    for img in (w_c,):
        np.testing.assert_allclose(img.affine, fixed.affine, atol=1e-5)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), fixed.affine, atol=1e-4)
    for img in (w_c, w_s):
        assert img.header.get_xyzt_units()[0] == "mm"
    a, b = (np.asarray(i.dataobj, dtype=np.float64) for i in (w_c, w_s))
    rng = float(b.max() - b.min())
    out["warped"] = float(np.abs(a - b).max() / rng)
    assert out["warped"] <= 1e-3, out
    d_c, d_s = (nib.load(str(d / "displacement.nii.gz")) for d in (cpp_dir, sdk_dir))
    assert d_c.shape == d_s.shape == fixed.shape[:3] + (1, 3) and d_c.get_data_dtype() == np.float32
    assert int(d_c.header["intent_code"]) == 1007 and int(d_c.header["sform_code"]) == 1
    assert d_c.header.get_xyzt_units()[0] == d_s.header.get_xyzt_units()[0] == "mm"
    raw = (cpp_dir / "displacement.nii.gz").read_bytes()  # stored, as the SDK writes it (msode_sdk.io)
    assert len(raw) >= len(gzip.decompress(raw))
    np.testing.assert_allclose(d_c.affine, fixed.affine, atol=1e-5)
    a, b = (np.asarray(i.dataobj, dtype=np.float64) for i in (d_c, d_s))
    out["disp_rms_mm"] = float(np.sqrt(((a - b) ** 2).sum(-1).mean()))
    assert out["disp_rms_mm"] <= 0.01, out
    r_c, r_s = (json.loads((d / "report.json").read_text()) for d in (cpp_dir, sdk_dir))
    for key in ("plan", "analytic_plan", "plan_kind", "conventions"):
        assert r_c[key] == r_s[key], key
    assert r_c["device"] == "cpu" and r_c["timings_s"]["register"] > 0
    # the report's measures on the model grid (registrar.ts's register_native_measured vs the SDK's)
    fov_c, fov_s = dict(r_c["fields_of_view"]), dict(r_s["fields_of_view"])
    assert fov_c.pop("content_ratio") == pytest.approx(fov_s.pop("content_ratio"), abs=2e-3) and fov_c == fov_s
    assert (
        list(r_c["similarity"]) == list(r_s["similarity"]) == ["metric", "start", *[s["name"] for s in r_s["stages"]]]
    )
    for k in list(r_s["similarity"])[1:]:  # hard-binned MI of images equal to float rounding
        assert r_c["similarity"][k] == pytest.approx(r_s["similarity"][k], rel=0.01, abs=0.01), k
    assert ("jacobian_determinant" in r_c) == ("jacobian_determinant" in r_s)
    if "jacobian_determinant" in r_s:
        j_c, j_s = r_c["jacobian_determinant"], r_s["jacobian_determinant"]
        assert j_c["domain"] == j_s["domain"] and j_c["min"] == pytest.approx(j_s["min"], abs=1e-3)
        assert j_c["fraction_nonpositive"] == pytest.approx(j_s["fraction_nonpositive"], abs=1e-4)
    m_c, m_s = np.asarray(r_c["matrix_ras"]), np.asarray(r_s["matrix_ras"])
    out["matrix"] = float(np.abs(m_c - m_s).max())
    np.testing.assert_allclose(m_c, m_s, atol=1e-4)
    np.testing.assert_allclose(read_itk_affine(cpp_dir / "transform.tfm"), m_c, atol=1e-12)
    np.testing.assert_allclose(
        read_itk_affine(cpp_dir / "transform.tfm"), read_itk_affine(sdk_dir / "transform.tfm"), atol=1e-4
    )
    return out


@pytest.fixture(scope="module")
def native_runs(cpp_bin, native_plan, native_pairs):
    """msode_register -o and `msode register` on each native pair (run once, shared by the tests)."""
    runs = {}
    for case in NATIVE_MOVING:
        d = native_pairs["dir"] / case
        t0 = time.perf_counter()
        report = _cpp_native(cpp_bin, native_plan, native_pairs[case], native_pairs["fixed"], d / "cpp")
        t1 = time.perf_counter()
        _sdk_cli(native_plan, native_pairs[case], native_pairs["fixed"], d / "sdk")
        t2 = time.perf_counter()
        runs[case] = {"cpp": d / "cpp", "sdk": d / "sdk", "report": report, "cpp_s": t1 - t0, "sdk_s": t2 - t1}
    return runs


@pytest.mark.parametrize("case", list(NATIVE_MOVING))
def test_native_equals_sdk_cli(native_runs, native_pairs, case):
    """C++ msode_register -o == `msode register` (torch backend, CPU) on native grids: an oblique
    anisotropic int16 fixed; a flipped, differently sized moving / a coronal 0.5 x 0.5 x 4 mm moving."""
    run = native_runs[case]
    diffs = _compare_outputs(run["cpp"], run["sdk"], native_pairs["fixed"])
    print(f"{case}: {diffs}; C++ {run['cpp_s']:.1f} s, SDK in-process {run['sdk_s']:.1f} s")
    assert set(run["report"]["outputs"]) == {"warped", "transform", "displacement", "report"}
    if case == "flipped":  # full field of view: the rigid motion is recovered (the partial-FOV thick-slice
        # moving is not registrable by the analytic SSD plan; there only the equality above is checked)
        pts = np.array([[x, y, z, 1.0] for x in (-40, 40) for y in (-40, 40) for z in (-40, 40)])
        truth = _world_map(torch.from_numpy(pts[:, :3])).numpy()
        got = pts @ np.asarray(run["report"]["matrix_ras"]).T
        assert np.abs(got[:, :3] - truth).max() < 0.5


def test_simpleitk_reproduces_cpp_warped(native_runs, native_pairs, cpp_bin, rigid_native_plan, tmp_path):
    """SimpleITK applies the C++ displacement.nii.gz (rigid + B-spline) and transform.tfm (a rigid-only
    plan: the rigid part is the whole map) to MOVING and reproduces the C++ warped image."""
    sitk = pytest.importorskip("SimpleITK")
    moving, fixed = native_pairs["flipped"], native_pairs["fixed"]
    mov_s, fix_s = sitk.ReadImage(str(moving), sitk.sitkFloat64), sitk.ReadImage(str(fixed), sitk.sitkFloat64)

    def check(warped_path, tx):
        ours = np.asarray(nib.load(str(warped_path)).dataobj, dtype=np.float64)
        theirs = sitk.GetArrayFromImage(sitk.Resample(mov_s, fix_s, tx, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
        inside = (ours != 0) & (theirs != 0)  # trilinear at the field of view's border differs (ITK clamps)
        assert inside.mean() > 0.3
        corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
        err = np.abs(ours - theirs)[inside].max() / (ours.max() - ours.min())
        assert corr > 0.999 and err < 1e-3, (corr, err)

    run = native_runs["flipped"]
    field = sitk.ReadImage(str(run["cpp"] / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    check(run["cpp"] / "warped.nii.gz", sitk.DisplacementFieldTransform(field))
    _cpp_native(cpp_bin, rigid_native_plan, moving, fixed, tmp_path / "rigid")
    check(tmp_path / "rigid" / "warped.nii.gz", sitk.ReadTransform(str(tmp_path / "rigid" / "transform.tfm")))


def test_native_standin_conventions(cpp_bin, native_standin_plan, native_pairs, tmp_path):
    """The C++ side against a register_native with a known answer (NativeStandIn): the matrix, the LPS
    displacement at every fixed voxel and the warped image, element for element; the output folder
    semantics (an existing folder keeps its other files; the four are replaced)."""
    moving, fixed = native_pairs["flipped"], native_pairs["fixed"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "report.json").write_text("old")
    _cpp_native(cpp_bin, native_standin_plan, moving, fixed, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES + ["notes.txt"])
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    from msode_sdk.io import load_image

    mov, fix = load_image(str(moving), "moving"), load_image(str(fixed), "fixed")
    module = torch.jit.script(NativeStandIn())
    with torch.no_grad():
        w, d, m = module.register_native(
            torch.from_numpy(mov.array),
            torch.from_numpy(mov.affine),
            torch.from_numpy(fix.array),
            torch.from_numpy(fix.affine),
        )
    report = json.loads((out / "report.json").read_text())
    np.testing.assert_allclose(np.asarray(report["matrix_ras"]), m.numpy(), atol=1e-12)
    disp = np.asarray(nib.load(str(out / "displacement.nii.gz")).dataobj)
    np.testing.assert_allclose(disp[:, :, :, 0, :], d.numpy(), atol=1e-6)
    assert float(d[..., 0].abs().max()) > 3.0 and float(d[..., 0].std()) > 0.3  # LPS x varies (wobble)
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    np.testing.assert_allclose(warped, w.numpy(), atol=1e-5 * float(w.abs().max()))


def _expect_native_error(cpp_bin, plan, moving, fixed, out: Path, *phrases):
    """One line on stderr, exit 2 (as `msode register`), nothing on stdout, and no output folder (nor a
    temporary sibling)."""
    before = sorted(p.name for p in out.parent.iterdir())
    r = _run(cpp_bin / "msode_register", plan, moving, fixed, "-o", out)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("msode_register: error: "), r.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert r.stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == before
    return lines[0]


def test_native_hostile_files(cpp_bin, native_standin_plan, standin_plan, native_pairs, tmp_path):
    """Hostile inputs: one-line error naming the input, exit 1, no output folder. Messages equal the SDK's
    InputError where both refuse."""
    from msode_sdk.errors import InputError
    from msode_sdk.io import load_image

    plan, good = native_standin_plan, native_pairs["fixed"]
    d = tmp_path / "in"
    d.mkdir()
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    vol = rng.random((20, 22, 18)).astype(np.float32)
    eye = np.eye(4)

    def saved(name, arr, affine=eye, sform=None):
        img = nib.Nifti1Image(arr, affine)
        if sform is not None:
            img.set_sform(sform, code=1)
        nib.save(img, str(d / name))
        return d / name

    cases = []  # (file, phrases, the SDK: "same" message | "refuses" too | "accepts" it)
    raw = Path(saved("good.nii.gz", vol)).read_bytes()
    (d / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases.append((d / "trunc.nii.gz", ["moving (trunc.nii.gz)", "truncated"], "refuses"))
    (d / "trunc_header.nii.gz").write_bytes(raw[:40])
    cases.append((d / "trunc_header.nii.gz", ["moving", "truncated"], "refuses"))
    bad_crc = bytearray(raw)
    bad_crc[-8] ^= 1
    (d / "crc.nii.gz").write_bytes(bytes(bad_crc))
    cases.append((d / "crc.nii.gz", ["moving (crc.nii.gz)", "corrupted gzip data"], "refuses"))
    lying = bytearray(Path(saved("lying.nii", vol)).read_bytes())
    struct.pack_into("<hhh", lying, 42, 2000, 2000, 60)  # 240 M voxels claimed, 32 KB held
    (d / "lying.nii").write_bytes(bytes(lying))
    (d / "lying.nii.gz").write_bytes(gzip.compress(bytes(lying)))
    cases.append((d / "lying.nii", ["declares 960000000 bytes", "the file has"], "same"))
    cases.append((d / "lying.nii.gz", ["declares 960000000 bytes", "decompressed file holds"], "same"))
    struct.pack_into("<hhh", lying, 42, 30000, 30000, 30000)
    (d / "huge.nii").write_bytes(bytes(lying))
    cases.append((d / "huge.nii", ["larger than supported"], "same"))
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    cases.append((saved("nan.nii.gz", nan), ["1 NaN/Inf voxels"], "same"))
    four = rng.random((20, 22, 18, 3)).astype(np.float32)
    cases.append((saved("four.nii.gz", four), ["expected a 3-D image", "4-D"], "same"))
    zero = eye.copy()
    zero[2, 2] = 0.0
    cases.append((saved("zero_sform.nii.gz", vol, sform=zero), ["voxel spacing [1.0, 1.0, 0.0] mm is outside"], "same"))
    pix = bytearray(Path(saved("zero_pixdim.nii", vol)).read_bytes())
    struct.pack_into("<hh", pix, 252, 1, 0)  # qform only, ...
    struct.pack_into("<f", pix, 88, 0.0)  # ... whose pixdim[3] is 0 (nibabel would assume 1 mm)
    (d / "zero_pixdim.nii").write_bytes(bytes(pix))
    cases.append((d / "zero_pixdim.nii", ["zero or invalid voxel size", "pixdim[3]"], "accepts"))
    singular = np.array([[1.0, 1.0, 0, 0], [0.001, 0.0010001, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    cases.append((saved("singular.nii.gz", vol, sform=singular), ["singular or degenerate"], "same"))
    cases.append((saved("constant.nii.gz", np.ones_like(vol)), ["constant"], "same"))
    (d / "junk.nii").write_text("not a NIfTI file at all\n" * 20)
    cases.append((d / "junk.nii", ["cannot read", "as NIfTI"], "refuses"))
    inside = bytearray(Path(saved("vox_inside.nii", vol)).read_bytes())
    struct.pack_into("<f", inside, 108, 100.0)  # vox_offset inside the 348-byte header
    (d / "vox_inside.nii").write_bytes(bytes(inside))
    cases.append((d / "vox_inside.nii", ["vox offset 100 too low"], "refuses"))
    for path, phrases, sdk in cases:
        line = _expect_native_error(cpp_bin, plan, path, good, out, *phrases)
        if sdk == "accepts":  # nibabel substitutes 1 mm for a zero pixdim; the C++ reader refuses the file
            load_image(str(path), "moving")
            continue
        with pytest.raises(InputError) as exc:
            load_image(str(path), "moving")
        if sdk == "same":
            assert line == f"msode_register: error: {exc.value}"
    # the fixed image is named as such; the plan is loaded only after both inputs passed
    _expect_native_error(cpp_bin, tmp_path / "no.plan", good, cases[0][0], out, "fixed (trunc.nii.gz)")
    _expect_native_error(cpp_bin, tmp_path / "no.plan", good, good, out, "no such file")
    # a registrar.ts without register_native; an input error raised inside registrar.ts
    _expect_native_error(cpp_bin, standin_plan, good, good, out, "predates register_native", "add_registrar_ts")
    _expect_native_error(cpp_bin, plan, saved("bright.nii.gz", vol * 1e7), good, out, "moving: stand-in refuses")
    # an output path that is a file
    (tmp_path / "file").write_text("x")
    r = _run(cpp_bin / "msode_register", plan, good, good, "-o", tmp_path / "file" / "sub")
    assert r.returncode == 2 and "is not a directory" in r.stderr and len(r.stderr.splitlines()) == 1


def test_native_input_error_from_registrar_ts(cpp_bin, native_plan, native_pairs, tmp_path):
    """register_native's own InputError (no image content inside the model grid) -> one line, no folder."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -200.0
    vol = np.zeros((200, 40, 40), np.float32)
    vol[:6] = np.random.default_rng(1).random((6, 40, 40))  # content 190+ mm from the centre only
    empty = _save(tmp_path / "empty_centre.nii.gz", vol, aff)
    out = tmp_path / "out"
    _expect_native_error(cpp_bin, native_plan, empty, native_pairs["fixed"], out, "moving", "no image content")


def test_native_nifti2_big_endian_inputs(cpp_bin, native_plan, native_pairs, native_runs, tmp_path):
    """Big-endian NIfTI-2 (gzip) copies of a native pair give the NIfTI-1 little-endian run's outputs."""
    copies = {}
    for key in ("flipped", "fixed"):
        src = nib.load(str(native_pairs[key]))
        hdr = nib.Nifti2Header(endianness=">")
        hdr.set_data_dtype(src.get_data_dtype())
        img = nib.Nifti2Image(np.asanyarray(src.dataobj.get_unscaled()), src.affine, header=hdr)
        img.set_qform(src.affine, code=1)
        img.set_sform(src.affine, code=1)
        slope, inter = src.header.get_slope_inter()
        if slope is not None:  # the same stored values and scaling: the same voxel values
            img.header.set_slope_inter(slope, inter)
        copies[key] = tmp_path / f"{key}_v2_be.nii.gz"
        nib.save(img, str(copies[key]))
        head = gzip.decompress(copies[key].read_bytes())[:4]
        assert head == (540).to_bytes(4, "big")
    _cpp_native(cpp_bin, native_plan, copies["flipped"], copies["fixed"], tmp_path / "out")
    ref = native_runs["flipped"]["cpp"]
    for name in ("warped.nii.gz", "displacement.nii.gz"):
        a, b = (np.asarray(nib.load(str(d / name)).dataobj) for d in (tmp_path / "out", ref))
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()))


def test_nifti_reader_matches_nibabel(cpp_bin, tmp_path):
    """msode::read_nifti == msode_sdk.io.load_image (nibabel) on every numeric type, NIfTI-1 and -2, both
    byte orders, gzip or not, with and without scl_slope/scl_inter; sform, qform-only and pixdim-only
    geometry; trailing singleton dims."""
    from msode_sdk.io import load_image

    rng = np.random.default_rng(0)
    c, s = np.cos(0.2), np.sin(0.2)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.45, 0.45, 5.0])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    shape = (7, 6, 5)

    def check(path, source):
        r = _run(cpp_bin / "msode_selftest", "nifti", path, tmp_path / "out.raw")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        nx, ny, nz = info["dims"]
        got = np.fromfile(tmp_path / "out.raw", np.float32).reshape(nz, ny, nx).transpose(2, 1, 0)
        ref = load_image(str(path), "image")
        assert info["source"] == source, path
        np.testing.assert_allclose(np.asarray(info["affine"]).reshape(4, 4), ref.affine, rtol=0, atol=1e-9)
        # the SDK scales in float32, the C++ reader as nibabel in double: a float32 ulp apart where scaled
        np.testing.assert_allclose(got, ref.array, rtol=0, atol=float(np.spacing(np.abs(ref.array).max())))
        return info

    n = 0
    for dt in (
        np.uint8,
        np.int8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
        np.float32,
        np.float64,
    ):
        if np.dtype(dt).kind == "f":
            data = (rng.normal(size=shape) * 100).astype(dt)
        else:
            lim = np.iinfo(dt)
            data = rng.integers(max(lim.min, -30000), min(lim.max, 60000), size=shape).astype(dt)
        for cls, endian, scale, ext in (
            (nib.Nifti1Image, "<", None, ".nii"),
            (nib.Nifti1Image, ">", (0.5, -3.25), ".nii.gz"),
            (nib.Nifti2Image, ">", None, ".nii"),
            (nib.Nifti2Image, "<", (2.0, 1.5), ".nii.gz"),
        ):
            hdr = cls.header_class(endianness=endian)
            hdr.set_data_dtype(dt)
            img = cls(data, aff, header=hdr)
            img.set_qform(aff, code=1)
            img.set_sform(aff, code=1)
            if scale:
                img.header.set_slope_inter(*scale)
            path = tmp_path / f"t{n}{ext}"
            nib.save(img, str(path))
            info = check(path, "sform")
            assert info["version"] == (1 if cls is nib.Nifti1Image else 2) and info["big_endian"] == (endian == ">")
            n += 1
    data = rng.normal(size=shape).astype(np.float32)
    flip = np.diag([-1.5, 2.0, 3.0, 1.0])
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        for a, source in ((aff, "qform"), (flip, "qform"), (aff, "pixdim")):
            img = cls(data, a)
            img.set_sform(None, code=0)
            img.set_qform(a if source == "qform" else None, code=1 if source == "qform" else 0)
            path = tmp_path / f"t{n}.nii.gz"
            nib.save(img, str(path))
            check(path, source)
            n += 1
    path = tmp_path / "trailing.nii"
    nib.save(nib.Nifti1Image(data[..., None, None], aff), str(path))
    assert check(path, "sform")["dims"] == list(shape)


def test_nifti_writer_and_itk_text(cpp_bin, tmp_path):
    """msode::write_nifti_float32 (gzip and not) reads back in nibabel with the same voxels and affine in
    both the sform and the qform; msode::itk_affine_text == msode_sdk.io.write_itk_affine."""
    from msode_sdk.io import write_itk_affine

    data = np.random.default_rng(2).random((9, 8, 7)).astype(np.float32)
    raw = tmp_path / "in.raw"
    np.ascontiguousarray(data.transpose(2, 1, 0)).tofile(raw)
    for name in ("w.nii", "w.nii.gz"):
        r = _run(cpp_bin / "msode_selftest", "write-nifti", raw, 9, 8, 7, tmp_path / name)
        assert r.returncode == 0, r.stderr
        aff = np.asarray(json.loads(r.stdout)).reshape(4, 4)
        img = nib.load(str(tmp_path / name))
        np.testing.assert_array_equal(np.asarray(img.dataobj), data)
        np.testing.assert_allclose(img.affine, aff, atol=1e-5)
        np.testing.assert_allclose(img.get_qform(), aff, atol=1e-5)
        assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw", "w.nii", "w.nii.gz"]  # no temporary files
    r = _run(cpp_bin / "msode_selftest", "itk")
    c, s = np.cos(0.2), np.sin(0.2)
    write_itk_affine(
        tmp_path / "ref.tfm", np.array([[c, -s, 0, 4.0], [s, c, 0, -7.0], [0, 0, 1.0, 2.5], [0, 0, 0, 1.0]])
    )
    assert r.stdout == (tmp_path / "ref.tfm").read_text()


def test_recon_example_in_memory(cpp_bin, native_plan):
    """The library on in-memory volumes (examples/recon_example.cpp): an oblique 0.9 x 0.9 x 3 mm fixed and a
    flipped 1.5 mm moving of a moved phantom; the rigid motion is recovered; warm calls are reported; two
    threads calling register_native at once on one Registrar get the sequential result."""
    r = _run(cpp_bin / "recon_example", native_plan, "--repeat", "2", "--concurrent")
    assert r.returncode == 0, r.stderr
    print(r.stdout.strip())
    words = r.stdout.split()
    err = float(words[words.index("error") + 1])
    assert err < 2.0, r.stdout  # mm at the corners of a 70 mm cube (analytic SSD plan, 3.5 mm model grid)
    assert float(words[-1]) <= 1e-5, r.stdout  # two threads on one Registrar: the sequential result


@pytest.mark.skipif(not (ROOT / "data" / "sample" / "fixed_t1.nii.gz").exists(), reason="data/sample is missing")
@pytest.mark.parametrize("name", ["rigid_bspline.plan", "rigid_dense.plan"])
def test_bundled_plan_sample_pair(cpp_bin, tmp_path, name):
    """A bundled multi-contrast plan on data/sample (fixed_t1: oblique, anisotropic; moving_t2: flipped,
    another size): C++ msode_register -o == `msode register` (torch backend, CPU)."""
    from msode_sdk.registrar import MODELS_DIR

    plan = MODELS_DIR / name
    if not _has_register_native(plan):
        pytest.skip(f"the bundled {name}'s registrar.ts has no register_native yet (rebuild the plan)")
    moving, fixed = ROOT / "data" / "sample" / "moving_t2.nii.gz", ROOT / "data" / "sample" / "fixed_t1.nii.gz"
    t0 = time.perf_counter()
    _cpp_native(cpp_bin, plan, moving, fixed, tmp_path / "cpp", timeout=900)
    t1 = time.perf_counter()
    _sdk_cli(plan, moving, fixed, tmp_path / "sdk")
    t2 = time.perf_counter()
    diffs = _compare_outputs(tmp_path / "cpp", tmp_path / "sdk", fixed)
    print(f"bundled plan, sample pair: {diffs}; C++ {t1 - t0:.1f} s, SDK {t2 - t1:.1f} s")
