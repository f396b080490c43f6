// Torch binding of the fused warp kernels: CUDA implementations of the msode::* operators.
//
// The operators' schemas are defined once, in Python (msode_sdk/warp/_ops.py, SCHEMAS), so that
// they exist on CPU-only installs too, where the PyTorch reference implements them. This library
// adds the CUDA kernels to those operators (TORCH_LIBRARY_IMPL(msode, CUDA, m)); the dispatcher
// pairs implementations and schemas whichever is registered first, and checks that the C++
// signatures below match the schemas:
//
//   resample(Tensor volume, float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor
//   warp_affine(Tensor volume, Tensor matrix, float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor
//   warp_bspline(Tensor volume, Tensor coeffs, float[] control_spacing, float[] src_spacing,
//                float[] out_spacing, int[] out_shape) -> Tensor
//   warp_dense(Tensor volume, Tensor field, float[] field_spacing, float[] src_spacing, float[] out_spacing,
//              int[] out_shape) -> Tensor
//   warp_affine_bspline(Tensor volume, Tensor matrix, Tensor coeffs, float[] control_spacing,
//                       float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor
//   warp_affine_dense(Tensor volume, Tensor matrix, Tensor field, float[] field_spacing,
//                     float[] src_spacing, float[] out_spacing, int[] out_shape) -> Tensor
//   chain_displacement(Tensor? matrix, Tensor? coeffs, Tensor? field, float[] control_spacing,
//                      float[] field_spacing, float[] out_spacing, int[] out_shape) -> Tensor
//
// Spacings are [x, y, z] mm, shapes [X, Y, Z] voxels; see _ops.py for the conventions. Kernels run on
// the current CUDA stream of the volume's device, allocate only their output (so they can be
// captured in CUDA graphs) and never synchronise.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>

#include "warp_kernels.cuh"

namespace {

using at::Tensor;

constexpr int64_t kMaxAxis = int64_t{1} << 30;

std::array<double, 3> spacing3(c10::ArrayRef<double> v, const char* op, const char* what) {
  TORCH_CHECK(v.size() == 3, "msode::", op, ": ", what, " must have 3 values [x, y, z] in mm, got ", v.size(),
              " values");
  std::array<double, 3> out{};
  for (size_t i = 0; i < 3; ++i) {
    TORCH_CHECK(std::isfinite(v[i]) && v[i] > 0.0, "msode::", op, ": ", what,
                " must be positive finite mm values, got ", v);
    out[i] = v[i];
  }
  return out;
}

std::array<int64_t, 3> shape3(c10::IntArrayRef v, const char* op) {
  TORCH_CHECK(v.size() == 3, "msode::", op, ": out_shape must have 3 values [X, Y, Z], got ", v.size(), " values");
  std::array<int64_t, 3> out{};
  for (size_t i = 0; i < 3; ++i) {
    TORCH_CHECK(v[i] >= 1 && v[i] <= kMaxAxis, "msode::", op, ": out_shape values must be in [1, 2^30], got ", v);
    out[i] = v[i];
  }
  return out;
}

// An axis of n voxels at `spacing` mm, centred; `half` as transforms.Grid.normalise computes it.
msode::Axis make_axis(int64_t n, double spacing) {
  msode::Axis a{};
  a.n = n;
  a.spacing = static_cast<float>(spacing);
  a.centre = static_cast<float>(static_cast<double>(n - 1) / 2.0);
  const double extent = static_cast<double>(n - 1) * spacing;
  a.half = static_cast<float>(std::max(extent, 1e-12) / 2.0);
  return a;
}

void check_volume(const Tensor& v, const char* op) {
  TORCH_CHECK(v.defined(), "msode::", op, ": volume is undefined");
  TORCH_CHECK(v.dim() == 5, "msode::", op, ": volume must be (N, C, D, H, W), got shape ", v.sizes());
  TORCH_CHECK(v.is_cuda(), "msode::", op, ": this is the CUDA implementation; the volume is on ", v.device());
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kHalf, "msode::", op,
              ": volume must be float32 or float16, got ", v.scalar_type());
  TORCH_CHECK(v.numel() > 0, "msode::", op, ": volume is empty, shape ", v.sizes());
  for (int64_t d = 2; d < 5; ++d)
    TORCH_CHECK(v.size(d) <= kMaxAxis, "msode::", op, ": volume axis ", d, " is too large (", v.size(d), ")");
}

