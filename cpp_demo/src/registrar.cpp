// msode::Registrar: plan bundle -> verified registrar.ts -> LibTorch inference.
#include "msode/registrar.hpp"

#include <torch/cuda.h>
#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "msode/json.hpp"
#include "msode/sha256.hpp"
#include "msode/zip.hpp"

namespace msode {
namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kRegistrarMember = "registrar.ts";
// newest plan format this reader understands: version 2 adds per-level feature networks, which registrar.ts
// embeds (this reader runs registrar.ts only, so it needs nothing else from them)
constexpr int kFormatVersion = 2;
constexpr std::uint64_t kMaxPlanBytes = std::uint64_t(2) << 30;
constexpr std::uint64_t kMaxManifestBytes = 1 << 20;
constexpr double kSpacingTolMm = 1e-3;

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::string first_line(const std::string& s) {
  auto end = s.find('\n');
  std::string line = s.substr(0, end);
  return line.size() > 300 ? line.substr(0, 300) + "..." : line;
}

std::string fmt(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::vector<std::uint8_t> read_file(const std::string& path, const std::string& label) {
  std::error_code ec;
  auto st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st)) throw Error(label + ": no such file");
  if (std::filesystem::is_directory(st)) throw Error(label + ": is a directory, not a plan file");
  if (!std::filesystem::is_regular_file(st)) throw Error(label + ": not a regular file");
  auto size = std::filesystem::file_size(path, ec);
  if (ec) throw Error(label + ": cannot read: " + ec.message());
  if (size > kMaxPlanBytes) throw Error(label + ": larger than the limit of 2 GiB");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(label + ": cannot open for reading");
  std::vector<std::uint8_t> bytes(size);
  if (size && !in.read(reinterpret_cast<char*>(bytes.data()), std::streamsize(size)))
    throw Error(label + ": read failed");
  return bytes;
}

// --- manifest field access with path-qualified errors -------------------------------------------

struct Field {
  const Json& v;
  std::string path;
  const std::string& label;

  [[noreturn]] void fail(const std::string& msg) const {
    throw Error(label + ": " + path + ": " + msg);
  }
  Field at(const char* key) const {
    if (!v.is_object()) fail("expected an object");
    const Json* child = v.find(key);
    if (!child) throw Error(label + ": " + path + "." + key + ": required field is missing");
    return {*child, path + "." + key, label};
  }
  const Json* opt(const char* key) const { return v.find(key); }
  const std::string& str() const {
    if (v.type != Json::Type::String) fail("expected a string");
    return v.string;
  }
  double num() const {
    if (v.type != Json::Type::Number) fail("expected a number");
    return v.number;
  }
  std::int64_t integer() const {
    if (v.type != Json::Type::Number || !v.integral || std::fabs(v.number) > 9.0e15)
      fail("expected an integer");
    return std::int64_t(v.number);
  }
  std::vector<Field> vec3() const {
    if (v.type != Json::Type::Array || v.array.size() != 3) fail("expected 3 values (x, y, z)");
    std::vector<Field> out;
    for (int i = 0; i < 3; ++i) out.push_back({v.array[i], path + "[" + std::to_string(i) + "]", label});
    return out;
  }
};

bool is_hex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
  return true;
}

// The message of an exception thrown while running registrar.ts. An error the module raises on purpose
// for bad input has a message starting with "InputError: " (the last line of the TorchScript traceback
// holds it: earlier lines may quote the source that builds it); anything else: its last line.
struct ScriptFailure {
  bool input = false;
  std::string message;
};

ScriptFailure script_failure(const std::string& what) {
  ScriptFailure f;
  const std::string tag = "InputError: ";
  auto pos = what.rfind(tag);
  if (pos != std::string::npos) {
    f.input = true;
    auto end = what.find('\n', pos);
    f.message = what.substr(pos + tag.size(), end == std::string::npos ? std::string::npos : end - pos - tag.size());
    return f;
  }
  std::string last;
  std::istringstream lines(what);
  for (std::string line; std::getline(lines, line);)
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  auto start = last.find_first_not_of(" \t");
  f.message = first_line(start == std::string::npos ? what : last.substr(start));
  return f;
}

}  // namespace

