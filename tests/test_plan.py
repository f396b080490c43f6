"""The `.plan` bundle: round trip, schema validation, and hostile / corrupted files.

Every failure must surface as `PlanError` (never another exception type, never a write to disk).
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import io
import json
import math
import os
import random
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msode_sdk import plan as P
from msode_sdk.errors import MsodeError, PlanError

# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------

MODEL_GRID = {"shape_xyz": [16, 16, 8], "spacing_xyz_mm": [2.0, 2.0, 2.0], "orientation": "RAS", "centre": "fov"}


def _scales(stage: str, solver: str, levels: int = 2, formats=("torchscript", "onnx")) -> list[dict]:
    out = []
    for level in range(1, levels + 1):
        f = 2 ** (levels - level)
        sc = {
            "level": level,
            "shape_xyz": [16 // f, 16 // f, 8 // f],
            "spacing_xyz_mm": [2.0 * f] * 3,
            "solver": solver,
            "t0": float(level - 1),
            "t1": float(level),
            "networks": {},
        }
        if solver == "adaptive_heun":
            sc.update(tol=1e-3, max_steps=200)
        else:
            sc["step_size"] = 0.2
        ext = {"torchscript": "ts", "onnx": "onnx"}
        for fmt in formats:
            sc["networks"][fmt] = f"networks/{stage}_L{level}.{ext[fmt]}"
        out.append(sc)
    return out


def _stages(formats=("torchscript", "onnx")) -> list[dict]:
    return [
        {
            "name": "rigid",
            "transform": "rigid",
            "params": {},
            "scales": _scales("rigid", "adaptive_heun", formats=formats),
        },
        {
            "name": "bspline",
            "transform": "bspline",
            "params": {"control_spacing_mm": [16, 16, 16]},
            "scales": _scales("bspline", "euler", formats=formats),
        },
    ]


def _manifest(formats=("torchscript", "onnx"), **extra) -> dict:
    extra.setdefault("modalities", ["t1", "t2"])
    return P.make_manifest("demo_plan", MODEL_GRID, _stages(formats), **extra)


def _blobs(manifest: dict, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    rng = random.Random(0)
    out = {}
    for stage in manifest["stages"]:
        for sc in stage["scales"]:
            for member in sc["networks"].values():
                out[member] = bytes(rng.getrandbits(8) for _ in range(50 + len(out) * 7))
    out.update(extra or {})
    return out


def _members_of(blobs: dict[str, bytes]) -> dict:
    return {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in blobs.items()}


def _valid_manifest_with_members() -> dict:
    m = _manifest()
    m["members"] = _members_of(_blobs(m))
    return m


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression=zipfile.ZIP_STORED) -> bytes:
    """A raw zip with exactly these entries (duplicates allowed), no validation."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def _bundle(
    manifest: dict,
    blobs: dict[str, bytes],
    extra: list[tuple[str | zipfile.ZipInfo, bytes]] = (),
    fill_members: bool = True,
) -> bytes:
    """A plan-like zip built without write_plan's validation (for crafting bad plans)."""
    m = copy.deepcopy(manifest)
    if fill_members:
        m["members"] = _members_of(blobs)
    entries = [("manifest.json", json.dumps(m).encode())] + list(blobs.items()) + list(extra)
    return _zip(entries)


def _cd_offsets(data: bytes) -> list[int]:
    """Offsets of the central-directory file headers of a zip."""
    out, pos = [], 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        out.append(pos)
        pos += 4
    return out


def _cd_name(data: bytes, off: int) -> bytes:
    (n,) = struct.unpack_from("<H", data, off + 28)
    return data[off + 46 : off + 46 + n]


def _patch_cd(data: bytes, member: str, fmt: str, field_offset: int, value: int) -> bytes:
    """Overwrite one field of `member`'s central-directory header."""
    out = bytearray(data)
    for off in _cd_offsets(data):
        if _cd_name(data, off) == member.encode():
            struct.pack_into(fmt, out, off + field_offset, value)
            return bytes(out)
    raise AssertionError(f"{member} not in central directory")


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    m = _manifest(description="test plan", metrics={"rmse_mm": 1.25}, training={"epochs": 3})
    path = tmp_path / "demo.plan"
    P.write_plan(path, m, _blobs(m, {"README.md": b"# demo\n", "training/config.yaml": b"lr: 0.001\n"}))
    return path


@pytest.fixture(scope="module")
def plan_bytes() -> bytes:
    """A small valid plan (4 networks) as bytes, for mutation tests."""
    m = _manifest(formats=("torchscript",))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "small.plan"
        P.write_plan(path, m, _blobs(m))
        return path.read_bytes()


def _load_error(source) -> str:
    with pytest.raises(PlanError) as info:
        P.load_plan(source)
    return str(info.value)


def _validate_error(obj) -> str:
    with pytest.raises(PlanError) as info:
        P.validate_manifest(obj)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Round trip and API
# ------------------------------------------------------------------------------------------------