// A transform parameter on `device`, batch 1 or `batch`, as contiguous float32.
Tensor param(const Tensor& t, c10::Device device, int64_t batch, const char* op, const char* what) {
  TORCH_CHECK(t.defined(), "msode::", op, ": ", what, " is undefined");
  TORCH_CHECK(t.device() == device, "msode::", op, ": ", what, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.is_floating_point(), "msode::", op, ": ", what, " must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(0) == 1 || t.size(0) == batch, "msode::", op, ": ", what, " has batch ", t.size(0),
              "; expected 1 or ", batch);
  return t.to(at::kFloat).contiguous();
}

// Parameters of the transform part; `keep` holds the converted tensors alive until the launch.
struct TransformArgs {
  std::optional<Tensor> matrix, coeffs, field;
  c10::ArrayRef<double> control_spacing, field_spacing;
};

void fill_transform(msode::WarpParams& p, std::array<Tensor, 3>& keep, const TransformArgs& tr, c10::Device device,
                    int64_t batch, const char* op) {
  p.matrix = nullptr;
  p.matrix_bstride = 0;
  p.deform = msode::kNoDeform;
  p.coeffs = nullptr;
  p.field = nullptr;
  if (tr.matrix.has_value()) {
    const Tensor& m = *tr.matrix;
    TORCH_CHECK(m.dim() == 3 && (m.size(1) == 3 || m.size(1) == 4) && m.size(2) == 4, "msode::", op,
                ": matrix must be (N, 3, 4) or (N, 4, 4), got shape ", m.sizes());
    keep[0] = param(m, device, batch, op, "matrix").narrow(1, 0, 3).contiguous();
    p.matrix = keep[0].data_ptr<float>();
    p.matrix_bstride = keep[0].size(0) == 1 ? 0 : 12;
  }
  TORCH_CHECK(!(tr.coeffs.has_value() && tr.field.has_value()), "msode::", op,
              ": give either B-spline coefficients or a dense field, not both");
  if (tr.coeffs.has_value()) {
    const Tensor& c = *tr.coeffs;
    TORCH_CHECK(c.dim() == 5 && c.size(1) == 3 && c.size(2) >= 1 && c.size(3) >= 1 && c.size(4) >= 1, "msode::", op,
                ": coeffs must be (N, 3, cz, cy, cx), got shape ", c.sizes());
    const auto cs = spacing3(tr.control_spacing, op, "control_spacing");
    keep[1] = param(c, device, batch, op, "coeffs");
    p.deform = msode::kBSpline;
    p.coeffs = keep[1].data_ptr<float>();
    const int64_t cz = c.size(2), cy = c.size(3), cx = c.size(4);
    p.coeff_bstride = keep[1].size(0) == 1 ? 0 : 3 * cz * cy * cx;
    const int64_t n[3] = {cx, cy, cz};
    for (int a = 0; a < 3; ++a) {
      p.ctrl_n[a] = n[a];
      p.ctrl_spacing[a] = static_cast<float>(cs[a]);
      p.ctrl_centre[a] = static_cast<float>(static_cast<double>(n[a] - 1) / 2.0);
    }
  }
  if (tr.field.has_value()) {
    const Tensor& f = *tr.field;
    TORCH_CHECK(f.dim() == 5 && f.size(1) == 3 && f.numel() > 0, "msode::", op,
                ": field must be (N, 3, fD, fH, fW), got shape ", f.sizes());
    const auto fs = spacing3(tr.field_spacing, op, "field_spacing");
    keep[2] = param(f, device, batch, op, "field");
    p.deform = msode::kDense;
    p.field = keep[2].data_ptr<float>();
    const int64_t fd = f.size(2), fh = f.size(3), fw = f.size(4);
    p.field_bstride = keep[2].size(0) == 1 ? 0 : 3 * fd * fh * fw;
    p.field_axis[0] = make_axis(fw, fs[0]);
    p.field_axis[1] = make_axis(fh, fs[1]);
    p.field_axis[2] = make_axis(fd, fs[2]);
  }
}

