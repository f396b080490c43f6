"""Network backends: run a plan's per-scale networks ``f_l(warped, fixed, t)``.

A registry of :class:`Backend` subclasses. The base class owns loading (member choice, checksum
verified bytes from the plan) and the call contract (shapes, dtype, device, output checks); a subclass
implements ``_load_impl`` and ``_run_impl``. Unknown names raise :class:`InputError` listing the
valid ones; a known backend that cannot run here raises :class:`BackendUnavailable` with the reason.
"""
from __future__ import annotations

from ._base import Backend, NetworkRunner, BACKENDS, register_backend, get_backend, available_backends
from . import _torch  # noqa: F401  (registers "torch")
from . import _onnxruntime  # noqa: F401  (registers "onnxruntime")

__all__ = ["Backend", "NetworkRunner", "BACKENDS", "register_backend", "get_backend", "available_backends"]