def test_round_trip(plan_file: Path):
    m = _manifest()
    blobs = _blobs(m, {"README.md": b"# demo\n", "training/config.yaml": b"lr: 0.001\n"})
    plan = P.load_plan(plan_file)
    assert plan.path == str(plan_file)
    assert plan.member_names() == sorted(blobs)
    for name, data in blobs.items():
        assert plan.has(name) and plan.read(name) == data
    assert plan.has("manifest.json") and json.loads(plan.read("manifest.json"))["name"] == "demo_plan"

    man = plan.manifest
    assert (man.name, man.format_version, man.description, man.analytic) == ("demo_plan", 1, "test plan", False)
    assert man.created.endswith("Z") and man.created[:4].isdigit()
    assert man.model_grid == P.ModelGrid((16, 16, 8), (2.0, 2.0, 2.0), "RAS", "fov")
    assert man.normalization == {"method": "percentile", "low": 0.5, "high": 99.5}
    assert man.modalities == ("t1", "t2")
    assert man.metrics == {"rmse_mm": 1.25} and man.training == {"epochs": 3}
    assert [s.name for s in man.stages] == ["rigid", "bspline"]
    rigid, bspline = man.stages
    assert rigid.transform == "rigid" and bspline.params["control_spacing_mm"] == (16.0, 16.0, 16.0)
    l1, l2 = rigid.scales
    assert (l1.level, l1.shape_xyz, l1.spacing_xyz_mm) == (1, (8, 8, 4), (4.0, 4.0, 4.0))
    assert (l1.solver, l1.tol, l1.step_size, l1.max_steps, l1.t0, l1.t1) == ("adaptive_heun", 1e-3, None, 200, 0.0, 1.0)
    assert l2.networks == {"torchscript": "networks/rigid_L2.ts", "onnx": "networks/rigid_L2.onnx"}
    b1 = bspline.scales[0]
    assert (b1.solver, b1.step_size, b1.tol, b1.max_steps) == ("euler", 0.2, None, P.DEFAULT_MAX_STEPS)
    assert set(man.members) == set(blobs)
    assert man.members["README.md"] == {"sha256": hashlib.sha256(b"# demo\n").hexdigest(), "size": 7}
    assert man.raw["stages"][0]["name"] == "rigid" and man.raw["members"] == man.members
    assert plan.network("bspline", 2, "onnx") == blobs["networks/bspline_L2.onnx"]
    assert man.stage("bspline") is bspline


def test_written_file_layout(plan_file: Path):
    """Stored (uncompressed) members, manifest first, data 64-byte aligned, no temp files left."""
    data = plan_file.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    assert infos[0].filename == "manifest.json"
    assert [i.filename for i in infos[1:]] == sorted(i.filename for i in infos[1:])
    for info in infos:
        assert info.compress_type == zipfile.ZIP_STORED
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        assert (info.header_offset + 30 + name_len + extra_len) % P.ALIGNMENT == 0
    assert os.listdir(plan_file.parent) == [plan_file.name]


def test_write_is_reproducible_and_does_not_mutate_inputs(tmp_path: Path):
    m = _manifest()
    m["created"] = "2026-01-01T00:00:00Z"
    blobs = _blobs(m)
    before = copy.deepcopy(m)
    P.write_plan(tmp_path / "a.plan", m, blobs)
    P.write_plan(tmp_path / "b.plan", m, blobs)
    assert m == before and "members" not in m
    assert (tmp_path / "a.plan").read_bytes() == (tmp_path / "b.plan").read_bytes()


def test_write_fills_defaults_and_returns_manifest(tmp_path: Path):
    m = _manifest()
    for key in ("format", "format_version", "created"):
        del m[key]
    man = P.write_plan(tmp_path / "x.plan", m, _blobs(m))
    assert isinstance(man, P.Manifest) and man.format_version == 1 and man.created
    raw = P.load_plan(tmp_path / "x.plan").manifest.raw
    assert raw["format"] == "msode-plan" and raw["format_version"] == 1


def test_load_from_bytes_and_pathlike(plan_file: Path):
    data = plan_file.read_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        plan = P.load_plan(source)
        assert plan.path is None and plan.manifest.name == "demo_plan"
    assert P.load_plan(str(plan_file)).path == str(plan_file)
    with pytest.raises(TypeError):
        P.load_plan(123)  # type: ignore[arg-type]


def test_write_validates_before_writing_and_keeps_old_file(tmp_path: Path, plan_file: Path):
    old = plan_file.read_bytes()
    bad = _manifest()
    bad["stages"][0]["scales"][0]["solver"] = "rk4"
    with pytest.raises(PlanError, match=r"solver: 'rk4' is not one of"):
        P.write_plan(plan_file, bad, _blobs(bad))
    assert plan_file.read_bytes() == old
    assert os.listdir(tmp_path) == [plan_file.name]


def test_write_rejects_bad_members(tmp_path: Path):
    m = _manifest()
    blobs = _blobs(m)
    with pytest.raises(PlanError, match=r"networks/rigid_L1.ts.*not listed"):  # a network member missing
        P.write_plan(tmp_path / "x.plan", m, {k: v for k, v in blobs.items() if k != "networks/rigid_L1.ts"})
    for name in ("../evil", "/abs", "a\\b", "manifest.json", "dir/"):
        with pytest.raises(PlanError):
            P.write_plan(tmp_path / "x.plan", m, {**blobs, name: b"x"})
    with pytest.raises(PlanError, match="must be bytes"):
        P.write_plan(tmp_path / "x.plan", m, {**blobs, "README.md": "text"})  # type: ignore[dict-item]
    with pytest.raises(PlanError, match="JSON"):
        P.write_plan(tmp_path / "x.plan", {**m, "metrics": {"x": object()}}, blobs)
    with pytest.raises(PlanError, match="cannot write"):
        P.write_plan(tmp_path / "no_such_dir" / "x.plan", m, blobs)
    assert os.listdir(tmp_path) == []


def test_read_absent_member_and_network_errors(plan_file: Path):
    plan = P.load_plan(plan_file)
    assert not plan.has("nope")
    with pytest.raises(PlanError, match=r"demo.plan.*'nope'"):
        plan.read("nope")
    with pytest.raises(PlanError, match="no stage 'dense'"):
        plan.network("dense", 1, "onnx")
    with pytest.raises(PlanError, match="no level 3"):
        plan.network("rigid", 3, "onnx")


def test_make_manifest_skeleton():
    grid = dict(MODEL_GRID)
    m = P.make_manifest("x", grid, [], analytic=True, description="d")
    assert m["format"] == P.FORMAT and m["format_version"] == 1 and m["name"] == "x"
    assert m["created"].endswith("Z") and m["analytic"] is True and m["description"] == "d"
    assert m["normalization"]["method"] == "percentile" and m["modalities"] == []
    assert m["model_grid"] == grid and m["model_grid"] is not grid