void set_out_grid(msode::WarpParams& p, c10::ArrayRef<double> out_spacing, c10::IntArrayRef out_shape, const char* op) {
  const auto os = spacing3(out_spacing, op, "out_spacing");
  const auto shape = shape3(out_shape, op);
  for (int a = 0; a < 3; ++a) p.out[a] = make_axis(shape[a], os[a]);
}

void launch(const msode::WarpParams& p, bool displacement, const char* op) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const char* err = displacement ? msode::launch_displacement(p, stream) : msode::launch_warp(p, stream);
  TORCH_CHECK(err[0] == '\0', "msode::", op, ": ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor warp(const char* op, const Tensor& volume, const TransformArgs& tr, c10::ArrayRef<double> src_spacing,
            c10::ArrayRef<double> out_spacing, c10::IntArrayRef out_shape) {
  check_volume(volume, op);
  const c10::cuda::CUDAGuard guard(volume.device());
  const Tensor vol = volume.contiguous();
  const int64_t batch = vol.size(0);
  msode::WarpParams p{};
  p.batch = batch;
  set_out_grid(p, out_spacing, out_shape, op);
  std::array<Tensor, 3> keep;
  fill_transform(p, keep, tr, vol.device(), batch, op);
  const auto ss = spacing3(src_spacing, op, "src_spacing");
  p.src = vol.data_ptr();
  p.src_kind = vol.scalar_type() == at::kHalf ? msode::kFloat16 : msode::kFloat32;
  p.channels = vol.size(1);
  p.src_axis[0] = make_axis(vol.size(4), ss[0]);
  p.src_axis[1] = make_axis(vol.size(3), ss[1]);
  p.src_axis[2] = make_axis(vol.size(2), ss[2]);
  Tensor out = at::empty({batch, vol.size(1), p.out[2].n, p.out[1].n, p.out[0].n}, vol.options());
  p.dst = out.data_ptr();
  launch(p, false, op);
  return out;
}

// ------------------------------------------------------------------------------------ operators

Tensor resample_cuda(const Tensor& volume, c10::ArrayRef<double> src_spacing, c10::ArrayRef<double> out_spacing,
                     c10::IntArrayRef out_shape) {
  return warp("resample", volume, TransformArgs{}, src_spacing, out_spacing, out_shape);
}

Tensor warp_affine_cuda(const Tensor& volume, const Tensor& matrix, c10::ArrayRef<double> src_spacing,
                        c10::ArrayRef<double> out_spacing, c10::IntArrayRef out_shape) {
  TransformArgs tr;
  tr.matrix = matrix;
  return warp("warp_affine", volume, tr, src_spacing, out_spacing, out_shape);
}

Tensor warp_bspline_cuda(const Tensor& volume, const Tensor& coeffs, c10::ArrayRef<double> control_spacing,
                         c10::ArrayRef<double> src_spacing, c10::ArrayRef<double> out_spacing,
                         c10::IntArrayRef out_shape) {
  TransformArgs tr;
  tr.coeffs = coeffs;
  tr.control_spacing = control_spacing;
  return warp("warp_bspline", volume, tr, src_spacing, out_spacing, out_shape);
}

