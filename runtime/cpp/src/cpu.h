// The CPU architectures edgeq builds libraries for, and what this machine can run: the architecture an ELF library
// is built for, and the CPU features an artifact's library may use (docs/artifact.md, "CPU features").
#ifndef EDGEQ_CPU_H_
#define EDGEQ_CPU_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace edgeq {

// The architectures edgeq builds for: "x86_64", "aarch64".
std::vector<std::string> ArchNames();

// This machine's architecture ("x86_64", "aarch64"; "unknown" for others).
const std::string& HostArch();

// The CPU feature names of `arch` (/proc/cpuinfo spelling; none for an unknown architecture).
std::vector<std::string> CpuFeatureNames(const std::string& arch);

// Those of `features` (names of HostArch()'s CPU features) this CPU lacks, or the OS does not enable.
std::vector<std::string> MissingCpuFeatures(const std::vector<std::string>& features);

// What to do about `missing` features: "recompile for target x86_64 (the x86-64-v3 baseline)", or, when the
// baseline itself needs one of them, recompile for a target of one's own.
std::string MissingFeaturesAdvice(const std::vector<std::string>& missing);

// The architecture the ELF file `bytes` is built for ("x86_64", "aarch64", or "ELF machine N" for another), or
// nothing when `bytes` is not a 64-bit little-endian ELF file.
std::optional<std::string> ElfArch(const std::vector<uint8_t>& bytes);

}  // namespace edgeq

#endif  // EDGEQ_CPU_H_
