#include "npy.h"

#include <cstring>
#include <fstream>
#include <iterator>
#include <regex>
#include <sstream>

namespace edgeq {
namespace {

const char kMagic[] = "\x93NUMPY";

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
  throw Error(path + ": dtype '" + descriptor + "' is not supported (allowed: int8, uint8, int32, float32, little-endian)");
}

}  // namespace

HostTensor ReadNpy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error(path + ": no such file, or not readable");
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || std::memcmp(bytes.data(), kMagic, 6) != 0) throw Error(path + ": not a .npy file");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t header_length, header_start;
  if (major == 1) {
    header_length = static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8;
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw Error(path + ": truncated .npy header");
    header_length = 0;
    for (int i = 3; i >= 0; --i) header_length = header_length << 8 | static_cast<unsigned char>(bytes[8 + i]);
    header_start = 12;
  } else {
    throw Error(path + ": .npy version " + std::to_string(major) + " is not supported");
  }
  if (header_length > bytes.size() - header_start) throw Error(path + ": truncated .npy header");
  std::string header(bytes.data() + header_start, header_length);
  std::smatch match;
  if (!std::regex_search(header, match, std::regex("'descr':\\s*'([^']+)'"))) throw Error(path + ": .npy header without 'descr'");
  HostTensor tensor;
  tensor.dtype = DtypeOf(match[1], path);
  if (std::regex_search(header, std::regex("'fortran_order':\\s*True"))) throw Error(path + ": Fortran-order arrays are not supported");
  if (!std::regex_search(header, match, std::regex("'shape':\\s*\\(([^)]*)\\)"))) throw Error(path + ": .npy header without 'shape'");
  std::stringstream dims(match[1].str());
  std::string dim;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(" ") == std::string::npos) continue;
    try {
      tensor.shape.push_back(std::stoll(dim));
    } catch (const std::exception&) {
      throw Error(path + ": bad shape in the .npy header");
    }
    if (tensor.shape.back() < 0) throw Error(path + ": bad shape in the .npy header");
  }
  size_t expected = size_t(tensor.NumElements()) * HostTensor::ElementBytes(tensor.dtype);
  size_t data_start = header_start + header_length;
  if (bytes.size() - data_start != expected) {
    throw Error(path + ": holds " + std::to_string(bytes.size() - data_start) + " data bytes; its shape needs " + std::to_string(expected));
  }
  tensor.data.assign(bytes.begin() + data_start, bytes.end());
  return tensor;
}

void WriteNpy(const std::string& path, const HostTensor& tensor) {
  std::string shape = "(";
  for (size_t i = 0; i < tensor.shape.size(); ++i) shape += std::to_string(tensor.shape[i]) + (tensor.shape.size() == 1 || i + 1 < tensor.shape.size() ? "," : "");
  shape += ")";
  std::string header = "{'descr': '" + Descriptor(tensor.dtype) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream file(path, std::ios::binary);
  if (!file) throw Error(path + ": cannot be written");
  file.write(kMagic, 6);
  file.put(1);
  file.put(0);
  file.put(char(header.size() & 0xff));
  file.put(char(header.size() >> 8));
  file << header;
  file.write(reinterpret_cast<const char*>(tensor.data.data()), std::streamsize(tensor.data.size()));
  if (!file) throw Error(path + ": cannot be written");
}

}  // namespace edgeq
