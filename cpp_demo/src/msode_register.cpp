// msode_register: the Python CLI's `msode register` in C++ (LibTorch, no Python).
//
//   msode_register PLAN MOVING FIXED -o OUTDIR [options]
//       Native grids (any size, spacing, orientation; NIfTI-1/2, .nii or .nii.gz, either byte order).
//       Writes OUTDIR/{warped.nii.gz, transform.tfm, displacement.nii.gz, report.json} as `msode
//       register` does, through a temporary sibling folder renamed at the end; prints one JSON line.
//   msode_register PLAN MOVING FIXED WARPED.nii [options]
//       Model-grid mode (the original program, kept for existing callers): both inputs already on the
//       plan's model grid; writes WARPED only and prints a JSON line with voxel and RAS matrices.
//
// Any error: one line `msode_register: error: ...` on stderr, exit status 1 (2 for bad usage), and no
// output (no OUTDIR, no temporary folder, no WARPED).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "msode/nifti.hpp"
#include "msode/outputs.hpp"
#include "msode/registrar.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

const char* kUsage =
    "usage: msode_register PLAN MOVING FIXED -o OUTDIR [options]\n"
    "       msode_register PLAN MOVING FIXED WARPED.nii [options]   (inputs on the plan's model grid)\n"
    "  Registers MOVING onto FIXED with the plan's registrar.ts (LibTorch, no Python).\n"
    "  With -o: images on any grid (NIfTI-1/2, .nii/.nii.gz, any orientation, byte order and numeric\n"
    "  type); writes OUTDIR/warped.nii.gz (MOVING on FIXED's grid, original intensities),\n"
    "  transform.tfm (ITK, LPS, rigid part), displacement.nii.gz (ITK/ANTs, LPS mm) and report.json,\n"
    "  exactly the files `msode register` writes, or nothing at all on failure. Prints one JSON line.\n"
    "  With a 4th argument instead: the original model-grid mode (writes WARPED only).\n"
    "  -o, --output DIR   output folder (created; an existing one gets the four files replaced)\n"
    "  --device DEV       cpu (default), cuda or cuda:N (needs a CUDA build of LibTorch)\n"
    "  --threads N        LibTorch CPU threads (default: LibTorch's choice)\n"
    "  --repeat N         run the registration N times (latency of a warm Registrar; reports each)\n"
    "  --jit-optimize     let TorchScript optimise the graph (pays off only over many calls)\n"
    "  -q, --quiet        no warnings on stderr (errors only)\n"
    "  --normalised-warped PATH   model-grid mode only: also write the model's own warped output\n"
    "                     (normalised [0, 1] intensities, float32, FIXED's geometry)\n";

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

std::string fixed3(double v) {  // Python's f"{v:.3f}"
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

std::string mat_json(const msode::Mat4& m) {
  std::string out = "[";
  for (int i = 0; i < 4; ++i) {
    out += i ? ",[" : "[";
    for (int j = 0; j < 4; ++j) out += (j ? "," : "") + msode::json_number(m[4 * i + j]);
    out += "]";
  }
  return out + "]";
}

bool ras_axis_aligned(const msode::NiftiImage& img) {
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) {
      double v = img.affine[4 * r + c];
      double scale = img.pixdim[c];
      if (r == c ? (v <= 0 || std::fabs(v - scale) > 1e-3 * scale) : std::fabs(v) > 1e-3 * scale) return false;
    }
  return true;
}

struct Options {
  std::string device = "cpu";
  int threads = 0;
  int repeat = 1;
  bool jit_optimize = false;
  bool quiet = false;
  std::string output;
  std::string normalised_path;
  std::vector<std::string> pos;
};

// --- native grids: the files `msode register` writes -------------------------------------------

