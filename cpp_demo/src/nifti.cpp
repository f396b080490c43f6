// NIfTI-1 / NIfTI-2 reading (plain or gzip, either byte order, nibabel's types and scaling) and float32
// NIfTI-1 writing (plain or gzip). See include/msode/nifti.hpp.
#include "msode/nifti.hpp"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>

#include "msode/error.hpp"

namespace msode {
namespace {

constexpr std::uint64_t kMaxTrailingBytes = 1 << 20;  // decompressed bytes tolerated after the voxel data
constexpr std::size_t kChunkBytes = 1 << 20;

bool host_little_endian() {
  const std::uint16_t one = 1;
  std::uint8_t b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

void swap_bytes(std::uint8_t* p, std::size_t size) { std::reverse(p, p + size); }

// --- byte sources -------------------------------------------------------------------------------------

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

class Source {
 public:
  virtual ~Source() = default;
  /// Up to `n` bytes into `dst`; fewer only at the end of the data (or on an error, see error()).
  virtual std::size_t read(void* dst, std::size_t n) = 0;
  /// Why the last short read stopped early ("" when the data simply ended).
  virtual std::string error() const { return {}; }
  /// True when the data ended without a proper end (a gzip stream without its end-of-stream marker).
  virtual bool truncated() const { return false; }
  std::uint64_t skip(std::uint64_t n) {  // returns the bytes actually skipped
    std::uint8_t buf[1 << 14];
    std::uint64_t done = 0;
    while (done < n) {
      std::size_t k = read(buf, std::size_t(std::min<std::uint64_t>(sizeof buf, n - done)));
      done += k;
      if (k == 0) break;
    }
    return done;
  }
};

class PlainSource : public Source {
 public:
  explicit PlainSource(std::FILE* f) : f_(f) {}
  std::size_t read(void* dst, std::size_t n) override {
    std::size_t k = std::fread(dst, 1, n, f_);
    if (k < n && std::ferror(f_)) err_ = std::strerror(errno);
    return k;
  }
  std::string error() const override { return err_; }

 private:
  std::FILE* f_;
  std::string err_;
};

// gzip (RFC 1952), possibly several members, as Python's gzip module reads it: each member's CRC-32
// and length are checked (by zlib, at the member's end); zero padding after a member is skipped;
// anything else after a member must be another member.
class GzipSource : public Source {
 public:
  explicit GzipSource(std::FILE* f) : f_(f), in_(1 << 18) {
    std::memset(&zs_, 0, sizeof zs_);
    if (inflateInit2(&zs_, 15 + 16) != Z_OK) throw Error("zlib: inflateInit2 failed");
  }
  ~GzipSource() override { inflateEnd(&zs_); }

  std::size_t read(void* dst, std::size_t n) override {
    auto* out = static_cast<std::uint8_t*>(dst);
    std::size_t done = 0;
    while (done < n && !finished_ && err_.empty()) {
      if (member_end_) {
        if (!next_member()) break;
        continue;
      }
      if (zs_.avail_in == 0 && !refill()) {
        truncated_ = true;  // input ended inside a member
        break;
      }
      const std::size_t want = std::min<std::size_t>(n - done, 1u << 30);
      zs_.next_out = out + done;
      zs_.avail_out = uInt(want);
      int rc = inflate(&zs_, Z_NO_FLUSH);
      done += want - zs_.avail_out;
      if (rc == Z_STREAM_END) {
        member_end_ = true;
      } else if (rc == Z_BUF_ERROR) {
        if (zs_.avail_in != 0) err_ = "zlib buffer error";
        // else: needs more input, loop refills
      } else if (rc != Z_OK) {
        err_ = zs_.msg ? std::string(zs_.msg) : "zlib error " + std::to_string(rc);
      }
    }
    return done;
  }
  std::string error() const override { return err_; }
  bool truncated() const override { return truncated_; }

 private:
  bool refill() {
    if (eof_) return false;
    std::size_t k = std::fread(in_.data(), 1, in_.size(), f_);
    if (k == 0) {
      eof_ = true;
      if (std::ferror(f_)) err_ = std::strerror(errno);
      return false;
    }
    zs_.next_in = in_.data();
    zs_.avail_in = uInt(k);
    return true;
  }
  // After a member's end: skip zero padding; end of file -> finished; else a new member must start.
  bool next_member() {
    for (;;) {
      while (zs_.avail_in && *zs_.next_in == 0) {
        ++zs_.next_in;
        --zs_.avail_in;
      }
      if (zs_.avail_in) break;
      if (!refill()) {
        finished_ = err_.empty();
        return false;
      }
    }
    if (zs_.avail_in < 2 && !refill_keep()) {
      err_ = "not a gzipped file (trailing garbage after the compressed data)";
      return false;
    }
    if (zs_.next_in[0] != 0x1f || zs_.next_in[1] != 0x8b) {
      err_ = "not a gzipped file (trailing garbage after the compressed data)";
      return false;
    }
    inflateReset(&zs_);
    member_end_ = false;
    return true;
  }
  bool refill_keep() {  // append more input after the unread bytes
    std::memmove(in_.data(), zs_.next_in, zs_.avail_in);
    std::size_t have = zs_.avail_in;
    std::size_t k = eof_ ? 0 : std::fread(in_.data() + have, 1, in_.size() - have, f_);
    if (k == 0) eof_ = true;
    zs_.next_in = in_.data();
    zs_.avail_in = uInt(have + k);
    return zs_.avail_in >= 2;
  }

  std::FILE* f_;
  z_stream zs_;
  std::vector<std::uint8_t> in_;
  bool eof_ = false, member_end_ = false, finished_ = false, truncated_ = false;
  std::string err_;
};

// --- header ---------------------------------------------------------------------------------------------

struct Header {
  int version = 1;
  bool swap = false;
  std::size_t size = 348;
  int datatype = 0;
  std::int64_t dim[8] = {};
  double pixdim[8] = {};
  double vox_offset = 0;
  double slope = 0, inter = 0;
  int qform_code = 0, sform_code = 0;
  double quatern[3] = {}, qoffset[3] = {};
  double srow[3][4] = {};
  char magic[4] = {};
  std::uint8_t eol[4] = {};
};

template <typename T>
T field(const std::uint8_t* h, std::size_t off, bool swap) {
  std::uint8_t b[sizeof(T)];
  std::memcpy(b, h + off, sizeof(T));
  if (swap) swap_bytes(b, sizeof(T));
  T v;
  std::memcpy(&v, b, sizeof(T));
  return v;
}

Header parse_header(const std::uint8_t* h, int version, bool swap) {
  Header hd;
  hd.version = version;
  hd.swap = swap;
  if (version == 1) {
    hd.size = 348;
    hd.datatype = field<std::int16_t>(h, 70, swap);
    for (int i = 0; i < 8; ++i) hd.dim[i] = field<std::int16_t>(h, 40 + 2 * i, swap);
    for (int i = 0; i < 8; ++i) hd.pixdim[i] = field<float>(h, 76 + 4 * i, swap);
    hd.vox_offset = field<float>(h, 108, swap);
    hd.slope = field<float>(h, 112, swap);
    hd.inter = field<float>(h, 116, swap);
    hd.qform_code = field<std::int16_t>(h, 252, swap);
    hd.sform_code = field<std::int16_t>(h, 254, swap);
    for (int i = 0; i < 3; ++i) hd.quatern[i] = field<float>(h, 256 + 4 * i, swap);
    for (int i = 0; i < 3; ++i) hd.qoffset[i] = field<float>(h, 268 + 4 * i, swap);
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 4; ++c) hd.srow[r][c] = field<float>(h, 280 + 16 * r + 4 * c, swap);
    std::memcpy(hd.magic, h + 344, 4);
  } else {
    hd.size = 540;
    std::memcpy(hd.magic, h + 4, 4);
    std::memcpy(hd.eol, h + 8, 4);
    hd.datatype = field<std::int16_t>(h, 12, swap);
    for (int i = 0; i < 8; ++i) hd.dim[i] = field<std::int64_t>(h, 16 + 8 * i, swap);
    for (int i = 0; i < 8; ++i) hd.pixdim[i] = field<double>(h, 104 + 8 * i, swap);
    hd.vox_offset = double(field<std::int64_t>(h, 168, swap));
    hd.slope = field<double>(h, 176, swap);
    hd.inter = field<double>(h, 184, swap);
    hd.qform_code = field<std::int32_t>(h, 344, swap);
    hd.sform_code = field<std::int32_t>(h, 348, swap);
    for (int i = 0; i < 3; ++i) hd.quatern[i] = field<double>(h, 352 + 8 * i, swap);
    for (int i = 0; i < 3; ++i) hd.qoffset[i] = field<double>(h, 376 + 8 * i, swap);
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 4; ++c) hd.srow[r][c] = field<double>(h, 400 + 32 * r + 8 * c, swap);
  }
  return hd;
}

enum class Kind { U8, I8, I16, U16, I32, U32, I64, U64, F32, F64 };

struct TypeInfo {
  Kind kind;
  std::size_t size;
  const char* name;
};

bool type_info(int datatype, TypeInfo& t) {
  switch (datatype) {
    case 2: t = {Kind::U8, 1, "uint8"}; return true;
    case 4: t = {Kind::I16, 2, "int16"}; return true;
    case 8: t = {Kind::I32, 4, "int32"}; return true;
    case 16: t = {Kind::F32, 4, "float32"}; return true;
    case 64: t = {Kind::F64, 8, "float64"}; return true;
    case 256: t = {Kind::I8, 1, "int8"}; return true;
    case 512: t = {Kind::U16, 2, "uint16"}; return true;
    case 768: t = {Kind::U32, 4, "uint32"}; return true;
    case 1024: t = {Kind::I64, 8, "int64"}; return true;
    case 1280: t = {Kind::U64, 8, "uint64"}; return true;
    default: return false;
  }
}

template <typename T>
double load_as(const std::uint8_t* p, bool swap) {
  std::uint8_t b[sizeof(T)];
  std::memcpy(b, p, sizeof(T));
  if (swap) swap_bytes(b, sizeof(T));
  T v;
  std::memcpy(&v, b, sizeof(T));
  return double(v);
}

double element(Kind k, const std::uint8_t* p, bool swap) {
  switch (k) {
    case Kind::U8: return double(*p);
    case Kind::I8: return double(std::int8_t(*p));
    case Kind::I16: return load_as<std::int16_t>(p, swap);
    case Kind::U16: return load_as<std::uint16_t>(p, swap);
    case Kind::I32: return load_as<std::int32_t>(p, swap);
    case Kind::U32: return load_as<std::uint32_t>(p, swap);
    case Kind::I64: return load_as<std::int64_t>(p, swap);
    case Kind::U64: return load_as<std::uint64_t>(p, swap);
    case Kind::F32: return load_as<float>(p, swap);
    case Kind::F64: return load_as<double>(p, swap);
  }
  return 0;
}

// nibabel's affine from the qform: quaternion (b, c, d) with a = sqrt(1 - b^2 - c^2 - d^2), or 0 below
// the header precision's threshold (fillpositive), rotation (quat2mat, normalising), zooms with qfac.
Mat4 qform_affine(const Header& hd, const double pix[3], double qfac, const std::string& fail_prefix) {
  const long double b = hd.quatern[0], c = hd.quatern[1], d = hd.quatern[2];
  const long double w2 = 1.0L - (b * b + c * c + d * d);
  const long double thresh = hd.version == 1 ? 3.0L * 1.1920928955078125e-07L : 3.0L * 2.220446049250313e-16L;
  long double a;
  if (std::fabs(w2) < thresh) {
    a = 0;
  } else if (w2 < 0) {
    throw InputError(fail_prefix + "qform quaternion is not a unit quaternion (w2 should be positive, but is " +
                     fmt_g(double(w2), 6) + ")");
  } else {
    a = std::sqrt(w2);
  }
  const long double nq = a * a + b * b + c * c + d * d;
  long double R[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
  if (nq >= 2.220446049250313e-16L) {
    const long double s = 2.0L / nq, X = b * s, Y = c * s, Z = d * s;
    const long double wX = a * X, wY = a * Y, wZ = a * Z, xX = b * X, xY = b * Y, xZ = b * Z, yY = c * Y,
                      yZ = c * Z, zZ = d * Z;
    const long double m[3][3] = {{1.0L - (yY + zZ), xY - wZ, xZ + wY},
                                 {xY + wZ, 1.0L - (xX + zZ), yZ - wX},
                                 {xZ - wY, yZ + wX, 1.0L - (xX + yY)}};
    std::memcpy(R, m, sizeof R);
  }
  const double z[3] = {pix[0], pix[1], pix[2] * qfac};
  Mat4 A = mat4_identity();
  for (int r = 0; r < 3; ++r) {
    for (int k = 0; k < 3; ++k) A[4 * r + k] = double(R[r][k] * (long double)z[k]);
    A[4 * r + 3] = hd.qoffset[r];
  }
  return A;
}

std::string base_name(const std::string& path) {
  std::string n = std::filesystem::path(path).filename().string();
  return n.empty() ? path : n;
}

std::string show_path(const std::string& path) {
  std::string out;
  for (unsigned char ch : path) {
    if (ch < 0x20 || ch == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    } else {
      out += char(ch);
    }
  }
  return out.size() <= 240 ? out : out.substr(0, 120) + "..." + out.substr(out.size() - 120);
}

std::uint32_t le32(const std::uint8_t* p) {
  return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
}

}  // namespace

NiftiImage read_nifti(const std::string& path, const std::string& role) {
  const std::string shown = show_path(path);
  std::error_code ec;
  if (path.find('\0') != std::string::npos) throw InputError(role + ": invalid path " + shown + ": embedded null byte");
  auto status = std::filesystem::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw InputError(role + ": invalid path " + shown + ": " + ec.message());
  if (!std::filesystem::exists(status)) throw InputError(role + ": file not found: " + shown);
  if (std::filesystem::is_directory(status))
    throw InputError(role + ": " + shown + " is a directory, expected a NIfTI file");
  if (!std::filesystem::is_regular_file(status))
    throw InputError(role + ": " + shown + " is not a regular file (device, FIFO or socket)");
  const std::uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) throw InputError(role + ": cannot read " + shown + ": " + ec.message());

