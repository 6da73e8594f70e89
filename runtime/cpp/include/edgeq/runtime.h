// edgeq C++ runtime: load a .edgeq artifact, check it, and run it with TVM's runtime.
//
//   edgeq::Model model = edgeq::Model::Load("model.edgeq");
//   std::vector<edgeq::HostTensor> outputs = model.Run({input});   // raw integers, as the program computes
//   std::vector<float> logits = model.Dequantize(0, outputs[0]);   // per the manifest
//
// Only the tvm-ffi headers and libraries (libtvm_ffi.so, libtvm_runtime.so) are needed.
//
// Threads: one loaded Model may be run from many threads at once (Run is const and thread-safe): each call that
// overlaps another runs on a Relax VM of its own, made from the loaded executable on first need and kept for later
// calls; the VMs share the library's code and constants. Results are the same as from one thread.
#ifndef EDGEQ_RUNTIME_H_
#define EDGEQ_RUNTIME_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgeq {

// Every error the runtime reports on purpose (bad artifact, bad input); the message names the file or input.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A tensor in host memory: dtype ("int8", "uint8", "int32", "float32"), shape, row-major bytes.
struct HostTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;

  int64_t NumElements() const;
  static size_t ElementBytes(const std::string& dtype);  // throws Error for other dtypes
};

// One input or output of the compiled program, from the manifest.
struct TensorInfo {
  std::string name;
  std::string file;                 // the safe file name (no folder) it is read from or written to, without .npy
  std::vector<int64_t> shape;
  std::string dtype;
  bool quantized = false;
  std::vector<float> scale;         // one, or one per channel along `axis`
  std::vector<int64_t> zero_point;  // same length as scale
  int axis = -1;                    // channel axis of per-channel quantization, -1 for per tensor
  std::string quantizer;            // the library function quantizing float32 values for this input ("" if none)

  // Throws Error unless a tensor of `dtype` and `shape` can be given for this input: its shape, and its dtype (raw)
  // or, for a quantized input, float32 (quantized per the manifest).
  void CheckInput(const std::string& dtype, const std::vector<int64_t>& shape) const;
};

class Model {
 public:
  // Reads and verifies the artifact (every member's zip CRC, the manifest's fields as docs/artifact.md's
  // "Validation" says, every member's size and sha256), checks that this machine can run its library (the
  // architecture of the manifest and of the ELF file, the CPU features it lists), then loads the library. Throws
  // Error naming the file (and the manifest field) before loading anything from a damaged or foreign file.
  // Inference runs on `num_threads` threads, from 1 to AvailableCores().size() (default: all of them);
  // another count throws Error.
  static Model Load(const std::string& path, std::optional<int> num_threads = std::nullopt);

  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  const std::vector<TensorInfo>& Inputs() const;
  const std::vector<TensorInfo>& Outputs() const;
  const std::string& Target() const;  // the target the artifact was compiled for
  const std::string& Arch() const;    // the architecture of its library
  bool NpuSimulated() const;          // NPU regions run as a simulation on the host CPU
  // The NPU regions compiled to a command stream for the device (Vela's, for an Arm Ethos-U target): the
  // command stream needs the NPU itself; Run executes those regions' bit-exact simulation.
  const std::vector<std::string>& NpuCommandStreams() const;
  int NumThreads() const;             // the threads its parallel kernels run on

  // Throws Error unless the model takes `count` inputs.
  void CheckInputCount(size_t count) const;

  // Runs the program on NumThreads() threads; safe to call from many threads at once (see the top of this file). Inputs in the manifest's order; each must match its shape; a
  // float32 input is quantized per the manifest, an input of the program's integer dtype is taken as raw.
  // Returns the raw outputs.
  std::vector<HostTensor> Run(const std::vector<HostTensor>& inputs) const;

  // float32 values of output `index`: (q - zero_point) * scale, per tensor or per channel.
  std::vector<float> Dequantize(size_t index, const HostTensor& output) const;

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The ids of the CPU cores this process may run on (its CPU affinity when first asked).
std::vector<unsigned> AvailableCores();

// How many threads parallel kernels started from the calling thread run on (read back from TVM's thread pool).
int PoolThreads();

// Quantize float32 values to `info`'s integer dtype: saturate(round_half_to_even(x / scale) + zero_point), NaN ->
// zero_point. Model::Run calls the library's quantizer instead where the artifact has one (the same integers).
HostTensor Quantize(const TensorInfo& info, const HostTensor& values);

}  // namespace edgeq

#endif  // EDGEQ_RUNTIME_H_