int run_native(const Options& o) {
  const std::string &plan_path = o.pos[0], &moving_path = o.pos[1], &fixed_path = o.pos[2];
  auto t_start = Clock::now();
  msode::check_output_dir(o.output);  // before any work, as the SDK's CLI
  if (o.threads) msode::set_num_threads(o.threads);

  auto t_read = Clock::now();  // both inputs read and checked before the plan is loaded
  msode::NiftiImage moving = msode::read_nifti(moving_path, "moving");
  msode::NiftiImage fixed = msode::read_nifti(fixed_path, "fixed");
  const double read_ms = ms_since(t_read);

  msode::Registrar reg(plan_path, o.device, o.jit_optimize);
  if (!reg.has_register_native())
    throw msode::Error("plan '" + plan_path + "': this plan's registrar.ts predates register_native; rebuild it "
                       "with msode_export.scripted.add_registrar_ts");
  msode::WorldResult res;
  std::vector<double> runs;
  for (int r = 0; r < o.repeat; ++r) {
    res = reg.register_native(moving.view(), fixed.view(), /*measure=*/true);
    runs.push_back(res.timings.total_ms / 1000.0);
  }
  msode::ReportInfo info = reg.report_info();
  info.timings_s = {{"load_plan", reg.load_ms() / 1000.0},
                    {"load", read_ms / 1000.0},
                    {"validate", res.timings.validate_ms / 1000.0},
                    {"register", res.timings.register_ms / 1000.0},
                    {"output", (res.timings.input_ms + res.timings.output_ms) / 1000.0},
                    {"total", ms_since(t_start) / 1000.0}};
  auto t_save = Clock::now();
  msode::OutputPaths paths = msode::save_outputs(o.output, res, info);
  const double save_ms = ms_since(t_save);
  if (!o.quiet && !res.measures.present)
    std::cerr << "msode_register: warning: plan '" << reg.plan_name() << "': its registrar.ts predates the report's "
              << "measures (similarity, folding, fields of view); report.json leaves them out (rebuild it with "
              << "msode_export.scripted.add_registrar_ts)\n";
  if (!o.quiet && res.measures.content_small())  // as the Python SDK warns (Registrar.register_prepared)
    std::cerr << "msode_register: warning: the " << (res.measures.moving_content_smaller ? "moving" : "fixed")
              << " image's field of view holds " << std::lround(100 * res.measures.content_ratio)
              << " % of the anatomy the other image holds (model-grid voxels with content): a field of view this "
                 "small registers unreliably; check the result\n";
  if (!o.quiet && res.measures.similarity_dropped())  // as the Python SDK warns (RegistrationResult.report)
    std::cerr << "msode_register: warning: the registration lowered the images' mutual information ("
              << fixed3(res.measures.similarity.front()) << " at the start, "
              << fixed3(res.measures.similarity.back())
              << " after it): check the result (inputs of the same anatomy? orientation headers?)\n";
  if (reg.analytic() && !o.quiet)  // after success: a failure prints exactly one line
    std::cerr << "msode_register: warning: plan '" << reg.plan_name()
              << "' is ANALYTIC: its 'networks' are SSD gradient descent, not trained models\n";

  std::ostringstream js;
  js << "{\"outputs\":{\"warped\":\"" << msode::json_escape(paths.warped) << "\",\"transform\":\""
     << msode::json_escape(paths.transform) << "\",\"displacement\":\"" << msode::json_escape(paths.displacement)
     << "\",\"report\":\"" << msode::json_escape(paths.report) << "\"},\"timings_s\":{";
  for (std::size_t i = 0; i < info.timings_s.size(); ++i)
    js << (i ? "," : "") << "\"" << info.timings_s[i].first << "\":" << msode::json_number(info.timings_s[i].second);
  js << ",\"save\":" << msode::json_number(save_ms / 1000.0) << "}";
  if (o.repeat > 1) {
    js << ",\"register_runs_s\":[";
    for (std::size_t r = 0; r < runs.size(); ++r) js << (r ? "," : "") << msode::json_number(runs[r]);
    js << "]";
  }
  js << ",\"plan\":\"" << msode::json_escape(reg.plan_name()) << "\",\"plan_kind\":\""
     << msode::json_escape(reg.plan_kind()) << "\",\"analytic_plan\":" << (reg.analytic() ? "true" : "false")
     << ",\"device\":\"" << msode::json_escape(info.device) << "\",\"matrix_ras\":" << mat_json(res.matrix_ras)
     << "}";
  std::cout << js.str() << std::endl;
  return 0;
}