struct Registrar::Impl {
  std::string path, label, name;
  std::string kind = "trained";
  std::string device_name;
  std::vector<std::string> stages;
  bool has_native = false;
  bool has_measures = false;
  bool analytic = false;
  std::string rigid_init = "none";  // the first rigid stage's params.init (registrar.ts runs it)
  ModelGrid grid;
  Normalization norm;
  std::map<std::string, std::pair<std::string, std::uint64_t>> members;  // name -> (sha256, size)
  torch::Device device{torch::kCPU};
  mutable torch::jit::Module module;
  bool jit_optimize = false;
  double load_ms = 0;
};

Registrar::Registrar(const std::string& plan_path, const std::string& device, bool jit_optimize)
    : impl_(std::make_unique<Impl>()) {
  auto t0 = Clock::now();
  Impl& m = *impl_;
  m.path = plan_path;
  m.jit_optimize = jit_optimize;
  m.label = "plan '" + plan_path + "'";
  m.device_name = device;
  const std::string& label = m.label;

  try {
    m.device = torch::Device(device);
  } catch (const c10::Error&) {
    throw Error("unknown device '" + device + "'; valid: cpu, cuda, cuda:N");
  }
  if (m.device.is_cuda() && !torch::cuda::is_available())
    throw Error("device '" + device + "' requested but this LibTorch has no CUDA device available");
  if (!m.device.is_cpu() && !m.device.is_cuda())
    throw Error("unsupported device '" + device + "'; valid: cpu, cuda, cuda:N");

  ZipArchive zip(read_file(plan_path, label), label);

  // --- manifest.json --------------------------------------------------------------------------
  const ZipEntry* me = zip.find(kManifest);
  if (!me) throw Error(label + ": manifest.json is missing (not an msode plan?)");
  if (me->size > kMaxManifestBytes) throw Error(label + ": manifest.json is larger than 1 MiB");
  Json doc = parse_json(zip.read(*me), label + ": manifest.json is not valid JSON");
  Field root{doc, "manifest", label};
  if (!doc.is_object()) root.fail("expected a JSON object");
  if (root.at("format").v.type != Json::Type::String || root.at("format").str() != "msode-plan")
    root.at("format").fail("expected 'msode-plan' (not an msode plan?)");
  std::int64_t version = root.at("format_version").integer();
  if (version > kFormatVersion)
    throw Error(label + ": plan format_version " + std::to_string(version) +
                " is newer than this reader supports (" + std::to_string(kFormatVersion) +
                "); upgrade msode");
  if (version < 1) root.at("format_version").fail("must be >= 1");
  m.name = root.at("name").str();
  if (const Json* a = root.opt("analytic")) {
    if (a->type != Json::Type::Bool) Field{*a, "manifest.analytic", label}.fail("expected true or false");
    m.analytic = a->boolean;
  }
  if (m.analytic) {
    m.kind = "analytic";
  } else if (const Json* tr = root.opt("training")) {
    const Json* k = tr->find("kind");
    if (k && k->type == Json::Type::String && !k->string.empty()) m.kind = k->string;
  }
  // A rigid stage may start from an initialiser (params.init: moments | multistart); registrar.ts
  // runs it like the Python SDK. Recorded for callers (Registrar::rigid_init()) and the JSON report.
  // stages: checked as msode_sdk.plan checks them (the report names stages by them), and against the stages
  // registrar.ts was built for (manifest.registrar_ts.stages: the work is registrar.ts's)
  Field stages = root.at("stages");
  if (stages.v.type != Json::Type::Array || stages.v.array.empty()) stages.fail("expected a non-empty list");
  for (std::size_t i = 0; i < stages.v.array.size(); ++i) {
    Field st{stages.v.array[i], "manifest.stages[" + std::to_string(i) + "]", label};
    if (!st.v.is_object()) st.fail("expected an object");
    const std::string& sname = st.at("name").str();
    if (sname.empty()) st.at("name").fail("expected a non-empty string");
    m.stages.push_back(sname);
    const std::string& transform = st.at("transform").str();
    const Json* params = st.opt("params");
    const Json* init = params ? params->find("init") : nullptr;
    if (transform == "rigid" && init && init->type == Json::Type::String && init->string != "none")
      m.rigid_init = init->string;
  }
  if (const Json* rts = root.opt("registrar_ts")) {
    const Json* built = rts->find("stages");
    if (built) {
      std::vector<std::string> names;
      if (built->type == Json::Type::Array)
        for (const Json& b : built->array)
          if (b.type == Json::Type::String) names.push_back(b.string);
      if (built->type != Json::Type::Array || names.size() != built->array.size() || names != m.stages)
        Field{*built, "manifest.registrar_ts.stages", label}.fail(
            "registrar.ts was built for other stages than manifest.stages lists (rebuild it with "
            "msode_export.scripted.add_registrar_ts)");
    }
  }

  Field grid = root.at("model_grid");
  auto shape = grid.at("shape_xyz").vec3();
  auto spacing = grid.at("spacing_xyz_mm").vec3();
  for (int i = 0; i < 3; ++i) {
    m.grid.shape_xyz[i] = shape[i].integer();
    if (m.grid.shape_xyz[i] < 1 || m.grid.shape_xyz[i] > 1024) shape[i].fail("not in [1, 1024]");
    m.grid.spacing_xyz_mm[i] = spacing[i].num();
    if (!(m.grid.spacing_xyz_mm[i] > 0 && m.grid.spacing_xyz_mm[i] <= 100))
      spacing[i].fail("not in (0, 100] mm");
  }
  m.grid.orientation = grid.at("orientation").str();
  m.grid.centre = grid.at("centre").str();
  if (m.grid.orientation != "RAS") grid.at("orientation").fail("expected 'RAS'");

  Field norm = root.at("normalization");
  m.norm.method = norm.at("method").str();
  if (m.norm.method != "percentile") norm.at("method").fail("only 'percentile' is supported");
  m.norm.low = norm.at("low").num();
  m.norm.high = norm.at("high").num();
  if (!(m.norm.low >= 0 && m.norm.high <= 100 && m.norm.low < m.norm.high))
    norm.fail("expected 0 <= low < high <= 100");

  Field members = root.at("members");
  if (!members.v.is_object()) members.fail("expected an object");
  for (const auto& kv : members.v.object) {
    Field entry{kv.second, "manifest.members['" + kv.first + "']", label};
    std::string problem = member_name_problem(kv.first);
    if (!problem.empty()) entry.fail("unsafe member name: " + problem);
    if (kv.first == kManifest || kv.first.back() == '/') entry.fail("not a member file name");
    std::string digest = entry.at("sha256").str();
    if (!is_hex64(digest)) entry.at("sha256").fail("expected 64 hex digits");
    std::transform(digest.begin(), digest.end(), digest.begin(),
                   [](unsigned char c) { return char(std::tolower(c)); });
    std::int64_t size = entry.at("size").integer();
    if (size < 0) entry.at("size").fail("must be >= 0");
    m.members[kv.first] = {digest, std::uint64_t(size)};
  }

  // --- every member listed, every listed member present and intact ----------------------------
  for (const auto& e : zip.entries())
    if (e.name != kManifest && !m.members.count(e.name))
      throw Error(label + ": member '" + e.name + "' is not listed in manifest.members");
  std::string_view ts_bytes;
  for (const auto& [name, info] : m.members) {
    const ZipEntry* e = zip.find(name);
    if (!e) throw Error(label + ": member '" + name + "' is listed in manifest.members but missing");
    if (e->size != info.second)
      throw Error(label + ": member '" + name + "': size " + std::to_string(e->size) +
                  " does not match manifest.members (" + std::to_string(info.second) + ")");
    std::string_view data = zip.view(*e);
    std::string digest = Sha256::hex(data.data(), data.size());
    if (digest != info.first)
      throw Error(label + ": member '" + name + "': sha256 mismatch (manifest " +
                  info.first.substr(0, 12) + "..., content " + digest.substr(0, 12) +
                  "...): the plan is corrupted or was modified");
    data = zip.read(*e);  // CRC-32 too
    if (name == kRegistrarMember) ts_bytes = data;
  }
  if (!m.members.count(kRegistrarMember))
    throw Error(label + ": has no registrar.ts member (the whole-loop TorchScript module that C++ "
                "embedding needs; add it with msode_export.scripted)");

  // --- registrar.ts ---------------------------------------------------------------------------
  try {
    std::istringstream stream(std::string(ts_bytes), std::ios::binary);
    m.module = torch::jit::load(stream, m.device);
    m.module.eval();
  } catch (const c10::Error& exc) {
    throw Error(label + ": member 'registrar.ts' is not a loadable TorchScript module: " +
                first_line(exc.what_without_backtrace()));
  } catch (const std::exception& exc) {
    throw Error(label + ": member 'registrar.ts' cannot be loaded: " + first_line(exc.what()));
  }
  if (!m.module.find_method("forward"))
    throw Error(label + ": member 'registrar.ts' has no forward(moving, fixed) method");
  m.has_native = m.module.find_method("register_native").has_value();
  m.has_measures = m.module.find_method("register_native_measured").has_value();
  m.load_ms = ms_since(t0);
}

