#include "artifact.h"

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <limits>
#include <optional>
#include <regex>
#include <set>

#include "cpu.h"
#include "crc32.h"
#include "dtype.h"
#include "sha256.h"
#include "text.h"

namespace edgeq {
namespace {

namespace ffi = tvm::ffi;

constexpr uint64_t kMaxFileBytes = uint64_t(1) << 31;
constexpr uint64_t kMaxManifestBytes = 1 << 20;
constexpr size_t kMaxManifestDepth = 32;
constexpr size_t kMaxMembers = 64;
constexpr char kManifest[] = "manifest.json";

// The safe-name rule (docs/artifact.md): every name that reaches a file system, the members and the `file` of every
// input and output, follows it. Its Python twin is edgeq_runtime.names.SAFE_NAME.
constexpr char kSafeName[] = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
constexpr char kQuantizerName[] = "[A-Za-z_][A-Za-z0-9_]{0,63}";
// std::regex recurses once per character: longer text, which no rule here allows, is refused before matching.
constexpr size_t kMaxMatchedChars = 1024;

constexpr size_t kMaxTensors = 64;
constexpr size_t kMaxDims = 8;
constexpr size_t kMaxTensorNameChars = 256;
constexpr int64_t kMaxDim = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxTensorBytes = int64_t(1) << 31;
constexpr int64_t kMaxMemberBytes = int64_t(1) << 31;

static_assert(std::numeric_limits<float>::is_iec559, "float32 scales are checked as IEEE single precision");

bool FullMatch(const std::string& text, const char* rule) {
  return text.size() <= kMaxMatchedChars && std::regex_match(text, std::regex(rule));
}

bool IsSafeName(const std::string& name) { return FullMatch(name, kSafeName) && name != kManifest; }

struct Entry {
  std::string name;
  uint64_t offset = 0;  // of the member's data
  uint64_t size = 0;
};

class Reader {
 public:
  Reader(std::string path, std::vector<uint8_t> bytes) : path_(std::move(path)), bytes_(std::move(bytes)) {}

  [[noreturn]] void Fail(const std::string& problem) const { throw Error(path_ + ": " + problem); }

  uint64_t U16(uint64_t at) const {
    Need(at, 2);
    return uint64_t(bytes_[at]) | uint64_t(bytes_[at + 1]) << 8;
  }
  uint64_t U32(uint64_t at) const {
    Need(at, 4);
    return U16(at) | U16(at + 2) << 16;
  }
  void Need(uint64_t at, uint64_t count) const {
    if (at > bytes_.size() || count > bytes_.size() - at) Fail("truncated or damaged (a zip structure points past the end)");
  }

  // The members in the central directory's order, each checked against its local header and its CRC-32.
  std::vector<Entry> Entries() const {
    if (bytes_.size() < 22) Fail("not an edgeq artifact, or truncated (too short for a zip file)");
    // The end-of-central-directory record: the last 22 bytes plus a comment of up to 65535 bytes.
    std::optional<uint64_t> end;
    uint64_t lowest = bytes_.size() > 22 + 65535 ? bytes_.size() - 22 - 65535 : 0;
    for (uint64_t at = bytes_.size() - 22 + 1; at-- > lowest;) {
      if (U32(at) == 0x06054b50) {
        end = at;
        break;
      }
    }
    if (!end) Fail("not an edgeq artifact, or truncated (no zip central directory)");
    uint64_t count = U16(*end + 10);
    uint64_t directory_size = U32(*end + 12);
    uint64_t directory = U32(*end + 16);
    if (count == 0xffff || directory == 0xffffffff) Fail("zip64 archives are not edgeq artifacts");
    if (count > kMaxMembers) Fail(std::to_string(count) + " members (allowed: at most " + std::to_string(kMaxMembers) + ")");
    Need(directory, directory_size);
    std::vector<Entry> entries;
    uint64_t at = directory;
    for (uint64_t i = 0; i < count; ++i) {
      if (U32(at) != 0x02014b50) Fail("damaged zip central directory");
      uint64_t flags = U16(at + 8), method = U16(at + 10);
      uint64_t crc = U32(at + 16), packed = U32(at + 20), size = U32(at + 24);
      uint64_t name_length = U16(at + 28), extra_length = U16(at + 30), comment_length = U16(at + 32);
      uint64_t local = U32(at + 42);
      Need(at + 46, name_length);
      std::string name = Printable(std::string(reinterpret_cast<const char*>(bytes_.data() + at + 46), name_length));
      if (flags & 1) Fail("member " + name + " is encrypted");
      if (method != 0 || packed != size) Fail("member " + name + " is compressed; edgeq artifacts store members uncompressed");
      Entry entry{name, LocalData(local, name, crc, size), size};
      if (Crc32(Data(entry), size) != crc) Fail(Subject(name) + " fails its CRC check (the file was modified or damaged)");
      entries.push_back(entry);
      at += 46 + name_length + extra_length + comment_length;
    }
    return entries;
  }

