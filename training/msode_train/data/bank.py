"""The on-disk subject bank (:class:`SubjectBank`) and the disjoint seed ranges of the splits."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from msode_sdk.transforms import Grid

from .phantoms import CONTRASTS, FOV_MM, GENERATOR_VERSION, synthesize_subject
from .subject import Subject

__all__ = ["SPLIT_SEED_BASE", "SAMPLE_SEED", "split_seeds", "assert_disjoint", "SubjectBank"]

# Disjoint seed ranges per split: split_seeds("train", n) = 0..n-1, "test" = 10000.., "val" = 20000..
SPLIT_SEED_BASE = {"train": 0, "test": 10_000, "val": 20_000}
_SPLIT_SIZE = 10_000
SAMPLE_SEED = 90_000  # the held-out subject of data/sample (outside every split)


# -------------------------------------------------------------------------------------------- bank


def split_seeds(split: str, n: int) -> list:
    """Subject seeds of a split; the ranges never overlap (train 0.., test 10000.., val 20000..)."""
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLIT_SEED_BASE)}")
    if not (0 <= n <= _SPLIT_SIZE):
        raise ValueError(f"a split holds at most {_SPLIT_SIZE} subjects, asked for {n}")
    base = SPLIT_SEED_BASE[split]
    return list(range(base, base + n))


def assert_disjoint(*banks: "SubjectBank") -> None:
    """Raise ``ValueError`` if two banks share a subject seed."""
    seen: dict = {}
    for i, bank in enumerate(banks):
        for s in bank.seeds:
            if s in seen and seen[s] != i:
                raise ValueError(f"subject seed {s} is in bank {seen[s]} and bank {i}")
            seen[s] = i


class SubjectBank:
    """Synthetic subjects, synthesised once and cached on disk, loaded lazily.

    Subject ``i`` has seed ``seed + i``. Each lives in
    ``root/msode_subj_v{GENERATOR_VERSION}_s{seed}_sp{spacing}_fov{X}x{Y}x{Z}_{contrasts}.npz``
    (``np.savez_compressed``; intensities quantised to uint16, i.e. steps of 1.5e-5, labels uint8),
    written atomically so concurrent processes (DDP ranks) can share a root. Every access returns
    what the file holds (a freshly synthesised subject is saved and read back), so a bank is
    deterministic whether or not its cache was warm. ``max_in_memory`` subjects are kept in an LRU.

    Use :meth:`for_split` (or :func:`split_seeds`) so train and test never share subjects.
    """

    def __init__(
        self,
        root,
        n_subjects: int,
        seed: int = 0,
        spacing: float = 2.0,
        grid_shape=FOV_MM,
        contrasts: Sequence[str] = CONTRASTS,
        max_in_memory: int = 4,
    ):
        self.root = Path(root).expanduser()  # "~/..." from configs and CLIs means the home directory
        self.n_subjects = int(n_subjects)
        self.seed = int(seed)
        self.spacing = float(spacing)
        self.grid_shape = tuple(int(v) for v in grid_shape)
        self.contrasts = tuple(contrasts)
        self.max_in_memory = int(max_in_memory)
        self._lru: dict = {}

    @classmethod
    def for_split(cls, root, split: str, n_subjects: int, spacing: float = 2.0, **kwargs) -> "SubjectBank":
        seeds = split_seeds(split, n_subjects)
        return cls(root, n_subjects, seed=seeds[0] if seeds else SPLIT_SEED_BASE[split], spacing=spacing, **kwargs)

    @property
    def seeds(self) -> list:
        return list(range(self.seed, self.seed + self.n_subjects))

    @property
    def grid(self) -> Grid:
        return Grid(tuple(max(2, int(round(n / self.spacing))) for n in self.grid_shape), (self.spacing,) * 3)

    def __len__(self) -> int:
        return self.n_subjects

    def path(self, i: int) -> Path:
        s = self._seed_of(i)
        fov = "x".join(str(v) for v in self.grid_shape)
        return self.root / (
            f"msode_subj_v{GENERATOR_VERSION}_s{s}_sp{self.spacing:g}_fov{fov}_{'-'.join(self.contrasts)}.npz"
        )

    def _seed_of(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.n_subjects
        if not (0 <= i < self.n_subjects):
            raise IndexError(f"subject index {i} out of range for a bank of {self.n_subjects}")
        return self.seed + i

    def is_cached(self, i: int) -> bool:
        return self.path(i).exists()

    def ensure(self, indices=None, log=None) -> None:
        """Synthesise (and cache) every missing subject; ``log`` gets one line per new subject."""
        for i in range(self.n_subjects) if indices is None else indices:
            if not self.is_cached(i):
                t0 = time.perf_counter()
                self._write(i)
                if log is not None:
                    log(
                        f"synthesised subject seed {self._seed_of(i)} at {self.spacing:g} mm "
                        f"in {time.perf_counter() - t0:.1f} s -> {self.path(i)}"
                    )

    def _write(self, i: int) -> None:
        subj = synthesize_subject(self._seed_of(i), self.grid_shape, self.spacing, self.contrasts)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(i)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        arrays = {
            f"img_{c}": np.round(np.clip(a, 0.0, 1.0) * 65535.0).astype(np.uint16) for c, a in subj.images.items()
        }
        np.savez_compressed(tmp, labels=subj.labels, affine=subj.affine, meta=np.array(json.dumps(subj.meta)), **arrays)
        os.replace(tmp, path)

    def _read(self, i: int) -> Subject:
        path = self.path(i)
        with np.load(path, allow_pickle=False) as z:
            images = {c: z[f"img_{c}"].astype(np.float32) / np.float32(65535.0) for c in self.contrasts}
            labels = z["labels"]
            affine = z["affine"]
            meta = json.loads(str(z["meta"]))
        s = self._seed_of(i)
        meta["cache_file"] = str(path)
        return Subject(images=images, labels=labels, affine=affine, subject_id=f"synth{s:05d}", seed=s, meta=meta)

    def __getitem__(self, i: int) -> Subject:
        s = self._seed_of(i)
        if s in self._lru:
            subj = self._lru.pop(s)
            self._lru[s] = subj
            return subj
        if not self.is_cached(i):
            self._write(i)
        subj = self._read(i)
        if self.max_in_memory > 0:
            self._lru[s] = subj
            while len(self._lru) > self.max_in_memory:
                self._lru.pop(next(iter(self._lru)))
        return subj

    def __iter__(self) -> Iterator[Subject]:
        for i in range(self.n_subjects):
            yield self[i]
