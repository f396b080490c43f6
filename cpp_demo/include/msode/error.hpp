// msode C++ embedding: the exception types every msode function throws on bad input.
#pragma once

#include <stdexcept>
#include <string>

namespace msode {

/// Every error the library raises on purpose (missing or corrupted plan, bad image, grid mismatch,
/// TorchScript failure). `what()` is a one-line, human-readable message naming the file/member.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A bad input image or argument (the Python SDK's msode_sdk.errors.InputError): unreadable, truncated
/// or lying NIfTI files, images outside the input limits (image.hpp), NaN voxels, constant images,
/// degenerate affines, images with nothing inside the model grid. The message starts with the input's
/// name ("moving", "fixed (fixed.nii.gz)", ...).
class InputError : public Error {
 public:
  using Error::Error;
};

}  // namespace msode
