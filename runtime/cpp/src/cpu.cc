#include "cpu.h"

#include <algorithm>

#if defined(__x86_64__)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace edgeq {
namespace {

struct Arch {
  const char* name;
  uint16_t elf_machine;  // e_machine of its ELF files
  const char* baseline;  // the CPU edgeq's target of this name builds for
};

constexpr Arch kArches[] = {
    {"x86_64", 62, "x86-64-v3"},      // EM_X86_64
    {"aarch64", 183, "ARMv8-A NEON"},  // EM_AARCH64
};

// Where a CPU feature is found: on x86_64, a bit of a CPUID leaf (and the OS must save the registers the feature
// uses, XCR0); on aarch64, a bit of the hardware capabilities the kernel passes in the auxiliary vector.
enum class Source { kCpuid1Ecx, kCpuid7Ebx, kCpuid7Ecx, kCpuid7Edx, kCpuid7Sub1Eax, kCpuidExt1Ecx, kHwcap, kHwcap2 };
enum class OsState { kNone, kAvx, kAvx512 };  // register state the OS must enable (x86_64)

struct CpuFeature {
  const char* arch;
  const char* name;  // /proc/cpuinfo spelling, as in library.cpu_features
  Source source;
  unsigned bit;
  OsState state;
  bool baseline;     // part of the architecture's baseline (Arch::baseline)
};

// Every name of LIBRARY_FEATURES in edgeq/compile/cpu_features.py (docs/artifact.md, "CPU features").
constexpr CpuFeature kCpuFeatures[] = {
    {"x86_64", "ssse3", Source::kCpuid1Ecx, 9, OsState::kNone, true},
    {"x86_64", "fma", Source::kCpuid1Ecx, 12, OsState::kAvx, true},
    {"x86_64", "sse4_1", Source::kCpuid1Ecx, 19, OsState::kNone, true},
    {"x86_64", "sse4_2", Source::kCpuid1Ecx, 20, OsState::kNone, true},
    {"x86_64", "movbe", Source::kCpuid1Ecx, 22, OsState::kNone, true},
    {"x86_64", "popcnt", Source::kCpuid1Ecx, 23, OsState::kNone, true},
    {"x86_64", "avx", Source::kCpuid1Ecx, 28, OsState::kAvx, true},
    {"x86_64", "f16c", Source::kCpuid1Ecx, 29, OsState::kAvx, true},
    {"x86_64", "bmi1", Source::kCpuid7Ebx, 3, OsState::kNone, true},
    {"x86_64", "avx2", Source::kCpuid7Ebx, 5, OsState::kAvx, true},
    {"x86_64", "bmi2", Source::kCpuid7Ebx, 8, OsState::kNone, true},
    {"x86_64", "avx512f", Source::kCpuid7Ebx, 16, OsState::kAvx512, false},
    {"x86_64", "avx512dq", Source::kCpuid7Ebx, 17, OsState::kAvx512, false},
    {"x86_64", "avx512ifma", Source::kCpuid7Ebx, 21, OsState::kAvx512, false},
    {"x86_64", "avx512cd", Source::kCpuid7Ebx, 28, OsState::kAvx512, false},
    {"x86_64", "avx512bw", Source::kCpuid7Ebx, 30, OsState::kAvx512, false},
    {"x86_64", "avx512vl", Source::kCpuid7Ebx, 31, OsState::kAvx512, false},
    {"x86_64", "avx512vbmi", Source::kCpuid7Ecx, 1, OsState::kAvx512, false},
    {"x86_64", "avx512_vbmi2", Source::kCpuid7Ecx, 6, OsState::kAvx512, false},
    {"x86_64", "gfni", Source::kCpuid7Ecx, 8, OsState::kNone, false},  // also SSE-encoded (Tremont: no AVX)
    {"x86_64", "vaes", Source::kCpuid7Ecx, 9, OsState::kAvx, false},
    {"x86_64", "vpclmulqdq", Source::kCpuid7Ecx, 10, OsState::kAvx, false},
    {"x86_64", "avx512_vnni", Source::kCpuid7Ecx, 11, OsState::kAvx512, false},
    {"x86_64", "avx512_bitalg", Source::kCpuid7Ecx, 12, OsState::kAvx512, false},
    {"x86_64", "avx512_vpopcntdq", Source::kCpuid7Ecx, 14, OsState::kAvx512, false},
    {"x86_64", "avx512_fp16", Source::kCpuid7Edx, 23, OsState::kAvx512, false},
    {"x86_64", "avx_vnni", Source::kCpuid7Sub1Eax, 4, OsState::kAvx, false},
    {"x86_64", "avx512_bf16", Source::kCpuid7Sub1Eax, 5, OsState::kAvx512, false},
    {"x86_64", "abm", Source::kCpuidExt1Ecx, 5, OsState::kNone, true},  // LZCNT
    {"x86_64", "sse4a", Source::kCpuidExt1Ecx, 6, OsState::kNone, false},
    {"x86_64", "xop", Source::kCpuidExt1Ecx, 11, OsState::kAvx, false},
    {"x86_64", "fma4", Source::kCpuidExt1Ecx, 16, OsState::kAvx, false},
    {"x86_64", "tbm", Source::kCpuidExt1Ecx, 21, OsState::kNone, false},
    {"aarch64", "asimd", Source::kHwcap, 1, OsState::kNone, true},
    {"aarch64", "fphp", Source::kHwcap, 9, OsState::kNone, false},
    {"aarch64", "asimddp", Source::kHwcap, 20, OsState::kNone, false},
    {"aarch64", "sve", Source::kHwcap, 22, OsState::kNone, false},
    {"aarch64", "sve2", Source::kHwcap2, 1, OsState::kNone, false},
    {"aarch64", "i8mm", Source::kHwcap2, 13, OsState::kNone, false},
    {"aarch64", "bf16", Source::kHwcap2, 14, OsState::kNone, false},
};

#if defined(__x86_64__)
const std::string kHost = "x86_64";

uint32_t CpuidRegister(Source source) {
  unsigned a = 0, b = 0, c = 0, d = 0;
  switch (source) {
    case Source::kCpuid1Ecx: return __get_cpuid_count(1, 0, &a, &b, &c, &d) ? c : 0;
    case Source::kCpuid7Ebx: return __get_cpuid_count(7, 0, &a, &b, &c, &d) ? b : 0;
    case Source::kCpuid7Ecx: return __get_cpuid_count(7, 0, &a, &b, &c, &d) ? c : 0;
    case Source::kCpuid7Edx: return __get_cpuid_count(7, 0, &a, &b, &c, &d) ? d : 0;
    case Source::kCpuid7Sub1Eax: return __get_cpuid_count(7, 1, &a, &b, &c, &d) ? a : 0;
    case Source::kCpuidExt1Ecx: return __get_cpuid_count(0x80000001, 0, &a, &b, &c, &d) ? c : 0;
    default: return 0;
  }
}

// Whether the OS saves the registers of `state` on a context switch (XCR0: SSE and AVX; plus the AVX-512 opmask and
// upper ZMM registers), without which their instructions fault.
bool OsEnables(OsState state) {
  if (state == OsState::kNone) return true;
  constexpr unsigned kOsxsave = 1u << 27;  // CPUID.1:ECX: XGETBV is available
  if (!(CpuidRegister(Source::kCpuid1Ecx) & kOsxsave)) return false;
  uint32_t low = 0, high = 0;
  __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  uint32_t needed = state == OsState::kAvx ? 0x06 : 0xE6;
  return (low & needed) == needed;
}

bool Present(const CpuFeature& feature) {
  return (CpuidRegister(feature.source) >> feature.bit & 1) && OsEnables(feature.state);
}
#elif defined(__aarch64__)
const std::string kHost = "aarch64";
static_assert(HWCAP_ASIMD == 1ul << 1 && HWCAP_FPHP == 1ul << 9 && HWCAP_ASIMDDP == 1ul << 20 &&
                  HWCAP_SVE == 1ul << 22 && HWCAP2_SVE2 == 1ul << 1 && HWCAP2_I8MM == 1ul << 13 &&
                  HWCAP2_BF16 == 1ul << 14,
              "HWCAP bits");

bool Present(const CpuFeature& feature) {
  unsigned long capabilities = getauxval(feature.source == Source::kHwcap2 ? AT_HWCAP2 : AT_HWCAP);
  return capabilities >> feature.bit & 1;
}
#else
const std::string kHost = "unknown";

bool Present(const CpuFeature&) { return false; }
#endif

const CpuFeature* FindFeature(const std::string& arch, const std::string& name) {
  for (const CpuFeature& feature : kCpuFeatures) {
    if (arch == feature.arch && name == feature.name) return &feature;
  }
  return nullptr;
}

}  // namespace

