// msode C++ embedding: register two volumes with the plan's whole-loop TorchScript module
// (`registrar.ts`), in-process, as scanner reconstruction software would.
//
// High level (what the Python SDK's Registrar.register takes and returns): images on any grid.
//
//   msode::Registrar reg("rigid_bspline.plan");               // opens, verifies, loads (throws)
//   msode::ImageView mov{moving_buf, {X1, Y1, Z1}, moving_affine};  // float32, x fastest, voxel->RAS
//   msode::ImageView fix{fixed_buf, {X2, Y2, Z2}, fixed_affine};
//   msode::WorldResult r = reg.register_native(mov, fix);     // throws msode::InputError / msode::Error
//   r.warped;        // X2*Y2*Z2: moving on the fixed grid, original intensities
//   r.displacement;  // 3*X2*Y2*Z2, LPS mm (ITK/ANTs): fixed point p -> moving point p + d(p)
//   r.matrix_ras;    // 4x4, RAS mm, fixed point -> moving point (the rigid part)
//   msode::save_outputs("out", r, reg.report_info());          // the files `msode register` writes
//
// registrar.ts's register_native method does the resampling onto the model grid, the normalisation,
// every stage and the mapping back exactly as the Python SDK (the C++ side only checks inputs, wraps
// buffers and copies results). See image.hpp for the input limits and result layouts.
//
// Low level (unchanged): volumes already on the plan's model grid, normalised, voxel-space results:
//
//   auto res = reg.register_(moving, fixed, {120, 120, 80}, {2.0, 2.0, 2.0});
//   res.warped; res.displacement; res.matrix; res.timings.forward_ms;
//
// Inputs of register_ are float32 buffers in NIfTI order (x fastest: index = x + X*(y + Y*z)) on the model grid
// (`model_grid()`), intensities already normalised to [0, 1] (`normalise_percentile` does it like the
// Python SDK). Conventions of the outputs (voxel space of the model grid, pull-back):
//   * warped(x) = moving(x + d(x)), same layout as the inputs;
//   * displacement: 3 components, component-major (d_x for all voxels, then d_y, then d_z), each in
//     NIfTI order, in voxels of the model grid (channel 0 = x/W, 1 = y/H, 2 = z/D);
//   * matrix: 4x4 row-major, homogeneous voxel coordinates (x, y, z, 1) of the fixed grid -> moving
//     grid, the rigid (affine) part of the transform.
// Thread safety: a Registrar is immutable after construction; register_ and register_native may be
// called concurrently.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "msode/error.hpp"
#include "msode/image.hpp"
#include "msode/outputs.hpp"

namespace msode {

struct ModelGrid {
  std::array<std::int64_t, 3> shape_xyz{};
  std::array<double, 3> spacing_xyz_mm{};
  std::string orientation;  // "RAS"
  std::string centre;       // "fov" or "com" (how the Python SDK centres inputs on the grid)
};

struct Normalization {
  std::string method;     // "percentile"
  double low = 0.5;       // percent of all voxels mapped to 0
  double high = 99.5;     // percent of all voxels mapped to 1
};

struct Timings {
  double input_ms = 0;    // validation and copies into tensors
  double forward_ms = 0;  // registrar.ts forward
  double output_ms = 0;   // checks and copies out of tensors
  double total_ms = 0;
};

struct Result {
  std::array<std::int64_t, 3> dims_xyz{};
  std::vector<float> warped;        // X*Y*Z
  std::vector<float> displacement;  // 3*X*Y*Z, component-major, voxels
  std::array<double, 16> matrix{};  // row-major, voxel space, fixed -> moving
  Timings timings;
};

class Registrar {
 public:
  /// Opens `plan_path`, checks the zip and the manifest, verifies the sha256 of every listed member
  /// and loads `registrar.ts` onto `device` ("cpu", or "cuda[:n]" with a CUDA build of LibTorch).
  /// `jit_optimize`: let TorchScript's profiling executor optimise the graph. Off by default: the
  /// optimised plan is built during the first two calls and costs far more than it saves unless the
  /// Registrar serves many pairs (measured on the analytic plan, 48x56x40 grid, 1 CPU thread: ~0.3 s
  /// CPU per call without; 2.2 s and 3.6 s for the first two calls with, then ~0.3 s).
  explicit Registrar(const std::string& plan_path, const std::string& device = "cpu",
                     bool jit_optimize = false);
  ~Registrar();
  Registrar(Registrar&&) noexcept;
  Registrar& operator=(Registrar&&) noexcept;
  Registrar(const Registrar&) = delete;
  Registrar& operator=(const Registrar&) = delete;