  const uint8_t* Data(const Entry& entry) const { return bytes_.data() + entry.offset; }

 private:
  static std::string Subject(const std::string& name) { return name == kManifest ? name : "member " + name; }

  // The offset of a member's data, after its local header, which must agree with the central one.
  uint64_t LocalData(uint64_t local, const std::string& name, uint64_t crc, uint64_t size) const {
    if (U32(local) != 0x04034b50) Fail("damaged zip local header of member " + name);
    uint64_t name_length = U16(local + 26), extra_length = U16(local + 28);
    Need(local + 30, name_length);
    if (Printable(std::string(reinterpret_cast<const char*>(bytes_.data() + local + 30), name_length)) != name) {
      Fail("member " + name + ": local and central zip headers disagree");
    }
    if (U32(local + 14) != crc) Fail(Subject(name) + " fails its CRC check (its zip headers disagree)");
    uint64_t data = local + 30 + name_length + extra_length;
    Need(data, size);
    return data;
  }

  std::string path_;
  std::vector<uint8_t> bytes_;
};

// What JSON text holds outside its strings, found before the parser sees it.
struct JsonScan {
  bool too_deep = false;  // arrays and objects nest deeper than the limit: the parser recurses once per level
  size_t keys = 0;        // object keys (one ':' each): a key given twice in one object leaves fewer once parsed
  bool constant = false;  // NaN or Infinity, which the parser takes but JSON has not
};

JsonScan Scan(const std::string& text, size_t depth_limit) {
  JsonScan scan;
  size_t depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > depth_limit) {
        scan.too_deep = true;
        return scan;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    } else if (c == ':') {
      ++scan.keys;
    } else if (c == 'N' || c == 'I') {  // no JSON literal outside a string has them
      scan.constant = true;
    }
  }
  return scan;
}

// The keys of every object in `value` (nested at most the depth limit: the recursion is bounded).
size_t CountKeys(const ffi::Any& value) {
  size_t keys = 0;
  if (auto object = value.as<ffi::Map<ffi::Any, ffi::Any>>()) {
    keys += object->size();
    for (const auto& [key, item] : *object) keys += CountKeys(item);
  } else if (auto array = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *array) keys += CountKeys(item);
  }
  return keys;
}

// ---- typed access to the parsed manifest ------------------------------------------------------------------

std::string Quoted(const std::string& text) { return "\"" + text + "\""; }