def test_plan_summary(plan_file: Path):
    text = P.plan_summary(P.load_plan(plan_file))
    for needle in (
        "demo_plan",
        "16x16x8",
        "RAS",
        "rigid",
        "bspline",
        "adaptive_heun tol=0.001",
        "euler step=0.2",
        "control spacing 16x16x16",
        "networks/rigid_L1.ts",
        "rmse_mm: 1.25",
        "t1, t2",
        "t=[1, 2]",
    ):
        assert needle in text, needle
    m = _manifest(analytic=True)
    plan = P.load_plan(_bundle(m, _blobs(m)))
    assert "analytic" in P.plan_summary(plan)


def test_plan_error_is_msode_error():
    assert issubclass(PlanError, MsodeError)


# ------------------------------------------------------------------------------------------------
# Files that are not plans
# ------------------------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.plan"
    path.write_bytes(b"")
    msg = _load_error(path)
    assert "empty" in msg and str(path) in msg
    assert "empty" in _load_error(b"")


def test_not_a_zip(tmp_path: Path):
    path = tmp_path / "text.plan"
    path.write_text("hello, I am not a zip file\n" * 10)
    msg = _load_error(path)
    assert "not a zip" in msg and str(path) in msg


def test_missing_path_and_directory(tmp_path: Path):
    assert "no such file" in _load_error(tmp_path / "absent.plan")
    assert "directory" in _load_error(tmp_path)
    assert "cannot read" in _load_error("bad\x00name.plan")


@pytest.mark.parametrize("cut", [1, 4, 22, 100, 0.25, 0.5, 0.9, -1, -10, -22, -23, -60])
def test_truncated(plan_file: Path, tmp_path: Path, cut):
    data = plan_file.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    path = tmp_path / "cut.plan"
    path.write_bytes(data[:n])
    msg = _load_error(path)
    assert str(path) in msg


# ------------------------------------------------------------------------------------------------
# Hostile archives
# ------------------------------------------------------------------------------------------------


def _hostile(name: str | zipfile.ZipInfo, data: bytes = b"evil") -> bytes:
    """A valid plan plus one extra (listed, where the name allows it) member."""
    m = _manifest()
    blobs = _blobs(m)
    return _bundle(m, blobs, extra=[(name, data)])


@pytest.mark.parametrize(
    "name,why",
    [
        ("../evil", "'..' path component"),
        ("networks/../../evil", "'..' path component"),
        ("/etc/passwd", "absolute"),
        ("C:/Windows/evil.dll", "drive letter"),
        ("c:evil", "drive letter"),
        ("networks\\..\\evil", "backslash"),
        ("networks//evil", "empty path component"),
        ("./evil", "'.' path component"),
        ("evil\x01name", "control characters"),
    ],
)
def test_unsafe_member_names(name, why):
    msg = _load_error(_hostile(name))
    assert "unsafe member name" in msg and why in msg


def test_nul_byte_member_name():
    data = _hostile("evilXname").replace(b"evilXname", b"evil\x00name")
    assert "NUL" in _load_error(data)


def test_symlink_member():
    info = zipfile.ZipInfo("networks/link.ts")
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    msg = _load_error(_hostile(info, b"/etc/passwd"))
    assert "symbolic link" in msg and "networks/link.ts" in msg


def test_special_file_and_bad_directory_entries():
    fifo = zipfile.ZipInfo("fifo")
    fifo.external_attr = 0o010644 << 16
    assert "not a regular file" in _load_error(_hostile(fifo, b""))
    assert "plain directory" in _load_error(_hostile("dir/", b"data"))
    # A plain directory entry is fine.
    m = _manifest()
    assert P.load_plan(_bundle(m, _blobs(m), extra=[("networks/", b"")])).manifest.name == "demo_plan"


def test_duplicate_member():
    m = _manifest()
    blobs = _blobs(m)
    data = _bundle(m, blobs, extra=[("networks/rigid_L1.ts", blobs["networks/rigid_L1.ts"])])
    assert "duplicate member 'networks/rigid_L1.ts'" in _load_error(data)
    data = _zip([("manifest.json", b"{}"), ("manifest.json", b"{}")])
    assert "duplicate member 'manifest.json'" in _load_error(data)


def test_encrypted_member():
    m = _manifest()
    data = _bundle(m, _blobs(m))
    data = _patch_cd(data, "networks/rigid_L1.ts", "<H", 8, 0x1)
    assert "encrypted" in _load_error(data)


def test_unsupported_compression():
    m = _manifest()
    blobs = _blobs(m)
    mm = copy.deepcopy(m)
    mm["members"] = _members_of(blobs)
    entries = [("manifest.json", json.dumps(mm).encode()), *blobs.items()]
    assert "compression method" in _load_error(_zip(entries, compression=zipfile.ZIP_BZIP2))


def test_deflated_members_are_accepted():
    m = _manifest()
    blobs = _blobs(m)
    mm = copy.deepcopy(m)
    mm["members"] = _members_of(blobs)
    data = _zip([("manifest.json", json.dumps(mm).encode()), *blobs.items()], compression=zipfile.ZIP_DEFLATED)
    plan = P.load_plan(data)
    assert all(plan.read(n) == b for n, b in blobs.items())


