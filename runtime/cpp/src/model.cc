#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "artifact.h"
#include "cpu.h"
#include "dtype.h"
#include "edgeq/runtime.h"
#include "files.h"

namespace edgeq {
namespace {

namespace ffi = tvm::ffi;

constexpr int kCpu = kDLCPU;
constexpr int kPooledAllocator = 2;
constexpr int kShareAllCores = -3;  // TVM's ThreadGroup::kSpecifyThreadShareAllCore

ffi::Function Global(const char* name) {
  std::optional<ffi::Function> function = ffi::Function::GetGlobal(name);
  if (!function) throw Error(std::string("TVM's runtime lacks ") + name);
  return *function;
}

// An idle pool worker yields this many times before it sleeps, unless TVM_THREAD_POOL_SPIN_COUNT is set (read
// when the process's first pool starts): about 5 ms on an Intel Xeon VM, which bridges the gaps between one
// inference's kernels. TVM's default, 300000, kept a core busy for about 70 ms after every inference. The Python
// runtime has the same (edgeq_runtime/vm.py, POOL_SPIN_COUNT).
constexpr char kPoolSpinCount[] = "20000";

// TVM keeps one thread pool per calling thread, sized when that thread first runs a parallel kernel.
// runtime.config_threadpool(mode, count, cpus) sizes it to `cpus` if the thread has none yet, lets workers run on
// any of them and makes parallel kernels split their work `count` ways. Called once per thread and count.
void UseThreads(int count) {
  thread_local int configured = 0;
  if (configured == count) return;
  setenv("TVM_THREAD_POOL_SPIN_COUNT", kPoolSpinCount, /*overwrite=*/0);
  ffi::Array<ffi::String> cpus;
  for (unsigned core : AvailableCores()) cpus.push_back(std::to_string(core));
  Global("runtime.config_threadpool")(kShareAllCores, count, cpus);
  if (PoolThreads() != count) {
    throw Error("TVM's thread pool of this thread runs " + std::to_string(PoolThreads()) + " thread(s), not " +
                std::to_string(count) + ": TVM sized it before edgeq ran here (set TVM_NUM_THREADS=" +
                std::to_string(cpus.size()) + " before the process first uses TVM)");
  }
  configured = count;
}

// TVM's compiled kernels assume tensor data aligned to this many bytes (kAllocAlignment in TVM's device_api.h)
// and may use aligned vector loads on a program input: malloc's 16 bytes crash them.
constexpr size_t kTvmAlignment = 64;

struct HostAllocator {
  void AllocData(DLTensor* tensor) {
    size_t bytes = std::max<size_t>(ffi::GetDataSize(*tensor), 1);
    tensor->data = std::aligned_alloc(kTvmAlignment, (bytes + kTvmAlignment - 1) / kTvmAlignment * kTvmAlignment);
    if (tensor->data == nullptr) throw Error("out of memory");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

const Dtype& DtypeOf(const std::string& name) {
  const Dtype* dtype = FindDtype(name);
  if (dtype == nullptr) throw Error("dtype " + name + " is not supported by the runtime");
  return *dtype;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// The library is written to a fresh temporary file (the dynamic loader caches libraries by path), named .so
// (TVM picks the loader by extension).
std::string WriteTemporary(const std::vector<uint8_t>& bytes) {
  const char* folder = std::getenv("TMPDIR");
  std::string pattern = std::string(folder && *folder ? folder : "/tmp") + "/edgeq-XXXXXX.so";
  std::vector<char> name(pattern.begin(), pattern.end());
  name.push_back('\0');
  int fd = mkstemps(name.data(), 3);
  if (fd < 0) throw Error("cannot create a temporary file in " + pattern);
  bool written = WriteAll(fd, bytes.data(), bytes.size());
  if (close(fd) != 0 || !written) {
    unlink(name.data());
    throw Error("cannot write the model library to " + std::string(name.data()));
  }
  return name.data();
}

std::string Join(const std::vector<std::string>& names) {
  std::string text;
  for (const std::string& name : names) text += (text.empty() ? "" : ", ") + name;
  return text;
}

// Refuses, before anything is loaded, a library this machine cannot run: one for another architecture (by the
// manifest, or by the ELF file itself), or one using CPU features this CPU lacks (it would die of SIGILL).
void CheckRunsHere(const std::string& path, const Artifact& artifact) {
  const Manifest& manifest = artifact.manifest;
  if (manifest.arch != HostArch()) {
    throw Error(path + ": built for " + manifest.arch + "; this machine is " + HostArch() + " (run the " + manifest.arch +
                " build of edgeq-run, e.g. under qemu-" + manifest.arch + ")");
  }
  std::optional<std::string> arch = ElfArch(artifact.members.at(manifest.library_member));
  if (!arch) throw Error(path + ": " + manifest.library_member + " is not a 64-bit little-endian ELF library");
  if (*arch != HostArch()) {
    throw Error(path + ": " + manifest.library_member + " is an " + *arch + " library; this machine is " + HostArch());
  }
  std::vector<std::string> missing = MissingCpuFeatures(manifest.cpu_features);
  if (!missing.empty()) {
    throw Error(path + ": built for a CPU with " + Join(missing) + "; this CPU lacks " + (missing.size() == 1 ? "it" : "them") +
                ": " + MissingFeaturesAdvice(missing));
  }
}

// A Relax VM: it holds the state of the call it runs (frames, registers), so calls must not overlap on one VM.
struct Vm {
  ffi::Module module;
  ffi::Function main;
  std::vector<std::optional<ffi::Function>> quantizers;  // per input: the library's quantizer, if it has one
};

int64_t Channel(const TensorInfo& info, int64_t flat_index) {
  if (info.scale.size() == 1) return 0;
  int64_t stride = 1;
  for (size_t d = info.axis + 1; d < info.shape.size(); ++d) stride *= info.shape[d];
  return (flat_index / stride) % info.shape[info.axis];
}

}  // namespace

std::vector<unsigned> AvailableCores() {
  static const std::vector<unsigned> cores = [] {  // read once: TVM pins a thread whose pool it sizes itself
    std::vector<unsigned> found;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      for (unsigned core = 0; core < CPU_SETSIZE; ++core) {
        if (CPU_ISSET(core, &set)) found.push_back(core);
      }
    }
    for (unsigned core = 0; found.empty() && core < std::max(1u, std::thread::hardware_concurrency()); ++core) found.push_back(core);
    return found;
  }();
  return cores;
}

int PoolThreads() { return Global("runtime.NumThreads")().cast<int>(); }

int64_t HostTensor::NumElements() const {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return count;
}

size_t HostTensor::ElementBytes(const std::string& dtype) { return DtypeOf(dtype).bytes; }

void TensorInfo::CheckInput(const std::string& given_dtype, const std::vector<int64_t>& given_shape) const {
  if (given_shape != shape) {
    throw Error("input '" + name + "' has shape " + ShapeText(given_shape) + "; expected " + ShapeText(shape));
  }
  if (given_dtype != dtype && !(quantized && given_dtype == "float32")) {
    throw Error("input '" + name + "' has dtype " + given_dtype + "; expected " + dtype + (quantized ? " (raw) or float32 to quantize" : ""));
  }
}

HostTensor Quantize(const TensorInfo& info, const HostTensor& values) {
  if (values.dtype != "float32") throw Error("input '" + info.name + "': only float32 values are quantized");
  HostTensor out{info.dtype, values.shape, std::vector<uint8_t>(values.NumElements() * HostTensor::ElementBytes(info.dtype))};
  const float* x = reinterpret_cast<const float*>(values.data.data());
  int64_t low = DtypeOf(info.dtype).low, high = DtypeOf(info.dtype).high;
  for (int64_t i = 0; i < values.NumElements(); ++i) {
    int64_t c = Channel(info, i);
    float steps = x[i] / info.scale[c];          // float32 division, as ONNX QuantizeLinear
    float rounded = std::nearbyint(steps);       // round half to even in the default rounding mode
    double value = (std::isnan(rounded) ? 0.0 : double(rounded)) + double(info.zero_point[c]);  // NaN -> the zero point
    int64_t q = value < double(low) ? low : value > double(high) ? high : int64_t(value);
    if (info.dtype == "int8") reinterpret_cast<int8_t*>(out.data.data())[i] = int8_t(q);
    else if (info.dtype == "uint8") out.data[i] = uint8_t(q);
    else reinterpret_cast<int32_t*>(out.data.data())[i] = int32_t(q);
  }
  return out;
}

struct Model::Impl {
  std::string path;
  Artifact artifact;
  int num_threads = 1;
  std::string library_path;
  std::optional<ffi::Module> library;  // the loaded executable, kept alive while VMs run code from it
  std::mutex mutex;                     // guards idle (and VM creation)
  std::vector<std::unique_ptr<Vm>> idle;  // VMs no call is running on

