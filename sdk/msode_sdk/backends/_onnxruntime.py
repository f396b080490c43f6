"""ONNX Runtime backend: ``networks/<stage>_L<l>.onnx`` members.

CPU uses the CPU execution provider. On CUDA devices it needs onnxruntime-gpu (the CUDA execution
provider); the providers actually in use are reported by :meth:`providers` and never swapped silently.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BackendUnavailable, PlanError
from ._base import Backend, check_input_names, register_backend

try:  # onnxruntime is a runtime dependency, but keep the SDK importable without it
    import onnxruntime as ort
except Exception:  # pragma: no cover - depends on the install
    ort = None


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    formats = ("onnx",)

    @classmethod
    def unavailable_reason(cls, device):
        if ort is None:
            return "onnxruntime is not installed"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type!r} is not supported"
        return None

    def __init__(self, device):
        super().__init__(device)
        if self.device.type == "cuda":
            self._providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        else:
            self._providers = ["CPUExecutionProvider"]
        self._in_use: list[str] = []

    def providers(self):
        return self._in_use or [p if isinstance(p, str) else p[0] for p in self._providers]

    def _load_impl(self, data, member, plan, kind):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            sess = ort.InferenceSession(data, sess_options=opts, providers=self._providers)
        except Exception as exc:
            raise PlanError(f"plan member {member} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from None
        used = sess.get_providers()
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in used:
            raise BackendUnavailable(f"onnxruntime could not create a CUDA session for {member}; providers: {used}")
        self._in_use = used
        names = [i.name for i in sess.get_inputs()]
        # Inputs are bound by name; an exporter may drop an unused ``t`` (analytic networks).
        check_input_names(member, names, kind)
        out_name = sess.get_outputs()[0].name
        device = self.device

        if device.type == "cuda":

            def run(feeds):
                binding = sess.io_binding()
                for name in names:
                    tensor = feeds[name].contiguous()
                    binding.bind_input(
                        name, "cuda", device.index or 0, np.float32, tuple(tensor.shape), tensor.data_ptr()
                    )
                binding.bind_output(out_name, "cuda", device.index or 0)
                torch.cuda.current_stream(device).synchronize()
                sess.run_with_iobinding(binding)
                return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(device)
        else:

            def run(feeds):
                return torch.from_numpy(
                    sess.run([out_name], {n: feeds[n].detach().contiguous().numpy() for n in names})[0]
                )

        return run
