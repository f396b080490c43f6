"""Cohorts: `msode batch` (CSV or folders, per-pair errors, resume, atomic outputs, summary), the
`Registrar.register_many` API, and sharding under torchrun (2 CPU processes, gloo)."""

import csv
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import affine_from, render
from msode_sdk import InputError, OutputError, Registrar, batch, cli
from msode_sdk.batch import INPUTS_FILE, OUTPUT_FILES, read_pairs
from msode_sdk.transforms import rigid_matrix

ROT = [(0.10, -0.05, 0.12), (-0.08, 0.06, 0.04), (0.05, 0.09, -0.1), (0.0, -0.12, 0.07)]
TRANS = [(5.0, -3.0, 2.0), (-4.0, 2.0, 3.0), (2.0, 4.0, -3.0), (-3.0, -2.0, 4.0)]


def _world_map(rot, trans, c0):
    m = rigid_matrix(torch.tensor([[*rot, *trans]], dtype=torch.float64))[0]
    a, t = m[:3, :3], m[:3, 3] + c0 - m[:3, :3] @ c0
    return lambda p: p @ a.T + t


@pytest.fixture(scope="module")
def cohort(phantom, tmp_path_factory):
    """4 good pairs (moving on its own grid, fixed moved by a known rigid map), one corrupt file, one missing."""
    d = tmp_path_factory.mktemp("cohort")
    c0 = phantom.centre
    rows = []
    for k in range(4):
        f_shape, f_aff = (44, 50, 36), affine_from((3.6, 3.6, 4.0), (0.0, 0.0, 5.0 * k), (44, 50, 36), (2.0, -3.0, 1.0))
        m_shape, m_aff = (46, 48, 38), affine_from((3.5, 3.5, 3.5), (0.0, 0.0, 0.0), (46, 48, 38), (4.0, -2.0, 3.0))
        fixed = render(phantom, f_shape, f_aff, _world_map(ROT[k], TRANS[k], c0))
        moving = render(phantom, m_shape, m_aff)
        for name, arr, aff in (("moving", moving, m_aff), ("fixed", fixed, f_aff)):
            nib.save(nib.Nifti1Image(arr.astype(np.float32), aff), str(d / f"{name}{k}.nii.gz"))
        rows.append((f"s{k}", f"moving{k}.nii.gz", f"fixed{k}.nii.gz"))
    (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 definitely not a gzip stream")
    rows.insert(2, ("corrupt", "corrupt.nii.gz", "fixed0.nii.gz"))
    rows.insert(4, ("missing", "nowhere.nii.gz", "fixed1.nii.gz"))
    with open(d / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "moving", "fixed"])
        w.writerows(rows)
    return d


def _summary(out):
    with open(out / "summary.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _outputs(folder):
    warped = np.asarray(nib.load(str(folder / "warped.nii.gz")).dataobj)
    disp = np.asarray(nib.load(str(folder / "displacement.nii.gz")).dataobj)
    return warped, disp, (folder / "transform.tfm").read_text()


@pytest.fixture(scope="module")
def singles(cohort, analytic_plan, tmp_path_factory):
    """`msode register` on each good pair: the reference outputs."""
    out = tmp_path_factory.mktemp("singles")
    for k in range(4):
        rc = cli.main(
            [
                "register",
                str(cohort / f"moving{k}.nii.gz"),
                str(cohort / f"fixed{k}.nii.gz"),
                "-o",
                str(out / f"s{k}"),
                "--plan",
                str(analytic_plan),
                "--device",
                "cpu",
                "-q",
            ]
        )
        assert rc == 0
    return out


def test_batch_records_errors_and_equals_register_and_resumes(cohort, singles, analytic_plan, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "batch",
        str(cohort / "pairs.csv"),
        "-o",
        str(out),
        "--plan",
        str(analytic_plan),
        "--device",
        "cpu",
        "--workers",
        "2",
        "-q",
    ]
    assert cli.main(argv) == 3  # some pairs failed
    rows = _summary(out)
    assert list(rows) == ["s0", "s1", "corrupt", "s2", "missing", "s3"]  # list order
    assert {k: r["status"] for k, r in rows.items()} == {
        "s0": "ok",
        "s1": "ok",
        "corrupt": "error",
        "s2": "ok",
        "missing": "error",
        "s3": "ok",
    }
    assert "cannot read" in rows["corrupt"]["error"] and "not found" in rows["missing"]["error"]
    assert all("\n" not in r["error"] for r in rows.values())
    assert not (out / "corrupt").exists() and not (out / "missing").exists()
    for k in range(4):
        got, ref = _outputs(out / f"s{k}"), _outputs(singles / f"s{k}")
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]) and got[2] == ref[2]
        assert rows[f"s{k}"]["nfe"].startswith("rigid=") and float(rows[f"s{k}"]["seconds_total"]) > 0
    assert not list(out.glob(".*part*"))  # no temporary folders left
    # a rerun skips the 4 done pairs and records the 2 failures again
    stamp = (out / "s0" / "warped.nii.gz").stat().st_mtime_ns
    assert cli.main(argv) == 3
    rows = _summary(out)
    assert [r["status"] for r in rows.values()] == ["skipped", "skipped", "error", "skipped", "error", "skipped"]
    assert (out / "s0" / "warped.nii.gz").stat().st_mtime_ns == stamp
    assert "4 skipped" in capsys.readouterr().err.replace("0 registered, ", "")