def test_oversized_member_600_mib_of_zeros(monkeypatch):
    """A real 600 MiB deflated member (~2.7 MB compressed) is refused from its declared size."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("manifest.json", b"{}")
        with zf.open("networks/bomb.ts", "w", force_zip64=True) as f:
            zeros = bytes(1 << 20)
            for _ in range(600):
                f.write(zeros)
    data = buf.getvalue()
    assert len(data) < 8 * 1024**2
    inflated = []  # refused from the declared size: no byte of the member is ever decompressed
    real_read = zipfile.ZipExtFile.read

    def counting_read(self, *args, **kwargs):
        out = real_read(self, *args, **kwargs)
        if self.name == "networks/bomb.ts":
            inflated.append(len(out))
        return out

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    msg = _load_error(data)
    assert "networks/bomb.ts" in msg and "declares 629145600 bytes" in msg
    assert sum(inflated) == 0


def test_declared_sizes_are_capped(monkeypatch):
    m = _manifest()
    blobs = _blobs(m, {"big.bin": bytes(5000)})
    data = _bundle(m, blobs)
    monkeypatch.setattr(P, "MAX_MEMBER_BYTES", 4000)
    assert "'big.bin' declares 5000 bytes" in _load_error(data)
    monkeypatch.setattr(P, "MAX_MEMBER_BYTES", 10_000)
    monkeypatch.setattr(P, "MAX_TOTAL_BYTES", 5000)
    assert "total limit" in _load_error(data)
    monkeypatch.setattr(P, "MAX_TOTAL_BYTES", 10**9)
    monkeypatch.setattr(P, "MAX_MANIFEST_BYTES", 100)
    assert "manifest.json is" in _load_error(data)
    monkeypatch.setattr(P, "MAX_MANIFEST_BYTES", 10**6)
    monkeypatch.setattr(P, "MAX_MEMBERS", 3)
    assert "zip entries" in _load_error(data)
    monkeypatch.setattr(P, "MAX_FILE_BYTES", 100)
    assert "limit" in _load_error(data)


def _with_zip64_end_record(data: bytes, entries: int | None = None) -> bytes:
    """Re-terminate a zip with a zip64 end record (+ locator) that zipfile honours."""
    eocd = len(data) - 22
    assert data[eocd : eocd + 4] == b"PK\x05\x06"
    n, size_cd, offset_cd = struct.unpack_from("<HII", data, eocd + 10)
    n = n if entries is None else entries
    record = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, n, n, size_cd, offset_cd)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, eocd, 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:eocd] + record + locator + end


def test_entry_count_and_directory_size_checked_before_parsing(plan_bytes: bytes, monkeypatch):
    """A hostile end record cannot make zipfile build millions of entry objects."""
    zip64 = _with_zip64_end_record(plan_bytes)
    assert P.load_plan(zip64).manifest.name == "demo_plan"  # zipfile reads zip64 end records
    assert "1000000 zip entries" in _load_error(_with_zip64_end_record(plan_bytes, entries=10**6))

    def no_zipfile(*args, **kwargs):
        raise AssertionError("zipfile must not parse a plan that fails the pre-check")

    monkeypatch.setattr(P.zipfile, "ZipFile", no_zipfile)
    assert "1000000 zip entries" in _load_error(_with_zip64_end_record(plan_bytes, entries=10**6))
    monkeypatch.setattr(P, "MAX_MEMBERS", 3)
    assert "zip entries, more than the limit of 3" in _load_error(plan_bytes)
    assert "zip entries, more than the limit of 3" in _load_error(zip64)
    monkeypatch.setattr(P, "MAX_MEMBERS", 10_000)
    monkeypatch.setattr(P, "MAX_CENTRAL_DIRECTORY_BYTES", 100)
    assert "central directory" in _load_error(plan_bytes)
    big = bytearray(plan_bytes)
    struct.pack_into("<I", big, len(big) - 22 + 12, 0xFFFFFFFF)  # size of the central directory
    monkeypatch.setattr(P, "MAX_CENTRAL_DIRECTORY_BYTES", 16 * 1024**2)
    assert "central directory of 4294967295 bytes" in _load_error(bytes(big))


def test_file_size_cap_on_path(tmp_path: Path, plan_file: Path, monkeypatch):
    monkeypatch.setattr(P, "MAX_FILE_BYTES", 100)
    assert "larger than the limit" in _load_error(plan_file)


def test_zip_bomb_lying_declared_size():
    """A deflated member that inflates far beyond its declared size is stopped."""
    m = _manifest()
    blobs = _blobs(m)
    mm = copy.deepcopy(m)
    mm["members"] = {**_members_of(blobs), "bomb.bin": {"sha256": "0" * 64, "size": 1000}}
    data = _zip([("manifest.json", json.dumps(mm).encode()), *blobs.items()], compression=zipfile.ZIP_STORED)
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.bin", bytes(8 * 1024**2))
    data = _patch_cd(buf.getvalue(), "bomb.bin", "<I", 24, 1000)  # uncompressed size: 8 MiB -> 1000
    msg = _load_error(data)
    assert "bomb.bin" in msg and ("CRC" in msg or "declared" in msg)


def test_read_member_stops_at_declared_size():
    """The chunked reader's own guard, independent of zipfile's internal truncation."""

    class FakeZip:
        def open(self, info):
            return io.BytesIO(bytes(10_000))

    info = zipfile.ZipInfo("bomb.bin")
    info.file_size = 100
    with pytest.raises(PlanError, match="more than its declared 100 bytes"):
        P._read_member(FakeZip(), info, "plan 'x'")  # type: ignore[arg-type]


def test_crc_error():
    m = _manifest()
    data = _bundle(m, _blobs(m))
    data = _patch_cd(data, "networks/rigid_L1.ts", "<I", 16, 0xDEADBEEF)
    msg = _load_error(data)
    assert "networks/rigid_L1.ts" in msg and "CRC" in msg


# ------------------------------------------------------------------------------------------------
# Member consistency with the manifest
# ------------------------------------------------------------------------------------------------


def test_checksum_mismatch(tmp_path: Path):
    m = _manifest()
    blobs = _blobs(m)
    good = _members_of(blobs)
    tampered = dict(blobs)
    tampered["networks/bspline_L2.ts"] = bytes(len(blobs["networks/bspline_L2.ts"]))  # same size
    mm = copy.deepcopy(m)
    mm["members"] = good
    path = tmp_path / "tampered.plan"
    path.write_bytes(_bundle(mm, tampered, fill_members=False))
    msg = _load_error(path)
    assert str(path) in msg and "'networks/bspline_L2.ts'" in msg and "sha256 mismatch" in msg
    assert good["networks/bspline_L2.ts"]["sha256"][:12] in msg
    assert hashlib.sha256(tampered["networks/bspline_L2.ts"]).hexdigest()[:12] in msg


def test_size_mismatch():
    m = _manifest()
    blobs = _blobs(m)
    mm = copy.deepcopy(m)
    mm["members"] = _members_of(blobs)
    longer = {**blobs, "networks/rigid_L1.ts": blobs["networks/rigid_L1.ts"] + b"x"}
    msg = _load_error(_bundle(mm, longer, fill_members=False))
    assert "'networks/rigid_L1.ts': size" in msg


def test_missing_member():
    m = _manifest()
    blobs = _blobs(m)
    mm = copy.deepcopy(m)
    mm["members"] = _members_of(blobs)
    del blobs["networks/bspline_L1.onnx"]
    msg = _load_error(_bundle(mm, blobs, fill_members=False))
    assert "'networks/bspline_L1.onnx' is listed in manifest.members but missing" in msg


def test_unlisted_member():
    msg = _load_error(_hostile("notes.txt", b"hi"))
    assert "'notes.txt' is not listed in manifest.members" in msg


def test_manifest_missing_or_unparseable(tmp_path: Path):
    m = _manifest()
    blobs = _blobs(m)
    assert "manifest.json is missing" in _load_error(_zip(list(blobs.items())))
    msg = _load_error(_zip([("manifest.json", b'{"format": "msode-plan",\n "name": }')]))
    assert "not valid JSON" in msg and "line 2" in msg and "column" in msg
    assert "UTF-8" in _load_error(_zip([("manifest.json", b'{"name": "\xff"}')]))
    assert "NaN" in _load_error(_zip([("manifest.json", b'{"x": NaN}')]))
    assert "duplicate key 'members'" in _load_error(_zip([("manifest.json", b'{"members": {}, "members": {}}')]))
    assert "cannot be parsed" in _load_error(_zip([("manifest.json", b"[" * 200_000)]))
    assert "manifest: expected an object" in _load_error(_zip([("manifest.json", b"[1, 2]")]))


def test_load_errors_name_the_field(tmp_path: Path):
    m = _valid_manifest_with_members()
    m["stages"][1]["scales"][0]["solver"] = "rk4"
    path = tmp_path / "bad.plan"
    path.write_bytes(_bundle(m, _blobs(_manifest()), fill_members=False))
    msg = _load_error(path)
    assert msg.startswith(f"plan {str(path)!r}: manifest.stages[1].scales[0].solver: 'rk4' is not one of")


def test_nan_spacing_via_json_file():
    m = _valid_manifest_with_members()
    text = json.dumps(m).replace('"spacing_xyz_mm": [2.0, 2.0, 2.0]', '"spacing_xyz_mm": [2.0, 1e999, 2.0]', 1)
    msg = _load_error(_zip([("manifest.json", text.encode())]))
    assert "spacing_xyz_mm[1]: expected a finite number" in msg


# ------------------------------------------------------------------------------------------------
# Manifest schema
# ------------------------------------------------------------------------------------------------


def test_validate_accepts_valid_and_ignores_unknown_keys():
    m = _valid_manifest_with_members()
    m["future_top_level"] = {"anything": [1, 2]}
    m["model_grid"]["future"] = 1
    m["stages"][0]["future"] = "x"
    m["stages"][0]["scales"][0]["future"] = None
    m["stages"][0]["scales"][0]["networks"]["tensorrt"] = 123  # unknown formats are ignored
    man = P.validate_manifest(m)
    assert man.stages[0].scales[0].networks == {"torchscript": "networks/rigid_L1.ts", "onnx": "networks/rigid_L1.onnx"}
    assert man.raw["future_top_level"] == {"anything": [1, 2]}
    m["model_grid"]["shape_xyz"] = (16, 16, 8)  # tuples are fine for lists
    P.validate_manifest(m)


def test_future_format_version():
    m = _valid_manifest_with_members()
    m["format_version"] = 3
    m["stages"] = "whatever a future version has"
    assert _validate_error(m) == ("plan format_version 3 is newer than this SDK supports (2); upgrade msode")
    msg = _load_error(_zip([("manifest.json", json.dumps(m).encode()), ("new_member.bin", b"")]))
    assert msg.endswith("plan format_version 3 is newer than this SDK supports (2); upgrade msode")


def _mutated(path: list, value=None, delete=False) -> dict:
    m = _valid_manifest_with_members()
    node = m
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return m


SC = ["stages", 0, "scales", 0]  # rigid L1 (adaptive_heun)
BSC = ["stages", 1, "scales", 0]  # bspline L1 (euler)


@pytest.mark.parametrize(
    "path,value,expected",
    [
        (["format"], "zip", "manifest.format: expected 'msode-plan', got 'zip'"),
        (["format_version"], "1", "manifest.format_version: expected an integer, got str '1'"),
        (["format_version"], True, "manifest.format_version: expected an integer, got bool True"),
        (["format_version"], 1.0, "manifest.format_version: expected an integer, got float 1.0"),
        (["format_version"], 0, "manifest.format_version: 0 is not a valid format version"),
        (["name"], "", "manifest.name: '' is not a valid plan name"),
        (["name"], "a b", "manifest.name: 'a b' is not a valid plan name"),
        (["name"], "..", "manifest.name: '..' is not a valid plan name"),
        (["created"], 2026, "manifest.created: expected a string, got int 2026"),
        (["description"], None, "manifest.description: expected a string, got null"),
        (["analytic"], 1, "manifest.analytic: expected true or false, got int 1"),
        (
            ["model_grid", "shape_xyz"],
            [120, "120", 80],
            "manifest.model_grid.shape_xyz[1]: expected an integer, got str '120'",
        ),
        (
            ["model_grid", "shape_xyz"],
            [120, True, 80],
            "manifest.model_grid.shape_xyz[1]: expected an integer, got bool True",
        ),
        (["model_grid", "shape_xyz"], [16, 16], "manifest.model_grid.shape_xyz: expected 3 values (x, y, z), got 2"),
        (["model_grid", "shape_xyz"], [16, 16, 0], "manifest.model_grid.shape_xyz[2]: 0 is not in [1, 1024]"),
        (["model_grid", "shape_xyz"], [16, 16, 2048], "manifest.model_grid.shape_xyz[2]: 2048 is not in [1, 1024]"),
        (
            ["model_grid", "spacing_xyz_mm"],
            [2.0, math.nan, 2.0],
            "manifest.model_grid.spacing_xyz_mm[1]: expected a finite number, got nan",
        ),
        (
            ["model_grid", "spacing_xyz_mm"],
            [2.0, math.inf, 2.0],
            "manifest.model_grid.spacing_xyz_mm[1]: expected a finite number, got inf",
        ),
        (
            ["model_grid", "spacing_xyz_mm"],
            [2.0, 10**400, 2.0],
            "manifest.model_grid.spacing_xyz_mm[1]: expected a finite number",
        ),
        (
            ["model_grid", "spacing_xyz_mm"],
            [2.0, 0.0, 2.0],
            "manifest.model_grid.spacing_xyz_mm[1]: 0.0 is not in (0, 100]",
        ),
        (
            ["model_grid", "spacing_xyz_mm"],
            [2.0, 101, 2.0],
            "manifest.model_grid.spacing_xyz_mm[1]: 101 is not in (0, 100]",
        ),
        (
            ["model_grid", "spacing_xyz_mm"],
            [2.0, False, 2.0],
            "manifest.model_grid.spacing_xyz_mm[1]: expected a number, got bool False",
        ),
        (["model_grid", "orientation"], "LPS", "manifest.model_grid.orientation: 'LPS' is not one of ['RAS']"),
        (["model_grid", "centre"], "middle", "manifest.model_grid.centre: 'middle' is not one of ['com', 'fov']"),
        (["model_grid"], [], "manifest.model_grid: expected an object, got list []"),
        (["normalization", "method"], "zscore", "manifest.normalization.method: 'zscore' is not one of ['percentile']"),
        (["normalization", "low"], 99.5, "manifest.normalization: low (99.5) must be below high (99.5)"),
        (["normalization", "high"], 101, "manifest.normalization.high: 101 is not in [0, 100]"),
        (["modalities"], "t1", "manifest.modalities: expected a list, got str 't1'"),
        (["modalities"], ["t1", 2], "manifest.modalities[1]: expected a string, got int 2"),
        (["metrics"], [], "manifest.metrics: expected an object, got list []"),
        (["training"], "x", "manifest.training: expected an object, got str 'x'"),
        (["stages"], [], "manifest.stages: a plan needs at least one stage"),
        (["stages", 1, "name"], "rigid", "manifest.stages[1].name: duplicate stage name 'rigid'"),
        (["stages", 0, "name"], "Rigid", "manifest.stages[0].name: 'Rigid' is not a valid stage name"),
        (
            ["stages", 0, "transform"],
            "affine",
            "manifest.stages[0].transform: 'affine' is not one of ['bspline', 'dense', 'rigid']",
        ),
        (["stages", 1, "params"], {}, "manifest.stages[1].params.control_spacing_mm: required field is missing"),
        (
            ["stages", 1, "params", "control_spacing_mm"],
            [16, -1, 16],
            "manifest.stages[1].params.control_spacing_mm[1]: -1 is not in (0, inf]",
        ),
        (
            ["stages", 0, "params", "scale_search"],
            [0.5, 1.0],
            "manifest.stages[0].params.scale_search: a rigid stage has no scale search (deformable stages only)",
        ),
        (
            ["stages", 1, "params", "scale_search"],
            [],
            "manifest.stages[1].params.scale_search: expected 1 to 8 factors, got 0",
        ),
        (
            ["stages", 1, "params", "scale_search"],
            [0.5, 0.0],
            "manifest.stages[1].params.scale_search[1]: 0.0 is not in (0, 4]",
        ),
        (
            ["stages", 1, "params", "scale_search"],
            [0.5, "1"],
            "manifest.stages[1].params.scale_search[1]: expected a number, got str '1'",
        ),
        (["stages", 0, "scales"], [], "manifest.stages[0].scales: a stage needs at least one scale"),
        ([*SC, "level"], 0, "manifest.stages[0].scales[0].level: expected 1, got 0"),
        ([*SC, "level"], True, "manifest.stages[0].scales[0].level: expected an integer, got bool True"),
        (["stages", 0, "scales", 1, "level"], 3, "manifest.stages[0].scales[1].level: expected 2, got 3"),
        (
            [*SC, "solver"],
            "rk4",
            "manifest.stages[0].scales[0].solver: 'rk4' is not one of ['adaptive_heun', 'euler', 'heun']",
        ),
        ([*SC, "tol"], 1.0, "manifest.stages[0].scales[0].tol: 1.0 is not in (0, 1)"),
        ([*SC, "tol"], "1e-3", "manifest.stages[0].scales[0].tol: expected a number, got str '1e-3'"),
        ([*SC, "max_steps"], 0, "manifest.stages[0].scales[0].max_steps: 0 is not in [1, 100000]"),
        ([*SC, "max_steps"], 10.0, "manifest.stages[0].scales[0].max_steps: expected an integer, got float 10.0"),
        ([*SC, "step_size"], 2.0, "manifest.stages[0].scales[0].step_size: 2.0 is not in (0, 1]"),
        ([*BSC, "step_size"], 0.0, "manifest.stages[1].scales[0].step_size: 0.0 is not in (0, 1]"),
        ([*BSC, "step_size"], 1.5, "manifest.stages[1].scales[0].step_size: 1.5 is not in (0, 1]"),
        (
            [*BSC, "step_size"],
            1e-4,
            "manifest.stages[1].scales[0].step_size: 0.0001 needs 10000 steps on [0, 1], more than max_steps=1000",
        ),
        ([*BSC, "t1"], 0.0, "manifest.stages[1].scales[0].t1: t1 (0) must be greater than t0 (0)"),
        (
            [*BSC, "t1"],
            0.9,
            "manifest.stages[1].scales[1].t0: time segments must be contiguous: "
            "level 1 ends at t1=0.9 but level 2 starts at t0=1",
        ),
        ([*BSC, "t0"], "0", "manifest.stages[1].scales[0].t0: expected a number, got str '0'"),
        (
            ["stages", 1, "scales", 1, "shape_xyz"],
            [16, 16, 16],
            "manifest.stages[1].scales[1].shape_xyz: the finest level's shape [16, 16, 16] "
            "must equal model_grid.shape_xyz [16, 16, 8]",
        ),
        (
            ["stages", 1, "scales", 1, "spacing_xyz_mm"],
            [2, 2, 1],
            "manifest.stages[1].scales[1].spacing_xyz_mm: the finest level's spacing [2.0, 2.0, 1.0] "
            "must equal model_grid.spacing_xyz_mm [2.0, 2.0, 2.0]",
        ),
        ([*SC, "networks"], {}, "manifest.stages[0].scales[0].networks: needs at least one of ['torchscript', 'onnx']"),
        ([*SC, "networks"], {"tensorrt": "x"}, "manifest.stages[0].scales[0].networks: needs at least one of"),
        (
            [*SC, "networks", "onnx"],
            "networks/absent.onnx",
            "manifest.stages[0].scales[0].networks.onnx: "
            "member 'networks/absent.onnx' is not listed in manifest.members",
        ),
        ([*SC, "networks", "onnx"], 5, "manifest.stages[0].scales[0].networks.onnx: expected a string, got int 5"),
        (["members"], [], "manifest.members: expected an object, got list []"),
        (
            ["members", "../x"],
            {"sha256": "0" * 64, "size": 1},
            "manifest.members['../x']: unsafe member name: has a '..' path component",
        ),
        (
            ["members", "manifest.json"],
            {"sha256": "0" * 64, "size": 1},
            "manifest.members['manifest.json']: manifest.json must not list itself",
        ),
        (["members", "d/"], {"sha256": "0" * 64, "size": 0}, "manifest.members['d/']: directories are not members"),
        (
            ["members", "x"],
            {"sha256": "abc", "size": 1},
            "manifest.members['x'].sha256: expected 64 hex digits, got 'abc'",
        ),
        (["members", "x"], {"sha256": "0" * 64, "size": -1}, "manifest.members['x'].size: -1 is not in [0, 536870912]"),
        (
            ["members", "x"],
            {"sha256": "0" * 64, "size": True},
            "manifest.members['x'].size: expected an integer, got bool True",
        ),
        (["members", "x"], {"size": 1}, "manifest.members['x'].sha256: required field is missing"),
    ],
)
def test_schema_errors(path, value, expected):
    msg = _validate_error(_mutated(path, value))
    assert msg.startswith(expected), msg


@pytest.mark.parametrize(
    "path",
    [
        ["format"],
        ["format_version"],
        ["name"],
        ["created"],
        ["model_grid"],
        ["normalization"],
        ["modalities"],
        ["stages"],
        ["members"],
        ["model_grid", "centre"],
        ["model_grid", "orientation"],
        [*SC, "tol"],
        [*BSC, "step_size"],
        [*SC, "t0"],
        [*SC, "networks"],
        ["stages", 0, "transform"],
    ],
)
def test_required_fields(path):
    msg = _validate_error(_mutated(path, delete=True))
    assert "required field is missing" in msg
    dotted = "manifest" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path)
    assert msg.startswith(dotted), msg


def test_optional_fields_defaults():
    m = _valid_manifest_with_members()
    for key in ("description", "analytic", "metrics", "training"):
        m.pop(key, None)
    del m["stages"][0]["scales"][0]["max_steps"]
    del m["stages"][0]["params"]
    man = P.validate_manifest(m)
    assert (man.description, man.analytic, man.metrics, man.training) == ("", False, {}, {})
    assert man.stages[0].scales[0].max_steps == 1000 and man.stages[0].params == {}


def test_solver_options():
    m = _valid_manifest_with_members()
    m["stages"][0]["scales"][0]["step_size"] = 0.05  # adaptive_heun: optional initial step
    m["stages"][1]["scales"][0]["solver"] = "heun"
    m["stages"][1]["scales"][0]["step_size"] = 1.0  # == t1 - t0: one step
    m["stages"][1]["scales"][1]["step_size"] = 0.1  # 10 steps (decimal round-off tolerated)
    m["stages"][1]["scales"][1]["max_steps"] = 10
    man = P.validate_manifest(m)
    assert man.stages[0].scales[0].step_size == 0.05 and man.stages[1].scales[0].solver == "heun"
    assert P.SOLVER_NAMES == ("euler", "heun", "adaptive_heun")


def test_validate_is_pure_and_copies():
    m = _valid_manifest_with_members()
    before = copy.deepcopy(m)
    man = P.validate_manifest(m)
    assert m == before
    m["stages"][0]["name"] = "changed"
    assert man.raw["stages"][0]["name"] == "rigid"


@pytest.mark.parametrize("obj", [None, 1, "x", [], {1, 2}, b"{}", {"format": object()}, {1: 2}])
def test_validate_non_manifests(obj):
    _validate_error(obj)


def test_member_sha256_uppercase_is_normalised():
    m = _valid_manifest_with_members()
    name = "networks/rigid_L1.ts"
    m["members"][name]["sha256"] = m["members"][name]["sha256"].upper()
    assert P.validate_manifest(m).members[name]["sha256"] == m["members"][name]["sha256"].lower()


# ------------------------------------------------------------------------------------------------
# A failed load writes nothing
# ------------------------------------------------------------------------------------------------


def test_failed_loads_write_nothing(tmp_path: Path, plan_bytes: bytes, monkeypatch):
    private_tmp = tmp_path / "tmp"
    workdir = tmp_path / "cwd"
    private_tmp.mkdir()
    workdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.chdir(workdir)

    m = _manifest()
    blobs = _blobs(m)
    hostile = {
        "dotdot.plan": _hostile("../evil"),
        "abs.plan": _hostile("/etc/passwd"),
        "tampered.plan": _bundle(
            {**m, "members": _members_of(blobs)},
            {**blobs, "networks/rigid_L1.ts": b"x" * len(blobs["networks/rigid_L1.ts"])},
            fill_members=False,
        ),
        "truncated.plan": plan_bytes[: len(plan_bytes) // 2],
        "bomb.plan": _patch_cd(_hostile("big.bin", bytes(4000)), "big.bin", "<I", 24, 10),
    }
    symlink_info = zipfile.ZipInfo("x")
    symlink_info.external_attr = 0o120777 << 16
    hostile["symlink.plan"] = _hostile(symlink_info, b"/etc/passwd")
    for name, data in hostile.items():
        (tmp_path / name).write_bytes(data)

    writes: list[tuple] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            writes.append(("open", file, mode))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(("os.open", path, flags))
        return real_os_open(path, flags, *args, **kwargs)

    def listing() -> dict[str, list[str]]:
        return {str(d): sorted(os.listdir(d)) for d in (tmp_path, private_tmp, workdir)}

    before = listing()
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    for name in hostile:
        with pytest.raises(PlanError):
            P.load_plan(tmp_path / name)
        with pytest.raises(PlanError):
            P.load_plan(hostile[name])
    monkeypatch.undo()
    assert writes == []
    assert listing() == before


# ------------------------------------------------------------------------------------------------
# Property tests and fuzzing: only PlanError may escape
# ------------------------------------------------------------------------------------------------

_KEYS = st.sampled_from(
    [
        "format",
        "format_version",
        "name",
        "created",
        "model_grid",
        "shape_xyz",
        "spacing_xyz_mm",
        "stages",
        "scales",
        "level",
        "solver",
        "networks",
        "members",
        "sha256",
        "size",
        "t0",
        "t1",
        "tol",
        "step_size",
        "normalization",
        "modalities",
        "orientation",
        "centre",
        "transform",
        "params",
    ]
) | st.text(max_size=6)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["msode-plan", "RAS", "fov", "percentile", "rigid", "bspline", "euler", "adaptive_heun"])
)
_JSON = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=30,
)
_PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_only_plan_error(fn, *args):
    try:
        return fn(*args)
    except PlanError:
        return None


@_PROPERTY
@given(_JSON)
def test_property_random_json_only_plan_error(obj):
    _assert_only_plan_error(P.validate_manifest, obj)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


_VALID = _valid_manifest_with_members()
_VALID_PATHS = [p for p in _paths(_VALID) if p]


@_PROPERTY
@given(st.lists(st.tuples(st.sampled_from(_VALID_PATHS), st.booleans(), _JSON), min_size=1, max_size=3))
def test_property_mutated_manifest_only_plan_error(edits):
    m = copy.deepcopy(_VALID)
    for path, delete, value in edits:
        node = m
        try:
            for key in path[:-1]:
                node = node[key]
            if delete and isinstance(node, dict):
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
    result = _assert_only_plan_error(P.validate_manifest, m)
    if result is not None:
        assert isinstance(result, P.Manifest)


def _check_load(data: bytes, original: bytes) -> None:
    """load_plan either raises PlanError or returns exactly the original content."""
    plan = _assert_only_plan_error(P.load_plan, data)
    if plan is not None:
        ref = P.load_plan(original)
        assert plan.manifest.raw == ref.manifest.raw
        assert {n: plan.read(n) for n in plan.member_names()} == {n: ref.read(n) for n in ref.member_names()}


@_PROPERTY
@given(st.binary(max_size=2000))
def test_property_random_bytes_only_plan_error(data):
    _assert_only_plan_error(P.load_plan, data)


@_PROPERTY
@given(st.data())
def test_property_mutated_plan_only_plan_error(plan_bytes, data):
    buf = bytearray(plan_bytes)
    n_ops = data.draw(st.integers(1, 4))
    for _ in range(n_ops):
        op = data.draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete"]))
        if not buf:
            break
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "byte":
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[pos : pos + data.draw(st.integers(1, 16))]
    _check_load(bytes(buf), plan_bytes)


FUZZ_CASES = 300


def test_fuzz_seeded_mutations(plan_bytes: bytes):
    """A fixed number of seeded random structural mutations (the same cases on every machine); only
    PlanError may escape."""
    rng = random.Random(1234)
    # Bias mutations towards the zip headers, where the interesting parsing happens.
    hot = [i for i in range(len(plan_bytes) - 3) if plan_bytes[i : i + 2] == b"PK"]
    runs = 0
    for _ in range(FUZZ_CASES):
        buf = bytearray(plan_bytes)
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.6:
                pos = min(len(buf) - 1, rng.choice(hot) + rng.randint(0, 60))
            else:
                pos = rng.randrange(len(buf))
            kind = rng.random()
            if kind < 0.5:
                buf[pos] ^= 1 << rng.randrange(8)
            elif kind < 0.8:
                buf[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
            elif kind < 0.9:
                value = rng.choice([0, 0xFFFFFFFF, 2**31, rng.randrange(2**32)])
                struct.pack_into("<I", buf, min(pos, len(buf) - 4), value)
            else:
                del buf[pos:]
            if len(buf) < 8:
                break
        _check_load(bytes(buf), plan_bytes)
        runs += 1
    assert runs == FUZZ_CASES
