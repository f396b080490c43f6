"""The command-line face and the benchmark: success paths (bad-input paths: test_reliability.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from msode_sdk import bench, cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def test_cli_register_sample_pair(tmp_path, capsys):
    truth = json.loads((SAMPLE / "truth.json").read_text())
    out = tmp_path / "out"
    rc = cli.main(
        [
            "register",
            str(SAMPLE / "moving_t1.nii.gz"),
            str(SAMPLE / "fixed_t1.nii.gz"),
            "-o",
            str(out),
            "--plan",
            "analytic_ssd",
            "--device",
            "cpu",
            "--stages",
            "rigid",
            "--init",
            "multistart",
            "-q",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["outputs"]) == {"warped", "transform", "displacement", "report"}
    report = json.loads((out / "report.json").read_text())
    m = np.asarray(report["matrix_ras"])
    m_true = np.asarray(truth["fixed_to_moving_world_ras"])
    # compare the two maps over a 100 mm cube around the head centre
    pts = np.stack(np.meshgrid(*[np.linspace(-50, 50, 5)] * 3), -1).reshape(-1, 3) + np.asarray([0.0, -17.0, 10.0])
    err = np.linalg.norm(pts @ m[:3, :3].T + m[:3, 3] - (pts @ m_true[:3, :3].T + m_true[:3, 3]), axis=1)
    assert err.max() < 1.0, err.max()
    assert report["analytic_plan"] is True and report["nfe"]["rigid"] > 0
    assert report["plan_kind"] == "analytic"
    # the printed timings cover the whole command: reading, the plan, the registration and writing
    t = summary["timings_s"]
    assert {"read", "load_plan", "total", "save", "wall"} <= set(t) and {"read", "load_plan"} <= set(
        report["timings_s"]
    )
    assert t["wall"] >= t["read"] + t["load_plan"] + t["total"] + t["save"]


def test_cli_bad_input_one_line_and_exit_code(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msode_sdk",
            "register",
            str(tmp_path / "missing.nii.gz"),
            str(SAMPLE / "fixed_t1.nii.gz"),
            "-o",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    err_lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("msode: error")]
    assert len(err_lines) == 1 and "not found" in err_lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_cli_quiet_header_problem_is_one_line(tmp_path, capsys):
    """A header nibabel complains about (vox_offset inside the header; an unknown datatype code): with -q the
    error line alone, without it nibabel's message at most once (it logged through its own handler as well)."""
    import struct

    import nibabel as nib

    img = nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), np.eye(4))
    nib.save(img, str(tmp_path / "ok.nii"))
    raw = bytearray((tmp_path / "ok.nii").read_bytes())
    struct.pack_into("<f", raw, 108, -5.0)
    (tmp_path / "bad.nii").write_bytes(bytes(raw))
    args = ["register", str(tmp_path / "bad.nii"), str(SAMPLE / "fixed_t1.nii.gz"), "-o", str(tmp_path / "o")]
    assert cli.main([*args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msode: error: moving") and "vox offset -5" in err[0], err
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the error line and at most one copy of nibabel's message (where logging reaches stderr: not under pytest)
    assert sum("vox offset -5" in line for line in err) <= 2 and err[-1].startswith("msode: error"), err


def test_cli_plan_info_and_list(capsys):
    assert cli.main(["plan", "list"]) == 0
    assert "analytic_ssd.plan" in capsys.readouterr().out
    assert cli.main(["plan", "info", "analytic_ssd"]) == 0
    text = capsys.readouterr().out
    assert "rigid" in text and "bspline" in text
    assert cli.main(["plan", "info", "no_such.plan"]) == 2


def test_bench_runs_and_writes_json(analytic_plan, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(
        [
            "--plan",
            str(analytic_plan),
            "--device",
            "cpu",
            "--backend",
            "torch",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--no-end-to-end",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    run = res["runs"][0]
    assert run["backend"] == "torch" and run["nfe"]["bspline"] == 14
    assert {"whole", "rigid", "bspline"} <= set(run["model_grid"])
    assert run["model_grid"]["whole"]["p50_ms"] > 0
    assert "warp" in res and "peak_rss_mib" in res
    table = capsys.readouterr().out
    assert "model-grid whole" in table and "ANALYTIC" in table


def test_bench_reports_unavailable_backend(analytic_plan, tmp_path, capsys):
    rc = bench.main(
        [
            "--plan",
            str(analytic_plan),
            "--device",
            "cpu",
            "--backend",
            "tensorrt",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-end-to-end",
        ]
    )
    assert rc == 1
    assert "unavailable" in capsys.readouterr().out


def test_profile_script_dry_run_on_cpu(capsys):
    """scripts/profile_registration.py (the GPU kernel breakdown) runs end to end; on CPU it profiles the
    host side and still reports each stage's NFE (30 rigid, 14 B-spline: the benchmark's schedule)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import profile_registration
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert profile_registration.main(["--device", "cpu", "--shape", "32", "36", "24", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "NFE {'rigid': 30}" in out and "NFE {'rigid': 30, 'bspline': 14}" in out
    assert out.count("Self CPU time total") == 2