// --- model-grid mode (the original program) -----------------------------------------------------

int run_model_grid(const Options& o) {
  const std::string &plan_path = o.pos[0], &moving_path = o.pos[1], &fixed_path = o.pos[2],
                    &warped_path = o.pos[3];
  auto t_start = Clock::now();
  if (o.threads) msode::set_num_threads(o.threads);

  msode::Registrar reg(plan_path, o.device, o.jit_optimize);
  const double load_ms = reg.load_ms();

  auto t_read = Clock::now();
  msode::NiftiImage moving = msode::read_nifti(moving_path, "moving");
  msode::NiftiImage fixed = msode::read_nifti(fixed_path, "fixed");
  reg.check_grid(moving.dims, moving.pixdim, "moving " + moving_path);
  reg.check_grid(fixed.dims, fixed.pixdim, "fixed " + fixed_path);
  if (!o.quiet)
    for (const auto* img : {&moving, &fixed})
      if (!ras_axis_aligned(*img))
        std::cerr << "msode_register: warning: " << img->path << " is not axis-aligned RAS (" << img->affine_source
                  << "); the model grid is, so results are in voxel space of this grid\n";
  const double read_ms = ms_since(t_read);

  auto t_norm = Clock::now();
  const auto& norm = reg.normalization();
  const std::size_t n = moving.data.size();
  std::vector<float> mov_n, fix_n;
  try {
    mov_n = msode::normalise_percentile(moving.data.data(), n, norm.low, norm.high);
  } catch (const msode::Error& e) {
    throw msode::Error("moving " + moving_path + ": " + e.what());
  }
  try {
    fix_n = msode::normalise_percentile(fixed.data.data(), n, norm.low, norm.high);
  } catch (const msode::Error& e) {
    throw msode::Error("fixed " + fixed_path + ": " + e.what());
  }
  const double norm_ms = ms_since(t_norm);

  msode::Result res;
  std::vector<double> runs;
  for (int r = 0; r < o.repeat; ++r) {
    res = reg.register_(mov_n.data(), fix_n.data(), moving.dims, moving.pixdim);
    runs.push_back(res.timings.total_ms);
  }

  auto t_warp = Clock::now();
  std::vector<float> out = msode::warp_volume(moving.data.data(), moving.dims, res.displacement);
  const double warp_ms = ms_since(t_warp);

  auto t_write = Clock::now();
  msode::write_nifti_float32_like(warped_path, fixed, out, "msode_register warped");
  if (!o.normalised_path.empty()) {
    try {
      msode::write_nifti_float32_like(o.normalised_path, fixed, res.warped, "msode_register warped (normalised)");
    } catch (...) {
      std::remove(warped_path.c_str());
      throw;
    }
  }
  const double write_ms = ms_since(t_write);

  // World (RAS mm) form of the voxel matrix: fixed world -> fixed voxel -> moving voxel -> world.
  msode::Mat4 matrix_ras =
      msode::mat4_mul(msode::mat4_mul(moving.affine, res.matrix), msode::mat4_inverse(fixed.affine));

  std::ostringstream js;
  js << std::fixed << std::setprecision(3);
  js << "{\"plan\":\"" << msode::json_escape(reg.plan_name()) << "\",\"analytic_plan\":"
     << (reg.analytic() ? "true" : "false") << ",\"rigid_init\":\"" << msode::json_escape(reg.rigid_init()) << "\""
     << ",\"device\":\"" << msode::json_escape(o.device) << "\",\"warped\":\"" << msode::json_escape(warped_path)
     << "\",\"normalised_warped\":"
     << (o.normalised_path.empty() ? "null" : "\"" + msode::json_escape(o.normalised_path) + "\"")
     << ",\"model_grid\":{\"shape_xyz\":[" << res.dims_xyz[0] << "," << res.dims_xyz[1] << "," << res.dims_xyz[2]
     << "]}"
     << ",\"matrix_voxel\":" << mat_json(res.matrix) << ",\"matrix_ras\":" << mat_json(matrix_ras)
     << ",\"conventions\":{\"matrix_voxel\":\"fixed voxel (x,y,z,1) -> moving voxel\","
     << "\"matrix_ras\":\"fixed RAS mm -> moving RAS mm (NIfTI affines)\"}"
     << ",\"timings_ms\":{\"load_plan\":" << load_ms << ",\"read_inputs\":" << read_ms << ",\"normalise\":" << norm_ms
     << ",\"input\":" << res.timings.input_ms << ",\"forward\":" << res.timings.forward_ms
     << ",\"output\":" << res.timings.output_ms << ",\"register\":" << res.timings.total_ms << ",\"warp\":" << warp_ms
     << ",\"write\":" << write_ms << ",\"total\":" << ms_since(t_start) << "}";
  if (o.repeat > 1) {
    js << ",\"register_runs_ms\":[";
    for (std::size_t r = 0; r < runs.size(); ++r) js << (r ? "," : "") << runs[r];
    js << "]";
  }
  js << "}";
  std::cout << js.str() << std::endl;
  return 0;
}

