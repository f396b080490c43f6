// A minimal, defensive reader for zip archives whose members are STORED (uncompressed), as the
// msode plan writer produces them. The archive is held in memory; nothing is ever extracted.
//
// Refused (msode::Error naming the archive and member): anything that is not a zip, truncated or
// overlapping structures, zip64, multi-disk archives, compressed or encrypted members, unsafe
// member names (absolute, drive letters, backslashes, empty/"."/".." components, control
// characters), duplicate names, symbolic links and other special files, members whose data lie
// beyond the file, local headers that disagree with the central directory, CRC-32 mismatches.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace msode {

struct ZipEntry {
  std::string name;
  std::uint64_t data_offset = 0;  // of the member's bytes in the archive
  std::uint64_t size = 0;
  std::uint32_t crc32 = 0;
};

class ZipArchive {
 public:
  static constexpr std::size_t kMaxEntries = 10000;
  /// Parses and checks the central directory and every local header. `label` prefixes errors.
  ZipArchive(std::vector<std::uint8_t> bytes, std::string label);

  const std::vector<ZipEntry>& entries() const { return entries_; }  // files only, no directories
  const ZipEntry* find(std::string_view name) const;
  /// The member's bytes (a view into the archive), CRC-32 verified.
  std::string_view read(const ZipEntry& entry) const;
  /// The member's bytes without the CRC-32 check (callers that verify a stronger digest first).
  std::string_view view(const ZipEntry& entry) const;
  const std::string& label() const { return label_; }

 private:
  std::vector<std::uint8_t> bytes_;
  std::string label_;
  std::vector<ZipEntry> entries_;
};

/// Why `name` is not a safe member name, or an empty string if it is.
std::string member_name_problem(std::string_view name);

}  // namespace msode