  ~Impl() {
    idle.clear();
    if (!library_path.empty()) unlink(library_path.c_str());
  }

  // A new VM on the loaded executable (sharing its code and constants); throws ffi::Error, or Error for an input
  // quantizer the library lacks.
  std::unique_ptr<Vm> NewVm() const {
    ffi::Module module = (*library)->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    module->GetFunction("vm_initialization").value()(kCpu, 0, kPooledAllocator, kCpu, 0, kPooledAllocator);
    std::vector<std::optional<ffi::Function>> quantizers;
    for (const TensorInfo& info : artifact.manifest.inputs) {
      std::optional<ffi::Function> quantizer;
      if (!info.quantizer.empty()) {
        ffi::Optional<ffi::Function> found = module->GetFunction(info.quantizer);
        if (!found.has_value()) throw Error(path + ": the library has no function '" + info.quantizer + "' (input '" + info.name + "''s quantizer)");
        quantizer = *found;
      }
      quantizers.push_back(quantizer);
    }
    ffi::Function main = module->GetFunction("main").value();
    return std::make_unique<Vm>(Vm{module, main, quantizers});
  }

  // An idle VM for one call, or a new one when every VM is busy.
  std::unique_ptr<Vm> TakeVm() {
    std::lock_guard<std::mutex> lock(mutex);
    if (idle.empty()) return NewVm();
    std::unique_ptr<Vm> vm = std::move(idle.back());
    idle.pop_back();
    return vm;
  }

