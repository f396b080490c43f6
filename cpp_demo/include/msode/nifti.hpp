// Uncompressed single-file NIfTI-1 (.nii) reading and writing, little-endian only.
//
// Reads 3-D scalar images (trailing singleton dimensions allowed) of type uint8, int16 or float32,
// honouring vox_offset and scl_slope/scl_inter; returns float32 voxels in NIfTI order (x fastest).
// Refuses, with an msode::Error naming the file: missing/unreadable files, gzip (.nii.gz), NIfTI-2,
// big-endian files, header/image pairs, other data types, non-3-D images, truncated data, NaN/Inf.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace msode {

struct NiftiImage {
  std::array<std::int64_t, 3> dims{};    // X, Y, Z
  std::array<double, 3> pixdim{};        // mm (pixdim[1..3])
  int datatype = 0;                      // as stored in the file (2, 4 or 16)
  std::vector<float> data;               // X*Y*Z, x fastest, scaling applied
  std::array<double, 16> affine{};       // voxel -> RAS mm, row-major (sform, else qform, else pixdim)
  std::string affine_source;             // "sform", "qform" or "pixdim"
  std::array<std::uint8_t, 348> header{};  // the raw header (to copy geometry into outputs)
  std::string path;
};

NiftiImage read_nifti(const std::string& path, const std::string& role = "image");

/// Writes `data` (dims of `geometry`, x fastest) as float32 with the geometry of `geometry`
/// (dim, pixdim, qform, sform, units). Written to a temporary file and renamed into place.
void write_nifti_float32_like(const std::string& path, const NiftiImage& geometry,
                              const std::vector<float>& data, const std::string& description);

}  // namespace msode
