"""TensorRT backend: the plan's ONNX networks as TensorRT engines, on CUDA devices.

**Verification status.** TensorRT cannot be installed on the CPU-only machines this package is developed
on. The parts that need no GPU (availability reasons, engine cache keys, selection of engines shipped in
a plan, cache reuse and the logged fallbacks) are unit-tested; the GPU path (parsing, building,
deserialising and running engines) is written against the documented TensorRT 10 Python API and is
verified only where TensorRT and a CUDA GPU are installed (the ``gpu`` tests and
``python -m msode_sdk.bench --device cuda``).

Where an engine comes from, per network (first that applies):

1. **Shipped in the plan**: ``engines/<gpu>-sm<cc>-trt<version>/<stage>_L<l>.engine``
   (:func:`engine_member_name`), used only when GPU name, compute capability and TensorRT version all
   match this machine, its recorded precision equals the requested one and, when the manifest's
   ``engines`` section records it, the ONNX member's sha256 matches. A mismatch is logged, never fatal.
2. **The engine cache**: ``$MSODE_ENGINE_CACHE`` (default ``~/.cache/msode/engines``), one file per
   network named by :func:`engine_cache_key` = sha256 of (GPU name, compute capability, TensorRT version,
   precision, ONNX sha256, max batch). An unreadable cached engine is logged, deleted and rebuilt.
3. **Built from the ONNX member**: ``OnnxParser`` -> ``build_serialized_network`` with one
   optimisation profile (batch 1 .. ``$MSODE_TRT_MAX_BATCH``, default 8: one pair with a 5-start multistart
   needs 5; other dimensions fixed),
   FP32, or FP16 kernels allowed with ``$MSODE_TRT_PRECISION=fp16`` (``BuilderFlag.FP16``; where that
   flag is gone, as in TensorRT 11, the build falls back to FP32 with a warning). The engine is written
   to the cache atomically; a cache that cannot be written is logged and the engine is used anyway.

Execution: one ``IExecutionContext`` per network, serialised by a lock (contexts are not re-entrant);
inputs and output are torch CUDA tensors bound with ``set_input_shape`` / ``set_tensor_address`` and
the engine runs with ``execute_async_v3`` on ``torch.cuda.current_stream().cuda_stream``, so it is
ordered with the surrounding torch work without host synchronisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import BackendUnavailable, InputError, PlanError
from ._base import Backend, check_input_names, register_backend

__all__ = [
    "TensorRTBackend",
    "HardwareKey",
    "engine_dir_name",
    "engine_member_name",
    "engine_cache_key",
    "engine_cache_dir",
    "shipped_engine",
    "obtain_engine",
    "build_engine",
    "gpu_slug",
    "ENGINE_CACHE_ENV",
    "PRECISION_ENV",
    "MAX_BATCH_ENV",
    "MIN_TRT_MAJOR",
]

_log = logging.getLogger("msode_sdk.tensorrt")

ENGINE_CACHE_ENV = "MSODE_ENGINE_CACHE"
PRECISION_ENV = "MSODE_TRT_PRECISION"
MAX_BATCH_ENV = "MSODE_TRT_MAX_BATCH"
WORKSPACE_ENV = "MSODE_TRT_WORKSPACE_MIB"
MIN_TRT_MAJOR = 10
PRECISIONS = ("fp32", "fp16")
_UNSET = object()
_trt_module = _UNSET


def _import_trt():
    """The ``tensorrt`` module, or None when it is not importable (cached; tests may monkeypatch)."""
    global _trt_module
    if _trt_module is _UNSET:
        try:
            import tensorrt as trt  # noqa: F401
        except Exception:  # ImportError, or a broken install (missing libnvinfer)
            trt = None
        _trt_module = trt
    return _trt_module


def _trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


# ----------------------------------------------------------------------------------- engine identity


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (safe in a member name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return slug or "gpu"


@dataclass(frozen=True)
class HardwareKey:
    """What a serialised TensorRT engine is tied to."""

    gpu: str  # torch.cuda.get_device_name
    compute_capability: tuple[int, int]  # torch.cuda.get_device_capability
    trt_version: str  # tensorrt.__version__

    @classmethod
    def current(cls, device: torch.device, trt_version: str) -> "HardwareKey":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return cls(torch.cuda.get_device_name(index), (int(major), int(minor)), str(trt_version))

    @property
    def dir_name(self) -> str:
        return engine_dir_name(self.gpu, self.compute_capability, self.trt_version)


def engine_dir_name(gpu: str, compute_capability, trt_version: str) -> str:
    """``<gpu>-sm<major><minor>-trt<version>``, e.g. ``nvidia-h100-80gb-hbm3-sm90-trt10.3.0``."""
    major, minor = (int(v) for v in compute_capability)
    version = re.sub(r"[^0-9A-Za-z.]+", "-", str(trt_version))
    return f"{gpu_slug(gpu)}-sm{major}{minor}-trt{version}"


def _network_stem(onnx_member: str) -> str:
    """``networks/rigid_L1.onnx`` -> ``rigid_L1``."""
    base = onnx_member.rsplit("/", 1)[-1]
    return base[:-5] if base.endswith(".onnx") else base


def engine_member_name(hw: HardwareKey, onnx_member: str) -> str:
    """Plan member of the shipped engine for an ONNX network: ``engines/<dir>/<stage>_L<l>.engine``."""
    return f"engines/{hw.dir_name}/{_network_stem(onnx_member)}.engine"


def engine_cache_key(hw: HardwareKey, precision: str, onnx_sha256: str, max_batch: int) -> str:
    """sha256 hex of everything an engine depends on (GPU, compute capability, TensorRT version,
    precision, the ONNX bytes' sha256 and the optimisation profile's max batch)."""
    ident = {
        "gpu": hw.gpu,
        "cc": list(hw.compute_capability),
        "trt": hw.trt_version,
        "precision": precision,
        "onnx_sha256": onnx_sha256.lower(),
        "max_batch": int(max_batch),
        "layout": 1,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def engine_cache_dir() -> Path:
    """``$MSODE_ENGINE_CACHE`` or ``~/.cache/msode/engines``."""
    env = os.environ.get(ENGINE_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "msode" / "engines"


def _cache_path(cache: Path, onnx_member: str, key: str) -> Path:
    return cache / f"{_network_stem(onnx_member)}-{key[:32]}.engine"


def shipped_engine(
    plan, onnx_member: str, hw: HardwareKey, precision: str, onnx_sha256: str, max_batch: int | None = None
) -> tuple[str | None, str]:
    """The plan member of a matching shipped engine (or None) and why (for the log).

    The manifest's optional ``engines`` section describes each engine directory:
    ``{"<dir>": {"precision": "fp32", "max_batch": 4, "onnx_sha256": {"<engine member>": "<sha>"}}}``
    (precision fp32 when absent)."""
    member = engine_member_name(hw, onnx_member)
    names = plan.member_names()
    if not plan.has(member):
        dirs = sorted({n.split("/")[1] for n in names if n.startswith("engines/") and n.count("/") >= 2})
        if not dirs:
            return None, "the plan ships no TensorRT engines"
        if hw.dir_name in dirs:
            return None, f"the plan has no {member}"
        return None, f"the plan ships engines for {dirs}, none for {hw.dir_name}"
    meta = (plan.manifest.raw.get("engines") or {}).get(hw.dir_name) or {}
    if not isinstance(meta, dict):
        meta = {}
    shipped_precision = meta.get("precision", "fp32")
    if shipped_precision != precision:
        return None, f"shipped engine {member} is {shipped_precision}, {precision} requested"
    recorded = (meta.get("onnx_sha256") or {}).get(member) if isinstance(meta.get("onnx_sha256"), dict) else None
    if recorded is not None and str(recorded).lower() != onnx_sha256.lower():
        return None, f"shipped engine {member} was built from another version of {onnx_member}"
    mb = meta.get("max_batch")
    if max_batch is not None and isinstance(mb, int) and mb < max_batch:
        return None, f"shipped engine {member} supports batch <= {mb}, {max_batch} requested"
    return member, f"using shipped engine {member}"


def obtain_engine(
    plan,
    onnx_member: str,
    onnx_bytes: bytes,
    onnx_sha256: str,
    hw: HardwareKey,
    precision: str,
    max_batch: int,
    build: Callable[[bytes, str, int], bytes],
    deserialize: Callable[[bytes], object | None],
    cache: Path | None,
):
    """An engine for one network: shipped in the plan, else cached, else built (and cached).

    ``build(onnx_bytes, precision, max_batch) -> engine bytes``; ``deserialize(bytes) -> engine or None``.
    Returns ``(engine, source)`` with source ``"plan:<member>"``, ``"cache:<path>"`` or ``"built"``.
    Every fallback is logged."""
    member, why = shipped_engine(plan, onnx_member, hw, precision, onnx_sha256, max_batch)
    if member is not None:
        engine = deserialize(plan.read(member))
        if engine is not None:
            _log.info("tensorrt: %s: %s", onnx_member, why)
            return engine, f"plan:{member}"
        _log.warning("tensorrt: shipped engine %s could not be deserialised; falling back to the cache/ONNX", member)
    else:
        _log.info("tensorrt: %s: %s; using the engine cache / building from ONNX", onnx_member, why)
    key = engine_cache_key(hw, precision, onnx_sha256, max_batch)
    path = _cache_path(cache, onnx_member, key) if cache is not None else None
    if path is not None and path.is_file():
        try:
            engine = deserialize(path.read_bytes())
        except OSError as exc:
            engine = None
            _log.warning("tensorrt: cannot read cached engine %s (%s)", path, exc)
        if engine is not None:
            _log.info("tensorrt: %s: using cached engine %s", onnx_member, path)
            return engine, f"cache:{path}"
        _log.warning("tensorrt: cached engine %s is unusable; deleting it and rebuilding", path)
        try:
            path.unlink()
        except OSError:
            pass
    _log.info(
        "tensorrt: building a %s engine for %s (%s); this takes a while once per GPU/TensorRT version",
        precision,
        onnx_member,
        hw.dir_name,
    )
    data = build(onnx_bytes, precision, max_batch)
    engine = deserialize(data)
    if engine is None:
        raise BackendUnavailable(f"TensorRT built an engine for {onnx_member} that it cannot deserialise")
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
            _log.info("tensorrt: cached engine %s", path)
        except OSError as exc:
            _log.warning("tensorrt: cannot write the engine cache %s (%s); engine used without caching", path, exc)
        finally:
            if tmp.exists():
                try:
                    tmp.unlink()
                except OSError:
                    pass
    return engine, "built"


# ------------------------------------------------------------------------------------ TensorRT calls


def _effective_precision(trt, precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown TensorRT precision {precision!r}; valid: {list(PRECISIONS)}")
    if precision == "fp16" and not hasattr(getattr(trt, "BuilderFlag", None), "FP16"):
        _log.warning(
            "tensorrt: this TensorRT (%s) has no BuilderFlag.FP16 (strongly typed builds only); "
            "building FP32 engines instead",
            getattr(trt, "__version__", "?"),
        )
        return "fp32"
    return precision


def build_engine(
    trt,
    onnx_bytes: bytes,
    precision: str,
    max_batch: int,
    logger=None,
    member: str = "network",
    workspace_mib: int | None = None,
) -> bytes:
    """Serialise a TensorRT engine from ONNX bytes (GPU path; see the module docstring)."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT >= 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT cannot parse {member}: {errors[:500]}")
    config = builder.create_builder_config()
    ws = workspace_mib if workspace_mib is not None else int(os.environ.get(WORKSPACE_ENV, "2048"))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, ws * (1 << 20))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = [int(d) for d in inp.shape]
        if any(d < 0 for d in shape[1:]):
            raise BackendUnavailable(
                f"{member}: input {inp.name} has dynamic non-batch dimensions {shape}; "
                "only the batch dimension may be dynamic"
            )
        rest = shape[1:]
        profile.set_shape(inp.name, tuple([1] + rest), tuple([1] + rest), tuple([max_batch] + rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(f"TensorRT failed to build an engine for {member} (see the TensorRT log above)")
    return bytes(serialized)


@register_backend
class TensorRTBackend(Backend):
    """ONNX networks as TensorRT engines on a CUDA device (see module docstring; GPU path verified only
    where TensorRT is installed)."""

    name = "tensorrt"
    formats = ("onnx",)

    @classmethod
    def unavailable_reason(cls, device):
        trt = _import_trt()
        if trt is None:
            return "the tensorrt Python package is not installed (pip install 'tensorrt>=10' on a machine with an NVIDIA GPU)"
        version = str(getattr(trt, "__version__", "0"))
        if _trt_major(version) < MIN_TRT_MAJOR:
            return f"TensorRT {version} is too old; msode needs TensorRT >= {MIN_TRT_MAJOR}"
        if device.type != "cuda":
            return f"TensorRT runs on CUDA devices only (device is {device})"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    def __init__(self, device):
        super().__init__(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._trt = _import_trt()
        trt = self._trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.hw = HardwareKey.current(self.device, trt.__version__)
        self.precision = _effective_precision(trt, os.environ.get(PRECISION_ENV, "fp32").strip().lower())
        try:
            self.max_batch = max(1, int(os.environ.get(MAX_BATCH_ENV, "8")))
        except ValueError:
            raise InputError(f"${MAX_BATCH_ENV} must be a positive integer") from None
        self.cache = engine_cache_dir()
        self.sources: dict[str, str] = {}

    def providers(self):
        return [f"TensorRT {self.hw.trt_version} {self.precision} ({self.hw.dir_name})"]

    def _deserialize(self, data: bytes):
        try:
            return self._runtime.deserialize_cuda_engine(data)
        except Exception as exc:  # version or platform mismatch, truncated file
            _log.warning(
                "tensorrt: deserialise failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            )
            return None

    def _load_impl(self, data, member, plan, kind):
        trt = self._trt
        sha = plan.manifest.members.get(member, {}).get("sha256") or hashlib.sha256(data).hexdigest()
        with torch.cuda.device(self.device):
            engine, source = obtain_engine(
                plan,
                member,
                data,
                sha,
                self.hw,
                self.precision,
                self.max_batch,
                build=lambda b, p, mb: build_engine(trt, b, p, mb, self._logger, member),
                deserialize=self._deserialize,
                cache=self.cache,
            )
            context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for {member} (GPU memory?)")
        self.sources[member] = source
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise PlanError(f"TensorRT engine for {member}: tensor {name} is not float32")
        check_input_names(member, inputs, kind)
        if len(outputs) != 1:
            raise PlanError(f"TensorRT engine for {member} must give one output; it has {outputs}")
        out_name = outputs[0]
        device = self.device
        lock = threading.Lock()
        max_batch = self.max_batch

        def run(feeds):
            n = next(iter(feeds.values())).shape[0]
            if n > max_batch:
                raise InputError(f"batch {n} exceeds the TensorRT profile's maximum {max_batch} (set ${MAX_BATCH_ENV})")
            bound = {k: feeds[k].to(device=device, dtype=torch.float32).contiguous() for k in inputs}
            with lock, torch.cuda.device(device):
                for k, tensor in bound.items():
                    if not context.set_input_shape(k, tuple(tensor.shape)):
                        raise InputError(
                            f"{member}: input {k} shape {tuple(tensor.shape)} is outside the engine's profile"
                        )
                    context.set_tensor_address(k, tensor.data_ptr())
                out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=torch.float32, device=device)
                context.set_tensor_address(out_name, out.data_ptr())
                if not context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
                    raise BackendUnavailable(
                        f"TensorRT execution of {member} failed (execute_async_v3 returned "
                        "false; see the TensorRT log above)"
                    )
            return out

        return run