Registrar::~Registrar() = default;
Registrar::Registrar(Registrar&&) noexcept = default;
Registrar& Registrar::operator=(Registrar&&) noexcept = default;

const std::string& Registrar::plan_name() const { return impl_->name; }
const std::string& Registrar::plan_path() const { return impl_->path; }
const std::string& Registrar::plan_kind() const { return impl_->kind; }
std::vector<std::string> Registrar::stage_names() const { return impl_->stages; }
const std::string& Registrar::device() const { return impl_->device_name; }
bool Registrar::has_register_native() const { return impl_->has_native; }
bool Registrar::has_measures() const { return impl_->has_measures; }
ReportInfo Registrar::report_info() const {
  ReportInfo info;
  info.plan = impl_->name;
  info.plan_kind = impl_->kind;
  info.analytic_plan = impl_->analytic;
  info.device = impl_->device.str();
  info.stages = impl_->stages;
  const ModelGrid& g = impl_->grid;
  info.model_grid_domain = "model grid " + std::to_string(g.shape_xyz[0]) + "x" + std::to_string(g.shape_xyz[1]) +
                           "x" + std::to_string(g.shape_xyz[2]) + " at " + fmt_g(g.spacing_xyz_mm[0]) + "x" +
                           fmt_g(g.spacing_xyz_mm[1]) + "x" + fmt_g(g.spacing_xyz_mm[2]) + " mm";
  return info;
}
bool Registrar::analytic() const { return impl_->analytic; }
const std::string& Registrar::rigid_init() const { return impl_->rigid_init; }
const ModelGrid& Registrar::model_grid() const { return impl_->grid; }
const Normalization& Registrar::normalization() const { return impl_->norm; }
double Registrar::load_ms() const { return impl_->load_ms; }
std::vector<std::string> Registrar::member_names() const {
  std::vector<std::string> out;
  for (const auto& kv : impl_->members) out.push_back(kv.first);
  return out;
}

