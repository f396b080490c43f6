// Fused trilinear warp kernels of msode (no torch headers: `nvcc -c` alone checks this file).
//
// Each thread owns one output voxel x of one batch element and computes, in registers:
//   1. x in mm (centre-relative) from its index on the output grid;
//   2. the deformation u(x): nothing, a cubic B-spline FFD from its 4x4x4 control support, or a
//      dense displacement field sampled trilinearly with border extension;
//   3. the affine part (a 3x4 matrix, the rigid stage): phi(x) = A (x + u(x));
//   4. either the trilinear sample of the source volume at phi(x) for every channel (zeros outside,
//      blending towards zero within the last voxel exactly as grid_sample(padding_mode='zeros',
//      align_corners=True)), or the displacement phi(x) - x in mm.
// No sampling grid is ever written to memory. Arithmetic is fp32 whatever the volume type (fp16
// volumes are read and written as fp16 and accumulated in fp32).
//
// The semantics are those of msode_sdk/warp/_reference.py; the floating-point operations follow the
// reference's order where it matters (voxel coordinates, Grid.normalise, the align_corners
// unnormalisation, the eight corner weights and their accumulation order of PyTorch's
// grid_sampler_3d kernel), so fp32 results agree to rounding.
//
// Per-voxel math is __host__ __device__: building with -DMSODE_WARP_HOST_TEST adds a host entry
// point (msode_warp_host) that runs the very same functions on the CPU, which is how the math is
// checked on machines without a GPU (tests/test_cuda_warp.py).
#include "warp_kernels.cuh"

#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace msode {
namespace {

#define MSODE_HD __host__ __device__ __forceinline__

// ------------------------------------------------------------------------------ loads and stores

MSODE_HD float load(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

MSODE_HD float load(const __half* p) {
#ifdef __CUDA_ARCH__
  return __half2float(__ldg(p));
#else
  return __half2float(*p);
#endif
}

MSODE_HD void store(float* p, float v) { *p = v; }
MSODE_HD void store(__half* p, float v) { *p = __float2half_rn(v); }

MSODE_HD int64_t clamp_index(int64_t k, int64_t n) { return k < 0 ? 0 : (k >= n ? n - 1 : k); }

// ----------------------------------------------------------------------------------- coordinates

// mm coordinate of voxel i: (arange(n) - (n - 1) / 2) * spacing, in fp32 as transforms.Grid does.
MSODE_HD float voxel_coord(int64_t i, const Axis& a) {
  return (static_cast<float>(i) - a.centre) * a.spacing;
}

// mm -> continuous voxel index: Grid.normalise (p / half) then grid_sample's align_corners=True
// unnormalisation ((g + 1) / 2) * (n - 1), operation for operation.
MSODE_HD float source_index(float p, const Axis& a) {
  const float g = p / a.half;
  return ((g + 1.f) / 2.f) * static_cast<float>(a.n - 1);
}

// grid_sample's border padding: clip to [0, n - 1] (NaN -> 0, as fmaxf does in PyTorch's kernel).
MSODE_HD float clip_index(float i, const Axis& a) {
  return fminf(static_cast<float>(a.n - 1), fmaxf(i, 0.f));
}

// ----------------------------------------------------------------------------- cubic B-spline

// transforms.bspline_kernel: B3(a), a = |u| (support |u| < 2, partition of unity).
MSODE_HD float bspline3(float a) {
  if (a < 1.f) return (0.6666667f - a * a) + 0.5f * a * a * a;
  const float t = fmaxf(2.f - a, 0.f);
  return t * t * t / 6.f;
}

// The four control points supporting position x (mm) along one axis: returns the first index k0
// (k0 .. k0 + 3) and fills their weights B3((x - p_k) / cs), p_k = (k - (nc - 1) / 2) * cs; points
// off the lattice get weight 0 (as BSplineLattice.displacement_at).
MSODE_HD int64_t bspline_axis(float x, int64_t nc, float cs, float cc, float w[4]) {
  const float u = x / cs + cc;  // position in control-point units
  if (!(fabsf(u) < 1.0e7f)) {   // far off the lattice (or not finite): no support
    w[0] = w[1] = w[2] = w[3] = 0.f;
    return 0;
  }
  const int64_t k0 = static_cast<int64_t>(floorf(u)) - 1;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t k = k0 + m;
    const float pk = (static_cast<float>(k) - cc) * cs;
    const float a = fabsf((x - pk) / cs);
    w[m] = (k >= 0 && k < nc) ? bspline3(a) : 0.f;
  }
  return k0;
}

// u(x) of the B-spline FFD; `c` points at this batch element's (3, cz, cy, cx) coefficients.
// Contracted x first, then y, then z (the order of BSplineLattice.displacement_on).
MSODE_HD void bspline_displacement(const WarpParams& p, const float* c, float x, float y, float z, float u[3]) {
  float wx[4], wy[4], wz[4];
  const int64_t cx = p.ctrl_n[0], cy = p.ctrl_n[1], cz = p.ctrl_n[2];
  const int64_t kx0 = bspline_axis(x, cx, p.ctrl_spacing[0], p.ctrl_centre[0], wx);
  const int64_t ky0 = bspline_axis(y, cy, p.ctrl_spacing[1], p.ctrl_centre[1], wy);
  const int64_t kz0 = bspline_axis(z, cz, p.ctrl_spacing[2], p.ctrl_centre[2], wz);
  const int64_t comp = cx * cy * cz;  // stride between the x, y, z components
  int64_t ix[4];
#pragma unroll
  for (int m = 0; m < 4; ++m) ix[m] = clamp_index(kx0 + m, cx);
  float u0 = 0.f, u1 = 0.f, u2 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t kz = clamp_index(kz0 + i, cz);
    float s0 = 0.f, s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t ky = clamp_index(ky0 + j, cy);
      const float* row = c + (kz * cy + ky) * cx;
      float r0 = 0.f, r1 = 0.f, r2 = 0.f;
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        r0 += load(row + ix[m]) * wx[m];
        r1 += load(row + comp + ix[m]) * wx[m];
        r2 += load(row + 2 * comp + ix[m]) * wx[m];
      }
      s0 += r0 * wy[j];
      s1 += r1 * wy[j];
      s2 += r2 * wy[j];
    }
    u0 += s0 * wz[i];
    u1 += s1 * wz[i];
    u2 += s2 * wz[i];
  }
  u[0] = u0;
  u[1] = u1;
  u[2] = u2;
}

