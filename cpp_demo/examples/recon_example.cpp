// A reconstruction program's view: two volumes it holds in memory, each on its own scanner grid, are
// registered in-process with msode::Registrar::register_native (no files, no Python).
//
//   recon_example PLAN [--repeat N] [--out DIR] [--concurrent]
//
// The fixed volume is an oblique, anisotropic acquisition (0.9 x 0.9 x 3 mm, tilted 12 degrees about x
// and 8 degrees about z); the moving one a 1.5 mm isotropic acquisition stored x-flipped (LAS), of the
// same smooth phantom moved by a known rigid motion (6 degrees about z, (4, -3, 2) mm). Prints the
// recovered RAS matrix against the truth and the latency of each call (the first call of a Registrar
// also warms TorchScript up). --out DIR also writes the files `msode register` writes. --concurrent also
// runs the pair from two threads at once on the same Registrar and prints the largest difference.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "msode/registrar.hpp"

namespace {

constexpr double kPi = 3.14159265358979323846;

msode::Mat4 rotation_z(double deg, const double centre[3], const double shift[3]) {
  const double a = deg * kPi / 180.0, c = std::cos(a), s = std::sin(a);
  msode::Mat4 m = msode::mat4_identity();
  m[0] = c;
  m[1] = -s;
  m[4] = s;
  m[5] = c;
  for (int r = 0; r < 3; ++r) {  // about `centre`, then shifted: q = R (p - c) + c + t
    double rc = 0;
    for (int k = 0; k < 3; ++k) rc += m[4 * r + k] * centre[k];
    m[4 * r + 3] = centre[r] - rc + shift[r];
  }
  return m;
}

// voxel -> RAS affine: direction = Rz(az) Rx(ax) diag(spacing), field-of-view centre at `centre`
msode::Mat4 scanner_affine(const double spacing[3], double ax_deg, double az_deg, const std::int64_t dims[3],
                           const double centre[3], bool flip_x) {
  const double ax = ax_deg * kPi / 180.0, az = az_deg * kPi / 180.0;
  const double rx[3][3] = {{1, 0, 0}, {0, std::cos(ax), -std::sin(ax)}, {0, std::sin(ax), std::cos(ax)}};
  const double rz[3][3] = {{std::cos(az), -std::sin(az), 0}, {std::sin(az), std::cos(az), 0}, {0, 0, 1}};
  msode::Mat4 m = msode::mat4_identity();
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) {
      double v = 0;
      for (int k = 0; k < 3; ++k) v += rz[r][k] * rx[k][c];
      m[4 * r + c] = v * spacing[c] * (flip_x && c == 0 ? -1.0 : 1.0);
    }
  for (int r = 0; r < 3; ++r) {
    double mid = 0;
    for (int c = 0; c < 3; ++c) mid += m[4 * r + c] * (double(dims[c]) - 1) / 2.0;
    m[4 * r + 3] = centre[r] - mid;
  }
  return m;
}

// A smooth textured "head": Gaussian blobs inside an ellipsoid, sampled at world points.
struct Phantom {
  std::vector<double> mu, sigma, amp;
  Phantom() {
    unsigned state = 12345u;
    auto rnd = [&] {
      state = state * 1664525u + 1013904223u;
      return double(state >> 8) / double(1u << 24);
    };
    while (amp.size() < 160) {
      double u[3] = {2 * rnd() - 1, 2 * rnd() - 1, 2 * rnd() - 1};
      if (u[0] * u[0] + u[1] * u[1] + u[2] * u[2] >= 1) continue;
      mu.insert(mu.end(), {u[0] * 54.0, u[1] * 66.0, u[2] * 48.0});
      sigma.push_back(5.0 + 6.0 * rnd());
      amp.push_back(0.2 + 0.8 * rnd());
    }
  }
  float value(const double p[3]) const {
    const double r = p[0] * p[0] / (60.0 * 60.0) + p[1] * p[1] / (75.0 * 75.0) + p[2] * p[2] / (55.0 * 55.0);
    const double env = 1.0 / (1.0 + std::exp(-(1.0 - r) * 12.0));
    if (env < 1e-6) return 0.0f;
    double s = 0;
    for (std::size_t b = 0; b < amp.size(); ++b) {
      const double dx = p[0] - mu[3 * b], dy = p[1] - mu[3 * b + 1], dz = p[2] - mu[3 * b + 2];
      const double d2 = (dx * dx + dy * dy + dz * dz) / (sigma[b] * sigma[b]);
      if (d2 < 25.0) s += amp[b] * std::exp(-0.5 * d2);
    }
    return float(1000.0 * (0.3 * env + 0.5 * s * env));  // scanner-like units
  }
};