// A key as a field path writes it: `.key` for an identifier, `["model.so"]` for another.
std::string PathStep(const std::string& key) {
  bool identifier = !key.empty() && !std::isdigit(static_cast<unsigned char>(key[0])) &&
                    std::all_of(key.begin(), key.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
  if (!identifier) {
    std::string escaped;
    for (char c : key) escaped += c == '"' || c == '\\' ? std::string("\\") + c : std::string(1, c);
    return "[" + Quoted(escaped) + "]";
  }
  return "." + key;
}

// "a", "b" or "c"
std::string Alternatives(const std::vector<std::string>& choices) {
  std::string text;
  for (size_t i = 0; i < choices.size(); ++i) {
    text += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + Quoted(choices[i]);
  }
  return text;
}

// A value of the parsed manifest and its path in it ("inputs[0].quant.scale[3]"), which every message names.
class Field {
 public:
  Field(const Reader& reader, std::string path, ffi::Any value) : reader_(reader), path_(std::move(path)), value_(std::move(value)) {}

  // "<artifact>: manifest.json: <path> <problem>"
  [[noreturn]] void Fail(const std::string& problem) const {
    reader_.Fail(std::string(kManifest) + (path_.empty() ? "" : ": " + path_) + " " + problem);
  }

  // The value as JSON, shortened, for messages.
  std::string Shown() const {
    std::string text = Printable(std::string(ffi::json::Stringify(value_)));
    return text.size() > 60 ? text.substr(0, 57) + "..." : text;
  }

  const std::string& Path() const { return path_; }
  bool IsNull() const { return value_ == nullptr; }
  bool IsString() const { return value_.as<ffi::String>().has_value(); }

  void ExpectObject() const { Object(); }

  bool Has(const std::string& key) const {
    auto object = value_.as<ffi::Map<ffi::Any, ffi::Any>>();
    return object && object->find(ffi::String(key)) != object->end();
  }

  Field Key(const std::string& key) const {
    ffi::Map<ffi::Any, ffi::Any> object = Object();
    auto found = object.find(ffi::String(key));
    if (found == object.end()) Child(key, nullptr).Fail("is missing");
    return Child(key, (*found).second);
  }

  // Refuses any key but `known`.
  void Keys(const std::vector<std::string>& known) const {
    for (const auto& [key, item] : Entries()) {
      if (std::find(known.begin(), known.end(), key) == known.end()) {
        std::string list;
        for (const std::string& name : known) list += (list.empty() ? "" : ", ") + name;
        item.Fail("is not a known key (known: " + list + ")");
      }
    }
  }

  std::vector<std::pair<std::string, Field>> Entries() const {
    std::vector<std::pair<std::string, Field>> entries;
    for (const auto& [key, item] : Object()) {
      auto name = key.as<ffi::String>();
      if (!name) Fail("has a key that is not a string");
      std::string text = Printable(std::string(*name));
      entries.push_back({text, Child(text, item)});
    }
    return entries;
  }

  std::vector<Field> Items() const {
    auto array = value_.as<ffi::Array<ffi::Any>>();
    if (!array) Fail("must be a list; got " + Shown());
    std::vector<Field> items;
    for (size_t i = 0; i < array->size(); ++i) items.emplace_back(reader_, path_ + "[" + std::to_string(i) + "]", (*array)[i]);
    return items;
  }

  std::string Str() const {
    auto text = value_.as<ffi::String>();
    if (!text) Fail("must be a string; got " + Shown());
    return std::string(*text);
  }

  std::string Choice(const std::vector<std::string>& choices) const {
    auto text = value_.as<ffi::String>();
    if (!text || std::find(choices.begin(), choices.end(), std::string(*text)) == choices.end()) {
      Fail("must be " + Alternatives(choices) + "; got " + Shown());
    }
    return std::string(*text);
  }

  // A JSON integer (not true, 1.0 or "1") from `low` to `high`.
  int64_t Int(int64_t low, int64_t high, const std::string& why = "") const {
    auto number = value_.as<int64_t>();
    if (!number || *number < low || *number > high) {
      std::string range = high == std::numeric_limits<int64_t>::max() ? ">= " + std::to_string(low)
                                                                      : "from " + std::to_string(low) + " to " + std::to_string(high);
      Fail("must be an integer " + range + why + "; got " + Shown());
    }
    return *number;
  }

  // A JSON number, integer or not (not true or "1").
  std::optional<double> Number() const {
    if (auto number = value_.as<int64_t>()) return double(*number);
    if (auto number = value_.as<double>()) return *number;
    return std::nullopt;
  }

 private:
  ffi::Map<ffi::Any, ffi::Any> Object() const {
    auto object = value_.as<ffi::Map<ffi::Any, ffi::Any>>();
    if (!object) Fail("must be an object; got " + Shown());
    return *object;
  }

  Field Child(const std::string& key, ffi::Any value) const {
    std::string step = PathStep(key);
    return {reader_, path_.empty() && step[0] == '.' ? step.substr(1) : path_ + step, std::move(value)};
  }

  const Reader& reader_;
  std::string path_;
  ffi::Any value_;
};

// ---- the manifest's fields (docs/artifact.md, "Validation") ------------------------------------------------

struct Listed {
  int64_t size;
  std::string sha256;
};

void CheckMemberName(const Reader& reader, const std::string& name, const std::string& where) {
  if (!IsSafeName(name)) {
    reader.Fail(where + "member name '" + Printable(name) + "' is not allowed (plain file names only: " + kSafeName + ")");
  }
}

size_t Utf8Chars(const std::string& text) {
  return size_t(std::count_if(text.begin(), text.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }));
}