std::vector<std::string> ArchNames() {
  std::vector<std::string> names;
  for (const Arch& arch : kArches) names.push_back(arch.name);
  return names;
}

const std::string& HostArch() { return kHost; }

std::string MissingFeaturesAdvice(const std::vector<std::string>& missing) {
  const char* baseline = "";
  for (const Arch& arch : kArches) {
    if (kHost == arch.name) baseline = arch.baseline;
  }
  for (const std::string& name : missing) {
    const CpuFeature* feature = FindFeature(kHost, name);
    if (feature != nullptr && feature->baseline) {
      bool one = missing.size() == 1;
      return "edgeq's " + kHost + " target needs " + (one ? "it" : "some of them") + " too (" + baseline +
             "): recompile for a target of your own without " + (one ? "it" : "them") + " (docs/targets.md)";
    }
  }
  return "recompile for target " + kHost + " (the " + baseline + " baseline)";
}

std::vector<std::string> CpuFeatureNames(const std::string& arch) {
  std::vector<std::string> names;
  for (const CpuFeature& feature : kCpuFeatures) {
    if (arch == feature.arch) names.push_back(feature.name);
  }
  return names;
}

std::vector<std::string> MissingCpuFeatures(const std::vector<std::string>& features) {
  std::vector<std::string> missing;
  for (const std::string& name : features) {
    const CpuFeature* feature = FindFeature(kHost, name);
    if (feature == nullptr || !Present(*feature)) missing.push_back(name);
  }
  return missing;
}

std::optional<std::string> ElfArch(const std::vector<uint8_t>& bytes) {
  constexpr uint8_t kMagic[] = {0x7f, 'E', 'L', 'F'};
  constexpr size_t kClass = 4, kData = 5, kMachine = 18;  // e_ident[EI_CLASS], e_ident[EI_DATA], e_machine
  if (bytes.size() < 64 || !std::equal(kMagic, kMagic + 4, bytes.begin())) return std::nullopt;
  if (bytes[kClass] != 2 || bytes[kData] != 1) return std::nullopt;  // ELFCLASS64, ELFDATA2LSB
  uint16_t machine = uint16_t(bytes[kMachine] | bytes[kMachine + 1] << 8);
  for (const Arch& arch : kArches) {
    if (machine == arch.elf_machine) return std::string(arch.name);
  }
  return "ELF machine " + std::to_string(machine);
}

}  // namespace edgeq