// Samples the phantom on a grid; `world_map` (optional) maps each voxel's world point first.
std::vector<float> render(const Phantom& ph, const std::int64_t dims[3], const msode::Mat4& a,
                          const msode::Mat4* world_map) {
  std::vector<float> v(std::size_t(dims[0] * dims[1] * dims[2]));
  std::size_t i = 0;
  for (std::int64_t z = 0; z < dims[2]; ++z)
    for (std::int64_t y = 0; y < dims[1]; ++y)
      for (std::int64_t x = 0; x < dims[0]; ++x, ++i) {
        double p[3], q[3];
        for (int r = 0; r < 3; ++r) p[r] = a[4 * r] * x + a[4 * r + 1] * y + a[4 * r + 2] * z + a[4 * r + 3];
        if (world_map) {
          for (int r = 0; r < 3; ++r)
            q[r] = (*world_map)[4 * r] * p[0] + (*world_map)[4 * r + 1] * p[1] + (*world_map)[4 * r + 2] * p[2] +
                   (*world_map)[4 * r + 3];
          v[i] = ph.value(q);
        } else {
          v[i] = ph.value(p);
        }
      }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: recon_example PLAN [--repeat N] [--out DIR] [--concurrent]\n");
    return 2;
  }
  int repeat = 2;
  std::string out_dir;
  bool concurrent = false;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--concurrent") {
      concurrent = true;
    } else if (a == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else {
      std::fprintf(stderr, "recon_example: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  try {
    msode::Registrar reg(argv[1]);  // once per process; then one register_native per pair

    // What the reconstruction holds: voxel buffers (x fastest) and their voxel -> RAS affines.
    const Phantom phantom;
    const double centre[3] = {0.0, 0.0, 0.0}, shift[3] = {4.0, -3.0, 2.0};
    const msode::Mat4 truth = rotation_z(6.0, centre, shift);  // fixed point p -> moving point
    const std::int64_t fdims[3] = {150, 170, 40}, mdims[3] = {88, 104, 80};
    const double fsp[3] = {0.9, 0.9, 3.0}, msp[3] = {1.5, 1.5, 1.5};
    const double fcentre[3] = {1.0, -2.0, 3.0}, mcentre[3] = {-2.0, 1.0, 0.0};
    const msode::Mat4 faff = scanner_affine(fsp, 12.0, 8.0, fdims, fcentre, false);
    const msode::Mat4 maff = scanner_affine(msp, 0.0, 0.0, mdims, mcentre, true);
    const std::vector<float> moving_buf = render(phantom, mdims, maff, nullptr);  // moving(q) = O(q)
    const std::vector<float> fixed_buf = render(phantom, fdims, faff, &truth);    // fixed(p) = O(truth p)

    msode::ImageView moving{moving_buf.data(), {mdims[0], mdims[1], mdims[2]}, maff};
    msode::ImageView fixed{fixed_buf.data(), {fdims[0], fdims[1], fdims[2]}, faff};
    msode::WorldResult r;
    std::vector<double> ms;
    for (int k = 0; k < repeat; ++k) {
      r = reg.register_native(moving, fixed);
      ms.push_back(r.timings.total_ms);
    }
    // how far the recovered map is from the truth, at points of a 60 mm ball around the centre
    double err = 0;
    for (int k = 0; k < 8; ++k) {
      const double p[3] = {(k & 1) ? 35.0 : -35.0, (k & 2) ? 35.0 : -35.0, (k & 4) ? 35.0 : -35.0};
      double d2 = 0;
      for (int i = 0; i < 3; ++i) {
        double a = r.matrix_ras[4 * i + 3], b = truth[4 * i + 3];
        for (int j = 0; j < 3; ++j) {
          a += r.matrix_ras[4 * i + j] * p[j];
          b += truth[4 * i + j] * p[j];
        }
        d2 += (a - b) * (a - b);
      }
      err = std::max(err, std::sqrt(d2));
    }
    std::printf("plan %s (%s): translation (mm) %.3f %.3f %.3f; truth %.3f %.3f %.3f; max corner error %.3f mm;",
                reg.plan_name().c_str(), reg.plan_kind().c_str(), r.matrix_ras[3], r.matrix_ras[7], r.matrix_ras[11],
                truth[3], truth[7], truth[11], err);
    std::printf(" register_native ms");
    for (double v : ms) std::printf(" %.1f", v);
    std::printf("\n");
    if (concurrent) {  // one Registrar, two threads at once: the same result as the sequential call
      msode::WorldResult both[2];
      std::string errors[2];
      std::vector<std::thread> threads;
      for (int t = 0; t < 2; ++t)
        threads.emplace_back([&, t] {
          try {
            both[t] = reg.register_native(moving, fixed);
          } catch (const std::exception& e) {
            errors[t] = e.what();
          }
        });
      for (auto& th : threads) th.join();
      for (const auto& e : errors)
        if (!e.empty()) throw msode::Error("concurrent call failed: " + e);
      double diff = 0;
      for (int t = 0; t < 2; ++t) {
        for (std::size_t i = 0; i < r.warped.size(); ++i)
          diff = std::max(diff, double(std::fabs(both[t].warped[i] - r.warped[i])));
        for (std::size_t i = 0; i < r.displacement.size(); ++i)
          diff = std::max(diff, double(std::fabs(both[t].displacement[i] - r.displacement[i])));
        for (int i = 0; i < 16; ++i) diff = std::max(diff, std::fabs(both[t].matrix_ras[i] - r.matrix_ras[i]));
      }
      std::printf("concurrent: two threads, max difference to the sequential call %.3g\n", diff);
    }
    if (!out_dir.empty()) msode::save_outputs(out_dir, r, reg.report_info());
    return 0;
  } catch (const msode::InputError& e) {
    std::fprintf(stderr, "recon_example: input error: %s\n", e.what());
    return 1;
  } catch (const msode::Error& e) {
    std::fprintf(stderr, "recon_example: error: %s\n", e.what());
    return 1;
  }
}