// `scale` and `zero_point` per tensor or per channel along `axis`, for an integer dtype only.
void ParseQuant(const Field& quant, const Dtype& dtype, TensorInfo* info) {
  quant.Keys({"scale", "zero_point", "axis"});
  if (!dtype.integer) quant.Fail("must be null for a " + std::string(dtype.name) + " tensor");
  Field scales = quant.Key("scale");
  for (const Field& scale : scales.Items()) {
    std::optional<double> value = scale.Number();
    float single = value ? float(*value) : 0.0f;
    if (!value || !(*value > 0) || !std::isfinite(*value) || !(single > 0) || !std::isfinite(single)) {
      scale.Fail("must be a finite positive number, also as float32; got " + scale.Shown());
    }
    info->scale.push_back(single);
  }
  if (info->scale.empty()) scales.Fail("must list at least one scale");
  std::vector<Field> zero_points = quant.Key("zero_point").Items();
  if (zero_points.size() != info->scale.size()) {
    quant.Key("zero_point").Fail("must list as many zero points as there are scales (" + std::to_string(info->scale.size()) +
                                 "); got " + std::to_string(zero_points.size()));
  }
  for (const Field& zero_point : zero_points) {
    info->zero_point.push_back(zero_point.Int(dtype.low, dtype.high, " (" + std::string(dtype.name) + ")"));
  }
  Field axis = quant.Key("axis");
  if (axis.IsNull()) {
    if (info->scale.size() != 1) scales.Fail("must list one scale when axis is null; got " + std::to_string(info->scale.size()));
    return;
  }
  if (info->shape.empty()) axis.Fail("must be null for a tensor without dimensions; got " + axis.Shown());
  info->axis = int(axis.Int(0, int64_t(info->shape.size()) - 1, " (a dimension of the tensor)"));
  int64_t channels = info->shape[info->axis];
  if (info->scale.size() != 1 && int64_t(info->scale.size()) != channels) {
    scales.Fail("must list 1 or " + std::to_string(channels) + " scales (shape[" + std::to_string(info->axis) + "]); got " +
                std::to_string(info->scale.size()));
  }
}

TensorInfo ParseTensor(const Field& entry, bool input) {
  std::vector<std::string> keys = {"name", "file", "shape", "dtype", "quant"};
  if (input) keys.push_back("quantizer");
  entry.Keys(keys);
  TensorInfo info;
  Field name = entry.Key("name");
  info.name = name.Str();
  if (info.name.empty() || Utf8Chars(info.name) > kMaxTensorNameChars) {
    name.Fail("must have 1 to " + std::to_string(kMaxTensorNameChars) + " characters; got " + name.Shown());
  }
  Field file = entry.Key("file");
  info.file = file.Str();
  if (!IsSafeName(info.file)) file.Fail("'" + Printable(info.file) + "' is not allowed (plain file names only: " + kSafeName + ")");
  info.dtype = entry.Key("dtype").Choice(DtypeNames());
  const Dtype& dtype = *FindDtype(info.dtype);
  Field shape = entry.Key("shape");
  std::vector<Field> dims = shape.Items();
  if (dims.size() > kMaxDims) shape.Fail("must have at most " + std::to_string(kMaxDims) + " dimensions; got " + std::to_string(dims.size()));
  int64_t bytes = int64_t(dtype.bytes);
  for (const Field& dim : dims) {
    info.shape.push_back(dim.Int(1, kMaxDim));
    if (__builtin_mul_overflow(bytes, info.shape.back(), &bytes) || bytes > kMaxTensorBytes) {
      shape.Fail("makes a tensor of more than 2^31 bytes (" + info.dtype + ")");
    }
  }
  Field quant = entry.Key("quant");
  if (!quant.IsNull()) {
    info.quantized = true;
    ParseQuant(quant, dtype, &info);
  }
  if (entry.Has("quantizer")) {
    Field quantizer = entry.Key("quantizer");
    if (!info.quantized) quantizer.Fail("is for quantized inputs only (quant is null)");
    info.quantizer = quantizer.Str();
    if (!FullMatch(info.quantizer, kQuantizerName)) {
      quantizer.Fail("must be a function name (" + std::string(kQuantizerName) + "); got " + quantizer.Shown());
    }
  }
  return info;
}

