from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import BackendUnavailable, InputError, PlanError

BACKENDS: dict[str, type["Backend"]] = {}


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    BACKENDS[cls.name] = cls
    return cls


class NetworkRunner:
    """One loaded per-scale network. Call with ``warped, fixed`` ``(N, 1, D, H, W)`` float32 tensors
    on the model grid level and the scalar time ``t``; returns the state velocity (``(N, 6)`` rigid,
    ``(N, 3, cz, cy, cx)`` B-spline, ``(N, 3, D, H, W)`` dense; mm or rad per unit time)."""

    def __init__(self, member: str, run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.member = member
        self._run = run

    def __call__(self, warped: torch.Tensor, fixed: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((warped.shape[0],), float(t), dtype=torch.float32, device=warped.device)
        out = self._run(warped, fixed, tt)
        if not isinstance(out, torch.Tensor):
            raise PlanError(f"network {self.member} returned {type(out).__name__}, expected a tensor")
        return out


class Backend:
    """Loads networks from a plan for one device. Subclasses: ``name``, ``formats`` (plan member
    formats they can run, in order of preference), ``_check_available``, ``_load_impl``."""

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

    def load_network(self, plan, networks: dict[str, str]) -> NetworkRunner:
        """Load the member of ``networks`` (format -> member name) this backend prefers."""
        for fmt in self.formats:
            member = networks.get(fmt)
            if member is not None:
                return NetworkRunner(member, self._load_impl(plan.read(member), member, plan))
        raise PlanError(f"backend {self.name!r} needs one of {list(self.formats)} networks; the plan has {sorted(networks)}")

    def _load_impl(self, data: bytes, member: str, plan) -> Callable:
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