// ------------------------------------------------------------------------------ trilinear sampling

// The eight corners of continuous index (ix, iy, iz), in PyTorch's grid_sampler_3d order
// tnw, tne, tsw, tse, bnw, bne, bsw, bse (t/b: z0/z1, n/s: y0/y1, w/e: x0/x1), with its weights.
struct Corners {
  int64_t x0, y0, z0;
  float w[8];
};

MSODE_HD Corners corners(float ix, float iy, float iz) {
  Corners k;
  k.x0 = static_cast<int64_t>(floorf(ix));
  k.y0 = static_cast<int64_t>(floorf(iy));
  k.z0 = static_cast<int64_t>(floorf(iz));
  const float ex1 = static_cast<float>(k.x0 + 1) - ix, ex0 = ix - static_cast<float>(k.x0);
  const float ey1 = static_cast<float>(k.y0 + 1) - iy, ey0 = iy - static_cast<float>(k.y0);
  const float ez1 = static_cast<float>(k.z0 + 1) - iz, ez0 = iz - static_cast<float>(k.z0);
  k.w[0] = ex1 * ey1 * ez1;  // tnw (x0, y0, z0)
  k.w[1] = ex0 * ey1 * ez1;  // tne (x1, y0, z0)
  k.w[2] = ex1 * ey0 * ez1;  // tsw (x0, y1, z0)
  k.w[3] = ex0 * ey0 * ez1;  // tse (x1, y1, z0)
  k.w[4] = ex1 * ey1 * ez0;  // bnw (x0, y0, z1)
  k.w[5] = ex0 * ey1 * ez0;  // bne (x1, y0, z1)
  k.w[6] = ex1 * ey0 * ez0;  // bsw (x0, y1, z1)
  k.w[7] = ex0 * ey0 * ez0;  // bse (x1, y1, z1)
  return k;
}

