// msode_register PLAN MOVING.nii FIXED.nii WARPED.nii
//
// Registers MOVING onto FIXED with the plan's whole-loop TorchScript module (registrar.ts). Both
// inputs must already be on the plan's model grid (dims equal to model_grid.shape_xyz, pixdim equal to
// model_grid.spacing_xyz_mm within 1e-3 mm). Intensities are normalised like the Python SDK
// (percentiles from the manifest's normalization, mapped to [0, 1], clipped). Writes WARPED (float32,
// FIXED's header geometry) and prints one JSON line (plan, matrices, timings) on stdout. Any error:
// one line on stderr and exit status 1 (2 for bad usage).
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
#include "msode/registrar.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

const char* kUsage =
    "usage: msode_register [--device DEV] [--threads N] [--normalised-warped PATH] PLAN MOVING.nii "
    "FIXED.nii WARPED.nii\n"
    "  Registers MOVING onto FIXED (both uncompressed NIfTI-1 on the plan's model grid) with the\n"
    "  plan's registrar.ts and writes WARPED (float32, FIXED's geometry). Prints one JSON line.\n"
    "  WARPED holds MOVING's original intensities resampled with the registration's displacement.\n"
    "  --device DEV   cpu (default), cuda or cuda:N (needs a CUDA build of LibTorch)\n"
    "  --threads N    LibTorch CPU threads (default: LibTorch's choice)\n"
    "  --repeat N     run the registration N times (latency of a warm Registrar; reports each)\n"
    "  --jit-optimize let TorchScript optimise the graph (pays off only over many calls)\n"
    "  --normalised-warped PATH   also write the model's own warped output (normalised [0, 1]\n"
    "                 intensities, float32, FIXED's geometry)\n";

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

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

using Mat4 = std::array<double, 16>;

Mat4 matmul(const Mat4& a, const Mat4& b) {
  Mat4 c{};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < 4; ++k) c[4 * i + j] += a[4 * i + k] * b[4 * k + j];
  return c;
}

Mat4 inverse(Mat4 a) {  // Gauss-Jordan with partial pivoting
  Mat4 inv{};
  for (int i = 0; i < 4; ++i) inv[5 * i] = 1.0;
  for (int col = 0; col < 4; ++col) {
    int piv = col;
    for (int r = col + 1; r < 4; ++r)
      if (std::fabs(a[4 * r + col]) > std::fabs(a[4 * piv + col])) piv = r;
    if (std::fabs(a[4 * piv + col]) < 1e-12) throw msode::Error("singular image affine");
    for (int k = 0; k < 4; ++k) {
      std::swap(a[4 * col + k], a[4 * piv + k]);
      std::swap(inv[4 * col + k], inv[4 * piv + k]);
    }
    double d = a[5 * col];
    for (int k = 0; k < 4; ++k) { a[4 * col + k] /= d; inv[4 * col + k] /= d; }
    for (int r = 0; r < 4; ++r) {
      if (r == col) continue;
      double f = a[4 * r + col];
      for (int k = 0; k < 4; ++k) { a[4 * r + k] -= f * a[4 * col + k]; inv[4 * r + k] -= f * inv[4 * col + k]; }
    }
  }
  return inv;
}

std::string mat_json(const Mat4& m) {
  std::ostringstream os;
  os << std::setprecision(10) << "[";
  for (int i = 0; i < 4; ++i) {
    os << (i ? ",[" : "[");
    for (int j = 0; j < 4; ++j) os << (j ? "," : "") << (std::fabs(m[4 * i + j]) < 1e-300 ? 0.0 : m[4 * i + j]);
    os << "]";
  }
  os << "]";
  return os.str();
}

bool ras_axis_aligned(const msode::NiftiImage& img) {
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) {
      double v = img.affine[4 * r + c];
      double scale = img.pixdim[c];
      if (r == c ? (v <= 0 || std::fabs(v - scale) > 1e-3 * scale) : std::fabs(v) > 1e-3 * scale)
        return false;
    }
  return true;
}