  NiftiImage img;
  img.path = path;
  img.name = role + " (" + show_path(base_name(path)) + ")";
  const std::string& name = img.name;
  const std::string not_nifti = role + ": cannot read " + shown + " as NIfTI: ";

  FilePtr file(std::fopen(path.c_str(), "rb"));
  if (!file) throw InputError(role + ": cannot read " + shown + ": " + std::strerror(errno));
  std::uint8_t magic2[3] = {0, 0, 0};
  const std::size_t got_magic = std::fread(magic2, 1, 3, file.get());
  std::rewind(file.get());
  std::unique_ptr<Source> src;
  std::uint64_t gzip_isize = 0;  // the gzip trailer's ISIZE (uncompressed size mod 2**32)
  if (got_magic >= 2 && magic2[0] == 0x1f && magic2[1] == 0x8b) {
    img.gzip = true;
    if (file_size >= 18) {
      FilePtr tail(std::fopen(path.c_str(), "rb"));
      std::uint8_t t[4];
      if (tail && std::fseek(tail.get(), -4, SEEK_END) == 0 && std::fread(t, 1, 4, tail.get()) == 4)
        gzip_isize = le32(t);
    }
    src = std::make_unique<GzipSource>(file.get());
  } else if (got_magic == 3 && magic2[0] == 'B' && magic2[1] == 'Z' && magic2[2] == 'h') {
    throw InputError(not_nifti + "bzip2-compressed files are not supported (decompress it, or gzip it)");
  } else {
    src = std::make_unique<PlainSource>(file.get());
  }
  auto stream_problem = [&](const std::string& where) {
    if (!src->error().empty()) return not_nifti + "corrupted gzip data " + where + " (" + src->error() + ")";
    if (src->truncated()) return not_nifti + "file is truncated " + where + " (compressed file ended before the "
                                             "end-of-stream marker was reached)";
    return not_nifti + "file is truncated " + where;
  };

