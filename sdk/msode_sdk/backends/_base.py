from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import BackendUnavailable, InputError, MsodeError, PlanError, is_out_of_memory

BACKENDS: dict[str, type["Backend"]] = {}


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    BACKENDS[cls.name] = cls
    return cls


# The two kinds of plan network and their inputs (by name; a member may omit the optional ones):
#   field    f(warped, fixed, t) -> state velocity: the per-level vector field
#   features image -> (N, C, D', H', W'): a level's feature map (plan format 2, computed once per level)
FIELD_INPUTS = ("warped", "fixed", "t")
FIELD_REQUIRED = ("warped", "fixed")
FEATURE_INPUTS = ("image",)
RunFn = Callable[[dict], torch.Tensor]


def check_input_names(member: str, names, kind: str) -> None:
    """A network's input names must be those of its kind (see :data:`FIELD_INPUTS`)."""
    allowed, required = (FIELD_INPUTS, FIELD_REQUIRED) if kind == "field" else (FEATURE_INPUTS, FEATURE_INPUTS)
    if not set(required) <= set(names) or not set(names) <= set(allowed):
        raise PlanError(
            f"{kind} network {member} must take inputs named ({', '.join(required)}"
            f"{'[, t]' if kind == 'field' else ''}); it has {list(names)}"
        )


def _run_member(run: RunFn, inputs: dict, what: str):
    """A plan member's run: its own failures (a hostile or broken network raising inside TorchScript /
    ONNX Runtime) are the plan's fault, so a :class:`PlanError` naming it; running out of memory is not
    (the registrar turns that into a ResourceError), nor are the SDK's own typed errors."""
    try:
        return run(inputs)
    except MsodeError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or ["no details"]
        # TorchScript puts its own preamble and the script's traceback first, the error itself last
        why = lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]
        raise PlanError(f"{what} failed at run time: {type(exc).__name__}: {why[:300]}") from exc


class NetworkRunner:
    """One loaded per-scale vector field. Call with ``warped, fixed`` ``(N, C, D, H, W)`` float32 tensors
    on the level grid (the images, ``C = 1``, or for plans with feature members the feature maps) and the
    scalar time ``t``; returns the state velocity (``(N, 6)`` rigid, ``(N, 3, cz, cy, cx)`` B-spline,
    ``(N, 3, D, H, W)`` dense; mm or rad per unit time)."""

    def __init__(self, member: str, run: RunFn):
        self.member = member
        self._run = run

    def __call__(self, warped: torch.Tensor, fixed: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((warped.shape[0],), float(t), dtype=torch.float32, device=warped.device)
        out = _run_member(self._run, {"warped": warped, "fixed": fixed, "t": tt}, f"network {self.member}")
        if not isinstance(out, torch.Tensor):
            raise PlanError(f"network {self.member} returned {type(out).__name__}, expected a tensor")
        return out


class FeatureRunner:
    """One loaded feature network: ``image (N, 1, D, H, W)`` -> ``(N, C, D', H', W')`` float32 on the
    level's feature grid (plan format 2)."""

    def __init__(self, member: str, run: RunFn):
        self.member = member
        self._run = run

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = _run_member(self._run, {"image": image}, f"feature network {self.member}")
        if not isinstance(out, torch.Tensor) or out.dim() != 5 or out.shape[0] != image.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise PlanError(
                f"feature network {self.member} returned {got}, expected (N, C, D, H, W) with N = {image.shape[0]}"
            )
        return out.to(torch.float32)


class Backend:
    """Loads networks from a plan for one device. Subclasses: ``name``, ``formats`` (plan member
    formats they can run, in order of preference), ``unavailable_reason``, ``_load_impl`` (bytes ->
    a function of the named input tensors, checked with :func:`check_input_names`)."""

    name = ""
    formats: tuple[str, ...] = ()

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        reason = self.unavailable_reason(self.device)
        if reason:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable on {self.device}: {reason}")
        self._lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """None when this backend can run on ``device``, else why not."""
        return None

    def providers(self) -> list[str]:
        """What actually executes the networks (reported in results, never silently changed)."""
        return [self.name]

    def _member(self, networks: dict[str, str]) -> str:
        for fmt in self.formats:
            member = networks.get(fmt)
            if member is not None:
                return member
        raise PlanError(
            f"backend {self.name!r} needs one of {list(self.formats)} networks; the plan has {sorted(networks)}"
        )

    def load_network(self, plan, networks: dict[str, str]) -> NetworkRunner:
        """Load the vector field of ``networks`` (format -> member name) in the format this backend prefers."""
        member = self._member(networks)
        return NetworkRunner(member, self._load_impl(plan.read(member), member, plan, "field"))

    def load_features(self, plan, networks: dict[str, str]) -> FeatureRunner:
        """Load a level's feature network (format -> member name)."""
        member = self._member(networks)
        return FeatureRunner(member, self._load_impl(plan.read(member), member, plan, "features"))

    def _load_impl(self, data: bytes, member: str, plan, kind: str) -> RunFn:
        raise NotImplementedError


def get_backend(name: str, device: torch.device) -> Backend:
    """Instantiate a backend by name for ``device``."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; valid: {sorted(BACKENDS) + ['auto']}") from None
    return cls(device)


def available_backends(device: torch.device) -> dict[str, str | None]:
    """``{name: None if usable else reason}`` for every registered backend on ``device``."""
    return {name: cls.unavailable_reason(torch.device(device)) for name, cls in sorted(BACKENDS.items())}
