// Images on their native grids: in-memory views, the SDK's input limits, world-space results.
//
// An image is float32 voxels in NIfTI order (x fastest: index = x + X*(y + Y*z)), its dims (X, Y, Z)
// and its 4x4 voxel -> RAS mm affine (row-major), exactly what nibabel calls `img.affine`. The limits
// and the one-line messages mirror the Python SDK's msode_sdk/io.py (load_image, _validate_affine,
// _check_shape, _check_world_extent, _validate_array); every failure is an msode::InputError whose
// message starts with the image's name. Torch-free (library msode_core).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "msode/error.hpp"

namespace msode {

// --- the SDK's input limits (msode_sdk/io.py) ---------------------------------------------------
constexpr std::int64_t kMaxVoxels = std::int64_t(512) * 512 * 1024;  // 2**28 voxels per image
constexpr std::int64_t kMaxDim = 4096;                               // voxels along any axis
constexpr double kSpacingMinMm = 1e-3;                               // voxel size (affine column norms)
constexpr double kSpacingMaxMm = 100.0;
constexpr double kMaxCondition = 1e6;        // of the affine's direction matrix
constexpr double kWorldLimitMm = 1e5;        // every voxel centre within +-100 m of the origin
constexpr double kMaxAbsIntensity = 1e30;    // |voxel value|
constexpr double kMinRelativeRange = 1e-6;   // (max - min) / max(|min|, |max|): below it ~constant

using Mat4 = std::array<double, 16>;  // row-major 4x4

Mat4 mat4_identity();
Mat4 mat4_mul(const Mat4& a, const Mat4& b);
/// Inverse by Gauss-Jordan with partial pivoting; throws msode::Error for singular matrices.
Mat4 mat4_inverse(const Mat4& a);
/// A RAS mm point map as the same map in LPS mm (ITK/ANTs): diag(-1, -1, 1, 1) M diag(-1, -1, 1, 1).
Mat4 ras_to_lps(const Mat4& m);

/// A read-only view of a 3-D image in memory (the caller keeps the buffer alive).
struct ImageView {
  const float* data = nullptr;          // X*Y*Z floats, x fastest
  std::array<std::int64_t, 3> dims{};   // X, Y, Z
  Mat4 affine{};                        // voxel (i, j, k, 1) -> RAS mm, row-major
};

/// Summary of an intensity pass (what _validate_array looks at), computed on the values before they
/// are rounded to float32.
struct IntensityStats {
  std::int64_t nonfinite = 0;
  double lo = 0, hi = 0;  // of the finite values
  std::int64_t count = 0;
  void add(double v);
};

// --- the SDK's checks, each throwing msode::InputError("<name>: ...") ----------------------------
/// Shape (trailing singleton axes dropped) -> the 3-D shape: 3-D, >= 2 voxels per axis, <= kMaxDim
/// per axis and <= kMaxVoxels in all. Checked on header values before anything is allocated.
std::array<std::int64_t, 3> check_shape(const std::vector<std::int64_t>& shape, const std::string& name);
/// Finite, last row [0, 0, 0, 1], voxel sizes in [kSpacingMinMm, kSpacingMaxMm], direction matrix
/// condition number <= kMaxCondition.
void validate_affine(const Mat4& affine, const std::string& name);
/// Every voxel centre within kWorldLimitMm of the world origin.
void check_world_extent(const std::array<std::int64_t, 3>& dims, const Mat4& affine, const std::string& name);
/// No NaN/Inf, |values| <= kMaxAbsIntensity, not constant / nearly constant.
void check_intensities(const IntensityStats& stats, const std::string& name);
/// All of the above for an in-memory image (msode_sdk.io.load_image((array, affine), name)).
void validate_image(const ImageView& image, const std::string& name);

/// Voxel sizes (column norms of the affine's 3x3 part), mm.
std::array<double, 3> voxel_sizes(const Mat4& affine);
/// Condition number (largest / smallest singular value) of a 3x3 matrix (row-major, first 3 columns of
/// the first 3 rows of `m` when given a Mat4).
double condition_number3(const std::array<double, 9>& m);

/// World-space result of Registrar::register_native (the SDK's RegistrationResult).
struct WorldTimings {
  double validate_ms = 0;  // the input checks (validate_image on both)
  double input_ms = 0;     // wrapping the buffers as tensors, copies to the device
  double register_ms = 0;  // registrar.ts register_native: resampling, normalisation, all stages,
                           // mapping back to the fixed grid
  double output_ms = 0;    // checks and copies out of tensors
  double total_ms = 0;
};

/// The SDK report's measures of a registration on the model grid (Registrar::register_native with
/// measure = true; RegistrationResult.report() in Python): present only when asked for and the plan's
/// registrar.ts computes them (register_native_measured).
struct WorldMeasures {
  bool present = false;
  std::vector<double> similarity;        // mutual information (nats): at the start, then after each stage
  double similarity_drop_warning = 0.1;  // a final value below (1 - this) x the start's deserves a warning
  bool fov_cut = false;                  // an image's field of view cuts content (fields_of_view.cut_content)
  std::vector<std::int64_t> fov_masked_stages;  // stage indices masked by the fields of view
  double content_ratio = 1.0;          // the smaller image's content over the larger's (msode_sdk.loop)
  double content_ratio_warning = 0.0;  // below it the field of view is too small to trust the result
  bool moving_content_smaller = false;
  bool has_jacobian = false;                    // a deformable stage ran
  double jacobian_min = 1.0;                    // Jacobian determinant of the map over the model grid
  double jacobian_fraction_nonpositive = 0.0;   // folding: the fraction of voxels with determinant <= 0
  /// True when one image holds too little of the other's anatomy (a small field of view).
  bool content_small() const { return present && content_ratio < content_ratio_warning; }
  /// True when the registration lowered the similarity by more than similarity_drop_warning.
  bool similarity_dropped() const {
    return present && similarity.size() > 1 &&
           similarity.back() < (1.0 - similarity_drop_warning) * similarity.front();
  }
};

struct WorldResult {
  std::array<std::int64_t, 3> dims_xyz{};  // the fixed image's grid
  Mat4 fixed_affine{};                     // its voxel -> RAS affine
  std::vector<float> warped;               // X*Y*Z, x fastest: moving on the fixed grid, original intensities
  std::vector<float> displacement;         // 3*X*Y*Z, component-major (d_x of every voxel, then d_y, d_z),
                                           // each x fastest; LPS mm, fixed point p -> moving point p + d(p)
  Mat4 matrix_ras{};                       // rigid part, RAS mm, fixed point -> moving point
  WorldTimings timings;
  WorldMeasures measures;                  // filled when asked for (register_native's `measure`)
  Mat4 matrix_lps() const { return ras_to_lps(matrix_ras); }
};

// --- message formatting as Python prints it --------------------------------------------------------
std::string py_float(double v);                           // repr(float(v))
std::string py_shape(const std::vector<std::int64_t>& s);  // "(1, 2, 3)", "(5,)"
std::string fmt_g(double v, int precision = 6);            // f"{v:.{precision}g}"

}  // namespace msode