std::vector<TensorInfo> ParseTensors(const Field& list, bool input) {
  std::vector<Field> entries = list.Items();
  if (entries.empty() || entries.size() > kMaxTensors) {
    list.Fail("must list 1 to " + std::to_string(kMaxTensors) + " tensors; got " + std::to_string(entries.size()));
  }
  std::vector<TensorInfo> tensors;
  for (const Field& entry : entries) {
    TensorInfo info = ParseTensor(entry, input);
    for (size_t i = 0; i < tensors.size(); ++i) {
      for (const char* key : {"name", "file"}) {
        Field value = entry.Key(key), earlier = entries[i].Key(key);
        if (value.Str() == earlier.Str()) value.Fail("repeats " + earlier.Path() + " (" + value.Shown() + ")");
      }
    }
    tensors.push_back(std::move(info));
  }
  return tensors;
}

void ParseLibrary(const Field& library, Manifest* manifest) {
  library.Keys({"member", "arch", "entry", "format", "cpu_features"});
  manifest->library_member = library.Key("member").Str();
  manifest->arch = library.Key("arch").Choice(ArchNames());
  library.Key("entry").Choice({"main"});
  library.Key("format").Choice({"tvm-relax-vm"});
  std::vector<std::string> known = CpuFeatureNames(manifest->arch);
  for (const Field& item : library.Key("cpu_features").Items()) {
    std::string feature = item.Choice(known);
    if (std::count(manifest->cpu_features.begin(), manifest->cpu_features.end(), feature)) item.Fail("repeats " + item.Shown());
    manifest->cpu_features.push_back(feature);
  }
}

std::map<std::string, Listed> ParseMembers(const Reader& reader, const Field& members) {
  std::map<std::string, Listed> listed;
  for (const auto& [name, entry] : members.Entries()) {
    CheckMemberName(reader, name, std::string(kManifest) + ": members: ");
    entry.Keys({"size", "sha256"});
    int64_t size = entry.Key("size").Int(0, kMaxMemberBytes);
    Field sha256 = entry.Key("sha256");
    std::string digest = sha256.Str();
    if (digest.size() != 64 || digest.find_first_not_of("0123456789abcdef") != std::string::npos) {
      sha256.Fail("must be 64 lowercase hexadecimal digits; got " + sha256.Shown());
    }
    listed[name] = {size, digest};
  }
  return listed;
}

int64_t CheckSchemaVersion(const Reader& reader, const Field& root) {
  int64_t version = root.Key("schema_version").Int(1, std::numeric_limits<int64_t>::max());
  if (version < kMinSchemaVersion || version > kSchemaVersion) {
    reader.Fail("schema version " + std::to_string(version) + "; this runtime reads versions " + std::to_string(kMinSchemaVersion) +
                " and " + std::to_string(kSchemaVersion) + (version > kSchemaVersion ? " (update the edgeq runtime)" : " (recompile the model)"));
  }
  return version;
}