// Trilinear sample of every channel of `src` (C, D, H, W) at mm point (px, py, pz), zeros outside;
// writes C values to dst[c * dst_cstride].
template <typename T>
MSODE_HD void sample_zeros(const WarpParams& p, const T* src, T* dst, int64_t dst_cstride, float px, float py,
                           float pz) {
  const Axis& ax = p.src_axis[0];
  const Axis& ay = p.src_axis[1];
  const Axis& az = p.src_axis[2];
  const int64_t W = ax.n, H = ay.n, D = az.n;
  const int64_t C = p.channels;
  const float ix = source_index(px, ax);
  const float iy = source_index(py, ay);
  const float iz = source_index(pz, az);
  // All eight corners outside (or a non-finite index): exactly zero, as grid_sample gives.
  if (!(ix > -1.f && ix < static_cast<float>(W) && iy > -1.f && iy < static_cast<float>(H) && iz > -1.f &&
        iz < static_cast<float>(D))) {
    for (int64_t ch = 0; ch < C; ++ch) store(dst + ch * dst_cstride, 0.f);
    return;
  }
  const Corners k = corners(ix, iy, iz);
  const bool vx0 = k.x0 >= 0, vx1 = k.x0 + 1 < W;
  const bool vy0 = k.y0 >= 0, vy1 = k.y0 + 1 < H;
  const bool vz0 = k.z0 >= 0, vz1 = k.z0 + 1 < D;
  const bool v[8] = {vz0 && vy0 && vx0, vz0 && vy0 && vx1, vz0 && vy1 && vx0, vz0 && vy1 && vx1,
                     vz1 && vy0 && vx0, vz1 && vy0 && vx1, vz1 && vy1 && vx0, vz1 && vy1 && vx1};
  const int64_t base = (k.z0 * H + k.y0) * W + k.x0;  // may be negative: only valid corners are read
  const int64_t off[8] = {base, base + 1, base + W, base + W + 1,
                          base + H * W, base + H * W + 1, base + H * W + W, base + H * W + W + 1};
  const int64_t cstride = D * H * W;
  for (int64_t ch = 0; ch < C; ++ch) {
    const T* s = src + ch * cstride;
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (v[q]) acc += load(s + off[q]) * k.w[q];
    }
    store(dst + ch * dst_cstride, acc);
  }
}

// Dense displacement (mm) at mm point (x, y, z): `f` points at this batch element's (3, fD, fH, fW)
// field on p.field_axis, trilinear with border extension (grid_sample padding_mode='border').
MSODE_HD void dense_displacement(const WarpParams& p, const float* f, float x, float y, float z, float u[3]) {
  const Axis& ax = p.field_axis[0];
  const Axis& ay = p.field_axis[1];
  const Axis& az = p.field_axis[2];
  const int64_t W = ax.n, H = ay.n, D = az.n;
  const float ix = clip_index(source_index(x, ax), ax);
  const float iy = clip_index(source_index(y, ay), ay);
  const float iz = clip_index(source_index(z, az), az);
  const Corners k = corners(ix, iy, iz);  // x0, y0, z0 are inside after clipping
  const bool vx1 = k.x0 + 1 < W, vy1 = k.y0 + 1 < H, vz1 = k.z0 + 1 < D;
  const bool v[8] = {true, vx1, vy1, vy1 && vx1, vz1, vz1 && vx1, vz1 && vy1, vz1 && vy1 && vx1};
  const int64_t base = (k.z0 * H + k.y0) * W + k.x0;
  const int64_t off[8] = {base, base + 1, base + W, base + W + 1,
                          base + H * W, base + H * W + 1, base + H * W + W, base + H * W + W + 1};
  const int64_t cstride = D * H * W;
#pragma unroll
  for (int comp = 0; comp < 3; ++comp) {
    const float* s = f + comp * cstride;
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (v[q]) acc += load(s + off[q]) * k.w[q];
    }
    u[comp] = acc;
  }
}

// phi(x) = A (x + u(x)): `m` points at this batch element's row-major 3x4 matrix.
MSODE_HD void apply_affine(const float* m, float& x, float& y, float& z) {
  const float px = x, py = y, pz = z;
  x = load(m + 0) * px + load(m + 1) * py + load(m + 2) * pz + load(m + 3);
  y = load(m + 4) * px + load(m + 5) * py + load(m + 6) * pz + load(m + 7);
  z = load(m + 8) * px + load(m + 9) * py + load(m + 10) * pz + load(m + 11);
}

