"""CUDA warp kernels: built on first use, registered as ``msode::*`` CUDA kernels and as warp kernels.

What: the fused trilinear warps of ``csrc/warp_kernels.cu`` (sampling point computed in-kernel from
the rigid matrix, the B-spline control lattice or the dense field; no sampling grid in memory),
bound to the ``msode::*`` operators by ``csrc/warp_ops.cpp`` (schemas: :mod:`._ops`).

When (the hook): :func:`msode_sdk.warp.ensure_kernels` calls :func:`load` once per process, lazily:
:func:`msode_sdk.warp.warp_chain` does on the first CUDA volume it sees, and
:class:`msode_sdk.Registrar` does when it is created on a CUDA device (so the one-off build is part
of ``Registrar.load``, not of the first registration). ``MSODE_WARP_KERNELS=0`` disables the kernels.

How: ``torch.utils.cpp_extension.load`` compiles the two sources (``-O3``; no fast-math: the kernels
must match the reference to 1e-5) for the GPUs visible (or ``TORCH_CUDA_ARCH_LIST``) into
``$MSODE_CACHE_DIR`` (default ``~/.cache/msode``) ``/torch_ext/<torch>-cu<cuda>-sm<cc>-<sha of the
sources>/``; a later process reuses the build. It needs nvcc (``CUDA_HOME``) and ninja.

If the build fails, or nvcc/ninja/CUDA are missing, one warning says why (the compiler output goes to
``build_error.log`` in the build directory), :func:`available` returns ``(False, reason)`` and every
warp uses the PyTorch reference. Nothing falls back silently.

A registered warp uses the kernel when the volume is a float32/float16 CUDA tensor whose shape is
its source grid's, every transform state is float32 on the same device with batch 1 or N, and no
gradient is required (the kernels have no backward); otherwise it calls the reference, which defines
the result in every case.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import torch

from ..transforms import Grid, TransformChain
from . import _ops
from ._reference import warp_chain_reference

__all__ = ["available", "load", "build_directory", "KINDS", "displacement", "warp_op_call"]

_log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("warp_kernels.cu", "warp_ops.cpp")
HEADERS = ("warp_kernels.cuh",)
CUDA_FLAGS = ["-O3", "-lineinfo"]  # never --use_fast_math: parity with the reference is 1e-5
CXX_FLAGS = ["-O3"]

# Chains (stage kinds, registration order) the kernels implement, as registered with warp_chain.
KINDS: tuple[tuple[str, ...], ...] = (
    (),
    ("rigid",),
    ("bspline",),
    ("dense",),
    ("rigid", "bspline"),
    ("rigid", "dense"),
)

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ok": False, "reason": "not loaded yet", "path": None}


# ------------------------------------------------------------------------------------------ build


def _sources_digest() -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CUDA_FLAGS + CXX_FLAGS).encode())
    return h.hexdigest()


def _cache_root() -> Path:
    env = os.environ.get("MSODE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "msode"


def build_directory() -> Path:
    """Where this torch/CUDA/GPU/source combination is built (not created here)."""
    cc = "none"
    if torch.cuda.is_available():
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if arch:
            cc = "arch" + re.sub(r"[^0-9A-Za-z]+", "_", arch)
        else:
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            cc = "sm" + "_".join(f"{a}{b}" for a, b in caps)
    tag = f"{torch.__version__}-cu{torch.version.cuda}-{cc}-{_sources_digest()[:12]}"
    return _cache_root() / "torch_ext" / re.sub(r"[^0-9A-Za-z._-]+", "_", tag)


def _precheck() -> str | None:
    """Why the kernels cannot be built here, or None."""
    if os.environ.get("MSODE_WARP_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by MSODE_WARP_KERNELS=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "the CUDA toolkit (nvcc) was not found; set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    missing = [n for n in (*SOURCES, *HEADERS) if not (CSRC / n).is_file()]
    if missing:
        return f"kernel sources missing from the installation: {missing}"
    return None


def load() -> bool:
    """Build (or reuse) and load the extension, then register the warp kernels. Once per process;
    returns whether the kernels are in use. Never raises: failures are logged and reported by
    :func:`available`."""
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        _state["tried"] = True
        why = _precheck()
        if why is not None:
            _state["reason"] = why
            # A CPU-only torch or machine is the normal case, not worth a warning.
            level = logging.INFO if why.startswith(("torch ", "no CUDA", "disabled")) else logging.WARNING
            _log.log(level, "msode CUDA warp kernels unavailable: %s; using the PyTorch reference warps", why)
            return False
        build_dir = build_directory()
        try:
            from torch.utils import cpp_extension

            _ops.ensure_defined()  # the schemas must exist before the CUDA implementations are checked
            build_dir.mkdir(parents=True, exist_ok=True)
            path = cpp_extension.load(
                name=f"msode_warp_{_sources_digest()[:10]}",
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=CUDA_FLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
            missing = [n for n in _ops.SCHEMAS if not _ops.has_cuda_kernel(n)]
            if missing:
                raise RuntimeError(f"extension loaded but registers no CUDA kernel for {missing}")
        except Exception as exc:  # compiler errors, missing headers, ABI problems: report, never crash
            text = str(exc)
            log_path: Path | None = build_dir / "build_error.log"
            try:
                build_dir.mkdir(parents=True, exist_ok=True)
                Path(build_dir / "build_error.log").write_text(f"{type(exc).__name__}: {text}\n")
            except OSError:
                log_path = None
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
            _state["reason"] = f"building the CUDA warp kernels failed: {first[:300]}"
            _log.warning(
                "%s; using the PyTorch reference warps (slower)%s",
                _state["reason"],
                f". Full log: {log_path}" if log_path else "",
            )
            return False
        _state.update(ok=True, reason=f"loaded {path}", path=path)
        _register()
        _log.info("msode CUDA warp kernels loaded from %s", path)
        return True


def available(build: bool = True) -> tuple[bool, str]:
    """``(True, where)`` when the CUDA kernels are loaded, else ``(False, why not)``. With ``build``
    (default) the first call tries to build/load them."""
    if build and not _state["tried"]:
        load()
    return bool(_state["ok"]), str(_state["reason"])


# ------------------------------------------------------------------------------ chain -> operator


def _eligible(volume: torch.Tensor | None, chain: TransformChain, device: torch.device) -> bool:
    states = [t.state for t in chain.transforms]
    if device.type != "cuda":
        return False
    if volume is not None:
        if volume.dim() != 5 or volume.dtype not in (torch.float32, torch.float16) or volume.numel() == 0:
            return False
        n = volume.shape[0]
    else:
        n = max((s.shape[0] for s in states), default=0)
    for s in states:
        if s.dtype != torch.float32 or s.device != device or s.dim() < 1 or s.shape[0] not in (1, n):
            return False
    if torch.is_grad_enabled() and (
        (volume is not None and volume.requires_grad) or any(s.requires_grad for s in states)
    ):
        return False
    return True


def _transform_args(chain: TransformChain) -> tuple[str, list] | None:
    """Operator suffix and transform arguments of a chain of :data:`KINDS`."""
    kinds = tuple(t.kind for t in chain.transforms)
    ts: list[Any] = chain.transforms  # attributes by kind (matrix / lattice / grid)
    if kinds == ():
        return "resample", []
    if kinds == ("rigid",):
        return "warp_affine", [ts[0].matrix]
    if kinds == ("bspline",):
        return "warp_bspline", [ts[0].state, list(ts[0].lattice.control_spacing)]
    if kinds == ("dense",):
        return "warp_dense", [ts[0].state, list(ts[0].grid.spacing_xyz)]
    if kinds == ("rigid", "bspline"):
        return "warp_affine_bspline", [ts[0].matrix, ts[1].state, list(ts[1].lattice.control_spacing)]
    if kinds == ("rigid", "dense"):
        return "warp_affine_dense", [ts[0].matrix, ts[1].state, list(ts[1].grid.spacing_xyz)]
    return None


def warp_op_call(volume: torch.Tensor, src_grid: Grid, chain: TransformChain, out_grid: Grid):
    """``(operator, args)`` that warps like the reference, or None when the kernel cannot (see module
    docstring)."""
    if not _eligible(volume, chain, volume.device) or tuple(volume.shape[2:]) != src_grid.shape_dhw:
        return None
    spec = _transform_args(chain)
    if spec is None:
        return None
    name, targs = spec
    return _ops.op(name), [
        volume,
        *targs,
        list(src_grid.spacing_xyz),
        list(out_grid.spacing_xyz),
        list(out_grid.shape_xyz),
    ]


def _warp(volume: torch.Tensor, src_grid: Grid, chain: TransformChain, out_grid: Grid) -> torch.Tensor:
    call = warp_op_call(volume, src_grid, chain, out_grid)
    if call is None:
        return warp_chain_reference(volume, src_grid, chain, out_grid)
    fn, args = call
    return fn(*args)


def displacement(chain: TransformChain, grid: Grid, batch: int = 1, dtype=torch.float32, device=None) -> torch.Tensor:
    """``chain.displacement(grid)`` ``(N, 3, D, H, W)`` mm, by the CUDA kernel when the kernels are
    loaded and the chain is one of :data:`KINDS` with float32 CUDA states; else by the reference."""
    if _state["ok"] and len(chain) and dtype == torch.float32:
        dev = chain.transforms[0].state.device
        spec = _transform_args(chain)
        if spec is not None and _eligible(None, chain, dev):
            kinds = tuple(t.kind for t in chain.transforms)
            ts: list[Any] = chain.transforms
            matrix = ts[0].matrix if kinds[0] == "rigid" else None
            deform: Any = ts[-1] if kinds[-1] in ("bspline", "dense") else None
            coeffs = deform.state if deform is not None and deform.kind == "bspline" else None
            field = deform.state if deform is not None and deform.kind == "dense" else None
            cs = list(deform.lattice.control_spacing) if coeffs is not None else []
            fs = list(deform.grid.spacing_xyz) if field is not None else []
            out = _ops.op("chain_displacement")(
                matrix, coeffs, field, cs, fs, list(grid.spacing_xyz), list(grid.shape_xyz)
            )
            if out.shape[0] == 1 and batch > 1:
                out = out.expand(batch, *out.shape[1:])
            return out
    return chain.displacement(grid, batch, dtype, device)


def _register() -> None:
    from . import register_kernel

    for kinds in KINDS:
        register_kernel("cuda", kinds, _warp)
