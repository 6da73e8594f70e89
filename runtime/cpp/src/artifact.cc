#include "artifact.h"

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <fstream>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include "sha256.h"

namespace edgeq {
namespace {

namespace ffi = tvm::ffi;

constexpr uint64_t kMaxFileBytes = uint64_t(1) << 31;
constexpr uint64_t kMaxManifestBytes = 1 << 20;
constexpr size_t kMaxMembers = 64;
constexpr char kManifest[] = "manifest.json";

// A name as it can be printed: bytes outside printable ASCII become \xNN.
std::string Printable(const std::string& text) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(char(c));
    } else {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out;
}

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
      uint64_t packed = U32(at + 20), size = U32(at + 24);
      uint64_t name_length = U16(at + 28), extra_length = U16(at + 30), comment_length = U16(at + 32);
      uint64_t local = U32(at + 42);
      Need(at + 46, name_length);
      std::string name = Printable(std::string(reinterpret_cast<const char*>(bytes_.data() + at + 46), name_length));
      if (flags & 1) Fail("member " + name + " is encrypted");
      if (method != 0 || packed != size) Fail("member " + name + " is compressed; edgeq artifacts store members uncompressed");
      entries.push_back({name, LocalData(local, name, size), size});
      at += 46 + name_length + extra_length + comment_length;
    }
    return entries;
  }

  const uint8_t* Data(const Entry& entry) const { return bytes_.data() + entry.offset; }

 private:
  uint64_t LocalData(uint64_t local, const std::string& name, uint64_t size) const {
    if (U32(local) != 0x04034b50) Fail("damaged zip local header of member " + name);
    uint64_t name_length = U16(local + 26), extra_length = U16(local + 28);
    Need(local + 30, name_length);
    if (Printable(std::string(reinterpret_cast<const char*>(bytes_.data() + local + 30), name_length)) != name) {
      Fail("member " + name + ": local and central zip headers disagree");
    }
    uint64_t data = local + 30 + name_length + extra_length;
    Need(data, size);
    return data;
  }

  std::string path_;
  std::vector<uint8_t> bytes_;
};

// ---- typed access to the parsed manifest ------------------------------------------------------------------

struct Json {
  const Reader& reader;
  std::string where;
  ffi::Any value;

  [[noreturn]] void Fail(const std::string& problem) const { reader.Fail("manifest.json: " + where + ": " + problem); }

  Json Key(const std::string& key) const {
    auto object = value.as<ffi::Map<ffi::Any, ffi::Any>>();
    if (!object) Fail("expected an object");
    auto found = object->find(ffi::String(key));
    if (found == object->end()) Fail("missing '" + key + "'");
    return {reader, where.empty() ? key : where + "." + key, (*found).second};
  }
  bool Has(const std::string& key) const {
    auto object = value.as<ffi::Map<ffi::Any, ffi::Any>>();
    return object && object->find(ffi::String(key)) != object->end();
  }
  bool IsNull() const { return value == nullptr; }
  std::string Str() const {
    auto text = value.as<ffi::String>();
    if (!text) Fail("expected a string");
    return std::string(*text);
  }
  int64_t Int() const {
    auto number = value.as<int64_t>();
    if (!number || value.as<bool>()) Fail("expected an integer");
    return *number;
  }
  double Number() const {
    if (auto number = value.as<int64_t>()) return double(*number);
    auto number = value.as<double>();
    if (!number) Fail("expected a number");
    return *number;
  }
  std::vector<Json> Items() const {
    auto array = value.as<ffi::Array<ffi::Any>>();
    if (!array) Fail("expected an array");
    std::vector<Json> items;
    for (size_t i = 0; i < array->size(); ++i) items.push_back({reader, where + "[" + std::to_string(i) + "]", (*array)[i]});
    return items;
  }
  std::vector<std::pair<std::string, Json>> Entries() const {
    auto object = value.as<ffi::Map<ffi::Any, ffi::Any>>();
    if (!object) Fail("expected an object");
    std::vector<std::pair<std::string, Json>> entries;
    for (const auto& [key, item] : *object) {
      auto name = key.as<ffi::String>();
      if (!name) Fail("keys must be strings");
      std::string text = Printable(std::string(*name));
      entries.push_back({text, {reader, where + "." + text, item}});
    }
    return entries;
  }
};