void Registrar::check_grid(std::array<std::int64_t, 3> dims, std::array<double, 3> spacing,
                           const std::string& what) const {
  const ModelGrid& g = impl_->grid;
  auto v3 = [](auto a) { return fmt(a[0]) + "x" + fmt(a[1]) + "x" + fmt(a[2]); };
  if (dims != g.shape_xyz)
    throw Error(what + ": dimensions " + v3(dims) + " do not match the plan's model grid " +
                v3(g.shape_xyz) + " (resample it onto the model grid first, e.g. with the Python "
                "SDK, or use `msode register`)");
  for (int i = 0; i < 3; ++i)
    if (!(std::fabs(spacing[i] - g.spacing_xyz_mm[i]) <= kSpacingTolMm))
      throw Error(what + ": voxel spacing " + v3(spacing) + " mm does not match the plan's model "
                  "grid spacing " + v3(g.spacing_xyz_mm) + " mm (tolerance 1e-3 mm)");
}

Result Registrar::register_(const float* moving, const float* fixed,
                            std::array<std::int64_t, 3> dims, std::array<double, 3> spacing) const {
  auto t0 = Clock::now();
  if (!moving || !fixed) throw Error("register_: null input buffer");
  check_grid(dims, spacing, "input");
  const std::int64_t X = dims[0], Y = dims[1], Z = dims[2], N = X * Y * Z;
  Result res;
  res.dims_xyz = dims;

  try {
    torch::NoGradGuard no_grad;
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    // NIfTI order (x fastest) is exactly a contiguous (1, 1, D=Z, H=Y, W=X) tensor.
    torch::Tensor mov = torch::from_blob(const_cast<float*>(moving), {1, 1, Z, Y, X}, opts);
    torch::Tensor fix = torch::from_blob(const_cast<float*>(fixed), {1, 1, Z, Y, X}, opts);
    for (auto* t : {&mov, &fix}) {
      if (!torch::isfinite(*t).all().item<bool>())
        throw Error(std::string(t == &mov ? "moving" : "fixed") + ": input has NaN/Inf voxels");
      *t = t->to(impl_->device, /*non_blocking=*/false, /*copy=*/true);
    }
    res.timings.input_ms = ms_since(t0);

    auto t1 = Clock::now();
    torch::jit::GraphOptimizerEnabledGuard optimize(impl_->jit_optimize);  // restores on exit
    torch::jit::IValue out = impl_->module.forward({mov, fix});
    res.timings.forward_ms = ms_since(t1);

    auto t2 = Clock::now();
    const std::string who = impl_->label + ": registrar.ts";
    if (!out.isTuple()) throw Error(who + " returned " + out.tagKind() + ", expected a tuple");
    const auto& items = out.toTupleRef().elements();
    if (items.size() < 3)
      throw Error(who + " returned a " + std::to_string(items.size()) +
                  "-tuple, expected (warped, displacement, matrix[, ...])");
    for (int i = 0; i < 3; ++i)
      if (!items[i].isTensor())
        throw Error(who + " output " + std::to_string(i) + " is not a tensor");
    torch::Tensor warped = items[0].toTensor().to(torch::kCPU, torch::kFloat32).contiguous();
    torch::Tensor disp = items[1].toTensor().to(torch::kCPU, torch::kFloat32).contiguous();
    torch::Tensor mat = items[2].toTensor().to(torch::kCPU, torch::kFloat64).contiguous();
    if (warped.sizes() != torch::IntArrayRef({1, 1, Z, Y, X}))
      throw Error(who + " returned warped of shape " + c10::str(warped.sizes()) + ", expected " +
                  c10::str(torch::IntArrayRef({1, 1, Z, Y, X})));
    if (disp.sizes() != torch::IntArrayRef({1, 3, Z, Y, X}))
      throw Error(who + " returned displacement of shape " + c10::str(disp.sizes()) +
                  ", expected " + c10::str(torch::IntArrayRef({1, 3, Z, Y, X})));
    if (mat.numel() != 16)
      throw Error(who + " returned a matrix of shape " + c10::str(mat.sizes()) + ", expected 4x4");
    for (auto* t : {&warped, &disp, &mat})
      if (!torch::isfinite(*t).all().item<bool>())
        throw Error(who + " produced non-finite values (did the registration diverge?)");
    res.warped.assign(warped.data_ptr<float>(), warped.data_ptr<float>() + N);
    res.displacement.assign(disp.data_ptr<float>(), disp.data_ptr<float>() + 3 * N);
    std::copy(mat.data_ptr<double>(), mat.data_ptr<double>() + 16, res.matrix.begin());
    res.timings.output_ms = ms_since(t2);
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& exc) {
    throw Error(impl_->label + ": registrar.ts failed: " + first_line(exc.what_without_backtrace()));
  } catch (const std::exception& exc) {  // e.g. torch::jit::JITException from a raise in the module
    throw Error(impl_->label + ": registrar.ts failed: " + first_line(exc.what()));
  }
  res.timings.total_ms = ms_since(t0);
  return res;
}