Tensor warp_dense_cuda(const Tensor& volume, const Tensor& field, c10::ArrayRef<double> field_spacing,
                       c10::ArrayRef<double> src_spacing, c10::ArrayRef<double> out_spacing,
                       c10::IntArrayRef out_shape) {
  TransformArgs tr;
  tr.field = field;
  tr.field_spacing = field_spacing;
  return warp("warp_dense", volume, tr, src_spacing, out_spacing, out_shape);
}

Tensor warp_affine_bspline_cuda(const Tensor& volume, const Tensor& matrix, const Tensor& coeffs,
                                c10::ArrayRef<double> control_spacing, c10::ArrayRef<double> src_spacing,
                                c10::ArrayRef<double> out_spacing, c10::IntArrayRef out_shape) {
  TransformArgs tr;
  tr.matrix = matrix;
  tr.coeffs = coeffs;
  tr.control_spacing = control_spacing;
  return warp("warp_affine_bspline", volume, tr, src_spacing, out_spacing, out_shape);
}

Tensor warp_affine_dense_cuda(const Tensor& volume, const Tensor& matrix, const Tensor& field,
                              c10::ArrayRef<double> field_spacing, c10::ArrayRef<double> src_spacing,
                              c10::ArrayRef<double> out_spacing, c10::IntArrayRef out_shape) {
  TransformArgs tr;
  tr.matrix = matrix;
  tr.field = field;
  tr.field_spacing = field_spacing;
  return warp("warp_affine_dense", volume, tr, src_spacing, out_spacing, out_shape);
}

Tensor chain_displacement_cuda(const std::optional<Tensor>& matrix, const std::optional<Tensor>& coeffs,
                               const std::optional<Tensor>& field, c10::ArrayRef<double> control_spacing,
                               c10::ArrayRef<double> field_spacing, c10::ArrayRef<double> out_spacing,
                               c10::IntArrayRef out_shape) {
  const char* op = "chain_displacement";
  const Tensor* first = nullptr;
  int64_t batch = 0;
  for (const auto* t : {&matrix, &coeffs, &field}) {
    if (t->has_value() && (*t)->defined()) {
      if (first == nullptr) first = &**t;
      TORCH_CHECK((*t)->dim() >= 1, "msode::", op, ": transform parameters need a batch dimension");
      batch = std::max(batch, (*t)->size(0));
    }
  }
  TORCH_CHECK(first != nullptr, "msode::", op, ": needs a matrix, B-spline coefficients or a dense field");
  TORCH_CHECK(first->is_cuda(), "msode::", op, ": this is the CUDA implementation; the parameters are on ",
              first->device());
  TORCH_CHECK(batch >= 1, "msode::", op, ": transform parameters have an empty batch");
  const c10::cuda::CUDAGuard guard(first->device());
  TransformArgs tr;
  if (matrix.has_value() && matrix->defined()) tr.matrix = *matrix;
  if (coeffs.has_value() && coeffs->defined()) tr.coeffs = *coeffs;
  if (field.has_value() && field->defined()) tr.field = *field;
  tr.control_spacing = control_spacing;
  tr.field_spacing = field_spacing;
  msode::WarpParams p{};
  p.batch = batch;
  set_out_grid(p, out_spacing, out_shape, op);
  std::array<Tensor, 3> keep;
  fill_transform(p, keep, tr, first->device(), batch, op);
  Tensor out = at::empty({batch, 3, p.out[2].n, p.out[1].n, p.out[0].n},
                         first->options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  p.dst = out.data_ptr();
  launch(p, true, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(msode, CUDA, m) {
  m.impl("resample", &resample_cuda);
  m.impl("warp_affine", &warp_affine_cuda);
  m.impl("warp_bspline", &warp_bspline_cuda);
  m.impl("warp_dense", &warp_dense_cuda);
  m.impl("warp_affine_bspline", &warp_affine_bspline_cuda);
  m.impl("warp_affine_dense", &warp_affine_dense_cuda);
  m.impl("chain_displacement", &chain_displacement_cuda);
}