int usage_error(const std::string& msg) {
  std::cerr << "msode_register: error: " << msg
            << " (usage: msode_register PLAN MOVING FIXED -o OUTDIR [options]; see --help)\n";
  return 2;
}

int run(int argc, char** argv) {
  Options o;
  auto int_arg = [&](int& i, const std::string& a, long lo, long hi, int& dst) {
    if (i + 1 >= argc) return false;
    char* end = nullptr;
    long n = std::strtol(argv[++i], &end, 10);
    if (!end || *end || n < lo || n > hi) throw std::invalid_argument(a);
    dst = int(n);
    return true;
  };
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      const bool has_value = i + 1 < argc;
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      } else if ((a == "-o" || a == "--output") && has_value) {
        o.output = argv[++i];
        if (o.output.empty()) return usage_error("-o needs a folder");
      } else if (a == "--device" && has_value) {
        o.device = argv[++i];
      } else if (a == "--threads" && has_value) {
        int_arg(i, a, 1, 1024, o.threads);
      } else if (a == "--repeat" && has_value) {
        int_arg(i, a, 1, 1000, o.repeat);
      } else if (a == "--jit-optimize") {
        o.jit_optimize = true;
      } else if (a == "-q" || a == "--quiet") {
        o.quiet = true;
      } else if ((a == "--normalised-warped" || a == "--normalized-warped") && has_value) {
        o.normalised_path = argv[++i];
      } else if (a.size() > 1 && a[0] == '-' && a != "-") {
        return usage_error("unknown option or missing value: " + a);
      } else {
        o.pos.push_back(a);
      }
    }
  } catch (const std::invalid_argument& e) {
    return usage_error(std::string(e.what()) == "--threads" ? "--threads needs an integer in [1, 1024]"
                                                            : "--repeat needs an integer in [1, 1000]");
  }
  if (!o.output.empty()) {
    if (o.pos.size() != 3)
      return usage_error("with -o, expected PLAN MOVING FIXED (3 arguments), got " + std::to_string(o.pos.size()));
    if (!o.normalised_path.empty()) return usage_error("--normalised-warped is for the model-grid mode only");
    return run_native(o);
  }
  if (o.pos.size() == 4) return run_model_grid(o);
  return usage_error("expected PLAN MOVING FIXED -o OUTDIR (or PLAN MOVING FIXED WARPED.nii), got " +
                     std::to_string(o.pos.size()) + " arguments");
}

}  // namespace

int main(int argc, char** argv) {
  // exit status as `msode register`: 2 for what the inputs, plan or outputs cause (msode::Error, its
  // InputError), 1 for anything else (a bug or the system: bad_alloc, ...)
  try {
    return run(argc, argv);
  } catch (const msode::Error& e) {
    std::cerr << "msode_register: error: " << one_line(e.what()) << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "msode_register: internal error: " << one_line(e.what()) << std::endl;
    return 1;
  } catch (...) {
    std::cerr << "msode_register: error: unknown failure" << std::endl;
    return 1;
  }
}
