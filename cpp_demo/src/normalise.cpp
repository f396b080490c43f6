// Intensity normalisation as the Python SDK does it (msode_sdk.io.normalise_intensity).
#include <algorithm>
#include <cmath>
#include <vector>

#include "msode/registrar.hpp"

namespace msode {
namespace {

// numpy.percentile(a, p) with the default 'linear' method, on a scratch copy (reordered).
double percentile(std::vector<float>& a, double p) {
  const std::size_t n = a.size();
  double rank = p / 100.0 * double(n - 1);
  std::size_t lo = std::size_t(std::floor(rank));
  if (lo >= n - 1) {
    return *std::max_element(a.begin(), a.end());
  }
  double t = rank - double(lo);
  std::nth_element(a.begin(), a.begin() + std::ptrdiff_t(lo), a.end());
  double x0 = a[lo];
  double x1 = *std::min_element(a.begin() + std::ptrdiff_t(lo) + 1, a.end());
  double diff = x1 - x0;
  return t >= 0.5 ? x1 - diff * (1.0 - t) : x0 + diff * t;
}

}  // namespace

std::vector<float> normalise_percentile(const float* data, std::size_t n, double low, double high) {
  if (n == 0) throw Error("normalisation: empty image");
  if (!(low >= 0.0 && high <= 100.0 && low < high))
    throw Error("normalisation: invalid percentiles " + std::to_string(low) + ", " +
                std::to_string(high));
  std::vector<float> scratch(data, data + n);
  for (float v : scratch)
    if (!std::isfinite(v)) throw Error("normalisation: image has NaN/Inf voxels");
  double lo = percentile(scratch, low);
  double hi = percentile(scratch, high);
  if (!(hi > lo)) {  // very sparse images: fall back to the full range
    auto mm = std::minmax_element(scratch.begin(), scratch.end());
    lo = *mm.first;
    hi = *mm.second;
  }
  if (!(hi > lo))
    throw Error("normalisation: image is constant (all voxels = " + std::to_string(lo) +
                "); nothing to register");
  const float lo_f = float(lo), range_f = float(hi - lo);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    float v = (data[i] - lo_f) / range_f;
    out[i] = std::min(1.0f, std::max(0.0f, v));
  }
  return out;
}

}  // namespace msode
