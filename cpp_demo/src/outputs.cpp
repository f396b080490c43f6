// warped.nii.gz, transform.tfm, displacement.nii.gz and report.json, written as `msode register` writes
// them, into a temporary sibling folder that is renamed at the end.
#include "msode/outputs.hpp"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "msode/error.hpp"
#include "msode/nifti.hpp"

namespace msode {

namespace fs = std::filesystem;

// the displacement field's float noise compresses by ~10 % at level 1, for ~10x the write time (msode_sdk.io)
constexpr int kDisplacementGzipLevel = 0;

std::string json_escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  return out;
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  if (v == 0) return "0.0";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

std::string itk_affine_text(const Mat4& matrix_ras) {
  const Mat4 m = ras_to_lps(matrix_ras);
  std::string params;
  char buf[40];
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) {
      std::snprintf(buf, sizeof buf, "%.17g", m[4 * r + c]);
      params += (params.empty() ? "" : " ") + std::string(buf);
    }
  for (int r = 0; r < 3; ++r) {
    std::snprintf(buf, sizeof buf, "%.17g", m[4 * r + 3]);
    params += " " + std::string(buf);
  }
  return "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\nParameters: " + params +
         "\nFixedParameters: 0 0 0\n";
}

std::string report_json(const WorldResult& r, const ReportInfo& info) {
  std::ostringstream js;
  js << "{\n  \"plan\": \"" << json_escape(info.plan) << "\",\n  \"analytic_plan\": "
     << (info.analytic_plan ? "true" : "false") << ",\n  \"plan_kind\": \"" << json_escape(info.plan_kind)
     << "\",\n  \"backend\": \"" << json_escape(info.backend) << "\",\n  \"providers\": [],\n  \"device\": \""
     << json_escape(info.device) << "\",\n  \"program\": \"msode_register (C++, LibTorch)\",\n  \"timings_s\": {";
  for (std::size_t i = 0; i < info.timings_s.size(); ++i)
    js << (i ? "," : "") << "\n    \"" << json_escape(info.timings_s[i].first)
       << "\": " << json_number(info.timings_s[i].second);
  js << "\n  },\n  \"stages\": [";
  for (std::size_t i = 0; i < info.stages.size(); ++i)
    js << (i ? ", " : "") << "{\"name\": \"" << json_escape(info.stages[i]) << "\"}";
  js << "],\n  \"fixed_shape_xyz\": [" << r.dims_xyz[0] << ", " << r.dims_xyz[1] << ", " << r.dims_xyz[2]
     << "],\n  \"matrix_ras\": [";
  for (int i = 0; i < 4; ++i) {
    js << (i ? ",\n    [" : "\n    [");
    for (int j = 0; j < 4; ++j) js << (j ? ", " : "") << json_number(r.matrix_ras[4 * i + j]);
    js << "]";
  }
  js << "\n  ]";
  const WorldMeasures& ms = r.measures;
  if (ms.present) {  // as RegistrationResult.report(): values of similarity rounded to 4 decimals
    if (ms.has_jacobian)
      js << ",\n  \"jacobian_determinant\": {\"domain\": \"" << json_escape(info.model_grid_domain)
         << "\", \"min\": " << json_number(ms.jacobian_min)
         << ", \"fraction_nonpositive\": " << json_number(ms.jacobian_fraction_nonpositive) << "}";
    js << ",\n  \"similarity\": {\"metric\": \"mutual information, nats, 32 bins, intensities normalised to [0, 1], "
          "every 3rd voxel of the model grid; 'start': the images' centres aligned, then after each stage\"";
    for (std::size_t i = 0; i < ms.similarity.size(); ++i) {
      const std::string name = i == 0 ? "start" : (i - 1 < info.stages.size() ? info.stages[i - 1] : "stage" + std::to_string(i));
      js << ", \"" << json_escape(name) << "\": " << json_number(std::round(ms.similarity[i] * 1e4) / 1e4);
    }
    js << "},\n  \"fields_of_view\": {\"cut_content\": " << (ms.fov_cut ? "true" : "false") << ", \"masked_stages\": [";
    for (std::size_t i = 0; i < ms.fov_masked_stages.size(); ++i) {
      const auto k = std::size_t(ms.fov_masked_stages[i]);
      js << (i ? ", " : "") << "\"" << json_escape(k < info.stages.size() ? info.stages[k] : std::to_string(k)) << "\"";
    }
    js << "], \"content_ratio\": " << json_number(std::round(ms.content_ratio * 1e3) / 1e3) << "}";
  }
  js << ",\n  \"conventions\": {\n"
        "    \"matrix\": \"RAS mm, fixed point -> moving point\",\n"
        "    \"displacement\": \"LPS mm (ITK/ANTs), fixed point p -> moving point p + d(p)\",\n"
        "    \"transform.tfm\": \"ITK AffineTransform, LPS, fixed -> moving (rigid part)\"\n  }\n}\n";
  return js.str();
}

