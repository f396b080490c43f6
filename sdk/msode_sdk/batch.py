"""Cohort registration: ``msode batch PAIRS.csv -o OUT/`` (or ``python -m msode_sdk.batch ...``).

Registers many pairs and writes each one's outputs as ``msode register`` does, into ``OUT/<id>/``, plus
``OUT/summary.csv`` (one row per pair: id, status, files, times, NFE, one-line error):

* the list: a CSV with columns ``moving``, ``fixed`` and optionally ``id`` (paths relative to the CSV's
  folder unless absolute), or ``--moving-dir M --fixed-dir F`` (files of the same name in both; ids from
  the names). Ids must be unique and safe as folder names; ``summary.csv`` and ``summary.rank<r>.csv``
  (any case) are reserved. An id given in the CSV is refused when unsafe; an id made from a file name
  (``--moving-dir``, or a CSV without ids) is made safe instead: unsafe characters become ``_``, leading
  non-alphanumerics are dropped, at most 128 characters (``sub 1.nii.gz`` -> ``sub_1``), so one odd file
  name does not stop the cohort (two names that map to one id are refused, naming both files);
* loading, validation and resampling to the model grid run in ``--workers`` background processes (a torch
  ``DataLoader``); the registration runs ``--batch N`` pairs at a time on the model grid
  (:meth:`msode_sdk.Registrar.register_prepared`; on 2 CPU cores batch 1 is fastest, on a GPU larger
  batches pay); world outputs are computed per pair;
* resumable: a pair whose folder already holds every output is skipped (``status skipped``) unless its
  ``inputs.json`` (written with the outputs: both files' absolute paths, sizes and modification times,
  the plan's name, the stages and the init) differs from this run's, in which case the pair is
  registered again; a folder without ``inputs.json`` (an earlier version's) is kept as it is. A pair's
  folder appears only complete (written to a temporary folder, then renamed);
* a pair that fails (unreadable or hostile file, no content, out of memory) is recorded with its one-line
  error and the run goes on; the exit status is 0 when every pair succeeded or was skipped, 3 when some
  failed (2: the command itself was wrong);
* beyond one device: under ``torchrun --nproc-per-node=K -m msode_sdk.batch ...`` each rank takes every
  K-th pair (rank r: pairs r, r+K, ...), on ``cuda:LOCAL_RANK`` when CUDA is there (else the CPU), writes
  ``summary.rank<r>.csv``, and rank 0 merges them into ``summary.csv`` in list order after a barrier
  (``torch.distributed``: gloo on CPU, NCCL on GPU). The same command on several machines with torchrun's
  usual rendezvous arguments shards across them. No scheduler of our own.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any, Sequence

import torch

from . import io as _io
from .errors import InputError, MsodeError, OutputError

__all__ = ["PairSpec", "read_pairs", "run_batch", "main", "OUTPUT_FILES", "INPUTS_FILE", "SUMMARY_FIELDS"]

_log = logging.getLogger("msode_sdk")

OUTPUT_FILES = ("warped.nii.gz", "transform.tfm", "displacement.nii.gz", "report.json")
SUMMARY_FIELDS = (
    "id",
    "status",
    "moving",
    "fixed",
    "output",
    "seconds_load",
    "seconds_register",
    "seconds_output",
    "seconds_total",
    "batch",
    "nfe",
    "error",
)
INPUTS_FILE = "inputs.json"  # what a pair's outputs were made from: a changed input redoes the pair
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# a pair folder of these names would stand where OUT/'s summaries are written (any case: macOS and Windows
# file systems fold it)
_RESERVED_ID_RE = re.compile(r"summary(\.rank[0-9]+)?\.csv", re.IGNORECASE)
_UNSAFE_RUN_RE = re.compile(r"[^A-Za-z0-9_.\-]+")
_NII = (".nii.gz", ".nii")


@dataclass(frozen=True)
class PairSpec:
    """One pair of the list: its id (output folder name) and its two files."""

    id: str
    moving: str
    fixed: str


def _stem(path: Path) -> str:
    name = path.name
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _derived_id(path: Path) -> str:
    """An id made from a file name (see the module docstring): ``sub 1.nii.gz`` -> ``sub_1``."""
    safe = _UNSAFE_RUN_RE.sub("_", _stem(path))
    return re.sub(r"^[^A-Za-z0-9]+", "", safe)[:128]


def _read_csv(path: Path) -> list[tuple[PairSpec, bool, str]]:
    """The CSV's pairs, each with whether its id was given and where it is (for messages)."""
    try:
        data = path.read_bytes()  # decoded here, not by the csv reader, to name the line at fault
    except OSError as exc:
        raise InputError(f"pair list {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"pair list {path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8"
        ) from None
    reader = csv.reader(StringIO(text, newline=""))
    found: list[tuple[PairSpec, bool, str]] = []
    try:
        cols = [c.strip() for c in next(reader, [])]
        if not {"moving", "fixed"} <= set(cols):
            raise InputError(f"pair list {path}: needs the columns moving and fixed, has {cols}")
        twice = sorted({c for c in cols if c and cols.count(c) > 1})
        if twice:
            raise InputError(f"pair list {path}, line 1: the column(s) {twice} appear more than once")
        for record in reader:
            where = f"pair list {path}, line {reader.line_num}"
            if not any(field.strip() for field in record):
                continue  # blank line
            if len(record) > len(cols):
                # DictReader would file the extras under None; a comma in an unquoted file name does this
                raise InputError(
                    f"{where}: {len(record)} fields, the header has {len(cols)} (quote names that hold commas)"
                )
            if any("\0" in field for field in record):  # no file name holds one (csv accepts it since 3.11)
                raise InputError(f"{where}: a NUL character (a binary or UTF-16 file?)")
            row = dict(zip(cols, (field.strip() for field in record)))
            if not row.get("moving") or not row.get("fixed"):
                raise InputError(f"{where}: moving and fixed are both required")
            mov, fix = (row[c] if os.path.isabs(row[c]) else str(path.parent / row[c]) for c in ("moving", "fixed"))
            given = row.get("id", "")
            found.append((PairSpec(given or _derived_id(Path(mov)), mov, fix), bool(given), where))
    except csv.Error as exc:  # a field over csv.field_size_limit(), a NUL byte, a stray quote
        raise InputError(f"pair list {path}, line {reader.line_num}: {exc}") from None
    return found


def read_pairs(csv_path: str | os.PathLike | None = None, moving_dir=None, fixed_dir=None) -> list[PairSpec]:
    """The pair list from a CSV (``moving``, ``fixed``, optional ``id``) or from two folders matched by file
    name (ids made from the names, see the module docstring). Raises :class:`InputError` naming the file
    and line (or file name) for an unreadable or malformed list (not UTF-8, a missing column, extra fields,
    a field over the csv module's limit), duplicate, unsafe or reserved ids, an empty list."""
    found: list[tuple[PairSpec, bool, str]] = []  # (pair, id given, where it comes from)
    if csv_path is not None:
        path = Path(csv_path)
        if not path.is_file():
            raise InputError(f"pair list {path} is not a file")
        found = _read_csv(path)
    elif moving_dir is not None and fixed_dir is not None:
        mdir, fdir = Path(moving_dir), Path(fixed_dir)
        for d in (mdir, fdir):
            if not d.is_dir():
                raise InputError(f"{d} is not a directory")
        try:
            fixed_by_name = {p.name: p for p in fdir.iterdir() if p.name.endswith(_NII)}
            moving = sorted(q for q in mdir.iterdir() if q.name.endswith(_NII))
        except OSError as exc:
            raise InputError(f"cannot list {exc.filename or mdir}: {exc.strerror or exc}") from None
        for p in moving:
            if p.name in fixed_by_name:
                found.append((PairSpec(_derived_id(p), str(p), str(fixed_by_name[p.name])), False, str(p)))
            else:
                _log.warning("batch: %s has no file of the same name in %s; left out", p.name, fdir)
    else:
        raise InputError("give a pair list (CSV) or both --moving-dir and --fixed-dir")
    if not found:
        raise InputError("the pair list is empty")
    seen: dict[str, str] = {}
    for spec, given, where in found:
        if not spec.id:
            raise InputError(f"{where}: no pair id can be made from the file name; give ids in a CSV")
        if given and not _ID_RE.fullmatch(spec.id):
            raise InputError(
                f"{where}: pair id {spec.id!r} is not a safe folder name "
                "([A-Za-z0-9_.-], starting with a letter or digit, at most 128)"
            )
        if _RESERVED_ID_RE.fullmatch(spec.id):
            raise InputError(
                f"{where}: pair id {spec.id!r} is reserved: its folder would collide with the summary file "
                f"OUT/{spec.id} (reserved: summary.csv, summary.rank<r>.csv)"
            )
        if spec.id in seen:
            raise InputError(f"{where}: pair id {spec.id!r} appears twice in the list (also {seen[spec.id]})")
        seen[spec.id] = where
    return [spec for spec, _, _ in found]


def _input_record(spec: PairSpec, plan: str, stages: Sequence[str] | None, init: str | None) -> dict:
    """What a pair's outputs are made from, as written to its ``inputs.json`` (JSON types only, so that a
    record read back compares equal)."""

    def one(name: str) -> dict:
        entry: dict[str, Any] = {"path": os.path.abspath(name)}
        try:
            st = os.stat(name)
        except (OSError, ValueError):  # missing or invalid: the load reports it; never equal to a record
            return entry
        return {**entry, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    return {
        "moving": one(spec.moving),
        "fixed": one(spec.fixed),
        "plan": plan,
        "stages": list(stages) if stages else None,
        "init": init,
    }


def _done(folder: Path, record: dict) -> bool:
    """Whether ``folder`` holds every output, made from the inputs of ``record``."""
    try:
        if not all((folder / f).is_file() for f in OUTPUT_FILES):
            return False
        old = json.loads((folder / INPUTS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:  # outputs of a version that recorded no inputs: cannot tell, kept as before
        return True
    except (OSError, ValueError):  # unreadable folder or record: redo the pair
        return False
    return old == record


class _Prepared(torch.utils.data.Dataset):
    """Loads, validates and resamples one pair on the CPU (a data-loading worker's job); returns the pair's
    index with either its two :class:`~msode_sdk.io.PreparedImage` and the seconds taken, or the error."""

    def __init__(self, pairs: Sequence[tuple[int, PairSpec]], preparation: dict):
        self.pairs = list(pairs)
        self.preparation = preparation

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        index, spec = self.pairs[k]
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                mov = _io.prepare_image(_io.load_image(spec.moving, "moving"), **self.preparation, name="moving")
                fix = _io.prepare_image(_io.load_image(spec.fixed, "fixed"), **self.preparation, name="fixed")
        except MsodeError as exc:
            return index, None, f"{type(exc).__name__}: {_one_line(exc)}", time.perf_counter() - t0
        except Exception as exc:  # a bug or an unexpected reader failure: recorded, the run goes on
            return index, None, f"internal error: {type(exc).__name__}: {_one_line(exc)}", time.perf_counter() - t0
        return index, (mov, fix), None, time.perf_counter() - t0


def _one_line(exc: object) -> str:
    text = " ".join(str(exc).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _save_atomically(result, folder: Path, record: dict) -> None:
    """The pair's outputs (and its ``inputs.json``, ``record``) appear in ``folder`` complete or not at all:
    written to a temporary sibling, then renamed (an earlier run's folder is replaced)."""
    tmp = folder.parent / f".{folder.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        result.save(tmp)
        (tmp / INPUTS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _row(spec: PairSpec, status: str, out: Path, **kw) -> dict[str, Any]:
    row = {"id": spec.id, "status": status, "moving": spec.moving, "fixed": spec.fixed, "output": str(out / spec.id)}
    row.update(kw)
    return {k: row.get(k, "") for k in SUMMARY_FIELDS}


def _write_summary(path: Path, rows: list[dict]) -> None:
    """Write a summary atomically; :class:`OutputError` when it cannot be, and no temporary file is left.
    The temporary name starts with a dot, which no pair id does."""
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        # backslashreplace: a file name that is not UTF-8 (a --moving-dir listing) cannot stop the summary
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            w = csv.DictWriter(f, fieldnames=list(SUMMARY_FIELDS))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write the summary {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # gone already after the rename


def _read_summaries(paths: Sequence[Path]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    merged[row["id"]] = row
        except (OSError, ValueError, csv.Error) as exc:  # a rank that died before writing its share
            raise OutputError(f"cannot read the summary {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return merged


def run_batch(
    reg,
    pairs: Sequence[PairSpec],
    out_dir,
    batch_size: int = 1,
    workers: int = 0,
    stages: Sequence[str] | None = None,
    init: str | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Register this rank's share of ``pairs`` with ``reg`` into ``out_dir`` (see the module docstring);
    returns the summary rows of that share, in list order. :class:`OutputError` when ``out_dir`` cannot be
    created."""
    out = Path(out_dir)
    _io.check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None
    mine = [(i, p) for i, p in enumerate(pairs) if i % world == rank]
    rows: dict[int, dict] = {}
    records = {i: _input_record(p, reg.name, stages, init) for i, p in mine}
    todo = []
    for i, p in mine:
        if _done(out / p.id, records[i]):
            rows[i] = _row(p, "skipped", out)
        else:
            todo.append((i, p))
    loader = torch.utils.data.DataLoader(
        _Prepared(todo, reg.preparation()),
        batch_size=None,
        shuffle=False,
        num_workers=int(workers),
        collate_fn=lambda x: x,
    )
    bar = _progress(len(mine), len(mine) - len(todo), progress, rank)
    pending: list = []
    saving: list = []  # (index, load seconds, result, future) in list order
    saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msode-save")

    def record_error(i: int, message: str, load: float = 0.0):
        rows[i] = _row(pairs[i], "error", out, output="", error=message, seconds_load=f"{load:.3f}")
        _log.warning("batch: %s failed: %s", pairs[i].id, message)
        bar.update(1)

    def flush():
        if not pending:
            return
        batch = [(i, prep, load) for i, prep, load in pending]
        pending.clear()
        results = reg.register_prepared_or_each(
            [p for _, p, _ in batch], stages, init, load_seconds=[s for _, _, s in batch]
        )
        for (i, _, load), res in zip(batch, results):
            if isinstance(res, MsodeError):
                record_error(i, f"{type(res).__name__}: {_one_line(res)}", load)
                continue
            # written by a background thread (gzip of a 1 mm displacement takes seconds; zlib releases the
            # GIL), overlapping the next registration; at most two results wait in memory
            saving.append((i, load, res, saver.submit(_save_atomically, res, out / pairs[i].id, records[i])))
            while len(saving) > 2:
                finish_save()

    def finish_save():
        i, load, res, future = saving.pop(0)
        try:
            future.result()
        except (MsodeError, OSError) as exc:
            record_error(i, f"{type(exc).__name__}: {_one_line(exc)}", load)
        else:
            t = res.timings
            register_s = sum(v for k, v in t.items() if k not in ("load", "output", "total", "batch"))
            rows[i] = _row(
                pairs[i],
                "ok",
                out,
                seconds_load=f"{t['load']:.3f}",
                seconds_register=f"{register_s:.3f}",
                seconds_output=f"{t['output']:.3f}",
                seconds_total=f"{t['total']:.3f}",
                batch=int(t.get("batch", 1)),
                nfe=";".join(f"{k}={v}" for k, v in res.nfe.items()),
            )
            bar.update(1)

    try:
        for index, prepared, error, load in loader:
            if error is not None:
                record_error(index, error, load)
                continue
            pending.append((index, prepared, load))
            if len(pending) >= batch_size:
                flush()
        flush()
        while saving:
            finish_save()
    finally:
        saver.shutdown(wait=True)  # never leave a half-written temporary folder behind a stop
    bar.close()
    return [rows[i] for i, _ in mine]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, enabled: bool, rank: int):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional; the log lines remain
        return _NoBar()
    return tqdm(
        total=total,
        initial=done,
        unit="pair",
        desc=f"msode batch{f' rank {rank}' if rank else ''}",
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _distributed() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` under torchrun (``WORLD_SIZE`` > 1), else ``(0, 1, 0)``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("pairs", nargs="?", default=None, help="CSV with columns moving, fixed[, id]")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output directory (one folder per pair + summary.csv); a rerun skips the pairs already done there "
        "and redoes those whose input files, plan, --stages or --init changed (recorded in OUT/<id>/inputs.json)",
    )
    p.add_argument("--moving-dir", default=None, help="instead of a CSV: moving images, matched by file name ...")
    p.add_argument("--fixed-dir", default=None, help="... with the fixed images of this folder")
    p.add_argument("--plan", default=None, help="plan path or bundled name (default rigid_bspline.plan)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--stages", default=None, help="comma-separated subset of the plan's stages")
    p.add_argument("--init", default=None, choices=["none", "moments", "multistart"])
    p.add_argument("--batch", type=int, default=1, help="pairs registered together on the model grid (default 1)")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes (0: in this process)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, errors only")
    return p


def run(args) -> int:
    """``msode batch`` / ``python -m msode_sdk.batch``: see the module docstring. Returns the exit status."""
    from .registrar import Registrar

    if args.batch < 1 or args.workers < 0:
        raise InputError(f"--batch must be >= 1 and --workers >= 0, got {args.batch} and {args.workers}")
    out = Path(args.output)
    _io.check_output_dir(out)
    pairs = read_pairs(args.pairs, args.moving_dir, args.fixed_dir)
    rank, world, local_rank = _distributed()
    if not args.quiet:  # per-stage log lines would break the progress bar: warnings and errors only
        logging.getLogger("msode_sdk").setLevel(logging.WARNING)
    device = args.device
    group = False
    if world > 1:
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda:
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        elif device == "auto":
            device = "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        group = True
    try:
        reg = Registrar.load(args.plan or "rigid_bspline.plan", device=device, backend=args.backend)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        rows = run_batch(
            reg,
            pairs,
            out,
            batch_size=args.batch,
            workers=args.workers,
            stages=stages,
            init=args.init,
            rank=rank,
            world=world,
            progress=not args.quiet,
        )
        if world > 1:
            _write_summary(out / f"summary.rank{rank}.csv", rows)
            import torch.distributed as dist

            dist.barrier()
            if rank != 0:
                return 0
            merged = _read_summaries([out / f"summary.rank{r}.csv" for r in range(world)])
            rows = [merged[p.id] for p in pairs if p.id in merged]
        _write_summary(out / "summary.csv", rows)
    finally:
        if group:
            import torch.distributed as dist

            dist.destroy_process_group()
    failed = sum(r["status"] == "error" for r in rows)
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    print(
        f"msode batch: {ok} registered, {skipped} skipped (already done), {failed} failed; summary {out / 'summary.csv'}",
        file=sys.stderr,
    )
    return 3 if failed else 0


def main(argv=None) -> int:
    from .cli import run_command

    p = add_arguments(argparse.ArgumentParser(prog="python -m msode_sdk.batch", description=__doc__.split("\n\n")[0]))
    return run_command(p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