namespace {

/// register_native_measured's dictionary -> WorldMeasures (missing or malformed entries: Error).
WorldMeasures read_measures(const torch::jit::IValue& value, const std::string& who) {
  if (!value.isGenericDict()) throw Error(who + " returned measures of type " + value.tagKind() + ", expected a dict");
  WorldMeasures out;
  const auto dict = value.toGenericDict();
  auto get = [&](const char* key, bool required) -> torch::Tensor {
    auto it = dict.find(torch::jit::IValue(std::string(key)));
    if (it == dict.end()) {
      if (required) throw Error(who + " returned no '" + key + "' measure");
      return {};
    }
    if (!it->value().isTensor()) throw Error(who + " returned a '" + key + "' measure that is not a tensor");
    return it->value().toTensor().to(torch::kCPU).contiguous();
  };
  torch::Tensor sim = get("similarity", true).to(torch::kFloat64);
  out.similarity.assign(sim.data_ptr<double>(), sim.data_ptr<double>() + sim.numel());
  out.similarity_drop_warning = get("similarity_drop_warning", true).to(torch::kFloat64).item<double>();
  out.fov_cut = get("fov_cut", true).item<bool>();
  torch::Tensor masked = get("fov_masked_stages", true).to(torch::kInt64);
  out.fov_masked_stages.assign(masked.data_ptr<std::int64_t>(), masked.data_ptr<std::int64_t>() + masked.numel());
  out.content_ratio = get("content_ratio", true).to(torch::kFloat64).item<double>();
  out.content_ratio_warning = get("content_ratio_warning", true).to(torch::kFloat64).item<double>();
  out.moving_content_smaller = get("moving_content_smaller", true).item<bool>();
  torch::Tensor jmin = get("jacobian_min", false), jfrac = get("jacobian_fraction_nonpositive", false);
  if (jmin.defined() && jfrac.defined()) {
    out.has_jacobian = true;
    out.jacobian_min = jmin.to(torch::kFloat64).item<double>();
    out.jacobian_fraction_nonpositive = jfrac.to(torch::kFloat64).item<double>();
  }
  out.present = true;
  return out;
}

}  // namespace

