#include "npy.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstring>
#include <fstream>

#include "files.h"
#include "text.h"

namespace edgeq {
namespace {

const char kMagic[] = "\x93NUMPY";
constexpr size_t kMaxHeaderBytes = 1 << 16;

std::string Descriptor(const std::string& dtype) {
  if (dtype == "int8") return "|i1";
  if (dtype == "uint8") return "|u1";
  if (dtype == "int32") return "<i4";
  if (dtype == "float32") return "<f4";
  throw Error("dtype " + dtype + " cannot be written to .npy by edgeq-run");
}

std::string DtypeOf(const std::string& descriptor, const std::string& path) {
  if (descriptor == "|i1" || descriptor == "<i1" || descriptor == "i1") return "int8";
  if (descriptor == "|u1" || descriptor == "<u1" || descriptor == "u1") return "uint8";
  if (descriptor == "<i4") return "int32";
  if (descriptor == "<f4") return "float32";
  throw Error(path + ": dtype '" + Printable(descriptor.substr(0, 40)) + "' is not supported (allowed: int8, uint8, int32, float32, little-endian)");
}

struct Header {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t data_offset = 0;  // where the data starts in the file
  uint64_t data_bytes = 0;   // what dtype and shape make
};

// The header's dictionary as NumPy reads it back (a Python literal): exactly the keys 'descr' (a string),
// 'fortran_order' (True or False) and 'shape' (a tuple of whole numbers: `(2, 3)`, `(5,)`, `()`), in any order.
class HeaderText {
 public:
  HeaderText(std::string text, std::string path) : text_(std::move(text)), path_(std::move(path)) {}

  // The dtype and shape, and the data bytes they make (overflow-checked).
  void Parse(Header* header) {
    Expect('{');
    std::vector<std::string> seen;
    while (!Take('}')) {
      std::string key = Quoted();
      if (std::count(seen.begin(), seen.end(), key)) Fail("'" + Printable(key) + "' twice");
      seen.push_back(key);
      Expect(':');
      if (key == "descr") {
        header->dtype = DtypeOf(Quoted(), path_);
      } else if (key == "fortran_order") {
        std::string word = Word();
        if (word == "True") throw Error(path_ + ": Fortran-order arrays are not supported");
        if (word != "False") Fail("fortran_order must be True or False");
      } else if (key == "shape") {
        header->shape = Shape();
      } else {
        Fail("unknown key '" + Printable(key.substr(0, 40)) + "'");
      }
      if (!Take(',')) {  // a comma may also end the dictionary: {'descr': '<f4', ..., }
        Expect('}');
        break;
      }
    }
    Skip();
    if (at_ != text_.size()) Fail("text after the dictionary");
    if (seen.size() != 3) Fail("it needs 'descr', 'fortran_order' and 'shape'");
    header->data_bytes = HostTensor::ElementBytes(header->dtype);
    for (int64_t size : header->shape) {
      if (__builtin_mul_overflow(header->data_bytes, uint64_t(size), &header->data_bytes)) {
        throw Error(path_ + ": the shape in its .npy header makes more than 2^64 bytes");
      }
    }
  }

 private:
  [[noreturn]] void Fail(const std::string& problem) const { throw Error(path_ + ": bad .npy header: " + problem); }

  void Skip() {
    while (at_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[at_]))) ++at_;
  }
  bool Take(char c) {
    Skip();
    if (at_ >= text_.size() || text_[at_] != c) return false;
    ++at_;
    return true;
  }
  void Expect(char c) {
    if (!Take(c)) Fail(std::string("expected '") + c + "' at byte " + std::to_string(at_));
  }

  // 'text' or "text", without escapes.
  std::string Quoted() {
    Skip();
    char quote = at_ < text_.size() ? text_[at_] : '\0';
    size_t end = quote == '\'' || quote == '"' ? text_.find(quote, at_ + 1) : std::string::npos;
    if (end == std::string::npos) Fail("expected a quoted string at byte " + std::to_string(at_));
    std::string value = text_.substr(at_ + 1, end - at_ - 1);
    if (value.find('\\') != std::string::npos) Fail("escapes in a string");
    at_ = end + 1;
    return value;
  }

