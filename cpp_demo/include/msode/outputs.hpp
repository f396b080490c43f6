// The files `msode register` (the Python CLI) writes, from a WorldResult: warped.nii.gz,
// transform.tfm, displacement.nii.gz, report.json. Torch-free (library msode_core).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "msode/image.hpp"

namespace msode {

/// What report.json says besides the result itself (Registrar::report_info() fills the plan fields).
struct ReportInfo {
  std::string plan;                 // the plan's manifest name
  std::string plan_kind;            // analytic | trained | the builder's training.kind
  bool analytic_plan = false;
  std::string device = "cpu";
  std::string backend = "libtorch";  // registrar.ts run by LibTorch (C++)
  std::vector<std::string> stages;  // the plan's stage names, in order
  std::string model_grid_domain;    // "model grid 120x120x80 at 2x2x2 mm" (where the measures are taken)
  std::vector<std::pair<std::string, double>> timings_s;  // in order
};

/// The ITK text transform msode_sdk.io.write_itk_affine writes (AffineTransform_double_3_3, LPS,
/// fixed -> moving, parameters with 17 significant digits).
std::string itk_affine_text(const Mat4& matrix_ras);

/// report.json (the keys of the SDK's RegistrationResult.report() that apply: plan, analytic_plan,
/// plan_kind, backend, device, timings_s, stages, matrix_ras, conventions and, when the result carries
/// measures, jacobian_determinant, similarity, fields_of_view; no nfe: registrar.ts does not return it).
std::string report_json(const WorldResult& result, const ReportInfo& info);

/// Throws msode::InputError when `out_dir` cannot become an output directory (it, or an ancestor, is a
/// file). Cheap; the CLI calls it before any work.
void check_output_dir(const std::string& out_dir);

struct OutputPaths {
  std::string dir, warped, transform, displacement, report;
};

/// Writes warped.nii.gz (float32, the fixed grid, qform/sform code 1), transform.tfm,
/// displacement.nii.gz ((X, Y, Z, 1, 3) float32, intent 1007, LPS mm) and report.json into `out_dir`.
/// All four are written into a temporary sibling folder first; a new `out_dir` is then that folder
/// renamed, an existing one gets the four files moved in (other files in it are left alone). On any
/// failure nothing is left behind (the temporary folder, files already moved in, and folders this call
/// created are removed) and msode::Error is thrown. Adds a "write" entry (seconds spent writing the
/// images and the transform) to the report's timings.
OutputPaths save_outputs(const std::string& out_dir, const WorldResult& result, ReportInfo info);

std::string json_escape(const std::string& s);
std::string json_number(double v);  // 17 significant digits; null for NaN/Inf

}  // namespace msode