  // Back to the idle VMs after a call that completed (a call that threw may have left its VM mid-call: it is
  // dropped instead).
  void ReturnVm(std::unique_ptr<Vm> vm) {
    std::lock_guard<std::mutex> lock(mutex);
    idle.push_back(std::move(vm));
  }
};

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::Load(const std::string& path, std::optional<int> num_threads) {
  int cores = int(AvailableCores().size());
  if (num_threads && (*num_threads < 1 || *num_threads > cores)) {
    throw Error("num_threads must be a whole number from 1 to " + std::to_string(cores) +
                " (the cores this process may use); got " + std::to_string(*num_threads));
  }
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->num_threads = num_threads.value_or(cores);
  impl->artifact = Artifact::Read(path);
  CheckRunsHere(path, impl->artifact);
  impl->library_path = WriteTemporary(impl->artifact.members.at(impl->artifact.manifest.library_member));
  try {
    impl->library = ffi::Module::LoadFromFile(impl->library_path);
    impl->idle.push_back(impl->NewVm());  // the first VM, now: a library without the manifest's quantizers is refused here
  } catch (const ffi::Error& error) {
    throw Error(path + ": the model library cannot be loaded: " + std::string(error.what()));
  }
  return Model(std::move(impl));
}

const std::vector<TensorInfo>& Model::Inputs() const { return impl_->artifact.manifest.inputs; }
const std::vector<TensorInfo>& Model::Outputs() const { return impl_->artifact.manifest.outputs; }
const std::string& Model::Target() const { return impl_->artifact.manifest.target; }
const std::string& Model::Arch() const { return impl_->artifact.manifest.arch; }
bool Model::NpuSimulated() const { return impl_->artifact.manifest.npu_simulated; }
const std::vector<std::string>& Model::NpuCommandStreams() const { return impl_->artifact.manifest.command_stream_regions; }
int Model::NumThreads() const { return impl_->num_threads; }

void Model::CheckInputCount(size_t count) const {
  if (count != Inputs().size()) {
    throw Error(std::to_string(count) + " input(s) given; the model takes " + std::to_string(Inputs().size()));
  }
}

std::vector<HostTensor> Model::Run(const std::vector<HostTensor>& inputs) const {
  CheckInputCount(inputs.size());
  const auto& infos = Inputs();
  for (size_t i = 0; i < inputs.size(); ++i) {
    infos[i].CheckInput(inputs[i].dtype, inputs[i].shape);
    if (inputs[i].data.size() != size_t(inputs[i].NumElements()) * HostTensor::ElementBytes(inputs[i].dtype)) {
      throw Error("input '" + infos[i].name + "': data size does not match its shape");
    }
  }
  std::unique_ptr<Vm> vm;
  try {
    UseThreads(impl_->num_threads);  // before the quantizers run kernels on this thread's pool
    vm = impl_->TakeVm();
  } catch (const ffi::Error& error) {
    throw Error(std::string("preparing to run the model failed: ") + error.what());
  }
  std::vector<ffi::Tensor> tensors;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorInfo& info = infos[i];
    const std::optional<ffi::Function>& quantizer = vm->quantizers[i];
    bool quantize = inputs[i].dtype != info.dtype;
    HostTensor quantized;  // by the runtime, for an artifact without a quantizer for this input
    if (quantize && !quantizer) quantized = Quantize(info, inputs[i]);
    const HostTensor& value = quantize && !quantizer ? quantized : inputs[i];
    ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(HostAllocator(), ffi::ShapeView(value.shape.data(), value.shape.size()),
                                                  DtypeOf(value.dtype).dlpack, DLDevice{kDLCPU, 0});
    std::memcpy(tensor.data_ptr(), value.data.data(), value.data.size());
    if (quantize && quantizer) {
      try {
        tensor = (*quantizer)(tensor).cast<ffi::Tensor>();  // the library's kernel: parallel and vectorized
      } catch (const ffi::Error& error) {
        throw Error("quantizing input '" + info.name + "' failed: " + std::string(error.what()));
      }
    }
    tensors.push_back(tensor);
  }
  std::vector<ffi::AnyView> arguments(tensors.begin(), tensors.end());
  ffi::Any result;
  try {
    vm->main.CallPacked(arguments.data(), static_cast<int32_t>(arguments.size()), &result);
  } catch (const ffi::Error& error) {
    throw Error(std::string("running the model failed: ") + error.what());
  }
  std::vector<ffi::Tensor> produced;
  if (auto single = result.as<ffi::Tensor>()) {
    produced.push_back(*single);
  } else if (auto many = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *many) produced.push_back(item.cast<ffi::Tensor>());
  }
  if (produced.size() != Outputs().size()) throw Error("the model returned " + std::to_string(produced.size()) + " outputs; the manifest lists " + std::to_string(Outputs().size()));
  std::vector<HostTensor> outputs;
  for (size_t i = 0; i < produced.size(); ++i) {
    const ffi::Tensor& tensor = produced[i];
    HostTensor out{Outputs()[i].dtype, std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end()), {}};
    if (out.shape != Outputs()[i].shape) throw Error("output '" + Outputs()[i].name + "' has an unexpected shape");
    out.data.resize(size_t(out.NumElements()) * HostTensor::ElementBytes(out.dtype));
    if (ffi::GetDataSize(*tensor.GetDLTensorPtr()) != out.data.size()) throw Error("output '" + Outputs()[i].name + "' has an unexpected dtype");
    std::memcpy(out.data.data(), tensor.data_ptr(), out.data.size());
    outputs.push_back(std::move(out));
  }
  impl_->ReturnVm(std::move(vm));
  return outputs;
}

std::vector<float> Model::Dequantize(size_t index, const HostTensor& output) const {
  const TensorInfo& info = Outputs().at(index);
  std::vector<float> values(output.NumElements());
  for (int64_t i = 0; i < output.NumElements(); ++i) {
    int64_t q = info.dtype == "int8" ? reinterpret_cast<const int8_t*>(output.data.data())[i]
              : info.dtype == "uint8" ? output.data[i]
              : info.dtype == "int32" ? reinterpret_cast<const int32_t*>(output.data.data())[i]
              : 0;
    if (!info.quantized) {
      values[i] = reinterpret_cast<const float*>(output.data.data())[i];
      continue;
    }
    int64_t c = Channel(info, i);
    values[i] = float(q - info.zero_point[c]) * info.scale[c];  // float32(q - zp) * float32(s)
  }
  return values;
}

}  // namespace edgeq
