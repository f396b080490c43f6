#include "msode/nifti.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "msode/error.hpp"

namespace msode {
namespace {

constexpr std::int64_t kMaxDim = 4096;
constexpr std::int64_t kMaxVoxels = std::int64_t(1) << 29;  // as the Python SDK (2 GiB float32)
constexpr std::uint64_t kMaxFileBytes = std::uint64_t(4) << 30;

bool host_little_endian() {
  const std::uint16_t one = 1;
  std::uint8_t b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

template <typename T>
T get(const std::uint8_t* h, std::size_t off) {
  T v;
  std::memcpy(&v, h + off, sizeof v);  // little-endian host (checked)
  return v;
}
template <typename T>
void put(std::uint8_t* h, std::size_t off, T v) {
  std::memcpy(h + off, &v, sizeof v);
}

std::uint32_t bswap32(std::uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0xFF00) | ((v << 8) & 0xFF0000) | (v << 24);
}

}  // namespace

NiftiImage read_nifti(const std::string& path, const std::string& role) {
  const std::string label = role + " " + path;
  auto fail = [&](const std::string& msg) { throw Error(label + ": " + msg); };
  if (!host_little_endian()) fail("this build supports little-endian hosts only");
  std::error_code ec;
  auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) fail("file not found");
  if (std::filesystem::is_directory(status)) fail("is a directory, expected a .nii file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open for reading");
  in.seekg(0, std::ios::end);
  std::streamoff file_size = in.tellg();
  in.seekg(0, std::ios::beg);
  if (file_size < 0) fail("cannot determine the file size");
  if (std::uint64_t(file_size) > kMaxFileBytes) fail("file larger than 4 GiB");

  NiftiImage img;
  img.path = path;
  std::uint8_t* h = img.header.data();
  std::size_t head_len = std::size_t(std::min<std::streamoff>(file_size, 348));
  if (!in.read(reinterpret_cast<char*>(h), std::streamsize(head_len)))
    fail("cannot read the header");
  if (head_len >= 2 && h[0] == 0x1f && h[1] == 0x8b)
    fail("is gzip-compressed (.nii.gz); only uncompressed .nii is supported (gunzip it first)");
  if (head_len < 4) fail("not a NIfTI-1 file (too short)");
  std::uint32_t sizeof_hdr = get<std::uint32_t>(h, 0);
  if (sizeof_hdr == 540 || bswap32(sizeof_hdr) == 540)
    fail("is a NIfTI-2 file; only NIfTI-1 is supported");
  if (bswap32(sizeof_hdr) == 348)
    fail("is a big-endian NIfTI file; only little-endian files are supported "
         "(convert it, e.g. with nibabel or fslmaths)");
  if (sizeof_hdr != 348) fail("not a NIfTI-1 file (sizeof_hdr is not 348)");
  if (head_len < 348) fail("truncated: the 348-byte header is incomplete");
  if (std::memcmp(h + 344, "ni1\0", 4) == 0)
    fail("is the header of a .hdr/.img pair; only single-file .nii is supported");
  if (std::memcmp(h + 344, "n+1\0", 4) != 0)
    fail("not a NIfTI-1 file (bad magic; Analyze 7.5 is not supported)");

  auto dim = [&](int i) { return std::int64_t(get<std::int16_t>(h, 40 + 2 * i)); };
  std::int64_t ndim = dim(0);
  if (ndim < 1 || ndim > 7) fail("invalid dim[0] = " + std::to_string(ndim));
  std::string shape;
  for (int i = 1; i <= ndim; ++i) {
    if (dim(i) < 1) fail("invalid dim[" + std::to_string(i) + "] = " + std::to_string(dim(i)));
    shape += (i > 1 ? "x" : "") + std::to_string(dim(i));
  }
  std::int64_t effective = ndim;
  while (effective > 3 && dim(int(effective)) == 1) --effective;
  if (effective != 3)
    fail("expected a 3-D image, got " + std::to_string(effective) + "-D (shape " + shape + ")");
  for (int i = 0; i < 3; ++i) {
    img.dims[i] = dim(i + 1);
    if (img.dims[i] > kMaxDim) fail("dimension " + shape + " larger than supported");
  }
  std::int64_t nvox = img.dims[0] * img.dims[1] * img.dims[2];
  if (nvox > kMaxVoxels) fail("image of shape " + shape + " is larger than supported");

  img.datatype = get<std::int16_t>(h, 70);
  std::int64_t bytes_per = 0;
  switch (img.datatype) {
    case 2: bytes_per = 1; break;   // uint8
    case 4: bytes_per = 2; break;   // int16
    case 16: bytes_per = 4; break;  // float32
    default:
      fail("unsupported NIfTI datatype " + std::to_string(img.datatype) +
           " (supported: uint8 = 2, int16 = 4, float32 = 16)");
  }
  if (get<std::int16_t>(h, 72) != bytes_per * 8)
    fail("bitpix " + std::to_string(get<std::int16_t>(h, 72)) + " does not match datatype " +
         std::to_string(img.datatype));

