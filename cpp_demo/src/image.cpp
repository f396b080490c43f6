// The Python SDK's input checks (msode_sdk/io.py) for images on native grids, and 4x4 helpers.
#include "msode/image.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

namespace msode {

// --- formatting ---------------------------------------------------------------------------------

std::string fmt_g(double v, int precision) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", precision, v);
  return buf;
}

std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  // shortest digits that round-trip (as Python's repr), then Python's choice of notation
  char buf[64];
  int prec = 1;
  for (; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;  // [-]d.ddde[+-]xx
  const bool neg = s[0] == '-';
  if (neg) s = s.substr(1);
  const auto epos = s.find('e');
  const int exp10 = std::atoi(s.c_str() + epos + 1);
  std::string digits;
  for (std::size_t i = 0; i < epos; ++i)
    if (s[i] != '.') digits += s[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp10 < -4 || exp10 >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += e;
  } else if (exp10 < 0) {
    out = "0." + std::string(std::size_t(-exp10 - 1), '0') + digits;
  } else {
    const std::size_t int_len = std::size_t(exp10) + 1;
    if (digits.size() <= int_len) {
      out = digits + std::string(int_len - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, int_len) + "." + digits.substr(int_len);
    }
  }
  return neg ? "-" + out : out;
}

std::string py_shape(const std::vector<std::int64_t>& s) {
  std::string out = "(";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// --- 4x4 ------------------------------------------------------------------------------------------

Mat4 mat4_identity() {
  Mat4 m{};
  m[0] = m[5] = m[10] = m[15] = 1.0;
  return m;
}

Mat4 mat4_mul(const Mat4& a, const Mat4& b) {
  Mat4 c{};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      double s = 0;
      for (int k = 0; k < 4; ++k) s += a[4 * i + k] * b[4 * k + j];
      c[4 * i + j] = s;
    }
  return c;
}

Mat4 mat4_inverse(const Mat4& m) {
  Mat4 a = m, inv = mat4_identity();
  for (int col = 0; col < 4; ++col) {
    int piv = col;
    for (int r = col + 1; r < 4; ++r)
      if (std::fabs(a[4 * r + col]) > std::fabs(a[4 * piv + col])) piv = r;
    if (!(std::fabs(a[4 * piv + col]) > 1e-300)) throw Error("singular 4x4 matrix");
    for (int k = 0; k < 4; ++k) {
      std::swap(a[4 * col + k], a[4 * piv + k]);
      std::swap(inv[4 * col + k], inv[4 * piv + k]);
    }
    const double d = a[5 * col];
    for (int k = 0; k < 4; ++k) {
      a[4 * col + k] /= d;
      inv[4 * col + k] /= d;
    }
    for (int r = 0; r < 4; ++r) {
      if (r == col) continue;
      const double f = a[4 * r + col];
      if (f == 0) continue;
      for (int k = 0; k < 4; ++k) {
        a[4 * r + k] -= f * a[4 * col + k];
        inv[4 * r + k] -= f * inv[4 * col + k];
      }
    }
  }
  return inv;
}

Mat4 ras_to_lps(const Mat4& m) {
  // as matrix products (like numpy's diag @ m @ diag), so that zeros stay +0 in the ITK text
  Mat4 d = mat4_identity();
  d[0] = d[5] = -1.0;
  return mat4_mul(mat4_mul(d, m), d);
}

std::array<double, 3> voxel_sizes(const Mat4& a) {
  std::array<double, 3> s{};
  for (int c = 0; c < 3; ++c)
    s[c] = std::sqrt(a[c] * a[c] + a[4 + c] * a[4 + c] + a[8 + c] * a[8 + c]);
  return s;
}

namespace {

// Eigenvalues of a symmetric 3x3 matrix (cyclic Jacobi).
std::array<double, 3> sym_eigenvalues3(std::array<double, 9> a) {
  for (int sweep = 0; sweep < 64; ++sweep) {
    const double off = a[1] * a[1] + a[2] * a[2] + a[5] * a[5];
    const double diag = a[0] * a[0] + a[4] * a[4] + a[8] * a[8];
    if (!(off > 1e-36 * diag)) break;
    for (int p = 0; p < 2; ++p)
      for (int q = p + 1; q < 3; ++q) {
        const double apq = a[3 * p + q];
        if (apq == 0) continue;
        const double theta = (a[3 * q + q] - a[3 * p + p]) / (2 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < 3; ++k) {  // A <- A J (columns p, q)
          const double akp = a[3 * k + p], akq = a[3 * k + q];
          a[3 * k + p] = c * akp - s * akq;
          a[3 * k + q] = s * akp + c * akq;
        }
        for (int k = 0; k < 3; ++k) {  // A <- J^T A (rows p, q)
          const double apk = a[3 * p + k], aqk = a[3 * q + k];
          a[3 * p + k] = c * apk - s * aqk;
          a[3 * q + k] = s * apk + c * aqk;
        }
      }
  }
  return {a[0], a[4], a[8]};
}

}  // namespace

double condition_number3(const std::array<double, 9>& m) {
  std::array<double, 9> mtm{};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) mtm[3 * i + j] += m[3 * k + i] * m[3 * k + j];
  for (double v : mtm)
    if (!std::isfinite(v)) return std::numeric_limits<double>::infinity();
  auto ev = sym_eigenvalues3(mtm);
  const double hi = *std::max_element(ev.begin(), ev.end());
  const double lo = *std::min_element(ev.begin(), ev.end());
  if (!(lo > 0)) return std::numeric_limits<double>::infinity();
  return std::sqrt(hi / lo);
}

// --- the SDK's checks -----------------------------------------------------------------------------