def test_incomplete_folder_is_redone(cohort, analytic_plan, tmp_path):
    out = tmp_path / "out"
    (out / "s0").mkdir(parents=True)
    (out / "s0" / "warped.nii.gz").write_bytes(b"left over by a killed run")
    folders = tmp_path / "m", tmp_path / "f"
    for d in folders:
        d.mkdir()
    os.link(cohort / "moving0.nii.gz", folders[0] / "s0.nii.gz")
    os.link(cohort / "fixed0.nii.gz", folders[1] / "s0.nii.gz")
    rc = cli.main(
        [
            "batch",
            "--moving-dir",
            str(folders[0]),
            "--fixed-dir",
            str(folders[1]),
            "-o",
            str(out),
            "--plan",
            str(analytic_plan),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--stages",
            "rigid",
            "-q",
        ]
    )
    assert rc == 0
    assert _summary(out)["s0"]["status"] == "ok"
    assert all((out / "s0" / f).stat().st_size > 100 for f in OUTPUT_FILES)


def test_batched_registration_matches_one_by_one(cohort, singles, analytic_plan, tmp_path):
    """--batch 3: the model-grid registration of 3 pairs at once; world outputs within 1e-4 mm of
    registering them one by one (float32 rounding of batched reductions)."""
    out = tmp_path / "out"
    rc = cli.main(
        [
            "batch",
            str(cohort / "pairs.csv"),
            "-o",
            str(out),
            "--plan",
            str(analytic_plan),
            "--device",
            "cpu",
            "--batch",
            "3",
            "--workers",
            "0",
            "-q",
        ]
    )
    assert rc == 3
    rows = _summary(out)
    assert {rows[f"s{k}"]["batch"] for k in range(4)} >= {"3"}
    for k in range(4):
        got, ref = _outputs(out / f"s{k}"), _outputs(singles / f"s{k}")
        assert float(np.abs(got[1] - ref[1]).max()) <= 1e-4
        rng = float(ref[0].max() - ref[0].min())
        assert float(np.abs(got[0] - ref[0]).max()) <= 1e-4 * rng * 100  # intensities follow the map


def test_register_many_yields_in_order_with_errors(cohort, analytic_plan):
    reg = Registrar.load(analytic_plan, device="cpu")
    pairs = [(str(cohort / f"moving{k}.nii.gz"), str(cohort / f"fixed{k}.nii.gz")) for k in range(3)]
    pairs.insert(1, (str(cohort / "corrupt.nii.gz"), str(cohort / "fixed0.nii.gz")))
    got = list(reg.register_many(pairs, batch_size=2, stages=["rigid"], errors="return"))
    assert [type(r).__name__ for r in got] == [
        "RegistrationResult",
        "InputError",
        "RegistrationResult",
        "RegistrationResult",
    ]
    one = reg.register(*pairs[2], stages=["rigid"])
    assert np.allclose(got[2].matrix, one.matrix, atol=1e-4)
    with pytest.raises(InputError, match="cannot read"):
        list(reg.register_many(pairs, stages=["rigid"]))
    with pytest.raises(InputError, match="batch_size"):
        next(reg.register_many(pairs, batch_size=0))