WorldResult Registrar::register_native(const ImageView& moving, const ImageView& fixed, bool measure) const {
  auto t0 = Clock::now();
  const Impl& m = *impl_;
  if (!m.has_native)
    throw Error(m.label + ": this plan's registrar.ts predates register_native; rebuild it with "
                "msode_export.scripted.add_registrar_ts");
  validate_image(moving, "moving");
  validate_image(fixed, "fixed");
  WorldResult res;
  res.dims_xyz = fixed.dims;
  res.fixed_affine = fixed.affine;
  res.timings.validate_ms = ms_since(t0);
  const std::int64_t X = fixed.dims[0], Y = fixed.dims[1], Z = fixed.dims[2], N = X * Y * Z;
  const std::string who = m.label + ": registrar.ts register_native";
  try {
    auto t1 = Clock::now();
    torch::NoGradGuard no_grad;
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
    const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    // x-fastest buffers are contiguous (Z, Y, X) tensors; permuted, they index as [i, j, k] (NIfTI order)
    auto volume = [&](const ImageView& v) {
      torch::Tensor t = torch::from_blob(const_cast<float*>(v.data), {v.dims[2], v.dims[1], v.dims[0]}, f32)
                            .permute({2, 1, 0});
      return m.device.is_cpu() ? t : t.to(m.device);
    };
    auto affine = [&](const ImageView& v) {
      return torch::from_blob(const_cast<double*>(v.affine.data()), {4, 4}, f64).clone().to(m.device);
    };
    std::vector<torch::jit::IValue> args{volume(moving), affine(moving), volume(fixed), affine(fixed)};
    res.timings.input_ms = ms_since(t1);

    auto t2 = Clock::now();
    torch::jit::IValue out;
    {
      torch::jit::GraphOptimizerEnabledGuard optimize(m.jit_optimize);  // restores on exit
      measure = measure && m.has_measures;
      out = m.module.get_method(measure ? "register_native_measured" : "register_native")(std::move(args));
    }
    res.timings.register_ms = ms_since(t2);

    auto t3 = Clock::now();
    if (!out.isTuple()) throw Error(who + " returned " + out.tagKind() + ", expected a tuple");
    const auto& items = out.toTupleRef().elements();
    if (items.size() != (measure ? 4u : 3u))
      throw Error(who + " returned a " + std::to_string(items.size()) + "-tuple, expected (warped, displacement, matrix" +
                  (measure ? ", measures)" : ")"));
    for (int i = 0; i < 3; ++i)
      if (!items[i].isTensor()) throw Error(who + " output " + std::to_string(i) + " is not a tensor");
    torch::Tensor warped = items[0].toTensor();
    torch::Tensor disp = items[1].toTensor();
    torch::Tensor mat = items[2].toTensor();
    if (warped.sizes() != torch::IntArrayRef({X, Y, Z}))
      throw Error(who + " returned warped of shape " + c10::str(warped.sizes()) + ", expected " +
                  c10::str(torch::IntArrayRef({X, Y, Z})));
    if (disp.sizes() != torch::IntArrayRef({X, Y, Z, 3}))
      throw Error(who + " returned a displacement of shape " + c10::str(disp.sizes()) + ", expected " +
                  c10::str(torch::IntArrayRef({X, Y, Z, 3})));
    if (mat.sizes() != torch::IntArrayRef({4, 4}))
      throw Error(who + " returned a matrix of shape " + c10::str(mat.sizes()) + ", expected [4, 4]");
    // back to x-fastest buffers: (X, Y, Z) -> (Z, Y, X); (X, Y, Z, 3) -> (3, Z, Y, X), component-major
    warped = warped.to(torch::kCPU, torch::kFloat32).permute({2, 1, 0}).contiguous();
    disp = disp.to(torch::kCPU, torch::kFloat32).permute({3, 2, 1, 0}).contiguous();
    mat = mat.to(torch::kCPU, torch::kFloat64).contiguous();
    for (auto* t : {&warped, &disp, &mat})
      if (!torch::isfinite(*t).all().item<bool>())
        throw Error(who + " produced non-finite values (did the registration diverge?)");
    res.warped.assign(warped.data_ptr<float>(), warped.data_ptr<float>() + N);
    res.displacement.assign(disp.data_ptr<float>(), disp.data_ptr<float>() + 3 * N);
    std::copy(mat.data_ptr<double>(), mat.data_ptr<double>() + 16, res.matrix_ras.begin());
    if (measure) res.measures = read_measures(items[3], who);
    res.timings.output_ms = ms_since(t3);
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& exc) {
    ScriptFailure f = script_failure(exc.what_without_backtrace());
    if (f.input) throw InputError(f.message);
    throw Error(who + " failed: " + f.message);
  } catch (const std::exception& exc) {  // torch::jit::JITException from a raise in the module
    ScriptFailure f = script_failure(exc.what());
    if (f.input) throw InputError(f.message);
    throw Error(who + " failed: " + f.message);
  }
  res.timings.total_ms = ms_since(t0);
  return res;
}