// ------------------------------------------------------------------------------------- one voxel

template <typename T, bool AFFINE, int DEFORM, bool DISP>
MSODE_HD void process_voxel(const WarpParams& p, int64_t n, int64_t xi, int64_t yi, int64_t zi) {
  const float x = voxel_coord(xi, p.out[0]);
  const float y = voxel_coord(yi, p.out[1]);
  const float z = voxel_coord(zi, p.out[2]);
  float px = x, py = y, pz = z;
  if constexpr (DEFORM == kBSpline) {
    float u[3];
    bspline_displacement(p, p.coeffs + n * p.coeff_bstride, x, y, z, u);
    px = x + u[0];
    py = y + u[1];
    pz = z + u[2];
  } else if constexpr (DEFORM == kDense) {
    float u[3];
    dense_displacement(p, p.field + n * p.field_bstride, x, y, z, u);
    px = x + u[0];
    py = y + u[1];
    pz = z + u[2];
  }
  if constexpr (AFFINE) apply_affine(p.matrix + n * p.matrix_bstride, px, py, pz);

  const int64_t Wo = p.out[0].n, Ho = p.out[1].n, Do = p.out[2].n;
  const int64_t plane = Do * Ho * Wo;
  const int64_t o = (zi * Ho + yi) * Wo + xi;
  if constexpr (DISP) {
    float* d = static_cast<float*>(p.dst) + n * 3 * plane + o;
    d[0] = px - x;
    d[plane] = py - y;
    d[2 * plane] = pz - z;
  } else {
    const int64_t src_plane = p.src_axis[0].n * p.src_axis[1].n * p.src_axis[2].n;
    const T* src = static_cast<const T*>(p.src) + n * p.channels * src_plane;
    T* dst = static_cast<T*>(p.dst) + n * p.channels * plane + o;
    sample_zeros<T>(p, src, dst, plane, px, py, pz);
  }
}

// ------------------------------------------------------------------------------ kernel and launch

constexpr int kBlockX = 32;
constexpr int kBlockY = 8;
constexpr int64_t kMaxGridYZ = 65535;

// Block (32, 8): a warp covers 32 consecutive x of one row (coalesced stores); grid z walks the
// (batch, z) slices with a stride when there are more than 65535 of them.
template <typename T, bool AFFINE, int DEFORM, bool DISP>
__global__ void __launch_bounds__(kBlockX* kBlockY) warp_kernel(const WarpParams p) {
  const int64_t xi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t yi = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (xi >= p.out[0].n || yi >= p.out[1].n) return;
  const int64_t Do = p.out[2].n;
  const int64_t slices = Do * p.batch;
  for (int64_t s = blockIdx.z; s < slices; s += gridDim.z) {
    const int64_t n = s / Do;
    process_voxel<T, AFFINE, DEFORM, DISP>(p, n, xi, yi, s - n * Do);
  }
}

struct DeviceLaunch {
  dim3 grid, block;
  cudaStream_t stream;
  template <typename T, bool AFFINE, int DEFORM, bool DISP>
  void run(const WarpParams& p) const {
    warp_kernel<T, AFFINE, DEFORM, DISP><<<grid, block, 0, stream>>>(p);
  }
};

template <typename T, bool DISP, typename Runner>
void dispatch_typed(const WarpParams& p, const Runner& r) {
  const bool affine = p.matrix != nullptr;
  switch (p.deform) {
    case kBSpline:
      if (affine) r.template run<T, true, kBSpline, DISP>(p);
      else r.template run<T, false, kBSpline, DISP>(p);
      break;
    case kDense:
      if (affine) r.template run<T, true, kDense, DISP>(p);
      else r.template run<T, false, kDense, DISP>(p);
      break;
    default:
      if (affine) r.template run<T, true, kNoDeform, DISP>(p);
      else r.template run<T, false, kNoDeform, DISP>(p);
      break;
  }
}

template <bool DISP, typename Runner>
void dispatch(const WarpParams& p, const Runner& r) {
  if constexpr (DISP) {
    dispatch_typed<float, true>(p, r);
  } else {
    if (p.src_kind == kFloat16) dispatch_typed<__half, false>(p, r);
    else dispatch_typed<float, false>(p, r);
  }
}

