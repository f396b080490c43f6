"""Network backends: run a plan's per-scale networks ``f_l(warped, fixed, t)``.

A registry of :class:`Backend` subclasses. The base class owns loading (member choice, checksum
verified bytes from the plan) and the call contract (shapes, dtype, device, output checks); a subclass
implements ``_load_impl`` and ``_run_impl``. Unknown names raise :class:`InputError` listing the
valid ones; a known backend that cannot run here raises :class:`BackendUnavailable` with the reason.

Backends
--------
``torch``        TorchScript members (``networks/*.ts``), CPU or CUDA.
``onnxruntime``  ONNX members, CPU execution provider, or CUDA with onnxruntime-gpu (IO binding).
``tensorrt``     ONNX members built into TensorRT engines (or engines shipped in the plan), CUDA only;
                 see :mod:`msode_sdk.backends._tensorrt` (GPU path verified only where TensorRT exists).

``backend="auto"``: the first usable backend of ``registrar._AUTO_ORDER[device.type]`` whose network
format the plan has; every skipped candidate is logged with its reason.

* CUDA: ``tensorrt`` -> ``onnxruntime`` (CUDA provider) -> ``torch``.
* CPU: ``torch`` -> ``onnxruntime``. The rule is measured: TorchScript runs these networks faster than
  ONNX Runtime's CPU provider, so it comes first; ONNX Runtime is the fallback for plans without
  TorchScript members. Measured on the bundled ``analytic_ssd`` plan (120x120x80 model grid, rigid
  NFE 108 + B-spline NFE 14), 2 CPU cores shared with other jobs, torch 2.13.0, onnxruntime 1.32.0:

  - ``python -m msode_sdk.bench --device cpu --no-end-to-end --repeats 5`` (default threads, load
    ~1.7), p50 of the whole model-grid registration: torch 1.85 s (rigid 1.01, B-spline 0.68),
    onnxruntime 9.61 s (rigid 4.34, B-spline 5.11): ONNX Runtime 5.2x slower;
  - one intra-op thread each (load ~9, median of 3 interleaved runs): CPU time torch 2.27 s,
    onnxruntime 3.55 s (1.6x); wall time of the B-spline stage 3.06 s vs 6.13 s.

  The B-spline networks (separable einsums) are where ONNX Runtime loses most. Caveat measured at the
  same time: on an oversubscribed machine (load ~11 on 2 cores) torch's 2 OpenMP threads degrade badly
  (37 s vs ORT 29 s wall); with ``torch.set_num_threads(1)`` torch took 5.7 s wall. Whoever shares the
  cores should pin torch to one thread. Re-measure when trained plans (conv nets) ship.
"""

from __future__ import annotations

from ._base import Backend, NetworkRunner, BACKENDS, register_backend, get_backend, available_backends
from . import _torch  # noqa: F401  (registers "torch")
from . import _onnxruntime  # noqa: F401  (registers "onnxruntime")
from . import _tensorrt  # noqa: F401  (registers "tensorrt"; importable without TensorRT)

__all__ = ["Backend", "NetworkRunner", "BACKENDS", "register_backend", "get_backend", "available_backends"]
