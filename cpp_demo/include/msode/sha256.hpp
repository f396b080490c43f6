// SHA-256 (FIPS 180-4) and CRC-32 (zip/IEEE 802.3), self-contained.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace msode {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t size);
  /// The digest; the object must not be updated afterwards.
  std::array<std::uint8_t, 32> digest();
  /// Lower-case hex digest of `data`.
  static std::string hex(const void* data, std::size_t size);

 private:
  void block(const std::uint8_t* p);
  std::array<std::uint32_t, 8> h_;
  std::array<std::uint8_t, 64> buf_{};
  std::size_t buf_len_ = 0;
  std::uint64_t total_ = 0;
  bool done_ = false;
};

std::uint32_t crc32(const void* data, std::size_t size, std::uint32_t crc = 0);

}  // namespace msode