// An Arm Ethos-U build's command streams (schema version 3): per NPU region, Vela's command stream and the members
// holding it, which must be members of the artifact (each named once). Returns the regions.
std::vector<std::string> ParseCommandStreams(const Field& list, int64_t version, const std::map<std::string, Listed>& listed) {
  if (version < kCommandStreamsVersion) {
    list.Fail("needs schema version " + std::to_string(kCommandStreamsVersion) + "; got " + std::to_string(version));
  }
  std::vector<Field> entries = list.Items();
  if (entries.empty()) list.Fail("must be a list of 1 or more command streams; got " + list.Shown());
  std::vector<std::string> regions;
  std::map<std::string, std::string> named;  // member -> the field naming it
  const std::vector<std::string> sizes = {"sram_bytes",         "dram_bytes",   "on_chip_flash_bytes", "off_chip_flash_bytes",
                                          "scratch_bytes",      "fast_scratch_bytes", "weight_bytes", "command_stream_bytes"};
  for (const Field& entry : entries) {
    entry.Keys({"region", "compiler", "compiler_version", "options", "ops", "tosa", "command_stream", "weights", "estimate", "memory"});
    Field region = entry.Key("region");
    for (size_t i = 0; i < regions.size(); ++i) {
      if (region.Str() == regions[i]) region.Fail("repeats " + entries[i].Key("region").Path() + " (" + region.Shown() + ")");
    }
    entry.Key("compiler").Choice({"vela"});
    entry.Key("compiler_version").Str();
    for (const Field& option : entry.Key("options").Items()) option.Str();
    Field ops = entry.Key("ops");
    std::vector<Field> op_names = ops.Items();
    if (op_names.empty()) ops.Fail("must be a list of 1 or more op names; got " + ops.Shown());
    for (const Field& op : op_names) op.Str();
    for (const char* key : {"tosa", "command_stream", "weights", "estimate"}) {
      Field member = entry.Key(key);
      std::string name = member.Str();
      if (!listed.count(name)) member.Fail("must name one of the members; got " + member.Shown());
      auto [first, added] = named.emplace(name, member.Path());
      if (!added) member.Fail("repeats " + first->second + " (" + member.Shown() + ")");
    }
    Field memory = entry.Key("memory");
    memory.Keys(sizes);
    for (const std::string& size : sizes) memory.Key(size).Int(0, std::numeric_limits<int64_t>::max());
    regions.push_back(region.Str());
  }
  return regions;
}

// Every field of the manifest; `listed` receives its members.
Manifest ParseManifest(const Reader& reader, const Field& root, std::map<std::string, Listed>* listed) {
  int64_t version = CheckSchemaVersion(reader, root);  // first: another version has other fields
  root.Keys({"schema_version", "edgeq_version", "tvm_version", "target", "library", "npu_execution", "opt_level",
             "tuned_kernels", "source", "inputs", "outputs", "placement", "members", "npu_command_streams"});
  for (const char* key : {"edgeq_version", "tvm_version", "source"}) root.Key(key).Str();
  Manifest manifest;
  Field target = root.Key("target");
  target.Keys({"name", "kind", "host"});
  manifest.target = target.Key("name").Str();
  manifest.target_kind = target.Key("kind").Choice({"cpu", "npu"});
  Field host = target.Key("host");
  if (!host.IsNull() && !host.IsString()) host.Fail("must be a string or null; got " + host.Shown());
  ParseLibrary(root.Key("library"), &manifest);
  Field npu = root.Key("npu_execution");
  manifest.npu_simulated = !npu.IsNull();
  if (manifest.npu_simulated && (!npu.IsString() || npu.Str() != "simulated")) npu.Fail("must be null or \"simulated\"; got " + npu.Shown());
  root.Key("opt_level").Int(0, 2);
  root.Key("tuned_kernels").Int(0, std::numeric_limits<int64_t>::max());
  root.Key("placement").ExpectObject();
  manifest.inputs = ParseTensors(root.Key("inputs"), /*input=*/true);
  manifest.outputs = ParseTensors(root.Key("outputs"), /*input=*/false);
  *listed = ParseMembers(reader, root.Key("members"));
  if (!listed->count(manifest.library_member)) {
    root.Key("library").Key("member").Fail("must name one of the members; got " + Quoted(Printable(manifest.library_member)));
  }
  if (root.Has("npu_command_streams")) {
    manifest.command_stream_regions = ParseCommandStreams(root.Key("npu_command_streams"), version, *listed);
  }
  return manifest;
}

