// msode C++ embedding: the one exception type every msode function throws on bad input.
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

}  // namespace msode
