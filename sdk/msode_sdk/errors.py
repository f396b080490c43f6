"""Typed errors raised at the SDK boundary.

Every error a user can provoke with bad input, or that the environment causes in a way the caller can
act on (out of memory, unwritable output), derives from :class:`MsodeError`, so callers (and the CLI)
can catch one type and print a one-line message. Messages are single lines that name the offending
input, file, field or limit. Anything else escaping the SDK is a bug.
"""

_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA OOM, Python/numpy MemoryError, torch's CPU allocator failure, ONNX Runtime's arena."""
    import torch  # here, so that importing the error types stays light

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    from_backend = isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime")
    return from_backend and any(m in str(exc).lower() for m in _OOM_MARKERS)


class MsodeError(Exception):
    """Base class of every error the SDK raises on purpose."""


class PlanError(MsodeError, ValueError):
    """A `.plan` bundle is missing, corrupted, hostile, or of an unsupported format version."""


class InputError(MsodeError, ValueError):
    """An input image, array, affine or argument cannot be registered as given."""


class BackendUnavailable(MsodeError, RuntimeError):
    """A requested device or network backend is not available on this machine."""


class ResourceError(MsodeError, MemoryError):
    """A registration ran out of (GPU or CPU) memory. Cached GPU memory has been released and the
    :class:`~msode_sdk.Registrar` stays usable: retry with smaller inputs, fewer concurrent calls,
    or another device."""


class RegistrationError(MsodeError, FloatingPointError):
    """The registration diverged (non-finite transform parameters or solver error estimates),
    typically for inputs far from what the plan's networks were trained on. Nothing is returned:
    the SDK never hands back a non-finite transform."""


class OutputError(MsodeError, OSError):
    """Results could not be written (unwritable or invalid output directory, disk full, ...).
    Nothing partial is left behind."""
