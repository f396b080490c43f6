// Embedding msode in another program: register two in-memory volumes on a plan's model grid, from
// two threads sharing one Registrar (as a reconstruction pipeline serving several series would).
//
//   embed_example PLAN        -> prints the recovered voxel translation of a shifted synthetic blob
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "msode/registrar.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: embed_example PLAN\n");
    return 2;
  }
  try {
    msode::Registrar reg(argv[1]);  // verifies the plan, loads registrar.ts
    const auto& g = reg.model_grid();
    const std::int64_t X = g.shape_xyz[0], Y = g.shape_xyz[1], Z = g.shape_xyz[2];
    // Two smooth blobs; the moving one is shifted by (+2, -1, +1) voxels.
    auto blob = [&](double cx, double cy, double cz) {
      std::vector<float> v(std::size_t(X * Y * Z));
      for (std::int64_t z = 0; z < Z; ++z)
        for (std::int64_t y = 0; y < Y; ++y)
          for (std::int64_t x = 0; x < X; ++x) {
            double r2 = std::pow((x - cx) / (0.2 * X), 2) + std::pow((y - cy) / (0.2 * Y), 2) +
                        std::pow((z - cz) / (0.2 * Z), 2);
            v[std::size_t(x + X * (y + Y * z))] = float(std::exp(-0.5 * r2));
          }
      return v;
    };
    const double cx = (X - 1) / 2.0, cy = (Y - 1) / 2.0, cz = (Z - 1) / 2.0;
    std::vector<float> fixed = blob(cx, cy, cz), moving = blob(cx + 2, cy - 1, cz + 1);
    // raw intensities -> [0, 1] exactly as the SDK does (here already in [0, 1], shown for the API)
    const auto& n = reg.normalization();
    fixed = msode::normalise_percentile(fixed.data(), fixed.size(), n.low, n.high);
    moving = msode::normalise_percentile(moving.data(), moving.size(), n.low, n.high);

    msode::Result results[2];
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t)
      threads.emplace_back([&, t] {
        results[t] = reg.register_(moving.data(), fixed.data(), g.shape_xyz, g.spacing_xyz_mm);
      });
    for (auto& th : threads) th.join();

    double diff = 0;
    for (std::size_t i = 0; i < results[0].warped.size(); ++i)
      diff = std::max(diff, double(std::fabs(results[0].warped[i] - results[1].warped[i])));
    const auto& r = results[0];
    std::printf("plan %s: translation (voxels) %.3f %.3f %.3f; forward %.1f ms; "
                "max |thread0 - thread1| %.3g\n",
                reg.plan_name().c_str(), r.matrix[3], r.matrix[7], r.matrix[11],
                r.timings.forward_ms, diff);
    return 0;
  } catch (const msode::Error& e) {
    std::fprintf(stderr, "embed_example: error: %s\n", e.what());
    return 1;
  }
}