  // --- header ---------------------------------------------------------------------------------------
  std::uint8_t h[540] = {};
  if (src->read(h, 4) != 4) throw InputError(stream_problem("(shorter than a NIfTI header)"));
  const std::uint32_t sz_le = le32(h);
  const std::uint32_t sz_be = std::uint32_t(h[0]) << 24 | std::uint32_t(h[1]) << 16 | std::uint32_t(h[2]) << 8 | h[3];
  const bool host_le = host_little_endian();
  int version = 0;
  bool file_le = true;
  if (sz_le == 348 || sz_le == 540) {
    version = sz_le == 348 ? 1 : 2;
  } else if (sz_be == 348 || sz_be == 540) {
    version = sz_be == 348 ? 1 : 2;
    file_le = false;
  } else {
    throw InputError(not_nifti + "not a NIfTI-1 or NIfTI-2 file (sizeof_hdr is neither 348 nor 540)");
  }
  img.version = version;
  img.big_endian = !file_le;
  const std::size_t hsize = version == 1 ? 348 : 540;
  if (src->read(h + 4, hsize - 4) != hsize - 4)
    throw InputError(stream_problem("(it ends inside the " + std::to_string(hsize) + "-byte header)"));
  const Header hd = parse_header(h, version, file_le != host_le);