def test_pair_list_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("moving,target\na.nii,b.nii\n")
    with pytest.raises(InputError, match="columns moving and fixed"):
        read_pairs(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("id,moving,fixed\nx,a.nii,b.nii\nx,c.nii,d.nii\n")
    with pytest.raises(InputError, match="twice"):
        read_pairs(dup)
    unsafe = tmp_path / "unsafe.csv"
    unsafe.write_text("id,moving,fixed\n../up,a.nii,b.nii\n")
    with pytest.raises(InputError, match="safe folder name"):
        read_pairs(unsafe)
    with pytest.raises(InputError, match="pair list"):
        read_pairs(None)


def test_torchrun_two_cpu_processes_shard_and_merge(cohort, singles, analytic_plan, tmp_path):
    """torchrun --nproc-per-node=2 (gloo on CPU): each rank takes every second pair, rank 0 merges the
    summaries in list order; outputs as one process gives them (to float32 rounding: each rank runs one
    intra-op thread)."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "msode_sdk.batch",
        str(cohort / "pairs.csv"),
        "-o",
        str(out),
        "--plan",
        str(analytic_plan),
        "--device",
        "cpu",
        "--workers",
        "0",
        "-q",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0  # the rank-0 process reports failed pairs (torchrun passes non-zero on)
    rows = _summary(out)
    assert list(rows) == ["s0", "s1", "corrupt", "s2", "missing", "s3"], proc.stderr[-2000:]
    assert [r["status"] for r in rows.values()] == ["ok", "ok", "error", "ok", "error", "ok"]
    assert (out / "summary.rank0.csv").exists() and (out / "summary.rank1.csv").exists()
    for k in range(4):
        got, ref = _outputs(out / f"s{k}"), _outputs(singles / f"s{k}")
        assert float(np.abs(got[1] - ref[1]).max()) <= 1e-4
    assert math.isfinite(float(rows["s3"]["seconds_total"]))


def _no_part_files(folder):
    return not [p for p in folder.rglob("*") if ".part" in p.name]


@pytest.mark.parametrize(
    "body, why",
    [
        (b"moving,fixed\na.nii.gz,b.nii.gz,extra\n", "3 fields, the header has 2"),
        (b"moving,fixed\n\xe9.nii.gz,b.nii.gz\n", "not UTF-8"),  # Latin-1
        (b"moving,fixed\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\n", "not UTF-8"),  # binary
        (b'moving,fixed\n"' + b"a" * 200_000 + b'",b.nii.gz\n', "field limit"),
        (b"moving,fixed\na\x00.nii.gz,b.nii.gz\n", "NUL character"),
    ],
    ids=["extra-column", "latin-1", "binary", "huge-field", "nul"],
)
def test_malformed_pair_list_names_file_and_line(tmp_path, body, why):
    bad = tmp_path / "pairs.csv"
    bad.write_bytes(body)
    with pytest.raises(InputError, match=why) as info:
        read_pairs(bad)
    assert f"pair list {bad}, line 2:" in str(info.value) and "\n" not in str(info.value)


def test_cli_malformed_pair_list_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "pairs.csv"
    bad.write_text("moving,fixed\na.nii.gz,b.nii.gz,extra\n")
    assert cli.main(["batch", str(bad), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msode: error: pair list") and "line 2" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pair_id", ["summary.csv", "summary.rank0.csv", "Summary.Rank12.CSV"])
def test_summary_names_are_reserved_ids(tmp_path, pair_id):
    lst = tmp_path / "pairs.csv"
    lst.write_text(f"id,moving,fixed\nok,a.nii.gz,b.nii.gz\n{pair_id},c.nii.gz,d.nii.gz\n")
    with pytest.raises(InputError, match="reserved") as info:
        read_pairs(lst)
    assert f"{lst}, line 3" in str(info.value) and pair_id in str(info.value)


def test_summary_write_failure_is_output_error_without_part_file(tmp_path):
    (tmp_path / "summary.csv").mkdir()  # e.g. left by an older version's pair folder of that name
    with pytest.raises(OutputError, match="summary.csv"):
        batch._write_summary(tmp_path / "summary.csv", [])
    assert _no_part_files(tmp_path) and (tmp_path / "summary.csv").is_dir()
    batch._write_summary(tmp_path / "s.csv", [])
    assert (tmp_path / "s.csv").read_text().startswith("id,status") and _no_part_files(tmp_path)


def test_unusable_output_path_is_a_typed_error(cohort, analytic_plan, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = ["batch", str(cohort / "pairs.csv"), "--plan", str(analytic_plan), "--device", "cpu", "-q", "-o"]
    assert cli.main([*argv, str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msode: error: output path") and "afile exists and is not a directory" in err
    with pytest.raises(InputError, match="not a directory"):
        batch.run_batch(None, read_pairs(cohort / "pairs.csv"), tmp_path / "afile" / "sub")
    if os.path.isdir("/proc"):  # cannot be created there (even as root)
        assert cli.main([*argv, "/proc/msode_batch_test"]) == 2
        assert capsys.readouterr().err.startswith("msode: error: cannot create the output directory /proc/")


def test_ids_from_file_names_are_made_safe(tmp_path):
    mdir, fdir = tmp_path / "m", tmp_path / "f"
    for d in (mdir, fdir):
        d.mkdir()
        for name in ("sub 1.nii.gz", "sub-2.nii", "_x$y.nii.gz"):
            (d / name).write_bytes(b"")
    pairs = read_pairs(moving_dir=mdir, fixed_dir=fdir)
    assert [(p.id, os.path.basename(p.moving)) for p in pairs] == [
        ("x_y", "_x$y.nii.gz"),
        ("sub_1", "sub 1.nii.gz"),
        ("sub-2", "sub-2.nii"),
    ]
    (mdir / "sub_1.nii.gz").write_bytes(b"")  # now two names map to the id sub_1
    (fdir / "sub_1.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="sub_1.*twice") as info:
        read_pairs(moving_dir=mdir, fixed_dir=fdir)
    assert "sub 1.nii.gz" in str(info.value) and "sub_1.nii.gz" in str(info.value)
    lst = tmp_path / "pairs.csv"  # a CSV without ids: the same rule; an id given in the CSV is not altered
    lst.write_text("moving,fixed\nm/sub 1.nii.gz,f/sub 1.nii.gz\n")
    assert read_pairs(lst)[0].id == "sub_1"
    lst.write_text("id,moving,fixed\nsub 1,m/sub 1.nii.gz,f/sub 1.nii.gz\n")
    with pytest.raises(InputError, match="line 2: pair id 'sub 1' is not a safe folder name"):
        read_pairs(lst)


def test_rerun_redoes_a_pair_whose_inputs_changed(cohort, analytic_plan, tmp_path):
    out, lst = tmp_path / "out", tmp_path / "pairs.csv"
    argv = ["batch", str(lst), "-o", str(out), "--plan", str(analytic_plan), "--device", "cpu"]
    argv += ["--workers", "0", "--stages", "rigid", "-q"]

    def run(k):
        lst.write_text(f"id,moving,fixed\np,{cohort}/moving{k}.nii.gz,{cohort}/fixed{k}.nii.gz\n")
        assert cli.main(argv) == 0
        return _summary(out)["p"]["status"]

    assert run(0) == "ok"
    record = json.loads((out / "p" / INPUTS_FILE).read_text())
    assert record["moving"]["path"] == str(cohort / "moving0.nii.gz") and record["stages"] == ["rigid"]
    assert run(0) == "skipped"
    assert run(1) == "ok"  # the list now points at other files: the old results were stale
    assert json.loads((out / "p" / INPUTS_FILE).read_text())["fixed"]["path"] == str(cohort / "fixed1.nii.gz")
    (out / "p" / INPUTS_FILE).unlink()  # outputs of a version that recorded no inputs: kept
    assert run(0) == "skipped"
    assert _no_part_files(out)