TensorInfo ParseTensor(const Json& entry) {
  TensorInfo info;
  info.name = entry.Key("name").Str();
  for (const Json& dim : entry.Key("shape").Items()) {
    int64_t size = dim.Int();
    if (size <= 0 || size > (int64_t(1) << 31)) dim.Fail("dimensions must be positive");
    info.shape.push_back(size);
  }
  info.dtype = entry.Key("dtype").Str();
  HostTensor::ElementBytes(info.dtype);  // throws for dtypes the runtime does not know
  Json quant = entry.Key("quant");
  if (!quant.IsNull()) {
    info.quantized = true;
    for (const Json& scale : quant.Key("scale").Items()) {
      double value = scale.Number();
      if (!(value > 0) || value > 1e30) scale.Fail("scales must be positive and finite");
      info.scale.push_back(float(value));
    }
    for (const Json& zero : quant.Key("zero_point").Items()) info.zero_point.push_back(zero.Int());
    Json axis = quant.Key("axis");
    info.axis = axis.IsNull() ? -1 : int(axis.Int());
    if (info.scale.empty() || info.scale.size() != info.zero_point.size()) quant.Fail("scale and zero_point must have one length");
    if (info.scale.size() > 1 && (info.axis < 0 || size_t(info.axis) >= info.shape.size() ||
                                  info.shape[info.axis] != int64_t(info.scale.size()))) {
      quant.Fail("per-channel scales must match the axis length");
    }
    if (entry.Has("quantizer")) info.quantizer = entry.Key("quantizer").Str();
  }
  return info;
}

bool SafeName(const std::string& name) {
  static const std::regex kSafe("^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$");
  return std::regex_match(name, kSafe) && name != kManifest;
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
  if (entries.empty() || entries[0].name != kManifest) reader.Fail(std::string("the first member must be ") + kManifest);
  if (entries[0].size > kMaxManifestBytes) reader.Fail("manifest.json is larger than 1 MiB");
  ffi::String error;
  std::string text(reinterpret_cast<const char*>(reader.Data(entries[0])), entries[0].size);
  ffi::Any parsed = ffi::json::Parse(ffi::String(text), &error);
  if (!error.empty()) reader.Fail("manifest.json is not valid JSON (" + std::string(error) + ")");
  Json root{reader, "", parsed};
  Json version = root.Key("schema_version");
  if (version.Int() != kSchemaVersion) {
    reader.Fail("schema version " + std::to_string(version.Int()) + "; this runtime reads version " +
                std::to_string(kSchemaVersion) + (version.Int() > kSchemaVersion ? " (update the edgeq runtime)" : " (recompile the model)"));
  }
  Artifact artifact;
  Manifest& manifest = artifact.manifest;
  manifest.target = root.Key("target").Key("name").Str();
  manifest.target_kind = root.Key("target").Key("kind").Str();
  manifest.arch = root.Key("library").Key("arch").Str();
  manifest.library_member = root.Key("library").Key("member").Str();
  manifest.npu_simulated = root.Has("npu_execution") && !root.Key("npu_execution").IsNull();
  for (const Json& entry : root.Key("inputs").Items()) manifest.inputs.push_back(ParseTensor(entry));
  for (const Json& entry : root.Key("outputs").Items()) manifest.outputs.push_back(ParseTensor(entry));

  std::map<std::string, const Entry*> found;
  for (size_t i = 1; i < entries.size(); ++i) {
    if (!SafeName(entries[i].name)) reader.Fail("member name '" + entries[i].name + "' is not allowed (plain file names only)");
    if (!found.emplace(entries[i].name, &entries[i]).second) reader.Fail("member " + entries[i].name + " appears twice");
  }
  std::set<std::string> listed;
  for (const auto& [name, expected] : root.Key("members").Entries()) {
    if (!SafeName(name)) reader.Fail("member name '" + name + "' is not allowed (plain file names only)");
    listed.insert(name);
    auto entry = found.find(name);
    if (entry == found.end()) reader.Fail("member " + name + " is missing");
    int64_t size = expected.Key("size").Int();
    if (size < 0 || uint64_t(size) != entry->second->size) {
      reader.Fail("member " + name + " is " + std::to_string(entry->second->size) + " bytes; the manifest says " + std::to_string(size));
    }
    const uint8_t* data = reader.Data(*entry->second);
    if (Sha256Hex(data, entry->second->size) != expected.Key("sha256").Str()) {
      reader.Fail("member " + name + " fails its sha256 check (the file was modified or damaged)");
    }
    artifact.members[name] = std::vector<uint8_t>(data, data + entry->second->size);
  }
  for (const auto& [name, entry] : found) {
    if (!listed.count(name)) reader.Fail("member " + name + " is not in the manifest");
  }
  if (!artifact.members.count(manifest.library_member)) reader.Fail("the library member " + manifest.library_member + " is missing");
  return artifact;
}

}  // namespace edgeq
