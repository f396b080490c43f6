// Fused trilinear warp kernels of msode: plain CUDA C++, no torch headers (see warp_kernels.cu).
//
// Conventions (those of msode_sdk/transforms.py and msode_sdk/warp/_reference.py):
//  * a grid axis of n voxels and spacing s (mm) has voxel i at (i - (n - 1) / 2) * s mm: points are
//    mm, centre-relative, ordered (x, y, z); tensors are (N, C, D, H, W) with D = z, H = y, W = x;
//  * a source point p (mm) is sampled at voxel index ((p / half + 1) / 2) * (n - 1), half =
//    max((n - 1) s, 1e-12) / 2 (Grid.normalise followed by grid_sample's align_corners=True
//    unnormalisation, reproduced operation for operation), trilinear, zero outside the volume;
//  * the sampled map is phi(x) = A (x + u(x)), A an optional 3x4 affine (rigid) matrix and u an
//    optional B-spline FFD (evaluated from its control lattice) or dense field (trilinear, border).
//
// Every array is contiguous; the batch stride of a transform parameter is 0 when it broadcasts.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace msode {

enum ScalarKind : int { kFloat32 = 0, kFloat16 = 1 };
enum DeformKind : int { kNoDeform = 0, kBSpline = 1, kDense = 2 };

// One axis of a voxel grid.
struct Axis {
  int64_t n;      // voxels
  float spacing;  // mm
  float centre;   // (n - 1) / 2
  float half;     // max((n - 1) * spacing, 1e-12) / 2, computed in double then rounded (as Grid.normalise)
};

// Everything one launch needs. Axes are ordered x, y, z.
struct WarpParams {
  int64_t batch;  // N of the output
  Axis out[3];    // the output (fixed-side) grid

  // affine: (Nm, 3, 4) row-major float32, or nullptr for the identity
  const float* matrix;
  int64_t matrix_bstride;  // 12 or 0

  int32_t deform;  // DeformKind
  int32_t src_kind;  // ScalarKind of src and dst (warp only)

  // B-spline: coefficients (Nc, 3, cz, cy, cx) float32 (mm); control k at (k - (nc - 1) / 2) * cs
  const float* coeffs;
  int64_t coeff_bstride;
  int64_t ctrl_n[3];
  float ctrl_spacing[3];
  float ctrl_centre[3];

  // dense: field (Nf, 3, fD, fH, fW) float32 (mm) on the grid field_axis, border-extended
  const float* field;
  int64_t field_bstride;
  Axis field_axis[3];

  // source volume (N, C, D, H, W) of src_kind (warp only)
  const void* src;
  int64_t channels;
  Axis src_axis[3];

  // output: (N, C, D', H', W') of src_kind (warp) or (N, 3, D', H', W') float32 (displacement, mm)
  void* dst;
};

// Launch on `stream`. Return an empty string, or a description of invalid parameters (nothing is
// launched then). Launch errors are left for the caller to read with cudaGetLastError().
const char* launch_warp(const WarpParams& p, cudaStream_t stream);
const char* launch_displacement(const WarpParams& p, cudaStream_t stream);

}  // namespace msode
