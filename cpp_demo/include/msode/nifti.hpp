// NIfTI-1 and NIfTI-2 single-file images (.nii, .nii.gz), read as the Python SDK reads them (nibabel +
// msode_sdk.io.load_image), and float32 NIfTI-1 writing.
//
// Reading: either byte order; gzip-compressed or not (decided by the file's first bytes, so a gzipped
// file named .nii works too; multi-member gzip is accepted, every member's CRC-32 and length are
// verified by reading the stream to its end); data types uint8, int8, int16, uint16, int32, uint32,
// int64, uint64, float32, float64; scl_slope / scl_inter applied as nibabel does (no scaling when the
// slope is 0 or not finite; computed in float64, then rounded to float32); the affine from the sform
// (sform_code 1..5), else the qform (qform_code 1..5), else pixdim (nibabel's base affine); trailing
// singleton dimensions dropped. Header values are checked (image.hpp: shape, type, affine, world
// extent) before any voxel buffer is allocated, and the data against the file: an uncompressed file
// must hold what the header declares before anything is read; a gzip stream is inflated in chunks, and
// the declared size is allocated up front only when the gzip trailer agrees, so a lying header costs
// what the file really holds. Every failure is an msode::InputError naming the input and the problem.
//
// Deliberate differences from nibabel: a zero pixdim[1..3] in a file whose affine comes from the qform
// or pixdim is refused (nibabel silently substitutes 1 mm); .hdr/.img pairs, bzip2, Analyze 7.5 and
// complex / RGB / float128 data are refused.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "msode/image.hpp"

namespace msode {

struct NiftiImage {
  std::array<std::int64_t, 3> dims{};  // X, Y, Z
  std::array<double, 3> pixdim{};      // voxel sizes in mm (column norms of the affine)
  int datatype = 0;                    // NIfTI datatype code as stored
  int version = 1;                     // 1 or 2
  bool big_endian = false;
  bool gzip = false;
  std::vector<float> data;             // X*Y*Z, x fastest, scaling applied
  Mat4 affine{};                       // voxel -> RAS mm, row-major
  std::string affine_source;           // "sform", "qform" or "pixdim"
  std::string path;
  std::string name;                    // "<role> (<file name>)", the prefix of error messages

  ImageView view() const { return {data.data(), dims, affine}; }
};

/// Reads and validates `path` (see the header comment). `role` ("moving", "fixed") starts every
/// message, as in the SDK: "moving: file not found: x.nii", "fixed (f.nii.gz): image has 3 NaN/Inf
/// voxels".
NiftiImage read_nifti(const std::string& path, const std::string& role = "image");

/// Writes a float32 NIfTI-1 image, little-endian, gzip-compressed when `path` ends in ".gz" (at
/// `gzip_level`: 1 as nibabel; 0 stores the data uncompressed in a valid gzip stream, which the SDK uses for
/// displacement fields: their float noise leaves level 1 a 10 % gain for ~10x the time). `shape`: up to 7 dims, x fastest (e.g. {X, Y, Z} or {X, Y, Z, 1, 3} for the
/// ITK/ANTs displacement layout); `affine` goes into both the sform and the qform (codes 1; the qform
/// gets the nearest rotation, as nibabel's set_qform), pixdim the voxel sizes. `intent_code` /
/// `intent_name` as given (1007 "msode_disp" for displacements). Written to a temporary file next to
/// `path` and renamed into place.
void write_nifti_float32(const std::string& path, const std::vector<std::int64_t>& shape, const Mat4& affine,
                         const float* data, int intent_code = 0, const std::string& intent_name = "",
                         const std::string& description = "", int gzip_level = 1);

/// Legacy helper: `data` with the dims and affine of `geometry` (float32, NIfTI-1).
void write_nifti_float32_like(const std::string& path, const NiftiImage& geometry, const std::vector<float>& data,
                              const std::string& description);

}  // namespace msode