std::vector<float> warp_volume(const float* volume, std::array<std::int64_t, 3> dims,
                               const std::vector<float>& displacement, Interpolation mode) {
  const std::int64_t X = dims[0], Y = dims[1], Z = dims[2], N = X * Y * Z;
  if (!volume) throw Error("warp_volume: null volume");
  if (std::int64_t(displacement.size()) != 3 * N)
    throw Error("warp_volume: displacement has " + std::to_string(displacement.size()) +
                " values, expected 3 x " + std::to_string(N));
  // grid_sample wants normalised (x, y, z) in [-1, 1] (align_corners=True), shape (1, Z, Y, X, 3).
  std::vector<float> grid(std::size_t(3 * N));
  const float sx = X > 1 ? 2.0f / float(X - 1) : 0.0f, sy = Y > 1 ? 2.0f / float(Y - 1) : 0.0f,
              sz = Z > 1 ? 2.0f / float(Z - 1) : 0.0f;
  std::int64_t i = 0;
  for (std::int64_t z = 0; z < Z; ++z)
    for (std::int64_t y = 0; y < Y; ++y)
      for (std::int64_t x = 0; x < X; ++x, ++i) {
        grid[std::size_t(3 * i)] = (float(x) + displacement[std::size_t(i)]) * sx - 1.0f;
        grid[std::size_t(3 * i + 1)] = (float(y) + displacement[std::size_t(N + i)]) * sy - 1.0f;
        grid[std::size_t(3 * i + 2)] = (float(z) + displacement[std::size_t(2 * N + i)]) * sz - 1.0f;
      }
  try {
    torch::NoGradGuard no_grad;
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor vol = torch::from_blob(const_cast<float*>(volume), {1, 1, Z, Y, X}, opts);
    torch::Tensor g = torch::from_blob(grid.data(), {1, Z, Y, X, 3}, opts);
    torch::Tensor out = at::grid_sampler(vol, g, mode == Interpolation::Linear ? 0 : 1,
                                         /*padding zeros*/ 0, /*align_corners*/ true)
                            .contiguous();
    return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + N);
  } catch (const c10::Error& exc) {
    throw Error("warp_volume: " + first_line(exc.what_without_backtrace()));
  }
}

void set_num_threads(int n) {
  if (n < 1) throw Error("the number of threads must be >= 1, got " + std::to_string(n));
  at::set_num_threads(n);
}

}  // namespace msode
