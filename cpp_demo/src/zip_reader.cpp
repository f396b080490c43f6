#include "msode/zip.hpp"

#include <algorithm>
#include <set>
#include <sstream>

#include "msode/error.hpp"
#include "msode/sha256.hpp"

namespace msode {
namespace {

constexpr std::uint32_t kEocdSig = 0x06054b50;
constexpr std::uint32_t kCentralSig = 0x02014b50;
constexpr std::uint32_t kLocalSig = 0x04034b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint32_t kIfmt = 0170000, kIflnk = 0120000, kIfreg = 0100000, kIfdir = 0040000;
constexpr std::size_t kMaxNameChars = 1024;

std::uint16_t u16(const std::uint8_t* p) { return std::uint16_t(p[0] | (p[1] << 8)); }
std::uint32_t u32(const std::uint8_t* p) {
  return std::uint32_t(p[0]) | (std::uint32_t(p[1]) << 8) | (std::uint32_t(p[2]) << 16) |
         (std::uint32_t(p[3]) << 24);
}

std::string shown(std::string_view name) {
  std::string out = "'";
  for (char ch : name.substr(0, 200)) {
    auto c = static_cast<unsigned char>(ch);
    if (c < 32 || c == 127 || c == '\'' || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  if (name.size() > 200) out += "...";
  return out + "'";
}

}  // namespace

std::string member_name_problem(std::string_view name) {
  if (name.empty()) return "empty name";
  if (name.size() > kMaxNameChars) return "longer than 1024 characters";
  for (char ch : name) {
    auto c = static_cast<unsigned char>(ch);
    if (c == 0) return "contains a NUL byte";
    if (c < 32 || c == 127) return "contains control characters";
    if (c == '\\') return "contains a backslash";
  }
  if (name.front() == '/') return "is an absolute path";
  if (name.size() >= 2 && name[1] == ':' &&
      ((name[0] >= 'A' && name[0] <= 'Z') || (name[0] >= 'a' && name[0] <= 'z')))
    return "starts with a drive letter";
  std::string_view body = name.back() == '/' ? name.substr(0, name.size() - 1) : name;
  std::size_t start = 0;
  while (true) {
    std::size_t end = body.find('/', start);
    std::string_view part = body.substr(start, end == std::string_view::npos ? end : end - start);
    if (part.empty()) return "has an empty path component";
    if (part == "." || part == "..") return "has a '" + std::string(part) + "' path component";
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  return "";
}

ZipArchive::ZipArchive(std::vector<std::uint8_t> bytes, std::string label)
    : bytes_(std::move(bytes)), label_(std::move(label)) {
  const std::uint8_t* d = bytes_.data();
  const std::uint64_t size = bytes_.size();
  auto fail = [&](const std::string& msg) -> void { throw Error(label_ + ": " + msg); };
  if (size == 0) fail("empty file (not a zip file)");
  if (size < 22) fail("not a zip file (too short for an end-of-central-directory record)");

  // End of central directory: the last record whose comment runs exactly to the end of the file.
  std::int64_t eocd = -1;
  std::int64_t lowest = std::max<std::int64_t>(0, std::int64_t(size) - 22 - 65535);
  for (std::int64_t pos = std::int64_t(size) - 22; pos >= lowest; --pos) {
    if (u32(d + pos) == kEocdSig && std::uint64_t(pos) + 22 + u16(d + pos + 20) == size) {
      eocd = pos;
      break;
    }
  }
  if (eocd < 0) fail("not a zip file, or truncated (no end-of-central-directory record)");
  const std::uint8_t* e = d + eocd;
  if (u16(e + 4) != 0 || u16(e + 6) != 0 || u16(e + 8) != u16(e + 10))
    fail("multi-disk zip archives are not supported");
  std::uint64_t count = u16(e + 10), cd_size = u32(e + 12), cd_offset = u32(e + 16);
  if (count == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_offset == 0xFFFFFFFFu ||
      (eocd >= 20 && u32(d + eocd - 20) == kZip64LocatorSig))
    fail("zip64 archives are not supported");
  if (count > kMaxEntries)
    fail(std::to_string(count) + " zip entries, more than the limit of " +
         std::to_string(kMaxEntries));
  if (cd_offset + cd_size > std::uint64_t(eocd))
    fail("truncated or corrupted: the central directory lies beyond the end of the file");

  std::set<std::string> seen;
  struct Span { std::uint64_t begin, end; std::string name; };
  std::vector<Span> spans;
  std::uint64_t pos = cd_offset;
  for (std::uint64_t i = 0; i < count; ++i) {
    if (pos + 46 > cd_offset + cd_size || u32(d + pos) != kCentralSig)
      fail("corrupted central directory (entry " + std::to_string(i) + ")");
    const std::uint8_t* c = d + pos;
    std::uint16_t made_by = u16(c + 4), flags = u16(c + 8), method = u16(c + 10);
    std::uint32_t crc = u32(c + 16), csize = u32(c + 20), usize = u32(c + 24);
    std::uint16_t nlen = u16(c + 28), elen = u16(c + 30), clen = u16(c + 32);
    std::uint32_t ext_attr = u32(c + 38), local = u32(c + 42);
    (void)made_by;
    if (pos + 46 + nlen + elen + clen > cd_offset + cd_size)
      fail("corrupted central directory (entry " + std::to_string(i) + " runs past its end)");
    std::string name(reinterpret_cast<const char*>(c + 46), nlen);
    pos += 46 + std::uint64_t(nlen) + elen + clen;

    std::string problem = member_name_problem(name);
    if (!problem.empty()) fail("unsafe member name " + shown(name) + ": " + problem);
    if (!seen.insert(name).second) fail("duplicate member " + shown(name));
    std::uint32_t mode = (ext_attr >> 16) & kIfmt;
    if (mode == kIflnk) fail("member " + shown(name) + " is a symbolic link");
    if (flags & 0x41) fail("member " + shown(name) + " is encrypted");
    if (name.back() == '/') {
      if ((mode != 0 && mode != kIfdir) || usize != 0)
        fail("member " + shown(name) + " is not a plain directory entry");
      continue;
    }
    if (mode != 0 && mode != kIfreg) fail("member " + shown(name) + " is not a regular file");
    if (method != 0) {
      fail("member " + shown(name) + " is compressed (zip method " + std::to_string(method) +
           (method == 8 ? ", deflate" : "") +
           "); only stored (uncompressed) members are supported, as msode's plan writer produces");
    }
    if (csize != usize) fail("member " + shown(name) + " is stored but its sizes disagree");

    // Local header: must exist, agree on name and method, and its data must lie inside the file
    // before the central directory.
    if (std::uint64_t(local) + 30 > cd_offset || u32(d + local) != kLocalSig)
      fail("member " + shown(name) + ": corrupted or missing local header");
    const std::uint8_t* l = d + local;
    std::uint16_t lflags = u16(l + 6), lmethod = u16(l + 8), lnlen = u16(l + 26), lelen = u16(l + 28);
    std::uint64_t data_off = std::uint64_t(local) + 30 + lnlen + lelen;
    if (data_off > cd_offset)
      fail("member " + shown(name) + ": local header runs past the start of the central directory");
    if (lmethod != method || (lflags & 0x41) != (flags & 0x41) ||
        std::string_view(reinterpret_cast<const char*>(l + 30), lnlen) != name)
      fail("member " + shown(name) + ": local header disagrees with the central directory");
    if (data_off + usize > cd_offset)
      fail("member " + shown(name) + " (" + std::to_string(usize) +
           " bytes) extends beyond the file: truncated or corrupted");
    spans.push_back({local, data_off + usize, name});
    entries_.push_back({name, data_off, usize, crc});
  }
  if (pos != cd_offset + cd_size) fail("corrupted central directory (size mismatch)");
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (std::size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      fail("members " + shown(spans[i - 1].name) + " and " + shown(spans[i].name) + " overlap");
}

const ZipEntry* ZipArchive::find(std::string_view name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

std::string_view ZipArchive::view(const ZipEntry& entry) const {
  return std::string_view(reinterpret_cast<const char*>(bytes_.data()) + entry.data_offset,
                          entry.size);
}

std::string_view ZipArchive::read(const ZipEntry& entry) const {
  std::string_view view = this->view(entry);
  if (crc32(view.data(), view.size()) != entry.crc32)
    throw Error(label_ + ": member " + shown(entry.name) +
                " is corrupted (CRC-32 mismatch): the plan is corrupted or was modified");
  return view;
}

}  // namespace msode