bool axis_ok(const Axis& a) { return a.n >= 1 && a.spacing > 0.f && a.half > 0.f; }

// "" when the parameters are consistent, else what is wrong (the torch binding checks tensors first;
// this is the last line of defence against out-of-bounds reads).
const char* validate(const WarpParams& p, bool disp) {
  if (p.batch < 1) return "batch must be >= 1";
  for (int a = 0; a < 3; ++a)
    if (!axis_ok(p.out[a])) return "output grid axes need >= 1 voxel and a positive spacing";
  if (p.out[1].n > kMaxGridYZ * kBlockY) return "output grid too large along y";
  if (p.dst == nullptr) return "no output buffer";
  if (p.matrix != nullptr && p.matrix_bstride != 0 && p.matrix_bstride != 12) return "matrix batch stride must be 0 or 12";
  switch (p.deform) {
    case kNoDeform:
      break;
    case kBSpline:
      if (p.coeffs == nullptr) return "B-spline warp without coefficients";
      for (int a = 0; a < 3; ++a)
        if (p.ctrl_n[a] < 1 || !(p.ctrl_spacing[a] > 0.f)) return "B-spline lattice needs >= 1 point and a positive spacing per axis";
      break;
    case kDense:
      if (p.field == nullptr) return "dense warp without a field";
      for (int a = 0; a < 3; ++a)
        if (!axis_ok(p.field_axis[a])) return "dense field grid axes need >= 1 voxel and a positive spacing";
      break;
    default:
      return "unknown deformation kind";
  }
  if (!disp) {
    if (p.src == nullptr) return "no source volume";
    if (p.src_kind != kFloat32 && p.src_kind != kFloat16) return "source volume must be float32 or float16";
    if (p.channels < 1) return "source volume needs >= 1 channel";
    for (int a = 0; a < 3; ++a)
      if (!axis_ok(p.src_axis[a])) return "source grid axes need >= 1 voxel and a positive spacing";
  }
  return "";
}

template <bool DISP>
const char* launch(const WarpParams& p, cudaStream_t stream) {
  const char* err = validate(p, DISP);
  if (err[0] != '\0') return err;
  DeviceLaunch r;
  r.block = dim3(kBlockX, kBlockY, 1);
  const int64_t gx = (p.out[0].n + kBlockX - 1) / kBlockX;
  const int64_t gy = (p.out[1].n + kBlockY - 1) / kBlockY;
  const int64_t slices = p.out[2].n * p.batch;
  const int64_t gz = slices < kMaxGridYZ ? slices : kMaxGridYZ;
  if (gx > 0x7fffffffLL) return "output grid too large along x";
  r.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  r.stream = stream;
  dispatch<DISP>(p, r);
  return "";
}

#ifdef MSODE_WARP_HOST_TEST
struct HostLoop {
  template <typename T, bool AFFINE, int DEFORM, bool DISP>
  void run(const WarpParams& p) const {
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t z = 0; z < p.out[2].n; ++z)
        for (int64_t y = 0; y < p.out[1].n; ++y)
          for (int64_t x = 0; x < p.out[0].n; ++x) process_voxel<T, AFFINE, DEFORM, DISP>(p, n, x, y, z);
  }
};
#endif

}  // namespace

const char* launch_warp(const WarpParams& p, cudaStream_t stream) { return launch<false>(p, stream); }

const char* launch_displacement(const WarpParams& p, cudaStream_t stream) { return launch<true>(p, stream); }

}  // namespace msode

#ifdef MSODE_WARP_HOST_TEST
// The same per-voxel math on the CPU (test builds only): returns "" or the validation error.
extern "C" const char* msode_warp_host(const msode::WarpParams* p, int displacement) {
  const char* err = msode::validate(*p, displacement != 0);
  if (err[0] != '\0') return err;
  if (displacement) msode::dispatch<true>(*p, msode::HostLoop{});
  else msode::dispatch<false>(*p, msode::HostLoop{});
  return "";
}

extern "C" int64_t msode_warp_params_size() { return static_cast<int64_t>(sizeof(msode::WarpParams)); }
#endif
