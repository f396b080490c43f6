"""Typed errors raised at the SDK boundary.

Every error a user can provoke with bad input derives from :class:`MsodeError`, so callers (and the
CLI) can catch one type and print a one-line message.
"""


class MsodeError(Exception):
    """Base class of every error the SDK raises on purpose."""


class PlanError(MsodeError, ValueError):
    """A `.plan` bundle is missing, corrupted, hostile, or of an unsupported format version."""


class InputError(MsodeError, ValueError):
    """An input image, array, affine or argument cannot be registered as given."""


class BackendUnavailable(MsodeError, RuntimeError):
    """A requested device or network backend is not available on this machine."""
