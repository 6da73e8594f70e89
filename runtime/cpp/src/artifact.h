// Reading a .edgeq artifact: a zip whose members are stored uncompressed (docs/artifact.md). Everything is
// checked here, before any library is loaded: sizes and offsets against the file, every member's CRC-32 (the
// manifest's too) against both its zip headers, the manifest's nesting, schema version and every field (docs/
// artifact.md, "Validation"), and every member's size and sha256 against the manifest.
#ifndef EDGEQ_ARTIFACT_H_
#define EDGEQ_ARTIFACT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "edgeq/runtime.h"

namespace edgeq {

constexpr int64_t kMinSchemaVersion = 2;       // the oldest manifest version this runtime reads
constexpr int64_t kSchemaVersion = 3;          // the newest
constexpr int64_t kCommandStreamsVersion = 3;  // the first with npu_command_streams (an Arm Ethos-U build's)

struct Manifest {
  std::string target;
  std::string target_kind;
  std::string arch;
  std::string library_member;
  std::vector<std::string> cpu_features;  // the CPU features the library may use (/proc/cpuinfo names)
  bool npu_simulated = false;
  std::vector<std::string> command_stream_regions;  // NPU regions with a command stream for the device (Vela's)
  std::vector<TensorInfo> inputs;
  std::vector<TensorInfo> outputs;
};

struct Artifact {
  Manifest manifest;
  std::map<std::string, std::vector<uint8_t>> members;

  // Throws Error naming `path` (and, for the manifest, the field) for anything that does not check out.
  static Artifact Read(const std::string& path);
};

}  // namespace edgeq

#endif  // EDGEQ_ARTIFACT_H_
