#include "files.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "edgeq/runtime.h"

namespace edgeq {
namespace {

// Creates a new file beside `path` (".<name>.<pid>.<n>.partial", permissions per the umask) and returns its
// descriptor, or -1 with errno set.
int CreateBeside(const std::string& path, std::string* created) {
  static std::atomic<unsigned> counter{0};
  std::filesystem::path target(path);
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string name = "." + target.filename().string() + "." + std::to_string(getpid()) + "." + std::to_string(counter++) + ".partial";
    *created = (target.parent_path() / name).string();
    int fd = open(created->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0 || errno != EEXIST) return fd;
  }
  return -1;
}

}  // namespace

bool WriteAll(int fd, const void* data, size_t size) {
  const char* next = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = write(fd, next, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    next += n;
    size -= size_t(n);
  }
  return true;
}

void WriteFileWhole(const std::string& path, const std::string& bytes) {
  std::string temporary;
  int fd = CreateBeside(path, &temporary);
  if (fd < 0) throw Error(path + ": cannot be written: " + std::strerror(errno));
  bool written = WriteAll(fd, bytes.data(), bytes.size()) && fsync(fd) == 0;
  int error = errno;
  if (close(fd) != 0 && written) {
    written = false;
    error = errno;
  }
  if (written && rename(temporary.c_str(), path.c_str()) == 0) return;
  if (written) error = errno;
  unlink(temporary.c_str());
  throw Error(path + ": cannot be written: " + std::strerror(error));
}

}  // namespace edgeq
