"""Warp ops: resample a volume through a transform chain without a user-visible sampling grid.

``warp_chain(volume, src_grid, chain, out_grid)`` is the single dispatch point. The PyTorch
reference (:mod:`._reference`) defines the semantics: trilinear interpolation, ``align_corners``
voxel-centre convention, zeros outside the source volume. Accelerated kernels (CUDA) register
themselves with :func:`register_kernel` for a device type and a tuple of stage kinds, and must match
the reference to 1e-5 (fp32); anything without a registered kernel falls back to the reference.

The CUDA kernels (:mod:`._cuda`, operators ``msode::*`` of :mod:`._ops`) are built and registered
lazily by :func:`ensure_kernels`: on the first CUDA volume :func:`warp_chain` sees, or when a
``Registrar`` is created on a CUDA device. ``MSODE_WARP_KERNELS=0`` disables them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..transforms import Grid, TransformChain
from ._reference import sample_points, warp_chain_reference

__all__ = [
    "warp_chain",
    "sample_points",
    "register_kernel",
    "registered_kernels",
    "warp_chain_reference",
    "ensure_kernels",
]

_log = logging.getLogger(__name__)

KernelFn = Callable[[torch.Tensor, Grid, TransformChain, Grid], torch.Tensor]
_KERNELS: dict[tuple[str, tuple[str, ...]], KernelFn] = {}


def register_kernel(device_type: str, kinds: tuple[str, ...], fn: KernelFn) -> None:
    """Register an accelerated warp for chains whose stage kinds are exactly ``kinds``."""
    _KERNELS[(device_type, tuple(kinds))] = fn


def registered_kernels() -> list[tuple[str, tuple[str, ...]]]:
    return sorted(_KERNELS)


_ENSURED: set[str] = set()


def ensure_kernels(device_type: str = "cuda") -> bool:
    """Build/load and register the accelerated kernels of ``device_type`` once per process (CUDA: see
    :mod:`._cuda`; a failure is logged once and the reference is used). Returns whether any kernel is
    registered for ``device_type``."""
    if device_type == "cuda" and device_type not in _ENSURED:
        _ENSURED.add(device_type)
        from . import _cuda

        _cuda.load()
    return any(dev == device_type for dev, _ in _KERNELS)


def warp_chain(
    volume: torch.Tensor, src_grid: Grid, chain: TransformChain, out_grid: Grid, use_kernels: bool = True
) -> torch.Tensor:
    """Resample ``volume`` ``(N, C, D, H, W)`` on ``src_grid`` at ``chain(x)`` for every voxel ``x`` of
    ``out_grid``; returns ``(N, C, D', H', W')``. Points are mm, centre-relative (see transforms)."""
    if use_kernels and volume.is_cuda and "cuda" not in _ENSURED:
        ensure_kernels("cuda")
    if use_kernels and _KERNELS:
        key = (volume.device.type, tuple(t.kind for t in chain.transforms))
        fn = _KERNELS.get(key)
        if fn is not None:
            return fn(volume, src_grid, chain, out_grid)
    return warp_chain_reference(volume, src_grid, chain, out_grid)