  for (int i = 0; i < 3; ++i) {
    double p = get<float>(h, 76 + 4 * (i + 1));
    if (!std::isfinite(p) || std::fabs(p) < 1e-6)
      fail("invalid pixdim[" + std::to_string(i + 1) + "] = " + std::to_string(p));
    img.pixdim[i] = std::fabs(p);
  }
  double vox_offset = get<float>(h, 108);
  if (!std::isfinite(vox_offset) || vox_offset < 352 || vox_offset != std::floor(vox_offset))
    fail("invalid vox_offset " + std::to_string(vox_offset) + " (must be an integer >= 352)");
  std::uint64_t need = std::uint64_t(vox_offset) + std::uint64_t(nvox * bytes_per);
  if (need > std::uint64_t(file_size))
    fail("truncated: the image data need " + std::to_string(need) + " bytes, the file has " +
         std::to_string(file_size));

  std::vector<std::uint8_t> raw(std::size_t(nvox * bytes_per));
  in.seekg(std::streamoff(vox_offset), std::ios::beg);
  if (!in.read(reinterpret_cast<char*>(raw.data()), std::streamsize(raw.size())))
    fail("cannot read the image data");

  double slope = get<float>(h, 112), inter = get<float>(h, 116);
  bool scale = std::isfinite(slope) && slope != 0.0;
  if (!scale) inter = 0.0, slope = 1.0;
  if (!std::isfinite(inter)) inter = 0.0;
  img.data.resize(std::size_t(nvox));
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < nvox; ++i) {
    double v;
    switch (img.datatype) {
      case 2: v = raw[std::size_t(i)]; break;
      case 4: v = get<std::int16_t>(raw.data(), std::size_t(2 * i)); break;
      default: v = get<float>(raw.data(), std::size_t(4 * i)); break;
    }
    float f = float(v * slope + inter);
    if (!std::isfinite(f)) ++bad;
    img.data[std::size_t(i)] = f;
  }
  if (bad) fail("image has " + std::to_string(bad) + " NaN/Inf voxels");

  // voxel -> RAS affine: sform, else qform, else the Analyze-style base affine (as nibabel).
  auto& A = img.affine;
  A.fill(0.0);
  A[15] = 1.0;
  if (get<std::int16_t>(h, 254) > 0) {
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 4; ++c) A[4 * r + c] = get<float>(h, 280 + 16 * r + 4 * c);
    img.affine_source = "sform";
  } else if (get<std::int16_t>(h, 252) > 0) {
    double b = get<float>(h, 256), c = get<float>(h, 260), d = get<float>(h, 264);
    double a2 = 1.0 - (b * b + c * c + d * d), a;
    if (a2 < 1e-7) {
      double n = std::sqrt(b * b + c * c + d * d);
      b /= n; c /= n; d /= n;
      a = 0.0;
    } else {
      a = std::sqrt(a2);
    }
    double R[3][3] = {{a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)},
                      {2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)},
                      {2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b}};
    double qfac = get<float>(h, 76) < 0 ? -1.0 : 1.0;
    double z[3] = {img.pixdim[0], img.pixdim[1], img.pixdim[2] * qfac};
    for (int r = 0; r < 3; ++r) {
      for (int k = 0; k < 3; ++k) A[4 * r + k] = R[r][k] * z[k];
      A[4 * r + 3] = get<float>(h, 268 + 4 * r);
    }
    img.affine_source = "qform";
  } else {
    for (int i = 0; i < 3; ++i) {
      double s = img.pixdim[i] * (i == 0 ? -1.0 : 1.0);
      A[5 * i] = s;
      A[4 * i + 3] = -s * double(img.dims[i] - 1) / 2.0;
    }
    img.affine_source = "pixdim";
  }
  return img;
}

void write_nifti_float32_like(const std::string& path, const NiftiImage& geometry,
                              const std::vector<float>& data, const std::string& description) {
  const std::int64_t nvox = geometry.dims[0] * geometry.dims[1] * geometry.dims[2];
  if (std::int64_t(data.size()) != nvox)
    throw Error("output " + path + ": " + std::to_string(data.size()) +
                " voxels do not match the geometry's " + std::to_string(nvox));
  std::array<std::uint8_t, 352> h{};
  std::memcpy(h.data(), geometry.header.data(), 348);
  std::uint8_t* p = h.data();
  put<std::int32_t>(p, 0, 348);
  put<std::int16_t>(p, 40, 3);
  for (int i = 0; i < 3; ++i) put<std::int16_t>(p, 42 + 2 * i, std::int16_t(geometry.dims[i]));
  for (int i = 4; i <= 7; ++i) put<std::int16_t>(p, 40 + 2 * i, 1);
  for (int off : {56, 60, 64}) put<float>(p, off, 0.0f);  // intent_p1..3
  put<std::int16_t>(p, 68, 0);                             // intent_code
  put<std::int16_t>(p, 70, 16);                            // float32
  put<std::int16_t>(p, 72, 32);
  put<float>(p, 108, 352.0f);  // vox_offset
  put<float>(p, 112, 1.0f);    // scl_slope
  put<float>(p, 116, 0.0f);    // scl_inter
  for (int off : {124, 128, 140, 144}) put<float>(p, off, 0.0f);  // cal_max/min, glmax/min
  std::memset(p + 148, 0, 80);
  std::memcpy(p + 148, description.data(), std::min<std::size_t>(description.size(), 79));
  std::memset(p + 328, 0, 16);  // intent_name
  std::memcpy(p + 344, "n+1\0", 4);
  // bytes 348..351: no extensions

  const std::string tmp = path + ".part" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("output " + path + ": cannot open for writing");
    out.write(reinterpret_cast<const char*>(h.data()), std::streamsize(h.size()));
    out.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * 4));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw Error("output " + path + ": write failed (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("output " + path + ": cannot move the written file into place");
  }
}

}  // namespace msode