  if (version == 1) {
    if (std::memcmp(hd.magic, "ni1\0", 4) == 0)
      throw InputError(not_nifti + "it is the header of a .hdr/.img pair; only single-file NIfTI is supported");
    if (std::memcmp(hd.magic, "n+1\0", 4) != 0)
      throw InputError(not_nifti + "magic string is not valid (not a NIfTI-1 file; Analyze 7.5 is not supported)");
  } else {
    if (std::memcmp(hd.magic, "ni2\0", 4) == 0)
      throw InputError(not_nifti + "it is the header of a .hdr/.img pair; only single-file NIfTI is supported");
    if (std::memcmp(hd.magic, "n+2\0", 4) != 0) throw InputError(not_nifti + "magic string is not valid");
    const std::uint8_t ok[4] = {13, 10, 26, 10}, zero[4] = {0, 0, 0, 0};
    if (std::memcmp(hd.eol, ok, 4) != 0 && std::memcmp(hd.eol, zero, 4) != 0)
      throw InputError(not_nifti + "EOL check not 0 or 13, 10, 26, 10; data may be corrupted by EOL conversion");
  }

  // data type (before the shape: as nibabel, an unknown code is a header error)
  img.datatype = hd.datatype;
  TypeInfo ti{};
  if (!type_info(hd.datatype, ti)) {
    switch (hd.datatype) {
      case 32: throw InputError(name + ": complex images are not supported (dtype complex64)");
      case 1792: throw InputError(name + ": complex images are not supported (dtype complex128)");
      case 2048: throw InputError(name + ": complex images are not supported (dtype complex256)");
      case 128:
      case 2304:
        throw InputError(name + ": image data must be numeric (bool, int, uint or float), got RGB" +
                         std::string(hd.datatype == 2304 ? "A" : "") + " data (NIfTI datatype " +
                         std::to_string(hd.datatype) + ")");
      case 1536: throw InputError(name + ": float128 images are not supported (NIfTI datatype 1536)");
      default: throw InputError(not_nifti + "data code " + std::to_string(hd.datatype) + " not supported");
    }
  }

