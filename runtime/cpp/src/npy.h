// Reading and writing .npy files (NumPy's format, versions 1.0 to 3.0; C order; little-endian int8, uint8,
// int32 and float32), the inputs and outputs of edgeq-run.
#ifndef EDGEQ_NPY_H_
#define EDGEQ_NPY_H_

#include <string>

#include "edgeq/runtime.h"

namespace edgeq {

// Reads `path` as a value of `input`. Its header is checked first: the dtype and shape against `input`
// (TensorInfo::CheckInput), and the data size they make (overflow-checked) against the file's size; only then is
// the data read. Throws Error naming the file.
HostTensor ReadNpy(const std::string& path, const TensorInfo& input);

// Writes `tensor` to `path` whole (a temporary file renamed into place). Throws Error naming the file.
void WriteNpy(const std::string& path, const HostTensor& tensor);

}  // namespace edgeq

#endif  // EDGEQ_NPY_H_