namespace {

fs::path clean(const std::string& out_dir) {
  fs::path out(out_dir);
  while (out.has_filename() == false && out.has_parent_path() && out != out.root_path()) out = out.parent_path();
  return out;
}

}  // namespace

void check_output_dir(const std::string& out_dir) {
  if (out_dir.empty()) throw InputError("output path is empty");
  const fs::path out = clean(out_dir);
  std::error_code ec;
  for (fs::path d = out; !d.empty(); d = d.parent_path()) {
    auto st = fs::status(d, ec);
    if (fs::exists(st)) {
      if (!fs::is_directory(st))
        throw InputError(d == out ? "output path " + out.string() + " exists and is not a directory"
                                  : "output path " + out.string() + ": " + d.string() + " is not a directory");
      break;
    }
    if (d == d.parent_path()) break;
  }
}

OutputPaths save_outputs(const std::string& out_dir, const WorldResult& r, ReportInfo info) {
  using Clock = std::chrono::steady_clock;
  check_output_dir(out_dir);
  const fs::path out = clean(out_dir);
  const std::int64_t n = r.dims_xyz[0] * r.dims_xyz[1] * r.dims_xyz[2];
  if (std::int64_t(r.warped.size()) != n || std::int64_t(r.displacement.size()) != 3 * n)
    throw Error("save_outputs: the result's buffers do not match its dims");

  fs::path parent = out.parent_path();
  if (parent.empty()) parent = ".";
  std::vector<fs::path> created;  // folders this call created, outermost first
  std::error_code ec;
  for (fs::path d = parent; !d.empty() && !fs::exists(d, ec); d = d.parent_path()) {
    created.insert(created.begin(), d);
    if (d == d.parent_path()) break;
  }
  auto remove_created = [&] {  // its own error code: the caller's still holds the reason to report
    std::error_code ignored;
    for (auto it = created.rbegin(); it != created.rend(); ++it) fs::remove(*it, ignored);  // only if empty
  };
  fs::create_directories(parent, ec);
  if (ec) {
    remove_created();
    throw Error("cannot create output directory " + out.string() + ": " + ec.message());
  }
  std::random_device rd;
  const fs::path tmp = parent / ("." + out.filename().string() + ".part-" + std::to_string(::getpid()) + "-" +
                                 std::to_string(rd() % 100000000));
  fs::create_directory(tmp, ec);
  if (ec) {
    remove_created();
    throw Error("cannot create output directory " + out.string() + ": " + ec.message());
  }
  const char* names[4] = {"warped.nii.gz", "transform.tfm", "displacement.nii.gz", "report.json"};
  std::vector<fs::path> replaced;
  bool renamed_dir = false;
  try {
    auto t0 = Clock::now();
    write_nifti_float32((tmp / names[0]).string(), {r.dims_xyz[0], r.dims_xyz[1], r.dims_xyz[2]}, r.fixed_affine,
                        r.warped.data(), 0, "", "msode warped");
    {
      std::ofstream f(tmp / names[1], std::ios::binary);
      f << itk_affine_text(r.matrix_ras);
      f.flush();
      if (!f) throw Error("write failed: " + (tmp / names[1]).string());
    }
    write_nifti_float32((tmp / names[2]).string(), {r.dims_xyz[0], r.dims_xyz[1], r.dims_xyz[2], 1, 3},
                        r.fixed_affine, r.displacement.data(), 1007, "msode_disp", "msode displacement (LPS mm)",
                        kDisplacementGzipLevel);
    info.timings_s.emplace_back("write", std::chrono::duration<double>(Clock::now() - t0).count());
    {
      std::ofstream f(tmp / names[3], std::ios::binary);
      f << report_json(r, info);
      f.flush();
      if (!f) throw Error("write failed: " + (tmp / names[3]).string());
    }
    if (!fs::exists(out, ec)) {
      fs::rename(tmp, out, ec);
      renamed_dir = !ec;
    }
    if (!renamed_dir) {  // an existing folder: move the four files in, replacing earlier ones
      for (const char* nm : names) {
        fs::rename(tmp / nm, out / nm, ec);
        if (ec) throw Error("cannot move " + std::string(nm) + " into place: " + ec.message());
        replaced.push_back(out / nm);
      }
      fs::remove(tmp, ec);
    }
  } catch (const std::exception& e) {
    for (const auto& p : replaced) fs::remove(p, ec);
    fs::remove_all(renamed_dir ? out : tmp, ec);
    remove_created();
    std::string why = e.what();
    throw Error("cannot write results to " + out.string() + ": " + why + "; nothing was left behind");
  }
  OutputPaths paths;
  paths.dir = out.string();
  paths.warped = (out / names[0]).string();
  paths.transform = (out / names[1]).string();
  paths.displacement = (out / names[2]).string();
  paths.report = (out / names[3]).string();
  return paths;
}

}  // namespace msode
