// Writing files whole: a reader finds the complete file or the one before, never a half-written one.
#ifndef EDGEQ_FILES_H_
#define EDGEQ_FILES_H_

#include <cstddef>
#include <string>

namespace edgeq {

// Writes `size` bytes at `data` to the open file `fd`; false (errno says why) when it cannot.
bool WriteAll(int fd, const void* data, size_t size);

// Writes `bytes` to `path` through a temporary file beside it, renamed over `path` when complete (a link at `path`
// is replaced, never followed). Throws Error "<path>: cannot be written: <reason>"; nothing is left behind then.
void WriteFileWhole(const std::string& path, const std::string& bytes);

}  // namespace edgeq

#endif  // EDGEQ_FILES_H_
