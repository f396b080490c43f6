// Self-tests of the torch-free pieces (SHA-256, CRC-32, JSON, zip reader), and two helpers that
// tests/test_cpp_demo.py drives:
//   msode_selftest                 built-in known-answer tests; prints "ok" or the failures
//   msode_selftest sha256 FILE     lower-case hex sha256 of FILE
//   msode_selftest zip FILE        "name size sha256" per member (CRC verified), or an error
//   msode_selftest nifti FILE RAW  reads FILE as msode_register does (msode::read_nifti, role "image"):
//                                  one JSON line (dims, affine, source, version, ...) on stdout and the
//                                  float32 voxels (x fastest) into RAW; or the one-line error, exit 1
//   msode_selftest write-nifti RAW X Y Z OUT   float32 voxels from RAW written by msode::write_nifti_float32
//                                  with an oblique affine (tests the writer's header against nibabel)
//   msode_selftest itk             msode::itk_affine_text of a fixed matrix (against write_itk_affine)
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "msode/error.hpp"
#include "msode/image.hpp"
#include "msode/json.hpp"
#include "msode/nifti.hpp"
#include "msode/outputs.hpp"
#include "msode/sha256.hpp"
#include "msode/zip.hpp"

namespace {

int failures = 0;
void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAIL: " << what << "\n";
  }
}

std::vector<std::uint8_t> slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw msode::Error(path + ": cannot open");
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), {});
}

bool json_fails(const std::string& text) {
  try {
    msode::parse_json(text, "t");
  } catch (const msode::Error&) {
    return true;
  }
  return false;
}