  // shape: dim[1..dim[0]], trailing singletons dropped, limits (before anything is allocated)
  if (hd.dim[0] < 1 || hd.dim[0] > 7)
    throw InputError(not_nifti + "invalid dim[0] = " + std::to_string(hd.dim[0]) + " (corrupted header?)");
  std::vector<std::int64_t> shape(hd.dim + 1, hd.dim + 1 + hd.dim[0]);
  img.dims = check_shape(shape, name);
  std::int64_t nvox = img.dims[0] * img.dims[1] * img.dims[2];

  // affine: nibabel's header fixes first (qfac not +-1 -> 1, negative pixdim -> abs, invalid xform codes -> 0)
  double pix[3];
  for (int i = 0; i < 3; ++i) pix[i] = std::fabs(hd.pixdim[i + 1]);
  const double qfac = hd.pixdim[0] == -1.0 ? -1.0 : 1.0;
  const int sform_code = (hd.sform_code >= 1 && hd.sform_code <= 5) ? hd.sform_code : 0;
  const int qform_code = (hd.qform_code >= 1 && hd.qform_code <= 5) ? hd.qform_code : 0;
  if (sform_code) {
    img.affine = mat4_identity();
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 4; ++c) img.affine[4 * r + c] = hd.srow[r][c];
    img.affine_source = "sform";
  } else {
    for (int i = 0; i < 3; ++i)
      if (!(pix[i] != 0) || !std::isfinite(pix[i]))
        throw InputError(name + ": zero or invalid voxel size: pixdim[" + std::to_string(i + 1) + "] = " +
                         py_float(hd.pixdim[i + 1]) + " (and no sform to take the geometry from)");
    if (qform_code) {
      img.affine = qform_affine(hd, pix, qfac, not_nifti);
      img.affine_source = "qform";
    } else {  // nibabel's base affine: x flipped, centred on the middle voxel
      img.affine = mat4_identity();
      for (int i = 0; i < 3; ++i) {
        const double s = pix[i] * (i == 0 ? -1.0 : 1.0);
        img.affine[5 * i] = s;
        img.affine[4 * i + 3] = -(double(img.dims[i] - 1) / 2.0) * s;
      }
      img.affine_source = "pixdim";
    }
  }
  validate_affine(img.affine, name);
  check_world_extent(img.dims, img.affine, name);
  img.pixdim = voxel_sizes(img.affine);

  // scaling as nibabel: none when the slope is 0 or not finite; an invalid intercept is an error
  bool scale = std::isfinite(hd.slope) && hd.slope != 0.0;
  double slope = 1.0, inter = 0.0;
  if (scale) {
    if (!std::isfinite(hd.inter))
      throw InputError(not_nifti + "Valid slope but invalid intercept " + fmt_g(hd.inter));
    slope = hd.slope;
    inter = hd.inter;
    scale = !(slope == 1.0 && inter == 0.0);
  }

  // --- voxel data ---------------------------------------------------------------------------------------
  if (!std::isfinite(hd.vox_offset)) throw InputError(not_nifti + "invalid vox_offset");
  const double min_offset = double(hsize + 4);
  double off_d = hd.vox_offset;
  if (off_d == 0) throw InputError(not_nifti + "vox_offset is 0 (invalid for a single-file NIfTI)");
  if (off_d < min_offset)  // nibabel (so the SDK) refuses it: the voxels would overlap the header
    throw InputError(not_nifti + "vox offset " + fmt_g(std::trunc(off_d), 17) +
                     " too low for single file nifti1");
  if (off_d > 9.0e18) off_d = 9.0e18;
  const std::uint64_t offset = std::uint64_t(off_d);  // nibabel: int(vox_offset)
  const std::uint64_t nbytes = std::uint64_t(nvox) * ti.size;
  const std::string declared = "its header declares " + std::to_string(nbytes) + " bytes of voxel data at offset " +
                               std::to_string(offset);
  bool trusted;
  if (!img.gzip) {
    if (offset > file_size || nbytes > file_size - offset)
      throw InputError(name + ": file is truncated: " + declared + ", the file has " + std::to_string(file_size) +
                       " bytes");
    trusted = true;
  } else {
    const std::uint64_t need = offset + nbytes;
    trusted = need >= (std::uint64_t(1) << 32) ? false : gzip_isize >= need;
  }
  auto truncated_data = [&](std::uint64_t held) {
    if (!src->error().empty())
      return InputError(name + ": cannot read voxel data: corrupted gzip data (" + src->error() + ")");
    return InputError(name + ": file is truncated: " + declared + ", the " +
                      std::string(img.gzip ? "decompressed file" : "file") + " holds " + std::to_string(held) +
                      " bytes" + (src->truncated() ? " (the gzip stream ends without its end-of-stream marker)" : ""));
  };
  const std::uint64_t skipped = src->skip(offset - hsize);
  if (skipped != offset - hsize) throw truncated_data(hsize + skipped);

  if (trusted) img.data.reserve(std::size_t(nvox));
  const bool swap = file_le != host_le;
  std::vector<std::uint8_t> raw(std::min<std::size_t>(kChunkBytes, std::size_t(nbytes)) / ti.size * ti.size + ti.size);
  IntensityStats stats;
  std::uint64_t got = 0;
  while (got < nbytes) {
    const std::size_t want = std::size_t(std::min<std::uint64_t>(nbytes - got, kChunkBytes / ti.size * ti.size));
    const std::size_t k = src->read(raw.data(), want);
    const std::size_t whole = k / ti.size * ti.size;
    for (std::size_t i = 0; i < whole; i += ti.size) {
      double v = element(ti.kind, raw.data() + i, swap);
      if (scale) {  // as numpy does it in float64: arr * slope, then + inter
        if (slope != 1.0) v = v * slope;
        if (inter != 0.0) v = v + inter;
      }
      stats.add(v);
      img.data.push_back(float(v));
    }
    got += k;
    if (k < want) throw truncated_data(offset + got);
  }
  if (img.gzip) {  // to the end of the stream: verifies the gzip CRC and length, refuses far longer data
    std::uint64_t extra = 0;
    for (;;) {
      const std::size_t k = src->read(raw.data(), raw.size());
      extra += k;
      if (extra > kMaxTrailingBytes)
        throw InputError(name + ": file holds more than " + std::to_string(kMaxTrailingBytes) + " bytes beyond the " +
                         std::to_string(nbytes) + " bytes of voxel data its header declares (corrupted header?)");
      if (k < raw.size()) break;
    }
    if (!src->error().empty())
      throw InputError(name + ": cannot read voxel data: corrupted gzip data (" + src->error() + ")");
    if (src->truncated())
      throw InputError(name + ": cannot read voxel data: file is truncated (compressed file ended before the "
                       "end-of-stream marker was reached)");
  }
  check_intensities(stats, name);
  return img;
}

