"""msode_sdk: multi-scale neural-ODE 3-D image registration at inference time.

    from msode_sdk import Registrar
    reg = Registrar.load("rigid_bspline.plan")            # bundled name or path; device/backend "auto"
    res = reg.register("moving.nii.gz", "fixed.nii.gz")  # paths, nibabel images or (array, affine)
    res.save("out/")                                       # warped, ITK transform, displacement, report

Conventions: NIfTI arrays (X, Y, Z), world RAS mm; tensors (N, C, D, H, W) with D = z; files for
ITK/ANTs in LPS mm. See the README and each function's docstring.
"""

from .errors import BackendUnavailable, InputError, MsodeError, OutputError, PlanError, RegistrationError, ResourceError
from .registrar import Registrar, RegistrationResult, bundled_plans

__version__ = "0.1.0"

__all__ = [
    "Registrar",
    "RegistrationResult",
    "bundled_plans",
    "MsodeError",
    "PlanError",
    "InputError",
    "BackendUnavailable",
    "ResourceError",
    "RegistrationError",
    "OutputError",
    "__version__",
]