int builtin() {
  using msode::Sha256;
  // FIPS 180-4 / NIST CAVP known answers.
  check(Sha256::hex("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");
  check(Sha256::hex("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256('abc')");
  std::string m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  check(Sha256::hex(m448.data(), m448.size()) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1", "sha256(448 bits)");
  std::string m896 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
  check(Sha256::hex(m896.data(), m896.size()) == "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1", "sha256(896 bits)");
  std::string million(1000000, 'a');
  check(Sha256::hex(million.data(), million.size()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0", "sha256(1e6 x 'a')");
  {  // streaming in odd chunks gives the same digest
    Sha256 s;
    for (std::size_t i = 0; i < million.size();) {
      std::size_t k = std::min<std::size_t>(1 + (i % 131), million.size() - i);
      s.update(million.data() + i, k);
      i += k;
    }
    auto d = s.digest();
    check(d[0] == 0xcd && d[31] == 0xd0, "sha256 streaming");
  }
  check(msode::crc32("123456789", 9) == 0xCBF43926u, "crc32('123456789')");

  // JSON
  auto j = msode::parse_json(R"({"a": [1, 2.5, -3e2], "b": {"c": "x\u00e9\"\n"}, "t": true, "n": null})", "t");
  check(j.find("a") && j.find("a")->array.size() == 3 && j.find("a")->array[0].integral &&
            !j.find("a")->array[1].integral && j.find("a")->array[2].number == -300.0, "json numbers");
  check(j.find("b")->find("c")->string == "x\xc3\xa9\"\n", "json string escapes");
  check(j.find("t")->boolean && j.find("n")->type == msode::Json::Type::Null, "json literals");
  for (const char* bad : {"", "{", "{\"a\":1,\"a\":2}", "[1,]", "{\"a\":1} x", "NaN", "[01]",
                          "\"\\ud800\"", "\"a\nb\"", "1e999", "[1 2]"})
    check(json_fails(bad), std::string("json rejects ") + bad);
  std::string deep(200, '[');
  check(json_fails(deep + std::string(200, ']')), "json depth limit");

  // member names
  using msode::member_name_problem;
  check(member_name_problem("networks/rigid_L1.ts").empty(), "name ok");
  for (const char* bad : {"", "/etc/passwd", "../x", "a/../b", "a//b", "C:x", "a\\b", "./a"})
    check(!member_name_problem(bad).empty(), std::string("name rejected: ") + bad);

  // zip: not a zip / empty
  for (std::string junk : {std::string(), std::string("hello world, definitely not a zip file")}) {
    bool threw = false;
    try {
      msode::ZipArchive z(std::vector<std::uint8_t>(junk.begin(), junk.end()), "junk");
    } catch (const msode::Error&) {
      threw = true;
    }
    check(threw, "zip rejects junk");
  }
  // report.json's measures (RegistrationResult.report's keys) and the similarity-drop rule
  {
    msode::WorldResult r;
    r.matrix_ras = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
    msode::ReportInfo info;
    info.stages = {"rigid", "bspline"};
    info.model_grid_domain = "model grid 120x120x80 at 2x2x2 mm";
    check(msode::parse_json(msode::report_json(r, info), "report").find("similarity") == nullptr,
          "report without measures has no similarity");
    r.measures.present = true;
    r.measures.similarity = {0.5, 1.23456, 1.3};
    r.measures.fov_cut = true;
    r.measures.fov_masked_stages = {1};
    r.measures.has_jacobian = true;
    r.measures.jacobian_min = 0.25;
    auto rep = msode::parse_json(msode::report_json(r, info), "report");
    const auto* sim = rep.find("similarity");
    check(sim && sim->find("start") && sim->find("start")->number == 0.5 && sim->find("rigid")->number == 1.2346 &&
              sim->find("bspline")->number == 1.3 && sim->find("metric"),
          "report similarity: start, then per stage, 4 decimals");
    const auto* fov = rep.find("fields_of_view");
    check(fov && fov->find("cut_content")->boolean && fov->find("masked_stages")->array.size() == 1 &&
              fov->find("masked_stages")->array[0].string == "bspline" && fov->find("content_ratio") &&
              fov->find("content_ratio")->number == 1.0,
          "report fields_of_view names the masked stage");
    const auto* jac = rep.find("jacobian_determinant");
    check(jac && jac->find("min")->number == 0.25 && jac->find("fraction_nonpositive")->number == 0.0 &&
              jac->find("domain")->string == info.model_grid_domain,
          "report jacobian_determinant");
    check(!r.measures.similarity_dropped(), "a registration that raised the similarity is not flagged");
    r.measures.similarity = {1.0, 0.95};
    check(!r.measures.similarity_dropped(), "a 5 % loss is within the margin");
    r.measures.similarity = {1.0, 1.2, 0.85};
    check(r.measures.similarity_dropped(), "a 15 % loss from the start is flagged");
    r.measures.content_ratio_warning = 0.35;
    check(!r.measures.content_small(), "equal content is not flagged");
    r.measures.content_ratio = 0.1;
    check(r.measures.content_small(), "a field of view holding a tenth of the other's anatomy is flagged");
  }
  if (failures) return 1;
  std::cout << "ok\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 1) return builtin();
    std::string cmd = argv[1];
    if (cmd == "sha256" && argc == 3) {
      auto bytes = slurp(argv[2]);
      std::cout << msode::Sha256::hex(bytes.data(), bytes.size()) << "\n";
      return 0;
    }
    if (cmd == "zip" && argc == 3) {
      msode::ZipArchive zip(slurp(argv[2]), argv[2]);
      for (const auto& e : zip.entries()) {
        auto data = zip.read(e);
        std::cout << e.name << " " << e.size << " " << msode::Sha256::hex(data.data(), data.size())
                  << "\n";
      }
      return 0;
    }
    if (cmd == "nifti" && argc == 4) {
      msode::NiftiImage img = msode::read_nifti(argv[2], "image");
      std::ofstream raw(argv[3], std::ios::binary);
      raw.write(reinterpret_cast<const char*>(img.data.data()), std::streamsize(img.data.size() * sizeof(float)));
      if (!raw) throw msode::Error(std::string(argv[3]) + ": write failed");
      std::cout << "{\"dims\":[" << img.dims[0] << "," << img.dims[1] << "," << img.dims[2] << "],\"affine\":[";
      for (int i = 0; i < 16; ++i) std::cout << (i ? "," : "") << msode::json_number(img.affine[i]);
      std::cout << "],\"source\":\"" << img.affine_source << "\",\"version\":" << img.version
                << ",\"big_endian\":" << (img.big_endian ? "true" : "false") << ",\"gzip\":"
                << (img.gzip ? "true" : "false") << ",\"datatype\":" << img.datatype << "}\n";
      return 0;
    }
    if (cmd == "write-nifti" && argc == 7) {
      const std::int64_t X = std::atoll(argv[3]), Y = std::atoll(argv[4]), Z = std::atoll(argv[5]);
      auto bytes = slurp(argv[2]);
      if (std::int64_t(bytes.size()) != 4 * X * Y * Z) throw msode::Error("RAW size does not match X*Y*Z floats");
      const double c = std::cos(0.3), s = std::sin(0.3);
      msode::Mat4 a = {0.9 * c, -0.9 * s, 0.0, 12.5, 0.9 * s, 0.9 * c, 0.0, -30.25, 0.0, 0.0, -4.0, 40.0, 0, 0, 0, 1};
      msode::write_nifti_float32(argv[6], {X, Y, Z}, a, reinterpret_cast<const float*>(bytes.data()), 0, "", "test");
      std::cout << "[";
      for (int i = 0; i < 16; ++i) std::cout << (i ? "," : "") << msode::json_number(a[i]);
      std::cout << "]\n";
      return 0;
    }
    if (cmd == "itk" && argc == 2) {
      const double c = std::cos(0.2), s = std::sin(0.2);
      msode::Mat4 m = {c, -s, 0.0, 4.0, s, c, 0.0, -7.0, 0.0, 0.0, 1.0, 2.5, 0, 0, 0, 1};
      std::cout << msode::itk_affine_text(m);
      return 0;
    }
    std::cerr << "usage: msode_selftest [sha256 FILE | zip FILE | nifti FILE RAW | write-nifti RAW X Y Z OUT | itk]\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "msode_selftest: error: " << e.what() << "\n";
    return 1;
  }
}
