// A small, strict JSON (RFC 8259) parser, enough for plan manifests: depth-limited, rejects
// duplicate keys, trailing data, invalid escapes and control characters in strings.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace msode {

struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  bool integral = false;  // the number was written without fraction or exponent
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;  // insertion order

  bool is_object() const { return type == Type::Object; }
  /// The member `key` of an object, or nullptr (also for non-objects).
  const Json* find(std::string_view key) const;
};

/// Parses `text`; throws msode::Error("<label>: ...") with the byte offset of the problem.
Json parse_json(std::string_view text, const std::string& label);

}  // namespace msode