// --- writing -----------------------------------------------------------------------------------------------

namespace {

template <typename T>
void put(std::uint8_t* h, std::size_t off, T v) {
  std::memcpy(h + off, &v, sizeof v);  // little-endian host (checked)
}

// nibabel's set_qform: zooms = column norms, qfac = sign of det(R), the nearest rotation (polar
// decomposition) as a quaternion with a >= 0.
void qform_fields(const Mat4& A, double quat_bcd[3], double zooms[3], double& qfac) {
  double R[3][3];
  for (int c = 0; c < 3; ++c) {
    zooms[c] = std::sqrt(A[c] * A[c] + A[4 + c] * A[4 + c] + A[8 + c] * A[8 + c]);
    for (int r = 0; r < 3; ++r) R[r][c] = zooms[c] > 0 ? A[4 * r + c] / zooms[c] : (r == c ? 1.0 : 0.0);
  }
  const double det = R[0][0] * (R[1][1] * R[2][2] - R[1][2] * R[2][1]) -
                     R[0][1] * (R[1][0] * R[2][2] - R[1][2] * R[2][0]) +
                     R[0][2] * (R[1][0] * R[2][1] - R[1][1] * R[2][0]);
  qfac = det > 0 ? 1.0 : -1.0;
  if (qfac < 0)
    for (int r = 0; r < 3; ++r) R[r][2] = -R[r][2];
  // polar decomposition by iteration: Q <- (Q + Q^-T) / 2 converges to the nearest orthogonal matrix
  for (int it = 0; it < 60; ++it) {
    const double d = R[0][0] * (R[1][1] * R[2][2] - R[1][2] * R[2][1]) -
                     R[0][1] * (R[1][0] * R[2][2] - R[1][2] * R[2][0]) +
                     R[0][2] * (R[1][0] * R[2][1] - R[1][1] * R[2][0]);
    if (!(std::fabs(d) > 1e-300)) break;
    double invT[3][3];  // inverse transposed = cofactor matrix / det
    invT[0][0] = (R[1][1] * R[2][2] - R[1][2] * R[2][1]) / d;
    invT[0][1] = -(R[1][0] * R[2][2] - R[1][2] * R[2][0]) / d;
    invT[0][2] = (R[1][0] * R[2][1] - R[1][1] * R[2][0]) / d;
    invT[1][0] = -(R[0][1] * R[2][2] - R[0][2] * R[2][1]) / d;
    invT[1][1] = (R[0][0] * R[2][2] - R[0][2] * R[2][0]) / d;
    invT[1][2] = -(R[0][0] * R[2][1] - R[0][1] * R[2][0]) / d;
    invT[2][0] = (R[0][1] * R[1][2] - R[0][2] * R[1][1]) / d;
    invT[2][1] = -(R[0][0] * R[1][2] - R[0][2] * R[1][0]) / d;
    invT[2][2] = (R[0][0] * R[1][1] - R[0][1] * R[1][0]) / d;
    double change = 0;
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 3; ++c) {
        const double nv = 0.5 * (R[r][c] + invT[r][c]);
        change = std::max(change, std::fabs(nv - R[r][c]));
        R[r][c] = nv;
      }
    if (change < 1e-15) break;
  }
  // rotation matrix -> unit quaternion (Shepperd), a >= 0
  double a, b, c, d;
  const double tr = R[0][0] + R[1][1] + R[2][2];
  if (tr > 0) {
    const double s = std::sqrt(tr + 1.0) * 2;
    a = 0.25 * s;
    b = (R[2][1] - R[1][2]) / s;
    c = (R[0][2] - R[2][0]) / s;
    d = (R[1][0] - R[0][1]) / s;
  } else if (R[0][0] > R[1][1] && R[0][0] > R[2][2]) {
    const double s = std::sqrt(1.0 + R[0][0] - R[1][1] - R[2][2]) * 2;
    a = (R[2][1] - R[1][2]) / s;
    b = 0.25 * s;
    c = (R[0][1] + R[1][0]) / s;
    d = (R[0][2] + R[2][0]) / s;
  } else if (R[1][1] > R[2][2]) {
    const double s = std::sqrt(1.0 + R[1][1] - R[0][0] - R[2][2]) * 2;
    a = (R[0][2] - R[2][0]) / s;
    b = (R[0][1] + R[1][0]) / s;
    c = 0.25 * s;
    d = (R[1][2] + R[2][1]) / s;
  } else {
    const double s = std::sqrt(1.0 + R[2][2] - R[0][0] - R[1][1]) * 2;
    a = (R[1][0] - R[0][1]) / s;
    b = (R[0][2] + R[2][0]) / s;
    c = (R[1][2] + R[2][1]) / s;
    d = 0.25 * s;
  }
  if (a < 0) {
    b = -b;
    c = -c;
    d = -d;
  }
  quat_bcd[0] = b;
  quat_bcd[1] = c;
  quat_bcd[2] = d;
}