void IntensityStats::add(double v) {
  if (!std::isfinite(v)) {
    ++nonfinite;
    return;
  }
  if (count == 0) {
    lo = hi = v;
  } else {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  ++count;
}

std::array<std::int64_t, 3> check_shape(const std::vector<std::int64_t>& header_shape, const std::string& name) {
  std::vector<std::int64_t> shape = header_shape;
  while (shape.size() > 3 && shape.back() == 1) shape.pop_back();  // (X, Y, Z, 1), as many tools write
  if (shape.size() != 3)
    throw InputError(name + ": expected a 3-D image, got " + std::to_string(shape.size()) + "-D with shape " +
                     py_shape(shape));
  if (*std::min_element(shape.begin(), shape.end()) < 0)
    throw InputError(name + ": negative dimension in shape " + py_shape(shape) + " (corrupted header?)");
  if (*std::min_element(shape.begin(), shape.end()) < 2)
    throw InputError(name + ": every axis needs at least 2 voxels, got shape " + py_shape(shape));
  const bool too_big = *std::max_element(shape.begin(), shape.end()) > kMaxDim ||
                       shape[0] * shape[1] * shape[2] > kMaxVoxels;  // each <= kMaxDim: no overflow
  if (too_big)
    throw InputError(name + ": image of shape " + py_shape(shape) + " is larger than supported (" +
                     std::to_string(kMaxDim) + " voxels per axis, " + std::to_string(kMaxVoxels) + " in all)");
  return {shape[0], shape[1], shape[2]};
}

void validate_affine(const Mat4& a, const std::string& name) {
  for (double v : a)
    if (!std::isfinite(v)) throw InputError(name + ": affine has NaN or Inf entries");
  const double last[4] = {0, 0, 0, 1};
  for (int j = 0; j < 4; ++j)
    if (!(std::fabs(a[12 + j] - last[j]) <= 1e-6 + 1e-5 * std::fabs(last[j]))) {  // np.allclose(atol=1e-6)
      throw InputError(name + ": affine's last row must be [0, 0, 0, 1], got [" + py_float(a[12]) + ", " +
                       py_float(a[13]) + ", " + py_float(a[14]) + ", " + py_float(a[15]) + "]");
    }
  const auto sp = voxel_sizes(a);
  for (double s : sp)
    if (s < kSpacingMinMm || s > kSpacingMaxMm) {
      std::string list = "[";
      for (int i = 0; i < 3; ++i) list += (i ? ", " : "") + py_float(std::strtod(fmt_g(sp[i], 6).c_str(), nullptr));
      throw InputError(name + ": voxel spacing " + list + "] mm is outside [" + py_float(kSpacingMinMm) + ", " +
                       py_float(kSpacingMaxMm) + "] mm");
    }
  std::array<double, 9> dir{};
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) dir[3 * r + c] = a[4 * r + c] / sp[c];
  const double cond = condition_number3(dir);
  if (!std::isfinite(cond) || cond > kMaxCondition)
    throw InputError(name + ": affine is singular or degenerate (condition number " + fmt_g(cond, 3) +
                     " of its direction matrix; at most " + fmt_g(kMaxCondition) + ")");
}

void check_world_extent(const std::array<std::int64_t, 3>& dims, const Mat4& a, const std::string& name) {
  double far = 0;
  for (int ci = 0; ci < 8; ++ci) {
    const double idx[3] = {(ci & 4) ? double(dims[0] - 1) : 0.0, (ci & 2) ? double(dims[1] - 1) : 0.0,
                           (ci & 1) ? double(dims[2] - 1) : 0.0};
    for (int r = 0; r < 3; ++r) {
      const double w = a[4 * r] * idx[0] + a[4 * r + 1] * idx[1] + a[4 * r + 2] * idx[2] + a[4 * r + 3];
      far = std::max(far, std::fabs(w));
    }
  }
  if (far > kWorldLimitMm)
    throw InputError(name + ": image lies " + fmt_g(far, 4) + " mm from the world origin; voxel centres must be "
                     "within " + fmt_g(kWorldLimitMm) + " mm (check the affine's translation)");
}

void check_intensities(const IntensityStats& st, const std::string& name) {
  if (st.nonfinite) throw InputError(name + ": image has " + std::to_string(st.nonfinite) + " NaN/Inf voxels");
  if (st.count == 0) throw InputError(name + ": image has no voxels");
  const double big = std::max(std::fabs(st.lo), std::fabs(st.hi));
  if (big > kMaxAbsIntensity)
    throw InputError(name + ": intensities reach " + fmt_g(big, 3) + "; at most " + fmt_g(kMaxAbsIntensity) +
                     " in magnitude is supported");
  const double lo32 = double(float(st.lo)), hi32 = double(float(st.hi));  // rounding is monotone
  if (hi32 == lo32)
    throw InputError(name + ": image is constant (all voxels = " + fmt_g(lo32) + "); nothing to register");
  if (hi32 - lo32 <= std::max(kMinRelativeRange * std::max(std::fabs(lo32), std::fabs(hi32)), 1e-30))
    throw InputError(name + ": intensity range [" + fmt_g(lo32, 9) + ", " + fmt_g(hi32, 9) +
                     "] is too narrow to normalise (nearly constant image)");
}

void validate_image(const ImageView& img, const std::string& name) {
  if (!img.data) throw InputError(name + ": null voxel buffer");
  const auto dims = check_shape({img.dims[0], img.dims[1], img.dims[2]}, name);
  validate_affine(img.affine, name);
  check_world_extent(dims, img.affine, name);
  IntensityStats st;
  const std::int64_t n = dims[0] * dims[1] * dims[2];
  for (std::int64_t i = 0; i < n; ++i) st.add(double(img.data[i]));
  check_intensities(st, name);
}

}  // namespace msode