int run(int argc, char** argv) {
  std::string device = "cpu";
  int threads = 0;
  std::string normalised_path;
  int repeat = 1;
  bool jit_optimize = false;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--device" && i + 1 < argc) {
      device = argv[++i];
    } else if (a == "--threads" && i + 1 < argc) {
      char* end = nullptr;
      long n = std::strtol(argv[++i], &end, 10);
      if (!end || *end || n < 1 || n > 1024) {
        std::cerr << "msode_register: error: --threads needs a positive integer\n";
        return 2;
      }
      threads = int(n);
    } else if (a == "--repeat" && i + 1 < argc) {
      char* end = nullptr;
      long n = std::strtol(argv[++i], &end, 10);
      if (!end || *end || n < 1 || n > 1000) {
        std::cerr << "msode_register: error: --repeat needs an integer in [1, 1000]\n";
        return 2;
      }
      repeat = int(n);
    } else if (a == "--jit-optimize") {
      jit_optimize = true;
    } else if ((a == "--normalised-warped" || a == "--normalized-warped") && i + 1 < argc) {
      normalised_path = argv[++i];
    } else if (a.size() > 1 && a[0] == '-' && a != "-") {
      std::cerr << "msode_register: error: unknown option " << a << "\n" << kUsage;
      return 2;
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 4) {
    std::cerr << "msode_register: error: expected 4 arguments, got " << pos.size() << "\n" << kUsage;
    return 2;
  }
  const std::string &plan_path = pos[0], &moving_path = pos[1], &fixed_path = pos[2],
                    &warped_path = pos[3];
  auto t_start = Clock::now();
  if (threads) msode::set_num_threads(threads);

  msode::Registrar reg(plan_path, device, jit_optimize);
  const double load_ms = reg.load_ms();

  auto t_read = Clock::now();
  msode::NiftiImage moving = msode::read_nifti(moving_path, "moving");
  msode::NiftiImage fixed = msode::read_nifti(fixed_path, "fixed");
  reg.check_grid(moving.dims, moving.pixdim, "moving " + moving_path);
  reg.check_grid(fixed.dims, fixed.pixdim, "fixed " + fixed_path);
  for (const auto* img : {&moving, &fixed})
    if (!ras_axis_aligned(*img))
      std::cerr << "msode_register: warning: " << img->path << " is not axis-aligned RAS ("
                << img->affine_source << "); the model grid is, so results are in voxel space of "
                << "this grid\n";
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
  for (int r = 0; r < repeat; ++r) {
    res = reg.register_(mov_n.data(), fix_n.data(), moving.dims, moving.pixdim);
    runs.push_back(res.timings.total_ms);
  }

  auto t_warp = Clock::now();
  std::vector<float> out = msode::warp_volume(moving.data.data(), moving.dims, res.displacement);
  const double warp_ms = ms_since(t_warp);

  auto t_write = Clock::now();
  msode::write_nifti_float32_like(warped_path, fixed, out, "msode_register warped");
  if (!normalised_path.empty())
    msode::write_nifti_float32_like(normalised_path, fixed, res.warped,
                                    "msode_register warped (normalised [0,1])");
  const double write_ms = ms_since(t_write);

  // World (RAS mm) form of the voxel matrix: fixed world -> fixed voxel -> moving voxel -> world.
  Mat4 matrix_ras = matmul(matmul(moving.affine, res.matrix), inverse(fixed.affine));

  std::ostringstream js;
  js << std::fixed << std::setprecision(3);
  js << "{\"plan\":\"" << json_escape(reg.plan_name()) << "\",\"analytic_plan\":"
     << (reg.analytic() ? "true" : "false") << ",\"rigid_init\":\""
     << json_escape(reg.rigid_init()) << "\""
     << ",\"device\":\"" << json_escape(device)
     << "\",\"warped\":\"" << json_escape(warped_path) << "\",\"normalised_warped\":"
     << (normalised_path.empty() ? "null" : "\"" + json_escape(normalised_path) + "\"")
     << ",\"model_grid\":{\"shape_xyz\":["
     << res.dims_xyz[0] << "," << res.dims_xyz[1] << "," << res.dims_xyz[2] << "]}"
     << ",\"matrix_voxel\":" << mat_json(res.matrix) << ",\"matrix_ras\":" << mat_json(matrix_ras)
     << ",\"conventions\":{\"matrix_voxel\":\"fixed voxel (x,y,z,1) -> moving voxel\","
     << "\"matrix_ras\":\"fixed RAS mm -> moving RAS mm (NIfTI affines)\"}"
     << ",\"timings_ms\":{\"load_plan\":" << load_ms << ",\"read_inputs\":" << read_ms
     << ",\"normalise\":" << norm_ms << ",\"input\":" << res.timings.input_ms
     << ",\"forward\":" << res.timings.forward_ms << ",\"output\":" << res.timings.output_ms
     << ",\"register\":" << res.timings.total_ms << ",\"warp\":" << warp_ms
     << ",\"write\":" << write_ms << ",\"total\":" << ms_since(t_start) << "}";
  if (repeat > 1) {
    js << ",\"register_runs_ms\":[";
    for (std::size_t r = 0; r < runs.size(); ++r) js << (r ? "," : "") << runs[r];
    js << "]";
  }
  js << "}";
  std::cout << js.str() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "msode_register: error: " << one_line(e.what()) << std::endl;
    return 1;
  } catch (...) {
    std::cerr << "msode_register: error: unknown failure" << std::endl;
    return 1;
  }
}
