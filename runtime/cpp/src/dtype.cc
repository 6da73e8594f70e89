#include "dtype.h"

#include <limits>

namespace edgeq {
namespace {

constexpr Dtype kDtypes[] = {
    {"int8", {kDLInt, 8, 1}, 1, true, -128, 127},
    {"uint8", {kDLUInt, 8, 1}, 1, true, 0, 255},
    {"int32", {kDLInt, 32, 1}, 4, true, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()},
    {"float32", {kDLFloat, 32, 1}, 4, false, 0, 0},
};

}  // namespace

const Dtype* FindDtype(const std::string& name) {
  for (const Dtype& dtype : kDtypes) {
    if (name == dtype.name) return &dtype;
  }
  return nullptr;
}

std::vector<std::string> DtypeNames() {
  std::vector<std::string> names;
  for (const Dtype& dtype : kDtypes) names.push_back(dtype.name);
  return names;
}

}  // namespace edgeq
