// The dtypes of a program's inputs and outputs (docs/artifact.md): one table for their names, sizes, integer ranges
// and DLPack codes.
#ifndef EDGEQ_DTYPE_H_
#define EDGEQ_DTYPE_H_

#include <dlpack/dlpack.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace edgeq {

struct Dtype {
  const char* name;    // "int8", "uint8", "int32", "float32"
  DLDataType dlpack;
  size_t bytes;        // per element
  bool integer;
  int64_t low, high;   // the range of an integer dtype
};

// The dtype named `name`, or nullptr for one the runtime does not know.
const Dtype* FindDtype(const std::string& name);

// The names of the known dtypes.
std::vector<std::string> DtypeNames();

}  // namespace edgeq

#endif  // EDGEQ_DTYPE_H_
