"""TorchScript backend: ``networks/<stage>_L<l>.ts`` members run by libtorch on CPU or CUDA."""

from __future__ import annotations

import io

import torch

from ..errors import PlanError
from ._base import Backend, register_backend


@register_backend
class TorchBackend(Backend):
    name = "torch"
    formats = ("torchscript",)

    @classmethod
    def unavailable_reason(cls, device):
        if device.type == "cuda" and not torch.cuda.is_available():
            return "torch was built without CUDA or no CUDA device is visible"
        return None

    def _load_impl(self, data, member, plan, kind):
        try:
            module = torch.jit.load(io.BytesIO(data), map_location=self.device)
        except Exception as exc:  # a corrupted or foreign TorchScript archive
            raise PlanError(
                f"plan member {member} is not a loadable TorchScript module: {exc}".splitlines()[0]
            ) from None
        module.eval()
        if kind == "features":
            return lambda feeds: module(feeds["image"])
        return lambda feeds: module(feeds["warped"], feeds["fixed"], feeds["t"])
