// edgeq-run: run a .edgeq artifact on .npy inputs, write each output as OUTPUT_DIR/<file>.npy (its `file` in the
// manifest: a plain file name).
//
//   edgeq-run MODEL.edgeq --input x.npy [--input y.npy ...] --output-dir DIR [--raw] [--bench N] [--threads N]
//
// Float32 inputs are quantized per the manifest; inputs of the program's integer dtype are taken raw. Outputs are
// dequantized to float32 unless --raw. DIR and its parents are created if missing; an output path resolving outside
// DIR (a link there) is refused before the model runs, and every output file is written whole or not at all.
// Inference runs on --threads threads (default: every core this process may use). Exit status: 0 success, 1 error
// (message on stderr), 2 usage.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "edgeq/runtime.h"
#include "npy.h"

namespace {

int Usage(const std::string& problem) {
  std::cerr << "edgeq-run: " << problem << "\n"
            << "usage: edgeq-run MODEL.edgeq --input x.npy [--input ...] --output-dir DIR [--raw] [--bench N] [--threads N]\n";
  return 2;
}

// A whole number >= 1, or nothing.
std::optional<int> Count(const char* text) {
  if (text == nullptr) return std::nullopt;
  try {
    size_t used = 0;
    int value = std::stoi(text, &used);
    if (used == std::string(text).size() && value >= 1) return value;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

// mkdir -p; throws edgeq::Error saying why the folder cannot be created (naming a file in the way).
void MakeFolder(const std::string& path) {
  std::error_code error;
  std::filesystem::create_directories(path, error);
  if (!error) return;
  std::string reason = error.message();
  std::filesystem::path prefix;
  for (const std::filesystem::path& part : std::filesystem::path(path)) {
    prefix /= part;
    std::error_code ignored;
    if (std::filesystem::exists(prefix, ignored) && !std::filesystem::is_directory(prefix, ignored)) {
      reason = prefix.string() + " is a file, not a folder";
      break;
    }
  }
  throw edgeq::Error(path + ": cannot create the folder: " + reason);
}

// OUTPUT_DIR/<file>.npy, refused unless it resolves inside OUTPUT_DIR: `file` is a plain file name (the manifest is
// checked), but a link of that name already in the folder could point elsewhere.
std::string OutputPath(const std::string& folder, const std::string& file) {
  namespace fs = std::filesystem;
  fs::path path = fs::path(folder) / (file + ".npy");
  std::error_code error;
  fs::path root = fs::weakly_canonical(folder, error);
  fs::path resolved = error ? fs::path() : fs::weakly_canonical(path, error);
  if (error) throw edgeq::Error(path.string() + ": cannot be resolved: " + error.message());
  if (resolved.parent_path() != root) {
    throw edgeq::Error(path.string() + ": resolves to " + resolved.string() + ", outside the output folder " + root.string() + "; not written");
  }
  return path.string();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, output_dir;
  std::vector<std::string> input_paths;
  bool raw = false;
  int bench = 0;
  std::optional<int> threads;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](const std::string& flag) -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (arg == "--input") {
      const char* v = value(arg);
      if (!v) return Usage("--input needs a path");
      input_paths.push_back(v);
    } else if (arg == "--output-dir") {
      const char* v = value(arg);
      if (!v) return Usage("--output-dir needs a path");
      output_dir = v;
    } else if (arg == "--raw") {
      raw = true;
    } else if (arg == "--bench" || arg == "--threads") {
      const char* v = value(arg);
      std::optional<int> count = Count(v);
      if (!count) return Usage(arg + " needs a whole number >= 1; got '" + (v ? v : "") + "'");
      if (arg == "--bench") {
        bench = *count;
      } else {
        threads = count;
      }
    } else if (arg == "-h" || arg == "--help") {
      return Usage("runs a .edgeq artifact");
    } else if (!arg.empty() && arg[0] == '-') {
      return Usage("unknown option " + arg);
    } else if (model_path.empty()) {
      model_path = arg;
    } else {
      return Usage("one model only");
    }
  }
  if (model_path.empty() || output_dir.empty()) return Usage("MODEL and --output-dir are required");
  try {
    edgeq::Model model = edgeq::Model::Load(model_path, threads);
    MakeFolder(output_dir);
    if (model.NpuSimulated()) {
      std::cerr << "edgeq-run: NPU target " << model.Target() << ": NPU regions run as a bit-exact simulation on this CPU\n";
    }
    if (!model.NpuCommandStreams().empty()) {
      std::string regions;
      for (const std::string& region : model.NpuCommandStreams()) regions += (regions.empty() ? "" : ", ") + region;
      std::cerr << "edgeq-run: NPU target " << model.Target() << ": the command streams of " << regions
                << " need the NPU itself; here those regions run as their bit-exact simulation on the CPU\n";
    }
    std::vector<std::string> output_paths;
    for (const edgeq::TensorInfo& output : model.Outputs()) output_paths.push_back(OutputPath(output_dir, output.file));
    std::vector<edgeq::HostTensor> inputs;
    model.CheckInputCount(input_paths.size());
    for (size_t i = 0; i < input_paths.size(); ++i) inputs.push_back(edgeq::ReadNpy(input_paths[i], model.Inputs()[i]));
    std::vector<edgeq::HostTensor> outputs = model.Run(inputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      edgeq::HostTensor written = outputs[i];
      if (!raw && model.Outputs()[i].quantized) {
        std::vector<float> values = model.Dequantize(i, outputs[i]);
        written = {"float32", outputs[i].shape, std::vector<uint8_t>(values.size() * 4)};
        std::copy(reinterpret_cast<const uint8_t*>(values.data()), reinterpret_cast<const uint8_t*>(values.data()) + values.size() * 4, written.data.begin());
      }
      edgeq::WriteNpy(output_paths[i], written);
    }
    if (bench > 0) {
      std::vector<double> times;
      for (int i = 0; i < bench; ++i) {
        auto start = std::chrono::steady_clock::now();
        model.Run(inputs);
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      std::sort(times.begin(), times.end());
      std::printf("latency over %d runs on %d thread(s): median %.3f ms, min %.3f ms\n", bench, edgeq::PoolThreads(),
                  times[times.size() / 2], times.front());
    }
  } catch (const std::exception& error) {
    std::cerr << "edgeq-run: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