  const std::string& plan_name() const;
  /// What the plan's networks are: "analytic", the builder's training.kind, else "trained".
  const std::string& plan_kind() const;
  std::vector<std::string> stage_names() const;  // in plan order
  const std::string& device() const;             // as given to the constructor
  /// True when registrar.ts has the register_native method (plans built before it do not).
  bool has_register_native() const;
  /// The plan fields of report.json (timings are the caller's).
  ReportInfo report_info() const;
  const std::string& plan_path() const;
  bool analytic() const;  // the plan's "networks" are gradient-descent stand-ins, not trained
  /// The rigid-stage initialiser the plan asks for ("none", "moments", "multistart"); registrar.ts
  /// runs it exactly as the Python SDK does (information only).
  const std::string& rigid_init() const;
  const ModelGrid& model_grid() const;
  const Normalization& normalization() const;
  std::vector<std::string> member_names() const;  // manifest-listed members (sorted)
  double load_ms() const;                         // time the constructor took

  /// Throws msode::Error unless dims equal the model grid's shape and spacing matches within 1e-3 mm.
  void check_grid(std::array<std::int64_t, 3> dims_xyz, std::array<double, 3> spacing_mm,
                  const std::string& what = "input") const;

  /// Registers `moving` onto `fixed` (see the header comment for layouts and conventions).
  Result register_(const float* moving, const float* fixed, std::array<std::int64_t, 3> dims_xyz,
                   std::array<double, 3> spacing_mm) const;

  /// Registers `moving` onto `fixed`, each on its own native grid (any size, spacing, orientation), as
  /// the Python SDK's Registrar.register does: both are checked against the SDK's input limits first
  /// (msode::validate_image; msode::InputError naming "moving" or "fixed"), then registrar.ts's
  /// register_native resamples, normalises, registers and maps the result back onto the fixed grid.
  /// Images with no intensity range or nothing inside the model grid raise msode::InputError too.
  /// Throws msode::Error when the plan's registrar.ts predates register_native. `measure`: also compute
  /// the report's measures on the model grid (WorldResult::measures: similarity per stage, folding,
  /// fields of view; a few tens of ms) where the plan's registrar.ts can (has_measures()).
  WorldResult register_native(const ImageView& moving, const ImageView& fixed, bool measure = false) const;
  /// True when registrar.ts computes the report's measures (plans built before them do not).
  bool has_measures() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Percentile intensity normalisation as the Python SDK does it: the `low`/`high` percentiles of all
/// voxels (linear interpolation between order statistics, as numpy.percentile) map to 0 and 1, the
/// result is clipped to [0, 1]; a degenerate percentile range falls back to min/max. Throws for
/// constant images and NaN/Inf voxels.
std::vector<float> normalise_percentile(const float* data, std::size_t n, double low, double high);

enum class Interpolation { Linear, Nearest };

/// Resamples `volume` (any intensities, e.g. the original moving image, or a label map with
/// Nearest) with a Result's displacement: out(x) = volume(x + d(x)), zero outside, as
/// torch.grid_sample(align_corners=True, padding_mode="zeros") does.
std::vector<float> warp_volume(const float* volume, std::array<std::int64_t, 3> dims_xyz,
                               const std::vector<float>& displacement,
                               Interpolation mode = Interpolation::Linear);

/// Number of CPU threads LibTorch uses for intra-op parallelism (at::set_num_threads).
void set_num_threads(int n);

}  // namespace msode