class Sink {
 public:
  Sink(const std::string& path, bool gz, int level) : path_(path), gz_(gz), out_(1 << 18) {
    f_.reset(std::fopen(path.c_str(), "wb"));
    if (!f_) throw Error("output " + path + ": cannot open for writing: " + std::strerror(errno));
    if (gz_) {
      std::memset(&zs_, 0, sizeof zs_);
      if (deflateInit2(&zs_, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        throw Error("output " + path + ": zlib deflateInit2 failed");
      open_ = true;
    }
  }
  ~Sink() {
    if (open_) deflateEnd(&zs_);
  }
  void write(const void* data, std::size_t n) {
    if (!gz_) {
      if (n && std::fwrite(data, 1, n, f_.get()) != n) fail();
      return;
    }
    zs_.next_in = static_cast<Bytef*>(const_cast<void*>(data));
    while (n) {
      const std::size_t part = std::min<std::size_t>(n, 1u << 30);
      zs_.avail_in = uInt(part);
      n -= part;
      do {
        zs_.next_out = out_.data();
        zs_.avail_out = uInt(out_.size());
        deflate(&zs_, Z_NO_FLUSH);
        flush_out();
      } while (zs_.avail_in);
    }
  }
  void close() {
    if (gz_) {
      zs_.avail_in = 0;
      int rc;
      do {
        zs_.next_out = out_.data();
        zs_.avail_out = uInt(out_.size());
        rc = deflate(&zs_, Z_FINISH);
        flush_out();
      } while (rc == Z_OK);
      if (rc != Z_STREAM_END) throw Error("output " + path_ + ": zlib deflate failed");
    }
    if (std::fflush(f_.get()) != 0) fail();
    std::FILE* f = f_.release();
    if (std::fclose(f) != 0) fail();
  }

 private:
  void flush_out() {
    const std::size_t have = out_.size() - zs_.avail_out;
    if (have && std::fwrite(out_.data(), 1, have, f_.get()) != have) fail();
  }
  [[noreturn]] void fail() {
    throw Error("output " + path_ + ": write failed: " + std::strerror(errno));
  }
  std::string path_;
  bool gz_;
  FilePtr f_;
  z_stream zs_{};
  bool open_ = false;
  std::vector<std::uint8_t> out_;
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

void write_nifti_float32(const std::string& path, const std::vector<std::int64_t>& shape, const Mat4& affine,
                         const float* data, int intent_code, const std::string& intent_name,
                         const std::string& description, int gzip_level) {
  if (gzip_level < 0 || gzip_level > 9) throw Error("output " + path + ": gzip level must be 0..9");
  if (!host_little_endian()) throw Error("output " + path + ": this build writes on little-endian hosts only");
  if (shape.empty() || shape.size() > 7) throw Error("output " + path + ": 1 to 7 dimensions expected");
  std::int64_t n = 1;
  for (auto v : shape) {
    if (v < 1 || v > 32767) throw Error("output " + path + ": dimension out of the NIfTI-1 range");
    n *= v;
  }
  std::array<std::uint8_t, 352> hb{};
  std::uint8_t* h = hb.data();
  put<std::int32_t>(h, 0, 348);
  put<std::int16_t>(h, 40, std::int16_t(shape.size()));
  for (int i = 1; i <= 7; ++i)
    put<std::int16_t>(h, 40 + 2 * i, std::int16_t(std::size_t(i) <= shape.size() ? shape[std::size_t(i - 1)] : 1));
  put<std::int16_t>(h, 68, std::int16_t(intent_code));
  put<std::int16_t>(h, 70, 16);  // float32
  put<std::int16_t>(h, 72, 32);
  double quat[3], zooms[3], qfac;
  qform_fields(affine, quat, zooms, qfac);
  put<float>(h, 76, float(qfac));
  for (int i = 0; i < 3; ++i) put<float>(h, 80 + 4 * i, float(zooms[i]));
  for (int i = 4; i <= 7; ++i) put<float>(h, 76 + 4 * i, 1.0f);
  put<float>(h, 108, 352.0f);  // vox_offset
  put<float>(h, 112, 1.0f);    // scl_slope
  put<float>(h, 116, 0.0f);    // scl_inter
  h[123] = 2;                  // xyzt_units: mm (an unknown unit reads as mm in ITK, as metres in some tools)
  std::memcpy(h + 148, description.data(), std::min<std::size_t>(description.size(), 79));
  put<std::int16_t>(h, 252, 1);  // qform_code: scanner
  put<std::int16_t>(h, 254, 1);  // sform_code: scanner
  for (int i = 0; i < 3; ++i) put<float>(h, 256 + 4 * i, float(quat[i]));
  for (int i = 0; i < 3; ++i) put<float>(h, 268 + 4 * i, float(affine[4 * i + 3]));
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 4; ++c) put<float>(h, 280 + 16 * r + 4 * c, float(affine[4 * r + c]));
  std::memcpy(h + 328, intent_name.data(), std::min<std::size_t>(intent_name.size(), 15));
  std::memcpy(h + 344, "n+1\0", 4);
  // bytes 348..351: extension flag 0

  const auto dir = std::filesystem::path(path).parent_path();
  std::random_device rd;
  const std::string tmp = (dir / ("." + std::filesystem::path(path).filename().string() + ".part" +
                                  std::to_string(::getpid()) + "-" + std::to_string(rd() % 1000000)))
                              .string();
  try {
    Sink sink(tmp, ends_with(path, ".gz"), gzip_level);
    sink.write(h, hb.size());
    sink.write(data, std::size_t(n) * sizeof(float));
    sink.close();
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw Error("output " + path + ": cannot move the written file into place: " + std::strerror(e));
  }
}

void write_nifti_float32_like(const std::string& path, const NiftiImage& geometry, const std::vector<float>& data,
                              const std::string& description) {
  const std::int64_t nvox = geometry.dims[0] * geometry.dims[1] * geometry.dims[2];
  if (std::int64_t(data.size()) != nvox)
    throw Error("output " + path + ": " + std::to_string(data.size()) + " voxels do not match the geometry's " +
                std::to_string(nvox));
  write_nifti_float32(path, {geometry.dims[0], geometry.dims[1], geometry.dims[2]}, geometry.affine, data.data(), 0,
                      "", description);
}

}  // namespace msode