// The manifest (the first member) parsed, once its size and nesting are within the limits.
ffi::Any ParseManifestJson(const Reader& reader, const std::vector<Entry>& entries) {
  if (entries.empty() || entries[0].name != kManifest) reader.Fail(std::string("the first member must be ") + kManifest);
  if (entries[0].size > kMaxManifestBytes) reader.Fail("manifest.json is larger than 1 MiB");
  std::string text(reinterpret_cast<const char*>(reader.Data(entries[0])), entries[0].size);
  JsonScan scan = Scan(text, kMaxManifestDepth);
  if (scan.too_deep) reader.Fail("manifest.json: nested more than " + std::to_string(kMaxManifestDepth) + " deep");
  if (scan.constant) reader.Fail("manifest.json: not valid JSON (NaN and Infinity are not JSON)");
  ffi::String error;
  ffi::Any parsed = ffi::json::Parse(ffi::String(text), &error);
  if (!error.empty()) reader.Fail("manifest.json: not valid JSON (" + std::string(error) + ")");
  if (CountKeys(parsed) != scan.keys) reader.Fail("manifest.json: not valid JSON (a key appears twice in one object)");
  if (!parsed.as<ffi::Map<ffi::Any, ffi::Any>>()) reader.Fail("manifest.json: not a JSON object");
  return parsed;
}

// The bytes of every member but the manifest, each as `listed` says (no more, no fewer, same size and sha256).
std::map<std::string, std::vector<uint8_t>> VerifiedMembers(const Reader& reader, const std::vector<Entry>& entries,
                                                           const std::map<std::string, Listed>& listed) {
  std::map<std::string, const Entry*> found;
  for (size_t i = 1; i < entries.size(); ++i) {
    CheckMemberName(reader, entries[i].name, "");
    if (!found.emplace(entries[i].name, &entries[i]).second) reader.Fail("member " + entries[i].name + " appears twice");
  }
  std::map<std::string, std::vector<uint8_t>> members;
  for (const auto& [name, expected] : listed) {
    auto entry = found.find(name);
    if (entry == found.end()) reader.Fail("member " + name + " is missing");
    if (uint64_t(expected.size) != entry->second->size) {
      reader.Fail("member " + name + " is " + std::to_string(entry->second->size) + " bytes; the manifest says " + std::to_string(expected.size));
    }
    const uint8_t* data = reader.Data(*entry->second);
    if (Sha256Hex(data, entry->second->size) != expected.sha256) {
      reader.Fail("member " + name + " fails its sha256 check (the file was modified or damaged)");
    }
    members[name] = std::vector<uint8_t>(data, data + entry->second->size);
  }
  for (const auto& [name, entry] : found) {
    if (!listed.count(name)) reader.Fail("member " + name + " is not in the manifest");
  }
  return members;
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw Error(path + ": no such file, or not readable");
  std::streamoff size = file.tellg();
  if (size < 0 || uint64_t(size) > kMaxFileBytes) throw Error(path + ": larger than 2 GiB; not an edgeq artifact");
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  file.seekg(0);
  if (!file.read(reinterpret_cast<char*>(bytes.data()), size)) throw Error(path + ": cannot be read");
  return bytes;
}

}  // namespace

Artifact Artifact::Read(const std::string& path) {
  Reader reader(path, ReadFile(path));
  std::vector<Entry> entries = reader.Entries();
  Field root(reader, "", ParseManifestJson(reader, entries));
  Artifact artifact;
  std::map<std::string, Listed> listed;
  artifact.manifest = ParseManifest(reader, root, &listed);
  artifact.members = VerifiedMembers(reader, entries, listed);
  return artifact;
}

}  // namespace edgeq
