// Reading and writing .npy files (NumPy's format, versions 1.0 to 3.0; C order; little-endian int8, uint8,
// int32 and float32), the inputs and outputs of edgeq-run.
#ifndef EDGEQ_NPY_H_
#define EDGEQ_NPY_H_

#include <string>

#include "edgeq/runtime.h"

namespace edgeq {

HostTensor ReadNpy(const std::string& path);                       // throws Error naming the file
void WriteNpy(const std::string& path, const HostTensor& tensor);  // throws Error naming the file

}  // namespace edgeq

#endif  // EDGEQ_NPY_H_