  // Letters, digits, signs: a word or a number, up to what separates them.
  std::string Word() {
    Skip();
    size_t start = at_;
    while (at_ < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[at_])) || text_[at_] == '-' || text_[at_] == '+' || text_[at_] == '_' || text_[at_] == '.')) ++at_;
    return text_.substr(start, at_ - start);
  }

  std::vector<int64_t> Shape() {
    Expect('(');
    std::vector<int64_t> shape;
    bool comma = false;  // after the last dimension, as (5,) needs
    while (!Take(')')) {
      std::string word = Word();
      int64_t value = 0;
      auto [end, error] = std::from_chars(word.data(), word.data() + word.size(), value);
      if (word.empty() || word[0] == '-' || error != std::errc() || end != word.data() + word.size()) {
        throw Error(path_ + ": bad shape in the .npy header ('" + Printable(word.empty() ? text_.substr(at_, 1) : word.substr(0, 40)) + "')");
      }
      shape.push_back(value);
      comma = Take(',');
      if (!comma) {
        Expect(')');
        break;
      }
    }
    if (shape.size() == 1 && !comma) Fail("a shape of one dimension is written (n,)");
    return shape;
  }

  std::string text_;
  std::string path_;
  size_t at_ = 0;
};

Header ReadHeader(std::ifstream& file, const std::string& path) {
  char prefix[12];
  if (!file.read(prefix, 10) || std::memcmp(prefix, kMagic, 6) != 0) throw Error(path + ": not a .npy file");
  int major = static_cast<unsigned char>(prefix[6]);
  uint64_t length = 0, start = 0;
  if (major == 1) {
    length = static_cast<unsigned char>(prefix[8]) | static_cast<unsigned char>(prefix[9]) << 8;
    start = 10;
  } else if (major == 2 || major == 3) {
    if (!file.read(prefix + 10, 2)) throw Error(path + ": truncated .npy header");
    for (int i = 3; i >= 0; --i) length = length << 8 | static_cast<unsigned char>(prefix[8 + i]);
    start = 12;
  } else {
    throw Error(path + ": .npy version " + std::to_string(major) + " is not supported");
  }
  if (length > kMaxHeaderBytes) throw Error(path + ": .npy header of " + std::to_string(length) + " bytes (allowed: at most " + std::to_string(kMaxHeaderBytes) + ")");
  std::string text(length, '\0');
  if (!file.read(text.data(), std::streamsize(length))) throw Error(path + ": truncated .npy header");
  Header header;
  header.data_offset = start + length;
  HeaderText(std::move(text), path).Parse(&header);
  return header;
}

}  // namespace

HostTensor ReadNpy(const std::string& path, const TensorInfo& input) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw Error(path + ": no such file, or not readable");
  std::streamoff size = file.tellg();
  if (size < 0 || !file.seekg(0)) throw Error(path + ": cannot be read");
  Header header = ReadHeader(file, path);
  uint64_t held = uint64_t(size) - std::min(uint64_t(size), header.data_offset);
  if (held != header.data_bytes) {
    throw Error(path + ": holds " + std::to_string(held) + " data bytes; its shape needs " + std::to_string(header.data_bytes));
  }
  try {
    input.CheckInput(header.dtype, header.shape);
  } catch (const Error& error) {
    throw Error(path + ": " + error.what());
  }
  HostTensor tensor{header.dtype, header.shape, std::vector<uint8_t>(header.data_bytes)};
  if (!file.read(reinterpret_cast<char*>(tensor.data.data()), std::streamsize(header.data_bytes))) throw Error(path + ": cannot be read");
  return tensor;
}

void WriteNpy(const std::string& path, const HostTensor& tensor) {
  std::string shape = "(";
  for (size_t i = 0; i < tensor.shape.size(); ++i) shape += std::to_string(tensor.shape[i]) + (tensor.shape.size() == 1 || i + 1 < tensor.shape.size() ? "," : "");
  shape += ")";
  std::string header = "{'descr': '" + Descriptor(tensor.dtype) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::string bytes = std::string(kMagic, 6) + '\x01' + '\x00' + char(header.size() & 0xff) + char(header.size() >> 8) + header;
  bytes.append(reinterpret_cast<const char*>(tensor.data.data()), tensor.data.size());
  WriteFileWhole(path, bytes);
}

}  // namespace edgeq
